// Body of the CPU sweeps (thesis Alg. 1-4), included by cpu.cpp once per instruction set, each time inside its
// own namespace (the baseline x86-64 / non-x86 build and an AVX2 variant selected at run time). No include guard
// on purpose; cpu.cpp includes the standard and ATen headers this body needs before it.
//
// OpenMP (at::parallel_for) over the independent scanlines of a direction, label loops contiguous and vectorised
// (messages are stored labels-last, (B, H, W, L)). Scanlines that cross image rows are processed in lockstep, a
// block of neighbouring scanlines row by row, so that every step reads and writes one contiguous run of pixels
// (no strided walks). The forward stores the argmin indices p (per message label) and q (per message) of every
// sweep; the backward replays them in reverse and needs no other forward state (Sec. 3.7.4).

constexpr int64_t kBlockPixels = 16;  // pixels of one image row that one task handles per step (lockstep mode)

inline int64_t ceil_div(int64_t a, int64_t d) { return a >= 0 ? (a + d - 1) / d : -((-a) / d); }

// A run of one sweep: the pixels (y, x), x = x0, x0 + x_step, ... (count of them) in visiting order, of image b. The
// predecessor of (y, x) (the message's sender) is (y - sy, x - sx), in the image for x in [pred_lo, pred_hi); the
// successor (y + sy, x + sx) for x in [succ_lo, succ_hi). The t-th pixel has the scratch slot slot0 + t slot_step and
// the phase `phase`, or t & 1 where the phase alternates along the run (see scan_pair).
struct ScanRun {
  int64_t b, y, width, x0, x_step, count, sy, sx;
  int64_t pred_lo, pred_hi, succ_lo, succ_hi;
  int64_t slot0, slot_step, phase;
  bool alternating;
  int64_t y_step;  // 1 for a column of a block of rows (scan_pair's row_blocks; sy = 0 there), else 0

  ScanRun(int64_t b, int64_t y, int64_t x0, int64_t x_step, int64_t count, int64_t sy, int64_t sx, int64_t height,
          int64_t width, int64_t slot0, int64_t slot_step, int64_t phase, bool alternating, int64_t y_step = 0)
      : b(b), y(y), width(width), x0(x0), x_step(x_step), count(count), sy(sy), sx(sx),
        pred_lo(std::max<int64_t>(0, sx)),
        pred_hi(y - sy >= 0 && y - sy < height ? std::min(width, width + sx) : 0),
        succ_lo(std::max<int64_t>(0, -sx)),
        succ_hi(y + sy >= 0 && y + sy < height ? std::min(width, width - sx) : 0),
        slot0(slot0), slot_step(slot_step), phase(phase), alternating(alternating), y_step(y_step) {}
  int64_t x(int64_t t) const { return x0 + t * x_step; }
  int64_t pixel(int64_t t) const { return (y + t * y_step) * width + x(t); }
  bool has_predecessor(int64_t t) const { return x(t) >= pred_lo && x(t) < pred_hi; }
  int64_t predecessor(int64_t t) const { return has_predecessor(t) ? pixel(t) - sy * width - sx : -1; }
  bool has_successor(int64_t t) const { return x(t) >= succ_lo && x(t) < succ_hi; }
  int64_t slot(int64_t t) const { return slot0 + t * slot_step; }
  int64_t phase_of(int64_t t) const { return alternating ? t & 1 : phase; }
};

// A run visitor from a per-pixel one: visit(b, pixel, predecessor, has_successor, slot, phase) for each pixel of the
// run in order (in-image indices y W + x, predecessor -1 at a scanline's first node).
template <typename Visit>
struct PixelVisits {
  Visit visit;
  void run(const ScanRun& s) {
    for (int64_t t = 0; t < s.count; ++t) {
      pixel(s.b, s.pixel(t), s.predecessor(t), s.has_successor(t), s.slot(t), s.phase_of(t));
    }
  }
  // A call per pixel: inlined into run's loop, GCC's code for the forward's visitor took more instructions.
  __attribute__((noinline)) void pixel(int64_t b, int64_t in_image, int64_t predecessor, bool has_successor,
                                       int64_t slot, int64_t phase) {
    visit(b, in_image, predecessor, has_successor, slot, phase);
  }
};
template <typename Visit>
PixelVisits(Visit) -> PixelVisits<Visit>;

// Runs the sweeps of the opposite directions r_first and r_first ^ 1 (Alg. 1-2 lines 3-11): each parallel task
// takes a set of scanlines (shared by both directions) and sweeps it in direction r_first, then in
// r_first ^ 1, while its pixels are still in cache. Exact: a sweep reads and writes only the pixels of its own
// scanline, which no other task touches. Scanlines are visited predecessors first (successors first when
// reverse, for the backward). make_visitor(r) is called once per parallel chunk and direction and returns an object
// whose run(ScanRun) visits a run's pixels in order; each pixel has a scratch slot in [0, 2 kBlockPixels), constant
// along a scanline and distinct between the scanlines a task interleaves (per-scanline scratch state), and a phase
// that alternates between 0 and 1 along a scanline (double-buffered per-scanline state).
//
// Horizontal steps: one task and one run per image row; with row_blocks (and enough rows for the threads), a task
// takes kBlockPixels rows and visits them column by column (lockstep), each column one run, so that a scanline's next
// pixel does not wait on the stores of the one before (ISGMR's backward: 13-16% faster at 256x512; the forwards and
// TRWP's backward slower). Other steps (dy, dx), |dy| in {1, 2}: the scanlines are the sets of constant key
// k = x ay - y ax with (ay, ax) = +-(dy, dx), ay > 0; a task takes a block of consecutive keys and visits them row by
// row (lockstep), each row's members being one run of contiguous x.
template <typename scalar_t, typename MakeVisitor>
void scan_pair(const Grid<scalar_t>& grid, int64_t r_first, bool reverse, const MakeVisitor& make_visitor,
               bool row_blocks = false) {
  int64_t dy, dx;
  direction_step(r_first, dy, dx);
  const int64_t H = grid.height, W = grid.width, B = grid.batch;
  // n_tasks parallel tasks; each parallel chunk makes its two visitors once, and sweep(visitor, task, sign) sweeps
  // the task's scanlines in direction r_first (sign 1), then r_first ^ 1 (sign -1)
  auto run_tasks = [&](int64_t n_tasks, const auto& sweep) {
    at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
      auto first = make_visitor(r_first);
      auto second = make_visitor(r_first ^ 1);
      for (int64_t task = begin; task < end; ++task) {
        sweep(first, task, 1);
        sweep(second, task, -1);
      }
    });
  };
  // (blocks of rows only where they leave every thread two tasks or more; fewer rows run row by row)
  const int64_t n_row_blocks = ceil_div(H, kBlockPixels);
  if (dy == 0 && row_blocks && B * n_row_blocks >= 2 * at::get_num_threads()) {
    run_tasks(B * n_row_blocks, [&](auto& visitor, int64_t task, int64_t sign) {
      const int64_t b = task / n_row_blocks, y0 = task % n_row_blocks * kBlockPixels, step = sign * dx;
      const bool ascending = (step > 0) != reverse;
      const int64_t rows = std::min(kBlockPixels, H - y0);
      for (int64_t j = 0; j < W; ++j) {
        visitor.run(ScanRun(b, y0, ascending ? j : W - 1 - j, 0, rows, 0, step, H, W, 0, 1, j & 1, false, 1));
      }
    });
    return;
  }
  if (dy == 0) {
    run_tasks(B * H, [&](auto& visitor, int64_t task, int64_t sign) {
      const int64_t step = sign * dx;
      const bool ascending = (step > 0) != reverse;
      visitor.run(ScanRun(task / H, task % H, ascending ? 0 : W - 1, ascending ? 1 : -1, W, 0, step, H, W, 0, 0, 0,
                          true));
    });
    return;
  }
  const int64_t ay = dy > 0 ? dy : -dy, ax = dy > 0 ? dx : -dx;
  const int64_t key_lo = std::min<int64_t>(0, -(H - 1) * ax);
  const int64_t key_hi = (W - 1) * ay + std::max<int64_t>(0, -(H - 1) * ax) + 1;
  const int64_t span = kBlockPixels * ay, n_blocks = ceil_div(key_hi - key_lo, span);
  run_tasks(B * n_blocks, [&](auto& visitor, int64_t task, int64_t sign) {
    const int64_t b = task / n_blocks, key0 = key_lo + (task % n_blocks) * span, sy = sign * dy, sx = sign * dx;
    const bool descending = (sy < 0) != reverse;
    for (int64_t s = 0; s < H; ++s) {
      const int64_t y = descending ? H - 1 - s : s;
      const int64_t x_begin = std::max<int64_t>(0, ceil_div(key0 + y * ax, ay));
      const int64_t x_end = std::min<int64_t>(W, ceil_div(key0 + span + y * ax, ay));
      if (x_begin < x_end) {
        visitor.run(ScanRun(b, y, x_begin, 1, x_end - x_begin, sy, sx, H, W, x_begin * ay - y * ax - key0, ay,
                            (s / ay) & 1, false));
      }
    }
  });
}

