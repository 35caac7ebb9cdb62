// Exact (truncated) spatial Gaussian on the pixel grid, separable, for pixel-major (B*H*W, K) values (CPU):
//   out[b, y, x, :] = sum_{|i|, |j| <= R} g_i g_j values[b, y + i, x + j, :]     (pixels off the image hold 0)
// with the symmetric 1-D taps g_t = taps[|t|]. The dense CRF's smoothness kernel (xy only, a few pixels wide)
// on the grid it lives on: about 2 (2R + 1) multiply-adds per value, contiguous and vectorised, instead of a 2-D
// permutohedral lattice's scatter, blur and gather (which only approximates a Gaussian).
//
// Layout trick: in pixel-major memory a row of W pixels is W*K contiguous floats, and the neighbour t pixels to
// the right of element e is element e + t*K: both passes are flat 1-D loops over a row's W*K values, so the K
// labels (21, not a multiple of the vector width) cost no masked lanes.
//
// Per image, bands of output rows run in parallel; each band computes the horizontal pass of the rows it needs
// into a ring of 2R + 2 rows (stays in L2) and sums them vertically, 2 output rows at a time. Every output is
// the same float expression in the same order whatever the banding: results do not depend on the thread count.
// Multiply-adds are fused (FMA) here: nothing else has to round like this kernel.
// Registered as torch.ops.nclib_gauss.blur_xy, and blur_update: the dense CRF's mean-field update with this blur as
// its last term, fed row by row (meanfield_rows.h); linked into the "cpu" build.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "lattice_common.h"
#include "lattice_rows_cpu.h"
#include "meanfield_rows.h"

namespace nclib {

mf::Rows check_meanfield_rows(const at::Tensor& unary, at::TensorList filtered, at::TensorList post,
                              at::TensorList pre, at::TensorList out, int extra, const char* op);  // meanfield_cpu.cpp

namespace {

// Horizontal pass: dst[e] = g0 * c[e] + sum_{t=1..R} g_t * (c[e - t*s] + c[e + t*s]) for e in [0, n), c readable
// on [-R*s, n + R*s): the taps of element e are its neighbours t pixels left and right (s = K floats apart). The
// same operations in the same order for every e, vectorised over e (the row sits in L1: two loads per tap are
// cheap here).
inline void hpass(float* dst, const float* c, int64_t n, int64_t s, const float* g, int R) {
  int64_t e = 0;
#if defined(__AVX512F__)
  for (; e + 64 <= n; e += 64) {
    const __m512 g0 = _mm512_set1_ps(g[0]);
    __m512 a[4];
    for (int u = 0; u < 4; ++u) a[u] = _mm512_mul_ps(g0, _mm512_loadu_ps(c + e + 16 * u));
    for (int t = 1; t <= R; ++t) {
      const __m512 w = _mm512_set1_ps(g[t]);
      const float* l = c + e - t * s;
      const float* h = c + e + t * s;
      for (int u = 0; u < 4; ++u)
        a[u] = _mm512_fmadd_ps(w, _mm512_add_ps(_mm512_loadu_ps(l + 16 * u), _mm512_loadu_ps(h + 16 * u)), a[u]);
    }
    for (int u = 0; u < 4; ++u) _mm512_storeu_ps(dst + e + 16 * u, a[u]);
  }
  for (; e < n; e += 16) {
    const __mmask16 m = n - e >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - e)) - 1);
    __m512 a = _mm512_mul_ps(_mm512_set1_ps(g[0]), _mm512_maskz_loadu_ps(m, c + e));
    for (int t = 1; t <= R; ++t) {
      const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + e - t * s), _mm512_maskz_loadu_ps(m, c + e + t * s));
      a = _mm512_fmadd_ps(_mm512_set1_ps(g[t]), x, a);
    }
    _mm512_mask_storeu_ps(dst + e, m, a);
  }
