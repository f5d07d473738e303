// Grouped matrix products for bf16 on CPUs with AVX-512 bf16 dot products (vdpbf16ps): the routed experts' three
// products over rows sorted by expert, group e being rows offs[e - 1] .. offs[e] (int32 offsets, offs[-1] <= S):
//   forward      y  (S, N) = x_e (rows, K) . w_e^T   with w (E, N, K)
//   data grad    dx (S, K) = dy_e (rows, N) . w_e
//   weight grad  dw (E, N, K) = dy_e^T . x_e         (summed over the group's rows; no rows: zeros)
// bf16 operands, fp32 accumulation, bf16 results rounded to nearest even; the rows of y and dx past offs[-1]
// belong to no group and are written as zeros.
//
// Built and loaded by nanoseek/model/cpu_grouped_mm.py (as csrc/causal_attention_bf16.cpp is: g++ at first use,
// cached, called through ctypes). torch._grouped_mm's CPU kernel runs each group as its own oneDNN product, which
// reorders the group's weight at every call: on ~200-row groups it reached 75-89% of the speed of one dense
// product of the same size (one Zen 5 core), these 93-99%. Here each weight panel is packed once, by the thread
// that uses it, into the layout the micro-kernel reads, while the next panel is prefetched.
//
// Every product is C (M x cols, written as bf16) = A . B with B "pair-packed" in panels of 16 NV columns:
// B[p][n][r] = b[2p + r][n], so that one vdpbf16ps multiplies a broadcast pair of A's row (a[m][2p], a[m][2p + 1])
// with 16 columns' pairs and adds both products into 16 fp32 lanes. A is read where it lies when its pairs are
// contiguous (x and dy rows, the contraction along them), or packed the same way as B (the weight gradient sums
// over rows, so both its operands are interleaved by row pairs).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;

// ---- the micro-kernel -------------------------------------------------------------------------------------

constexpr int NV = 4;  // column vectors per panel: 64 columns, whole cache lines of bf16 results
constexpr int MR = 6;  // rows per micro-tile: 6 x 4 = 24 accumulators of the 32 vector registers
constexpr int64_t PANEL = 16 * NV;

// stores 16 fp32 as bf16 (round to nearest even), the lanes of mask only
inline void store_bf16(bf16* out, __m512 x, __mmask16 mask) {
  const __m256i v = (__m256i)_mm512_cvtneps_pbh(x);
  if (mask == 0xffff) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
  } else {
    _mm256_mask_storeu_epi16(out, mask, v);
  }
}

// valid lanes of column vector v of a panel with `cols` valid columns
inline __mmask16 lanes(int64_t cols, int v) {
  const int64_t n = std::clamp<int64_t>(cols - 16 * v, 0, 16);
  return n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}

// C (ROWS x cols of a panel, bf16, rows ldc apart) = A . B over P pairs. A's pair p of row m is the 32 bits at
// A + m a_row + p a_pair (elements); B is one pair-packed panel, [P][PANEL][2]. Every 4th step prefetches one of
// `lines` (memory a later task reads, see Ahead).
template <int ROWS>
__attribute__((always_inline)) inline void micro_kernel(const bf16* A, int64_t a_row, int64_t a_pair, const bf16* B,
                                                        int64_t P, bf16* C, int64_t ldc, int64_t cols,
                                                        const char* const* lines, int64_t n_lines) {
  // (the loops over rows and vectors fully unrolled and the kernel inlined: else GCC 12 may keep a copy of the
  // accumulators on the stack and store it at every step, at a third of the speed)
  __m512 acc[ROWS][NV];
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * 2 * PANEL + 32 * v);
    const bf16* a = A + p * a_pair;
    if ((p & 3) == 0 && p / 4 < n_lines) _mm_prefetch(lines[p / 4], _MM_HINT_T0);
    if ((p & 15) == 0)  // A's rows from L2: 4 cache lines ahead of the pairs read (when they lie along its rows)