// ---- Label vectors: kCount labels per operation (one AVX2 register, two SSE2 registers in the baseline build),
// written with GCC vector extensions so that both builds share the code and sum in the same order (bitwise equal
// results; the uint8 index widening uses SSE2 / AVX2 intrinsics, as GCC scalarises that vector conversion).
// Partial vectors (the last count < kCount labels) load `fill` past count.
#if !defined(APP_SWEEPS_AVX2)
template <typename Element>
struct HalfVector {  // 16 bytes of Element, half a label vector
  typedef Element type __attribute__((vector_size(16)));
};
#endif

template <typename scalar_t>
struct Lanes {
  static constexpr int32_t kCount = static_cast<int32_t>(32 / sizeof(scalar_t));
  static_assert(kCount == 8 || kCount == 4, "float or double lanes");
  using Int = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  typedef scalar_t Values __attribute__((vector_size(32)));
  typedef Int Mask __attribute__((vector_size(32)));  // comparison results: -1 (true) or 0 per lane

  static Mask labels(int32_t first) {  // first, first + 1, ...
    if constexpr (kCount == 8) {
      return Mask{0, 1, 2, 3, 4, 5, 6, 7} + first;
    } else {
      return Mask{0, 1, 2, 3} + first;
    }
  }
  // memcpy of count <= kCount elements of T, each count a copy of constant size: GCC inlines those, while a copy of
  // run-time size is a library call, which took a tenth of the time of messages with fewer labels than a vector.
  template <typename T, int... K>
  static void copy_elements(void* dst, const void* src, int32_t count, std::integer_sequence<int, K...>) {
    ((count == K + 1 ? (std::memcpy(dst, src, (K + 1) * sizeof(T)), 0) : 0), ...);
  }
  template <typename T>
  static void copy_elements(void* dst, const void* src, int32_t count) {
    copy_elements<T>(dst, src, count, std::make_integer_sequence<int, kCount>{});
  }
  template <typename T, typename V>
  static V load(const T* src, int32_t count) {
    V v{};
    copy_elements<T>(&v, src, count);
    return v;
  }
  static Values values(const scalar_t* src, int32_t count, scalar_t fill = 0) {
#if defined(APP_SWEEPS_AVX2)
    if (count < kCount) {  // a masked load: a copy into the filled vector would stall its reload (two stores)
      const Mask inside = labels(0) < count;
      Values v;
      if constexpr (kCount == 8) {
        v = reinterpret_cast<Values>(_mm256_maskload_ps(src, reinterpret_cast<__m256i>(inside)));
      } else {
        v = reinterpret_cast<Values>(_mm256_maskload_pd(src, reinterpret_cast<__m256i>(inside)));
      }
      return inside ? v : Values{} + fill;
    }
#endif
    Values v = splat(fill);
    copy_elements<scalar_t>(&v, src, count);
    return v;
  }
  template <typename index_t>
  static Mask indices(const index_t* src, int32_t count) {
#if defined(__SSE2__)
    if constexpr (sizeof(index_t) == 1 && kCount == 8) {
      if (count == kCount) return widen_bytes(reinterpret_cast<const uint8_t*>(src));
#if defined(APP_SWEEPS_AVX2)
      uint64_t bytes = 0;  // assembled in a register: a partly copied vector's reload would stall
      const uint8_t* first = reinterpret_cast<const uint8_t*>(src);
      for (int32_t k = 0; k < count; ++k) bytes |= static_cast<uint64_t>(first[k]) << (8 * k);
      return reinterpret_cast<Mask>(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bytes))));
#endif
    }
#endif
#if defined(APP_SWEEPS_AVX2)
    if constexpr (std::is_same_v<index_t, int32_t> && kCount == 8) {
      if (count < kCount) {
        return reinterpret_cast<Mask>(_mm256_maskload_epi32(src, reinterpret_cast<__m256i>(labels(0) < count)));
      }
    }
#endif
    typedef index_t Packed __attribute__((vector_size(kCount * sizeof(index_t))));
    return __builtin_convertvector((load<index_t, Packed>(src, count)), Mask);
  }
#if defined(__SSE2__)
  // 8 uint8 labels zero-extended to int32 lanes (__builtin_convertvector of bytes compiles to a shift, extract
  // and insert per lane).
  static Mask widen_bytes(const uint8_t* src) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
#if defined(APP_SWEEPS_AVX2)
    return reinterpret_cast<Mask>(_mm256_cvtepu8_epi32(bytes));
#else
    typedef int32_t Half __attribute__((vector_size(16)));
    const __m128i zero = _mm_setzero_si128(), words = _mm_unpacklo_epi8(bytes, zero);
    const Half low = reinterpret_cast<Half>(_mm_unpacklo_epi16(words, zero));
    const Half high = reinterpret_cast<Half>(_mm_unpackhi_epi16(words, zero));
    return __builtin_shufflevector(low, high, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
  }
