// ISGMR / TRWP / SGM min-sum message passing on the CPU (thesis Alg. 1-4); the sweeps are in cpu_sweeps.h.
// The sweeps are compiled twice on x86-64 with GCC: for the baseline instruction set (SSE2, what the wheel
// targets) and for AVX2 (twice the vector width); forward and backward pick AVX2 at run time where
// __builtin_cpu_supports finds it (APP_DISABLE_AVX2=1 keeps the baseline copy). The AVX2 variant leaves FMA off so
// that both round alike: results are bitwise the same on every x86-64. The body sees APP_SWEEPS_AVX2 in its AVX2
// copy, where it may use AVX2 intrinsics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common.h"

// Inlines the label-vector helpers and their chunk lambdas into the per-message functions (GCC left some as calls,
// keeping the vector accumulators in memory).
#define APP_FLATTEN __attribute__((flatten))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define APP_MESSAGE_PASSING_AVX2 1
#else
#define APP_MESSAGE_PASSING_AVX2 0
#endif

namespace app {
namespace message_passing {
namespace {

// The label vectors of cpu_sweeps.h are 32 bytes: GCC warns that returning them is an AVX ABI matter in the
// baseline build; they never cross a call boundary to another translation unit. (Not popped: GCC reports it
// where the templates are instantiated, the end of this file.)
#pragma GCC diagnostic ignored "-Wpsabi"
namespace baseline {
#include "cpu_sweeps.h"
}  // namespace baseline

#if APP_MESSAGE_PASSING_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
#define APP_SWEEPS_AVX2 1
namespace avx2 {
#include "cpu_sweeps.h"
}  // namespace avx2
#undef APP_SWEEPS_AVX2
#pragma GCC pop_options

#endif

struct CpuSweeps {
  template <typename scalar_t, typename index_t>
  static void forward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, const scalar_t* unary,
                           scalar_t* total, const scalar_t* old_messages, scalar_t* messages, scalar_t* out,
                           SweepIndices<index_t> iteration, bool first_iteration) {
#if APP_MESSAGE_PASSING_AVX2
    if (cpu_has_avx2()) {
      avx2::forward_sweeps(grid, method, r_first, unary, total, old_messages, messages, out, iteration, first_iteration);
      return;
    }
#endif
    baseline::forward_sweeps(grid, method, r_first, unary, total, old_messages, messages, out, iteration, first_iteration);
  }
  template <typename scalar_t, typename index_t>
  static void backward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, BackwardState<scalar_t> state,
                            SweepIndices<const index_t> iteration) {
#if APP_MESSAGE_PASSING_AVX2
    if (cpu_has_avx2()) {
      avx2::backward_sweeps(grid, method, r_first, state, iteration);
      return;
    }
#endif
    baseline::backward_sweeps(grid, method, r_first, state, iteration);
  }
  // Potts labels padded to whole label vectors (32 bytes; label_stride in common.h): a partial vector's loads and
  // stores cost more than a full one's (TRWP-4 at 21 labels took longer than at 24, forward and backward).
  template <typename scalar_t>
  static int64_t label_stride(int64_t n_labels, int64_t kind) {
    constexpr int64_t kLanes = 32 / sizeof(scalar_t);
    return kind == kPotts ? (n_labels + kLanes - 1) / kLanes * kLanes : n_labels;
  }
  // total = sum_d messages[d] + theta (Eq. 3.7; messages (D, N, Ls), theta and total (N, Ls)), summed in the order
  // d = 0, 1, ... whatever Ls is (ATen's sum rounded the padded and unpadded problems differently)
  template <typename scalar_t>
  static void add_messages(const at::Tensor& messages, const at::Tensor& theta, const at::Tensor& total) {
    const int64_t n_directions = messages.size(0), size = theta.numel();
    const scalar_t* m = messages.const_data_ptr<scalar_t>();
    const scalar_t* unary = theta.const_data_ptr<scalar_t>();
    scalar_t* out = total.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t e = begin; e < end; ++e) out[e] = m[e] + m[size + e];
      for (int64_t d = 2; d < n_directions; ++d) {
        const scalar_t* m_d = m + d * size;
#pragma omp simd
        for (int64_t e = begin; e < end; ++e) out[e] += m_d[e];
      }
#pragma omp simd
      for (int64_t e = begin; e < end; ++e) out[e] += unary[e];
    });
  }
  static int64_t accumulators(int64_t) { return at::get_num_threads(); }  // one per thread
  static constexpr bool kAccumulatesPending = false;  // the first sweep of each pair writes P
  static constexpr bool kReadsUnwritten = false;  // the first iteration / replay writes before it reads
  // One pass over the pixels (Alg. 3 after an iteration's replay): P (K, N, L) -> grad_unary += sum_k P[k] and,
  // where pair_grads is defined, pair_grads[k] = sum_k' P[k'] - P[k].
  template <typename scalar_t>
  static void isgmr_combine(const at::Tensor& pending, const at::Tensor& pair_grads, const at::Tensor& grad_unary) {
    const int64_t n_pairs = pending.size(0), size = grad_unary.numel();
    const scalar_t* p = pending.const_data_ptr<scalar_t>();
    scalar_t* pair = pair_grads.defined() ? pair_grads.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* unary = grad_unary.mutable_data_ptr<scalar_t>();
    constexpr int64_t kChunk = 1024;
    if (n_pairs == 2 && pair == nullptr) {  // 4 directions: the sum goes to the unary gradient only
      at::parallel_for(0, size, kChunk, [&](int64_t begin, int64_t end) {
#if APP_MESSAGE_PASSING_AVX2
        if (cpu_has_avx2()) {
          avx2::add_pair_sum(p + begin, p + size + begin, unary + begin, end - begin);
          return;
        }
#endif
        baseline::add_pair_sum(p + begin, p + size + begin, unary + begin, end - begin);
      });
      return;
    }
    at::parallel_for(0, size, kChunk, [&](int64_t begin, int64_t end) {
      scalar_t total[kChunk];
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t count = std::min(kChunk, end - start);
        const scalar_t* p_0 = p + start;
        const scalar_t* p_1 = p + size + start;  // D >= 4: at least two pairs
#pragma omp simd
        for (int64_t e = 0; e < count; ++e) total[e] = p_0[e] + p_1[e];
        for (int64_t k = 2; k < n_pairs; ++k) {
          const scalar_t* p_k = p + k * size + start;
#pragma omp simd
          for (int64_t e = 0; e < count; ++e) total[e] += p_k[e];
        }
        scalar_t* unary_chunk = unary + start;
#pragma omp simd
        for (int64_t e = 0; e < count; ++e) unary_chunk[e] += total[e];
        for (int64_t k = 0; pair != nullptr && k < n_pairs; ++k) {
          const scalar_t* p_k = p + k * size + start;
          scalar_t* pair_k = pair + k * size + start;
#pragma omp simd
          for (int64_t e = 0; e < count; ++e) pair_k[e] = total[e] - p_k[e];
        }
      }
    });
  }
};

}  // namespace
}  // namespace message_passing

TORCH_LIBRARY_IMPL(app, CPU, m) {
  m.impl("message_passing", &message_passing::message_passing_forward<message_passing::CpuSweeps>);
  m.impl("message_passing_backward", &message_passing::message_passing_backward<message_passing::CpuSweeps>);
}

}  // namespace app
