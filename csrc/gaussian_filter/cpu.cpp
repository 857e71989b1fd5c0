// ConvCRF truncated-Gaussian message passing on the CPU (Eq. 6), the kernel computed on the fly.
// OpenMP over (image, row); inside a row every loop runs over contiguous pixels, so it vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "geometry.h"

namespace app {
namespace {

// Far-apart features give kernel values, and so messages, deep in the subnormal range, where x86 arithmetic is
// ~100x slower (and so is every later op reading the message). Flush them to zero inside the kernels: this
// changes no value above ~1e-38 (float) / ~1e-308 (double).
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// kernel[x] = exp(-1/2 sum_f (f[y, x] - f[y + dy, x + dx])^2) for x in [x0, x1) (Eq. 5).
template <typename scalar_t, typename acc_t>
void kernel_row(const scalar_t* features, const Geometry& g, int64_t y, int64_t dy, int64_t dx, int64_t x0,
                int64_t x1, acc_t* kernel) {
  std::fill(kernel + x0, kernel + x1, acc_t(0));
  for (int64_t f = 0; f < g.n_features; ++f) {
    const scalar_t* centre = features + f * g.pixels() + y * g.width;
    const scalar_t* neighbour = centre + dy * g.width + dx;
    for (int64_t x = x0; x < x1; ++x) {
      const acc_t diff = static_cast<acc_t>(centre[x]) - static_cast<acc_t>(neighbour[x]);
      kernel[x] += diff * diff;
    }
  }
  for (int64_t x = x0; x < x1; ++x) kernel[x] = std::exp(acc_t(-0.5) * kernel[x]);
}

// Calls body(dy, dx, x0, x1) for every off-centre window offset whose neighbour row lies in the image;
// x0..x1 are the pixels of row y whose neighbour column lies in the image.
template <typename Body>
void for_each_offset(const Geometry& g, int64_t y, Body body) {
  for (int64_t dy = -g.radius; dy <= g.radius; ++dy) {
    if (y + dy < 0 || y + dy >= g.height) continue;
    for (int64_t dx = -g.radius; dx <= g.radius; ++dx) {
      if (dy == 0 && dx == 0) continue;
      const int64_t x0 = std::max<int64_t>(0, -dx), x1 = std::min<int64_t>(g.width, g.width - dx);
      if (x0 < x1) body(dy, dx, x0, x1);
    }
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* features, scalar_t* output, int64_t batch, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch * g.height, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<acc_t> kernel(g.width), acc(g.channels * g.width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height;
      const scalar_t* q_b = q + b * g.channels * g.pixels();
      const scalar_t* f_b = features + b * g.n_features * g.pixels();
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for_each_offset(g, y, [&](int64_t dy, int64_t dx, int64_t x0, int64_t x1) {
        kernel_row(f_b, g, y, dy, dx, x0, x1, kernel.data());
        const int64_t shift = (y + dy) * g.width + dx;
        for (int64_t c = 0; c < g.channels; ++c) {
          const scalar_t* q_c = q_b + c * g.pixels() + shift;
          acc_t* a = acc.data() + c * g.width;
          for (int64_t x = x0; x < x1; ++x) a[x] += kernel[x] * static_cast<acc_t>(q_c[x]);
        }
      });
      for (int64_t c = 0; c < g.channels; ++c) {
        scalar_t* out = output + (b * g.channels + c) * g.pixels() + y * g.width;
        for (int64_t x = 0; x < g.width; ++x) out[x] = static_cast<scalar_t>(acc[c * g.width + x]);
      }
    }
  });
}

// d loss / d f[x] = sum_d K(x, d) (f[x+d] - f[x]) (<g[x], q[x+d]> + <g[x+d], q[x]>): the kernel is symmetric,
// so the pair (x, x+d) seen from both ends gathers everything at x without atomics.
template <typename scalar_t>
void features_backward_kernel(const scalar_t* grad, const scalar_t* q, const scalar_t* features, scalar_t* output,
                              int64_t batch, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch * g.height, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<acc_t> kernel(g.width), weight(g.width), acc(g.n_features * g.width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height;
      const scalar_t* q_b = q + b * g.channels * g.pixels();
      const scalar_t* g_b = grad + b * g.channels * g.pixels();
      const scalar_t* f_b = features + b * g.n_features * g.pixels();
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for_each_offset(g, y, [&](int64_t dy, int64_t dx, int64_t x0, int64_t x1) {
        kernel_row(f_b, g, y, dy, dx, x0, x1, kernel.data());
        std::fill(weight.begin() + x0, weight.begin() + x1, acc_t(0));
        const int64_t here = y * g.width, there = (y + dy) * g.width + dx;
        for (int64_t c = 0; c < g.channels; ++c) {
          const scalar_t* q_c = q_b + c * g.pixels();
          const scalar_t* g_c = g_b + c * g.pixels();
          for (int64_t x = x0; x < x1; ++x) {
            weight[x] += static_cast<acc_t>(g_c[here + x]) * static_cast<acc_t>(q_c[there + x]) +
                         static_cast<acc_t>(g_c[there + x]) * static_cast<acc_t>(q_c[here + x]);
          }
        }
        for (int64_t f = 0; f < g.n_features; ++f) {
          const scalar_t* f_f = f_b + f * g.pixels();
          acc_t* a = acc.data() + f * g.width;
          for (int64_t x = x0; x < x1; ++x) {
            a[x] += kernel[x] * weight[x] * (static_cast<acc_t>(f_f[there + x]) - static_cast<acc_t>(f_f[here + x]));
          }
        }
      });
      for (int64_t f = 0; f < g.n_features; ++f) {
        scalar_t* out = output + (b * g.n_features + f) * g.pixels() + y * g.width;
        for (int64_t x = 0; x < g.width; ++x) out[x] = static_cast<scalar_t>(acc[f * g.width + x]);
      }
    }
  });
}

at::Tensor gaussian_message_cpu(const at::Tensor& q, const at::Tensor& features, int64_t filter_size) {
  const Geometry g = check_inputs(q, features, filter_size);
  auto output = at::empty_like(q);
  if (q.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gaussian_message_cpu", [&] {
    forward_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), features.const_data_ptr<scalar_t>(),
                             output.mutable_data_ptr<scalar_t>(), q.size(0), g);
  });
  return output;
}

at::Tensor gaussian_message_features_backward_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                  const at::Tensor& features, int64_t filter_size) {
  const Geometry g = check_inputs(q, features, filter_size);
  check_output_grad(grad, q);
  auto output = at::empty_like(features);
  if (features.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gaussian_message_bwd_cpu", [&] {
    features_backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                       features.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                                       q.size(0), g);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(app, CPU, m) {
  m.impl("gaussian_message", &gaussian_message_cpu);
  m.impl("gaussian_message_features_backward", &gaussian_message_features_backward_cpu);
}

}  // namespace app
