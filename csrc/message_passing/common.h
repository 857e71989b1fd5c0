// Shared definitions of the min-sum message-passing kernels (thesis Ch. 3): grid directions, methods,
// pairwise kinds, and the per-message building blocks (min-convolution Eq. 3.9/3.10 line 7-8, Eq. 3.5).
//
// Conventions (app/ops/reference/mrf.py): direction r = 2k steps by +offset_k, r = 2k + 1 by -offset_k;
// the message of direction r at pixel i comes from j = i - step_r; V_r = V for even r, V^T for odd r;
// the edge weight of (j, i) is edge_weights[k] stored at the raster-first node (j for even r, i for odd r).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__SSE2__) && !defined(__CUDACC__)
#include <immintrin.h>
#define APP_TRANSPOSE_SSE 1
#endif

#ifdef __CUDACC__
#define APP_HOST_DEVICE __host__ __device__
#else
#define APP_HOST_DEVICE
#endif

namespace app {
namespace message_passing {

// Methods, as passed by app/ops/message_passing.py.
enum Method : int64_t { kISGMR = 0, kTRWP = 1, kSGM = 2 };

// Pairwise structure the forward may exploit: kGeneral is O(L^2) per message; kPotts (V = c [a != b], c >= 0),
// kTruncatedLinear (V = c min(|a - b|, T), c >= 0) and kTruncatedQuadratic (V = c min((a - b)^2, T), c >= 0) are
// O(L). Parameters are read from the matrix. A kernel without a path for a kind treats it as kGeneral.
enum PairwiseKind : int64_t { kGeneral = 0, kPotts = 1, kTruncatedLinear = 2, kTruncatedQuadratic = 3 };

constexpr int kOffsets[8][2] = {{0, 1}, {1, 0}, {1, 1}, {1, -1}, {1, 2}, {2, 1}, {2, -1}, {1, -2}};

// Stored argmins of one message (Sec. 3.7.4): p(l) for each of its L labels, or for Potts, where every label keeps
// its sender label or jumps to m0, the sender costs' first argmin (p(l) in {l, m0}), the bits [p(l) = l] (m0's own
// bit set; bit l of the message's index_t words read as little-endian bytes) followed by m0: potts_index_words + 1
// entries, 5 bytes instead of 32 at 32 labels. A message with no sender (a scanline's first) stores zeros, which
// read as p = 0 (and are never scattered through).
template <typename index_t>
APP_HOST_DEVICE constexpr int64_t potts_index_words(int64_t n_labels) {
  return (n_labels + 8 * int64_t(sizeof(index_t)) - 1) / (8 * int64_t(sizeof(index_t)));
}

template <typename index_t>
APP_HOST_DEVICE constexpr int64_t index_row(int64_t kind, int64_t n_labels) {
  return kind == kPotts ? potts_index_words<index_t>(n_labels) + 1 : n_labels;
}

// Whether label l keeps its sender label (p(l) = l) in a Potts message's stored row.
template <typename index_t>
APP_HOST_DEVICE inline bool potts_stays(const index_t* row, int64_t l) {
  return (reinterpret_cast<const uint8_t*>(row)[l / 8] >> (l % 8)) & 1;
}

// p(l) from a Potts message's stored row.
template <typename index_t>
APP_HOST_DEVICE inline int64_t potts_argmin(const index_t* row, int64_t n_labels, int64_t l) {
  return potts_stays(row, l) ? l : static_cast<int64_t>(row[potts_index_words<index_t>(n_labels)]);
}

// The offsets in edge_weights (B, K, H, W) of direction r's edges: the edge (j, i), j the predecessor of i (in-image
// indices), of image b is stored at offset + b per_image + (at_sender ? j : i), at its pixel of offset r / 2.
struct WeightSlots {
  int64_t offset, per_image;
  bool at_sender;
  APP_HOST_DEVICE int64_t operator()(int64_t b, int64_t j, int64_t i) const {
    return offset + b * per_image + (at_sender ? j : i);
  }
};

// The grid problem shared by every sweep: sizes, edge weights (B, K, H, W), V and V^T (L, L), and the entries of
// one message's stored argmins (index_row). L = n_labels is the buffers' label stride (label_stride: the CPU pads
// Potts labels, whose padding labels are never an argmin and carry no gradient).
template <typename scalar_t>
struct Grid {
  int64_t batch, height, width, n_labels, n_directions;
  const scalar_t* weights;
  const scalar_t* v;
  const scalar_t* v_t;
  int64_t kind;
  int64_t index_row;

