// Local mean-field on a D-connected grid MRF (the MF baseline of thesis Ch. 3 tables; reference:
// app/ops/reference/message_passing.py, `_meanfield`). Host driver shared by the CPU and CUDA kernels.
//
// With q^0 = softmax(-theta) and, for t = 0 .. T-1 (T = n_iterations),
//   c^{t+1}_i = theta_i + E(q^t)_i,   q^{t+1} = softmax(-c^{t+1}),
//   E(x)_i = sum_k [ w_k(i) (V x_{i+o_k}) + w_k(i-o_k) (V^T x_{i-o_k}) ],   (V x)(l) = sum_m V(l, m) x(m),
// the op returns c^T. Neighbours outside the image contribute nothing. E is split into a per-pixel product,
// a = V x and b = V^T x (O(L^2) GEMMs for a general V, O(L) prefix sums for Potts and truncated linear), and a
// gather of the neighbours' a and b (O(D L) per pixel, the device kernels). E is self-adjoint, so the backward of a
// gradient g of c^{t+1} is the same gather of V g and V^T g; the edge-weight gradient of edge (i, j = i + o_k)
// is q_j . (V^T g_i) + q_i . (V g_j), the pairwise gradient sum_i g_i (x) F_i + B_i (x) g_i with F_i, B_i the
// weighted sums of the forward / backward neighbours' q (two GEMMs per iteration).
//
// Memory for the backward: the distributions q^0 .. q^{T-1}, T B H W L scalars of the compute dtype
// (80 MiB in float32 at 256x512, 32 labels, 5 iterations), returned by the forward. Every buffer is (B, L, H, W)
// like the op's inputs and outputs (no transposes); the device kernels vectorise / coalesce over the pixels of
// an image row, the label planes being independent in the gather.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "common.h"

