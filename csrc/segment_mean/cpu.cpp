// Segment mean on the CPU: O(C * H * W) work and O(C * num_segments) scratch, OpenMP over (batch, channel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "common.h"

namespace app {
namespace {

template <typename scalar_t>
void segment_mean_cpu_kernel(const scalar_t* values, const int64_t* segments, scalar_t* output, int64_t batch,
                             int64_t channels, int64_t pixels, int64_t num_segments) {
  using acc_t = at::opmath_type<scalar_t>;
  // Pixel count of every segment, once per image; ids outside [0, num_segments) are refused.
  std::vector<int64_t> counts(batch * num_segments, 0);
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* seg = segments + b * pixels;
      int64_t* count = counts.data() + b * num_segments;
      for (int64_t p = 0; p < pixels; ++p) {
        if (seg[p] < 0 || seg[p] >= num_segments) {
          out_of_range = true;
          return;
        }
      }
      for (int64_t p = 0; p < pixels; ++p) count[seg[p]] += 1;
    }
  });
  TORCH_CHECK(!out_of_range, "segment_mean: segment ids must lie in [0, num_segments)");
  // Each (image, channel) plane owns its sums: no atomics needed.
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(num_segments);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / channels;
      const int64_t* seg = segments + b * pixels;
      const int64_t* count = counts.data() + b * num_segments;
      const scalar_t* in = values + plane * pixels;
      scalar_t* out = output + plane * pixels;
      std::fill(sums.begin(), sums.end(), acc_t(0));
      // Neighbouring pixels mostly share a segment: sum runs in a register and flush at each change, which
      // avoids a store-to-load dependency through sums[] on every pixel.
      int64_t run_segment = seg[0];
      acc_t run_sum = 0;
      for (int64_t p = 0; p < pixels; ++p) {
        if (seg[p] != run_segment) {
          sums[run_segment] += run_sum;
          run_sum = 0;
          run_segment = seg[p];
        }
        run_sum += static_cast<acc_t>(in[p]);
      }
      sums[run_segment] += run_sum;
      for (int64_t s = 0; s < num_segments; ++s) {
        if (count[s] > 0) sums[s] /= static_cast<acc_t>(count[s]);
      }
      for (int64_t p = 0; p < pixels; ++p) out[p] = static_cast<scalar_t>(sums[seg[p]]);
    }
  });
}

at::Tensor segment_mean_cpu(const at::Tensor& values, const at::Tensor& segments, int64_t num_segments) {
  segment_mean::check_inputs(values, segments, num_segments);
  auto output = at::empty_like(values);
  if (values.numel() == 0) return output;
  const int64_t batch = values.size(0), channels = values.size(1), pixels = values.size(2) * values.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segment_mean_cpu", [&] {
    segment_mean_cpu_kernel<scalar_t>(values.const_data_ptr<scalar_t>(), segments.const_data_ptr<int64_t>(),
                                      output.mutable_data_ptr<scalar_t>(), batch, channels, pixels, num_segments);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(app, CPU, m) { m.impl("segment_mean", &segment_mean_cpu); }

}  // namespace app
