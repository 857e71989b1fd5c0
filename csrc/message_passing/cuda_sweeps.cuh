// The CUDA sweeps of ISGMR / TRWP / SGM (thesis Alg. 1-4) as device code plus their host launcher `Sweeps<Launch>`,
// which calls Launch::run(kernel, blocks, threads, shared_bytes, args...) for every kernel: cuda.cu instantiates it
// with CudaLaunch (csrc/cuda_launch.h); tests/emulation runs the same kernels on the CPU with an emulated launch.
// Device code uses only dynamic shared memory, through APP_DYNAMIC_SHARED(name).
//
// One thread block per scanline, the block's threads over labels. A block walks its scanline pixel by pixel (the
// recursion of Eq. 3.9/3.10); every message is a parallel min-convolution (O(L) per label, O(1) per label for
// Potts) plus block argmin (Eq. 3.5), reduced by warp shuffles (Potts needs one argmin per message: the normalised
// message's minimum is the sender costs'). A block finds its scanline's first pixel from its index (chain_start,
// common.h): nothing is copied from the host per launch. The host driver (iterations, buffers, index storage) is
// shared with the CPU in common.h.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common.h"

#ifndef APP_DYNAMIC_SHARED
#define APP_DYNAMIC_SHARED(name) extern __shared__ unsigned char name[]
#endif

namespace app {
namespace message_passing {

constexpr int kMaxThreads = 256;

inline int threads_for(int64_t n_labels) {
  int threads = 32;
  while (threads < n_labels && threads < kMaxThreads) threads *= 2;
  return threads;
}

// (min, first argmin) of (value, index) pairs over the lanes of a warp, by butterfly shuffles: every lane gets the
// result (the pair order is total, so all lanes agree).
template <typename scalar_t>
__device__ void warp_argmin(scalar_t& value, int& index) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const scalar_t other_value = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other_value < value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// a * b rounded on its own, as the CPU kernels (built without FMA contraction) round it: nvcc would otherwise fuse
// the product into the addition that follows, and a near-tie of the min-convolution could pick another label.
template <typename scalar_t>
__device__ __forceinline__ scalar_t product(scalar_t a, scalar_t b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
}

template <typename scalar_t>
__device__ scalar_t warp_sum(scalar_t value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Block-wide (min, first argmin) of (value, index) pairs held one per thread (blockDim.x a multiple of 32, at
// most 32 warps); every thread gets the result. Also a block barrier: shared-memory writes before the call are
// visible after it, and reads before it are complete. red_v, red_i: one slot per warp.
template <typename scalar_t>
__device__ void block_argmin(scalar_t& value, int& index, scalar_t* red_v, int* red_i) {
  warp_argmin(value, index);
  const int n_warps = blockDim.x / 32, lane = threadIdx.x % 32;
  if (n_warps > 1) {
    __syncthreads();  // the previous call's readers of red_v / red_i are done
    if (lane == 0) {
      red_v[threadIdx.x / 32] = value;
      red_i[threadIdx.x / 32] = index;
    }
    __syncthreads();
    value = red_v[lane < n_warps ? lane : 0];
    index = red_i[lane < n_warps ? lane : 0];
    warp_argmin(value, index);
  }
  __syncthreads();
}

// Block-wide sum, every thread gets it; the same barrier as block_argmin.
template <typename scalar_t>
__device__ scalar_t block_sum(scalar_t value, scalar_t* red_v) {
  value = warp_sum(value);
  const int n_warps = blockDim.x / 32, lane = threadIdx.x % 32;
  if (n_warps > 1) {
    __syncthreads();
    if (lane == 0) red_v[threadIdx.x / 32] = value;
    __syncthreads();
    value = warp_sum(lane < n_warps ? red_v[lane] : scalar_t(0));
  }
  __syncthreads();
  return value;
}

// (min, first argmin) over the labels of an (L) shared array.
template <typename scalar_t>
__device__ void array_argmin(const scalar_t* a, int64_t n_labels, scalar_t& value, int& index, scalar_t* red_v,
                             int* red_i) {
  value = a[0];
  index = 0;
  for (int64_t l = threadIdx.x; l < n_labels; l += blockDim.x) {
    if (a[l] < value || (a[l] == value && l < index)) {
      value = a[l];
      index = static_cast<int>(l);
    }
  }
  block_argmin(value, index, red_v, red_i);
}

// Bits [first_label, first_label + 32) of a Potts index row (index_row in common.h), bit j of `ballot` for label
// first_label + j (first_label a multiple of 32): lanes 0-3 of the warp each store one byte, within the row's bits.
template <typename index_t>
__device__ __forceinline__ void store_stay_bits(index_t* row, int64_t n_labels, int64_t first_label,
                                                unsigned int ballot) {
  const int lane = threadIdx.x % 32;
  const int64_t byte = first_label / 8 + lane;
  if (lane < 4 && byte < potts_index_words<index_t>(n_labels) * static_cast<int64_t>(sizeof(index_t))) {
    reinterpret_cast<uint8_t*>(row)[byte] = static_cast<uint8_t>(ballot >> (8 * lane));
  }
}

struct Chain {
  int64_t dy, dx;  // the scan step
};

template <typename scalar_t, typename index_t>
__global__ void forward_sweep_kernel(Grid<scalar_t> grid, Method method, int64_t r, Chain chain, int64_t n_starts,
                                     const scalar_t* unary, scalar_t* total,
                                     const scalar_t* old_messages, scalar_t* messages, scalar_t* out,
                                     SweepIndices<index_t> idx) {
  APP_DYNAMIC_SHARED(shared);
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels();
  scalar_t* h = reinterpret_cast<scalar_t*>(shared);
  scalar_t* u = h + L;
  scalar_t* red_v = u + L;
  int* red_i = reinterpret_cast<int*>(red_v + blockDim.x / 32);
  const scalar_t rho = grid.rho();
  const int64_t b = blockIdx.x / n_starts;
  const int64_t start = chain_start(blockIdx.x % n_starts, grid.height, grid.width, chain.dy, chain.dx);
  scalar_t* m_r = messages + r * N * L;
  const scalar_t* m_opp = method == kTRWP ? messages + (r ^ 1) * N * L : old_messages + (r ^ 1) * N * L;
  const scalar_t* old_r = old_messages + r * N * L;
  const scalar_t* v_r = grid.v_r(r);
  int64_t y = start / grid.width, x = start % grid.width, prev = -1;
  const bool potts = grid.kind == kPotts;
  for (; y >= 0 && y < grid.height && x >= 0 && x < grid.width; y += chain.dy, x += chain.dx) {
    const int64_t pix = y * grid.width + x;
    const int64_t i = b * grid.pixels() + pix, off = i * L;
    index_t* p_i = idx.p + i * grid.index_row;
    if (prev < 0) {  // no sender: p = 0
      for (int64_t e = threadIdx.x; e < grid.index_row; e += blockDim.x) p_i[e] = 0;
    }
    if (prev < 0 && method != kSGM) {
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) m_r[off + l] = 0;
      if (threadIdx.x == 0) idx.q[i] = 0;
      prev = pix;
      continue;
    }
    scalar_t low = 0;  // Eq. 3.5: min and first argmin of u
    int q = 0;
    bool normalised = false;
    if (prev < 0) {
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) u[l] = unary[off + l];
    } else {
      const int64_t joff = (b * grid.pixels() + prev) * L;
      const scalar_t w = grid.weights[grid.weight_slot(r, b, prev, pix)];
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        if (method == kTRWP) {
          h[l] = product(rho, total[joff + l]) - m_opp[joff + l];
        } else if (method == kISGMR) {
          h[l] = total[joff + l] - old_r[joff + l] - m_opp[joff + l] + m_r[joff + l];
        } else {
          h[l] = m_r[joff + l];
        }
      }
      __syncthreads();
      scalar_t h_min = 0;
      int best = 0;
      if (potts) array_argmin(h, L, h_min, best, red_v, red_i);
      const scalar_t jump = h_min + product(w, v_r[1]);  // Potts
      for (int64_t first = 0; first < L; first += blockDim.x) {  // every thread the same trips: the ballot below
        const int64_t l = first + threadIdx.x;
        int arg = -1;
        if (l < L) {
          scalar_t value;
          if (potts) {
            const bool stay = h[l] < jump || (h[l] == jump && l < best);
            value = stay ? h[l] : jump;
            arg = stay ? static_cast<int>(l) : best;
          } else {  // dense min-convolution (truncated linear included: O(L) per thread)
            value = h[0] + product(w, v_r[l]);
            arg = 0;
            for (int64_t m = 1; m < L; ++m) {
              const scalar_t c = h[m] + product(w, v_r[m * L + l]);
              if (c < value) {
                value = c;
                arg = static_cast<int>(m);
              }
            }
            p_i[l] = static_cast<index_t>(arg);
          }
          u[l] = value + (method == kSGM ? unary[off + l] : scalar_t(0));
        }
        if (potts) store_stay_bits(p_i, L, l - threadIdx.x % 32, __ballot_sync(0xffffffffu, arg == l));
      }
      if (potts && threadIdx.x == 0) p_i[potts_index_words<index_t>(L)] = static_cast<index_t>(best);
      if (potts && method != kSGM) {  // min u = min h, first at best unless no label stays
        low = h_min;
        q = jump == h_min ? 0 : best;
        normalised = true;
      }
    }
    if (!normalised) {
      __syncthreads();
      array_argmin(u, L, low, q, red_v, red_i);
    }
    if (threadIdx.x == 0) idx.q[i] = static_cast<index_t>(q);
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const scalar_t value = u[l] - low;
      if (method == kTRWP) total[off + l] += value - m_r[off + l];
      if (method == kSGM) out[off + l] += value;
      m_r[off + l] = value;
    }
    __syncthreads();
    prev = pix;
  }
}

