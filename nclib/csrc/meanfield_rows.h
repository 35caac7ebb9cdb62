// The dense CRF's mean-field update of a run of pixels, shared by torch.ops.nclib_meanfield.update and the fused
// spatial-blur update torch.ops.nclib_gauss.blur_update: for each pixel p,
//   m = unary[p] + sum_j post_j[p] * filtered_j[p]      (K labels; Potts: the filtered Q is an agreement bonus)
//   q = softmax(m)                                      (max subtracted: never overflows)
//   out_i[p] = pre_i[p] * q                             (the next filters' inputs, or Q itself)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nclib {
namespace mf {

constexpr int kMaxTerms = 4;  // filtered inputs of one update
constexpr int kMaxOuts = 4;

// Pointers at the run's first pixel: u, f[j], o[i] (n, K) rows; po[j], pr[i] one float per pixel (pr[i] null: 1).
struct Rows {
  const float* u;
  const float* f[kMaxTerms];
  const float* po[kMaxTerms];
  int J;
  const float* pr[kMaxOuts];
  float* o[kMaxOuts];
  int O;
};

// exp(x) for x <= 0 to ~2 ulp, branch-free so that the compiler vectorises the loop around it: x = n ln2 + r
// (ln2 split in two for an exact reduction), e^r by its degree-6 Taylor-minimax polynomial on |r| <= ln2 / 2,
// 2^n built in the exponent bits. n = round(x / ln2) by the 1.5 * 2^23 shifter, not std::floor (GCC vectorises
// floor only under -fno-trapping-math). Below -87 (the float32 normal range) the result is 2^-126-ish, not 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float shifted = x * 1.44269504088896341f + kShifter;
  const float n = shifted - kShifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (r * r) * p + r + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;  // 2^n
  return e * __builtin_bit_cast(float, bits);  // not memcpy: GCC does not vectorise a loop around that
}

#if defined(__AVX512F__)
// exp_nonpositive() on 16 lanes: the same operations in the same order (no fused multiply-adds).
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 shifted = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), shifter);
  const __m512 n = _mm512_sub_ps(shifted, shifter);
  const __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(r, r), p), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x4B400000)),
                       _mm512_set1_epi32(127)),
      23);
  return _mm512_mul_ps(e, _mm512_castsi512_ps(bits));
}

// The update of n pixels with the row of K <= 16 * NC labels held in NC registers (the last one partly used): no
// per-pixel loops over K, which the compiler leaves mostly scalar for K = 21. Full registers are loaded and stored
// unmasked and a last one of at most 8 labels as an 8-wide vector: masked 16-wide loads were 40% of this
// function's time on the AMD EPYC (the same was seen in the lattice splat).
inline __m512 load_labels(const float* p, int c, int NC, __mmask16 m, bool last8) {
  if (c < NC - 1) return _mm512_loadu_ps(p);
  if (last8) return _mm512_zextps256_ps512(_mm256_maskz_loadu_ps(static_cast<__mmask8>(m), p));
  return _mm512_maskz_loadu_ps(m, p);
}

inline void store_labels(float* p, __m512 v, int c, int NC, __mmask16 m, bool last8) {
  if (c < NC - 1)
    _mm512_storeu_ps(p, v);
  else if (last8)
    _mm256_mask_storeu_ps(p, static_cast<__mmask8>(m), _mm512_castps512_ps256(v));
  else
    _mm512_mask_storeu_ps(p, m, v);
}

template <int NC>
void update_pixels_avx512(const Rows& r, int64_t n, int64_t K) {
  __mmask16 mask[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t left = K - 16 * c;
    mask[c] = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  }
  const bool last8 = K - 16 * (NC - 1) <= 8;
  for (int64_t p = 0; p < n; ++p) {
    __m512 m[NC];
    for (int c = 0; c < NC; ++c) m[c] = load_labels(r.u + p * K + 16 * c, c, NC, mask[c], last8);
    for (int j = 0; j < r.J; ++j) {
      const __m512 w = _mm512_set1_ps(r.po[j][p]);
      for (int c = 0; c < NC; ++c)
        m[c] = _mm512_add_ps(m[c], _mm512_mul_ps(w, load_labels(r.f[j] + p * K + 16 * c, c, NC, mask[c], last8)));
    }
    __m512 mx = m[0];
    for (int c = 1; c < NC; ++c) mx = _mm512_mask_max_ps(mx, mask[c], mx, m[c]);  // masked lanes keep m[0]'s
    if (NC == 1) mx = _mm512_mask_mov_ps(_mm512_set1_ps(m[0][0]), mask[0], m[0]);  // K < 16: pad with a real one
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));  // subtracted: exp never overflows
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < NC; ++c) {
      m[c] = exp_nonpositive16(_mm512_sub_ps(m[c], top));
      sum = _mm512_mask_add_ps(sum, mask[c], sum, m[c]);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sum);  // >= 1 term is exp(0) = 1
    for (int i = 0; i < r.O; ++i) {
      const __m512 s = _mm512_set1_ps(r.pr[i] != nullptr ? inv * r.pr[i][p] : inv);
      for (int c = 0; c < NC; ++c) store_labels(r.o[i] + p * K + 16 * c, _mm512_mul_ps(m[c], s), c, NC, mask[c], last8);
    }
  }
}
#endif

