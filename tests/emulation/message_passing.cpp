// The CUDA message-passing kernels (csrc/message_passing/cuda_sweeps.cuh) run on the CPU through the emulation of
// gpu_emulator.h: the ops message_passing and message_passing_backward of the library `app_emulated`, with the
// schemas of csrc/ops.cpp, for CPU tensors (tests/test_cuda_emulation.py compares them with the CPU ops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"
// the emulator first: it defines APP_DYNAMIC_SHARED and CUDA's names
#include "../../csrc/message_passing/cuda_sweeps.cuh"

TORCH_LIBRARY(app_emulated, m) {
  m.def(
      "message_passing(Tensor unary, Tensor pairwise, Tensor edge_weights, int method, int n_directions, "
      "int n_iterations, int pairwise_kind) -> (Tensor, Tensor, Tensor)");
  m.def(
      "message_passing_backward(Tensor grad_costs, Tensor pairwise, Tensor edge_weights, Tensor p, Tensor q, "
      "int method, int n_directions, int n_iterations, int pairwise_kind, bool pairwise_grad, bool weights_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(app_emulated, CPU, m) {
  m.impl("message_passing", &app::message_passing::sweeps_forward<app::EmulatedLaunch>);
  m.impl("message_passing_backward", &app::message_passing::sweeps_backward<app::EmulatedLaunch>);
}