  APP_HOST_DEVICE int64_t pixels() const { return height * width; }
  // TRWP's rho (Eq. 3.10): 2 / D, the share of each direction's tree in the decomposition.
  APP_HOST_DEVICE scalar_t rho() const { return static_cast<scalar_t>(2.0 / static_cast<double>(n_directions)); }
  APP_HOST_DEVICE const scalar_t* v_r(int64_t r) const { return r % 2 == 0 ? v : v_t; }
  APP_HOST_DEVICE WeightSlots weight_slots(int64_t r) const {
    return {r / 2 * pixels(), n_directions / 2 * pixels(), r % 2 == 0};
  }
  // Offset in edge_weights of the edge (j, i) of direction r, j the predecessor of i (in-image indices).
  APP_HOST_DEVICE int64_t weight_slot(int64_t r, int64_t b, int64_t j, int64_t i) const {
    return weight_slots(r)(b, j, i);
  }
};

// Scan step (dy, dx) of direction r.
inline void direction_step(int64_t r, int64_t& dy, int64_t& dx) {
  const int sign = (r % 2 == 0) ? 1 : -1;
  dy = sign * kOffsets[r / 2][0];
  dx = sign * kOffsets[r / 2][1];
}

// The scanlines of step (dy, dx), |dy|, |dx| <= 2, start at the pixels whose predecessor (y - dy, x - dx) leaves
// the image: the band of min(|dy|, H) rows at the side the step enters from, then, in the other rows, the
// min(|dx|, W) columns at the side it enters from. n_chain_starts counts them, chain_start(k) is the k-th as
// y * W + x (band first, row-major; every start once).
APP_HOST_DEVICE inline int64_t chain_band(int64_t step, int64_t extent) {  // min(|step|, extent)
  const int64_t size = step < 0 ? -step : step;
  return size < extent ? size : extent;
}

APP_HOST_DEVICE inline int64_t n_chain_starts(int64_t height, int64_t width, int64_t dy, int64_t dx) {
  const int64_t band_rows = chain_band(dy, height);
  return band_rows * width + (height - band_rows) * chain_band(dx, width);
}

APP_HOST_DEVICE inline int64_t chain_start(int64_t k, int64_t height, int64_t width, int64_t dy, int64_t dx) {
  const int64_t band_rows = chain_band(dy, height), band_cols = chain_band(dx, width);
  int64_t y, x;
  if (k < band_rows * width) {
    const int64_t row = k / width;
    y = dy >= 0 ? row : height - 1 - row;
    x = k % width;
  } else {
    const int64_t rest = k - band_rows * width, row = rest / band_cols, col = rest % band_cols;
    y = dy >= 0 ? band_rows + row : row;
    x = dx >= 0 ? col : width - 1 - col;
  }
  return y * width + x;
}

// Scratch of min_convolve for L labels: the argmins, and the truncated quadratic's lower envelope (the lifted
// costs of the labels, the parabolas of the envelope's pieces and where each piece starts).
struct ConvolveScratch {
  std::vector<int32_t> arg, sites;
  std::vector<double> lifted, start_numerator, start_denominator;
  explicit ConvolveScratch(int64_t n_labels)
      : arg(n_labels), sites(n_labels), lifted(n_labels), start_numerator(n_labels), start_denominator(n_labels) {}
};

// Truncated quadratic in O(L): u(lambda) = min(min_mu h(mu) + a (lambda - mu)^2, min h + w V_r(0, L-1)),
// a = w V_r(0, 1), by the lower envelope of the parabolas (Felzenszwalb and Huttenlocher's distance transform, in
// double; parabola m gets below parabola k < m from lambda = (f(m) - f(k)) / (2 a (m - k)) on, f(m) = h(m) + a m^2,
// kept as a fraction and compared by cross-multiplication, so no division). The argmin at lambda is then chosen
// among a few candidates valued from the matrix, so that values and argmins are the dense path's, ties included.
// best: the first argmin of h.
template <typename scalar_t>
void truncated_quadratic_convolve(const scalar_t* h, int64_t n_labels, scalar_t w, const scalar_t* v_r, int32_t best,
                                  scalar_t* u, ConvolveScratch& scratch) {
  int32_t* arg = scratch.arg.data();
  const double a = static_cast<double>(w) * static_cast<double>(v_r[1]);
  if (a > 0) {
    int32_t* sites = scratch.sites.data();
    double *f = scratch.lifted.data(), *numerator = scratch.start_numerator.data();
    double* denominator = scratch.start_denominator.data();
    for (int64_t m = 0; m < n_labels; ++m) f[m] = static_cast<double>(h[m]) + a * static_cast<double>(m * m);
    int64_t k = 0;  // the envelope's last piece; piece j > 0 starts at numerator[j] / denominator[j]
    sites[0] = 0;
    for (int64_t m = 1; m < n_labels; ++m) {
      double num, den;  // where parabola m gets below the last piece's
      while (true) {
        num = f[m] - f[sites[k]];
        den = 2 * a * static_cast<double>(m - sites[k]);
        if (k == 0 || num * denominator[k] > numerator[k] * den) break;
        --k;  // the last piece starts no earlier than parabola m takes over: it is empty
      }
      sites[++k] = static_cast<int32_t>(m);
      numerator[k] = num;
      denominator[k] = den;
    }
    // The cap min h + w V(0, L-1) as the dense path rounds it is reached first at cap_label <= best (labels whose
    // costs differ from min h by less than the rounding of the sum tie with best).
    const scalar_t cap = h[best] + w * v_r[n_labels - 1];
    int32_t cap_label = 0;
    while (cap_label < best && h[cap_label] + w * v_r[n_labels - 1] != cap) ++cap_label;
    // At lambda: the envelope's piece j and its neighbours (they tie with it where pieces meet), cap_label and best,
    // valued from the matrix as the dense path values them; the lowest value wins, then the lowest label.
    for (int64_t l = 0, j = 0; l < n_labels; ++l) {
      while (j < k && numerator[j + 1] < static_cast<double>(l) * denominator[j + 1]) ++j;
      const int32_t candidates[5] = {j > 0 ? sites[j - 1] : sites[j], sites[j], j < k ? sites[j + 1] : sites[j],
                                     cap_label, best};
      scalar_t low = h[candidates[0]] + w * v_r[candidates[0] * n_labels + l];
      int32_t low_label = candidates[0];
      for (int c = 1; c < 5; ++c) {
        const int32_t m = candidates[c];
        const scalar_t value = h[m] + w * v_r[m * n_labels + l];
        if (value < low || (value == low && m < low_label)) {
          low = value;
          low_label = m;
        }
      }
      u[l] = low;
      arg[l] = low_label;
    }
    return;
  }
  for (int64_t l = 0; l < n_labels; ++l) {  // w V = 0: every label costs min h, first reached at best
    u[l] = h[best] + w * v_r[best * n_labels + l];
    arg[l] = best;
  }
}

// u(lambda) = min_mu h(mu) + w V_r(mu, lambda) and its first-index argmin p(lambda) = scratch.arg (Alg. 1-2 lines
// 7-8) for the general matrix, the truncated linear (distance transform) and the truncated quadratic (envelope);
// the CPU sweeps take Potts and narrow truncations through their own vectorised paths. h, u: (L); v_r: (L, L)
// row-major (mu, lambda).
template <typename scalar_t>
inline void min_convolve(int64_t kind, const scalar_t* h, int64_t n_labels, scalar_t w, const scalar_t* v_r,
                         scalar_t* u, ConvolveScratch& scratch) {
  int32_t* arg = scratch.arg.data();
  if (kind == kGeneral) {
    for (int64_t l = 0; l < n_labels; ++l) {
      u[l] = h[0] + w * v_r[l];
      arg[l] = 0;
    }
    for (int64_t m = 1; m < n_labels; ++m) {
      const scalar_t hm = h[m];
      const scalar_t* row = v_r + m * n_labels;
      for (int64_t l = 0; l < n_labels; ++l) {
        const scalar_t c = hm + w * row[l];
        const bool better = c < u[l];
        u[l] = better ? c : u[l];
        arg[l] = better ? static_cast<int32_t>(m) : arg[l];
      }
    }
    return;
  }
  int32_t best = 0;
  for (int64_t m = 1; m < n_labels; ++m) best = h[m] < h[best] ? static_cast<int32_t>(m) : best;
  if (kind == kTruncatedQuadratic) {
    truncated_quadratic_convolve(h, n_labels, w, v_r, best, u, scratch);
    return;
  }
  // Truncated linear: two-pass distance transform with slope w V(0, 1), then the cap min h + w V(0, L-1).
  const scalar_t slope = w * v_r[1];
  for (int64_t l = 0; l < n_labels; ++l) {
    u[l] = h[l];
    arg[l] = static_cast<int32_t>(l);
  }
  for (int64_t l = 1; l < n_labels; ++l) {
    const scalar_t c = u[l - 1] + slope;
    if (c < u[l]) {
      u[l] = c;
      arg[l] = arg[l - 1];
    }
  }
  for (int64_t l = n_labels - 2; l >= 0; --l) {
    const scalar_t c = u[l + 1] + slope;
    if (c < u[l]) {
      u[l] = c;
      arg[l] = arg[l + 1];
    }
  }
  const scalar_t cap = h[best] + w * v_r[n_labels - 1];
  for (int64_t l = 0; l < n_labels; ++l) {
    const bool capped = cap < u[l];
    u[l] = capped ? cap : u[l];
    arg[l] = capped ? best : arg[l];
  }
}

// ---- Host driver shared by the CPU and CUDA kernels. `Sweeps` provides forward_pair / backward_pair, the
// sweeps of two opposite directions r_first and r_first ^ 1 over all their scanlines (forward: r_first first;
// backward: in reverse scan order, r_first first), accumulators(L) (the number of (2, L, L) pairwise-gradient
// buffers, summed at the end), kAccumulatesPending (whether ISGMR's backward_pair adds to pending, which must then
// start zeroed, or the first sweep of a pair writes it), kReadsUnwritten (whether the sweeps read buffers that are
// still zero in the math before writing them, which must then start zeroed: TRWP's and ISGMR's messages in the first
// iteration, TRWP's E in the first replay; or take them as zero where forward_pair's first_iteration and
// BackwardState::first_replay say so) and isgmr_combine(pending, pair_grads, grad_unary), the end
// of one ISGMR iteration's replay: with P = pending (K, N, L), grad_unary (N, L) += sum_k P[k] and, where
// pair_grads is defined, pair_grads[k] = sum_{k' != k} P[k'].

// Index storage: the argmins of one iteration's sweeps, direction r at p + r N R (N = B H W, R = index_row,
// p (B, H, W, R)) and q + r N (q (B, H, W)).
template <typename index_t>
struct SweepIndices {
  index_t* p;
  index_t* q;
};

constexpr int kMaxPairs = 8;  // pairs of opposite directions, D / 2 for D <= 16

// Reverse-mode state of one method's backward; see backward_kernel for what each buffer holds.
template <typename scalar_t>
struct BackwardState {
  scalar_t* common;   // TRWP: C, the gradient of unary and part of every message's; SGM: gradient of the sweep output
  scalar_t* extra;    // TRWP: E (D, N, L), message gradients are C + E[d]; SGM: unary gradient
  scalar_t* pending;  // ISGMR: P (K, N, L), the sender-cost gradients of the pair's sweeps
  scalar_t* grad_weights;  // nullptr: not needed
  scalar_t* grad_v;        // (accumulators, 2, L, L): V and V^T accumulators; nullptr: not needed
  const scalar_t* pair_grad[kMaxPairs];  // ISGMR: G[k] (N, L), the gradient of m^{2k} and m^{2k+1}
  bool first_replay;  // TRWP: the last iteration's replay, before which E is unwritten (zero)
  bool last_replay;   // TRWP: the first iteration's replay, after which E is not read
};

// CPU buffers outlive the calls that took them: the kernels take a few hundred MiB per call, and the pages of a fresh
// allocation are faulted and cleared by the kernel on first touch (about a tenth of a 256x512 backward at 2 threads),
// where a reused one's are not. The pool holds buffers whose storage no tensor uses any more and hands one of the
// exact byte size out again; its buffers, in use or not, take at most APP_BUFFER_POOL_MIB MiB (default 1024, 0 turns
// it off): beyond that it drops unused ones, oldest first, and does not keep a new one that does not fit.
class BufferPool {
 public:
  static BufferPool& instance() {  // never destroyed: its tensors must not outlive the allocator at exit
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  at::Tensor take(int64_t n_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it) {
      if (it->nbytes() == static_cast<size_t>(n_bytes) && it->storage().use_count() == 1) {
        at::Tensor buffer = *it;
        buffers_.erase(it);
        buffers_.push_back(buffer);  // most recently used last
        return buffer;
      }
    }
    at::Tensor buffer = fresh(n_bytes);
    int64_t held = n_bytes;
    for (const at::Tensor& b : buffers_) held += static_cast<int64_t>(b.nbytes());
    for (auto it = buffers_.begin(); it != buffers_.end() && held > limit_;) {
      if (it->storage().use_count() == 1) {
        held -= static_cast<int64_t>(it->nbytes());
        it = buffers_.erase(it);
      } else {
        ++it;
      }
    }
    if (held <= limit_) buffers_.push_back(buffer);
    return buffer;
  }

