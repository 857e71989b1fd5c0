// Local mean-field on the CPU: the neighbour gather and the edge-weight gradient of meanfield.h, parallel over
// image rows (at::parallel_for, OpenMP), each pixel's label loop vectorised (labels-last buffers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "meanfield.h"

namespace app {
namespace meanfield {
namespace {

struct CpuKernels {
  template <typename scalar_t>
  static void gather(const Gather<scalar_t>& g) {
    const int64_t H = g.height, W = g.width, L = g.n_labels, K = g.n_offsets;
    at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        scalar_t* out = g.out + row * W * L;
        std::fill(out, out + W * L, scalar_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t dy = kOffsets[k][0], dx = kOffsets[k][1];
          const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = W - std::max<int64_t>(0, dx);
          const scalar_t* w_plane = g.weights + (b * K + k) * H * W;
          if (g.forward != nullptr && y + dy < H) {  // neighbour (y + dy, x + dx), weight at (y, x)
            const scalar_t* w_row = w_plane + y * W;
            const scalar_t* src = g.forward + ((b * H + y + dy) * W + dx) * L;
            for (int64_t x = x_lo; x < x_hi; ++x) {
              const scalar_t w = w_row[x];
              scalar_t* o = out + x * L;
              const scalar_t* s = src + x * L;
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) o[l] += w * s[l];
            }
          }
          if (g.backward != nullptr && y - dy >= 0) {  // neighbour (y - dy, x - dx), weight there
            const scalar_t* w_row = w_plane + (y - dy) * W - dx;
            const scalar_t* src = g.backward + ((b * H + y - dy) * W - dx) * L;
            for (int64_t x = W - x_hi; x < W - x_lo; ++x) {
              const scalar_t w = w_row[x];
              scalar_t* o = out + x * L;
              const scalar_t* s = src + x * L;
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) o[l] += w * s[l];
            }
          }
        }
        const scalar_t* base = g.base == nullptr ? nullptr : g.base + row * W * L;
        const scalar_t sign = g.sign;
#pragma omp simd
        for (int64_t e = 0; e < W * L; ++e) out[e] = sign * ((base == nullptr ? scalar_t(0) : base[e]) + out[e]);
      }
    });
  }

  template <typename scalar_t>
  static void weight_grad(const WeightGrad<scalar_t>& g) {
    const int64_t H = g.height, W = g.width, L = g.n_labels, K = g.n_offsets;
    at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t dy = kOffsets[k][0], dx = kOffsets[k][1];
          if (y + dy >= H) continue;
          const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = W - std::max<int64_t>(0, dx);
          scalar_t* grad_row = g.grad_weights + ((b * K + k) * H + y) * W;
          for (int64_t x = x_lo; x < x_hi; ++x) {
            const int64_t i = (row * W + x) * L, j = ((b * H + y + dy) * W + x + dx) * L;
            scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t l = 0; l < L; ++l) sum += g.q[j + l] * g.gb[i + l] + g.q[i + l] * g.ga[j + l];
            grad_row[x] += sum;
          }
        }
      }
    });
  }
};

}  // namespace
}  // namespace meanfield

TORCH_LIBRARY_IMPL(app, CPU, m) {
  m.impl("meanfield", &meanfield::meanfield_forward<meanfield::CpuKernels>);
  m.impl("meanfield_backward", &meanfield::meanfield_backward<meanfield::CpuKernels>);
}

}  // namespace app