#else
  for (; e < n; ++e) {
    float a = g[0] * c[e];
    for (int t = 1; t <= R; ++t) a = std::fma(g[t], c[e - t * s] + c[e + t * s], a);
    dst[e] = a;
  }
#endif
}

// Vertical pass for two output rows at once, the symmetric taps paired like hpass's:
//   dst[0][e] = g0 * in[R][e]     + sum_{t=1..R} g_t * (in[R - t][e] + in[R + t][e])
//   dst[1][e] = g0 * in[R + 1][e] + sum_{t=1..R} g_t * (in[R + 1 - t][e] + in[R + 1 + t][e])
// over the 2R + 2 input rows in[i] = row y - R + i. Row R + t of the first sum is row R + 1 + (t - 1) of the
// second's previous step, and row R + 1 - t of the second is row R - (t - 1) of the first's: two loads, two adds
// and two multiply-adds per tap give both rows (with one row per call it would be 2R + 1 multiply-adds per output
// from as many loads; the rows come from L2). rows_out == 1: only dst[0] is stored. Each output is the same
// expression, in the same order, as hpass's: results do not depend on how rows are grouped into bands.
constexpr int kRows = 2;

inline void vpass(float* const* dst, int rows_out, const float* const* in, int64_t n, const float* g, int R) {
  int64_t e = 0;
#if defined(__AVX512F__)
  for (; e < n; e += 32) {
    const int64_t left = n - e;
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF)
                                    : (left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : __mmask16(0));
    const __m512 g0 = _mm512_set1_ps(g[0]);
    __m512 pa0 = _mm512_maskz_loadu_ps(m0, in[R] + e), pa1 = _mm512_maskz_loadu_ps(m1, in[R] + e + 16);
    __m512 pd0 = _mm512_maskz_loadu_ps(m0, in[R + 1] + e), pd1 = _mm512_maskz_loadu_ps(m1, in[R + 1] + e + 16);
    __m512 a0 = _mm512_mul_ps(g0, pa0), a1 = _mm512_mul_ps(g0, pa1);
    __m512 b0 = _mm512_mul_ps(g0, pd0), b1 = _mm512_mul_ps(g0, pd1);
    for (int t = 1; t <= R; ++t) {
      const __m512 w = _mm512_set1_ps(g[t]);
      const __m512 x0 = _mm512_maskz_loadu_ps(m0, in[R - t] + e), x1 = _mm512_maskz_loadu_ps(m1, in[R - t] + e + 16);
      const __m512 z0 = _mm512_maskz_loadu_ps(m0, in[R + 1 + t] + e);
      const __m512 z1 = _mm512_maskz_loadu_ps(m1, in[R + 1 + t] + e + 16);
      a0 = _mm512_fmadd_ps(w, _mm512_add_ps(x0, pd0), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_add_ps(x1, pd1), a1);
      b0 = _mm512_fmadd_ps(w, _mm512_add_ps(pa0, z0), b0);
      b1 = _mm512_fmadd_ps(w, _mm512_add_ps(pa1, z1), b1);
      pa0 = x0, pa1 = x1, pd0 = z0, pd1 = z1;
    }
    _mm512_mask_storeu_ps(dst[0] + e, m0, a0);
    _mm512_mask_storeu_ps(dst[0] + e + 16, m1, a1);
    if (rows_out > 1) {
      _mm512_mask_storeu_ps(dst[1] + e, m0, b0);
      _mm512_mask_storeu_ps(dst[1] + e + 16, m1, b1);
    }
  }
#else
  for (; e < n; ++e) {
    float a = g[0] * in[R][e], b = g[0] * in[R + 1][e];
    for (int t = 1; t <= R; ++t) {
      a = std::fma(g[t], in[R - t][e] + in[R + t][e], a);
      b = std::fma(g[t], in[R + 1 - t][e] + in[R + 1 + t][e], b);
    }
    dst[0][e] = a;
    if (rows_out > 1) dst[1][e] = b;
  }
#endif
}

