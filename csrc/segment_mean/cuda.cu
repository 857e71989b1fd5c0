// Segment mean on the GPU: the kernels are in kernels.cuh, launched here on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_launch.h"
#include "kernels.cuh"

namespace app {
namespace {

at::Tensor segment_mean_cuda(const at::Tensor& values, const at::Tensor& segments, int64_t num_segments) {
  const c10::cuda::CUDAGuard guard(values.device());
  return segment_mean::segment_mean_with<CudaLaunch>(values, segments, num_segments);
}

}  // namespace

TORCH_LIBRARY_IMPL(app, CUDA, m) { m.impl("segment_mean", &segment_mean_cuda); }

}  // namespace app