 private:
  BufferPool() {
    const char* mib = std::getenv("APP_BUFFER_POOL_MIB");
    limit_ = (mib != nullptr && mib[0] != '\0' ? std::atoll(mib) : 1024) << 20;
  }
  // A new buffer, its memory marked for transparent huge pages before the first touch (Linux, THP "madvise" mode):
  // first touch then faults 2 MiB pages instead of 4 KiB ones.
  static at::Tensor fresh(int64_t n_bytes) {
    at::Tensor buffer = at::empty({n_bytes}, at::TensorOptions().dtype(at::kByte));
#ifdef __linux__
    constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + n_bytes) & ~(kHugePage - 1);
    if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
    return buffer;
  }

  std::mutex mutex_;
  std::vector<at::Tensor> buffers_;  // uint8, oldest first
  int64_t limit_;
};

// An uninitialised buffer like at::empty; on the CPU from the BufferPool.
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  const int64_t n_bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (n_bytes == 0) return at::empty(sizes, options);
  return BufferPool::instance().take(n_bytes).view(options.dtype().toScalarType()).view(sizes);
}

// A copy of x in a fresh empty_buffer, contiguous in x's dimension order.
inline at::Tensor buffer_copy(const at::Tensor& x) { return empty_buffer(x.sizes(), x.options()).copy_(x); }

