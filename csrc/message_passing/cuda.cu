// ISGMR / TRWP / SGM min-sum message passing on the GPU (thesis Alg. 1-4): the kernels and their launcher are in
// cuda_sweeps.cuh, launched here on the current stream; the host driver is shared with the CPU (common.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_launch.h"
#include "common.h"
#include "cuda_sweeps.cuh"

namespace app {
namespace message_passing {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& unary, const at::Tensor& pairwise,
                                                            const at::Tensor& edge_weights, int64_t method,
                                                            int64_t n_directions, int64_t n_iterations,
                                                            int64_t pairwise_kind) {
  const c10::cuda::CUDAGuard guard(unary.device());
  return sweeps_forward<CudaLaunch>(unary, pairwise, edge_weights, method, n_directions, n_iterations, pairwise_kind);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_costs, const at::Tensor& pairwise,
                                                             const at::Tensor& edge_weights, const at::Tensor& p,
                                                             const at::Tensor& q, int64_t method, int64_t n_directions,
                                                             int64_t n_iterations, int64_t pairwise_kind,
                                                             bool pairwise_grad, bool weights_grad) {
  const c10::cuda::CUDAGuard guard(grad_costs.device());
  return sweeps_backward<CudaLaunch>(grad_costs, pairwise, edge_weights, p, q, method, n_directions, n_iterations,
                                    pairwise_kind, pairwise_grad, weights_grad);
}

}  // namespace
}  // namespace message_passing

TORCH_LIBRARY_IMPL(app, CUDA, m) {
  m.impl("message_passing", &message_passing::forward_cuda);
  m.impl("message_passing_backward", &message_passing::backward_cuda);
}

}  // namespace app
