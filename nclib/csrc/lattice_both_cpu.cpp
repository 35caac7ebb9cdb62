// CPU lattice filter with the symmetrised operator: (L + L') v from one splat, one slice (the NC loss needs
// (L + L') S for its gradient and S'(L + L')S / 2 = S'LS for its value). L = alpha S' B S and L' = alpha S' B' S
// differ only in the order of the blur axes, so the splat (the costly scatter over pixels x corners x channels)
// and, the slice being linear, the slice of the two blurred sums are shared. The splat and blurs do the same
// operations in the same order as the standard filter of lattice_cpu.cpp at the time of writing (sums per vertex
// in pixel order), so the output equals the sum of two standard filter calls to float rounding. Registered as
// torch.ops.nclib_both.filter_sym (this translation unit is linked into the "cpu" build next to lattice_cpu.cpp,
// which owns the Python module). with_norm: also the degree L 1 (one more splatted and forward-blurred channel),
// equal to a standard filter of ones.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "lattice_common.h"

namespace nclib {
namespace {

// out = B_(d) ... B_(0) in (or reversed), ping-ponging between in and tmp; returns the buffer holding the result.
float* blur_chain(float* a, float* tmp, const int32_t* np, int64_t V, int64_t C, int d1, bool reverse) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  for (int step = 0; step < d1; ++step) {
    const int ax = reverse ? d1 - 1 - step : step;
    at::parallel_for(0, V, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t v = lo; v < hi; ++v) {
        const int32_t n0 = np[(v * d1 + ax) * 2];
        const int32_t n1 = np[(v * d1 + ax) * 2 + 1];
        const float* self = a + v * C;
        float* dst = tmp + v * C;
        if (n0 >= 0 && n1 >= 0) {
          const float* x0 = a + static_cast<int64_t>(n0) * C;
          const float* x1 = a + static_cast<int64_t>(n1) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = self[c] + 0.5f * (x0[c] + x1[c]);
        } else if (n0 >= 0 || n1 >= 0) {
          const float* x = a + static_cast<int64_t>(n0 >= 0 ? n0 : n1) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = self[c] + 0.5f * x[c];
        } else {
          std::copy(self, self + C, dst);
        }
      }
    });
    std::swap(a, tmp);
  }
  return a;
}

std::vector<at::Tensor> filter_sym(const at::Tensor& values_in, const at::Tensor& vtx, const at::Tensor& bary,
                                   const at::Tensor& nbr, int64_t batch, bool with_norm) {
  TORCH_CHECK(values_in.device().is_cpu() && values_in.scalar_type() == at::kFloat && values_in.dim() == 2,
              "filter_sym: values must be (P, C) float32 on the CPU");
  const at::Tensor values = values_in.contiguous();
  const int64_t P = values.size(0);
  const int64_t C = values.size(1);
  const int d1 = static_cast<int>(vtx.size(1));
  const int64_t V = nbr.size(0);
  TORCH_CHECK(vtx.size(0) == P, "filter_sym: values have ", P, " pixels, the lattice ", vtx.size(0));
  TORCH_CHECK(batch >= 1 && P % batch == 0, "filter_sym: P must be a multiple of the batch size");
  const float* in = values.data_ptr<float>();
  const float* bp = bary.data_ptr<float>();
  const int32_t* vp = vtx.data_ptr<int32_t>();
  const int32_t* np = nbr.data_ptr<int32_t>();

  at::Tensor bufs = at::empty({4, V, C}, values.options());  // splat copy + ping-pong buffers of both chains
  float* fwd = bufs[0].data_ptr<float>();
  float* fwd_tmp = bufs[1].data_ptr<float>();
  float* rev = bufs[2].data_ptr<float>();
  float* rev_tmp = bufs[3].data_ptr<float>();
  // with_norm: the degree L 1 as well (a ones channel splatted by the first channel chunk of each image).
  at::Tensor nbufs = at::zeros({with_norm ? 2 : 0, V}, values.options());
  float* nacc = with_norm ? nbufs[0].data_ptr<float>() : nullptr;

  // Splat in pixel order per image (and channel chunk when there are fewer images than threads).
  const int64_t n = P / batch;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::min<int64_t>(C, std::max<int64_t>(1, (threads + batch - 1) / batch));
  const int64_t width = (C + chunks - 1) / chunks;
  const int64_t per_image = (C + width - 1) / width;
  at::parallel_for(0, batch * per_image, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / per_image;
      const int64_t c0 = (task % per_image) * width, cw = std::min(width, C - c0);
      acc.assign(static_cast<size_t>(V) * cw, 0.f);
      int64_t vmin = V, vmax = -1;
      float* ones = (nacc != nullptr && c0 == 0) ? nacc : nullptr;  // images own disjoint vertex ranges
      for (int64_t p = b * n; p < (b + 1) * n; ++p) {
        const float* src = in + p * C + c0;
        for (int r = 0; r < d1; ++r) {
          const int32_t v = vp[p * d1 + r];
          if (v < 0) break;  // outside the roi: all corners are -1
          vmin = std::min<int64_t>(vmin, v);
          vmax = std::max<int64_t>(vmax, v);
          const float w = bp[p * d1 + r];
          float* dst = acc.data() + static_cast<int64_t>(v) * cw;
          for (int64_t c = 0; c < cw; ++c) dst[c] += w * src[c];
          if (ones != nullptr) ones[v] += w * 1.0f;
        }
      }
      for (int64_t v = vmin; v <= vmax; ++v) {
        std::copy(acc.data() + v * cw, acc.data() + (v + 1) * cw, fwd + v * C + c0);
        std::copy(acc.data() + v * cw, acc.data() + (v + 1) * cw, rev + v * C + c0);
      }
    }
  });

  const float* a = blur_chain(fwd, fwd_tmp, np, V, C, d1, false);
  const float* t = blur_chain(rev, rev_tmp, np, V, C, d1, true);
  const float* nb = with_norm ? blur_chain(nacc, nbufs[1].data_ptr<float>(), np, V, 1, d1, false) : nullptr;
  at::Tensor norm = at::empty({with_norm ? P : 0, 1}, values.options());
  float* nout = with_norm ? norm.data_ptr<float>() : nullptr;

  // Slice the sum of both blurs (the slice is linear): (L + L') v with the same barycentric weights.
  at::Tensor out = at::empty({P, C}, values.options());
  float* op = out.data_ptr<float>();
  const float alpha = lattice_alpha(d1 - 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, P, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      float* dst = op + p * C;
      std::fill(dst, dst + C, 0.f);
      float deg = 0.f;
      for (int r = 0; r < d1; ++r) {
        const int32_t v = vp[p * d1 + r];
        if (v < 0) continue;
        const float w = alpha * bp[p * d1 + r];
        const float* src = a + static_cast<int64_t>(v) * C;
        const float* src_t = t + static_cast<int64_t>(v) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += w * (src[c] + src_t[c]);
        if (nb != nullptr) deg += w * nb[v];
      }
      if (nout != nullptr) nout[p] = deg;
    }
  });
  return {out, norm};
}

}  // namespace
}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_both, m) {
  m.def("filter_sym(Tensor values, Tensor vtx, Tensor bary, Tensor nbr, int batch, bool with_norm) -> Tensor[]",
        &nclib::filter_sym);
}