#if defined(APP_TRANSPOSE_SSE) && defined(__x86_64__) && defined(__GNUC__)
// out[(s + k) out_row + c + j] = in[(c + j) in_row + s + k] for j, k < 8: one 8 x 8 float block through AVX.
__attribute__((target("avx2"))) inline void transpose_block8(const float* in, float* out, int64_t out_row,
                                                             int64_t in_row, int64_t s, int64_t c) {
  __m256 r[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(in + (c + j) * in_row + s);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 rows[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                          _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                          _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                          _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out + (s + k) * out_row + c, rows[k]);
}

// Whether the CPU has AVX2 and APP_DISABLE_AVX2 (read once; set and not "0") does not ask for the baseline code, so
// that tests can run the baseline copies on an AVX2 machine: the transposes here, the sweeps in cpu.cpp.
inline bool cpu_has_avx2() {
  static const bool supported = [] {
    const char* disable = std::getenv("APP_DISABLE_AVX2");
    const bool disabled = disable != nullptr && disable[0] != '\0' && std::strcmp(disable, "0") != 0;
    return __builtin_cpu_supports("avx2") && !disabled;
  }();
  return supported;
}
#define APP_TRANSPOSE_AVX2 1
#endif

// out (S, C) = in (C, S)^T on the tile [s0, s1) x [c0, c1), rows in_row and out_row elements apart: float through
// 8 x 8 AVX blocks where the CPU has AVX2 and both extents are multiples of 8 (the smaller stride outer, so that the
// rows of the strided side in flight share no more cache ways than a set has), else 4 x 4 SSE blocks where a whole
// block fits; element by element elsewhere.
template <typename scalar_t>
inline void transpose_tile(const scalar_t* in, scalar_t* out, int64_t out_row, int64_t in_row, int64_t s0,
                           int64_t s1, int64_t c0, int64_t c1) {
  int64_t s_vector = s0, c_vector = c0;  // the blocks cover [s0, s_vector) x [c0, c_vector)
#if defined(APP_TRANSPOSE_SSE)
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(APP_TRANSPOSE_AVX2)
    if (cpu_has_avx2() && (s1 - s0) % 8 == 0 && (c1 - c0) % 8 == 0) {
      if (out_row <= in_row) {
        for (int64_t c = c0; c < c1; c += 8) {
          for (int64_t s = s0; s < s1; s += 8) transpose_block8(in, out, out_row, in_row, s, c);
        }
      } else {
        for (int64_t s = s0; s < s1; s += 8) {
          for (int64_t c = c0; c < c1; c += 8) transpose_block8(in, out, out_row, in_row, s, c);
        }
      }
      return;
    }
#endif
    s_vector = s0 + (s1 - s0) / 4 * 4;
    c_vector = c0 + (c1 - c0) / 4 * 4;
    for (int64_t s = s0; s < s_vector; s += 4) {
      for (int64_t c = c0; c < c_vector; c += 4) {
        __m128 r0 = _mm_loadu_ps(in + c * in_row + s), r1 = _mm_loadu_ps(in + (c + 1) * in_row + s);
        __m128 r2 = _mm_loadu_ps(in + (c + 2) * in_row + s), r3 = _mm_loadu_ps(in + (c + 3) * in_row + s);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _mm_storeu_ps(out + s * out_row + c, r0);
        _mm_storeu_ps(out + (s + 1) * out_row + c, r1);
        _mm_storeu_ps(out + (s + 2) * out_row + c, r2);
        _mm_storeu_ps(out + (s + 3) * out_row + c, r3);
      }
    }
  }
#endif
  for (int64_t s = s0; s < s1; ++s) {  // what the blocks left: the columns past c_vector, then the rows past s_vector
    for (int64_t c = s < s_vector ? c_vector : c0; c < c1; ++c) out[s * out_row + c] = in[c * in_row + s];
  }
}