namespace app {
namespace meanfield {

using message_passing::empty_buffer;
using message_passing::kGeneral;
using message_passing::kOffsets;
using message_passing::kPotts;
using message_passing::kTruncatedLinear;
using message_passing::kTruncatedQuadratic;

// The kind mean-field's kernels take for pairwise_kind: its O(L) distance products cover Potts and truncated linear.
inline int64_t supported_kind(int64_t pairwise_kind) {
  return pairwise_kind == kTruncatedQuadratic ? kGeneral : pairwise_kind;
}

// out_i = sign * (base_i + sum_k [w_k(i) forward_{i+o_k} + w_k(i-o_k) backward_{i-o_k}]), all (B, L, H, W);
// forward, backward and base may be null (that term left out). weights: (B, K, H, W). Kernels::softmin(gather, q,
// scratch) writes q = softmax over the labels of -(base + the same sum) instead (base not null; scratch: a
// (B, L, H, W) buffer it may overwrite). Kernels::softmin_backward(gather, q, grad, grad_unary, scratch) takes the
// gather (no base) as the gradient g of q = softmax(-c) and sets grad = -q (g - <g, q>), the gradient of c, and
// grad_unary += grad.
template <typename scalar_t>
struct Gather {
  int64_t batch, height, width, n_labels, n_offsets;
  const scalar_t* weights;
  const scalar_t* forward;
  const scalar_t* backward;
  const scalar_t* base;
  scalar_t sign;
  scalar_t* out;
};

// grad_weights[b, k, y, x] += q_j . gb_i + q_i . ga_j (dot products over the labels) for every edge
// (i = (y, x), j = i + o_k) in the image; q, ga (= V g), gb (= V^T g): (B, L, H, W).
template <typename scalar_t>
struct WeightGrad {
  int64_t batch, height, width, n_labels, n_offsets;
  const scalar_t* q;
  const scalar_t* ga;
  const scalar_t* gb;
  scalar_t* grad_weights;
};

// (V x)(l) = sum_m f(|l - m|) x(m) at every pixel, with f(d) = slope d for d <= reach and cap above: the product
// with a truncated-linear V = c min(|l - m|, T) (slope c, cap c T, reach floor T) or, with reach 0, a Potts
// V = cap [l != m]; O(L) per pixel from prefix sums over the labels. x, out: (B, L, H, W).
template <typename scalar_t>
struct DistanceProduct {
  int64_t batch, height, width, n_labels;
  const scalar_t* x;
  scalar_t slope, cap;
  int64_t reach;
  scalar_t* out;
};

// slope, cap and reach of an O(L) pairwise kind, read from V on the host (once per call).
template <typename scalar_t>
DistanceProduct<scalar_t> distance_product(const at::Tensor& v, int64_t kind) {
  const int64_t L = v.size(0);
  DistanceProduct<scalar_t> product{0, 0, 0, L, nullptr, scalar_t(0), scalar_t(0), 0, nullptr};
  if (kind == kGeneral) return product;
  const at::Tensor first_row = v[0].cpu();
  const scalar_t* f = first_row.const_data_ptr<scalar_t>();
  if (kind == kPotts) {
    product.cap = f[1];
    return product;
  }
  product.slope = f[1];  // c min(1, T)
  product.cap = f[L - 1];  // c min(L - 1, T)
  const double ratio = product.slope > 0 ? static_cast<double>(product.cap) / product.slope : double(L - 1);
  product.reach = static_cast<int64_t>(std::min(std::floor(ratio), double(L - 1)));
  return product;
}

// a = V x and b = V^T x at every pixel, x: (B, L, H, W). Returns b (a itself where V is symmetric).
template <typename Kernels, typename scalar_t>
at::Tensor apply_pairwise(const at::Tensor& x, const at::Tensor& v, bool symmetric, int64_t kind,
                          DistanceProduct<scalar_t> product, at::Tensor& a, at::Tensor& b) {
  const int64_t B = x.size(0), L = x.size(1);
  if (kind != kGeneral) {  // O(L)
    product.batch = B;
    product.height = x.size(2);
    product.width = x.size(3);
    product.x = x.const_data_ptr<scalar_t>();
    product.out = a.mutable_data_ptr<scalar_t>();
    Kernels::distance_product(product);
    return a;
  }
  const at::Tensor rows = x.view({B, L, -1});
  at::Tensor a_rows = a.view({B, L, -1});
  at::bmm_out(a_rows, v.unsqueeze(0).expand({B, L, L}), rows);
  if (symmetric) return a;
  at::Tensor b_rows = b.view({B, L, -1});
  at::bmm_out(b_rows, v.t().unsqueeze(0).expand({B, L, L}), rows);
  return b;
}

// A Gather over `weights` with no terms yet.
template <typename scalar_t>
Gather<scalar_t> gather_args(const at::Tensor& weights, int64_t B, int64_t H, int64_t W, int64_t L) {
  return Gather<scalar_t>{B, H, W, L, weights.size(1), weights.const_data_ptr<scalar_t>(), nullptr, nullptr,
                          nullptr, scalar_t(1), nullptr};
}

template <typename Kernels, typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_kernel(const at::Tensor& unary, const at::Tensor& pairwise,
                                                  const at::Tensor& edge_weights, int64_t n_iterations,
                                                  int64_t kind) {
  const int64_t B = unary.size(0), L = unary.size(1), H = unary.size(2), W = unary.size(3);
  const at::Tensor theta = unary.contiguous(), v = pairwise.contiguous(), weights = edge_weights.contiguous();
  const bool symmetric = kind != kGeneral || at::equal(v, v.t());
  const DistanceProduct<scalar_t> product = distance_product<scalar_t>(v, kind);
  at::Tensor q = empty_buffer({n_iterations, B, L, H, W}, theta.options());
  at::Tensor a = empty_buffer(theta.sizes(), theta.options()), b = empty_buffer(theta.sizes(), theta.options());
  at::Tensor costs = empty_buffer(theta.sizes(), theta.options());
  Gather<scalar_t> gather = gather_args<scalar_t>(weights, B, H, W, L);
  gather.base = theta.const_data_ptr<scalar_t>();
  at::Tensor q_first = q[0];
  Kernels::softmin(gather, q_first, costs);  // q^0 = softmax(-theta); costs is scratch until the last iteration
  for (int64_t t = 0; t < n_iterations; ++t) {
    const at::Tensor b_t = apply_pairwise<Kernels, scalar_t>(q[t], v, symmetric, kind, product, a, b);
    gather.forward = a.const_data_ptr<scalar_t>();
    gather.backward = b_t.const_data_ptr<scalar_t>();
    if (t + 1 == n_iterations) {
      gather.out = costs.mutable_data_ptr<scalar_t>();
      Kernels::gather(gather);
    } else {
      at::Tensor q_next = q[t + 1];
      Kernels::softmin(gather, q_next, costs);
    }
  }
  return {costs, q};
}

template <typename Kernels, typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad_costs,
                                                               const at::Tensor& pairwise,
                                                               const at::Tensor& edge_weights, const at::Tensor& q,
                                                               int64_t kind, bool pairwise_grad) {
  const int64_t B = grad_costs.size(0), L = grad_costs.size(1), H = grad_costs.size(2), W = grad_costs.size(3);
  const int64_t T = q.size(0);
  const at::Tensor v = pairwise.contiguous(), weights = edge_weights.contiguous();
  const bool symmetric = kind != kGeneral || at::equal(v, v.t());
  const DistanceProduct<scalar_t> product = distance_product<scalar_t>(v, kind);
  at::Tensor grad = message_passing::buffer_copy(grad_costs);
  at::Tensor grad_unary = message_passing::buffer_copy(grad);
  at::Tensor grad_weights = at::zeros_like(weights), grad_v = at::zeros_like(v);
  const auto options = grad.options();
  at::Tensor a = empty_buffer(grad.sizes(), options), b = empty_buffer(grad.sizes(), options);
  at::Tensor scratch = empty_buffer(grad.sizes(), options);
  at::Tensor neighbours = pairwise_grad ? empty_buffer(grad.sizes(), options) : at::Tensor();
  const Gather<scalar_t> none = gather_args<scalar_t>(weights, B, H, W, L);
  for (int64_t t = T - 1; t >= 0; --t) {
    // grad is the gradient of c^{t+1} = theta + E(q^t), already added to grad_unary.
    const at::Tensor x = q[t];
    const at::Tensor b_t = apply_pairwise<Kernels, scalar_t>(grad, v, symmetric, kind, product, a, b);
    Kernels::weight_grad(WeightGrad<scalar_t>{B, H, W, L, weights.size(1), x.const_data_ptr<scalar_t>(),
                                              a.const_data_ptr<scalar_t>(), b_t.const_data_ptr<scalar_t>(),
                                              grad_weights.mutable_data_ptr<scalar_t>()});
    if (pairwise_grad) {  // sum_i grad_i (x) F_i + B_i (x) grad_i, per image (L, HW) x (HW, L)
      for (const bool forward : {true, false}) {
        Gather<scalar_t> gather = none;
        (forward ? gather.forward : gather.backward) = x.const_data_ptr<scalar_t>();
        gather.out = neighbours.mutable_data_ptr<scalar_t>();
        Kernels::gather(gather);
        for (int64_t n = 0; n < B; ++n) {
          const at::Tensor g_rows = grad[n].view({L, -1}), n_rows = neighbours[n].view({L, -1});
          if (forward) {
            grad_v.addmm_(g_rows, n_rows.t());
          } else {
            grad_v.addmm_(n_rows, g_rows.t());
          }
        }
      }
    }
    // E is self-adjoint: the gradient of q^t is the gather of a = V grad, b = V^T grad; through
    // q^t = softmax(-c^t) it becomes the gradient of c^t (c^0 = theta, c^t = theta + E(q^{t-1})).
    Gather<scalar_t> gather = none;
    gather.forward = a.const_data_ptr<scalar_t>();
    gather.backward = b_t.const_data_ptr<scalar_t>();
    Kernels::softmin_backward(gather, x, grad, grad_unary, scratch);
  }
  return {grad_unary, grad_v, grad_weights};
}

inline void check_inputs(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& edge_weights,
                         int64_t n_directions, int64_t pairwise_kind) {
  TORCH_CHECK(unary.dim() == 4 && unary.size(1) >= 2, "meanfield: unary must be (B, L, H, W), L >= 2");
  TORCH_CHECK(pairwise.dim() == 2 && pairwise.size(0) == unary.size(1) && pairwise.size(1) == unary.size(1),
              "meanfield: pairwise must be (L, L)");
  TORCH_CHECK(n_directions == 4 || n_directions == 8 || n_directions == 16,
              "meanfield: n_directions must be 4, 8 or 16");
  TORCH_CHECK(edge_weights.dim() == 4 && edge_weights.size(0) == unary.size(0) &&
                  edge_weights.size(1) == n_directions / 2 && edge_weights.size(2) == unary.size(2) &&
                  edge_weights.size(3) == unary.size(3),
              "meanfield: edge_weights must be (B, D/2, H, W)");
  TORCH_CHECK(pairwise.scalar_type() == unary.scalar_type() && edge_weights.scalar_type() == unary.scalar_type(),
              "meanfield: unary, pairwise and edge_weights must share a dtype");
  TORCH_CHECK(pairwise.device() == unary.device() && edge_weights.device() == unary.device(),
              "meanfield: unary, pairwise and edge_weights must be on one device");
  TORCH_CHECK(pairwise_kind >= kGeneral && pairwise_kind <= kTruncatedQuadratic, "meanfield: unknown pairwise kind ",
              pairwise_kind);
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> meanfield_forward(const at::Tensor& unary, const at::Tensor& pairwise,
                                                     const at::Tensor& edge_weights, int64_t n_directions,
                                                     int64_t n_iterations, int64_t pairwise_kind) {
  check_inputs(unary, pairwise, edge_weights, n_directions, pairwise_kind);
  TORCH_CHECK(n_iterations >= 1, "meanfield: n_iterations must be >= 1");
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "meanfield", [&] {
    result = forward_kernel<Kernels, scalar_t>(unary, pairwise, edge_weights, n_iterations,
                                               supported_kind(pairwise_kind));
  });
  return result;
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> meanfield_backward(const at::Tensor& grad_costs,
                                                                  const at::Tensor& pairwise,
                                                                  const at::Tensor& edge_weights, const at::Tensor& q,
                                                                  int64_t n_directions, int64_t pairwise_kind,
                                                                  bool pairwise_grad) {
  check_inputs(grad_costs, pairwise, edge_weights, n_directions, pairwise_kind);
  TORCH_CHECK(q.dim() == 5 && q.size(0) >= 1 && q.sizes().slice(1) == grad_costs.sizes(),
              "meanfield_backward: q must be (T, B, L, H, W)");
  TORCH_CHECK(q.scalar_type() == grad_costs.scalar_type() && q.device() == grad_costs.device(),
              "meanfield_backward: q must match grad_costs in dtype and device");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(grad_costs.scalar_type(), "meanfield_backward", [&] {
    result = backward_kernel<Kernels, scalar_t>(grad_costs, pairwise, edge_weights, q.contiguous(),
                                                supported_kind(pairwise_kind), pairwise_grad);
  });
  return result;
}

}  // namespace meanfield
}  // namespace app
