// ISGMR / TRWP / SGM min-sum message passing on the CPU (thesis Alg. 1-4): OpenMP (at::parallel_for) over the
// independent scanlines of a direction, label loops contiguous (messages are stored labels-last, (B, H, W, L)).
// The forward stores the argmin indices p (per message label) and q (per message) of every sweep; the backward
// replays them in reverse and needs no other forward state (Sec. 3.7.4).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace app {
namespace message_passing {
namespace {

// The grid problem shared by every sweep: sizes, edge weights (B, K, H, W), V and V^T (L, L).
template <typename scalar_t>
struct Grid {
  int64_t batch, height, width, n_labels, n_directions;
  const scalar_t* weights;
  const scalar_t* v;
  const scalar_t* v_t;
  int64_t kind;

  int64_t pixels() const { return height * width; }
  const scalar_t* v_r(int64_t r) const { return r % 2 == 0 ? v : v_t; }
  // Offset in edge_weights of the edge (j, i) of direction r, j the predecessor of i (in-image indices).
  int64_t weight_slot(int64_t r, int64_t b, int64_t j, int64_t i) const {
    return (b * (n_directions / 2) + r / 2) * pixels() + (r % 2 == 0 ? j : i);
  }
};

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

// Index storage: the argmins of one sweep, p (B, H, W, L) and q (B, H, W).
template <typename index_t>
struct SweepIndices {
  index_t* p;
  index_t* q;
};

// Forward of one message at pixel i from the sender costs h of its predecessor (Alg. 1-2 lines 7-11):
// u = min-convolution (+ receiver), normalised in place; p and q stored.
template <typename scalar_t, typename index_t>
void compute_message(const Grid<scalar_t>& grid, int64_t r, const scalar_t* h, scalar_t w, const scalar_t* receiver,
                     scalar_t* u, int32_t* arg, index_t* p, index_t* q) {
  const int64_t n_labels = grid.n_labels;
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
        for (int64_t l = 0; l < L; ++l) total[off + l] += u[l] - m_r[off + l];
      }
      if (method == kSGM) {
        for (int64_t l = 0; l < L; ++l) out[off + l] += u[l];
      }
      std::copy(u.begin(), u.end(), m_r + off);
    }
  });
}

template <typename index_t>
at::ScalarType index_dtype() {
  return c10::CppTypeToScalarType<index_t>::value;
}

