// Local mean-field on the GPU, device code and the kernels policy `DeviceKernels<Launch>` of the host driver
// (meanfield.h), launched through a policy as the message-passing sweeps are (csrc/cuda_launch.h on the GPU,
// tests/emulation on the CPU): the neighbour gather (a thread per label and pixel, coalesced along image rows), the
// edge-weight gradient (a thread per edge) and the Potts product (a thread per pixel). The other products with V
// (truncated linear included), the softmax and the pairwise gradient are cuBLAS / ATen calls of the host driver.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "meanfield.h"

namespace app {
namespace meanfield {

constexpr int kThreads = 256;

// kOffsets[k] of common.h, which device code cannot read.
__device__ inline void edge_offset(int64_t k, int64_t& dy, int64_t& dx) {
  const int offsets[8][2] = {{0, 1}, {1, 0}, {1, 1}, {1, -1}, {1, 2}, {2, 1}, {2, -1}, {1, -2}};
  dy = offsets[k][0];
  dx = offsets[k][1];
}

// Blocks for n threads, at most 65535 (the kernels' grid-stride loops cover the rest).
inline int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

template <typename scalar_t>
__global__ void gather_kernel(Gather<scalar_t> g) {
  const int64_t L = g.n_labels, H = g.height, W = g.width, K = g.n_offsets;
  const int64_t total = g.batch * L * H * W;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = e % W, y = (e / W) % H, b = e / (W * H * L);
    const int64_t plane = e - y * W - x;  // element (b, l, 0, 0)
    scalar_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t dy, dx;
      edge_offset(k, dy, dx);
      const scalar_t* w_plane = g.weights + (b * K + k) * H * W;
      const int64_t fy = y + dy, fx = x + dx;
      if (g.forward != nullptr && fy < H && fx >= 0 && fx < W) {
        sum += w_plane[y * W + x] * g.forward[plane + fy * W + fx];
      }
      const int64_t by = y - dy, bx = x - dx;
      if (g.backward != nullptr && by >= 0 && bx >= 0 && bx < W) {
        sum += w_plane[by * W + bx] * g.backward[plane + by * W + bx];
      }
    }
    g.out[e] = g.sign * ((g.base == nullptr ? scalar_t(0) : g.base[e]) + sum);
  }
}

template <typename scalar_t>
__global__ void weight_grad_kernel(WeightGrad<scalar_t> g) {
  const int64_t L = g.n_labels, H = g.height, W = g.width, K = g.n_offsets, HW = H * W;
  const int64_t total = g.batch * K * HW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = e % W, y = (e / W) % H, k = (e / HW) % K, b = e / (HW * K);
    int64_t dy, dx;
    edge_offset(k, dy, dx);
    const int64_t ny = y + dy, nx = x + dx;
    if (ny >= H || nx < 0 || nx >= W) continue;
    const int64_t i = b * L * HW + y * W + x, j = b * L * HW + ny * W + nx;
    scalar_t sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += g.q[j + l * HW] * g.gb[i + l * HW] + g.q[i + l * HW] * g.ga[j + l * HW];
    g.grad_weights[e] += sum;
  }
}

// Potts only (reach 0): meanfield_with below sends truncated linear to the GEMM path.
template <typename scalar_t>
__global__ void potts_kernel(DistanceProduct<scalar_t> p) {
  const int64_t L = p.n_labels, HW = p.height * p.width, total = p.batch * HW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = (e / HW) * L * HW + e % HW;  // (b, 0, y, x)
    scalar_t sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += p.x[first + l * HW];
    for (int64_t l = 0; l < L; ++l) p.out[first + l * HW] = p.cap * (sum - p.x[first + l * HW]);
  }
}

// The Kernels of meanfield.h's host driver on the device, each kernel launched with Launch::run.
template <typename Launch>
struct DeviceKernels {
  template <typename scalar_t>
  static void gather(const Gather<scalar_t>& g) {
    const int64_t n = g.batch * g.n_labels * g.height * g.width;
    Launch::run(gather_kernel<scalar_t>, blocks_for(n), kThreads, 0, g);
  }

  // -(base + the neighbour sum) into scratch, then ATen's softmax over the labels.
  template <typename scalar_t>
  static void softmin(Gather<scalar_t> g, at::Tensor& q, at::Tensor& scratch) {
    g.sign = scalar_t(-1);
    g.out = scratch.mutable_data_ptr<scalar_t>();
    gather(g);
    at::_softmax_out(q, scratch, 1, false);
  }

  // The gather into scratch, then ATen's softmax backward.
  template <typename scalar_t>
  static void softmin_backward(Gather<scalar_t> g, const at::Tensor& q, at::Tensor& grad, at::Tensor& grad_unary,
                               at::Tensor& scratch) {
    g.out = scratch.mutable_data_ptr<scalar_t>();
    gather(g);
    at::_softmax_backward_data_out(grad, scratch, q, 1, grad.scalar_type()).neg_();
    grad_unary.add_(grad);
  }

  template <typename scalar_t>
  static void weight_grad(const WeightGrad<scalar_t>& g) {
    const int64_t n = g.batch * g.n_offsets * g.height * g.width;
    Launch::run(weight_grad_kernel<scalar_t>, blocks_for(n), kThreads, 0, g);
  }

  template <typename scalar_t>
  static void distance_product(const DistanceProduct<scalar_t>& p) {
    const int64_t n = p.batch * p.height * p.width;
    Launch::run(potts_kernel<scalar_t>, blocks_for(n), kThreads, 0, p);
  }
};

// The kind the device kernels take: their only O(L) product is Potts', truncated linear goes to the GEMMs (as
// truncated quadratic does in meanfield.h); other values stay, for the input check to refuse.
inline int64_t device_kind(int64_t pairwise_kind) {
  return pairwise_kind == kTruncatedLinear ? kGeneral : pairwise_kind;
}

// The ops meanfield and meanfield_backward on the device.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> meanfield_with(const at::Tensor& unary, const at::Tensor& pairwise,
                                                  const at::Tensor& edge_weights, int64_t n_directions,
                                                  int64_t n_iterations, int64_t pairwise_kind) {
  return meanfield_forward<DeviceKernels<Launch>>(unary, pairwise, edge_weights, n_directions, n_iterations,
                                                  device_kind(pairwise_kind));
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> meanfield_backward_with(const at::Tensor& grad_costs,
                                                                       const at::Tensor& pairwise,
                                                                       const at::Tensor& edge_weights,
                                                                       const at::Tensor& q, int64_t n_directions,
                                                                       int64_t pairwise_kind, bool pairwise_grad) {
  return meanfield_backward<DeviceKernels<Launch>>(grad_costs, pairwise, edge_weights, q, n_directions,
                                                   device_kind(pairwise_kind), pairwise_grad);
}

}  // namespace meanfield
}  // namespace app