// The blur of values (B*H*W, K) (taps g_0..g_R), or of pre * values with pre (B*H*W) given, handing each group of
// up to kRows output rows to sink(b, y, rows_out, rows): rows[j] (W*K floats, scratch) is output row y + j of
// image b. Parallel over bands.
template <typename Sink>
void blur_rows(const float* in, int64_t batch, int64_t H, int64_t W, int64_t K, const float* g, int R, Sink sink,
               const float* pre = nullptr) {
  const int64_t n = W * K;  // floats per row
  // Bands of output rows: enough for every thread even at batch 1, few enough that the 2R rows a band
  // recomputes above and below it stay a small share.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_image = std::max<int64_t>(1, std::min<int64_t>(H / std::max(4 * R, 1),
                                                                      (threads + batch - 1) / batch));
  const int64_t band = (H + per_image - 1) / per_image;
  const int ni = 2 * R + kRows;  // input rows of one group of kRows output rows
  at::parallel_for(0, batch * per_image, 1, [&](int64_t lo, int64_t hi) {
    const int64_t ring = ni;  // horizontally blurred rows y - R .. y + kRows - 1 + R
    // Scratch kept per thread between calls (the CRF blurs 10 times per image; ~1 MB of fresh pages each time
    // would be page faults and zeroing): one input row with R zero pixels each side, the ring, the output rows
    // and a row of zeros (the rows off the image).
    thread_local std::vector<float> padded, rows, outbuf, zero;
    padded.assign(static_cast<size_t>(n + 2 * R * K), 0.f);
    if (rows.size() < static_cast<size_t>(ring * n)) rows.resize(static_cast<size_t>(ring * n));
    if (outbuf.size() < static_cast<size_t>(kRows * n)) outbuf.resize(static_cast<size_t>(kRows * n));
    if (zero.size() < static_cast<size_t>(n)) zero.assign(static_cast<size_t>(n), 0.f);
    std::vector<const float*> vin(static_cast<size_t>(ni));
    float* mid = padded.data() + R * K;
    float* outs[kRows];
    for (int j = 0; j < kRows; ++j) outs[j] = outbuf.data() + j * n;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / per_image;
      const int64_t y0 = (task % per_image) * band, y1 = std::min(H, y0 + band);
      if (y0 >= y1) continue;
      const float* img = in + b * H * n;
      int64_t done = std::max<int64_t>(0, y0 - R);  // input rows [.., done) are in the ring
      for (int64_t y = y0; y < y1; y += kRows) {
        const int rows_out = static_cast<int>(std::min<int64_t>(kRows, y1 - y));
        for (; done < std::min(H, y + kRows + R); ++done) {  // horizontal pass of the rows this group needs
          if (pre == nullptr) {
            std::memcpy(mid, img + done * n, sizeof(float) * n);
          } else {
            const float* row = img + done * n;
            const float* pr = pre + (b * H + done) * W;
            for (int64_t x = 0; x < W; ++x)
              for (int64_t k = 0; k < K; ++k) mid[x * K + k] = pr[x] * row[x * K + k];
          }
          hpass(rows.data() + (done % ring) * n, mid, n, K, g, R);
        }
        for (int i = 0; i < ni; ++i) {
          const int64_t yy = y - R + i;
          vin[i] = (yy < 0 || yy >= H) ? zero.data() : rows.data() + (yy % ring) * n;
        }
        vpass(outs, rows_out, vin.data(), n, g, R);
        sink(b, y, rows_out, outs);
      }
    }
  });
}

void check_blur(const at::Tensor& values, int64_t batch, int64_t height, int64_t width, const at::Tensor& taps,
                const char* op) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 2 &&
                  values.is_contiguous(),
              op, ": values must be a contiguous (B*H*W, K) float32 CPU tensor");
  TORCH_CHECK(batch >= 1 && height >= 1 && width >= 1 && values.size(0) == batch * height * width,
              op, ": values have ", values.size(0), " rows, not B*H*W = ", batch * height * width);
  TORCH_CHECK(taps.device().is_cpu() && taps.scalar_type() == at::kFloat && taps.dim() == 1 && taps.numel() >= 1 &&
                  taps.is_contiguous(),
              op, ": taps must be a contiguous 1-D float32 CPU tensor (g_0 .. g_R)");
}

