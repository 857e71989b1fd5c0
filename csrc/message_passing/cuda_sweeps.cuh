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
#include <tuple>
#include <type_traits>

#include "common.h"

#ifndef APP_DYNAMIC_SHARED
#define APP_DYNAMIC_SHARED(name) extern __shared__ unsigned char name[]
#endif

namespace app {
namespace message_passing {

constexpr int kMaxThreads = 256;

int threads_for(int64_t n_labels) {
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
  const scalar_t rho = static_cast<scalar_t>(2.0 / static_cast<double>(grid.n_directions));
  const int64_t b = blockIdx.x / n_starts;
  const int64_t start = chain_start(blockIdx.x % n_starts, grid.height, grid.width, chain.dy, chain.dx);
  scalar_t* m_r = messages + r * N * L;
  const scalar_t* m_opp = method == kTRWP ? messages + (r ^ 1) * N * L : old_messages + (r ^ 1) * N * L;
  const scalar_t* old_r = old_messages + r * N * L;
  const scalar_t* v_r = grid.v_r(r);
  int64_t y = start / grid.width, x = start % grid.width, prev = -1;
  for (; y >= 0 && y < grid.height && x >= 0 && x < grid.width; y += chain.dy, x += chain.dx) {
    const int64_t pix = y * grid.width + x;
    const int64_t i = b * grid.pixels() + pix, off = i * L;
    if (prev < 0 && method != kSGM) {
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        m_r[off + l] = 0;
        idx.p[off + l] = 0;
      }
      if (threadIdx.x == 0) idx.q[i] = 0;
      prev = pix;
      continue;
    }
    scalar_t low = 0;  // Eq. 3.5: min and first argmin of u
    int q = 0;
    bool normalised = false;
    if (prev < 0) {
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        u[l] = unary[off + l];
        idx.p[off + l] = 0;
      }
    } else {
      const int64_t joff = (b * grid.pixels() + prev) * L;
      const scalar_t w = grid.weights[grid.weight_slot(r, b, prev, pix)];
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        if (method == kTRWP) {
          h[l] = rho * total[joff + l] - m_opp[joff + l];
        } else if (method == kISGMR) {
          h[l] = total[joff + l] - old_r[joff + l] - m_opp[joff + l] + m_r[joff + l];
        } else {
          h[l] = m_r[joff + l];
        }
      }
      __syncthreads();
      scalar_t h_min = 0;
      int best = 0;
      if (grid.kind == kPotts) array_argmin(h, L, h_min, best, red_v, red_i);
      const scalar_t jump = h_min + product(w, v_r[1]);  // Potts
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        scalar_t value;
        int arg;
        if (grid.kind == kPotts) {
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
        }
        u[l] = value + (method == kSGM ? unary[off + l] : scalar_t(0));
        idx.p[off + l] = static_cast<index_t>(arg);
      }
      if (grid.kind == kPotts && method != kSGM) {  // min u = min h, first at best unless no label stays
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
  const scalar_t rho = static_cast<scalar_t>(2.0 / static_cast<double>(grid.n_directions));
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
        const scalar_t updated = c[l] + (carry ? rho * gs[l] : scalar_t(0));  // the CPU's order of the sums
        g[l] = updated + e_r[l];
        c[l] = updated;
        e_r[l] = -updated;
        if (carry) state.extra[(r ^ 1) * N * L + off + l] -= gs[l];
      } else if (method == kISGMR) {
        const scalar_t from_sender = carry ? gs[l] : scalar_t(0);
        g[l] = state.extra[(r / 2) * N * L + off + l] + from_sender;
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
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const int64_t m = static_cast<int64_t>(p[off + l]);
      atomicAdd(gs + m, g[l]);
      weight_grad += g[l] * v_r[m * L + l];
      if (gv_r != nullptr) atomicAdd(gv_r + m * L + l, w * g[l]);
    }
    weight_grad = block_sum(weight_grad, red_v);  // also publishes gs
    if (threadIdx.x == 0 && state.grad_weights != nullptr) state.grad_weights[slot] += weight_grad;
  }
}

