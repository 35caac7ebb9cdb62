// The CPU lattice's per-pixel splat and slice of a row of channels, shared by lattice_cpu.cpp (filter) and
// gauss_xy_cpu.cpp (the dense CRF's fused slice + mean-field update).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nclib {

// Lattice rows hold C channels in a row of padded_row(C) floats (a multiple of 8; the padding holds 0): a row of
// 17..24 channels is one 16-wide and one 8-wide vector, loaded and stored unmasked. The splat reloads a vertex row
// that the pixel before has just stored (neighbouring pixels share vertices), and a masked store does not forward
// to that load: with unmasked rows the 21-channel splat ran 2.1x faster (AMD EPYC, one thread), the same sums.
inline int64_t padded_row(int64_t C) { return C == 1 ? 1 : (C + 7) / 8 * 8; }

// Rows of padded_row(cw) floats, cw <= 32, updated with unmasked vectors: F full 16-wide ones and, with T, an
// 8-wide one. The pixel's values are loaded once; each corner's row is updated whole before the next corner's
// (vector by vector, or with the values in a stack array, ran 1.7-2.4x slower here). Full vectors are loaded
// unmasked: masked 16-wide loads cost ~20% of the splat here (8-wide ones did not).
template <int F, bool T>
inline void splat_rows(const float* src, int64_t cw, const int32_t* ids, const float* w, int d1, float* acc,
                       int64_t stride, int64_t first, float scale, uint64_t count) {
#if defined(__AVX512F__)
  __m512 x0 = _mm512_setzero_ps(), x1 = _mm512_setzero_ps();
  __m256 xt = _mm256_setzero_ps();
  const auto mask16 = [&](int64_t left) {
    return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  };
  if (F >= 1) x0 = cw >= 16 ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(mask16(cw), src);
  if (F >= 2) x1 = cw >= 32 ? _mm512_loadu_ps(src + 16) : _mm512_maskz_loadu_ps(mask16(cw - 16), src + 16);
  if (T) xt = _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << (cw - 16 * F)) - 1), src + 16 * F);
  if (scale != 1.0f) {
    const __m512 s = _mm512_set1_ps(scale);
    x0 = _mm512_mul_ps(x0, s);
    x1 = _mm512_mul_ps(x1, s);
    xt = _mm256_mul_ps(xt, _mm512_castps512_ps256(s));
  }
  for (int r = 0; r < d1; ++r) {
    const int64_t v = static_cast<int64_t>(ids[r]) - first;
    if (static_cast<uint64_t>(v) >= count) continue;  // another task's vertex
    float* dst = acc + v * stride;
    const __m512 wr = _mm512_set1_ps(w[r]);
    if (F >= 1) _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_mul_ps(wr, x0)));
    if (F >= 2) _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_loadu_ps(dst + 16), _mm512_mul_ps(wr, x1)));
    if (T)
      _mm256_storeu_ps(dst + 16 * F, _mm256_add_ps(_mm256_loadu_ps(dst + 16 * F),
                                                   _mm256_mul_ps(_mm512_castps512_ps256(wr), xt)));
  }
#endif
}

// Splat one pixel: row v_r - first of `acc` (row stride `stride`: padded_row(cw), or 1 for one channel) += w_r * x
// for its corners r whose vertex v_r is in [first, first + count) (all -1 outside the roi), x = src[0..cw) or, with
// scale != 1, scale * src[0..cw) (the dense CRF's pre-multiplied Q). Per element, the same float operations in the
// same order, whichever path runs.
inline void splat_pixel(const float* src, int64_t cw, const int32_t* ids, const float* w, int d1, float* acc,
                        int64_t stride, int64_t first = 0, float scale = 1.0f,
                        uint64_t count = std::numeric_limits<uint64_t>::max()) {
  if (ids[0] < 0) return;  // row v of `acc` holds vertex first + v
  if (cw == 1) {  // the degree's one channel: scalar (a masked vector store would not forward to the next load)
    const float x = scale != 1.0f ? scale * src[0] : src[0];
    for (int r = 0; r < d1; ++r) {
      const int64_t v = static_cast<int64_t>(ids[r]) - first;
      if (static_cast<uint64_t>(v) < count) acc[v * stride] += w[r] * x;
    }
    return;
  }
#if defined(__AVX512F__)
  if (stride % 8 == 0 && cw <= 32) {
    switch ((cw + 7) / 8) {  // 8-float blocks of the padded row
      case 1: splat_rows<0, true>(src, cw, ids, w, d1, acc, stride, first, scale, count); return;
      case 2: splat_rows<1, false>(src, cw, ids, w, d1, acc, stride, first, scale, count); return;
      case 3: splat_rows<1, true>(src, cw, ids, w, d1, acc, stride, first, scale, count); return;
      default: splat_rows<2, false>(src, cw, ids, w, d1, acc, stride, first, scale, count); return;
    }
  }
  for (int64_t c = 0; c < cw; c += 16) {  // more channels: masked vectors
    const __mmask16 m = cw - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (cw - c)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(m, src + c);
    if (scale != 1.0f) x = _mm512_mul_ps(x, _mm512_set1_ps(scale));
    for (int r = 0; r < d1; ++r) {
      const int64_t v = static_cast<int64_t>(ids[r]) - first;
      if (static_cast<uint64_t>(v) >= count) continue;
      float* dst = acc + v * stride + c;
      const __m512 y = _mm512_maskz_loadu_ps(m, dst);
      _mm512_mask_storeu_ps(dst, m, _mm512_add_ps(y, _mm512_mul_ps(_mm512_set1_ps(w[r]), x)));
    }
  }
#else
  for (int r = 0; r < d1; ++r) {
    const int64_t v = static_cast<int64_t>(ids[r]) - first;
    if (static_cast<uint64_t>(v) >= count) continue;
    float* dst = acc + v * stride;
    for (int64_t c = 0; c < cw; ++c) dst[c] += w[r] * (scale != 1.0f ? scale * src[c] : src[c]);
  }
#endif
}

