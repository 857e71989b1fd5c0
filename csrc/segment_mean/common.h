// The segment mean's input checks, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace app {
namespace segment_mean {

// values (B, C, H, W) and int64 segments (B, H, W), contiguous, on one device; num_segments > 0.
inline void check_inputs(const at::Tensor& values, const at::Tensor& segments, int64_t num_segments) {
  TORCH_CHECK(values.dim() == 4 && segments.dim() == 3, "segment_mean: expected values (B,C,H,W), segments (B,H,W)");
  TORCH_CHECK(values.size(0) == segments.size(0) && values.size(2) == segments.size(1) &&
                  values.size(3) == segments.size(2),
              "segment_mean: values and segments must share batch and spatial size");
  TORCH_CHECK(values.is_contiguous() && segments.is_contiguous(), "segment_mean: inputs must be contiguous");
  TORCH_CHECK(segments.scalar_type() == at::kLong, "segment_mean: segments must be int64");
  TORCH_CHECK(values.device() == segments.device(), "segment_mean: values and segments must be on one device");
  TORCH_CHECK(num_segments > 0, "segment_mean: num_segments must be positive");
}

}  // namespace segment_mean
}  // namespace app