#endif
  // Bit k = lane k of a comparison result.
  static uint32_t bits(const Mask& m) {
#if defined(APP_SWEEPS_AVX2)
    if constexpr (kCount == 8) {
      return static_cast<uint32_t>(_mm256_movemask_ps(reinterpret_cast<__m256>(m)));
    } else {
      return static_cast<uint32_t>(_mm256_movemask_pd(reinterpret_cast<__m256d>(m)));
    }
#elif defined(__SSE2__)
    const auto parts = halves(m);
    if constexpr (kCount == 8) {
      return static_cast<uint32_t>(_mm_movemask_ps(reinterpret_cast<__m128>(parts.low)) |
                                   _mm_movemask_ps(reinterpret_cast<__m128>(parts.high)) << 4);
    } else {
      return static_cast<uint32_t>(_mm_movemask_pd(reinterpret_cast<__m128d>(parts.low)) |
                                   _mm_movemask_pd(reinterpret_cast<__m128d>(parts.high)) << 2);
    }
#else
    uint32_t result = 0;
    for (int32_t k = 0; k < kCount; ++k) result |= static_cast<uint32_t>(m[k] != 0) << k;
    return result;
#endif
  }
  // Lane k true where bit first + k of the little-endian bit string `bytes` is set (first a multiple of kCount).
  static Mask from_bits(const uint8_t* bytes, int32_t first) {
    const uint32_t bit = static_cast<uint32_t>(first);
    const Mask lane_bits = (Mask{} + 1) << labels(0);
#if defined(APP_SWEEPS_AVX2)
    if constexpr (kCount == 8) {  // the byte broadcast from memory to every byte: lane k tests bit k of its low byte
      const Mask word = reinterpret_cast<Mask>(_mm256_set1_epi8(static_cast<char>(bytes[bit / 8])));
      return equal(word & lane_bits, lane_bits);
    }
#endif
    const Int word = kCount == 8 ? bytes[bit / 8] : bytes[bit / 8] >> (bit % 8);
    return equal((Mask{} + word) & lane_bits, lane_bits);
  }
  static void store(scalar_t* dst, const Values& v, int32_t count) { copy_elements<scalar_t>(dst, &v, count); }
  template <typename index_t>
  static void store_indices(index_t* dst, const Mask& m, int32_t count) {  // m's lanes hold labels that fit index_t
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the low part of a lane is its first index_t");
    typedef index_t Parts __attribute__((vector_size(32)));
    const auto packed = low_parts<sizeof(Int) / sizeof(index_t)>(reinterpret_cast<Parts>(m),
                                                                 std::make_integer_sequence<int, kCount>{});
    copy_elements<index_t>(dst, &packed, count);
  }
  template <int kRatio, typename Parts, int... K>
  static auto low_parts(const Parts& parts, std::integer_sequence<int, K...>) {
    return __builtin_shufflevector(parts, parts, (K * kRatio)...);
  }
  static Values select(const Mask& m, const Values& v) { return reinterpret_cast<Values>(m & reinterpret_cast<Mask>(v)); }
  // Lane-wise comparisons and choice, T Values or Mask (exact, so both copies' results stay bitwise the same), and
  // 0 + x in every lane.
#if defined(APP_SWEEPS_AVX2)
  static Values splat(scalar_t x) { return Values{} + x; }
  template <typename T>
  static Mask less(const T& a, const T& b) { return a < b; }
  template <typename T>
  static Mask equal(const T& a, const T& b) { return a == b; }
  template <typename T>
  static T blend(const Mask& m, const T& a, const T& b) { return m ? a : b; }
#else
  // Without 32-byte registers (the baseline x86-64 copy, SSE2; NEON) GCC 12 lowers these operators on 32-byte
  // vectors lane by lane through scalar registers (the backward took 5.6x the AVX2 copy's instructions); on the two
  // 16-byte halves each is one instruction per half. The splat too: GCC stored a 32-byte one lane by lane and
  // reloaded it whole, a store-forwarding stall.
  static Values splat(scalar_t x) {
    using Half = typename HalfVector<scalar_t>::type;
    return joined<Values>(Half{} + x, Half{} + x);
  }
  template <typename T>
  static Mask less(const T& a, const T& b) {
    const auto x = halves(a), y = halves(b);
    return joined<Mask>(x.low < y.low, x.high < y.high);
  }
  template <typename T>
  static Mask equal(const T& a, const T& b) {
    const auto x = halves(a), y = halves(b);
    return joined<Mask>(x.low == y.low, x.high == y.high);
  }
  template <typename T>
  static T blend(const Mask& m, const T& a, const T& b) {
    const auto k = halves(m);  // (one declaration each: the halves of a Mask and of Values differ in type)
    const auto x = halves(a), y = halves(b);
    return joined<T>(k.low ? x.low : y.low, k.high ? x.high : y.high);
  }
  template <typename T>
  static auto halves(const T& v) {
    // (the half's type from the lane type: GCC 12 took std::is_same_v<T, Values> as false here, comparing floats as
    // integers)
    using Half = typename HalfVector<std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>>::type;
    struct {
      Half low, high;
    } parts;
    std::memcpy(&parts, &v, sizeof(v));
    return parts;
  }
  template <typename T, typename Half>
  static T joined(const Half& low, const Half& high) {
    const Half parts[2] = {low, high};
    T v;
    std::memcpy(&v, parts, sizeof(v));
    return v;
  }
#endif
  // op folded over the lanes, as a tree of shuffles (no lane is read by a run-time index, which made GCC keep the
  // accumulators in memory); op takes two vectors of the copy's register width. The baseline copy starts from the
  // two halves, which is the AVX2 copy's first step: lane 0 sees the same operations in both.
  template <typename T, typename Op>
  static auto fold(const T& lanes, const Op& op) {
#if defined(APP_SWEEPS_AVX2)
    T v = lanes;
    if constexpr (kCount == 8) {
      v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
      v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
      v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
    } else {
      v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
      v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
    }
#else
    const auto parts = halves(lanes);
    auto v = op(parts.low, parts.high);
    if constexpr (kCount == 8) {
      v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
      v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
    } else {
      v = op(v, __builtin_shufflevector(v, v, 1, 0));
    }
#endif
    return v[0];
  }
  template <typename T>
  static auto total(const T& v) {
    return fold(v, [](const auto& a, const auto& b) { return a + b; });
  }
  template <typename T>
  static auto lowest(const T& v) {
    return fold(v, [](const auto& a, const auto& b) { return a < b ? a : b; });
  }
};

// Calls body(l, count) for the label chunks [l, l + count) of n labels, count = kCount but for the last. l is 64-bit
// so that the chunk's loads and stores address pointer + l directly (an int32 is sign-extended and added per pointer).
template <typename scalar_t, typename Body>
inline void for_label_chunks(int32_t n, const Body& body) {
  constexpr int32_t kCount = Lanes<scalar_t>::kCount;
  int64_t l = 0;
  for (; l + kCount <= n; l += kCount) body(l, kCount);
  if (l < n) body(l, static_cast<int32_t>(n - l));
}

// (min_l a(l), the first l with a(l) at that minimum), in one pass over the labels: each lane keeps its minimum and
// the first label that reached it (strict comparisons, lanes start at +inf), then the lanes are folded. add() takes
// the label chunks in order (lanes past n_labels must hold +inf).
template <typename scalar_t>
struct LowestLabel {
  scalar_t value;
  int32_t label;
};

template <typename scalar_t>
struct RunningLowest {
  using V = Lanes<scalar_t>;
  typename V::Values low = V::splat(std::numeric_limits<scalar_t>::infinity());
  typename V::Mask at{};

  void add(int32_t l, const typename V::Values& x) {
    const typename V::Mask below = V::less(x, low);
    low = V::blend(below, x, low);
    at = V::blend(below, V::labels(l), at);
  }
  LowestLabel<scalar_t> result(int32_t n_labels) const {
    const scalar_t value = V::lowest(low);
    const typename V::Mask at_value = V::equal(low, V::splat(value));
    return {value, static_cast<int32_t>(V::lowest(V::blend(at_value, at, typename V::Mask{} + n_labels)))};
  }
};

template <typename scalar_t>
APP_FLATTEN inline LowestLabel<scalar_t> lowest_label(const scalar_t* a, int64_t n_labels) {
  using V = Lanes<scalar_t>;
  const int32_t n = static_cast<int32_t>(n_labels);
  RunningLowest<scalar_t> lowest;
  for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
    lowest.add(l, V::values(a + l, count, std::numeric_limits<scalar_t>::infinity()));
  });
  return lowest.result(n);
}

// Eq. 3.5: u -= min u, returns the first argmin q (Alg. 1-2 line 10-11).
template <typename scalar_t>
APP_FLATTEN inline int32_t normalise_labels(scalar_t* u, int64_t n_labels) {
  const LowestLabel<scalar_t> lowest = lowest_label(u, n_labels);
  const scalar_t low = lowest.value;  // (no structured binding: clang before 16 cannot capture one)
#pragma omp simd
  for (int64_t l = 0; l < n_labels; ++l) u[l] -= low;
  return lowest.label;
}