template <typename scalar_t, typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_kernel(const at::Tensor& unary, const at::Tensor& pairwise,
                                                              const at::Tensor& edge_weights, Method method,
                                                              int64_t n_directions, int64_t n_iterations,
                                                              int64_t kind) {
  const int64_t B = unary.size(0), L = unary.size(1), H = unary.size(2), W = unary.size(3);
  const int64_t N = B * H * W, D = n_directions;
  const at::Tensor theta = unary.permute({0, 2, 3, 1}).contiguous();  // (B, H, W, L)
  const at::Tensor v = pairwise.contiguous(), v_t = pairwise.t().contiguous();
  const at::Tensor weights = edge_weights.contiguous();
  const Grid<scalar_t> grid{B,         H, W, L, D, weights.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                            v_t.const_data_ptr<scalar_t>(), kind};
  auto index_options = unary.options().dtype(index_dtype<index_t>());
  at::Tensor p = at::empty({n_iterations, D, B, H, W, L}, index_options);
  at::Tensor q = at::empty({n_iterations, D, B, H, W}, index_options);
  auto indices = [&](int64_t it, int64_t r) {
    return SweepIndices<index_t>{p.mutable_data_ptr<index_t>() + (it * D + r) * N * L,
                                 q.mutable_data_ptr<index_t>() + (it * D + r) * N};
  };
  at::Tensor costs;
  if (method == kSGM) {
    at::Tensor current = theta, messages = at::empty({D, N, L}, theta.options());
    for (int64_t it = 0; it < n_iterations; ++it) {
      at::Tensor next = at::zeros_like(theta);
      for (int64_t r = 0; r < D; ++r) {
        forward_sweep<scalar_t, index_t>(grid, method, r, current.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                         messages.mutable_data_ptr<scalar_t>(), next.mutable_data_ptr<scalar_t>(),
                                         indices(it, r));
      }
      current = next;  // Eq. 3.6, the unary of the next iteration
    }
    costs = current;
  } else if (method == kTRWP) {
    at::Tensor messages = at::zeros({D, N, L}, theta.options()), total = theta.clone();
    for (int64_t it = 0; it < n_iterations; ++it) {
      for (int64_t r = 0; r < D; ++r) {
        forward_sweep<scalar_t, index_t>(grid, method, r, nullptr, total.mutable_data_ptr<scalar_t>(),
                                         messages.const_data_ptr<scalar_t>(), messages.mutable_data_ptr<scalar_t>(),
                                         nullptr, indices(it, r));
      }
    }
    costs = total;  // Eq. 3.7, kept up to date by the sweeps
  } else {
    at::Tensor old_messages = at::zeros({D, N, L}, theta.options()), messages = at::empty_like(old_messages);
    for (int64_t it = 0; it < n_iterations; ++it) {
      at::Tensor total = theta + old_messages.sum(0).view_as(theta);
      for (int64_t r = 0; r < D; ++r) {
        forward_sweep<scalar_t, index_t>(grid, method, r, nullptr, total.mutable_data_ptr<scalar_t>(),
                                         old_messages.const_data_ptr<scalar_t>(),
                                         messages.mutable_data_ptr<scalar_t>(), nullptr, indices(it, r));
      }
      std::swap(old_messages, messages);  // Alg. 1 line 12
    }
    costs = theta + old_messages.sum(0).view_as(theta);  // Eq. 3.7
  }
  return {costs.view({B, H, W, L}).permute({0, 3, 1, 2}).contiguous(), p, q};
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

// Reverse-mode state of one method's backward; see backward_kernel for what each buffer holds.
template <typename scalar_t>
struct BackwardState {
  scalar_t* common;   // TRWP: C, the gradient of unary and part of every message's; SGM: gradient of the sweep output
  scalar_t* extra;    // TRWP: E (D, N, L), message gradients are C + E[d]; ISGMR: G (K, N, L); SGM: unary gradient
  scalar_t* pending;  // ISGMR: P (K, N, L), the sender-cost gradients of the pair's sweeps
  scalar_t* grad_weights;
  scalar_t* grad_v;  // (threads, 2, L, L): V and V^T accumulators
};

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

template <typename scalar_t, typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad_costs,
                                                               const at::Tensor& pairwise,
                                                               const at::Tensor& edge_weights, const at::Tensor& p,
                                                               const at::Tensor& q, Method method,
                                                               int64_t n_directions, int64_t n_iterations) {
  const int64_t B = grad_costs.size(0), L = grad_costs.size(1), H = grad_costs.size(2), W = grad_costs.size(3);
  const int64_t N = B * H * W, D = n_directions, K = D / 2;
  const at::Tensor g = grad_costs.permute({0, 2, 3, 1}).contiguous();  // (B, H, W, L)
  const at::Tensor v = pairwise.contiguous(), v_t = pairwise.t().contiguous();
  const at::Tensor weights = edge_weights.contiguous();
  const Grid<scalar_t> grid{B, H, W, L, D, weights.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                            v_t.const_data_ptr<scalar_t>(), kGeneral};
  at::Tensor grad_weights = at::zeros_like(weights);
  at::Tensor grad_v = at::zeros({at::get_num_threads(), 2, L, L}, g.options());
  const index_t* p_data = p.const_data_ptr<index_t>();
  const index_t* q_data = q.const_data_ptr<index_t>();
  auto run = [&](int64_t it, int64_t r, BackwardState<scalar_t> state) {
    backward_sweep<scalar_t, index_t>(grid, method, r, state, p_data + (it * D + r) * N * L,
                                      q_data + (it * D + r) * N);
  };
  BackwardState<scalar_t> state{nullptr, nullptr, nullptr, grad_weights.mutable_data_ptr<scalar_t>(),
                                grad_v.mutable_data_ptr<scalar_t>()};
  at::Tensor grad_unary;
  if (method == kTRWP) {
    // Message m^d has gradient C + E[d]; C is also theta's. Sweeps run in reverse order (Alg. 4).
    at::Tensor common = g.clone(), extra = at::zeros({D, N, L}, g.options());
    state.common = common.mutable_data_ptr<scalar_t>();
    state.extra = extra.mutable_data_ptr<scalar_t>();
    for (int64_t it = n_iterations - 1; it >= 0; --it) {
      for (int64_t r = D - 1; r >= 0; --r) run(it, r, state);
    }
    grad_unary = common;
  } else if (method == kISGMR) {
    // After each iteration's replay, m^{2k} and m^{2k+1} share one gradient G[k] (Alg. 3).
    at::Tensor pair_grads = g.unsqueeze(0).expand({K, B, H, W, L}).contiguous().view({K, N, L});
    at::Tensor pending = at::empty_like(pair_grads);
    grad_unary = g.clone();
    state.extra = pair_grads.mutable_data_ptr<scalar_t>();
    state.pending = pending.mutable_data_ptr<scalar_t>();
    for (int64_t it = n_iterations - 1; it >= 0; --it) {
      pending.zero_();
      for (int64_t r = 0; r < D; ++r) run(it, r, state);
      const at::Tensor base_grad = pending.sum(0);  // gradient of theta + sum of all previous messages
      grad_unary.view({N, L}).add_(base_grad);
      pair_grads.copy_(base_grad.unsqueeze(0) - pending);
    }
  } else {
    at::Tensor current = g.clone();
    for (int64_t it = n_iterations - 1; it >= 0; --it) {
      at::Tensor previous = at::zeros_like(current);
      state.common = current.mutable_data_ptr<scalar_t>();
      state.extra = previous.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < D; ++r) run(it, r, state);
      current = previous;
    }
    grad_unary = current;
  }
  const at::Tensor v_sums = grad_v.sum(0);
  at::Tensor grad_pairwise = v_sums[0] + v_sums[1].t();
  return {grad_unary.view({B, H, W, L}).permute({0, 3, 1, 2}).contiguous(), grad_pairwise, grad_weights};
}

