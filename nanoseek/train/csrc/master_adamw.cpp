// One AdamW step of an fp32 master weight whose moments are kept in bf16 (DeepSeek-V3's low-precision optimizer
// states, V3 report §3.3.3), for CPUs with AVX-512 and its bf16 conversions.
//
// The same arithmetic as nanoseek/train/precision.py's adamw_update, one pass over memory:
//   g = grad * scale                                  (grad bf16 or fp32)
//   master *= 1 - lr * weight_decay                    (decoupled weight decay)
//   m = m + (1 - beta1) (g - m)                        (torch's lerp, in fp32 from the stored bf16 m)
//   v = beta2 v + (1 - beta2) g^2
//   master -= step_size * m / (sqrt(v) * inv_bias_correction2_sqrt + eps)
//   m, v stored rounded to bf16 (nearest even); the bf16 weight (if any) refreshed from the master.
// It reads 12 bytes per parameter (10 with a bf16 gradient) and writes 10, against 28 moved by the fp32-moment
// step. torch.compile's code for the same function is bound by its 16-lane partial bf16 loads and stores on
// AVX-512 (twice as slow as the fp32-moment step): hence this kernel.
//
// Threads: OpenMP (libgomp, shared with torch in a torch process), contiguous chunks of 16-element blocks.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

// 16 bf16 -> 16 fp32 (exact); kFull: all 16 lanes, else the lanes of mask (masked memory access is slow on some
// CPUs: the loop below uses it for its last block only)
template <bool kFull>
inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  __m256i raw = kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <bool kFull>
inline __m512 load_f32(const float* p, __mmask16 mask) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}

template <bool kFull>
inline void store_bf16(uint16_t* p, __m512 x, __mmask16 mask) {  // rounded to nearest even
  __m256i packed = (__m256i)_mm512_cvtneps_pbh(x);
  if (kFull)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  else
    _mm256_mask_storeu_epi16(p, mask, packed);
}

template <bool kFull>
inline void store_f32(float* p, __m512 x, __mmask16 mask) {
  if (kFull)
    _mm512_storeu_ps(p, x);
  else
    _mm512_mask_storeu_ps(p, mask, x);
}

struct Hyper {
  float decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bc2_sqrt, scale;
};

// 16 values of x (bf16 when kBf16, else fp32) as fp32, and back
template <bool kFull, bool kBf16>
inline __m512 load(const void* x, int64_t i, __mmask16 mask) {
  if constexpr (kBf16) return load_bf16<kFull>(static_cast<const uint16_t*>(x) + i, mask);
  return load_f32<kFull>(static_cast<const float*>(x) + i, mask);
}

template <bool kFull, bool kBf16>
inline void store(void* x, int64_t i, __m512 value, __mmask16 mask) {
  if constexpr (kBf16)
    store_bf16<kFull>(static_cast<uint16_t*>(x) + i, value, mask);
  else
    store_f32<kFull>(static_cast<float*>(x) + i, value, mask);
}

// 16 elements from i (kFull) or the lanes of mask
template <bool kFull, bool kBf16Grad, bool kBf16Moments>
inline void step16(float* master, const void* grad, void* m, void* v, uint16_t* weight, int64_t i, __mmask16 mask,
                   const Hyper& h) {
  const __m512 g = _mm512_mul_ps(load<kFull, kBf16Grad>(grad, i, mask), _mm512_set1_ps(h.scale));
  __m512 p = _mm512_mul_ps(load<kFull, false>(master, i, mask), _mm512_set1_ps(h.decay));
  __m512 mm = load<kFull, kBf16Moments>(m, i, mask);
  mm = _mm512_add_ps(mm, _mm512_mul_ps(_mm512_set1_ps(h.one_minus_beta1), _mm512_sub_ps(g, mm)));
  const __m512 vv = _mm512_add_ps(_mm512_mul_ps(load<kFull, kBf16Moments>(v, i, mask), _mm512_set1_ps(h.beta2)),
                                  _mm512_mul_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(h.one_minus_beta2)));
  const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vv), _mm512_set1_ps(h.inv_bc2_sqrt)),
                                     _mm512_set1_ps(h.eps));
  p = _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(h.step_size), mm), denom));
  store<kFull, false>(master, i, p, mask);
  store<kFull, kBf16Moments>(m, i, mm, mask);
  store<kFull, kBf16Moments>(v, i, vv, mask);
  if (weight) store_bf16<kFull>(weight + i, p, mask);
}

// elements [begin, end): blocks of 16, the last one masked
template <bool kBf16Grad, bool kBf16Moments>
void step_range(float* master, const void* grad, void* m, void* v, uint16_t* weight, int64_t begin, int64_t end,
                const Hyper& h) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) step16<true, kBf16Grad, kBf16Moments>(master, grad, m, v, weight, i, 0xFFFF, h);
  if (i < end) {
    const __mmask16 mask = (__mmask16)((1u << (end - i)) - 1);
    step16<false, kBf16Grad, kBf16Moments>(master, grad, m, v, weight, i, mask, h);
  }
}

}  // namespace

extern "C" {

int nanoseek_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// master (n,) fp32; grad (n,) bf16 or fp32; m, v (n,) bf16 or fp32; weight (n,) bf16 or null.
// hyper: lr, beta1, beta2, weight decay, eps, lr / bias correction 1, 1 / sqrt(bias correction 2), grad scale
void nanoseek_master_adamw(float* master, const void* grad, int grad_is_bf16, void* m, void* v, int moments_are_bf16,
                           uint16_t* weight, int64_t n, const float* hyper, int threads) {
  const Hyper h{1.0f - hyper[0] * hyper[3], 1.0f - hyper[1], hyper[2], 1.0f - hyper[2], hyper[4], hyper[5],
                hyper[6], hyper[7]};
  const int64_t blocks = (n + 15) / 16;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t begin = std::min(n, blocks * t / nt * 16), end = std::min(n, blocks * (t + 1) / nt * 16);
    if (grad_is_bf16 && moments_are_bf16)
      step_range<true, true>(master, grad, m, v, weight, begin, end, h);
    else if (grad_is_bf16)
      step_range<true, false>(master, grad, m, v, weight, begin, end, h);
    else if (moments_are_bf16)
      step_range<false, true>(master, grad, m, v, weight, begin, end, h);
    else
      step_range<false, false>(master, grad, m, v, weight, begin, end, h);
  }
}

}  // extern "C"