// Potts message in one pass over the labels: u(lambda) = min(h(lambda), min h + c) with c = w V(0, 1) >= 0, written to
// m with its argmins p (the Potts row of index_row: the bits [p(l) = l], then m0 = best). Without a receiver, fused
// with Eq. 3.5: m = u - min h, and q (the first argmin of m) is returned without a second pass. With one (SGM,
// Eq. 3.3): m = u + receiver, normalised by a second pass. Same values and argmins (ties to the lower label) as the
// dense min-convolution followed by normalise.
template <typename scalar_t, typename index_t>
APP_FLATTEN inline int32_t potts_message(const scalar_t* h, LowestLabel<scalar_t> h_lowest, int64_t n_labels,
                                         scalar_t jump_cost, const scalar_t* receiver, scalar_t* m, index_t* p) {
  using V = Lanes<scalar_t>;
  using Values = typename V::Values;
  using Mask = typename V::Mask;
  const int32_t n = static_cast<int32_t>(n_labels);
  const scalar_t low = h_lowest.value;
  const int32_t best = h_lowest.label;
  const scalar_t jump = low + jump_cost;
  const int64_t words = potts_index_words<index_t>(n_labels), bit_bytes = words * sizeof(index_t);
  uint8_t* stay_bits = reinterpret_cast<uint8_t*>(p);
  uint64_t group = 0;  // the bits of labels [64 g, 64 g + 64), stored when complete or at the last label
  for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
    const Values h_l = V::values(h + l, count);
    const Mask labels = V::labels(l);
    const Values jumps = V::splat(jump);
    const Mask stay = V::less(h_l, jumps) | (V::equal(h_l, jumps) & V::less(labels, Mask{} + best));
    const Values u = V::blend(stay, h_l, jumps);
    V::store(m + l, receiver == nullptr ? u - low : u + V::values(receiver + l, count), count);
    group |= static_cast<uint64_t>(V::bits((stay | V::equal(labels, Mask{} + best)) & V::less(labels, Mask{} + n)))
             << (l % 64);
    if ((l + count) % 64 == 0 || l + count == n) {
      const int64_t first = l / 64 * 8, length = std::min<int64_t>(8, bit_bytes - first);
      if (length == 8) {
        std::memcpy(stay_bits + first, &group, 8);
      } else {
        for (int64_t k = 0; k < length; ++k) stay_bits[first + k] = static_cast<uint8_t>(group >> (8 * k));
      }
      group = 0;
    }
  });
  p[words] = static_cast<index_t>(best);
  if (receiver != nullptr) return normalise_labels(m, n_labels);
  return jump == low ? 0 : best;
}

// Min-convolution with a narrow band, vectorised over lambda, for the pairwise forms whose matrix is
// V(mu, lambda) = V(0, |mu - lambda|), capped at V(0, L-1) beyond `reach` labels (Potts: reach 0; truncated linear
// and quadratic): u(lambda) is the minimum of h(mu) + w V(0, |mu - lambda|) over the band |mu - lambda| <= reach and
// of h(mu) + w V(0, L-1) over the labels below and above it, which running minima give. The three groups are
// taken in ascending mu with strict comparisons: values and first-index argmins are the dense min-convolution's.
// O(L (2 reach + 1)); used up to the width where it beats the kind's scalar O(L) path in common.h.
template <typename scalar_t>
struct BandedConvolve {
  int64_t reach;  // -1: no band, min_convolve runs
  // h between `reach` infinities on each side; the far groups' minima and their labels per lambda
  std::vector<scalar_t> padded_h, below, above;
  std::vector<int32_t> below_label, above_label;

  // The band of `kind` for its (L, L) matrix v (-1: none, or wider than where it pays; Potts: none, its one-pass
  // potts_message serves every method). The
  // widths (2 reach + 1) where the band stops beating the scalar path were measured at 96 and 256 labels (single
  // thread, 64x128, TRWP-4, 5 iterations): the truncated linear distance transform took 0.22 / 0.59 s at any
  // reach, the band 0.17 / 0.51 s at width 65 and 0.23 / 0.66 s at 97; the truncated quadratic's envelope
  // 0.36 / 1.0 s, the band 0.30 / 0.85 s at 129 and 0.41 / 1.17 s at 193.
  static int64_t reach_for(int64_t kind, const scalar_t* v, int64_t n_labels) {
    const int64_t max_width = kind == kTruncatedLinear      ? 65
                              : kind == kTruncatedQuadratic ? 129
                                                            : 0;
    int64_t reach = n_labels - 1;  // the last d with V(0, d) below the cap
    while (reach > 0 && v[reach] == v[n_labels - 1]) --reach;
    return 2 * reach + 1 <= max_width ? reach : -1;
  }
  BandedConvolve(int64_t n_labels, int64_t reach)
      : reach(reach),
        padded_h(reach < 0 ? 0 : n_labels + 2 * reach, std::numeric_limits<scalar_t>::infinity()),
        below(reach < 0 ? 0 : n_labels),
        above(reach < 0 ? 0 : n_labels),
        below_label(reach < 0 ? 0 : n_labels),
        above_label(reach < 0 ? 0 : n_labels) {}

  // u(lambda) and its argmin arg(lambda) for the sender costs h, edge weight w and V_r = v_r.
  APP_FLATTEN void run(const scalar_t* h, int64_t n_labels, scalar_t w, const scalar_t* v_r, scalar_t* u,
                       int32_t* arg) {
    using V = Lanes<scalar_t>;
    using Values = typename V::Values;
    using Mask = typename V::Mask;
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity(), far_cost = w * v_r[n_labels - 1];
    std::copy(h, h + n_labels, padded_h.begin() + reach);
    scalar_t low = inf;  // below[l]: min over mu < l - reach, first label
    int32_t low_label = 0;
    for (int64_t l = 0; l < n_labels; ++l) {
      const int64_t mu = l - reach - 1;
      if (mu >= 0 && h[mu] + far_cost < low) {
        low = h[mu] + far_cost;
        low_label = static_cast<int32_t>(mu);
      }
      below[l] = low;
      below_label[l] = low_label;
    }
    low = inf;  // above[l]: min over mu > l + reach, first label (<= from the right keeps the lowest)
    low_label = 0;
    for (int64_t l = n_labels - 1; l >= 0; --l) {
      const int64_t mu = l + reach + 1;
      if (mu < n_labels && h[mu] + far_cost <= low) {
        low = h[mu] + far_cost;
        low_label = static_cast<int32_t>(mu);
      }
      above[l] = low;
      above_label[l] = low_label;
    }
    for_label_chunks<scalar_t>(static_cast<int32_t>(n_labels), [&](int64_t l, int32_t count) {
      Values best = V::values(below.data() + l, count, inf);
      Mask label = V::template indices<int32_t>(below_label.data() + l, count);
      auto take = [&](const Values& cost, const Mask& from) {
        const Mask lower = V::less(cost, best);
        best = V::blend(lower, cost, best);
        label = V::blend(lower, from, label);
      };
      for (int64_t d = -reach; d <= reach; ++d) {
        const scalar_t step_cost = w * v_r[d < 0 ? -d : d];
        take(V::values(padded_h.data() + reach + l + d, count, inf) + step_cost,
             V::labels(l) + static_cast<typename V::Int>(d));
      }
      take(V::values(above.data() + l, count, inf), V::template indices<int32_t>(above_label.data() + l, count));
      V::store(u + l, best, count);
      V::template store_indices<int32_t>(arg + l, label, count);
    });
  }
};