template <typename F>
void dispatch_index(const at::ScalarType index_type, const F& fn) {
  switch (index_type) {
    case at::kByte:
      fn(uint8_t{});
      break;
    case at::kShort:
      fn(int16_t{});
      break;
    case at::kInt:
      fn(int32_t{});
      break;
    default:
      TORCH_CHECK(false, "message_passing: unsupported index dtype ", index_type);
  }
}

at::ScalarType index_type_for(int64_t n_labels) {
  if (n_labels <= 256) return at::kByte;
  return n_labels <= 32768 ? at::kShort : at::kInt;
}

void check_inputs(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& edge_weights,
                  int64_t method, int64_t n_directions, int64_t n_iterations) {
  TORCH_CHECK(unary.dim() == 4 && unary.size(1) >= 2, "message_passing: unary must be (B, L, H, W), L >= 2");
  TORCH_CHECK(pairwise.dim() == 2 && pairwise.size(0) == unary.size(1) && pairwise.size(1) == unary.size(1),
              "message_passing: pairwise must be (L, L)");
  TORCH_CHECK(n_directions == 4 || n_directions == 8 || n_directions == 16,
              "message_passing: n_directions must be 4, 8 or 16");
  TORCH_CHECK(edge_weights.dim() == 4 && edge_weights.size(0) == unary.size(0) &&
                  edge_weights.size(1) == n_directions / 2 && edge_weights.size(2) == unary.size(2) &&
                  edge_weights.size(3) == unary.size(3),
              "message_passing: edge_weights must be (B, D/2, H, W)");
  TORCH_CHECK(pairwise.scalar_type() == unary.scalar_type() && edge_weights.scalar_type() == unary.scalar_type(),
              "message_passing: unary, pairwise and edge_weights must share a dtype");
  TORCH_CHECK(method >= kISGMR && method <= kSGM, "message_passing: unknown method ", method);
  TORCH_CHECK(n_iterations >= 1, "message_passing: n_iterations must be >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> message_passing_cpu(const at::Tensor& unary,
                                                                   const at::Tensor& pairwise,
                                                                   const at::Tensor& edge_weights, int64_t method,
                                                                   int64_t n_directions, int64_t n_iterations,
                                                                   int64_t pairwise_kind) {
  check_inputs(unary, pairwise, edge_weights, method, n_directions, n_iterations);
  TORCH_CHECK(pairwise_kind >= kGeneral && pairwise_kind <= kTruncatedLinear, "message_passing: unknown kind");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "message_passing_cpu", [&] {
    dispatch_index(index_type_for(unary.size(1)), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      result = forward_kernel<scalar_t, index_t>(unary, pairwise, edge_weights, static_cast<Method>(method),
                                                 n_directions, n_iterations, pairwise_kind);
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> message_passing_backward_cpu(
    const at::Tensor& grad_costs, const at::Tensor& pairwise, const at::Tensor& edge_weights, const at::Tensor& p,
    const at::Tensor& q, int64_t method, int64_t n_directions, int64_t n_iterations) {
  check_inputs(grad_costs, pairwise, edge_weights, method, n_directions, n_iterations);
  TORCH_CHECK(p.scalar_type() == index_type_for(grad_costs.size(1)) && p.scalar_type() == q.scalar_type(),
              "message_passing_backward: index dtype does not match the label count");
  TORCH_CHECK(p.is_contiguous() && q.is_contiguous(), "message_passing_backward: indices must be contiguous");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(grad_costs.scalar_type(), "message_passing_backward_cpu", [&] {
    dispatch_index(p.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      result = backward_kernel<scalar_t, index_t>(grad_costs, pairwise, edge_weights, p, q,
                                                  static_cast<Method>(method), n_directions, n_iterations);
    });
  });
  return result;
}

}  // namespace
}  // namespace message_passing

TORCH_LIBRARY_IMPL(app, CPU, m) {
  m.impl("message_passing", &message_passing::message_passing_cpu);
  m.impl("message_passing_backward", &message_passing::message_passing_backward_cpu);
}

}  // namespace app
