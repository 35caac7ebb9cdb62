// One dense-CRF mean-field update in a single pass over the pixels (CPU): for each pixel p,
//   m = unary[p] + sum_j post_j[p] * filtered_j[p]      (K labels; Potts: the filtered Q is an agreement bonus)
//   q = softmax(m)                                      (max subtracted: never overflows)
//   out_j[p] = pre_j[p] * q                             (the next filters' inputs, or Q itself)
// instead of about ten torch elementwise calls, each its own pass over (P, K) and its own parallel region.
// Registered as torch.ops.nclib_meanfield.update; linked into the "cpu" build next to lattice_cpu.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nclib {
namespace {

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

// The update of pixels [lo, hi) with the row of K <= 16 * NC labels held in NC registers (the last one masked):
// no per-pixel loops over K, which the compiler leaves mostly scalar for K = 21.
template <int NC>
void update_rows_avx512(int64_t lo, int64_t hi, int64_t K, const float* u, const std::vector<const float*>& f,
                        const std::vector<const float*>& po, const std::vector<const float*>& pr,
                        const std::vector<float*>& o) {
  __mmask16 mask[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t left = K - 16 * c;
    mask[c] = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  }
  for (int64_t p = lo; p < hi; ++p) {
    __m512 m[NC];
    for (int c = 0; c < NC; ++c) m[c] = _mm512_maskz_loadu_ps(mask[c], u + p * K + 16 * c);
    for (size_t j = 0; j < f.size(); ++j) {
      const __m512 w = _mm512_set1_ps(po[j][p]);
      for (int c = 0; c < NC; ++c)
        m[c] = _mm512_add_ps(m[c], _mm512_mul_ps(w, _mm512_maskz_loadu_ps(mask[c], f[j] + p * K + 16 * c)));
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
    for (size_t i = 0; i < o.size(); ++i) {
      const __m512 s = _mm512_set1_ps(inv * pr[i][p]);
      for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(o[i] + p * K + 16 * c, mask[c], _mm512_mul_ps(m[c], s));
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

void update(const at::Tensor& unary, at::TensorList filtered, at::TensorList post, at::TensorList pre,
            at::TensorList out) {
  TORCH_CHECK(unary.device().is_cpu() && unary.scalar_type() == at::kFloat && unary.dim() == 2 &&
                  unary.is_contiguous(),
              "meanfield update: unary must be a contiguous (P, K) float32 CPU tensor");
  const int64_t P = unary.size(0);
  const int64_t K = unary.size(1);
  const size_t J = filtered.size();
  TORCH_CHECK(post.size() == J && pre.size() == out.size(), "meanfield update: one post per filtered input");
  std::vector<const float*> f(J), po(J);
  for (size_t j = 0; j < J; ++j) {
    TORCH_CHECK(filtered[j].is_contiguous() && filtered[j].scalar_type() == at::kFloat &&
                    filtered[j].numel() == P * K && post[j].is_contiguous() && post[j].numel() == P,
                "meanfield update: filtered (P, K) and post (P, 1) must be contiguous float32");
    f[j] = filtered[j].data_ptr<float>();
    po[j] = post[j].data_ptr<float>();
  }
  std::vector<const float*> pr(out.size());
  std::vector<float*> o(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i].is_contiguous() && out[i].scalar_type() == at::kFloat && out[i].numel() == P * K &&
                    pre[i].is_contiguous() && pre[i].numel() == P,
                "meanfield update: out (P, K) and pre (P, 1) must be contiguous float32");
    pr[i] = pre[i].data_ptr<float>();
    o[i] = out[i].data_ptr<float>();
  }
  const float* u = unary.data_ptr<float>();
#if defined(__AVX512F__)
  if (K <= 64) {  // the row in at most 4 registers
    const int64_t nc = (K + 15) / 16;
    at::parallel_for(0, P, 2048, [&](int64_t lo, int64_t hi) {
      switch (nc) {
        case 1: update_rows_avx512<1>(lo, hi, K, u, f, po, pr, o); break;
        case 2: update_rows_avx512<2>(lo, hi, K, u, f, po, pr, o); break;
        case 3: update_rows_avx512<3>(lo, hi, K, u, f, po, pr, o); break;
        default: update_rows_avx512<4>(lo, hi, K, u, f, po, pr, o); break;
      }
    });
    return;
  }
#endif
  // Blocks of kBlock pixels: every step but the per-pixel max and sum is a flat loop over the block's
  // kBlock * K contiguous values, which the compiler vectorises (a loop over K = 21 alone does not).
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (P + kBlock - 1) / kBlock, 16, [&](int64_t blo, int64_t bhi) {
    std::vector<float> buf(static_cast<size_t>(kBlock * K)), row(static_cast<size_t>(kBlock));
    float* m = buf.data();
    float* r = row.data();
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t p0 = blk * kBlock, np = std::min(kBlock, P - p0), n = np * K;
      std::memcpy(m, u + p0 * K, sizeof(float) * n);
      for (size_t j = 0; j < J; ++j) {
        const float* fp = f[j] + p0 * K;
        const float* w = po[j] + p0;
        for (int64_t i = 0; i < np; ++i)
          for (int64_t k = 0; k < K; ++k) m[i * K + k] += w[i] * fp[i * K + k];
      }
      for (int64_t i = 0; i < np; ++i) r[i] = row_max(m + i * K, K);  // subtracted: exp never overflows
      for (int64_t i = 0; i < np; ++i)
        for (int64_t k = 0; k < K; ++k) m[i * K + k] -= r[i];
      for (int64_t e = 0; e < n; ++e) m[e] = exp_nonpositive(m[e]);
      for (int64_t i = 0; i < np; ++i) r[i] = 1.0f / row_sum(m + i * K, K);  // >= 1 term is exp(0) = 1
      for (size_t o_i = 0; o_i < o.size(); ++o_i) {
        const float* pre_p = pr[o_i] + p0;
        float* op = o[o_i] + p0 * K;
        for (int64_t i = 0; i < np; ++i) {
          const float s = r[i] * pre_p[i];
          for (int64_t k = 0; k < K; ++k) op[i * K + k] = m[i * K + k] * s;
        }
      }
    }
  });
}

}  // namespace
}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_meanfield, m) {
  m.def("update(Tensor unary, Tensor[] filtered, Tensor[] post, Tensor[] pre, Tensor[] out) -> ()", &nclib::update);
}
