// Fused causal attention for bf16 on CPUs with AVX-512 bf16 dot products (vdpbf16ps): the forward and the
// backward of softmax(scale q k^T + causal mask) v without writing the (T x T) scores to memory, in the manner
// of FlashAttention-2 (Dao 2023). The forward takes 64 queries at a time against all their causal keys (their
// fp32 scores, 64 x T, stay in the cache: 128 KiB at T = 512, 32 MiB at 128K) and keeps each row's log-sum-exp;
// the backward recomputes the probabilities in 64 x 64 tiles from it.
//
// Built and loaded by nanoseek/model/cpu_attention.py (g++ at first use, cached; no torch headers, called through
// ctypes). Tensors are contiguous (B, T, H, d): each (batch, head) is T rows H x d elements apart, independent of
// the others, so threads split the B x H of them. Products take bf16 operands and accumulate in fp32, as oneDNN's
// bf16 products do; the probabilities and their gradients are rounded to bf16 before the products that read them
// (as in FlashAttention on GPUs).
//
// Every product here is C (M x N, fp32) (+)= A (M x 2P, bf16, row-major) . B, with B "pair-packed":
// B[p][n][r] = b[2p + r][n], so that one vdpbf16ps multiplies a broadcast pair (a[m][2p], a[m][2p + 1]) with
// 16 columns' pairs and adds both products into 16 fp32 lanes. Matrices are packed into that layout once per
// (batch, head) row, or written in it (the probability tiles of the backward).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int64_t BLOCK = 64;  // query and key rows per tile

// ---- products ---------------------------------------------------------------------------------------------

// MR rows x (16 NV) columns of C, contraction over P pairs. lda, ldb, ldc in elements.
template <int MR, int NV>
inline void micro_kernel(const bf16* A, int64_t lda, const bf16* B, int64_t ldb, int64_t P, float* C,
                         int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(C + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * ldb + 32 * v);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
}

// the last rows < MR of a column panel
template <int MR, int NV>
inline void tail_rows(int64_t rows, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, int64_t P, float* C,
                      int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      micro_kernel<MR, NV>(A, lda, B, ldb, P, C, ldc, accumulate);
    } else {
      tail_rows<MR - 1, NV>(rows, A, lda, B, ldb, P, C, ldc, accumulate);
    }
  }
}

// 24 accumulators of the 32 vector registers: rows per micro-tile for 1-4 column vectors
template <int NV>
constexpr int rows_for() { return NV == 4 ? 6 : NV == 3 ? 8 : NV == 2 ? 12 : 16; }

template <int NV>
void panel(int64_t M, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, int64_t P, float* C, int64_t ldc,
           bool accumulate) {
  constexpr int MR = rows_for<NV>();
  int64_t m = 0;
  for (; m + MR <= M; m += MR) micro_kernel<MR, NV>(A + m * lda, lda, B, ldb, P, C + m * ldc, ldc, accumulate);
  if (m < M) tail_rows<MR - 1, NV>(M - m, A + m * lda, lda, B, ldb, P, C + m * ldc, ldc, accumulate);
}

// C (M x N) (+)= A (M x 2P) . B (pair-packed, P x N x 2); N a multiple of 16
void gemm(int64_t M, int64_t N, int64_t P, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  for (int64_t n = 0; n < N; n += 64) {
    const int64_t nv = std::min<int64_t>(4, (N - n) / 16);
    const bf16* Bn = B + 2 * n;
    float* Cn = C + n;
    switch (nv) {
      case 4: panel<4>(M, A, lda, Bn, ldb, P, Cn, ldc, accumulate); break;
      case 3: panel<3>(M, A, lda, Bn, ldb, P, Cn, ldc, accumulate); break;
      case 2: panel<2>(M, A, lda, Bn, ldb, P, Cn, ldc, accumulate); break;
      default: panel<1>(M, A, lda, Bn, ldb, P, Cn, ldc, accumulate); break;
    }
  }
}

// ---- packing ----------------------------------------------------------------------------------------------

// In the packers x is (T x d) with rows ld elements apart, d a multiple of 16; rows T..Tp-1 of the result are zero.