#pragma GCC unroll 16
      for (int m = 0; m < ROWS; ++m) _mm_prefetch(reinterpret_cast<const char*>(a + m * a_row + 128), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; ++m) {
      int32_t pair;
      std::memcpy(&pair, a + m * a_row, 4);
      const __m512bh am = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], am, b[v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store_bf16(C + m * ldc + 16 * v, acc[m][v], lanes(cols, v));
}

// the last rows < MR of a sweep
template <int ROWS>
inline void tail_rows(int64_t rows, const bf16* A, int64_t a_row, int64_t a_pair, const bf16* B, int64_t P, bf16* C,
                      int64_t ldc, int64_t cols, const char* const* lines, int64_t n_lines) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) {
      micro_kernel<ROWS>(A, a_row, a_pair, B, P, C, ldc, cols, lines, n_lines);
    } else {
      tail_rows<ROWS - 1>(rows, A, a_row, a_pair, B, P, C, ldc, cols, lines, n_lines);
    }
  }
}

// Memory to bring into the cache before it is read: `rows` rows of `bytes` bytes, `stride` bytes apart
struct Region {
  const void* base = nullptr;
  int64_t rows = 0, stride = 0, bytes = 0;

  Region slice(int64_t i, int64_t n) const {  // rows [rows i / n, rows (i + 1) / n)
    const int64_t r0 = rows * i / n;
    return {static_cast<const char*>(base) + r0 * stride, rows * (i + 1) / n - r0, stride, bytes};
  }
};

// What the next task packs and a share of the next group's rows, fetched a part per micro-tile while this task
// computes: the weights come from DRAM once per call, and read cold by the packers they cost the products 15-20%
// of their time. The prefetches are spread over the micro-kernel's steps: issued all at once before a micro-tile
// they did not help at all.
struct Ahead {
  static constexpr int64_t SPREAD = 128;  // lines spread over one micro-tile at most (any more: prefetched at once)
  Region regions[2];
  int64_t parts = 1;  // the task's micro-tiles

  // the cache lines of part `part`: up to `max` of them into `out` (their count returned), the rest prefetched now
  int64_t lines(int64_t part, const char** out, int64_t max) const {
    int64_t n = 0;
    for (const Region& r : regions) {
      const Region share = r.slice(part, parts);
      const char* b = static_cast<const char*>(share.base);
      for (int64_t row = 0; row < share.rows; ++row)
        for (int64_t at = 0; at < share.bytes; at += 64) {
          if (n < max) {
            out[n++] = b + row * share.stride + at;
          } else {
            _mm_prefetch(b + row * share.stride + at, _MM_HINT_T0);
          }
        }
    }
    return n;
  }
};

// C (M x cols) = A (M rows) . B (one panel): all of A's rows against the panel, which stays in the cache; micro-tile
// i fetches part part0 + i of ahead
void sweep(int64_t M, const bf16* A, int64_t a_row, int64_t a_pair, const bf16* B, int64_t P, bf16* C, int64_t ldc,
           int64_t cols, const Ahead& ahead, int64_t part0) {
  const char* lines[Ahead::SPREAD];
  const int64_t slots = std::min(Ahead::SPREAD, (P + 3) / 4);  // one line every 4 steps
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    const int64_t n = ahead.lines(part0 + m / MR, lines, slots);
    micro_kernel<MR>(A + m * a_row, a_row, a_pair, B, P, C + m * ldc, ldc, cols, lines, n);
  }
  if (m < M) {
    const int64_t n = ahead.lines(part0 + m / MR, lines, slots);
    tail_rows<MR - 1>(M - m, A + m * a_row, a_row, a_pair, B, P, C + m * ldc, ldc, cols, lines, n);
  }
}

inline int64_t tiles(int64_t rows) { return (rows + MR - 1) / MR; }

// ---- packing ----------------------------------------------------------------------------------------------