// The (B, S, C) transpose of src (B, C, S) in a fresh empty_buffer of shape `sizes`, where src's rows may be longer
// than S (src_row >= S: only their first S entries are read) and dst's rows longer than C (dst_row >= C: the entries
// [C, dst_row) of each are set to `pad`). On the CPU a tiled transpose (ATen's strided copy of a permuted view took
// 15-30 ms at 32 x 256 x 512, a tenth of a sweep set; the scalar tiles 4-9 ms, the SSE blocks 3 ms); elsewhere the
// permuted copy.
template <typename scalar_t>
at::Tensor transposed_copy(const at::Tensor& src, int64_t batch, int64_t channels, int64_t spatial, int64_t src_row,
                           int64_t dst_row, at::IntArrayRef sizes, scalar_t pad = 0) {
  const at::Tensor source = src.contiguous();
  at::Tensor dst = empty_buffer(sizes, src.options());
  if (!src.is_cpu()) {
    if (dst_row > channels) dst.view({batch * spatial, dst_row}).narrow(1, channels, dst_row - channels).fill_(pad);
    dst.view({batch, spatial, dst_row})
        .narrow(2, 0, channels)
        .copy_(source.view({batch, channels, src_row}).narrow(2, 0, spatial).transpose(1, 2));
    return dst;
  }
  const scalar_t* from = source.const_data_ptr<scalar_t>();
  scalar_t* to = dst.mutable_data_ptr<scalar_t>();
  constexpr int64_t kTile = 128;  // a tile is at most 64 KiB of floats each way: it stays in the core's L2
  const int64_t s_tiles = (spatial + kTile - 1) / kTile, c_tiles = (channels + kTile - 1) / kTile;
  at::parallel_for(0, batch * s_tiles * c_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s_tiles * c_tiles), s_tile = task / c_tiles % s_tiles, c_tile = task % c_tiles;
      const int64_t s0 = s_tile * kTile, c0 = c_tile * kTile;
      const int64_t s1 = std::min(spatial, s0 + kTile), c1 = std::min(channels, c0 + kTile);
      scalar_t* out = to + b * spatial * dst_row;
      transpose_tile(from + b * channels * src_row, out, dst_row, src_row, s0, s1, c0, c1);
      // the tile that ends its rows' channels pads them, while the rows are in cache
      for (int64_t s = s0; c1 == channels && s < s1; ++s) {
        std::fill(out + s * dst_row + channels, out + (s + 1) * dst_row, pad);
      }
    }
  });
  return dst;
}

template <typename index_t>
at::ScalarType index_dtype() {
  return c10::CppTypeToScalarType<index_t>::value;
}

// The label stride Ls >= L of the sweeps' labels-last buffers: Sweeps::label_stride (the CPU rounds Potts up to whole
// label vectors, L = 21 -> 24). The Ls - L padding labels carry unary cost +inf, so that no message takes them and no
// gradient reaches them: the L labels' costs, argmins (the Potts rows of index_row have the same length and bits) and
// gradients are those of the unpadded problem.
template <typename Sweeps, typename scalar_t>
int64_t label_stride(int64_t n_labels, int64_t kind) {
  const int64_t stride = Sweeps::template label_stride<scalar_t>(n_labels, kind);
  TORCH_CHECK(stride == n_labels || kind == kPotts, "message_passing: only Potts labels are padded");
  return stride;
}

// V (L, L) as the (Ls, Ls) matrix of the padded labels: Potts, V(a, b) = V(0, 1) for a != b, V(0, 0) on the diagonal.
inline at::Tensor padded_pairwise(const at::Tensor& pairwise, int64_t stride) {
  const int64_t L = pairwise.size(0);
  if (stride == L) return pairwise.contiguous();
  at::Tensor padded = at::empty({stride, stride}, pairwise.options());
  padded.fill_(pairwise[0][1]);
  padded.diagonal().fill_(pairwise[0][0]);
  padded.narrow(0, 0, L).narrow(1, 0, L).copy_(pairwise);
  return padded;
}