// x's rows t0..t0+15 as lanes: the 32 bits at column c of each (a pair of bf16 from c), 0 past row T
inline __m512i gather_rows(const bf16* x, int64_t ld, int64_t t0, int64_t T, int64_t c) {
  const __mmask16 valid = T - t0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(0, T - t0)) - 1);
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int32_t>(ld * 2)));  // byte offsets
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows, x + t0 * ld + c, 1);
}

// 32 bf16 of a register holding (a[0..15], b[0..15]) as (a[0], b[0], a[1], b[1], ...)
inline __m512i interleave_halves(__m512i both) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}

// pairs over d: out[d/2][Tp][2] (the operand that takes x's rows as columns: k in q k^T)
void pack_pairs_over_columns(const bf16* x, int64_t ld, int64_t T, int64_t Tp, int64_t d, bf16* out) {
  for (int64_t t0 = 0; t0 < Tp; t0 += 16)
    for (int64_t p = 0; p < d / 2; ++p)
      _mm512_storeu_si512(out + 2 * (p * Tp + t0), gather_rows(x, ld, t0, T, 2 * p));
}

// pairs over rows: out[Tp/2][d][2] (the operand of a product that sums over x's rows)
void pack_pairs_over_rows(const bf16* x, int64_t ld, int64_t T, int64_t Tp, int64_t d, bf16* out) {
  for (int64_t t = 0; t < Tp; t += 2)
    for (int64_t c = 0; c < d; c += 16) {
      const __m256i r0 = t < T ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ld + c))
                               : _mm256_setzero_si256();
      const __m256i r1 = t + 1 < T ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (t + 1) * ld + c))
                                   : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);  // (r0, r1)
      _mm512_storeu_si512(out + t * d + 2 * c, interleave_halves(both));
    }
}

// x^T (d x Tp)
void transpose_padded(const bf16* x, int64_t ld, int64_t T, int64_t Tp, int64_t d, bf16* out) {
  for (int64_t t0 = 0; t0 < Tp; t0 += 16)
    for (int64_t c = 0; c < d; c += 2) {
      const __m512i pairs = gather_rows(x, ld, t0, T, c);  // (x[t][c], x[t][c + 1]) in each lane
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * Tp + t0), _mm512_cvtepi32_epi16(pairs));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + 1) * Tp + t0),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)));
    }
}

// x (T x d, row stride ld) -> rows (Tp x d, contiguous), rows T..Tp-1 zero
void copy_rows_padded(const bf16* x, int64_t ld, int64_t T, int64_t Tp, int64_t d, bf16* out) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * d, x + t * ld, d * 2);
  std::memset(out + T * d, 0, (Tp - T) * d * 2);
}

inline __m512 load_bf16(const bf16* x) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

// ---- exp2 -------------------------------------------------------------------------------------------------

// 2^x for x <= 0 (and -inf): 2^n . 2^f with n = round(x), |f| <= 1/2, 2^f = e^(f ln 2) by its Taylor series to
// degree 7 (relative error < 2e-8 there); x below -150 gives 0.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 g = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 y = _mm512_set1_ps(1.f / 5040);
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.f / 720));
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.f / 120));
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.f / 24));
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.f / 6));
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, g, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// keys (16 of them from key0) later than query position pos: masked
inline __mmask16 keys_after(int64_t key0, int64_t pos) {
  const __m512i keys = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32(static_cast<int32_t>(key0)));
  return _mm512_cmpgt_epi32_mask(keys, _mm512_set1_epi32(static_cast<int32_t>(pos)));
}

// two rows of fp32 (16 columns each) -> 32 bf16 interleaved by row: out[2c + r] = row_r[c]
inline __m512i interleave_rows(__m512 row0, __m512 row1) {
  return interleave_halves((__m512i)_mm512_cvtne2ps_pbh(row1, row0));  // row0 in the low 16, row1 in the high 16
}

inline void store_bf16_row(bf16* out, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(x));
}

// ---- forward ----------------------------------------------------------------------------------------------

struct Forward {
  int64_t T, S, Sp, dk, dv;  // T queries at positions S - T .. S - 1 over S keys (T = S in training)
  float scale_log2;  // softmax scale x log2(e): probabilities as powers of 2
  std::vector<bf16> k_packed, v_packed, p;
  std::vector<float> s, o, inv_sum;

