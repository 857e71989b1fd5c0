// ISGMR / TRWP / SGM min-sum message passing on the CPU (thesis Alg. 1-4): OpenMP (at::parallel_for) over the
// independent scanlines of a direction, label loops contiguous (messages are stored labels-last, (B, H, W, L)).
// The forward stores the argmin indices p (per message label) and q (per message) of every sweep; the backward
// replays them in reverse and needs no other forward state (Sec. 3.7.4).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace app {
namespace message_passing {
namespace {

// Runs fn(b, chain) for every scanline of direction r in parallel; chain lists in-image pixel indices in scan
// order. Scanlines of one direction share no pixel, so fn may write per-pixel state of its chain freely.
template <typename scalar_t, typename F>
void for_each_chain(const Grid<scalar_t>& grid, int64_t r, const F& fn) {
  int64_t dy, dx;
  direction_step(r, dy, dx);
  const std::vector<int64_t> starts = chain_starts(grid.height, grid.width, dy, dx);
  const int64_t n_starts = static_cast<int64_t>(starts.size());
  at::parallel_for(0, grid.batch * n_starts, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> chain;
    for (int64_t task = begin; task < end; ++task) {
      chain.clear();
      int64_t y = starts[task % n_starts] / grid.width, x = starts[task % n_starts] % grid.width;
      for (; y >= 0 && y < grid.height && x >= 0 && x < grid.width; y += dy, x += dx) {
        chain.push_back(y * grid.width + x);
      }
      fn(task / n_starts, chain);
    }
  });
}

constexpr size_t kPrefetch = 3;  // pixels ahead along a scanline

template <typename scalar_t>
void prefetch_labels(const scalar_t* data, int64_t n_labels) {
  for (int64_t l = 0; l < n_labels; l += 64 / sizeof(scalar_t)) __builtin_prefetch(data + l);
}

// Forward of one message at pixel i from the sender costs h of its predecessor (Alg. 1-2 lines 7-11):
// u = min-convolution (+ receiver), normalised in place; p and q stored.
template <typename scalar_t, typename index_t>
void compute_message(const Grid<scalar_t>& grid, int64_t r, const scalar_t* h, scalar_t w, const scalar_t* receiver,
                     scalar_t* u, int32_t* arg, index_t* p, index_t* q) {
  const int64_t n_labels = grid.n_labels;
  if (grid.kind == kPotts && receiver == nullptr) {
    *q = static_cast<index_t>(potts_message(h, n_labels, w * grid.v_r(r)[1], u, p));
    return;
  }
  min_convolve(grid.kind, h, n_labels, w, grid.v_r(r), u, arg);
  if (receiver != nullptr) {
    for (int64_t l = 0; l < n_labels; ++l) u[l] += receiver[l];
  }
  *q = static_cast<index_t>(normalise(u, n_labels));
  for (int64_t l = 0; l < n_labels; ++l) p[l] = static_cast<index_t>(arg[l]);
}

template <typename scalar_t, typename index_t>
void forward_sweep(const Grid<scalar_t>& grid, Method method, int64_t r, const scalar_t* unary, scalar_t* total,
                   const scalar_t* old_messages, scalar_t* messages, scalar_t* out, SweepIndices<index_t> idx) {
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels();
  const scalar_t rho = static_cast<scalar_t>(2.0 / static_cast<double>(grid.n_directions));
  scalar_t* m_r = messages + r * N * L;
  const scalar_t* m_opp = method == kTRWP    ? messages + (r ^ 1) * N * L
                           : method == kISGMR ? old_messages + (r ^ 1) * N * L
                                              : nullptr;
  const scalar_t* old_r = method == kISGMR ? old_messages + r * N * L : nullptr;
  for_each_chain(grid, r, [&](int64_t b, const std::vector<int64_t>& chain) {
    std::vector<scalar_t> h(L), u(L);
    std::vector<int32_t> arg(L);
    for (size_t t = 0; t < chain.size(); ++t) {
      const int64_t i = b * grid.pixels() + chain[t];
      const int64_t off = i * L;
      if (t + kPrefetch < chain.size()) {  // strided scanlines defeat the hardware prefetcher
        const int64_t ahead = (b * grid.pixels() + chain[t + kPrefetch]) * L;
        prefetch_labels(m_r + ahead, L);
        if (total != nullptr) prefetch_labels(total + ahead, L);
        if (m_opp != nullptr) prefetch_labels(m_opp + ahead, L);
        if (old_r != nullptr) prefetch_labels(old_r + ahead, L);
      }
      if (t == 0 && method != kSGM) {  // first node: no predecessor, message 0
        std::fill(m_r + off, m_r + off + L, scalar_t(0));
        std::fill(idx.p + off, idx.p + off + L, index_t(0));
        idx.q[i] = 0;
        continue;
      }
      if (t == 0) {  // SGM path start: the normalised unary (Hirschmuller's L_r = C)
        std::copy(unary + off, unary + off + L, u.data());
        std::fill(idx.p + off, idx.p + off + L, index_t(0));
        idx.q[i] = static_cast<index_t>(normalise(u.data(), L));
      } else {
        const int64_t j = b * grid.pixels() + chain[t - 1];
        const int64_t joff = j * L;
        const scalar_t w = grid.weights[grid.weight_slot(r, b, chain[t - 1], chain[t])];
        if (method == kTRWP) {  // Eq. 3.10: rho (theta_j + sum_d m^d_j) - m^{r-}_j, latest messages
          for (int64_t l = 0; l < L; ++l) h[l] = rho * total[joff + l] - m_opp[joff + l];
        } else if (method == kISGMR) {  // Eq. 3.9: theta_j + m^{r,k+1}_j + sum_{d != r, r-} m^{d,k}_j
          for (int64_t l = 0; l < L; ++l) h[l] = total[joff + l] - old_r[joff + l] - m_opp[joff + l] + m_r[joff + l];
        } else {  // Eq. 3.3: the predecessor's SGM message
          std::copy(m_r + joff, m_r + joff + L, h.data());
        }
        compute_message(grid, r, h.data(), w, method == kSGM ? unary + off : nullptr, u.data(), arg.data(),
                        idx.p + off, idx.q + i);
      }
      if (method == kTRWP) {
        for (int64_t l = 0; l < L; ++l) {
          total[off + l] += u[l] - m_r[off + l];
          m_r[off + l] = u[l];
        }
      } else {
        if (method == kSGM) {
          for (int64_t l = 0; l < L; ++l) out[off + l] += u[l];
        }
        std::copy(u.begin(), u.end(), m_r + off);
      }
    }
  });
}

// Backward of one message (Alg. 3-4): gm (gradient of the normalised message) -> gu (Eq. 3.5 through q), then
// scattered through p to the sender costs gs (Eq. 3.30), the edge weight (Eq. 3.33) and V_r (Eq. 3.36).
template <typename scalar_t, typename index_t>
void message_backward(int64_t n_labels, scalar_t* g, index_t q, const index_t* p, const scalar_t* v_r, scalar_t w,
                      scalar_t* gs, scalar_t* gw, scalar_t* gv_r, bool scatter) {
  scalar_t sum = 0;
  for (int64_t l = 0; l < n_labels; ++l) sum += g[l];
  g[q] -= sum;
  if (!scatter) return;
  std::fill(gs, gs + n_labels, scalar_t(0));
  scalar_t weight_grad = 0;
  for (int64_t l = 0; l < n_labels; ++l) {
    const int64_t m = static_cast<int64_t>(p[l]);
    gs[m] += g[l];
    weight_grad += g[l] * v_r[m * n_labels + l];
    gv_r[m * n_labels + l] += w * g[l];
  }
  *gw += weight_grad;
}

template <typename scalar_t, typename index_t>
void backward_sweep(const Grid<scalar_t>& grid, Method method, int64_t r, BackwardState<scalar_t> state,
                    const index_t* p, const index_t* q) {
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels();
  const scalar_t rho = static_cast<scalar_t>(2.0 / static_cast<double>(grid.n_directions));
  const scalar_t* v_r = grid.v_r(r);
  for_each_chain(grid, r, [&](int64_t b, const std::vector<int64_t>& chain) {
    std::vector<scalar_t> g(L), gs(L, scalar_t(0));
    scalar_t* gv_r = state.grad_v + (at::get_thread_num() * 2 + r % 2) * L * L;
    bool carry = false;  // gs holds the gradient of the successor's sender costs h_i
    for (int64_t t = static_cast<int64_t>(chain.size()) - 1; t >= 0; --t) {
      const int64_t i = b * grid.pixels() + chain[t];
      const int64_t off = i * L;
      if (t >= static_cast<int64_t>(kPrefetch)) {
        const int64_t ahead = (b * grid.pixels() + chain[t - kPrefetch]) * L;
        prefetch_labels(p + ahead, L);
        if (method == kTRWP) {
          prefetch_labels(state.common + ahead, L);
          prefetch_labels(state.extra + r * N * L + ahead, L);
          prefetch_labels(state.extra + (r ^ 1) * N * L + ahead, L);
        } else {
          prefetch_labels((method == kISGMR ? state.extra + (r / 2) * N * L : state.common) + ahead, L);
        }
      }
      if (method == kTRWP) {  // h_i = rho (theta_i + sum_d m^d_i) - m^{r-}_i; m^r_i is overwritten here
        scalar_t* c = state.common + off;
        scalar_t* e_r = state.extra + r * N * L + off;
        scalar_t* e_opp = state.extra + (r ^ 1) * N * L + off;
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t from_sender = carry ? rho * gs[l] : scalar_t(0);
          g[l] = c[l] + e_r[l] + from_sender;
          c[l] += from_sender;
          e_r[l] = -c[l];
          e_opp[l] -= carry ? gs[l] : scalar_t(0);
        }
      } else if (method == kISGMR) {  // h_i = base_i + m^r_i, base_i = theta_i + sum_{d != r, r-} m^{d,k}_i
        const scalar_t* g_pair = state.extra + (r / 2) * N * L + off;
        scalar_t* pending = state.pending + (r / 2) * N * L + off;
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t from_sender = carry ? gs[l] : scalar_t(0);
          g[l] = g_pair[l] + from_sender;
          pending[l] += from_sender;
        }
      } else {  // SGM: h_i = m^r_i
        for (int64_t l = 0; l < L; ++l) g[l] = state.common[off + l] + (carry ? gs[l] : scalar_t(0));
      }
      if (t == 0 && method != kSGM) break;  // constant first message
      const bool scatter = t > 0;
      scalar_t w = 0;
      scalar_t* gw = nullptr;
      if (scatter) {
        const int64_t slot = grid.weight_slot(r, b, chain[t - 1], chain[t]);
        w = grid.weights[slot];
        gw = state.grad_weights + slot;
      }
      message_backward(L, g.data(), q[i], p + off, v_r, w, gs.data(), gw, gv_r, scatter);
      if (method == kSGM) {  // the receiver's unary (or the path start's) enters u directly
        for (int64_t l = 0; l < L; ++l) state.extra[off + l] += g[l];
      }
      carry = scatter;
    }
  });
}

struct CpuSweeps {
  template <typename scalar_t, typename index_t>
  static void forward(const Grid<scalar_t>& grid, Method method, int64_t r, const scalar_t* unary, scalar_t* total,
                      const scalar_t* old_messages, scalar_t* messages, scalar_t* out, SweepIndices<index_t> idx) {
    forward_sweep(grid, method, r, unary, total, old_messages, messages, out, idx);
  }
  template <typename scalar_t, typename index_t>
  static void backward(const Grid<scalar_t>& grid, Method method, int64_t r, BackwardState<scalar_t> state,
                       const index_t* p, const index_t* q) {
    backward_sweep(grid, method, r, state, p, q);
  }
  static int64_t accumulators() { return at::get_num_threads(); }
};

}  // namespace
}  // namespace message_passing

TORCH_LIBRARY_IMPL(app, CPU, m) {
  m.impl("message_passing", &message_passing::message_passing_forward<message_passing::CpuSweeps>);
  m.impl("message_passing_backward", &message_passing::message_passing_backward<message_passing::CpuSweeps>);
}

}  // namespace app
