// The CUDA mean-field kernels and their policy (csrc/message_passing/meanfield_kernels.cuh) on the CPU through
// gpu_emulator.h, with the host driver of meanfield.h and its ATen calls on CPU tensors: the ops meanfield and
// meanfield_backward of the library `app_emulated`, with the schemas of csrc/schemas.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"
// the emulator first: it defines CUDA's names
#include "../../csrc/message_passing/meanfield_kernels.cuh"
#include "../../csrc/schemas.h"

TORCH_LIBRARY_FRAGMENT(app_emulated, m) {
  m.def(app::schema::kMeanfield);
  m.def(app::schema::kMeanfieldBackward);
}

TORCH_LIBRARY_IMPL(app_emulated, CPU, m) {
  m.impl("meanfield", &app::meanfield::meanfield_with<app::EmulatedLaunch>);
  m.impl("meanfield_backward", &app::meanfield::meanfield_backward_with<app::EmulatedLaunch>);
}
