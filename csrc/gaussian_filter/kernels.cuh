// ConvCRF truncated-Gaussian message passing on the GPU (Eq. 6), device code and its host drivers
// `gaussian_message_with<Launch>` and `gaussian_message_features_backward_with<Launch>`, launched through a policy
// as the message-passing sweeps are (csrc/cuda_launch.h on the GPU, tests/emulation on the CPU).
//
// A thread per pixel, the kernel value of each window offset computed on the fly and applied to a block of channels
// held in registers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "geometry.h"

namespace app {
namespace gaussian_filter {

constexpr int kThreads = 256;
constexpr int kChannelBlock = 8;  // channels accumulated in registers per pass over the window

// exp(-1/2 sum_f (f[p] - f[n])^2) for pixels p and n of one image (Eq. 5).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t kernel_value(const scalar_t* features, int64_t pixels, int64_t n_features, int64_t p,
                                              int64_t n) {
  acc_t distance = 0;
  for (int64_t f = 0; f < n_features; ++f) {
    const acc_t diff = static_cast<acc_t>(features[f * pixels + p]) - static_cast<acc_t>(features[f * pixels + n]);
    distance += diff * diff;
  }
  return exp(acc_t(-0.5) * distance);
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* q, const scalar_t* features, scalar_t* output, Geometry g,
                               int64_t total) {
  const int64_t pixels = g.pixels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / pixels, p = i % pixels, y = p / g.width, x = p % g.width;
    const scalar_t* f_b = features + b * g.n_features * pixels;
    const scalar_t* q_b = q + b * g.channels * pixels;
    for (int64_t c0 = 0; c0 < g.channels; c0 += kChannelBlock) {
      acc_t acc[kChannelBlock] = {};
      for (int64_t dy = -g.radius; dy <= g.radius; ++dy) {
        if (y + dy < 0 || y + dy >= g.height) continue;
        for (int64_t dx = -g.radius; dx <= g.radius; ++dx) {
          if (x + dx < 0 || x + dx >= g.width || (dy == 0 && dx == 0)) continue;
          const int64_t n = p + dy * g.width + dx;
          const acc_t k = kernel_value<scalar_t, acc_t>(f_b, pixels, g.n_features, p, n);
#pragma unroll
          for (int j = 0; j < kChannelBlock; ++j) {
            if (c0 + j < g.channels) acc[j] += k * static_cast<acc_t>(q_b[(c0 + j) * pixels + n]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kChannelBlock; ++j) {
        if (c0 + j < g.channels) output[(b * g.channels + c0 + j) * pixels + p] = static_cast<scalar_t>(acc[j]);
      }
    }
  }
}

// d loss / d f[p] = sum_n K(p, n) (f[n] - f[p]) (<g[p], q[n]> + <g[n], q[p]>), gathered per pixel; the output
// `grad_features` is in the accumulation type and owned by its pixel's thread.
template <typename scalar_t, typename acc_t>
__global__ void features_backward_kernel(const scalar_t* grad, const scalar_t* q, const scalar_t* features,
                                         acc_t* grad_features, Geometry g, int64_t total) {
  const int64_t pixels = g.pixels();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / pixels, p = i % pixels, y = p / g.width, x = p % g.width;
    const scalar_t* f_b = features + b * g.n_features * pixels;
    const scalar_t* q_b = q + b * g.channels * pixels;
    const scalar_t* g_b = grad + b * g.channels * pixels;
    acc_t* out = grad_features + b * g.n_features * pixels + p;
    for (int64_t f = 0; f < g.n_features; ++f) out[f * pixels] = 0;
    for (int64_t dy = -g.radius; dy <= g.radius; ++dy) {
      if (y + dy < 0 || y + dy >= g.height) continue;
      for (int64_t dx = -g.radius; dx <= g.radius; ++dx) {
        if (x + dx < 0 || x + dx >= g.width || (dy == 0 && dx == 0)) continue;
        const int64_t n = p + dy * g.width + dx;
        acc_t weight = 0;
        for (int64_t c = 0; c < g.channels; ++c) {
          weight += static_cast<acc_t>(g_b[c * pixels + p]) * static_cast<acc_t>(q_b[c * pixels + n]) +
                    static_cast<acc_t>(g_b[c * pixels + n]) * static_cast<acc_t>(q_b[c * pixels + p]);
        }
        weight *= kernel_value<scalar_t, acc_t>(f_b, pixels, g.n_features, p, n);
        for (int64_t f = 0; f < g.n_features; ++f) {
          out[f * pixels] +=
              weight * (static_cast<acc_t>(f_b[f * pixels + n]) - static_cast<acc_t>(f_b[f * pixels + p]));
        }
      }
    }
  }
}

// Blocks for `total` pixels: at least one, at most 65535 * 8 (the kernels' grid-stride loops cover the rest).
inline int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(wanted, 1), 65535 * 8));
}

// The op gaussian_message: q (B, C, H, W), features (B, F, H, W) -> the message (B, C, H, W).
template <typename Launch>
at::Tensor gaussian_message_with(const at::Tensor& q, const at::Tensor& features, int64_t filter_size) {
  const Geometry g = check_inputs(q, features, filter_size);
  auto output = at::empty_like(q);
  if (q.numel() == 0) return output;
  const int64_t total = q.size(0) * g.height * g.width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gaussian_message_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Launch::run(forward_kernel<scalar_t, acc_t>, blocks_for(total), kThreads, 0, q.const_data_ptr<scalar_t>(),
                features.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), g, total);
  });
  return output;
}

// The op gaussian_message_features_backward: the gradient (B, F, H, W) of features from grad (B, C, H, W).
template <typename Launch>
at::Tensor gaussian_message_features_backward_with(const at::Tensor& grad, const at::Tensor& q,
                                                   const at::Tensor& features, int64_t filter_size) {
  const Geometry g = check_inputs(q, features, filter_size);
  check_output_grad(grad, q);
  if (features.numel() == 0) return at::empty_like(features);
  const int64_t total = q.size(0) * g.height * g.width;
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gaussian_message_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto accumulated = at::empty(features.sizes(), features.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    Launch::run(features_backward_kernel<scalar_t, acc_t>, blocks_for(total), kThreads, 0,
                grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), features.const_data_ptr<scalar_t>(),
                accumulated.mutable_data_ptr<acc_t>(), g, total);
    result = accumulated.to(features.scalar_type());
  });
  return result;
}

}  // namespace gaussian_filter
}  // namespace app
