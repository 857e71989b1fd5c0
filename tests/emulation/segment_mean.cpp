// The CUDA segment-mean kernels (csrc/segment_mean/kernels.cuh) on the CPU through gpu_emulator.h: the op
// segment_mean of the library `app_emulated`, with the schema of csrc/schemas.h, for CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"
// the emulator first: it defines CUDA's names
#include "../../csrc/schemas.h"
#include "../../csrc/segment_mean/kernels.cuh"

TORCH_LIBRARY_FRAGMENT(app_emulated, m) {
  m.def(app::schema::kSegmentMean);
}

TORCH_LIBRARY_IMPL(app_emulated, CPU, m) {
  m.impl("segment_mean", &app::segment_mean::segment_mean_with<app::EmulatedLaunch>);
}