void blur_xy(const at::Tensor& values, int64_t batch, int64_t height, int64_t width, const at::Tensor& taps,
             const at::Tensor& out) {
  check_blur(values, batch, height, width, taps, "blur_xy");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == values.sizes() && out.data_ptr<float>() != values.data_ptr<float>(),
              "blur_xy: out must be a contiguous float32 CPU tensor shaped like values, not values itself");
  const int64_t K = values.size(1), n = width * K;
  float* o = out.data_ptr<float>();
  blur_rows(values.data_ptr<float>(), batch, height, width, K, taps.data_ptr<float>(),
            static_cast<int>(taps.numel() - 1), [&](int64_t b, int64_t y, int rows_out, float* const* rows) {
              for (int j = 0; j < rows_out; ++j) std::memcpy(o + (b * height + y + j) * n, rows[j], sizeof(float) * n);
            });
}

// One mean-field update (meanfield_rows.h) whose last term is post_blur * blur(values), the blurred rows fed to
// the update as they come out of the blur: the blurred (P, K) array is never written nor read back.
void blur_update(const at::Tensor& values, int64_t batch, int64_t height, int64_t width, const at::Tensor& taps,
                 const at::Tensor& post_blur, const at::Tensor& unary, at::TensorList filtered, at::TensorList post,
                 at::TensorList pre, at::TensorList out) {
  check_blur(values, batch, height, width, taps, "blur_update");
  mf::Rows r = check_meanfield_rows(unary, filtered, post, pre, out, 1, "blur_update");
  TORCH_CHECK(unary.sizes() == values.sizes(), "blur_update: unary and values must have the same shape (P, K)");
  TORCH_CHECK(post_blur.is_contiguous() && post_blur.scalar_type() == at::kFloat && post_blur.numel() == unary.size(0),
              "blur_update: post_blur must be a contiguous float32 (P, 1)");
  for (const auto& o : out)  // other bands still read values while one writes its rows
    TORCH_CHECK(o.data_ptr<float>() != values.data_ptr<float>(), "blur_update: out must not be values");
  const int64_t K = values.size(1);
  r.po[r.J] = post_blur.data_ptr<float>();
  r.f[r.J] = nullptr;  // set per row below
  ++r.J;
  blur_rows(values.data_ptr<float>(), batch, height, width, K, taps.data_ptr<float>(),
            static_cast<int>(taps.numel() - 1), [&](int64_t b, int64_t y, int rows_out, float* const* rows) {
              for (int j = 0; j < rows_out; ++j) {
                const int64_t first = (b * height + y + j) * width;
                mf::Rows s = mf::offset(r, first, K);
                s.f[r.J - 1] = rows[j];
                mf::update_pixels(s, width, K);
              }
            });
}