  // the scores of one block of 64 queries against all its keys stay in the cache, so the softmax takes two passes
  // over them (max, then exponentials and sum) instead of rescaling online tile by tile
  Forward(int64_t T_, int64_t S_, int64_t dk_, int64_t dv_, float scale)
      : T(T_), S(S_), Sp((S_ + BLOCK - 1) / BLOCK * BLOCK), dk(dk_), dv(dv_),
        scale_log2(scale * 1.4426950408889634f), k_packed(dk_ * Sp), v_packed(Sp * dv_), p(BLOCK * Sp),
        s(BLOCK * Sp), o(BLOCK * dv_), inv_sum(BLOCK) {}

  // one (batch, head): q (T x dk, rows ld_k apart), k (S x dk, rows ld_k apart), v (S x dv, rows ld_v apart) ->
  // out (T x dv, rows ld_v apart), lse2 (T): log2 of the softmax denominators
  void run(const bf16* q, const bf16* k, const bf16* v, int64_t ld_k, int64_t ld_v, bf16* out, float* lse2) {
    pack_pairs_over_columns(k, ld_k, S, Sp, dk, k_packed.data());  // k^T's operand: [dk/2][Sp][2]
    pack_pairs_over_rows(v, ld_v, S, Sp, dv, v_packed.data());     // [Sp/2][dv][2]
    const int64_t offset = S - T;  // query i sits at position offset + i
    for (int64_t i0 = 0; i0 < T; i0 += BLOCK) {
      const int64_t rows = std::min(BLOCK, T - i0);
      // the block's causal keys (up to its last query's position), in whole vectors; later ones masked
      const int64_t keys = (offset + i0 + rows + 15) / 16 * 16;
      const int64_t full = (offset + i0) / 16;  // vectors of keys no query of the block is before: never masked
      // scores q k^T: (rows x keys), row stride keys
      gemm(rows, keys, dk / 2, q + i0 * ld_k, ld_k, k_packed.data(), 2 * Sp, s.data(), keys, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s.data() + r * keys;
        const int64_t pos = offset + i0 + r;
        // the row's largest score (scale > 0: the largest scaled one too), then 2^(scale' s - max) in one pass
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t c = 0; c < keys / 16; ++c) {
          const __m512 x = _mm512_loadu_ps(sr + 16 * c);
          mx = c < full ? _mm512_max_ps(mx, x) : _mm512_mask_max_ps(mx, ~keys_after(16 * c, pos), mx, x);
        }
        const float m = _mm512_reduce_max_ps(mx) * scale_log2;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < keys / 16; ++c) {
          __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + 16 * c), _mm512_set1_ps(scale_log2), _mm512_set1_ps(m));
          if (c >= full) x = _mm512_mask_mov_ps(x, keys_after(16 * c, pos), _mm512_set1_ps(-INFINITY));
          const __m512 pc = exp2_ps(x);
          sum = _mm512_add_ps(sum, pc);
          store_bf16_row(p.data() + r * keys + 16 * c, pc);
        }
        const float l = _mm512_reduce_add_ps(sum);
        lse2[i0 + r] = m + std::log2(l);
        inv_sum[r] = 1.f / l;
      }
      // o = p v over all the block's keys, then normalized
      gemm(rows, dv, keys / 2, p.data(), keys, v_packed.data(), 2 * dv, o.data(), dv, false);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(inv_sum[r]);
        for (int64_t c = 0; c < dv; c += 16)
          store_bf16_row(out + (i0 + r) * ld_v + c, _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * dv + c), inv));
      }
    }
  }
};

// ---- backward ---------------------------------------------------------------------------------------------

struct Backward {
  int64_t T, Tp, dk, dv;
  float scale, scale_log2;
  std::vector<bf16> q_rows, do_rows, k_packed_cols, v_packed_cols, k_packed_rows, q_t, do_t, p_pairs, ds_pairs, ds;
  std::vector<float> s, dp, dq, dk_t, dv_t, delta, lse;

  Backward(int64_t T_, int64_t dk_, int64_t dv_, float scale_)
      : T(T_), Tp((T_ + BLOCK - 1) / BLOCK * BLOCK), dk(dk_), dv(dv_), scale(scale_),
        scale_log2(scale_ * 1.4426950408889634f), q_rows(Tp * dk_), do_rows(Tp * dv_), k_packed_cols(dk_ * Tp),
        v_packed_cols(dv_ * Tp), k_packed_rows(Tp * dk_), q_t(dk_ * Tp), do_t(dv_ * Tp), p_pairs(BLOCK * BLOCK),
        ds_pairs(BLOCK * BLOCK), ds(BLOCK * BLOCK), s(BLOCK * BLOCK), dp(BLOCK * BLOCK), dq(Tp * dk_),
        dk_t(dk_ * BLOCK), dv_t(dv_ * BLOCK), delta(Tp), lse(Tp) {}

