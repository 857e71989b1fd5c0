// Local mean-field on the GPU: the kernels and their policy are in meanfield_kernels.cuh, launched here on the
// current stream; the host driver is shared with the CPU (meanfield.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_launch.h"
#include "meanfield_kernels.cuh"

namespace app {
namespace meanfield {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& unary, const at::Tensor& pairwise,
                                                const at::Tensor& edge_weights, int64_t n_directions,
                                                int64_t n_iterations, int64_t pairwise_kind) {
  const c10::cuda::CUDAGuard guard(unary.device());
  return meanfield_with<CudaLaunch>(unary, pairwise, edge_weights, n_directions, n_iterations, pairwise_kind);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_costs, const at::Tensor& pairwise,
                                                             const at::Tensor& edge_weights, const at::Tensor& q,
                                                             int64_t n_directions, int64_t pairwise_kind,
                                                             bool pairwise_grad) {
  const c10::cuda::CUDAGuard guard(grad_costs.device());
  return meanfield_backward_with<CudaLaunch>(grad_costs, pairwise, edge_weights, q, n_directions, pairwise_kind,
                                             pairwise_grad);
}

}  // namespace
}  // namespace meanfield

TORCH_LIBRARY_IMPL(app, CUDA, m) {
  m.impl("meanfield", &meanfield::forward_cuda);
  m.impl("meanfield_backward", &meanfield::backward_cuda);
}

}  // namespace app