// 16 x 16 32-bit transpose in place: r[c] lane i <- r[i] lane c
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // within 128-bit lanes: rows 2i, 2i + 1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// The forward's panel: w's rows n0 .. n0 + cols - 1 (each K = 2P elements: P pairs, rows ld apart) as columns,
// out[p][j] (32 bits) = pair p of row n0 + j; columns past cols are zero. 32-bit transposes of 16 x 16 blocks.
void pack_rows_as_columns(const bf16* w, int64_t ld, int64_t cols, int64_t P, bf16* out) {
  const int32_t* w32 = reinterpret_cast<const int32_t*>(w);
  int32_t* out32 = reinterpret_cast<int32_t*>(out);
  const int64_t ld32 = ld / 2;
  for (int v = 0; v < NV; ++v)
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const __mmask16 valid = P - p0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (P - p0)) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = 16 * v + i;
        r[i] = n < cols ? _mm512_maskz_loadu_epi32(valid, w32 + n * ld32 + p0) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int i = 0; i < 16 && p0 + i < P; ++i) _mm512_storeu_si512(out32 + (p0 + i) * PANEL + 16 * v, r[i]);
    }
}

// 16 bf16 of each of two rows interleaved: (a[0], b[0], a[1], b[1], ...)
inline __m512i interleave(__m256i a, __m256i b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// A panel of row pairs: out[p][j][r] = src[2p + r][c0 + j] for j < width (a multiple of 16), zero where
// 2p + r >= rows or j >= cols (rows ld elements apart). The data gradient's weight (pairs of w's rows n, n + 1)
// and both operands of the weight gradient (pairs of dy's and x's rows).
void pack_row_pairs(const bf16* src, int64_t ld, int64_t rows, int64_t c0, int64_t cols, int64_t width, bf16* out) {
  const int64_t P = (rows + 1) / 2;
  for (int64_t p = 0; p < P; ++p) {
    const bf16* r0 = src + 2 * p * ld + c0;
    const bool second = 2 * p + 1 < rows;
    for (int64_t j = 0; j < width; j += 16) {
      const int64_t n = std::clamp<int64_t>(cols - j, 0, 16);
      const __mmask16 valid = n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
      const __m256i a = _mm256_maskz_loadu_epi16(valid, r0 + j);
      const __m256i b = second ? _mm256_maskz_loadu_epi16(valid, r0 + ld + j) : _mm256_setzero_si256();
      _mm512_storeu_si512(out + 2 * (p * width + j), interleave(a, b));
    }
  }
}

// ---- tasks over threads -----------------------------------------------------------------------------------

struct Task {
  int64_t group, block;  // block: a panel of output columns (forward, data grad) or of dw's rows (weight grad)
  double cost;
};

// the tasks split over n_threads threads of OpenMP's team into contiguous runs of about equal cost (a run keeps
// one group's packed operand while it stays in that group). The library links libgomp.so.1 by that name, so in a
// process that runs torch it shares torch's copy and its threads.
template <typename Work>
void run_tasks(const std::vector<Task>& tasks, int n_threads, const Work& work) {
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, tasks.size())));
  std::vector<int64_t> first(n_threads + 1, static_cast<int64_t>(tasks.size()));  // thread i: first[i] .. first[i + 1]
  double total = 0;
  for (const Task& t : tasks) total += t.cost;
  double done = 0;
  for (int64_t k = static_cast<int64_t>(tasks.size()) - 1; k >= 0; --k) {  // task k: the thread whose share holds its
    done += tasks[k].cost;                                                 // middle (from the end)
    const double middle = total - done + 0.5 * tasks[k].cost;
    const int owner = total > 0 ? std::min(n_threads - 1, static_cast<int>(middle / total * n_threads)) : 0;
    for (int i = owner; i >= 0 && first[i] > k; --i) first[i] = k;
  }
#pragma omp parallel num_threads(n_threads)
  {
    const int i = omp_get_thread_num();
    const int64_t begin = first[i], stop = first[i + 1];
    work(tasks.data() + begin, tasks.data() + stop);
  }
}

inline int64_t group_begin(const int32_t* offs, int64_t e) { return e == 0 ? 0 : offs[e - 1]; }