// The method's iterations around the device's sweeps (Alg. 1-2), labels-last buffers (N = B H W, Ls: label_stride).
template <typename Sweeps, typename scalar_t, typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_kernel(const at::Tensor& unary, const at::Tensor& pairwise,
                                                              const at::Tensor& edge_weights, Method method,
                                                              int64_t n_directions, int64_t n_iterations,
                                                              int64_t kind) {
  const int64_t B = unary.size(0), n_labels = unary.size(1), H = unary.size(2), W = unary.size(3);
  const int64_t N = B * H * W, D = n_directions, L = label_stride<Sweeps, scalar_t>(n_labels, kind);
  const at::Tensor theta = transposed_copy<scalar_t>(unary, B, n_labels, H * W, H * W, L, {B, H, W, L},
                                                     std::numeric_limits<scalar_t>::infinity());
  const at::Tensor v = padded_pairwise(pairwise, L), v_t = v.t().contiguous();
  const at::Tensor weights = edge_weights.contiguous();
  const int64_t R = index_row<index_t>(kind, n_labels);
  TORCH_CHECK(index_row<index_t>(kind, L) == R, "message_passing: padded labels changed the index rows");
  const Grid<scalar_t> grid{B, H, W, L, D, weights.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                            v_t.const_data_ptr<scalar_t>(), kind, R};
  auto index_options = unary.options().dtype(index_dtype<index_t>());
  at::Tensor p = empty_buffer({n_iterations, D, B, H, W, R}, index_options);
  at::Tensor q = at::empty({n_iterations, D, B, H, W}, index_options);
  auto indices = [&](int64_t it) {
    return SweepIndices<index_t>{p.mutable_data_ptr<index_t>() + it * D * N * R,
                                 q.mutable_data_ptr<index_t>() + it * D * N};
  };
  at::Tensor costs;
  if (method == kSGM) {
    at::Tensor current = theta, messages = empty_buffer({D, N, L}, theta.options());
    for (int64_t it = 0; it < n_iterations; ++it) {
      at::Tensor next = empty_buffer(theta.sizes(), theta.options()).zero_();
      for (int64_t r = 0; r < D; r += 2) {
        Sweeps::template forward_pair<scalar_t, index_t>(grid, method, r, current.const_data_ptr<scalar_t>(), nullptr,
                                                         nullptr, messages.mutable_data_ptr<scalar_t>(),
                                                         next.mutable_data_ptr<scalar_t>(), indices(it), it == 0);
      }
      current = next;  // Eq. 3.6, the unary of the next iteration
    }
    costs = current;
  } else if (method == kTRWP) {
    // total starts as theta (Eq. 3.7 with zero messages); theta is not needed after
    at::Tensor messages = empty_buffer({D, N, L}, theta.options()), total = theta;
    if (Sweeps::kReadsUnwritten) messages.zero_();
    for (int64_t it = 0; it < n_iterations; ++it) {
      for (int64_t r = 0; r < D; r += 2) {
        Sweeps::template forward_pair<scalar_t, index_t>(grid, method, r, nullptr, total.mutable_data_ptr<scalar_t>(),
                                                         messages.const_data_ptr<scalar_t>(),
                                                         messages.mutable_data_ptr<scalar_t>(), nullptr, indices(it),
                                                         it == 0);
      }
    }
    costs = total;  // Eq. 3.7, kept up to date by the sweeps
  } else {
    at::Tensor old_messages = empty_buffer({D, N, L}, theta.options());
    at::Tensor messages = empty_buffer({D, N, L}, theta.options());
    at::Tensor total = empty_buffer(theta.sizes(), theta.options()), total_rows = total.view({N, L});
    if (Sweeps::kReadsUnwritten) old_messages.zero_();
    for (int64_t it = 0; it < n_iterations; ++it) {
      if (it == 0 && !Sweeps::kReadsUnwritten) {
        total_rows.copy_(theta.view({N, L}));  // no messages yet
      } else {
        Sweeps::template add_messages<scalar_t>(old_messages, theta, total);
      }
      for (int64_t r = 0; r < D; r += 2) {
        Sweeps::template forward_pair<scalar_t, index_t>(grid, method, r, nullptr, total.mutable_data_ptr<scalar_t>(),
                                                         old_messages.const_data_ptr<scalar_t>(),
                                                         messages.mutable_data_ptr<scalar_t>(), nullptr, indices(it),
                                                         it == 0);
      }
      std::swap(old_messages, messages);  // Alg. 1 line 12
    }
    Sweeps::template add_messages<scalar_t>(old_messages, theta, total);  // Eq. 3.7
    costs = total;
  }
  return {transposed_copy<scalar_t>(costs, B, H * W, n_labels, L, H * W, {B, n_labels, H, W}), p, q};
}

