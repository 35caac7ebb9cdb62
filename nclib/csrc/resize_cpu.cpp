// The adjoint (backward) of torch's bilinear resize of (B, C, H, W) float32 planes, align_corners=False (CPU): the
// NC loss's scale < 1 (the authors' speed trick resizes the softmax output). The same sampling as
// F.interpolate(mode="bilinear", align_corners=False, size=...): source y = (H / H') (y' + 1/2) - 1/2, clamped
// at 0, its two rows y0 and min(y0 + 1, H - 1) with weights 1 - f and f (likewise for columns). torch's CPU
// backward zero-fills the whole gradient, then scatters into it, and cost ~4x its forward at 21 x 321^2; here each
// task zeroes one input plane while it sits in L2 and scatters into it there (~3x faster).
// Registered as torch.ops.nclib_resize.bilinear_adjoint; linked into the "cpu" build.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace nclib {
namespace {

// Source taps of each of `out` samples along an axis of `in` samples.
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

Taps make_taps(int64_t in, int64_t out) {
  Taps t;
  t.i0.resize(out); t.i1.resize(out); t.w0.resize(out); t.w1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t o = 0; o < out; ++o) {
    float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    const int64_t i = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
    const float f = std::min(std::max(src - static_cast<float>(i), 0.f), 1.f);
    t.i0[o] = i;
    t.i1[o] = i < in - 1 ? i + 1 : i;
    t.w0[o] = 1.f - f;
    t.w1[o] = f;
  }
  return t;
}

void check(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.is_contiguous(), op, ": ",
              name, " must be a contiguous (B, C, H, W) float32 CPU tensor");
}

// The adjoint of the resize to (out_h, out_w) of inputs of (in_h, in_w): g (B, C, out_h, out_w) -> (B, C, in_h, in_w).
at::Tensor bilinear_adjoint(const at::Tensor& g, int64_t in_h, int64_t in_w) {
  check(g, "g", "bilinear_adjoint");
  TORCH_CHECK(in_h >= 1 && in_w >= 1 && g.size(2) >= 1 && g.size(3) >= 1, "bilinear_adjoint: sizes must be >= 1");
  const int64_t planes = g.size(0) * g.size(1), OH = g.size(2), OW = g.size(3);
  const Taps ty = make_taps(in_h, OH), tx = make_taps(in_w, OW);
  at::Tensor out = at::empty({g.size(0), g.size(1), in_h, in_w}, g.options());
  const float* src = g.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, planes, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      float* d = dst + p * in_h * in_w;
      std::memset(d, 0, sizeof(float) * in_h * in_w);
      for (int64_t oy = 0; oy < OH; ++oy) {
        const float* gr = src + (p * OH + oy) * OW;
        float* a = d + ty.i0[oy] * in_w;
        float* b = d + ty.i1[oy] * in_w;
        const float u0 = ty.w0[oy], u1 = ty.w1[oy];
        for (int64_t ox = 0; ox < OW; ++ox) {
          const int64_t c0 = tx.i0[ox], c1 = tx.i1[ox];
          const float ga = u0 * gr[ox], gb = u1 * gr[ox];
          a[c0] += tx.w0[ox] * ga;
          a[c1] += tx.w1[ox] * ga;
          b[c0] += tx.w0[ox] * gb;
          b[c1] += tx.w1[ox] * gb;
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_resize, m) {
  m.def("bilinear_adjoint(Tensor g, int in_h, int in_w) -> Tensor", &nclib::bilinear_adjoint);
}
