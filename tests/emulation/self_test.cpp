// Small kernels that test the emulator itself (tests/test_cuda_emulation.py), as ops of the library
// `app_emulator_test`: warp intrinsics against CUDA's results, scheduling order, shared-memory poison, and the
// errors the emulator reports.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gpu_emulator.h"

namespace {

constexpr unsigned int kFull = 0xffffffffu;
constexpr int kIntrinsicColumns = 27;

// Row t of out: the intrinsics as thread t sees them, on the values of a block of 64 threads; out[0][26]: the sum of
// the values by atomicAdd.
__global__ void intrinsics_kernel(const int* values, int64_t* out) {
  const int t = threadIdx.x, lane = t % 32, v = __ldg(values + t);
  int64_t* row = out + t * kIntrinsicColumns;
  row[0] = __shfl_sync(kFull, v, lane * 7 % 32);
  row[1] = __shfl_sync(kFull, v, 3, 8);
  row[2] = __shfl_xor_sync(kFull, v, 5);
  row[3] = __shfl_xor_sync(kFull, v, 16, 16);
  row[4] = __shfl_up_sync(kFull, v, 3);
  row[5] = __shfl_up_sync(kFull, v, 2, 8);
  row[6] = __shfl_down_sync(kFull, v, 3);
  row[7] = __shfl_down_sync(kFull, v, 2, 8);
  row[8] = __ballot_sync(kFull, v & 1);
  row[9] = __any_sync(kFull, v > 90);
  row[10] = __all_sync(kFull, v > 0);
  row[11] = __reduce_add_sync(kFull, v);
  row[12] = __reduce_min_sync(kFull, v);
  row[13] = __reduce_max_sync(kFull, static_cast<unsigned int>(v));
  row[14] = __match_any_sync(kFull, v % 4);
  row[15] = lane < 16 ? __reduce_add_sync(0x0000ffffu, v) : __reduce_max_sync(0xffff0000u, v);
  row[16] = __float_as_int(__shfl_xor_sync(kFull, v * 0.5f, 1));
  row[17] = __double_as_longlong(__shfl_down_sync(kFull, v * 0.25, 1));
  row[18] = __shfl_sync(kFull, static_cast<int64_t>(v) << 33, 31);
  row[19] = __match_any_sync(kFull, static_cast<uint64_t>(v % 3) << 40);
  row[20] = __ffs(v);
  row[21] = __popc(static_cast<unsigned int>(v));
  row[22] = __clz(v);
  row[23] = __brev(static_cast<unsigned int>(v));
  row[24] = __ffsll(static_cast<long long>(v) << 33);
  row[25] = lane < 16 ? __shfl_sync(0x0000ffffu, v, 16) : __shfl_sync(0xffff0000u, v, 17);  // 16: not in the mask
  atomicAdd(reinterpret_cast<unsigned long long*>(out + 26), static_cast<unsigned long long>(v));
}

at::Tensor intrinsics(const at::Tensor& values) {
  TORCH_CHECK(values.dtype() == at::kInt && values.numel() == 64 && values.is_contiguous(), "64 int32 values");
  at::Tensor out = at::zeros({64, kIntrinsicColumns}, values.options().dtype(at::kLong));
  app::EmulatedLaunch::run(intrinsics_kernel, 1, 64, 0, values.const_data_ptr<int>(), out.mutable_data_ptr<int64_t>());
  return out;
}

// Warp 1 writes a shared row after a __syncwarp, warp 0 reads it after one; with block_barrier a __syncthreads
// orders the writes before the reads, without it the order the scheduler resumes the threads in decides.
__global__ void exchange_kernel(float* out, bool block_barrier) {
  APP_DYNAMIC_SHARED(shared);
  float* row = reinterpret_cast<float*>(shared);
  if (threadIdx.x >= 32) {
    __syncwarp();
    row[threadIdx.x - 32] = static_cast<float>(threadIdx.x);
  }
  if (block_barrier) __syncthreads();
  if (threadIdx.x < 32) {
    __syncwarp();
    out[blockIdx.x * 32 + threadIdx.x] = row[threadIdx.x];
  }
}

at::Tensor exchange(int64_t blocks, bool block_barrier) {
  at::Tensor out = at::empty({blocks, 32}, at::kFloat);
  app::EmulatedLaunch::run(exchange_kernel, blocks, 64, 32 * sizeof(float), out.mutable_data_ptr<float>(),
                           block_barrier);
  return out;
}

// Block 0 writes the shared row and reads it back, block 1 only reads it.
template <typename scalar_t>
__global__ void unwritten_shared_kernel(scalar_t* out) {
  APP_DYNAMIC_SHARED(shared);
  scalar_t* row = reinterpret_cast<scalar_t*>(shared);
  if (blockIdx.x == 0) row[threadIdx.x] = static_cast<scalar_t>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = row[threadIdx.x];
}

at::Tensor unwritten_shared(const at::Tensor& like) {
  at::Tensor out = at::empty({2, 32}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "unwritten_shared", [&] {
    app::EmulatedLaunch::run(unwritten_shared_kernel<scalar_t>, 2, 32, 32 * sizeof(scalar_t),
                             out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// Undefined behaviour on the device, by case: 0 the two half warps call different collectives; 1 lane 0 exits
// before the others' __syncwarp; 2 the others exit while lane 0 waits at __syncthreads; 3 a mask without the
// calling lane; 4 lanes 0, 1, 2 each wait for the next in a collective that the next does not call (a deadlock
// that no single arrival shows).
__global__ void misuse_kernel(int64_t which) {
  const unsigned int lane = threadIdx.x % 32;
  if (which == 0) {
    if (lane < 16) {
      __shfl_sync(kFull, 1, 0);
    } else {
      __ballot_sync(kFull, 1);
    }
  } else if (which == 1) {
    if (lane == 0) return;
    __syncwarp();
  } else if (which == 2) {
    if (lane == 0) {
      __syncthreads();
    } else {
      __syncwarp(0xfffffffeu);
    }
  } else if (which == 3) {
    __syncwarp(lane == 0 ? 0x2u : kFull);
  } else if (lane == 0) {
    __shfl_sync(0x3u, 1, 1);
  } else if (lane == 1) {
    __ballot_sync(0x6u, 1);
  } else if (lane == 2) {
    __any_sync(0x5u, 1);
  }
}

__global__ void empty_kernel() {}

// Launches that must fail: misuse_kernel's cases 0-4 on one warp; 5, 6: 0 and 1025 threads; 7: one byte more
// dynamic shared memory than a block may have.
void misuse(int64_t which) {
  if (which < 5) {
    app::EmulatedLaunch::run(misuse_kernel, 1, 32, 0, which);
  } else {
    app::EmulatedLaunch::run(empty_kernel, 1, which == 5 ? 0 : which == 6 ? 1025 : 32,
                             which == 7 ? app::EmulatedLaunch::max_shared_bytes() + 1 : 0);
  }
}

}  // namespace

TORCH_LIBRARY(app_emulator_test, m) {
  m.def("intrinsics(Tensor values) -> Tensor", &intrinsics);
  m.def("exchange(int blocks, bool block_barrier) -> Tensor", &exchange);
  m.def("unwritten_shared(Tensor like) -> Tensor", &unwritten_shared);
  m.def("misuse(int which) -> ()", &misuse);
}
