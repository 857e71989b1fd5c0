// Launch policy of the device kernels written against `Launch::run` (message_passing/cuda_sweeps.cuh): a launch on
// the current stream with a launch-error check. tests/emulation provides the same interface on the CPU.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace app {

struct CudaLaunch {
  // kernel<<<blocks, threads, shared_bytes, current stream>>>(args...)
  template <typename... Params, typename... Args>
  static void run(void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_bytes, Args&&... args) {
    if (blocks == 0) return;
    kernel<<<static_cast<unsigned int>(blocks), threads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace app