// Forward of one message at pixel i from the sender costs h of its predecessor (Alg. 1-2 lines 7-11):
// u = min-convolution (+ receiver), normalised in place; p and q stored. h_lowest: h's lowest_label where the caller
// took it while computing h (nullptr: taken here, where the kind needs it).
template <typename scalar_t, typename index_t>
void compute_message(const Grid<scalar_t>& grid, int64_t r, const scalar_t* h, const LowestLabel<scalar_t>* h_lowest,
                     scalar_t w, const scalar_t* receiver, scalar_t* u, ConvolveScratch& scratch,
                     BandedConvolve<scalar_t>& banded, index_t* p, index_t* q) {
  const int64_t n_labels = grid.n_labels;
  if (grid.kind == kPotts) {
    const LowestLabel<scalar_t> lowest = h_lowest != nullptr ? *h_lowest : lowest_label(h, n_labels);
    *q = static_cast<index_t>(potts_message(h, lowest, n_labels, w * grid.v_r(r)[1], receiver, u, p));
    return;
  }
  if (banded.reach >= 0) {
    banded.run(h, n_labels, w, grid.v_r(r), u, scratch.arg.data());
  } else {
    min_convolve(grid.kind, h, n_labels, w, grid.v_r(r), u, scratch);
  }
  if (receiver != nullptr) {
#pragma omp simd
    for (int64_t l = 0; l < n_labels; ++l) u[l] += receiver[l];
  }
  *q = static_cast<index_t>(normalise_labels(u, n_labels));
  for (int64_t l = 0; l < n_labels; ++l) p[l] = static_cast<index_t>(scratch.arg[l]);
}

// Forward sweeps of the directions r_first and r_first ^ 1 (Alg. 1-2 lines 3-11; SGM Eq. 3.3). In the first iteration
// (first_iteration) the messages are zero and their buffers unwritten: TRWP's own and opposite messages and ISGMR's
// old ones are taken as zero until a sweep writes them.
template <typename scalar_t, typename index_t>
void forward_sweeps(const Grid<scalar_t>& grid, Method method, int64_t r_first, const scalar_t* unary,
                    scalar_t* total, const scalar_t* old_messages, scalar_t* messages, scalar_t* out,
                    SweepIndices<index_t> iteration, bool first_iteration) {
  using V = Lanes<scalar_t>;
  using Values = typename V::Values;
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels(), P = grid.pixels();
  const int32_t n = static_cast<int32_t>(L);
  const scalar_t rho = grid.rho(), inf = std::numeric_limits<scalar_t>::infinity();
  const int64_t reach = BandedConvolve<scalar_t>::reach_for(grid.kind, grid.v, L);
  scan_pair(grid, r_first, false, [&](int64_t r) {
    scalar_t* m_r = messages + r * N * L;
    const scalar_t* m_opp = method == kTRWP    ? messages + (r ^ 1) * N * L
                             : method == kISGMR ? old_messages + (r ^ 1) * N * L
                                                : nullptr;
    const scalar_t* old_r = method == kISGMR ? old_messages + r * N * L : nullptr;
    const SweepIndices<index_t> idx{iteration.p + r * N * grid.index_row, iteration.q + r * N};
    const int64_t index_row = grid.index_row;
    // unwritten (zero): in the first iteration TRWP's m^r before this sweep and m^{r-} before the pair's second
    // sweep; ISGMR's old messages
    const bool own_unwritten = first_iteration && method == kTRWP;
    const bool opposite_unwritten = first_iteration && (method == kISGMR || r == r_first);
    // Scalars and pointers by value: the visitor runs once per pixel and a reference capture costs a second load per
    // use. u: TRWP's new message (its old one is still needed); ISGMR and SGM write theirs in place.
    return PixelVisits{[&grid, method, L, P, n, rho, inf, unary, total, out, weights = grid.weights,
            weight_slot = grid.weight_slots(r), index_row, own_unwritten, opposite_unwritten, r, m_r, m_opp, old_r,
            idx, h = std::vector<scalar_t>(L),
            u = std::vector<scalar_t>(method == kTRWP ? L : 0), scratch = ConvolveScratch(L),
            banded = BandedConvolve<scalar_t>(L, reach)](
               int64_t b, int64_t pixel, int64_t predecessor, bool, int64_t,
               int64_t) mutable {
      const int64_t i = b * P + pixel, off = i * L;
      scalar_t* m_i = m_r + off;
      index_t* __restrict__ p_i = idx.p + i * index_row;
      if (predecessor < 0 && method != kSGM) {  // first node: no predecessor, message 0
        std::fill(m_i, m_i + L, scalar_t(0));
        std::fill(p_i, p_i + index_row, index_t(0));
        idx.q[i] = 0;
        return;
      }
      scalar_t* u_i = method == kTRWP ? u.data() : m_i;
      if (predecessor < 0) {  // SGM path start: the normalised unary (Hirschmuller's L_r = C)
        std::copy(unary + off, unary + off + L, u_i);
        std::fill(p_i, p_i + index_row, index_t(0));
        idx.q[i] = static_cast<index_t>(normalise_labels(u_i, L));
      } else {
        const int64_t joff = (b * P + predecessor) * L;
        const scalar_t w = weights[weight_slot(b, predecessor, pixel)];
        scalar_t* __restrict__ h_j = h.data();
        // h's lowest label, taken as h is computed (only Potts uses it; a branch here cost the Potts forward 5%)
        RunningLowest<scalar_t> lowest;
        const Values infinities = V::splat(inf);
        const typename V::Mask label_count = typename V::Mask{} + n;
        auto emit = [&](int32_t l, int32_t count, const Values& h_l) {
          V::store(h_j + l, h_l, count);
          lowest.add(l, V::blend(V::less(V::labels(l), label_count), h_l, infinities));
        };
        const scalar_t* total_j = method == kSGM ? nullptr : total + joff;
        const scalar_t* opp_j = method == kSGM ? nullptr : m_opp + joff;
        if (method == kTRWP) {  // Eq. 3.10: rho (theta_j + sum_d m^d_j) - m^{r-}_j, latest messages
          const Values rho_lanes = V::splat(rho);
          for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
            const Values opp = opposite_unwritten ? Values{} : V::values(opp_j + l, count);
            emit(l, count, rho_lanes * V::values(total_j + l, count) - opp);
          });
        } else if (method == kISGMR) {  // Eq. 3.9: theta_j + m^{r,k+1}_j + sum_{d != r, r-} m^{d,k}_j
          const scalar_t* old_j = old_r + joff;
          const scalar_t* new_j = m_r + joff;
          for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
            const Values old_l = opposite_unwritten ? Values{} : V::values(old_j + l, count);
            const Values opp_l = opposite_unwritten ? Values{} : V::values(opp_j + l, count);
            emit(l, count, V::values(total_j + l, count) - old_l - opp_l + V::values(new_j + l, count));
          });
        }
        const LowestLabel<scalar_t> h_lowest = lowest.result(n);
        // SGM (Eq. 3.3): the sender costs are the predecessor's SGM message
        compute_message(grid, r, method == kSGM ? m_r + joff : h_j, method == kSGM ? nullptr : &h_lowest, w,
                        method == kSGM ? unary + off : nullptr, u_i, scratch, banded, p_i, idx.q + i);
      }
      if (method == kTRWP) {
        scalar_t* __restrict__ total_i = total + off;
        const scalar_t* __restrict__ new_i = u_i;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          total_i[l] += new_i[l] - (own_unwritten ? scalar_t(0) : m_i[l]);
          m_i[l] = new_i[l];
        }
      } else if (method == kSGM) {
        scalar_t* __restrict__ out_i = out + off;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) out_i[l] += m_i[l];
      }
    }};
  });
}