// The dense CRF's whole mean-field update from Q (P, K), for an appearance lattice and this grid blur:
//   m = unary + post_lat * slice(lat) + post_grid * blur(pre_grid * Q);  out = softmax(m)
// lat (V, padded_row(K)) is the lattice's blurred splat of pre_lat * Q (torch.ops.nclib_meanfield.splat_blur).
// Row by row, as the blur emits them: each row is sliced into scratch and updated, so neither the sliced nor the
// blurred (P, K) array is ever written or read back. (Splatting the new rows here for the next step, instead of
// the separate splat, was 1.6x slower than that splat: the scattered writes and the slice's reads share L2.)
void blur_slice_update(const at::Tensor& values, int64_t batch, int64_t height, int64_t width,
                       const at::Tensor& taps, const at::Tensor& pre_grid, const at::Tensor& post_grid,
                       const at::Tensor& unary, const at::Tensor& lat, const at::Tensor& vtx,
                       const at::Tensor& bary, const at::Tensor& post_lat, const at::Tensor& out) {
  check_blur(values, batch, height, width, taps, "blur_slice_update");
  const int64_t P = values.size(0), K = values.size(1);
  TORCH_CHECK(unary.sizes() == values.sizes() && unary.is_contiguous() && unary.scalar_type() == at::kFloat &&
                  out.sizes() == values.sizes() && out.is_contiguous() && out.scalar_type() == at::kFloat &&
                  out.data_ptr<float>() != values.data_ptr<float>(),
              "blur_slice_update: unary and out (P, K) contiguous float32 like values, out not values");
  for (const at::Tensor* t : {&pre_grid, &post_grid, &post_lat})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->numel() == P,
                "blur_slice_update: pre_grid, post_grid and post_lat must be contiguous float32 (P, 1)");
  TORCH_CHECK(vtx.dim() == 2 && vtx.size(0) == P && vtx.scalar_type() == at::kInt && vtx.is_contiguous() &&
                  bary.sizes() == vtx.sizes() && bary.scalar_type() == at::kFloat && bary.is_contiguous(),
              "blur_slice_update: vtx (P, D+1) int32 and bary (P, D+1) float32 of the appearance lattice");
  const int64_t S = padded_row(K);
  TORCH_CHECK(lat.dim() == 2 && lat.size(1) == S && lat.scalar_type() == at::kFloat && lat.is_contiguous(),
              "blur_slice_update: lat must be a contiguous float32 (V, ", S, ")");
  const int d1 = static_cast<int>(vtx.size(1));
  const float alpha = lattice_alpha(d1 - 1);
  const int32_t* vp = vtx.data_ptr<int32_t>();
  const float* bp = bary.data_ptr<float>();
  const float* lp = lat.data_ptr<float>();
  mf::Rows r{};
  r.u = unary.data_ptr<float>();
  r.J = 2;
  r.po[0] = post_lat.data_ptr<float>();
  r.po[1] = post_grid.data_ptr<float>();
  r.O = 1;
  r.pr[0] = nullptr;
  r.o[0] = out.data_ptr<float>();
  blur_rows(values.data_ptr<float>(), batch, height, width, K, taps.data_ptr<float>(),
            static_cast<int>(taps.numel() - 1), [&](int64_t b, int64_t y, int rows_out, float* const* rows) {
              thread_local std::vector<float> sliced;
              if (sliced.size() < static_cast<size_t>(width * K)) sliced.resize(static_cast<size_t>(width * K));
              for (int j = 0; j < rows_out; ++j) {
                const int64_t first = (b * height + y + j) * width;
                for (int64_t x = 0; x < width; ++x) {
                  const int64_t p = first + x;
                  slice_pixel(sliced.data() + x * K, K, vp + p * d1, bp + p * d1, d1, alpha, lp, S);
                }
                mf::Rows s = mf::offset(r, first, K);
                s.f[0] = sliced.data();
                s.f[1] = rows[j];
                mf::update_pixels(s, width, K);
              }
            },
            pre_grid.data_ptr<float>());
}

}  // namespace
}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_gauss, m) {
  m.def("blur_xy(Tensor values, int batch, int height, int width, Tensor taps, Tensor out) -> ()", &nclib::blur_xy);
  m.def("blur_update(Tensor values, int batch, int height, int width, Tensor taps, Tensor post_blur, Tensor unary, "
        "Tensor[] filtered, Tensor[] post, Tensor[] pre, Tensor[] out) -> ()",
        &nclib::blur_update);
  m.def("blur_slice_update(Tensor values, int batch, int height, int width, Tensor taps, Tensor pre_grid, "
        "Tensor post_grid, Tensor unary, Tensor lat, Tensor vtx, Tensor bary, Tensor post_lat, Tensor out) -> ()",
        &nclib::blur_slice_update);
}
