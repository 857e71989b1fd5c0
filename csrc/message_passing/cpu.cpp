// ISGMR / TRWP / SGM min-sum message passing on the CPU (thesis Alg. 1-4); the sweeps are in cpu_sweeps.h.
// The sweeps are compiled twice on x86-64 with GCC: for the baseline instruction set (SSE2, what the wheel
// targets) and for AVX2 (twice the vector width); forward and backward pick AVX2 at run time where
// __builtin_cpu_supports finds it. The AVX2 variant leaves FMA off so that both round alike: results are
// bitwise the same on every x86-64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define APP_MESSAGE_PASSING_AVX2 1
#else
#define APP_MESSAGE_PASSING_AVX2 0
#endif

namespace app {
namespace message_passing {
namespace {

// The label vectors of the backward are 32 bytes: GCC notes that passing them by value is an AVX ABI matter in the
// baseline build; they never cross a non-inlined call boundary of another translation unit.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
namespace baseline {
#include "cpu_sweeps.h"
}  // namespace baseline
#pragma GCC diagnostic pop

#if APP_MESSAGE_PASSING_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "cpu_sweeps.h"
}  // namespace avx2
#pragma GCC pop_options

bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
#endif

struct CpuSweeps {
  template <typename scalar_t, typename index_t>
  static void forward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, const scalar_t* unary,
                           scalar_t* total, const scalar_t* old_messages, scalar_t* messages, scalar_t* out,
                           SweepIndices<index_t> iteration) {
#if APP_MESSAGE_PASSING_AVX2
    if (has_avx2()) {
      avx2::forward_sweeps(grid, method, r_first, unary, total, old_messages, messages, out, iteration);
      return;
    }
#endif
    baseline::forward_sweeps(grid, method, r_first, unary, total, old_messages, messages, out, iteration);
  }
  template <typename scalar_t, typename index_t>
  static void backward_pair(const Grid<scalar_t>& grid, Method method, int64_t r_first, BackwardState<scalar_t> state,
                            SweepIndices<const index_t> iteration) {
#if APP_MESSAGE_PASSING_AVX2
    if (has_avx2()) {
      avx2::backward_sweeps(grid, method, r_first, state, iteration);
      return;
    }
#endif
    baseline::backward_sweeps(grid, method, r_first, state, iteration);
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
