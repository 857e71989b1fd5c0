// The CUDA ConvCRF message kernels (csrc/gaussian_filter/kernels.cuh) on the CPU through gpu_emulator.h: the ops
// gaussian_message and gaussian_message_features_backward of the library `app_emulated`, with the schemas of
// csrc/schemas.h, for CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"
// the emulator first: it defines CUDA's names
#include "../../csrc/gaussian_filter/kernels.cuh"
#include "../../csrc/schemas.h"

TORCH_LIBRARY_FRAGMENT(app_emulated, m) {
  m.def(app::schema::kGaussianMessage);
  m.def(app::schema::kGaussianMessageFeaturesBackward);
}

TORCH_LIBRARY_IMPL(app_emulated, CPU, m) {
  m.impl("gaussian_message", &app::gaussian_filter::gaussian_message_with<app::EmulatedLaunch>);
  m.impl("gaussian_message_features_backward",
         &app::gaussian_filter::gaussian_message_features_backward_with<app::EmulatedLaunch>);
}