  // one (batch, head): q, k, dq, dk (T x dk, rows ld_k apart); v, o, d_o, dv (T x dv, rows ld_v apart)
  void run(const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* d_o, const float* lse2,
           int64_t ld_k, int64_t ld_v, bf16* dq_out, bf16* dk_out, bf16* dv_out) {
    // padded rows T..Tp-1: zero queries and output gradients, and an infinite lse, so their probabilities are 0
    copy_rows_padded(q, ld_k, T, Tp, dk, q_rows.data());
    copy_rows_padded(d_o, ld_v, T, Tp, dv, do_rows.data());
    pack_pairs_over_columns(k, ld_k, T, Tp, dk, k_packed_cols.data());  // for q k^T
    pack_pairs_over_columns(v, ld_v, T, Tp, dv, v_packed_cols.data());  // for dO v^T
    pack_pairs_over_rows(k, ld_k, T, Tp, dk, k_packed_rows.data());     // for dS k
    transpose_padded(q, ld_k, T, Tp, dk, q_t.data());                    // q^T: the rows of dK^T = q^T dS
    transpose_padded(d_o, ld_v, T, Tp, dv, do_t.data());                 // dO^T: the rows of dV^T = dO^T P
    for (int64_t t = 0; t < Tp; ++t) {
      __m512 acc = _mm512_setzero_ps();  // D_t = sum_c dO[t][c] O[t][c] (FlashAttention-2's rowsum(dO o O))
      if (t < T)
        for (int64_t c = 0; c < dv; c += 16)
          acc = _mm512_fmadd_ps(load_bf16(d_o + t * ld_v + c), load_bf16(o + t * ld_v + c), acc);
      delta[t] = _mm512_reduce_add_ps(acc);
      lse[t] = t < T ? lse2[t] : INFINITY;
    }
    std::fill(dq.begin(), dq.end(), 0.f);
    for (int64_t j0 = 0; j0 < T; j0 += BLOCK) {
      std::fill(dk_t.begin(), dk_t.end(), 0.f);
      std::fill(dv_t.begin(), dv_t.end(), 0.f);
      for (int64_t i0 = j0; i0 < Tp; i0 += BLOCK) {
        gemm(BLOCK, BLOCK, dk / 2, q_rows.data() + i0 * dk, dk, k_packed_cols.data() + 2 * j0, 2 * Tp, s.data(),
             BLOCK, false);                                                                  // q k^T
        gemm(BLOCK, BLOCK, dv / 2, do_rows.data() + i0 * dv, dv, v_packed_cols.data() + 2 * j0, 2 * Tp, dp.data(),
             BLOCK, false);                                                                  // dP = dO v^T
        const bool diagonal = j0 == i0;
        for (int64_t r = 0; r < BLOCK; r += 2) {
          for (int c = 0; c < 4; ++c) {
            __m512 p2[2], ds2[2];
            for (int h = 0; h < 2; ++h) {
              const int64_t row = r + h;
              __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s.data() + row * BLOCK + 16 * c),
                                         _mm512_set1_ps(scale_log2), _mm512_set1_ps(lse[i0 + row]));
              if (diagonal) x = _mm512_mask_mov_ps(x, keys_after(16 * c, row), _mm512_set1_ps(-INFINITY));
              p2[h] = exp2_ps(x);  // P = exp(scale q.k - lse)
              // dS = P o (dP - D)  (scale applied to dq, dk at the end)
              ds2[h] = _mm512_mul_ps(p2[h], _mm512_sub_ps(_mm512_loadu_ps(dp.data() + row * BLOCK + 16 * c),
                                                          _mm512_set1_ps(delta[i0 + row])));
              store_bf16_row(ds.data() + row * BLOCK + 16 * c, ds2[h]);
            }
            // pairs over query rows: [r/2][c][2]
            _mm512_storeu_si512(p_pairs.data() + (r / 2) * 2 * BLOCK + 32 * c, interleave_rows(p2[0], p2[1]));
            _mm512_storeu_si512(ds_pairs.data() + (r / 2) * 2 * BLOCK + 32 * c, interleave_rows(ds2[0], ds2[1]));
          }
        }
        gemm(dv, BLOCK, BLOCK / 2, do_t.data() + i0, Tp, p_pairs.data(), 2 * BLOCK, dv_t.data(), BLOCK, true);
        gemm(dk, BLOCK, BLOCK / 2, q_t.data() + i0, Tp, ds_pairs.data(), 2 * BLOCK, dk_t.data(), BLOCK, true);
        gemm(BLOCK, dk, BLOCK / 2, ds.data(), BLOCK, k_packed_rows.data() + j0 * dk, 2 * dk, dq.data() + i0 * dk, dk,
             true);                                                                          // dQ += dS k
      }
      const int64_t cols = std::min(BLOCK, T - j0);
      // dK^T, dV^T tiles (features x 64 keys) -> rows of dk, dv
      const __m512i features = _mm512_mullo_epi32(
          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(BLOCK));
      for (int64_t c = 0; c < cols; ++c) {
        for (int64_t e = 0; e < dk; e += 16)
          store_bf16_row(dk_out + (j0 + c) * ld_k + e,
                         _mm512_mul_ps(_mm512_i32gather_ps(features, dk_t.data() + e * BLOCK + c, 4),
                                       _mm512_set1_ps(scale)));
        for (int64_t e = 0; e < dv; e += 16)
          store_bf16_row(dv_out + (j0 + c) * ld_v + e, _mm512_i32gather_ps(features, dv_t.data() + e * BLOCK + c, 4));
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < dk; e += 16)
        store_bf16_row(dq_out + t * ld_k + e,
                       _mm512_mul_ps(_mm512_loadu_ps(dq.data() + t * dk + e), _mm512_set1_ps(scale)));
  }
};