template <typename Launch>
struct Sweeps {
  // The scan step of direction r and its number of scanlines (one block each, per image).
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
    const int threads = threads_for(grid.n_labels), warps = threads / 32;
    const size_t shared = (2 * grid.n_labels + warps) * sizeof(scalar_t) + warps * sizeof(int);
    Launch::run(forward_sweep_kernel<scalar_t, index_t>, grid.batch * n_starts, threads, shared, grid, method, r,
                chain, n_starts, unary, total, old_messages, messages, out, idx);
  }

  template <typename scalar_t, typename index_t>
  static void backward(const Grid<scalar_t>& grid, Method method, int64_t r, BackwardState<scalar_t> state,
                       const index_t* p, const index_t* q) {
    int64_t n_starts = 0;
    const Chain chain = chain_of(grid.height, grid.width, r, n_starts);
    const int threads = threads_for(grid.n_labels);
    const size_t shared = (2 * grid.n_labels + threads / 32) * sizeof(scalar_t);
    Launch::run(backward_sweep_kernel<scalar_t, index_t>, grid.batch * n_starts, threads, shared, grid, method, r,
                chain, n_starts, state, accumulators(grid.n_labels), p, q);
  }

  // The two opposite directions of a pair, one launch each (the driver's interface, common.h).
  template <typename scalar_t, typename index_t>
  static void forward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, const scalar_t* unary,
                           scalar_t* total, const scalar_t* old_messages, scalar_t* messages, scalar_t* out,
                           SweepIndices<index_t> iteration) {
    const int64_t N = grid.batch * grid.pixels(), L = grid.n_labels;
    for (const int64_t r : {r_first, r_first ^ 1}) {
      forward(grid, method, r, unary, total, old_messages, messages, out,
              SweepIndices<index_t>{iteration.p + r * N * L, iteration.q + r * N});
    }
  }

  template <typename scalar_t, typename index_t>
  static void backward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, BackwardState<scalar_t> state,
                            SweepIndices<const index_t> iteration) {
    const int64_t N = grid.batch * grid.pixels(), L = grid.n_labels;
    for (const int64_t r : {r_first, r_first ^ 1}) {
      backward(grid, method, r, state, iteration.p + r * N * L, iteration.q + r * N);
    }
  }

  // Blocks spread their pairwise-gradient atomics over this many (2, L, L) buffers (block b uses b mod n): with
  // one buffer every block of a sweep would add into the same few entries (Potts: the diagonal) at every step.
  // At most 32 MiB of buffers in double.
  static int64_t accumulators(int64_t n_labels) {
    return std::clamp<int64_t>((int64_t{32} << 20) / (2 * n_labels * n_labels * 8), 1, 128);
  }
  template <typename scalar_t>
  static void isgmr_combine(const at::Tensor& pending, at::Tensor pair_grads, const at::Tensor& grad_unary) {
    const at::Tensor base_grad = pending.sum(0);
    grad_unary.add_(base_grad);
    at::sub_out(pair_grads, base_grad.unsqueeze(0), pending);
    pending.zero_();  // backward_pair accumulates into it
  }
};

// The ops' device implementations, shared by the GPU build and the emulation (the caller sets the device).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sweeps_forward(const at::Tensor& unary, const at::Tensor& pairwise,
                                                              const at::Tensor& edge_weights, int64_t method,
                                                              int64_t n_directions, int64_t n_iterations,
                                                              int64_t pairwise_kind) {
  // The distance transform is sequential over labels; on the GPU truncated linear takes the dense path.
  return message_passing_forward<Sweeps<Launch>>(unary, pairwise, edge_weights, method, n_directions, n_iterations,
                                                 pairwise_kind == kPotts ? kPotts : kGeneral);
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
