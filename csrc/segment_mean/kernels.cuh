// Segment mean on the GPU (thesis Eq. 4.13), device code and its host driver `segment_mean_with<Launch>`, launched
// through a policy as the message-passing sweeps are (csrc/cuda_launch.h on the GPU, tests/emulation on the CPU).
//
// A thread per pixel. Neighbouring pixels of a row mostly share a superpixel, so a warp's 32 pixels fall into a
// few runs of one id: every channel is summed over each run by a segmented shuffle scan, and only the run's last
// lane adds the sum to the segment's accumulator (one atomic per run and channel instead of per pixel; the scatter
// reference and the first kernel here took one per pixel and contended on the same addresses). Then a second
// kernel writes each pixel's segment mean.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common.h"

namespace app {
namespace segment_mean {

constexpr int kThreads = 256;

// Where thread `threadIdx.x` of block `blockIdx.x` works: image b, pixel (-1 past the image's last pixel).
struct PixelOf {
  int64_t b, pixel;
  __device__ PixelOf(int64_t pixels, int64_t blocks_per_image)
      : b(blockIdx.x / blocks_per_image),
        pixel((blockIdx.x % blocks_per_image) * kThreads + threadIdx.x) {
    if (pixel >= pixels) pixel = -1;
  }
};

// sums (B, C, S) += the values of each segment's pixels, counts (B, S) += its pixel count, S = num_segments.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_runs_kernel(const scalar_t* values, const int64_t* segments, acc_t* sums, float* counts, int64_t channels,
                    int64_t pixels, int64_t num_segments, int64_t blocks_per_image) {
  const PixelOf site(pixels, blocks_per_image);
  const int lane = threadIdx.x % 32;
  const int64_t segment = site.pixel < 0 ? -1 : segments[site.b * pixels + site.pixel];
  CUDA_KERNEL_ASSERT(site.pixel < 0 || (segment >= 0 && segment < num_segments));
  // runs: lanes whose id differs from the previous lane's start one (lanes past the image form runs of id -1)
  const int64_t previous = __shfl_up_sync(0xffffffffu, segment, 1);
  const unsigned int starts = __ballot_sync(0xffffffffu, lane == 0 || segment != previous);
  const int run_start = 31 - __clz(static_cast<int>(starts & (0xffffffffu >> (31 - lane))));
  const bool run_end = lane == 31 || (starts >> (lane + 1) & 1u) != 0;
  const bool adds = run_end && segment >= 0;
  if (adds) atomicAdd(counts + site.b * num_segments + segment, static_cast<float>(lane - run_start + 1));
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t plane = site.b * channels + c;
    acc_t sum = site.pixel < 0 ? acc_t(0) : static_cast<acc_t>(values[plane * pixels + site.pixel]);
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {  // inclusive scan within the run
      const acc_t before = __shfl_up_sync(0xffffffffu, sum, offset);
      if (lane - run_start >= offset) sum += before;
    }
    if (adds) atomicAdd(sums + plane * num_segments + segment, sum);
  }
}

// output (B, C, H, W) = the mean of each pixel's segment.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gather_means_kernel(const acc_t* sums, const float* counts, const int64_t* segments, scalar_t* output,
                        int64_t channels, int64_t pixels, int64_t num_segments, int64_t blocks_per_image) {
  const PixelOf site(pixels, blocks_per_image);
  if (site.pixel < 0) return;
  const int64_t segment = segments[site.b * pixels + site.pixel];
  const acc_t count = static_cast<acc_t>(counts[site.b * num_segments + segment]);
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t plane = site.b * channels + c;
    output[plane * pixels + site.pixel] = static_cast<scalar_t>(sums[plane * num_segments + segment] / count);
  }
}

// The op on contiguous values (B, C, H, W) and int64 segments (B, H, W) with ids in [0, num_segments).
template <typename Launch>
at::Tensor segment_mean_with(const at::Tensor& values, const at::Tensor& segments, int64_t num_segments) {
  check_inputs(values, segments, num_segments);
  const int64_t batch = values.size(0), channels = values.size(1), pixels = values.size(2) * values.size(3);
  auto output = at::empty_like(values);
  if (values.numel() == 0) return output;
  const int64_t blocks_per_image = (pixels + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segment_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const auto sums = at::zeros({batch, channels, num_segments}, values.options().dtype(acc_type));
    const auto counts = at::zeros({batch, num_segments}, values.options().dtype(at::kFloat));
    Launch::run(sum_runs_kernel<scalar_t, acc_t>, batch * blocks_per_image, kThreads, 0,
                values.const_data_ptr<scalar_t>(), segments.const_data_ptr<int64_t>(), sums.mutable_data_ptr<acc_t>(),
                counts.mutable_data_ptr<float>(), channels, pixels, num_segments, blocks_per_image);
    Launch::run(gather_means_kernel<scalar_t, acc_t>, batch * blocks_per_image, kThreads, 0,
                sums.const_data_ptr<acc_t>(), counts.const_data_ptr<float>(), segments.const_data_ptr<int64_t>(),
                output.mutable_data_ptr<scalar_t>(), channels, pixels, num_segments, blocks_per_image);
  });
  return output;
}

}  // namespace segment_mean
}  // namespace app