template <typename scalar_t, typename index_t>
__global__ void backward_sweep_kernel(Grid<scalar_t> grid, Method method, int64_t r, Chain chain, int64_t n_starts,
                                      BackwardState<scalar_t> state, int64_t n_accumulators,
                                      const index_t* p, const index_t* q) {
  APP_DYNAMIC_SHARED(shared);
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels();
  scalar_t* g = reinterpret_cast<scalar_t*>(shared);
  scalar_t* gs = g + L;
  scalar_t* red_v = gs + L;
  const scalar_t rho = grid.rho();
  const int64_t b = blockIdx.x / n_starts;
  const int64_t start = chain_start(blockIdx.x % n_starts, grid.height, grid.width, chain.dy, chain.dx);
  const scalar_t* v_r = grid.v_r(r);
  scalar_t* gv_r =
      state.grad_v == nullptr ? nullptr : state.grad_v + ((blockIdx.x % n_accumulators) * 2 + r % 2) * L * L;
  int64_t length = 0;
  const int64_t y0 = start / grid.width, x0 = start % grid.width;
  while (true) {
    const int64_t y = y0 + length * chain.dy, x = x0 + length * chain.dx;
    if (y < 0 || y >= grid.height || x < 0 || x >= grid.width) break;
    ++length;
  }
  bool carry = false;
  for (int64_t t = length - 1; t >= 0; --t) {
    const int64_t pix = (y0 + t * chain.dy) * grid.width + x0 + t * chain.dx;
    const int64_t i = b * grid.pixels() + pix, off = i * L;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      if (method == kTRWP) {
        scalar_t* c = state.common + off;
        scalar_t* e_r = state.extra + r * N * L + off;
        const scalar_t updated = c[l] + (carry ? product(rho, gs[l]) : scalar_t(0));  // the CPU's order of the sums
        g[l] = updated + e_r[l];
        c[l] = updated;
        e_r[l] = -updated;
        if (carry) state.extra[(r ^ 1) * N * L + off + l] -= gs[l];
      } else if (method == kISGMR) {
        const scalar_t from_sender = carry ? gs[l] : scalar_t(0);
        g[l] = state.pair_grad[r / 2][off + l] + from_sender;
        state.pending[(r / 2) * N * L + off + l] += from_sender;
      } else {
        g[l] = state.common[off + l] + (carry ? gs[l] : scalar_t(0));
      }
    }
    if (t == 0 && method != kSGM) break;
    scalar_t partial = 0;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) partial += g[l];
    const scalar_t sum = block_sum(partial, red_v);  // syncs: g complete, gs no longer read
    const int64_t q_i = static_cast<int64_t>(q[i]);
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      if (l == q_i) g[l] -= sum;
      gs[l] = 0;
      if (method == kSGM) state.extra[off + l] += g[l];
    }
    __syncthreads();
    carry = t > 0;
    if (!carry) continue;
    const int64_t prev = (y0 + (t - 1) * chain.dy) * grid.width + x0 + (t - 1) * chain.dx;
    const int64_t slot = grid.weight_slot(r, b, prev, pix);
    const scalar_t w = grid.weights[slot];
    scalar_t weight_grad = 0;
    const index_t* p_i = p + i * grid.index_row;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const int64_t m = grid.kind == kPotts ? potts_argmin(p_i, L, l) : static_cast<int64_t>(p_i[l]);
      atomicAdd(gs + m, g[l]);
      weight_grad += product(g[l], v_r[m * L + l]);
      if (gv_r != nullptr) atomicAdd(gv_r + m * L + l, w * g[l]);
    }
    weight_grad = block_sum(weight_grad, red_v);  // also publishes gs
    if (threadIdx.x == 0 && state.grad_weights != nullptr) state.grad_weights[slot] += weight_grad;
  }
}