// unary[e] += p_0[e] + p_1[e] for e < count: ISGMR's combine with two pairs (isgmr_combine), one pass without the
// scratch sum, in this copy's vector width.
template <typename scalar_t>
void add_pair_sum(const scalar_t* __restrict__ p_0, const scalar_t* __restrict__ p_1, scalar_t* __restrict__ unary,
                  int64_t count) {
#pragma omp simd
  for (int64_t e = 0; e < count; ++e) unary[e] += p_0[e] + p_1[e];
}

// Per-thread accumulator of the diagonal of V_r's gradient, added to the thread's (L, L) buffer when destroyed
// (at the end of a parallel chunk), so that the common p(l) = l case stays contiguous.
template <typename scalar_t>
struct DiagonalGradient {
  std::vector<scalar_t> values;
  scalar_t* gv_r = nullptr;

  DiagonalGradient(int64_t n_labels, scalar_t* gv_r) : values(n_labels, scalar_t(0)), gv_r(gv_r) {}
  DiagonalGradient(DiagonalGradient&& other) noexcept : values(std::move(other.values)), gv_r(other.gv_r) {
    other.gv_r = nullptr;
  }
  DiagonalGradient(const DiagonalGradient&) = delete;
  DiagonalGradient& operator=(const DiagonalGradient&) = delete;
  DiagonalGradient& operator=(DiagonalGradient&&) = delete;
  ~DiagonalGradient() {
    if (gv_r == nullptr) return;
    const int64_t n_labels = static_cast<int64_t>(values.size());
    for (int64_t l = 0; l < n_labels; ++l) gv_r[l * n_labels + l] += values[l];
  }
};

// Backward of one Potts message (Alg. 3-4), fused into the caller's pass over the labels that computes the gradient
// gm of the normalised message: V = c [a != b], so every label either keeps its sender label (p(l) = l) or jumps to
// the one label m0 (stored), and each jump adds c gu to the edge weight's gradient (Eq. 3.33). chunk() scatters gm,
// not yet gu = gm - [l = q] g_sum (Eq. 3.5), to the sender costs gs (Eq. 3.30: kept labels; the jumps are summed) and
// to V's diagonal and row m0 (Eq. 3.36; gv_diag, row_scratch), finish() takes the q term off where q's gradient went
// and adds the jumps at m0. gs must not alias gm's source, so that the pass's loads can move above its stores.
// kPairwiseGradient: V needs a gradient (gv_diag and row_scratch are then given), a compile-time constant so that the
// label loop holds no test of it.
template <typename scalar_t, typename index_t, bool kPairwiseGradient>
struct PottsScatter {
  using V = Lanes<scalar_t>;
  using Values = typename V::Values;
  using Mask = typename V::Mask;
  const index_t* __restrict__ p;  // the message's Potts row (index_row)
  int32_t m0;                     // its last entry: the label every jump takes
  scalar_t* __restrict__ gs;
  scalar_t* __restrict__ gv_diag;      // V's diagonal gradient (kPairwiseGradient)
  scalar_t* __restrict__ row_scratch;  // (L): w gm of the jumps, for V's row m0
  scalar_t w;
  int32_t n;
  Values w_lanes = V::splat(w);  // w in every lane
  Values to_m0{};
  Mask jumped_lanes{};

  APP_FLATTEN void chunk(int64_t l, int32_t count, const Values& gm) {
    const Mask labels = V::labels(l);
    const Mask stays = V::from_bits(reinterpret_cast<const uint8_t*>(p), l);  // m0's bit is set
    const Mask jumps = count == V::kCount ? ~stays : ~stays & V::less(labels, Mask{} + n);
    const Values kept = V::select(stays, gm), jumped = V::select(jumps, gm);
    V::store(gs + l, kept, count);
    to_m0 += jumped;
    jumped_lanes |= jumps;
    if constexpr (kPairwiseGradient) {
      V::store(gv_diag + l, V::values(gv_diag + l, count) + w_lanes * kept, count);
      V::store(row_scratch + l, w_lanes * jumped, count);
    }
  }

  // q and g_sum of Eq. 3.5; v_r's row 0 holds c = V(0, 1); gw and gv_r nullptr where not needed.
  APP_FLATTEN void finish(int32_t q, scalar_t g_sum, const scalar_t* __restrict__ v_r, scalar_t* gw,
                          scalar_t* __restrict__ gv_r) {
    const bool q_jumps = !potts_stays(p, q);
    if (q_jumps) {
      if constexpr (kPairwiseGradient) row_scratch[q] -= w * g_sum;
    } else {
      gs[q] -= g_sum;
      if constexpr (kPairwiseGradient) gv_diag[q] -= w * g_sum;
    }
    if (V::bits(jumped_lanes) == 0) return;  // (q jumps only where some label does)
    const scalar_t total = q_jumps ? V::total(to_m0) - g_sum : V::total(to_m0);
    gs[m0] += total;
    if (gw != nullptr) *gw += total * v_r[1];
    if constexpr (kPairwiseGradient) {
      scalar_t* __restrict__ gv_row = gv_r + m0 * n;
      for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
        V::store(gv_row + l, V::values(gv_row + l, count) + V::values(row_scratch + l, count), count);
      });
    }
  }
};

// Backward of one message of a pairwise other than Potts (Alg. 3-4): gm (gradient of the normalised message, with
// sum_l gm(l) = g_sum) -> gu (Eq. 3.5 through q: gu = gm - [l = q] g_sum), then scattered through p to the sender
// costs gs (Eq. 3.30), the edge weight gw (Eq. 3.33) and V_r (Eq. 3.36; gv_r, and gv_diag for its diagonal). gw and
// gv_r are nullptr where that gradient is not needed (gv_diag is then left alone). Vectorised for labels that keep
// their sender label (p(l) = l) and for those that jump to the label m0 of the first jump, a scalar scatter for any
// other p(l).
template <typename scalar_t, typename index_t>
APP_FLATTEN void message_backward(int64_t n_labels, scalar_t* __restrict__ g, scalar_t g_sum, index_t q,
                                  const index_t* __restrict__ p, const scalar_t* __restrict__ v_r,
                                  const scalar_t* __restrict__ v_diag, scalar_t w, scalar_t* __restrict__ gs,
                                  scalar_t* gw, scalar_t* __restrict__ gv_r, scalar_t* __restrict__ gv_diag) {
  using V = Lanes<scalar_t>;
  using Values = typename V::Values;
  using Mask = typename V::Mask;
  const int32_t n = static_cast<int32_t>(n_labels), q_label = static_cast<int32_t>(q);
  const Values w_lanes = V::splat(w);
  const bool weight_needed = gw != nullptr, pairwise_needed = gv_r != nullptr;
  // gu on the labels [l, l + count): gm with g_sum taken off at q
  auto gu = [&](int64_t l, int32_t count) {
    return V::values(g + l, count) - V::select(V::equal(V::labels(l), Mask{} + q_label), V::splat(g_sum));
  };
  Mask first = Mask{} + n;  // the first label that leaves its sender label, n if none
  for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
    const Mask labels = V::labels(l);
    const Mask leaves = ~V::equal(V::template indices<index_t>(p + l, count), labels) & V::less(labels, Mask{} + n);
    first = V::blend(leaves & V::less(labels, first), labels, first);
  });
  const int32_t first_jump = static_cast<int32_t>(V::lowest(first));
  Values weight_grad{};
  if (first_jump == n) {  // every label keeps its sender label
    for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
      const Values kept = gu(l, count);
      V::store(gs + l, kept, count);
      if (weight_needed) weight_grad += kept * V::values(v_diag + l, count);
      if (pairwise_needed) V::store(gv_diag + l, V::values(gv_diag + l, count) + w_lanes * kept, count);
    });
    if (weight_needed) *gw += V::total(weight_grad);
    return;
  }
  const int32_t m0 = static_cast<int32_t>(p[first_jump]);
  const scalar_t* __restrict__ v_row = v_r + m0 * n_labels;
  scalar_t* __restrict__ gv_row = pairwise_needed ? gv_r + m0 * n_labels : nullptr;
  Values to_m0{};
  Mask others{};
  for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
    const Values g_l = gu(l, count);
    const Mask labels = V::labels(l), m = V::template indices<index_t>(p + l, count);
    const Mask stays = V::equal(m, labels), jumps = V::equal(m, Mask{} + m0) & ~stays;
    const Values kept = V::select(stays, g_l), moved = V::select(jumps, g_l);
    V::store(gs + l, kept, count);
    to_m0 += moved;
    if (weight_needed) weight_grad += kept * V::values(v_diag + l, count) + moved * V::values(v_row + l, count);
    if (pairwise_needed) {
      V::store(gv_diag + l, V::values(gv_diag + l, count) + w_lanes * kept, count);
      V::store(gv_row + l, V::values(gv_row + l, count) + w_lanes * moved, count);
    }
    others -= ~(stays | jumps) & V::less(labels, Mask{} + n);
  });
  gs[m0] += V::total(to_m0);
  scalar_t weight_total = V::total(weight_grad);
  g[q_label] -= g_sum;  // gu for the scalar scatter below
  int64_t n_other = V::total(others);
  for (int32_t l = first_jump + 1; n_other > 0 && l < n; ++l) {
    const int32_t m = static_cast<int32_t>(p[l]);
    if (m == l || m == m0) continue;
    gs[m] += g[l];
    weight_total += g[l] * v_r[m * n_labels + l];
    if (pairwise_needed) gv_r[m * n_labels + l] += w * g[l];
    --n_other;
  }
  if (weight_needed) *gw += weight_total;
}

