// ConvCRF truncated-Gaussian message passing on the GPU (Eq. 6): the kernels are in kernels.cuh, launched here on
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_launch.h"
#include "kernels.cuh"

namespace app {
namespace {

at::Tensor gaussian_message_cuda(const at::Tensor& q, const at::Tensor& features, int64_t filter_size) {
  const c10::cuda::CUDAGuard guard(q.device());
  return gaussian_filter::gaussian_message_with<CudaLaunch>(q, features, filter_size);
}

at::Tensor gaussian_message_features_backward_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                   const at::Tensor& features, int64_t filter_size) {
  const c10::cuda::CUDAGuard guard(q.device());
  return gaussian_filter::gaussian_message_features_backward_with<CudaLaunch>(grad, q, features, filter_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(app, CUDA, m) {
  m.impl("gaussian_message", &gaussian_message_cuda);
  m.impl("gaussian_message_features_backward", &gaussian_message_features_backward_cuda);
}

}  // namespace app
