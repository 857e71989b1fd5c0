// Shared definitions of the min-sum message-passing kernels (thesis Ch. 3): grid directions, methods,
// pairwise kinds, and the per-message building blocks (min-convolution Eq. 3.9/3.10 line 7-8, Eq. 3.5).
//
// Conventions (app/ops/reference/mrf.py): direction r = 2k steps by +offset_k, r = 2k + 1 by -offset_k;
// the message of direction r at pixel i comes from j = i - step_r; V_r = V for even r, V^T for odd r;
// the edge weight of (j, i) is edge_weights[k] stored at the raster-first node (j for even r, i for odd r).
#pragma once

#include <cstdint>
#include <vector>

#ifdef __CUDACC__
#define APP_HOST_DEVICE __host__ __device__
#else
#define APP_HOST_DEVICE
#endif

namespace app {
namespace message_passing {

// Methods, as passed by app/ops/message_passing.py.
enum Method : int64_t { kISGMR = 0, kTRWP = 1, kSGM = 2 };

// Pairwise structure the forward may exploit: kGeneral is O(L^2) per message; kPotts (V = c [a != b], c >= 0)
// and kTruncatedLinear (V = c min(|a - b|, T), c >= 0) are O(L). Parameters are read from the matrix.
enum PairwiseKind : int64_t { kGeneral = 0, kPotts = 1, kTruncatedLinear = 2 };

constexpr int kOffsets[8][2] = {{0, 1}, {1, 0}, {1, 1}, {1, -1}, {1, 2}, {2, 1}, {2, -1}, {1, -2}};

// Scan step (dy, dx) of direction r.
APP_HOST_DEVICE inline void direction_step(int64_t r, int64_t& dy, int64_t& dx) {
  const int sign = (r % 2 == 0) ? 1 : -1;
  dy = sign * kOffsets[r / 2][0];
  dx = sign * kOffsets[r / 2][1];
}

// First pixels (y * W + x) of the scanlines of step (dy, dx): those whose predecessor leaves the image.
inline std::vector<int64_t> chain_starts(int64_t height, int64_t width, int64_t dy, int64_t dx) {
  std::vector<int64_t> starts;
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      const int64_t py = y - dy, px = x - dx;
      if (py < 0 || py >= height || px < 0 || px >= width) starts.push_back(y * width + x);
    }
  }
  return starts;
}

// u(lambda) = min_mu h(mu) + w V_r(mu, lambda) and its first-index argmin p(lambda) (Alg. 1-2 lines 7-8).
// h, u: (L); v_r: (L, L) row-major (mu, lambda); arg: (L) scratch of int32 labels.
template <typename scalar_t>
inline void min_convolve(int64_t kind, const scalar_t* h, int64_t n_labels, scalar_t w, const scalar_t* v_r,
                         scalar_t* u, int32_t* arg) {
  if (kind == kGeneral) {
    for (int64_t l = 0; l < n_labels; ++l) {
      u[l] = h[0] + w * v_r[l];
      arg[l] = 0;
    }
    for (int64_t m = 1; m < n_labels; ++m) {
      const scalar_t hm = h[m];
      const scalar_t* row = v_r + m * n_labels;
      for (int64_t l = 0; l < n_labels; ++l) {
        const scalar_t c = hm + w * row[l];
        const bool better = c < u[l];
        u[l] = better ? c : u[l];
        arg[l] = better ? static_cast<int32_t>(m) : arg[l];
      }
    }
    return;
  }
  int32_t best = 0;
  for (int64_t m = 1; m < n_labels; ++m) best = h[m] < h[best] ? static_cast<int32_t>(m) : best;
  if (kind == kPotts) {
    // min(h(lambda), min_mu h(mu) + w c), ties to the lower label as the dense argmin does.
    const scalar_t jump = h[best] + w * v_r[1];
    for (int64_t l = 0; l < n_labels; ++l) {
      const bool stay = h[l] < jump || (h[l] == jump && l < best);
      u[l] = stay ? h[l] : jump;
      arg[l] = stay ? static_cast<int32_t>(l) : best;
    }
    return;
  }
  // Truncated linear: two-pass distance transform with slope w V(0, 1), then the cap min h + w V(0, L-1).
  const scalar_t slope = w * v_r[1];
  for (int64_t l = 0; l < n_labels; ++l) {
    u[l] = h[l];
    arg[l] = static_cast<int32_t>(l);
  }
  for (int64_t l = 1; l < n_labels; ++l) {
    const scalar_t c = u[l - 1] + slope;
    if (c < u[l]) {
      u[l] = c;
      arg[l] = arg[l - 1];
    }
  }
  for (int64_t l = n_labels - 2; l >= 0; --l) {
    const scalar_t c = u[l + 1] + slope;
    if (c < u[l]) {
      u[l] = c;
      arg[l] = arg[l + 1];
    }
  }
  const scalar_t cap = h[best] + w * v_r[n_labels - 1];
  for (int64_t l = 0; l < n_labels; ++l) {
    const bool capped = cap < u[l];
    u[l] = capped ? cap : u[l];
    arg[l] = capped ? best : arg[l];
  }
}

// Eq. 3.5: subtract the minimum (first-index argmin q, Alg. 1-2 line 10-11); returns q.
template <typename scalar_t>
inline int32_t normalise(scalar_t* u, int64_t n_labels) {
  int32_t q = 0;
  for (int64_t l = 1; l < n_labels; ++l) q = u[l] < u[q] ? static_cast<int32_t>(l) : q;
  const scalar_t low = u[q];
  for (int64_t l = 0; l < n_labels; ++l) u[l] -= low;
  return q;
}

}  // namespace message_passing
}  // namespace app