// What the backward of one direction r needs per pixel (BackwardRuns copies it into locals for each run).
template <typename scalar_t, typename index_t>
struct SweepConstants {
  int64_t n_labels;
  int64_t pixels;      // H W
  int64_t index_row;   // stored argmins per message
  scalar_t rho;
  WeightSlots weight_slot;
  const scalar_t* weights;
  scalar_t* grad_weights;     // nullptr: not needed
  const index_t* p;           // the sweep's argmins (N, index_row)
  const index_t* q;           // (N)
  scalar_t* common;           // BackwardState::common
  scalar_t* extra;            // TRWP: E[r]; SGM: the unary gradient
  scalar_t* extra_opposite;   // TRWP: E[r ^ 1]
  const scalar_t* pair_grad;  // ISGMR: G[r / 2]
  scalar_t* pending;          // ISGMR: P[r / 2]
  bool first_of_pair;         // the pair's first sweep (r = r_first; ISGMR: writes P)
  bool first_replay;          // TRWP: the first replay, before whose first sweep of a pair E[r], E[r ^ 1] are zero
  bool last_replay;           // TRWP: the last replay, after which E is not read
};

// The backward visitor of one direction (see backward_sweeps_of): run() replays a run's messages in order.
template <Method kMethod, bool kPotts, typename scalar_t, typename index_t>
struct BackwardRuns {
  using V = Lanes<scalar_t>;
  using Values = typename V::Values;
  static constexpr int64_t kSlots = 2 * kBlockPixels;

  SweepConstants<scalar_t, index_t> k;
  scalar_t* gv_r;  // nullptr: V needs no gradient
  const scalar_t* v_r;
  const scalar_t* v_diag;
  std::vector<scalar_t> g, row_scratch;
  // carry[phase][slot]: the gradient of the sender costs h_i, left by the successor of i on the slot's scanline in
  // i's phase; i leaves its predecessor's in the other, so that no store can alias a load of the same pass.
  std::vector<scalar_t> carry;
  DiagonalGradient<scalar_t> gv_diag;

  BackwardRuns(const SweepConstants<scalar_t, index_t>& k, scalar_t* gv_r, const scalar_t* v_r, const scalar_t* v_diag)
      : k(k), gv_r(gv_r), v_r(v_r), v_diag(v_diag), g(k.n_labels), row_scratch(k.n_labels),
        carry(2 * kSlots * k.n_labels), gv_diag(k.n_labels, gv_r) {}

