// The CUDA segment-mean kernels (csrc/segment_mean/kernels.cuh) on the CPU through gpu_emulator.h: the op
// segment_mean of the library `app_emulated`, with the schema of csrc/ops.cpp, for CPU tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"
// the emulator first: it defines CUDA's names
#include "../../csrc/segment_mean/kernels.cuh"

TORCH_LIBRARY_FRAGMENT(app_emulated, m) {
  m.def("segment_mean(Tensor values, Tensor segments, int num_segments) -> Tensor");
}

TORCH_LIBRARY_IMPL(app_emulated, CPU, m) {
  m.impl("segment_mean", &app::segment_mean::segment_mean_with<app::EmulatedLaunch>);
}
