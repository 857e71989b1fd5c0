// The CUDA message-passing kernels (csrc/message_passing/cuda_sweeps.cuh) run on the CPU through the emulation of
// gpu_emulator.h: the ops message_passing and message_passing_backward of the library `app_emulated`, with the
// schemas of csrc/schemas.h, for CPU tensors (tests/test_cuda_emulation.py compares them with the CPU ops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"
// the emulator first: it defines APP_DYNAMIC_SHARED and CUDA's names
#include "../../csrc/message_passing/cuda_sweeps.cuh"
#include "../../csrc/schemas.h"

TORCH_LIBRARY_FRAGMENT(app_emulated, m) {
  m.def(app::schema::kMessagePassing);
  m.def(app::schema::kMessagePassingBackward);
}

TORCH_LIBRARY_IMPL(app_emulated, CPU, m) {
  m.impl("message_passing", &app::message_passing::sweeps_forward<app::EmulatedLaunch>);
  m.impl("message_passing_backward", &app::message_passing::sweeps_backward<app::EmulatedLaunch>);
}