// ---- Warp sweeps, up to kWarpMaxLabels labels (uint8 indices): one warp per scanline, lane j holding the labels
// j + 32 k, k < K, in registers; kWarpsPerBlock scanlines per block, no block barrier. The recursion's only
// dependency is the previous pixel's message, which stays in registers, so every other input of a pixel (totals,
// messages, edge weight; in the backward the gradient buffers and stored indices) is loaded kRing pixels ahead into
// a register ring and is there when the step needs it. Argmins: a lane's first best label, then the warp's (float
// by two warp minima (redux.sync) of an order-preserving key, double by shuffles); ties go to the lowest label, as
// on the CPU. Dense and banded min-convolutions read the sender costs from a per-warp shared row.

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kWarpMaxLabels = 256;

// Labels per lane for n_labels <= kWarpMaxLabels: the kernels are instantiated for K in {1, 2, 3, 4, 6, 8}.
inline int labels_per_lane(int64_t n_labels) {
  const int k = static_cast<int>((n_labels + 31) / 32);
  return k <= 4 ? k : (k <= 6 ? 6 : 8);
}

// Pixels whose inputs are in flight: deeper for few registers per pixel (at 32 float labels, 8 steps of ~0.1 us
// cover a load from memory).
template <typename scalar_t, int K>
constexpr int ring_depth() {
  return K * sizeof(scalar_t) <= 4 ? 8 : K * sizeof(scalar_t) <= 16 ? 4 : 2;
}

// The scanline that warp `index` of a sweep walks: its image b, first pixel (y0, x0) and length.
struct Scanline {
  int64_t b, y0, x0, length;
  Chain chain;
  int64_t width, pixels;

  template <typename scalar_t>
  __device__ Scanline(const Grid<scalar_t>& grid, Chain chain, int64_t n_starts, int64_t index)
      : b(index / n_starts), chain(chain), width(grid.width), pixels(grid.pixels()) {
    const int64_t start = chain_start(index % n_starts, grid.height, grid.width, chain.dy, chain.dx);
    y0 = start / grid.width;
    x0 = start % grid.width;
    const int64_t unbounded = grid.height + grid.width;  // along an axis the step does not move on
    const int64_t rows = chain.dy > 0   ? (grid.height - 1 - y0) / chain.dy + 1
                         : chain.dy < 0 ? y0 / -chain.dy + 1
                                        : unbounded;
    const int64_t cols = chain.dx > 0   ? (grid.width - 1 - x0) / chain.dx + 1
                         : chain.dx < 0 ? x0 / -chain.dx + 1
                                        : unbounded;
    length = rows < cols ? rows : cols;
  }
  // In-image index y W + x of pixel t.
  __device__ int64_t pixel(int64_t t) const { return (y0 + t * chain.dy) * width + x0 + t * chain.dx; }
  // Row of pixel t in a labels-last (B, H, W, L) buffer.
  __device__ int64_t row(int64_t t) const { return b * pixels + pixel(t); }
};

// Warp-wide min / max of 32-bit integers: one redux.sync from sm_80 on, butterfly shuffles before.
__device__ __forceinline__ unsigned int warp_min(unsigned int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  for (int offset = 16; offset > 0; offset /= 2) {
    const unsigned int other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other < value ? other : value;
  }
  return value;
#else
  return __reduce_min_sync(0xffffffffu, value);
#endif
}