// The max and the sum of a short row (K = 21 labels) in four independent chains: one chain is bound by the
// add/max latency, and the compiler may not reassociate float sums by itself.
inline float row_max(const float* v, int64_t K) {
  float a[4] = {v[0], v[0], v[0], v[0]};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int l = 0; l < 4; ++l) a[l] = std::max(a[l], v[k + l]);
  for (; k < K; ++k) a[0] = std::max(a[0], v[k]);
  return std::max(std::max(a[0], a[1]), std::max(a[2], a[3]));
}

inline float row_sum(const float* v, int64_t K) {
  float a[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int l = 0; l < 4; ++l) a[l] += v[k + l];
  for (; k < K; ++k) a[0] += v[k];
  return (a[0] + a[1]) + (a[2] + a[3]);
}


// The update of n pixels (K labels), on the calling thread.
inline void update_pixels(const Rows& r, int64_t n, int64_t K) {
#if defined(__AVX512F__)
  if (K <= 64) {  // the row in at most 4 registers
    switch ((K + 15) / 16) {
      case 1: update_pixels_avx512<1>(r, n, K); return;
      case 2: update_pixels_avx512<2>(r, n, K); return;
      case 3: update_pixels_avx512<3>(r, n, K); return;
      default: update_pixels_avx512<4>(r, n, K); return;
    }
  }
#endif
  // Blocks of kBlock pixels: every step but the per-pixel max and sum is a flat loop over the block's
  // kBlock * K contiguous values, which the compiler vectorises (a loop over K = 21 alone does not).
  constexpr int64_t kBlock = 64;
  thread_local std::vector<float> buf, row;
  buf.resize(static_cast<size_t>(kBlock * K));
  row.resize(static_cast<size_t>(kBlock));
  float* m = buf.data();
  float* rr = row.data();
  for (int64_t p0 = 0; p0 < n; p0 += kBlock) {
    const int64_t np = std::min(kBlock, n - p0), ne = np * K;
    std::memcpy(m, r.u + p0 * K, sizeof(float) * ne);
    for (int j = 0; j < r.J; ++j) {
      const float* fp = r.f[j] + p0 * K;
      const float* w = r.po[j] + p0;
      for (int64_t i = 0; i < np; ++i)
        for (int64_t k = 0; k < K; ++k) m[i * K + k] += w[i] * fp[i * K + k];
    }
    for (int64_t i = 0; i < np; ++i) rr[i] = row_max(m + i * K, K);  // subtracted: exp never overflows
    for (int64_t i = 0; i < np; ++i)
      for (int64_t k = 0; k < K; ++k) m[i * K + k] -= rr[i];
    for (int64_t e = 0; e < ne; ++e) m[e] = exp_nonpositive(m[e]);
    for (int64_t i = 0; i < np; ++i) rr[i] = 1.0f / row_sum(m + i * K, K);  // >= 1 term is exp(0) = 1
    for (int o_i = 0; o_i < r.O; ++o_i) {
      const float* pre_p = r.pr[o_i] != nullptr ? r.pr[o_i] + p0 : nullptr;
      float* op = r.o[o_i] + p0 * K;
      for (int64_t i = 0; i < np; ++i) {
        const float s = pre_p != nullptr ? rr[i] * pre_p[i] : rr[i];
        for (int64_t k = 0; k < K; ++k) op[i * K + k] = m[i * K + k] * s;
      }
    }
  }
}

// Rows shifted by `first` pixels of K labels.
inline Rows offset(const Rows& r, int64_t first, int64_t K) {
  Rows s = r;
  s.u += first * K;
  for (int j = 0; j < r.J; ++j) {
    s.f[j] += first * K;
    s.po[j] += first;
  }
  for (int i = 0; i < r.O; ++i) {
    if (s.pr[i] != nullptr) s.pr[i] += first;
    s.o[i] += first * K;
  }
  return s;
}

}  // namespace mf
}  // namespace nclib