// rows [0, N) split over n_threads threads of OpenMP's team: the library links libgomp.so.1 by that name, so in a
// process that runs torch it shares torch's copy and its threads (new threads of their own would compete with
// torch's, which spin for a while after each of its parallel regions)
template <typename Work>
void split_rows(int64_t N, int n_threads, const Work& work) {
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, N)));
#pragma omp parallel num_threads(n_threads)
  {
    const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
    work(N * i / n, N * (i + 1) / n);
  }
}

}  // namespace

extern "C" {

int nanoseek_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// q (B, T, H, dk), k (B, S, H, dk), v (B, S, H, dv) bf16, contiguous, S >= T: the queries are the last T of the S
// positions (T = S: causal self-attention) -> out (B, T, H, dv) bf16, lse2 (B, H, T) fp32 (log2 units, for the
// backward)
void nanoseek_causal_attention_forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse2, int64_t B,
                                       int64_t T, int64_t S, int64_t H, int64_t dk, int64_t dv, float scale,
                                       int n_threads) {
  split_rows(B * H, n_threads, [&](int64_t begin, int64_t end) {
    Forward f(T, S, dk, dv, scale);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H;  // (b, h)'s rows start at b T H d + h d (b S H d + h d), H d apart
      f.run(q + (b * T * H + h) * dk, k + (b * S * H + h) * dk, v + (b * S * H + h) * dv, H * dk, H * dv,
            out + (b * T * H + h) * dv, lse2 + n * T);
    }
  });
}

// the gradients dq, dk (B, T, H, dk), dv (B, T, H, dv) from the forward's inputs, out, lse2 and d_out
void nanoseek_causal_attention_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* out,
                                        const bf16* d_out, const float* lse2, bf16* dq, bf16* dk_, bf16* dv_, int64_t B,
                                        int64_t T, int64_t H, int64_t dk, int64_t dv, float scale, int n_threads) {
  split_rows(B * H, n_threads, [&](int64_t begin, int64_t end) {
    Backward g(T, dk, dv, scale);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H;
      const int64_t at_k = (b * T * H + h) * dk, at_v = (b * T * H + h) * dv;
      g.run(q + at_k, k + at_k, v + at_v, out + at_v, d_out + at_v, lse2 + n * T, H * dk, H * dv, dq + at_k,
            dk_ + at_k, dv_ + at_v);
    }
  });
}

}  // extern "C"