__device__ __forceinline__ int warp_max(int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  for (int offset = 16; offset > 0; offset /= 2) {
    const int other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
#else
  return __reduce_max_sync(0xffffffffu, value);
#endif
}

// Order-preserving key of a float (x < y iff key(x) < key(y)); -0 and +0 share one key.
__device__ __forceinline__ unsigned int order_key(float value) {
  const unsigned int bits = __float_as_uint(value == 0.0f ? 0.0f : value);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

// The float of an order key (a zero comes back as +0).
__device__ __forceinline__ float from_order_key(unsigned int key) {
  return __uint_as_float((key & 0x80000000u) != 0 ? key & 0x7fffffffu : ~key);
}

// (min, first argmin) over the warp's labels of a row held K per lane (label lane + 32 k); every lane gets it.
template <typename scalar_t, int K>
__device__ __forceinline__ void row_argmin(const scalar_t (&row)[K], int lane, scalar_t& low, int& label) {
  low = row[0];  // the lane's own first
  label = lane;
#pragma unroll
  for (int k = 1; k < K; ++k) {
    if (row[k] < low) {
      low = row[k];
      label = lane + 32 * k;
    }
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    const unsigned int key = order_key(low), low_key = warp_min(key);
    low = from_order_key(low_key);  // now, not by a shuffle after the label's reduction: it is on the critical path
    label = static_cast<int>(warp_min(key == low_key ? static_cast<unsigned int>(label) : ~0u));
  } else {
    warp_argmin(low, label);
  }
}

// a, b <- their sums over the warp, by one interleaved butterfly (every lane gets both).
template <typename scalar_t>
__device__ __forceinline__ void warp_sum_pair(scalar_t& a, scalar_t& b) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const scalar_t other_a = __shfl_xor_sync(0xffffffffu, a, offset);
    const scalar_t other_b = __shfl_xor_sync(0xffffffffu, b, offset);
    a += other_a;
    b += other_b;
  }
}

template <typename scalar_t, int K>
__device__ __forceinline__ void load_row(const scalar_t* source, int lane, int64_t n_labels, scalar_t (&row)[K],
                                         scalar_t fill) {
#pragma unroll
  for (int k = 0; k < K; ++k) row[k] = lane + 32 * k < n_labels ? source[lane + 32 * k] : fill;
}

template <typename scalar_t, typename value_t, int K>
__device__ __forceinline__ void store_row(scalar_t* target, int lane, int64_t n_labels, const value_t (&row)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (lane + 32 * k < n_labels) target[lane + 32 * k] = static_cast<scalar_t>(row[k]);
  }
}

// The inputs of one forward step at pixel t, loaded ahead: a = TRWP / ISGMR total, SGM unary; o = TRWP's latest
// and ISGMR's old opposite message, SGM's output so far; m = the message of direction r there before this sweep;
// w = the edge weight from the predecessor.
template <typename scalar_t, int K>
struct ForwardInputs {
  scalar_t a[K], o[K], m[K];
  scalar_t w;
};

// u(lambda) = min_mu h(mu) + w V_r(mu, lambda) and its first argmin for the warp's labels, h in the warp's shared
// row: dense (reach < 0) or, for V_r(mu, lambda) = V(0, |mu - lambda|) capped at V(0, L-1) beyond `reach`, the band
// |mu - lambda| <= reach plus the warp's (min, first argmin) of the capped costs h(mu) + w V(0, L-1), compared
// lexicographically: the capped costs are at least the band's inside it, so values and argmins are the dense ones.
// far_label: that first argmin of the capped costs (0 when dense), for Potts the sender costs' m0.
template <typename scalar_t, int K>
__device__ __forceinline__ void warp_min_convolve(const scalar_t* h_row, const scalar_t (&h)[K], int lane,
                                                  int64_t n_labels, scalar_t w, const scalar_t* v_r, int64_t reach,
                                                  scalar_t (&u)[K], int (&arg)[K], int& far_label) {
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  if (reach < 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t l = lane + 32 * k;
      u[k] = inf;
      arg[k] = 0;
      if (l >= n_labels) continue;
      u[k] = h_row[0] + product(w, v_r[l]);
      for (int64_t m = 1; m < n_labels; ++m) {
        const scalar_t c = h_row[m] + product(w, v_r[m * n_labels + l]);
        if (c < u[k]) {
          u[k] = c;
          arg[k] = static_cast<int>(m);
        }
      }
    }
    return;
  }
  scalar_t far_low = inf;
  far_label = 0;
  if (reach < n_labels - 1) {
    const scalar_t far_cost = product(w, v_r[n_labels - 1]);
    scalar_t capped[K];
#pragma unroll
    for (int k = 0; k < K; ++k) capped[k] = lane + 32 * k < n_labels ? h[k] + far_cost : inf;
    row_argmin(capped, lane, far_low, far_label);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t l = lane + 32 * k;
    u[k] = inf;
    arg[k] = 0;
    if (l >= n_labels) continue;
    const int64_t first = l - reach > 0 ? l - reach : 0, last = l + reach < n_labels - 1 ? l + reach : n_labels - 1;
    for (int64_t m = first; m <= last; ++m) {
      const scalar_t c = h_row[m] + product(w, v_r[m > l ? m - l : l - m]);
      if (c < u[k]) {
        u[k] = c;
        arg[k] = static_cast<int>(m);
      }
    }
    if (far_low < u[k] || (far_low == u[k] && far_label < arg[k])) {
      u[k] = far_low;
      arg[k] = far_label;
    }
  }
}

