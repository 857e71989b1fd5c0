// Launch policy of the device kernels written against `Launch::run` (message_passing/cuda_sweeps.cuh): a launch on
// the current stream with a launch-error check. tests/emulation provides the same interface on the CPU.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace app {

struct CudaLaunch {
  // Dynamic shared memory a launch gets without asking (CUDA's default limit).
  static constexpr size_t kDefaultSharedBytes = 48 << 10;

  // The most dynamic shared memory a block of the current device may have (the opt-in limit: 99 KiB on sm_86/89,
  // 163 KiB on sm_80, 227 KiB on sm_90).
  static size_t max_shared_bytes() {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
    return static_cast<size_t>(bytes);
  }

  // kernel<<<blocks, threads, shared_bytes, current stream>>>(args...); above kDefaultSharedBytes the kernel is first
  // allowed that much (callers keep shared_bytes within max_shared_bytes()).
  template <typename... Params, typename... Args>
  static void run(void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_bytes, Args&&... args) {
    if (blocks == 0) return;
    if (shared_bytes > kDefaultSharedBytes) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_bytes)));
    }
    kernel<<<static_cast<unsigned int>(blocks), threads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace app