// Reverse-mode replay of forward_kernel from the stored indices (Alg. 3-4). kind is the forward's pairwise kind (the
// CPU scatters a Potts message in one pass). Gradients that are not needed
// (pairwise_grad / weights_grad false) are not computed: state.grad_v / grad_weights are nullptr, and the returned
// tensors stay zeros.
template <typename Sweeps, typename scalar_t, typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad_costs,
                                                               const at::Tensor& pairwise,
                                                               const at::Tensor& edge_weights, const at::Tensor& p,
                                                               const at::Tensor& q, Method method,
                                                               int64_t n_directions, int64_t n_iterations,
                                                               int64_t kind, bool pairwise_grad, bool weights_grad) {
  const int64_t B = grad_costs.size(0), n_labels = grad_costs.size(1), H = grad_costs.size(2), W = grad_costs.size(3);
  const int64_t N = B * H * W, D = n_directions, K = D / 2, L = label_stride<Sweeps, scalar_t>(n_labels, kind);
  const at::Tensor g = transposed_copy<scalar_t>(grad_costs, B, n_labels, H * W, H * W, L, {B, H, W, L});
  const at::Tensor v = padded_pairwise(pairwise, L), v_t = v.t().contiguous();
  const at::Tensor weights = edge_weights.contiguous();
  const int64_t R = index_row<index_t>(kind, n_labels);
  const Grid<scalar_t> grid{B, H, W, L, D, weights.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                            v_t.const_data_ptr<scalar_t>(), kind, R};
  at::Tensor grad_weights = at::zeros_like(weights);
  // (accumulators, 2, L, L) only where V needs a gradient: at thousands of labels it is hundreds of MiB
  at::Tensor grad_v =
      pairwise_grad ? at::zeros({Sweeps::accumulators(L), 2, L, L}, g.options()) : at::Tensor();
  const index_t* p_data = p.const_data_ptr<index_t>();
  const index_t* q_data = q.const_data_ptr<index_t>();
  auto run = [&](int64_t it, int64_t r_first, BackwardState<scalar_t> state) {
    Sweeps::template backward_pair<scalar_t, index_t>(
        grid, method, r_first, state, SweepIndices<const index_t>{p_data + it * D * N * R, q_data + it * D * N});
  };
  BackwardState<scalar_t> state{nullptr, nullptr, nullptr,
                                weights_grad ? grad_weights.mutable_data_ptr<scalar_t>() : nullptr,
                                pairwise_grad ? grad_v.mutable_data_ptr<scalar_t>() : nullptr};
  at::Tensor grad_unary;
  if (method == kTRWP) {
    // Message m^d has gradient C + E[d]; C is also theta's. Sweeps run in reverse order (Alg. 4).
    at::Tensor common = g, extra = empty_buffer({D, N, L}, g.options());
    if (Sweeps::kReadsUnwritten) extra.zero_();
    state.common = common.mutable_data_ptr<scalar_t>();
    state.extra = extra.mutable_data_ptr<scalar_t>();
    for (int64_t it = n_iterations - 1; it >= 0; --it) {
      state.first_replay = it == n_iterations - 1;
      state.last_replay = it == 0;
      for (int64_t r = D - 1; r >= 0; r -= 2) run(it, r, state);
    }
    grad_unary = common;
  } else if (method == kISGMR) {
    // m^{2k} and m^{2k+1} share one gradient G[k] (Alg. 3): g at the first replay, then sum_{k' != k} P[k'] of the
    // replay before. With two pairs (4 directions) that is P[k ^ 1], read where the replay before left it: two
    // pending buffers alternate and no G is written.
    TORCH_CHECK(K <= kMaxPairs, "message_passing: at most ", 2 * kMaxPairs, " directions");
    at::Tensor pending = empty_buffer({K, N, L}, g.options());
    at::Tensor spare = K == 2 ? empty_buffer({K, N, L}, g.options()) : at::Tensor();
    at::Tensor pair_grads = K == 2 ? at::Tensor() : empty_buffer({K, N, L}, g.options());
    grad_unary = g;  // read as every G[k] at the first replay, updated after it
    for (int64_t k = 0; k < K; ++k) state.pair_grad[k] = g.const_data_ptr<scalar_t>();
    for (int64_t it = n_iterations - 1; it >= 0; --it) {
      if (Sweeps::kAccumulatesPending) pending.zero_();
      state.pending = pending.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < D; r += 2) run(it, r, state);
      // sum_k P[k] is the gradient of theta + the sum of all previous messages
      Sweeps::template isgmr_combine<scalar_t>(pending, pair_grads, grad_unary.view({N, L}));
      for (int64_t k = 0; k < K; ++k) {
        state.pair_grad[k] = K == 2 ? pending.const_data_ptr<scalar_t>() + (k ^ 1) * N * L
                                    : pair_grads.const_data_ptr<scalar_t>() + k * N * L;
      }
      if (K == 2) std::swap(pending, spare);
    }
  } else {
    at::Tensor current = g;
    for (int64_t it = n_iterations - 1; it >= 0; --it) {
      at::Tensor previous = empty_buffer(current.sizes(), current.options()).zero_();
      state.common = current.mutable_data_ptr<scalar_t>();
      state.extra = previous.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < D; r += 2) run(it, r, state);
      current = previous;
    }
    grad_unary = current;
  }
  at::Tensor grad_pairwise;
  if (pairwise_grad) {
    const at::Tensor v_sums = grad_v.sum(0);
    grad_pairwise = v_sums[0] + v_sums[1].t();
    if (L != n_labels) grad_pairwise = grad_pairwise.narrow(0, 0, n_labels).narrow(1, 0, n_labels).contiguous();
  } else {
    grad_pairwise = at::zeros({n_labels, n_labels}, g.options());
  }
  return {transposed_copy<scalar_t>(grad_unary, B, H * W, n_labels, L, H * W, {B, n_labels, H, W}), grad_pairwise,
          grad_weights};
}