// Forward sweep of direction r over its scanlines, one warp each (Alg. 1-2 lines 3-11; SGM Eq. 3.3); the same
// arithmetic as forward_sweep_kernel and the CPU.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    warp_forward_kernel(Grid<scalar_t> grid, Method method, int64_t r, Chain chain, int64_t n_starts,
                        const scalar_t* unary, scalar_t* total, const scalar_t* old_messages, scalar_t* messages,
                        scalar_t* out, SweepIndices<uint8_t> idx) {
  APP_DYNAMIC_SHARED(shared);
  constexpr int kRing = ring_depth<scalar_t, K>();
  const int lane = threadIdx.x % 32;
  const int64_t scanline = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (scanline >= grid.batch * n_starts) return;
  const Scanline line(grid, chain, n_starts, scanline);
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels(), length = line.length;
  const scalar_t rho = grid.rho();
  scalar_t* shared_row = reinterpret_cast<scalar_t*>(shared) + threadIdx.x / 32 * L;
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  scalar_t* m_r = messages + r * N * L;
  const scalar_t* m_opp = method == kTRWP ? messages + (r ^ 1) * N * L : old_messages + (r ^ 1) * N * L;
  const scalar_t* v_r = grid.v_r(r);
  const scalar_t jump_cost = v_r[1];  // Potts: V(0, 1), read once (the stores below may alias it for the compiler)
  // The band of the capped kinds: the last d with V(0, d) below V(0, L-1) (-1: dense).
  int64_t reach = -1;
  if (grid.kind != kGeneral) {
    int last = 0;
    for (int64_t d = lane; d < L; d += 32) last = v_r[d] != v_r[L - 1] ? static_cast<int>(d) : last;
    reach = warp_max(last);
  }
  const scalar_t* m_before = method == kTRWP ? m_r : old_messages + r * N * L;  // direction r before this sweep
  auto load = [&](int64_t t, ForwardInputs<scalar_t, K>& in) {
    if (t >= length) return;
    const int64_t off = line.row(t) * L;
    if (method == kSGM) {
      load_row(unary + off, lane, L, in.a, inf);
      load_row(out + off, lane, L, in.o, scalar_t(0));
    } else {
      load_row(total + off, lane, L, in.a, inf);
      load_row(m_opp + off, lane, L, in.o, scalar_t(0));
      load_row(m_before + off, lane, L, in.m, scalar_t(0));
    }
    if (t > 0) in.w = grid.weights[grid.weight_slot(r, line.b, line.pixel(t - 1), line.pixel(t))];
  };
  // the predecessor's state: TRWP its updated total, ISGMR its total and old messages, every method its new message
  scalar_t prev_total[K] = {}, prev_opp[K] = {}, prev_old[K] = {}, prev_new[K] = {};
  ForwardInputs<scalar_t, K> ring[kRing];
#pragma unroll
  for (int s = 0; s < kRing; ++s) load(s, ring[s]);
  for (int64_t t0 = 0; t0 < length; t0 += kRing) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) {
      const int64_t t = t0 + s;
      if (t >= length) break;
      ForwardInputs<scalar_t, K>& in = ring[s];
      const int64_t i = line.row(t), off = i * L;
      scalar_t u[K];
      int arg[K];
      int q = 0, best = 0;  // best: Potts' m0, the sender costs' first argmin
      if (t == 0 && method != kSGM) {  // first node: message 0
#pragma unroll
        for (int k = 0; k < K; ++k) {
          u[k] = 0;
          arg[k] = 0;
        }
      } else {
        scalar_t low;
        if (t == 0) {  // SGM path start: the normalised unary
#pragma unroll
          for (int k = 0; k < K; ++k) {
            u[k] = in.a[k];
            arg[k] = 0;
          }
          row_argmin(u, lane, low, q);
        } else {
          scalar_t h[K];
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const bool label = lane + 32 * k < L;
            if (method == kTRWP) {
              h[k] = label ? product(rho, prev_total[k]) - prev_opp[k] : inf;
            } else if (method == kISGMR) {
              h[k] = label ? prev_total[k] - prev_old[k] - prev_opp[k] + prev_new[k] : inf;
            } else {
              h[k] = label ? prev_new[k] : inf;
            }
          }
          if (grid.kind == kPotts && method != kSGM) {  // one argmin: min u = min h
            row_argmin(h, lane, low, best);
            const scalar_t jump = low + product(in.w, jump_cost);
#pragma unroll
            for (int k = 0; k < K; ++k) {
              const int l = lane + 32 * k;
              const bool stay = h[k] < jump || (h[k] == jump && l < best);
              u[k] = h[k] < jump ? h[k] : jump;  // = stay ? h : jump, without waiting for best (the next step does not)
              arg[k] = stay ? l : best;
            }
            q = jump == low ? 0 : best;
          } else {
            __syncwarp();  // the previous step's readers of shared_row are done
            store_row(shared_row, lane, L, h);
            __syncwarp();
            warp_min_convolve(shared_row, h, lane, L, in.w, v_r, reach, u, arg, best);
            if (method == kSGM) {
#pragma unroll
              for (int k = 0; k < K; ++k) u[k] += in.a[k];
            }
            row_argmin(u, lane, low, q);
          }
        }
#pragma unroll
        for (int k = 0; k < K; ++k) u[k] -= low;  // Eq. 3.5
      }
      store_row(m_r + off, lane, L, u);
      if (grid.kind == kPotts) {  // a first node (no sender) stores zeros, as on the CPU
        uint8_t* p_i = idx.p + i * grid.index_row;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          store_stay_bits(p_i, L, 32 * k, __ballot_sync(0xffffffffu, t > 0 && arg[k] == lane + 32 * k));
        }
        if (lane == 0) p_i[potts_index_words<uint8_t>(L)] = static_cast<uint8_t>(best);
      } else {
        store_row(idx.p + off, lane, L, arg);
      }
      if (lane == 0) idx.q[i] = static_cast<uint8_t>(q);
      if (method == kTRWP) {
#pragma unroll
        for (int k = 0; k < K; ++k) prev_total[k] = t == 0 ? in.a[k] : in.a[k] + (u[k] - in.m[k]);
        if (t > 0) store_row(total + off, lane, L, prev_total);
      } else if (method == kISGMR) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          prev_total[k] = in.a[k];
          prev_old[k] = in.m[k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) in.o[k] += u[k];
        store_row(out + off, lane, L, in.o);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        prev_opp[k] = in.o[k];
        prev_new[k] = u[k];
      }
      load(t + kRing, in);
    }
  }
}

