// Host emulation of CUDA thread blocks, so that tests run device code (csrc/message_passing/cuda_sweeps.cuh) on the
// CPU: include it after the standard and torch headers (it defines CUDA's keywords as macros) and before the
// kernels, and launch through app::EmulatedLaunch, the interface of app::CudaLaunch (csrc/cuda_launch.h).
//
// Emulated: a 1-D grid of 1-D blocks, run one block after another. Every thread of a block is a coroutine on its
// own stack that runs until it reaches __syncthreads, a warp collective or its end, then hands over to the next
// ready thread of the scheduler's round; every round visits the threads in a new, seeded order. Warps of 32 lanes
// whose collectives (__shfl*_sync, votes, __reduce_*_sync, __match_any_sync, __syncwarp) wait for every lane their
// mask names. Dynamic shared memory filled with 0xFF bytes (NaN in float and double) at the start of every block.
// The errors it can see (lanes of a warp in different collectives, a mask naming an exited lane, a thread exiting
// while others wait at __syncthreads, deadlock, bad launch sizes) are thrown from the launch as std::runtime_error;
// the failed block's coroutines are abandoned without unwinding (kernel locals must not need destructors) and the
// next launch works.
//
// Not emulated: any memory model beyond sequential consistency (threads interleave only at synchronisation
// points); blocks running concurrently; atomics beyond plain host read-modify-writes; 2-D and 3-D grids and
// blocks; static __shared__ arrays; __activemask; the device's FMA contraction of a * b + c (host arithmetic rounds
// every operation, as __fmul_rn and __fadd_rn do: build with -ffp-contract=off and without -ffast-math); hardware
// limits other than 1024 threads per block and kMaxDynamicSharedBytes of dynamic shared memory; speed.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __FAST_MATH__
#error "gpu_emulator.h: device arithmetic is IEEE; build without -ffast-math"
#endif

