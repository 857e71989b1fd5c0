// Segment mean on the GPU: atomic per-segment sums in the accumulation type, then a gather.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace app {
namespace {

constexpr int kThreads = 256;

__global__ void count_segments_kernel(const int64_t* segments, float* counts, int64_t pixels, int64_t num_segments,
                                      int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / pixels;
    atomicAdd(counts + b * num_segments + segments[i], 1.0f);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sum_segments_kernel(const scalar_t* values, const int64_t* segments, acc_t* sums, int64_t channels,
                                    int64_t pixels, int64_t num_segments, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t plane = i / pixels;  // b * channels + c
    const int64_t b = plane / channels;
    const int64_t seg = segments[b * pixels + i % pixels];
    atomicAdd(sums + plane * num_segments + seg, static_cast<acc_t>(values[i]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gather_means_kernel(const acc_t* sums, const float* counts, const int64_t* segments, scalar_t* output,
                                    int64_t channels, int64_t pixels, int64_t num_segments, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t plane = i / pixels;
    const int64_t b = plane / channels;
    const int64_t seg = segments[b * pixels + i % pixels];
    output[i] = static_cast<scalar_t>(sums[plane * num_segments + seg] /
                                      static_cast<acc_t>(counts[b * num_segments + seg]));
  }
}

int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(wanted, 1), 65535 * 8));
}

at::Tensor segment_mean_cuda(const at::Tensor& values, const at::Tensor& segments, int64_t num_segments) {
  TORCH_CHECK(values.dim() == 4 && segments.dim() == 3, "segment_mean: expected values (B,C,H,W), segments (B,H,W)");
  TORCH_CHECK(values.is_contiguous() && segments.is_contiguous(), "segment_mean: inputs must be contiguous");
  TORCH_CHECK(segments.scalar_type() == at::kLong, "segment_mean: segments must be int64");
  TORCH_CHECK(num_segments > 0, "segment_mean: num_segments must be positive");
  const c10::cuda::CUDAGuard guard(values.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = values.size(0), channels = values.size(1), pixels = values.size(2) * values.size(3);
  auto output = at::empty_like(values);
  if (values.numel() == 0) return output;
  auto counts = at::zeros({batch, num_segments}, values.options().dtype(at::kFloat));
  count_segments_kernel<<<blocks_for(batch * pixels), kThreads, 0, stream>>>(
      segments.const_data_ptr<int64_t>(), counts.mutable_data_ptr<float>(), pixels, num_segments, batch * pixels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segment_mean_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto sums = at::zeros({batch * channels, num_segments},
                          values.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int64_t total = values.numel();
    sum_segments_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        values.const_data_ptr<scalar_t>(), segments.const_data_ptr<int64_t>(), sums.mutable_data_ptr<acc_t>(), channels,
        pixels, num_segments, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gather_means_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        sums.const_data_ptr<acc_t>(), counts.const_data_ptr<float>(), segments.const_data_ptr<int64_t>(),
        output.mutable_data_ptr<scalar_t>(), channels, pixels, num_segments, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(app, CUDA, m) { m.impl("segment_mean", &segment_mean_cuda); }

}  // namespace app