// The inputs of one backward step at pixel t, loaded ahead: TRWP C, E[r], E[r-]; ISGMR G[r/2], P[r/2]; SGM the
// sweep output's gradient and the unary's; the stored argmins; the edge weight from the predecessor and its slot.
template <typename scalar_t, int K>
struct BackwardInputs {
  scalar_t a[K], e[K], o[K];
  uint8_t p[K];
  int q;
  scalar_t w;
  int64_t slot;
};

// Backward sweep of direction r in reverse scan order (Alg. 3-4), one warp per scanline: the same sums as
// backward_sweep_kernel; scatter through p in registers for Potts (every jump goes to one label), through the
// warp's shared row otherwise.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    warp_backward_kernel(Grid<scalar_t> grid, Method method, int64_t r, Chain chain, int64_t n_starts,
                         BackwardState<scalar_t> state, int64_t n_accumulators, const uint8_t* p, const uint8_t* q) {
  APP_DYNAMIC_SHARED(shared);
  constexpr int kRing = ring_depth<scalar_t, K>();
  const int lane = threadIdx.x % 32;
  const int64_t scanline = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (scanline >= grid.batch * n_starts) return;
  const Scanline line(grid, chain, n_starts, scanline);
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels(), length = line.length;
  const scalar_t rho = grid.rho();
  scalar_t* shared_row = reinterpret_cast<scalar_t*>(shared) + threadIdx.x / 32 * L;
  const scalar_t* v_r = grid.v_r(r);
  scalar_t* gv_r =
      state.grad_v == nullptr ? nullptr : state.grad_v + ((scanline % n_accumulators) * 2 + r % 2) * L * L;
  const bool potts = grid.kind == kPotts;
  const scalar_t jump_cost = v_r[1];  // Potts: V(0, 1)
  const scalar_t* a_base = method == kISGMR ? state.pair_grad[r / 2] : state.common;
  scalar_t* e_base = method == kTRWP ? state.extra + r * N * L : method == kISGMR ? state.pending + (r / 2) * N * L
                                                                                  : state.extra;
  scalar_t* o_base = state.extra + (r ^ 1) * N * L;  // TRWP only
  auto load = [&](int64_t t, BackwardInputs<scalar_t, K>& in) {
    if (t < 0) return;
    const int64_t off = line.row(t) * L;
    load_row(a_base + off, lane, L, in.a, scalar_t(0));
    load_row(e_base + off, lane, L, in.e, scalar_t(0));
    if (method == kTRWP) load_row(o_base + off, lane, L, in.o, scalar_t(0));
    if (potts) {
      const uint8_t* p_t = p + line.row(t) * grid.index_row;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int l = lane + 32 * k;
        in.p[k] = l < L ? static_cast<uint8_t>(potts_argmin(p_t, L, l)) : 0;
      }
    } else {
      load_row(p + off, lane, L, in.p, uint8_t(0));
    }
    in.q = q[line.row(t)];
    if (t > 0) {
      in.slot = grid.weight_slot(r, line.b, line.pixel(t - 1), line.pixel(t));
      in.w = grid.weights[in.slot];
    }
  };
  scalar_t carry[K];  // the gradient of the sender costs h_t, left by step t + 1
#pragma unroll
  for (int k = 0; k < K; ++k) carry[k] = 0;
  BackwardInputs<scalar_t, K> ring[kRing];