// slice_pixel() for C <= 32 channels in rows of padded_row(C) floats: F full 16-wide vectors and, with T, an 8-wide
// one, summed over the corners in one pass (each corner's weight and row address read once).
template <int F, bool T>
inline void slice_rows(float* dst, int64_t C, const int32_t* ids, const float* w, int d1, float alpha,
                       const float* lat, int64_t S) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m256 at = _mm256_setzero_ps();
  for (int r = 0; r < d1; ++r) {
    if (ids[r] < 0) continue;
    const float* row = lat + static_cast<int64_t>(ids[r]) * S;
    const __m512 wr = _mm512_set1_ps(alpha * w[r]);
    if (F >= 1) a0 = _mm512_add_ps(a0, _mm512_mul_ps(wr, _mm512_loadu_ps(row)));
    if (F >= 2) a1 = _mm512_add_ps(a1, _mm512_mul_ps(wr, _mm512_loadu_ps(row + 16)));
    if (T) at = _mm256_add_ps(at, _mm256_mul_ps(_mm512_castps512_ps256(wr), _mm256_loadu_ps(row + 16 * F)));
  }
  const auto store16 = [&](float* p, __m512 v, int64_t left) {
    if (left >= 16)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << left) - 1), v);
  };
  if (F >= 1) store16(dst, a0, C);
  if (F >= 2) store16(dst + 16, a1, C - 16);
  if (T) _mm256_mask_storeu_ps(dst + 16 * F, static_cast<__mmask8>((1u << (C - 16 * F)) - 1), at);
#endif
}

// Slice one pixel: dst[0..C) = sum over corners r (in order, from 0) of (alpha * w_r) * row v_r of `lat` (row
// stride S = padded_row(C)).
inline void slice_pixel(float* dst, int64_t C, const int32_t* ids, const float* w, int d1, float alpha,
                        const float* lat, int64_t S) {
  if (C == 1) {  // the degree's one channel: summed in a register (not through dst: store-to-load chains)
    float acc = 0.f;
    for (int r = 0; r < d1; ++r)
      if (ids[r] >= 0) acc += (alpha * w[r]) * lat[static_cast<int64_t>(ids[r]) * S];
    dst[0] = acc;
    return;
  }
#if defined(__AVX512F__)
  if (S % 8 == 0 && C <= 32) {
    switch ((C + 7) / 8) {  // 8-float blocks of the padded row
      case 1: slice_rows<0, true>(dst, C, ids, w, d1, alpha, lat, S); return;
      case 2: slice_rows<1, false>(dst, C, ids, w, d1, alpha, lat, S); return;
      case 3: slice_rows<1, true>(dst, C, ids, w, d1, alpha, lat, S); return;
      default: slice_rows<2, false>(dst, C, ids, w, d1, alpha, lat, S); return;
    }
  }
  for (int64_t c = 0; c < C; c += 16) {  // more channels: masked vectors
    const __mmask16 m = C - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int r = 0; r < d1; ++r) {
      if (ids[r] < 0) continue;
      const __m512 x = _mm512_maskz_loadu_ps(m, lat + static_cast<int64_t>(ids[r]) * S + c);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(alpha * w[r]), x));
    }
    _mm512_mask_storeu_ps(dst + c, m, acc);
  }
#else
  std::fill(dst, dst + C, 0.f);
  for (int r = 0; r < d1; ++r) {
    if (ids[r] < 0) continue;
    const float wr = alpha * w[r];
    const float* src = lat + static_cast<int64_t>(ids[r]) * S;
    for (int64_t c = 0; c < C; ++c) dst[c] += wr * src[c];
  }
#endif
}

}  // namespace nclib
