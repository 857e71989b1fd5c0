// Local mean-field on the CPU: the neighbour gather (alone, or fused with the softmax of the next distribution),
// the edge-weight gradient and the O(L) products of meanfield.h, parallel over image rows (at::parallel_for,
// OpenMP), each row's pixel loop vectorised ((B, L, H, W) buffers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "meanfield.h"

namespace app {
namespace meanfield {
namespace {

// The bits of `from` read as a To (std::bit_cast is C++20; torch builds extensions as C++17 up to 2.11).
template <typename To, typename From>
inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// e^x for x <= 0, in a form GCC vectorises: x = n ln 2 + r with |r| <= ln(2) / 2, 2^n built in the exponent bits,
// e^r from its Taylor polynomial of degree 7 (relative error below 1e-7, float rounding dominates). Inputs below
// -87 give e^-87 (~1.6e-38, the smallest power kept normal), negligible beside the softmax's largest term, 1; the
// clamp compares the bits as unsigned integers (larger for more negative floats), which GCC if-converts where a
// float comparison, which may trap, would stop the vectoriser.
template <typename scalar_t>
inline scalar_t exp_nonpositive(scalar_t x) {
  return std::exp(x);
}

template <>
inline float exp_nonpositive<float>(float x) {
  constexpr uint32_t kLowest = 0xC2AE0000u;  // the bits of -87.0f
  x = bits_as<float>(std::min(bits_as<uint32_t>(x), kLowest));
  const int32_t n = static_cast<int32_t>(x * 1.44269504f - 0.5f);  // round(x / ln 2), x <= 0
  const float r = (x - static_cast<float>(n) * 0.693145752f) - static_cast<float>(n) * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_as<float>((n + 127) << 23);
}

// out[x] = sum of w[x] * neighbour row[x +- dx] over the offsets, for output row (b, plane_row + y) of a Gather.
template <typename scalar_t>
void gather_row(const Gather<scalar_t>& g, int64_t b, int64_t plane, int64_t y, scalar_t* out) {
  const int64_t H = g.height, W = g.width, K = g.n_offsets;
  std::fill(out, out + W, scalar_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const int64_t dy = kOffsets[k][0], dx = kOffsets[k][1];
    const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = W - std::max<int64_t>(0, dx);
    const scalar_t* w_plane = g.weights + (b * K + k) * H * W;
    if (g.forward != nullptr && y + dy < H) {  // neighbour (y + dy, x + dx), weight at (y, x)
      const scalar_t* w = w_plane + y * W;
      const scalar_t* src = g.forward + (plane + y + dy) * W + dx;
#pragma omp simd
      for (int64_t x = x_lo; x < x_hi; ++x) out[x] += w[x] * src[x];
    }
    if (g.backward != nullptr && y - dy >= 0) {  // neighbour (y - dy, x - dx), weight there
      const scalar_t* w = w_plane + (y - dy) * W - dx;
      const scalar_t* src = g.backward + (plane + y - dy) * W - dx;
#pragma omp simd
      for (int64_t x = W - x_hi; x < W - x_lo; ++x) out[x] += w[x] * src[x];
    }
  }
}

struct CpuKernels {
  template <typename scalar_t>
  static void gather(const Gather<scalar_t>& g) {
    const int64_t H = g.height, W = g.width, L = g.n_labels;
    // One task per output row (b, l, y): out = sign (base + the neighbour sum).
    at::parallel_for(0, g.batch * L * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t y = row % H;
        scalar_t* out = g.out + row * W;
        gather_row(g, row / (L * H), row - y, y, out);
        const scalar_t sign = g.sign;
        if (g.base != nullptr) {
          const scalar_t* base = g.base + row * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) out[x] = sign * (base[x] + out[x]);
        } else if (sign != scalar_t(1)) {
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) out[x] = sign * out[x];
        }
      }
    });
  }

  // q = softmax over the labels of -(base + the neighbour sum), fused: one task per image row (b, y) computes
  // the costs of all its label rows in q's memory, then their minimum, exponentials and normalisation.
  template <typename scalar_t>
  static void softmin(const Gather<scalar_t>& g, at::Tensor& q, at::Tensor&) {
    const int64_t H = g.height, W = g.width, L = g.n_labels, HW = H * W;
    scalar_t* q_data = q.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> low(W), total(W);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        std::fill(low.begin(), low.end(), std::numeric_limits<scalar_t>::infinity());
        std::fill(total.begin(), total.end(), scalar_t(0));
        scalar_t *lows = low.data(), *totals = total.data();
        for (int64_t l = 0; l < L; ++l) {
          const int64_t plane = (b * L + l) * H;
          scalar_t* c = q_data + (plane + y) * W;
          gather_row(g, b, plane, y, c);
          const scalar_t* base = g.base + (plane + y) * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            c[x] += base[x];
            lows[x] = c[x] < lows[x] ? c[x] : lows[x];
          }
        }
        for (int64_t l = 0; l < L; ++l) {
          scalar_t* c = q_data + b * L * HW + l * HW + y * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            c[x] = exp_nonpositive(lows[x] - c[x]);
            totals[x] += c[x];
          }
        }
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) totals[x] = scalar_t(1) / totals[x];
        for (int64_t l = 0; l < L; ++l) {
          scalar_t* c = q_data + b * L * HW + l * HW + y * W;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) c[x] *= totals[x];
        }
      }
    });
  }

  // Fused: the gradient g of q (the gather) is built in grad's rows, then <g, q> over the labels and
  // grad = -q (g - <g, q>), grad_unary += grad; one task per image row (b, y).
  template <typename scalar_t>
  static void softmin_backward(const Gather<scalar_t>& g, const at::Tensor& q, at::Tensor& grad,
                               at::Tensor& grad_unary, at::Tensor&) {
    const int64_t H = g.height, W = g.width, L = g.n_labels;
    const scalar_t* q_data = q.const_data_ptr<scalar_t>();
    scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
    scalar_t* unary_data = grad_unary.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> dot(W);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        std::fill(dot.begin(), dot.end(), scalar_t(0));
        scalar_t* dots = dot.data();
        for (int64_t l = 0; l < L; ++l) {
          const int64_t plane = (b * L + l) * H, offset = (plane + y) * W;
          scalar_t* out = grad_data + offset;
          gather_row(g, b, plane, y, out);
          const scalar_t* p = q_data + offset;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) dots[x] += out[x] * p[x];
        }
        for (int64_t l = 0; l < L; ++l) {
          const int64_t offset = ((b * L + l) * H + y) * W;
          scalar_t* out = grad_data + offset;
          scalar_t* unary = unary_data + offset;
          const scalar_t* p = q_data + offset;
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            out[x] = -p[x] * (out[x] - dots[x]);
            unary[x] += out[x];
          }
        }
      }
    });
  }

  template <typename scalar_t>
  static void weight_grad(const WeightGrad<scalar_t>& g) {
    const int64_t H = g.height, W = g.width, L = g.n_labels, K = g.n_offsets, HW = H * W;
    // One task per image row (b, y): the gradients of the edges that start on it, summed over the label planes.
    at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t i = (b * L + l) * HW + y * W;
          const scalar_t *q_i = g.q + i, *gb_i = g.gb + i;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t dy = kOffsets[k][0], dx = kOffsets[k][1];
            if (y + dy >= H) continue;
            const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = W - std::max<int64_t>(0, dx);
            const scalar_t *q_j = q_i + dy * W + dx, *ga_j = g.ga + i + dy * W + dx;
            scalar_t* grad = g.grad_weights + ((b * K + k) * H + y) * W;
#pragma omp simd
            for (int64_t x = x_lo; x < x_hi; ++x) grad[x] += q_j[x] * gb_i[x] + q_i[x] * ga_j[x];
          }
        }
      }
    });
  }

  template <typename scalar_t>
  static void distance_product(const DistanceProduct<scalar_t>& p) {
    const int64_t H = p.height, W = p.width, L = p.n_labels, HW = H * W;
    // One task per image row (b, y), vectorised along the row: prefix sums over the labels of x (sums) and, with a
    // reach, of m x(m) (moments); out(l) = slope * (distance-weighted sum over |l - m| <= reach) + cap * (the rest).
    at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sums((L + 1) * W), moments(p.reach > 0 ? (L + 1) * W : 0);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, y = row % H;
        const scalar_t* x_row = p.x + b * L * HW + y * W;
        scalar_t* out_row = p.out + b * L * HW + y * W;
        std::fill(sums.begin(), sums.begin() + W, scalar_t(0));
        for (int64_t l = 0; l < L; ++l) {  // sums[l] = sum_{m < l} x(m)
          const scalar_t *x = x_row + l * HW, *previous = sums.data() + l * W;
          scalar_t* next = sums.data() + (l + 1) * W;
#pragma omp simd
          for (int64_t c = 0; c < W; ++c) next[c] = previous[c] + x[c];
        }
        const scalar_t* total = sums.data() + L * W;
        const scalar_t slope = p.slope, cap = p.cap;
        if (p.reach == 0) {  // Potts: cap (sum x - x(l))
          for (int64_t l = 0; l < L; ++l) {
            const scalar_t* x = x_row + l * HW;
            scalar_t* out = out_row + l * HW;
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) out[c] = cap * (total[c] - x[c]);
          }
          continue;
        }
        std::fill(moments.begin(), moments.begin() + W, scalar_t(0));
        for (int64_t l = 0; l < L; ++l) {  // moments[l] = sum_{m < l} m x(m)
          const scalar_t *x = x_row + l * HW, *previous = moments.data() + l * W;
          scalar_t* next = moments.data() + (l + 1) * W;
          const scalar_t label = static_cast<scalar_t>(l);
#pragma omp simd
          for (int64_t c = 0; c < W; ++c) next[c] = previous[c] + label * x[c];
        }
        for (int64_t l = 0; l < L; ++l) {
          const int64_t lo = std::max<int64_t>(0, l - p.reach), hi = std::min<int64_t>(L, l + p.reach + 1);
          const scalar_t *s_lo = sums.data() + lo * W, *s_l = sums.data() + l * W, *s_hi = sums.data() + hi * W;
          const scalar_t *m_lo = moments.data() + lo * W, *m_l = moments.data() + l * W;
          const scalar_t* m_hi = moments.data() + hi * W;
          const scalar_t label = static_cast<scalar_t>(l);
          scalar_t* out = out_row + l * HW;
#pragma omp simd
          for (int64_t c = 0; c < W; ++c) {
            // sum over m in [lo, l) of (l - m) x(m), plus over m in [l, hi) of (m - l) x(m)
            const scalar_t below = label * (s_l[c] - s_lo[c]) - (m_l[c] - m_lo[c]);
            const scalar_t above = (m_hi[c] - m_l[c]) - label * (s_hi[c] - s_l[c]);
            out[c] = slope * (below + above) + cap * (total[c] - (s_hi[c] - s_lo[c]));
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