#pragma unroll
  for (int s = 0; s < kRing; ++s) load(length - 1 - s, ring[s]);
  for (int64_t t0 = length - 1; t0 >= 0; t0 -= kRing) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) {
      const int64_t t = t0 - s;
      if (t < 0) break;
      BackwardInputs<scalar_t, K>& in = ring[s];
      const int64_t off = line.row(t) * L;
      scalar_t g[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (method == kTRWP) {  // the CPU's order of the sums
          const scalar_t c = in.a[k] + product(rho, carry[k]);
          g[k] = c + in.e[k];
          in.a[k] = c;
          in.e[k] = -c;
          in.o[k] = in.o[k] - carry[k];
        } else if (method == kISGMR) {
          g[k] = in.a[k] + carry[k];
          in.e[k] += carry[k];
        } else {
          g[k] = in.a[k] + carry[k];
        }
      }
      if (method == kTRWP) {
        store_row(state.common + off, lane, L, in.a);
        store_row(e_base + off, lane, L, in.e);
        store_row(o_base + off, lane, L, in.o);
      } else if (method == kISGMR) {
        store_row(e_base + off, lane, L, in.e);
      }
      if (t == 0 && method != kSGM) break;  // constant first message
      // sum of g, and for Potts the sum of g over the labels that jump and their label (every jump goes to one):
      // two independent reductions, interleaved, so that the carry waits for one reduction's latency, not two
      scalar_t g_sum = 0, jumped = 0;
      int target = -1;
      bool q_jumps = false;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int l = lane + 32 * k;
        if (l >= L) continue;
        g_sum += g[k];
        if (potts && in.p[k] != l) {
          jumped += g[k];
          target = in.p[k];
          q_jumps = q_jumps || l == in.q;
        }
      }
      if (potts) {
        warp_sum_pair(g_sum, jumped);
        target = warp_max(target);
        q_jumps = __any_sync(0xffffffffu, q_jumps);
      } else {
        g_sum = warp_sum(g_sum);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) g[k] -= lane + 32 * k == in.q ? g_sum : scalar_t(0);  // Eq. 3.5 through q
      if (method == kSGM) {
#pragma unroll
        for (int k = 0; k < K; ++k) in.e[k] += g[k];
        store_row(e_base + off, lane, L, in.e);
      }
      if (t == 0) continue;  // SGM's path start: no sender
      scalar_t weight_grad = 0;
      if (potts) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int l = lane + 32 * k;
          const bool label = l < L, stays = in.p[k] == l;
          carry[k] = label && stays ? g[k] : scalar_t(0);
          if (label && gv_r != nullptr) atomicAdd(gv_r + in.p[k] * L + l, product(in.w, g[k]));
        }
        if (target >= 0) {
          const scalar_t to_target = jumped - (q_jumps ? g_sum : scalar_t(0));  // with Eq. 3.5's share if q jumps
#pragma unroll
          for (int k = 0; k < K; ++k) carry[k] += lane + 32 * k == target ? to_target : scalar_t(0);
          weight_grad = product(to_target, jump_cost);
        }
      } else {
        __syncwarp();  // the previous step's readers of shared_row are done
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (lane + 32 * k < L) shared_row[lane + 32 * k] = 0;
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t l = lane + 32 * k;
          if (l >= L) continue;
          const int64_t m = in.p[k];
          atomicAdd(shared_row + m, g[k]);
          weight_grad += product(g[k], v_r[m * L + l]);
          if (gv_r != nullptr) atomicAdd(gv_r + m * L + l, product(in.w, g[k]));
        }
        __syncwarp();
        load_row(shared_row, lane, L, carry, scalar_t(0));
        weight_grad = warp_sum(weight_grad);
      }
      if (lane == 0 && state.grad_weights != nullptr) state.grad_weights[in.slot] += weight_grad;
      load(t - kRing, in);
    }
  }
}

template <typename Launch>
struct Sweeps {
  // Warp sweeps up to kWarpMaxLabels labels, block sweeps above; APP_CUDA_BLOCK_SWEEPS=1 takes the block sweeps at
  // every label count (to compare the two).
  static bool use_warp_sweeps(int64_t n_labels) {
    const char* block = std::getenv("APP_CUDA_BLOCK_SWEEPS");
    return n_labels <= kWarpMaxLabels && (block == nullptr || block[0] == '\0' || std::strcmp(block, "0") == 0);
  }
  static int64_t warp_blocks(int64_t n_scanlines) { return (n_scanlines + kWarpsPerBlock - 1) / kWarpsPerBlock; }
  // body(std::integral_constant<int, K>{}) with K = labels_per_lane(n_labels)
  template <typename Body>
  static void with_labels_per_lane(int64_t n_labels, const Body& body) {
    switch (labels_per_lane(n_labels)) {
      case 1:
        return body(std::integral_constant<int, 1>{});
      case 2:
        return body(std::integral_constant<int, 2>{});
      case 3:
        return body(std::integral_constant<int, 3>{});
      case 4:
        return body(std::integral_constant<int, 4>{});
      case 6:
        return body(std::integral_constant<int, 6>{});
      default:
        return body(std::integral_constant<int, 8>{});
    }
  }

  // The block sweeps keep two rows of labels in shared memory: more labels than fit in what the device gives a block
  // are refused with a ValueError (the CPU op has no label limit) instead of a failed launch.
  template <typename scalar_t>
  static size_t checked_shared_bytes(int64_t n_labels, size_t bytes) {
    const size_t limit = Launch::max_shared_bytes();
    TORCH_CHECK_VALUE(bytes <= limit, "message_passing on CUDA: ", n_labels, " labels (computed in ",
                      c10::CppTypeToScalarType<scalar_t>::value, ") need ", bytes,
                      " bytes of shared memory per thread block, more than this GPU's ", limit,
                      " (about ", limit / (2 * sizeof(scalar_t)),
                      " labels); run it on the CPU, which has no label limit");
    return bytes;
  }

  // The scan step of direction r and its number of scanlines (one block or warp each, per image).
  static Chain chain_of(int64_t height, int64_t width, int64_t r, int64_t& n_starts) {
    Chain chain{0, 0};
    direction_step(r, chain.dy, chain.dx);
    n_starts = n_chain_starts(height, width, chain.dy, chain.dx);
    return chain;
  }

  template <typename scalar_t, typename index_t>
  static void forward(const Grid<scalar_t>& grid, Method method, int64_t r, const scalar_t* unary, scalar_t* total,
                      const scalar_t* old_messages, scalar_t* messages, scalar_t* out, SweepIndices<index_t> idx) {
    int64_t n_starts = 0;
    const Chain chain = chain_of(grid.height, grid.width, r, n_starts);
    if constexpr (std::is_same_v<index_t, uint8_t>) {
      if (use_warp_sweeps(grid.n_labels)) {
        with_labels_per_lane(grid.n_labels, [&](auto per_lane) {
          Launch::run(warp_forward_kernel<scalar_t, decltype(per_lane)::value>, warp_blocks(grid.batch * n_starts),
                      kWarpsPerBlock * 32, kWarpsPerBlock * grid.n_labels * sizeof(scalar_t), grid, method, r, chain,
                      n_starts, unary, total, old_messages, messages, out, idx);
        });
        return;
      }
    }
    const int threads = threads_for(grid.n_labels), warps = threads / 32;
    const size_t shared = checked_shared_bytes<scalar_t>(
        grid.n_labels, (2 * grid.n_labels + warps) * sizeof(scalar_t) + warps * sizeof(int));
    Launch::run(forward_sweep_kernel<scalar_t, index_t>, grid.batch * n_starts, threads, shared, grid, method, r,
                chain, n_starts, unary, total, old_messages, messages, out, idx);
  }