// rows past the last group: zeros (rows split over the threads as well)
void zero_tail(bf16* out, int64_t from, int64_t S, int64_t width, int n_threads) {
  if (from >= S) return;
#pragma omp parallel for num_threads(std::max(1, n_threads))
  for (int64_t r = from; r < S; ++r) std::memset(out + r * width, 0, width * 2);
}

std::vector<Task> panel_tasks(const int32_t* offs, int64_t E, int64_t cols, int64_t contraction) {
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = offs[e] - group_begin(offs, e);
    if (rows <= 0) continue;
    for (int64_t b = 0; b * PANEL < cols; ++b)
      tasks.push_back({e, b, double(rows + 16) * double(contraction) * double(std::min(PANEL, cols - b * PANEL))});
  }
  return tasks;
}

}  // namespace

extern "C" {

int nanoseek_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// y (S, N) = x_e (S_e, K) . w_e^T per group, w (E, N, K); x, w, y contiguous bf16, K even
void nanoseek_grouped_mm_forward(const bf16* x, const bf16* w, const int32_t* offs, bf16* y, int64_t S, int64_t E,
                                 int64_t N, int64_t K, int n_threads) {
  const int64_t P = K / 2, blocks = (N + PANEL - 1) / PANEL;
  const auto w_rows = [&](const Task& t) {  // what task t packs: w_e's rows n0 .. n0 + PANEL - 1
    const int64_t n0 = t.block * PANEL;
    return Region{w + (t.group * N + n0) * K, std::min(PANEL, N - n0), 2 * K, 2 * K};
  };
  const auto x_rows = [&](int64_t e) {  // the rows of group e (none past the last)
    return e < E ? Region{x + group_begin(offs, e) * K, offs[e] - group_begin(offs, e), 2 * K, 2 * K} : Region{};
  };
  run_tasks(panel_tasks(offs, E, N, K), n_threads, [&](const Task* begin, const Task* end) {
    std::vector<bf16> panel(P * 2 * PANEL);
    for (const Task* t = begin; t < end; ++t) {
      const int64_t r0 = group_begin(offs, t->group), rows = offs[t->group] - r0;
      const int64_t n0 = t->block * PANEL, cols = std::min(PANEL, N - n0);
      pack_rows_as_columns(w + (t->group * N + n0) * K, K, cols, P, panel.data());  // [P][PANEL][2]
      const Ahead ahead{{t + 1 < end ? w_rows(t[1]) : Region{}, x_rows(t->group + 1).slice(t->block, blocks)},
                        tiles(rows)};
      sweep(rows, x + r0 * K, K, 2, panel.data(), P, y + r0 * N + n0, N, cols, ahead, 0);
    }
  });
  zero_tail(y, E ? offs[E - 1] : 0, S, N, n_threads);
}

// dx (S, K) = dy_e (S_e, N) . w_e per group, w (E, N, K); contiguous bf16, N even
void nanoseek_grouped_mm_data_grad(const bf16* dy, const bf16* w, const int32_t* offs, bf16* dx, int64_t S,
                                   int64_t E, int64_t N, int64_t K, int n_threads) {
  const int64_t P = N / 2, blocks = (K + PANEL - 1) / PANEL;
  const auto w_columns = [&](const Task& t) {  // what task t packs: w_e's columns k0 .. k0 + PANEL - 1
    const int64_t k0 = t.block * PANEL;
    return Region{w + t.group * N * K + k0, N, 2 * K, 2 * std::min(PANEL, K - k0)};
  };
  const auto dy_rows = [&](int64_t e) {
    return e < E ? Region{dy + group_begin(offs, e) * N, offs[e] - group_begin(offs, e), 2 * N, 2 * N} : Region{};
  };
  run_tasks(panel_tasks(offs, E, K, N), n_threads, [&](const Task* begin, const Task* end) {
    std::vector<bf16> panel(P * 2 * PANEL);
    for (const Task* t = begin; t < end; ++t) {
      const int64_t r0 = group_begin(offs, t->group), rows = offs[t->group] - r0;
      const int64_t k0 = t->block * PANEL, cols = std::min(PANEL, K - k0);
      pack_row_pairs(w + t->group * N * K, K, N, k0, cols, PANEL, panel.data());  // [P][PANEL][2]
      const Ahead ahead{{t + 1 < end ? w_columns(t[1]) : Region{}, dy_rows(t->group + 1).slice(t->block, blocks)},
                        tiles(rows)};
      sweep(rows, dy + r0 * N, N, 2, panel.data(), P, dx + r0 * K + k0, K, cols, ahead, 0);
    }
  });
  zero_tail(dx, E ? offs[E - 1] : 0, S, K, n_threads);
}

// dw (E, N, K) = dy_e^T (N, S_e) . x_e (S_e, K) per group; dy (S, N), x (S, K) contiguous bf16
void nanoseek_grouped_mm_weight_grad(const bf16* dy, const bf16* x, const int32_t* offs, bf16* dw, int64_t E,
                                     int64_t N, int64_t K, int n_threads) {
  constexpr int64_t BLOCK = 16 * MR;  // dw rows per task
  const int64_t panels = (K + PANEL - 1) / PANEL, blocks = (N + BLOCK - 1) / BLOCK;
  const auto rows_of = [&](int64_t e) { return std::max<int64_t>(offs[e] - group_begin(offs, e), 0); };
  const auto dy_block = [&](const Task& t) {  // what task t packs of dy: its group's rows, columns n0 .. n0 + BLOCK
    const int64_t n0 = t.block * BLOCK;
    return Region{dy + group_begin(offs, t.group) * N + n0, rows_of(t.group), 2 * N, 2 * std::min(BLOCK, N - n0)};
  };
  const auto x_rows = [&](int64_t e) {
    return e < E ? Region{x + group_begin(offs, e) * K, rows_of(e), 2 * K, 2 * K} : Region{};
  };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = 0; b < blocks; ++b)
      tasks.push_back({e, b, double(rows_of(e) + 16) * double(K) * double(std::min(BLOCK, N - b * BLOCK))});
  run_tasks(tasks, n_threads, [&](const Task* begin, const Task* end) {
    std::vector<bf16> a, b;  // dy's pairs [P][width][2]; x's pairs, panel by panel [panels][P][PANEL][2]
    int64_t packed = -1;     // the group whose x b holds
    for (const Task* t = begin; t < end; ++t) {
      const int64_t e = t->group, r0 = group_begin(offs, e), rows = rows_of(e), P = (rows + 1) / 2;
      const int64_t n0 = t->block * BLOCK, n_rows = std::min(BLOCK, N - n0);
      if (packed != e) {
        b.resize(std::max<int64_t>(1, panels * P * 2 * PANEL));
        for (int64_t j = 0; j < panels; ++j)
          pack_row_pairs(x + r0 * K, K, rows, j * PANEL, std::min(PANEL, K - j * PANEL), PANEL,
                         b.data() + j * P * 2 * PANEL);
        packed = e;
      }
      const int64_t width = (n_rows + 15) / 16 * 16;
      a.resize(std::max<int64_t>(1, P * 2 * width));
      pack_row_pairs(dy + r0 * N, N, rows, n0, n_rows, width, a.data());
      const Ahead ahead{{t + 1 < end ? dy_block(t[1]) : Region{}, x_rows(e + 1).slice(t->block, blocks)},
                        panels * tiles(n_rows)};
      for (int64_t j = 0; j < panels; ++j)  // A's row m (dw's row n0 + m): pair p at a + 2m + 2 width p
        sweep(n_rows, a.data(), 2, 2 * width, b.data() + j * P * 2 * PANEL, P, dw + (e * N + n0) * K + j * PANEL,
              K, std::min(PANEL, K - j * PANEL), ahead, j * tiles(n_rows));
    }
  });
}

}  // extern "C"
