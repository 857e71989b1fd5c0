// Shapes of one ConvCRF message-passing call (Eq. 6), shared by the CPU and CUDA kernels, and the input checks
// that produce them.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace app {

struct Geometry {
  int64_t channels, n_features, height, width, radius;
  C10_HOST_DEVICE int64_t pixels() const { return height * width; }
};

// q (B, C, H, W), features (B, F, H, W), an odd window of filter_size >= 3 pixels.
inline Geometry check_inputs(const at::Tensor& q, const at::Tensor& features, int64_t filter_size) {
  TORCH_CHECK(q.dim() == 4 && features.dim() == 4, "gaussian_message: expected q (B,C,H,W), features (B,F,H,W)");
  TORCH_CHECK(q.is_contiguous() && features.is_contiguous(), "gaussian_message: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == features.scalar_type(), "gaussian_message: q and features must share a dtype");
  TORCH_CHECK(q.device() == features.device(), "gaussian_message: q and features must be on one device");
  TORCH_CHECK(q.size(0) == features.size(0) && q.size(2) == features.size(2) && q.size(3) == features.size(3),
              "gaussian_message: q and features must share batch and spatial size");
  TORCH_CHECK(filter_size >= 3 && filter_size % 2 == 1, "gaussian_message: filter_size must be odd and >= 3");
  return {q.size(1), features.size(1), q.size(2), q.size(3), filter_size / 2};
}

// The output gradient of gaussian_message_features_backward: contiguous, shaped, typed and placed like q.
inline void check_output_grad(const at::Tensor& grad, const at::Tensor& q) {
  TORCH_CHECK(grad.sizes() == q.sizes() && grad.is_contiguous() && grad.scalar_type() == q.scalar_type() &&
                  grad.device() == q.device(),
              "gaussian_message: grad must be contiguous, shaped, typed and placed like q");
}

}  // namespace app