  template <typename scalar_t, typename index_t>
  static void backward(const Grid<scalar_t>& grid, Method method, int64_t r, BackwardState<scalar_t> state,
                       const index_t* p, const index_t* q) {
    int64_t n_starts = 0;
    const Chain chain = chain_of(grid.height, grid.width, r, n_starts);
    if constexpr (std::is_same_v<index_t, uint8_t>) {
      if (use_warp_sweeps(grid.n_labels)) {
        with_labels_per_lane(grid.n_labels, [&](auto per_lane) {
          Launch::run(warp_backward_kernel<scalar_t, decltype(per_lane)::value>, warp_blocks(grid.batch * n_starts),
                      kWarpsPerBlock * 32, kWarpsPerBlock * grid.n_labels * sizeof(scalar_t), grid, method, r, chain,
                      n_starts, state, accumulators(grid.n_labels), p, q);
        });
        return;
      }
    }
    const int threads = threads_for(grid.n_labels);
    const size_t shared =
        checked_shared_bytes<scalar_t>(grid.n_labels, (2 * grid.n_labels + threads / 32) * sizeof(scalar_t));
    Launch::run(backward_sweep_kernel<scalar_t, index_t>, grid.batch * n_starts, threads, shared, grid, method, r,
                chain, n_starts, state, accumulators(grid.n_labels), p, q);
  }

  // The two opposite directions of a pair, one launch each (the driver's interface, common.h).
  template <typename scalar_t, typename index_t>
  static void forward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, const scalar_t* unary,
                           scalar_t* total, const scalar_t* old_messages, scalar_t* messages, scalar_t* out,
                           SweepIndices<index_t> iteration, bool /*first_iteration*/) {
    const int64_t N = grid.batch * grid.pixels();
    for (const int64_t r : {r_first, r_first ^ 1}) {
      forward(grid, method, r, unary, total, old_messages, messages, out,
              SweepIndices<index_t>{iteration.p + r * N * grid.index_row, iteration.q + r * N});
    }
  }

  template <typename scalar_t, typename index_t>
  static void backward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, BackwardState<scalar_t> state,
                            SweepIndices<const index_t> iteration) {
    const int64_t N = grid.batch * grid.pixels();
    for (const int64_t r : {r_first, r_first ^ 1}) {
      backward(grid, method, r, state, iteration.p + r * N * grid.index_row, iteration.q + r * N);
    }
  }

  // Blocks spread their pairwise-gradient atomics over this many (2, L, L) buffers (block b uses b mod n): with
  // one buffer every block of a sweep would add into the same few entries (Potts: the diagonal) at every step.
  // At most 32 MiB of buffers in double.
  static int64_t accumulators(int64_t n_labels) {
    return std::clamp<int64_t>((int64_t{32} << 20) / (2 * n_labels * n_labels * 8), 1, 128);
  }
  static constexpr bool kAccumulatesPending = true;  // both sweeps of a pair add to P
  template <typename scalar_t>
  static int64_t label_stride(int64_t n_labels, int64_t) {  // no padding: a warp's lanes take the labels
    return n_labels;
  }
  // total = sum_d messages[d] + theta (Eq. 3.7; messages (D, N, L), theta and total (N, L))
  template <typename scalar_t>
  static void add_messages(const at::Tensor& messages, const at::Tensor& theta, const at::Tensor& total) {
    at::Tensor rows = total.view({theta.numel() / theta.size(-1), theta.size(-1)});
    at::sum_out(rows, messages, at::IntArrayRef{0}).add_(theta.view_as(rows));
  }
  static constexpr bool kReadsUnwritten = true;  // messages and E start zeroed (first_iteration is not read)
  template <typename scalar_t>
  static void isgmr_combine(const at::Tensor& pending, at::Tensor pair_grads, const at::Tensor& grad_unary) {
    const at::Tensor base_grad = pending.sum(0);
    grad_unary.add_(base_grad);
    if (pair_grads.defined()) at::sub_out(pair_grads, base_grad.unsqueeze(0), pending);
  }
};

// The ops' device implementations, shared by the GPU build and the emulation (the caller sets the device).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sweeps_forward(const at::Tensor& unary, const at::Tensor& pairwise,
                                                              const at::Tensor& edge_weights, int64_t method,
                                                              int64_t n_directions, int64_t n_iterations,
                                                              int64_t pairwise_kind) {
  return message_passing_forward<Sweeps<Launch>>(unary, pairwise, edge_weights, method, n_directions, n_iterations,
                                                 pairwise_kind);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sweeps_backward(const at::Tensor& grad_costs,
                                                               const at::Tensor& pairwise,
                                                               const at::Tensor& edge_weights, const at::Tensor& p,
                                                               const at::Tensor& q, int64_t method,
                                                               int64_t n_directions, int64_t n_iterations,
                                                               int64_t pairwise_kind, bool pairwise_grad,
                                                               bool weights_grad) {
  return message_passing_backward<Sweeps<Launch>>(grad_costs, pairwise, edge_weights, p, q, method, n_directions,
                                                  n_iterations, pairwise_kind, pairwise_grad, weights_grad);
}

}  // namespace message_passing
}  // namespace app