  // The run's pixels in order. What the pixels share is taken into locals first: the compiler keeps those in
  // registers across the run, where members would be reloaded after every store.
  APP_FLATTEN void run(const ScanRun& run) {
    const ScanRun s = run;
    const SweepConstants<scalar_t, index_t> c = k;
    scalar_t* const gv = gv_r;
    const scalar_t* const v = v_r;
    scalar_t* const carry_data = carry.data();
    scalar_t* const g_data = g.data();
    scalar_t* const scratch_data = row_scratch.data();
    scalar_t* const diag = gv == nullptr ? nullptr : gv_diag.values.data();
    const int64_t L = c.n_labels, image = s.b * c.pixels, pred_delta = s.sy * s.width + s.sx;
    const int32_t n = static_cast<int32_t>(L);
    const Values rho = V::splat(c.rho);
    // the carry halves of the run's first pixel; along a run they swap (alternating phase) or move by slot_step
    scalar_t* carried_row = carry_data + (s.phase_of(0) * kSlots + s.slot0) * L;
    scalar_t* leaving_row = carry_data + ((s.phase_of(0) ^ 1) * kSlots + s.slot0) * L;
    const int64_t carry_step = s.slot_step * L;
    for (int64_t t = 0; t < s.count; ++t) {
      const int64_t pixel = s.pixel(t), i = image + pixel, off = i * L;
      const bool has_predecessor = s.has_predecessor(t), has_successor = s.has_successor(t);
      // Prefetch of the scanline's next pixel in this sweep, one line at a time: in a lockstep block it comes up to 16
      // visits later (a row further, or in a block of rows the next column), where the hardware prefetcher does not
      // reach (vertical sweeps waited on memory); along a row it is the adjacent pixel, which needs none.
      if (s.slot_step != 0 && has_predecessor) {  // a lockstep block's run
        const int64_t next = off - pred_delta * L;
        for (int64_t e = 0; e < L; e += 64 / sizeof(scalar_t)) {
          if constexpr (kMethod == kISGMR) {
            __builtin_prefetch(c.pair_grad + next + e);
            __builtin_prefetch(c.pending + next + e, 1);
          } else {
            __builtin_prefetch(c.common + next + e, 1);
            __builtin_prefetch(c.extra + next + e, 1);
            if (kMethod == kTRWP) __builtin_prefetch(c.extra_opposite + next + e, 1);
          }
        }
      }
      const scalar_t* __restrict__ carried = carried_row;
      scalar_t* to_predecessor = leaving_row;
      if (s.alternating) {
        std::swap(carried_row, leaving_row);
      } else {
        carried_row += carry_step;
        leaving_row += carry_step;
      }
      // The method's gradient of the sender costs h_i on every label chunk, from the carried gradient:
      // per_chunk(l, count, g_l) with g_l the gradient gm of the message sent from h_i (before Eq. 3.5's q term).
      auto method_pass = [&](const auto& per_chunk) {
        auto carried_chunk = [&](int64_t l, int32_t count) {
          return has_successor ? V::values(carried + l, count) : Values{};
        };
        if constexpr (kMethod == kTRWP) {  // h_i = rho (theta_i + sum_d m^d_i) - m^{r-}_i; m^r_i is overwritten here
          scalar_t* __restrict__ common = c.common + off;
          scalar_t* __restrict__ e_r = c.extra + off;
          scalar_t* __restrict__ e_opp = c.extra_opposite + off;
          // E[r] and E[r ^ 1] before the first replay's first sweep: zero (the buffer is not zeroed); + 0 as the
          // zeroed buffer's was added, so that -0 becomes +0 alike and the results stay bitwise the same
          const bool unwritten = c.first_replay && c.first_of_pair;
          // the last replay's stores that nothing reads (the first sweep of a pair writes E[r], the second rewrites
          // it and E[r ^ 1]) are left out: compile-time choices, a test per chunk cost more than the stores
          auto pass = [&](auto store_own, auto store_opposite) {
            for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
              const Values from_successor = carried_chunk(l, count);
              const Values c_l = V::values(common + l, count) + rho * from_successor;
              const Values g_l = unwritten ? c_l + Values{} : c_l + V::values(e_r + l, count);
              V::store(common + l, c_l, count);
              if constexpr (decltype(store_own)::value) V::store(e_r + l, -c_l, count);
              if constexpr (decltype(store_opposite)::value) {
                V::store(e_opp + l, (unwritten ? Values{} : V::values(e_opp + l, count)) - from_successor, count);
              }
              per_chunk(l, count, g_l);
            });
          };
          if (!c.last_replay) {
            pass(std::true_type{}, std::true_type{});
          } else if (c.first_of_pair) {
            pass(std::false_type{}, std::true_type{});
          } else {
            pass(std::false_type{}, std::false_type{});
          }
        } else if constexpr (kMethod == kISGMR) {
          // h_i = base_i + m^r_i, base_i = theta_i + sum_{d != r, r-} m^{d,k}_i
          const scalar_t* __restrict__ g_pair = c.pair_grad + off;
          scalar_t* __restrict__ pending = c.pending + off;
          // the first sweep of a pair visits every pixel: it writes pending, no zeroing
          const bool first_of_pair = c.first_of_pair;
          for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
            const Values from_successor = carried_chunk(l, count);
            V::store(pending + l, first_of_pair ? from_successor : V::values(pending + l, count) + from_successor,
                     count);
            per_chunk(l, count, V::values(g_pair + l, count) + from_successor);
          });
        } else {  // SGM: h_i = m^r_i; the receiver's unary (or the path start's) enters u directly: its gradient
                  // is gu, here gm, the q term taken off after the pass
          const scalar_t* __restrict__ common = c.common + off;
          scalar_t* __restrict__ grad_unary = c.extra + off;
          for_label_chunks<scalar_t>(n, [&](int64_t l, int32_t count) {
            const Values g_l = V::values(common + l, count) + carried_chunk(l, count);
            V::store(grad_unary + l, V::values(grad_unary + l, count) + g_l, count);
            per_chunk(l, count, g_l);
          });
        }
      };
      Values g_sum{};
      scalar_t g_total = 0;
      // the edge's weight slot only where its gradient, or V's (which the weight scales), is needed
      scalar_t* gw = nullptr;
      scalar_t w = 0;
      if (has_predecessor && (c.grad_weights != nullptr || gv != nullptr)) {
        const int64_t slot_w = c.weight_slot(s.b, pixel - pred_delta, pixel);
        if (c.grad_weights != nullptr) gw = c.grad_weights + slot_w;
        if (gv != nullptr) w = c.weights[slot_w];
      }
      const index_t* p_i = c.p + i * c.index_row;
      if (kPotts && has_predecessor) {  // the pass fused with the scatter
        auto potts_pass = [&](auto pairwise_gradient) {
          PottsScatter<scalar_t, index_t, decltype(pairwise_gradient)::value> scatter{
              p_i, static_cast<int32_t>(p_i[c.index_row - 1]), to_predecessor, diag, scratch_data, w, n};
          method_pass([&](int64_t l, int32_t count, const Values& g_l) {
            g_sum += g_l;
            scatter.chunk(l, count, g_l);
          });
          g_total = V::total(g_sum);
          scatter.finish(static_cast<int32_t>(c.q[i]), g_total, v, gw, gv);
        };
        if (diag == nullptr) {
          potts_pass(std::false_type{});
        } else {
          potts_pass(std::true_type{});
        }
      } else {
        scalar_t* __restrict__ g_i = g_data;
        method_pass([&](int64_t l, int32_t count, const Values& g_l) {
          V::store(g_i + l, g_l, count);
          g_sum += g_l;
        });
        g_total = V::total(g_sum);
        if (has_predecessor) {
          message_backward(L, g_i, g_total, c.q[i], p_i, v, v_diag, w, to_predecessor, gw, gv, diag);
        }
      }
      // SGM: the q term of gu on the unary gradient (also at a path start, which has no sender; TRWP's and ISGMR's
      // first messages are constant)
      if constexpr (kMethod == kSGM) c.extra[off + c.q[i]] -= g_total;
    }
  }
};

// Backward sweeps of the directions r_first and r_first ^ 1, each in reverse scan order (Alg. 3-4), of the method
// kMethod, kPotts where the pairwise is Potts: compile-time constants, so that the per-pixel code holds only what it
// runs (2-10% faster than branching on them per pixel).
template <Method kMethod, bool kPotts, typename scalar_t, typename index_t>
void backward_sweeps_of(const Grid<scalar_t>& grid, int64_t r_first, BackwardState<scalar_t> state,
                        SweepIndices<const index_t> iteration) {
  const int64_t L = grid.n_labels, N = grid.batch * grid.pixels(), P = grid.pixels();
  const scalar_t rho = grid.rho();
  std::vector<scalar_t> v_diag(L);  // the same for V and V^T
  for (int64_t l = 0; l < L; ++l) v_diag[l] = grid.v[l * L + l];
  scan_pair(grid, r_first, true, [&](int64_t r) {
    scalar_t* gv_r =
        state.grad_v == nullptr ? nullptr : state.grad_v + (at::get_thread_num() * 2 + r % 2) * L * L;
    // the direction's buffers and weight offsets, computed once
    constexpr bool trwp = kMethod == kTRWP, isgmr = kMethod == kISGMR;
    const SweepConstants<scalar_t, index_t> k{L,
                                              P,
                                              grid.index_row,
                                              rho,
                                              grid.weight_slots(r),
                                              grid.weights,
                                              state.grad_weights,
                                              iteration.p + r * N * grid.index_row,
                                              iteration.q + r * N,
                                              state.common,
                                              trwp ? state.extra + r * N * L : state.extra,
                                              trwp ? state.extra + (r ^ 1) * N * L : nullptr,
                                              isgmr ? state.pair_grad[r / 2] : nullptr,
                                              isgmr ? state.pending + (r / 2) * N * L : nullptr,
                                              r == r_first,
                                              trwp && state.first_replay,
                                              trwp && state.last_replay};
    return BackwardRuns<kMethod, kPotts, scalar_t, index_t>(k, gv_r, grid.v_r(r), v_diag.data());
  }, kMethod == kISGMR);
}

// backward_sweeps_of for the run-time method and the grid's pairwise kind.
template <typename scalar_t, typename index_t>
void backward_sweeps(const Grid<scalar_t>& grid, Method method, int64_t r_first, BackwardState<scalar_t> state,
                     SweepIndices<const index_t> iteration) {
  auto of_kind = [&](auto potts) {
    if (method == kTRWP) {
      backward_sweeps_of<kTRWP, decltype(potts)::value>(grid, r_first, state, iteration);
    } else if (method == kISGMR) {
      backward_sweeps_of<kISGMR, decltype(potts)::value>(grid, r_first, state, iteration);
    } else {
      backward_sweeps_of<kSGM, decltype(potts)::value>(grid, r_first, state, iteration);
    }
  };
  if (grid.kind == kPotts) {
    of_kind(std::true_type{});
  } else {
    of_kind(std::false_type{});
  }
}