namespace app {
namespace emulation {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
// With CudaLaunch's opt-in: the smallest limit of the GPUs the kernels may run on (sm_86 / sm_89, 99 KiB; sm_80 has
// 163 KiB, sm_90 227 KiB)
constexpr size_t kMaxDynamicSharedBytes = 99 << 10;
constexpr size_t kStackBytes = 128 << 10;
constexpr uint64_t kScheduleSeed = 0x9e3779b97f4a7c15u;

struct Index3 {
  unsigned int x, y, z;
};

// ---- Coroutine contexts. On x86-64 a switch pushes the callee-saved registers and swaps stack pointers (a few
// nanoseconds); elsewhere, or with APP_EMULATOR_UCONTEXT defined, it is swapcontext, whose signal-mask system call
// costs ~100 ns a switch (the message-passing tests then take 6 times as long).
#if defined(__x86_64__) && !defined(APP_EMULATOR_UCONTEXT)

// Saves rbp, rbx, r12-r15 on the current stack and its stack pointer in *from, then continues on the stack `to`
// (saved by switch_stacks or made by Context::start) by popping the same registers and returning.
__attribute__((naked, noinline)) inline void switch_stacks(void** /*from*/, void* /*to*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

struct Context {
  void* stack_pointer = nullptr;

  // Makes the context start `entry`, which must never return, on the stack [base, base + size).
  void start(char* base, size_t size, void (*entry)()) {
    void** frame = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15});
    *--frame = nullptr;                         // entry's return address, 16-byte aligned as after a call
    *--frame = reinterpret_cast<void*>(entry);  // where switch_stacks returns to
    for (int saved = 0; saved < 6; ++saved) *--frame = nullptr;
    stack_pointer = frame;
  }
};

inline void switch_context(Context& from, const Context& to) { switch_stacks(&from.stack_pointer, to.stack_pointer); }

#else

struct Context {
  ucontext_t context;

  void start(char* base, size_t size, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = base;
    context.uc_stack.ss_size = size;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
};

inline void switch_context(Context& from, const Context& to) { swapcontext(&from.context, &to.context); }

#endif

// Coroutine stacks, each above a PROT_NONE guard page (an overflow faults instead of corrupting its neighbour),
// kept from launch to launch.
class Stacks {
 public:
  Stacks() = default;
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  ~Stacks() { release(); }

  void reserve(size_t count) {
    if (count <= count_) return;
    release();
    guard_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, count * slot(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) throw std::runtime_error("emulated CUDA: cannot map the threads' stacks");
    memory_ = static_cast<char*>(memory);
    count_ = count;
    for (size_t i = 0; i < count; ++i) mprotect(memory_ + i * slot(), guard_, PROT_NONE);
  }

  char* base(size_t i) const { return memory_ + i * slot() + guard_; }

 private:
  size_t slot() const { return guard_ + kStackBytes; }
  void release() {
    if (memory_ != nullptr) munmap(memory_, count_ * slot());
    memory_ = nullptr;
    count_ = 0;
  }

  char* memory_ = nullptr;
  size_t count_ = 0, guard_ = 0;
};

// ---- Threads, warps and their collectives

enum class ThreadState : unsigned char { kReady, kInCollective, kAtBarrier, kExited };

struct Thread {
  Context context;
  Index3 index;
  ThreadState state;
  // The thread's slots in its warp collective: its operand, the collective's argument (source lane, offset or lane
  // mask) and width, and the result that the collective's last arriving lane leaves for it. A collective writes
  // only the results of the lanes it names, all of which have arrived and wait for it: a lane that runs ahead into
  // its next collective cannot overwrite a result that another lane has not read yet.
  uint64_t operand, result;
  unsigned int argument;
  int width;
};

// One kind of warp collective: how it completes, from the operands of the lanes in `mask` (lanes: the warp's lane 0).
struct Collective {
  const char* name;
  const char* type;  // of the operand, nullptr: none or int
  void (*complete)(Thread* lanes, unsigned int mask);
};

// A collective that some lanes have reached, waiting for the rest of its mask.
struct OpenCollective {
  const Collective* op;
  unsigned int mask, arrived;
};

struct Warp {
  unsigned int exited;      // lanes that returned, and lanes past blockDim.x
  unsigned int at_barrier;  // lanes waiting at __syncthreads
  int n_open;               // open[0, n_open): their arrived lanes are disjoint, so there are at most 32
  OpenCollective open[kWarpSize];
};

inline std::string hex(unsigned int mask) {
  std::ostringstream text;
  text << "0x" << std::hex << mask;
  return text.str();
}

inline std::string describe(const Collective& op, unsigned int mask) {
  return std::string(op.name) + (op.type != nullptr ? std::string("<") + op.type + ">" : "") + "(mask " +
         hex(mask) + ")";
}

template <typename Fn>
void for_each_lane(unsigned int mask, const Fn& fn) {
  for (; mask != 0; mask &= mask - 1) fn(__builtin_ctz(mask));
}

// A kernel and its arguments, converted once per launch to the kernel's parameter types; every thread calls the
// kernel on its own copies.
struct KernelCall {
  void (*invoke)(const void* bound);
  const void* bound;
};

template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  std::tuple<Params...> arguments;

  static void invoke(const void* bound) {
    const auto& self = *static_cast<const BoundKernel*>(bound);
    std::apply(self.kernel, self.arguments);
  }
};

// The emulated device: one launch at a time (a mutex serialises host threads), one block at a time.
class Device {
 public:
  void launch(const KernelCall& call, int64_t blocks, int threads, size_t shared_bytes) {
    if (blocks == 0) return;  // as CudaLaunch, which launches nothing
    if (threads < 1 || threads > kMaxThreads) {
      throw std::runtime_error("emulated CUDA: a block has 1 to 1024 threads, not " + std::to_string(threads));
    }
    if (blocks < 0 || blocks > std::numeric_limits<int32_t>::max()) {
      throw std::runtime_error("emulated CUDA: a grid has up to 2^31 - 1 blocks, not " + std::to_string(blocks));
    }
    if (shared_bytes > kMaxDynamicSharedBytes) {
      throw std::runtime_error("emulated CUDA: " + std::to_string(shared_bytes) +
                               " bytes of dynamic shared memory, more than a block may have (" +
                               std::to_string(kMaxDynamicSharedBytes) + ")");
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    prepare(call, blocks, threads, shared_bytes);
    for (int64_t block = 0; block < blocks; ++block) run_block(static_cast<unsigned int>(block));
  }

  // ---- Device side, called by the running thread.
  const Index3& thread_index() const { return current_->index; }
  const Index3& block_index() const { return block_index_; }
  const Index3& block_dim() const { return block_dim_; }
  const Index3& grid_dim() const { return grid_dim_; }
  unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(shared_.data()); }

  // Arrives at `op` with `mask`; returns the thread's result once every lane of the mask has arrived.
  uint64_t collective(const Collective& op, unsigned int mask, uint64_t operand, unsigned int argument, int width) {
    Thread& me = *current_;
    const unsigned int warp_id = me.index.x / kWarpSize, lane = me.index.x % kWarpSize, bit = 1u << lane;
    Warp& warp = warps_[warp_id];
    auto fail_here = [&](const std::string& what) {
      fail(warp_id, "lane " + std::to_string(lane) + " calls " + describe(op, mask) + " " + what);
    };
    if ((mask & bit) == 0) fail_here("that does not name it");
    if ((mask & warp.exited) != 0) {
      fail_here("naming lanes " + hex(mask & warp.exited) + " that exited or lie past blockDim.x");
    }
    if ((mask & warp.at_barrier) != 0) {
      fail_here("naming lanes " + hex(mask & warp.at_barrier) + " that wait at __syncthreads");
    }
    // Lanes that wait for this lane elsewhere may be passed by (it meets them there later), unless this collective
    // needs them: then each waits for the other.
    OpenCollective* joined = nullptr;
    for (int i = 0; i < warp.n_open; ++i) {
      OpenCollective& open = warp.open[i];
      if (open.op == &op && open.mask == mask) {
        joined = &open;
      } else if ((open.mask & bit) != 0 && (open.arrived & mask) != 0) {
        fail_here("while lanes " + hex(open.arrived & mask) + " wait for it in " + describe(*open.op, open.mask));
      }
    }
    if (joined == nullptr) {
      joined = &warp.open[warp.n_open++];
      *joined = OpenCollective{&op, mask, 0};
    }
    me.operand = operand;
    me.argument = argument;
    me.width = width;
    joined->arrived |= bit;
    if (joined->arrived != mask) {
      me.state = ThreadState::kInCollective;
      yield();
      return me.result;
    }
    Thread* lanes = &threads_[warp_id * kWarpSize];
    op.complete(lanes, mask);
    for_each_lane(mask & ~bit, [&](int other) { lanes[other].state = ThreadState::kReady; });
    *joined = warp.open[--warp.n_open];
    return me.result;
  }

  void syncthreads() {
    Thread& me = *current_;
    const unsigned int warp_id = me.index.x / kWarpSize, bit = 1u << (me.index.x % kWarpSize);
    Warp& warp = warps_[warp_id];
    if (const OpenCollective* open = open_naming(warp, bit)) {
      fail(warp_id, "thread " + std::to_string(me.index.x) + " reaches __syncthreads while lanes " +
                        hex(open->arrived) + " wait for it in " + describe(*open->op, open->mask));
    }
    warp.at_barrier |= bit;
    if (++at_barrier_ < live_) {
      me.state = ThreadState::kAtBarrier;
      yield();
      return;
    }
    for (Thread& thread : threads_) {
      if (thread.state == ThreadState::kAtBarrier) thread.state = ThreadState::kReady;
    }
    for (Warp& each : warps_) each.at_barrier = 0;
    at_barrier_ = 0;
  }

 private:
  void prepare(const KernelCall& call, int64_t blocks, int threads, size_t shared_bytes) {
    call_ = &call;
    grid_dim_ = Index3{static_cast<unsigned int>(blocks), 1, 1};
    block_dim_ = Index3{static_cast<unsigned int>(threads), 1, 1};
    threads_.resize(threads);
    warps_.resize((threads + kWarpSize - 1) / kWarpSize);
    stacks_.reserve(threads);
    shared_bytes_ = shared_bytes;
    shared_.resize((shared_bytes + sizeof(SharedWord) - 1) / sizeof(SharedWord) + 1);
    strides_.clear();  // the steps coprime with the thread count: each visits every thread once a round
    for (int stride = 1; stride <= threads; ++stride) {
      if (std::gcd(stride, threads) == 1) strides_.push_back(stride);
    }
    random_state_ = kScheduleSeed;  // the same orders at every launch, whatever ran before
  }

  void run_block(unsigned int block) {
    block_index_ = Index3{block, 0, 0};
    std::memset(shared_.data(), 0xFF, shared_bytes_);
    const unsigned int n = block_dim_.x;
    for (unsigned int t = 0; t < n; ++t) {
      Thread& thread = threads_[t];
      thread.index = Index3{t, 0, 0};
      thread.state = ThreadState::kReady;
      thread.context.start(stacks_.base(t), kStackBytes, &thread_main);
    }
    for (size_t w = 0; w < warps_.size(); ++w) {
      const unsigned int lanes = n - static_cast<unsigned int>(w) * kWarpSize;
      warps_[w].exited = lanes >= kWarpSize ? 0u : ~0u << lanes;
      warps_[w].at_barrier = 0;
      warps_[w].n_open = 0;
    }
    live_ = n;
    at_barrier_ = 0;
    while (live_ > 0) {  // a round: each thread that stops passes on to the next ready one, the last back here
      next_visit_ = static_cast<unsigned int>(next_random() % n);
      stride_ = strides_[next_random() % strides_.size()];
      visits_left_ = n;
      resumed_ = false;
      continue_round(scheduler_);
      current_ = nullptr;
      if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
      if (!resumed_) throw std::runtime_error(deadlock());
    }
  }

  // Switches from `from` to the round's next ready thread, or back to the scheduler at the end of the round.
  void continue_round(Context& from) {
    const unsigned int n = block_dim_.x;
    while (visits_left_ > 0) {
      Thread& thread = threads_[next_visit_];
      --visits_left_;
      next_visit_ = next_visit_ + stride_ < n ? next_visit_ + stride_ : next_visit_ + stride_ - n;
      if (thread.state != ThreadState::kReady) continue;
      resumed_ = true;
      current_ = &thread;
      switch_context(from, thread.context);
      return;
    }
    if (&from != &scheduler_) switch_context(from, scheduler_);
  }

  // The body of every thread's coroutine: the kernel, then the checks of its exit; an exception is left for
  // the scheduler, which throws it from the launch.
  [[noreturn]] static void thread_main();

  void exit_thread() {
    Thread& me = *current_;
    const unsigned int warp_id = me.index.x / kWarpSize, bit = 1u << (me.index.x % kWarpSize);
    Warp& warp = warps_[warp_id];
    if (at_barrier_ > 0) {
      fail(warp_id, "thread " + std::to_string(me.index.x) + " exits while " + std::to_string(at_barrier_) +
                        " threads wait at __syncthreads");
    }
    if (const OpenCollective* open = open_naming(warp, bit)) {
      fail(warp_id, "lane " + std::to_string(me.index.x % kWarpSize) + " exits while lanes " +
                        hex(open->arrived) + " wait for it in " + describe(*open->op, open->mask));
    }
    me.state = ThreadState::kExited;
    warp.exited |= bit;
    --live_;
  }

  void yield() { continue_round(current_->context); }

  static const OpenCollective* open_naming(const Warp& warp, unsigned int bit) {
    for (int i = 0; i < warp.n_open; ++i) {
      if ((warp.open[i].mask & bit) != 0) return &warp.open[i];
    }
    return nullptr;
  }

  [[noreturn]] void fail(unsigned int warp_id, const std::string& what) const {
    throw std::runtime_error("emulated CUDA, block " + std::to_string(block_index_.x) + ", warp " +
                             std::to_string(warp_id) + ": " + what);
  }

  std::string deadlock() const {
    std::ostringstream text;
    text << "emulated CUDA, block " << block_index_.x << ": deadlock; " << at_barrier_
         << " threads wait at __syncthreads";
    for (size_t w = 0; w < warps_.size(); ++w) {
      for (int i = 0; i < warps_[w].n_open; ++i) {
        const OpenCollective& open = warps_[w].open[i];
        text << "; warp " << w << ": lanes " << hex(open.arrived) << " wait in " << describe(*open.op, open.mask);
      }
    }
    return text.str();
  }

  uint64_t next_random() {  // splitmix64
    uint64_t z = (random_state_ += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
  }

  struct alignas(16) SharedWord {
    unsigned char bytes[16];
  };

  std::mutex mutex_;
  const KernelCall* call_ = nullptr;
  Index3 block_index_{}, block_dim_{}, grid_dim_{};
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  Stacks stacks_;
  std::vector<SharedWord> shared_;  // one word more than asked for, so that a launch without any has an address
  size_t shared_bytes_ = 0;
  std::vector<unsigned int> strides_;
  uint64_t random_state_ = 0;
  unsigned int next_visit_ = 0, stride_ = 1, visits_left_ = 0;  // the round in progress
  bool resumed_ = false;
  Thread* current_ = nullptr;
  Context scheduler_;
  unsigned int live_ = 0, at_barrier_ = 0;
  std::exception_ptr error_;
};

inline Device device;

inline void Device::thread_main() {
  try {
    device.call_->invoke(device.call_->bound);
    device.exit_thread();
  } catch (...) {
    device.error_ = std::current_exception();
  }
  if (device.error_) {
    switch_context(device.current_->context, device.scheduler_);
  } else {
    device.continue_round(device.current_->context);
  }
  std::abort();  // an exited or failed thread is never resumed
}

// ---- Collectives

enum class ShuffleKind { kIndex, kUp, kDown, kXor };

// The lane that `lane` reads in a shuffle (PTX shfl.sync): within its segment of `width` lanes, or itself where
// the source lies past the segment (up: below it; xor may read earlier segments).
inline unsigned int shuffle_source(ShuffleKind kind, unsigned int lane, unsigned int argument, int width) {
  const unsigned int first = lane & ~(width - 1u), last = first + width - 1u;
  switch (kind) {
    case ShuffleKind::kIndex:
      return first + (argument & (width - 1u));
    case ShuffleKind::kUp:
      return argument <= lane - first ? lane - argument : lane;
    case ShuffleKind::kDown:
      return argument <= last - lane ? lane + argument : lane;
    case ShuffleKind::kXor:
      break;
  }
  const unsigned int source = lane ^ (argument & (kWarpSize - 1u));
  return source <= last ? source : lane;
}

// Reading a lane outside the mask is undefined on the device: the reader gets all-ones bits (NaN, -1).
template <ShuffleKind kind, size_t bytes>
void complete_shuffle(Thread* lanes, unsigned int mask) {
  constexpr uint64_t poison = bytes == 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * bytes)) - 1;
  for_each_lane(mask, [&](int lane) {
    const unsigned int source = shuffle_source(kind, lane, lanes[lane].argument, lanes[lane].width);
    lanes[lane].result = (mask >> source & 1u) != 0 ? lanes[source].operand : poison;
  });
}

inline unsigned int ballot_of(const Thread* lanes, unsigned int mask) {
  unsigned int ballot = 0;
  for_each_lane(mask, [&](int lane) { ballot |= lanes[lane].operand != 0 ? 1u << lane : 0u; });
  return ballot;
}

inline void complete_ballot(Thread* lanes, unsigned int mask) {
  const unsigned int ballot = ballot_of(lanes, mask);
  for_each_lane(mask, [&](int lane) { lanes[lane].result = ballot; });
}

inline void complete_any(Thread* lanes, unsigned int mask) {
  const bool any = ballot_of(lanes, mask) != 0;
  for_each_lane(mask, [&](int lane) { lanes[lane].result = any; });
}

inline void complete_all(Thread* lanes, unsigned int mask) {
  const bool all = ballot_of(lanes, mask) == mask;
  for_each_lane(mask, [&](int lane) { lanes[lane].result = all; });
}

enum class Reduction { kAdd, kMin, kMax };

// __reduce_*_sync over 32-bit T; the sum wraps around.
template <Reduction reduction, typename T>
void complete_reduce(Thread* lanes, unsigned int mask) {
  const int first = __builtin_ctz(mask);
  T value = static_cast<T>(lanes[first].operand);
  for_each_lane(mask & (mask - 1), [&](int lane) {
    const T other = static_cast<T>(lanes[lane].operand);
    if constexpr (reduction == Reduction::kAdd) {
      value = static_cast<T>(static_cast<uint32_t>(value) + static_cast<uint32_t>(other));
    } else if constexpr (reduction == Reduction::kMin) {
      value = other < value ? other : value;
    } else {
      value = other > value ? other : value;
    }
  });
  for_each_lane(mask, [&](int lane) { lanes[lane].result = static_cast<uint32_t>(value); });
}

inline void complete_match_any(Thread* lanes, unsigned int mask) {
  for_each_lane(mask, [&](int lane) {
    unsigned int same = 0;
    for_each_lane(mask, [&](int other) { same |= lanes[other].operand == lanes[lane].operand ? 1u << other : 0u; });
    lanes[lane].result = same;
  });
}

inline void complete_nothing(Thread*, unsigned int) {}

template <typename T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, double>) return "double";
  if constexpr (std::is_same_v<T, int>) return "int";
  if constexpr (std::is_same_v<T, unsigned int>) return "unsigned int";
  if constexpr (std::is_same_v<T, long>) return "long";
  if constexpr (std::is_same_v<T, unsigned long>) return "unsigned long";
  if constexpr (std::is_same_v<T, long long>) return "long long";
  if constexpr (std::is_same_v<T, unsigned long long>) return "unsigned long long";
  return "value";
}

constexpr const char* shuffle_name(ShuffleKind kind) {
  switch (kind) {
    case ShuffleKind::kIndex:
      return "__shfl_sync";
    case ShuffleKind::kUp:
      return "__shfl_up_sync";
    case ShuffleKind::kDown:
      return "__shfl_down_sync";
    case ShuffleKind::kXor:
      break;
  }
  return "__shfl_xor_sync";
}

template <ShuffleKind kind, typename T>
inline constexpr Collective kShuffle{shuffle_name(kind), type_name<T>(), &complete_shuffle<kind, sizeof(T)>};
inline constexpr Collective kBallot{"__ballot_sync", nullptr, &complete_ballot};
inline constexpr Collective kAny{"__any_sync", nullptr, &complete_any};
inline constexpr Collective kAll{"__all_sync", nullptr, &complete_all};
template <Reduction reduction, typename T>
inline constexpr Collective kReduce{reduction == Reduction::kAdd   ? "__reduce_add_sync"
                                    : reduction == Reduction::kMin ? "__reduce_min_sync"
                                                                   : "__reduce_max_sync",
                                    type_name<T>(), &complete_reduce<reduction, T>};
template <typename T>
inline constexpr Collective kMatchAny{"__match_any_sync", type_name<T>(), &complete_match_any};
inline constexpr Collective kSyncWarp{"__syncwarp", nullptr, &complete_nothing};

template <typename T>
uint64_t bits_of(T value) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "a 32- or 64-bit value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <ShuffleKind kind, typename T>
T shuffle(unsigned int mask, T value, unsigned int argument, int width) {
  static_assert(std::is_arithmetic_v<T>, "shuffles of arithmetic types");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    throw std::runtime_error(std::string("emulated CUDA: ") + shuffle_name(kind) +
                             " width must be a power of 2 up to 32, not " + std::to_string(width));
  }
  return from_bits<T>(device.collective(kShuffle<kind, T>, mask, bits_of(value), argument, width));
}

template <Reduction reduction, typename T>
T reduce(unsigned int mask, T value) {
  return static_cast<T>(device.collective(kReduce<reduction, T>, mask, static_cast<uint32_t>(value), 0, 0));
}

template <typename T>
struct NonDeduced {
  using type = T;
};

template <typename To, typename From>
To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "a cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

}  // namespace emulation

// The launch policy of the emulation: Launch::run of csrc/cuda_launch.h, on the CPU.
struct EmulatedLaunch {
  static size_t max_shared_bytes() { return emulation::kMaxDynamicSharedBytes; }
  template <typename... Params, typename... Args>
  static void run(void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_bytes, Args&&... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "one argument per kernel parameter");
    static_assert((!std::is_reference_v<Params> && ...), "kernels take their parameters by value");
    const emulation::BoundKernel<Params...> bound{kernel, std::tuple<Params...>(std::forward<Args>(args)...)};
    emulation::device.launch(emulation::KernelCall{&emulation::BoundKernel<Params...>::invoke, &bound}, blocks,
                             threads, shared_bytes);
  }
};

}  // namespace app

// ---- CUDA's device-side names

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

#define threadIdx (::app::emulation::device.thread_index())
#define blockIdx (::app::emulation::device.block_index())
#define blockDim (::app::emulation::device.block_dim())
#define gridDim (::app::emulation::device.grid_dim())
#define APP_DYNAMIC_SHARED(name) unsigned char* const name = ::app::emulation::device.dynamic_shared()

constexpr int warpSize = ::app::emulation::kWarpSize;

inline void __syncthreads() { ::app::emulation::device.syncthreads(); }

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ::app::emulation::device.collective(::app::emulation::kSyncWarp, mask, 0, 0, 0);
}

template <typename T>
T __shfl_sync(unsigned int mask, T value, int source_lane, int width = warpSize) {
  return ::app::emulation::shuffle<::app::emulation::ShuffleKind::kIndex>(mask, value, source_lane, width);
}

template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  return ::app::emulation::shuffle<::app::emulation::ShuffleKind::kUp>(mask, value, delta, width);
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  return ::app::emulation::shuffle<::app::emulation::ShuffleKind::kDown>(mask, value, delta, width);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = warpSize) {
  return ::app::emulation::shuffle<::app::emulation::ShuffleKind::kXor>(mask, value, lane_mask, width);
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return static_cast<unsigned int>(
      ::app::emulation::device.collective(::app::emulation::kBallot, mask, predicate != 0, 0, 0));
}

inline int __any_sync(unsigned int mask, int predicate) {
  return static_cast<int>(::app::emulation::device.collective(::app::emulation::kAny, mask, predicate != 0, 0, 0));
}

inline int __all_sync(unsigned int mask, int predicate) {
  return static_cast<int>(::app::emulation::device.collective(::app::emulation::kAll, mask, predicate != 0, 0, 0));
}

inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int value) {
  return ::app::emulation::reduce<::app::emulation::Reduction::kAdd>(mask, value);
}
inline int __reduce_add_sync(unsigned int mask, int value) {
  return ::app::emulation::reduce<::app::emulation::Reduction::kAdd>(mask, value);
}
inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int value) {
  return ::app::emulation::reduce<::app::emulation::Reduction::kMin>(mask, value);
}
inline int __reduce_min_sync(unsigned int mask, int value) {
  return ::app::emulation::reduce<::app::emulation::Reduction::kMin>(mask, value);
}
inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int value) {
  return ::app::emulation::reduce<::app::emulation::Reduction::kMax>(mask, value);
}
inline int __reduce_max_sync(unsigned int mask, int value) {
  return ::app::emulation::reduce<::app::emulation::Reduction::kMax>(mask, value);
}

// Lanes of the mask whose value has the same bits as the caller's.
template <typename T>
unsigned int __match_any_sync(unsigned int mask, T value) {
  static_assert(std::is_arithmetic_v<T>, "__match_any_sync of a 32- or 64-bit arithmetic value");
  return static_cast<unsigned int>(::app::emulation::device.collective(
      ::app::emulation::kMatchAny<T>, mask, ::app::emulation::bits_of(value), 0, 0));
}

// Atomics are plain read-modify-writes: threads interleave only at synchronisation points.
template <typename T>
T atomicAdd(T* address, typename ::app::emulation::NonDeduced<T>::type value) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd of an arithmetic value");
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

// Device code's float overloads of the maths functions (CUDA declares them globally; C's exp is double only).
using std::exp;

inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }

inline unsigned int __float_as_uint(float x) { return ::app::emulation::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return ::app::emulation::bit_cast<float>(x); }
inline int __float_as_int(float x) { return ::app::emulation::bit_cast<int>(x); }
inline float __int_as_float(int x) { return ::app::emulation::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return ::app::emulation::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return ::app::emulation::bit_cast<double>(x); }

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline unsigned int __brev(unsigned int x) {
  x = (x >> 1 & 0x55555555u) | (x & 0x55555555u) << 1;
  x = (x >> 2 & 0x33333333u) | (x & 0x33333333u) << 2;
  x = (x >> 4 & 0x0f0f0f0fu) | (x & 0x0f0f0f0fu) << 4;
  x = (x >> 8 & 0x00ff00ffu) | (x & 0x00ff00ffu) << 8;
  return x >> 16 | x << 16;
}