template <typename F>
void dispatch_index(const at::ScalarType index_type, const F& fn) {
  switch (index_type) {
    case at::kByte:
      fn(uint8_t{});
      break;
    case at::kShort:
      fn(int16_t{});
      break;
    case at::kInt:
      fn(int32_t{});
      break;
    default:
      TORCH_CHECK(false, "message_passing: unsupported index dtype ", index_type);
  }
}

inline at::ScalarType index_type_for(int64_t n_labels) {
  if (n_labels <= 256) return at::kByte;
  return n_labels <= 32768 ? at::kShort : at::kInt;
}

inline void check_inputs(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& edge_weights,
                  int64_t method, int64_t n_directions, int64_t n_iterations, int64_t pairwise_kind) {
  TORCH_CHECK(unary.dim() == 4 && unary.size(1) >= 2, "message_passing: unary must be (B, L, H, W), L >= 2");
  TORCH_CHECK(pairwise.dim() == 2 && pairwise.size(0) == unary.size(1) && pairwise.size(1) == unary.size(1),
              "message_passing: pairwise must be (L, L)");
  TORCH_CHECK(n_directions == 4 || n_directions == 8 || n_directions == 16,
              "message_passing: n_directions must be 4, 8 or 16");
  TORCH_CHECK(edge_weights.dim() == 4 && edge_weights.size(0) == unary.size(0) &&
                  edge_weights.size(1) == n_directions / 2 && edge_weights.size(2) == unary.size(2) &&
                  edge_weights.size(3) == unary.size(3),
              "message_passing: edge_weights must be (B, D/2, H, W)");
  TORCH_CHECK(pairwise.scalar_type() == unary.scalar_type() && edge_weights.scalar_type() == unary.scalar_type(),
              "message_passing: unary, pairwise and edge_weights must share a dtype");
  TORCH_CHECK(pairwise.device() == unary.device() && edge_weights.device() == unary.device(),
              "message_passing: unary, pairwise and edge_weights must be on one device");
  TORCH_CHECK(method >= kISGMR && method <= kSGM, "message_passing: unknown method ", method);
  TORCH_CHECK(n_iterations >= 1, "message_passing: n_iterations must be >= 1");
  TORCH_CHECK(pairwise_kind >= kGeneral && pairwise_kind <= kTruncatedQuadratic, "message_passing: unknown kind");
}

template <typename Sweeps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> message_passing_forward(const at::Tensor& unary,
                                                                   const at::Tensor& pairwise,
                                                                   const at::Tensor& edge_weights, int64_t method,
                                                                   int64_t n_directions, int64_t n_iterations,
                                                                   int64_t pairwise_kind) {
  check_inputs(unary, pairwise, edge_weights, method, n_directions, n_iterations, pairwise_kind);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "message_passing", [&] {
    dispatch_index(index_type_for(unary.size(1)), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      result = forward_kernel<Sweeps, scalar_t, index_t>(unary, pairwise, edge_weights, static_cast<Method>(method),
                                                 n_directions, n_iterations, pairwise_kind);
    });
  });
  return result;
}

template <typename Sweeps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> message_passing_backward(
    const at::Tensor& grad_costs, const at::Tensor& pairwise, const at::Tensor& edge_weights, const at::Tensor& p,
    const at::Tensor& q, int64_t method, int64_t n_directions, int64_t n_iterations, int64_t pairwise_kind,
    bool pairwise_grad, bool weights_grad) {
  check_inputs(grad_costs, pairwise, edge_weights, method, n_directions, n_iterations, pairwise_kind);
  TORCH_CHECK(p.scalar_type() == index_type_for(grad_costs.size(1)) && p.scalar_type() == q.scalar_type(),
              "message_passing_backward: index dtype does not match the label count");
  TORCH_CHECK(p.is_contiguous() && q.is_contiguous(), "message_passing_backward: indices must be contiguous");
  const std::vector<int64_t> q_sizes{n_iterations, n_directions, grad_costs.size(0), grad_costs.size(2),
                                     grad_costs.size(3)};
  std::vector<int64_t> p_sizes = q_sizes;
  dispatch_index(p.scalar_type(), [&](auto index_tag) {
    p_sizes.push_back(index_row<decltype(index_tag)>(pairwise_kind, grad_costs.size(1)));
  });
  TORCH_CHECK(p.sizes() == at::IntArrayRef(p_sizes) && q.sizes() == at::IntArrayRef(q_sizes),
              "message_passing_backward: p must be (I, D, B, H, W, R) and q (I, D, B, H, W) of the forward (R = L, ",
              "or for Potts the bits of the labels that keep their sender label and the label the others take)");
  TORCH_CHECK(p.device() == grad_costs.device() && q.device() == grad_costs.device(),
              "message_passing_backward: indices must be on the device of grad_costs");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(grad_costs.scalar_type(), "message_passing_backward", [&] {
    dispatch_index(p.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      result = backward_kernel<Sweeps, scalar_t, index_t>(grad_costs, pairwise, edge_weights, p, q,
                                                  static_cast<Method>(method), n_directions, n_iterations,
                                                  pairwise_kind, pairwise_grad, weights_grad);
    });
  });
  return result;
}

}  // namespace message_passing
}  // namespace app
