// Blocked transposes between the channel-major (B, C, N) layout of torch's NCHW tensors and the pixel-major
// (B, N, C) layout of the lattice and CRF kernels (CPU). torch copies a (C, N) -> (N, C) transpose with a small,
// odd C (21 labels) at 2-4 GB/s; a block of pixels here is one contiguous run of the pixel-major side, written or
// read while it sits in L1, so both directions run near memory speed on every thread.
// Registered as torch.ops.nclib_layout.transpose; linked into the "cpu" build.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace nclib {
namespace {

constexpr int64_t kBlock = 64;  // pixels per block: C * 64 floats (5 KB at C = 21) stay in L1

// out[b, j, i] = src[b, i, j] for contiguous float32 src (B, R, S) and out (B, S, R): parallel over blocks of the
// longer side, whose blocks are read (to_pixel_major) or written (from_pixel_major) as contiguous runs.
void transpose(const at::Tensor& src, const at::Tensor& out) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.dim() == 3 && src.is_contiguous(),
              "transpose: src must be a contiguous (B, R, S) float32 CPU tensor");
  const int64_t B = src.size(0), R = src.size(1), S = src.size(2);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 3 &&
                  out.size(0) == B && out.size(1) == S && out.size(2) == R &&
                  out.data_ptr<float>() != src.data_ptr<float>(),
              "transpose: out must be a contiguous (B, S, R) float32 CPU tensor, not src");
  const float* s = src.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (R <= S) {  // channel-major -> pixel-major: blocks of pixels (the S axis)
    const int64_t nb = (S + kBlock - 1) / kBlock;
    at::parallel_for(0, B * nb, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / nb, j0 = (t % nb) * kBlock, j1 = std::min(S, j0 + kBlock);
        const float* sb = s + b * R * S;
        float* ob = o + b * R * S + j0 * R;
        for (int64_t i = 0; i < R; ++i) {
          const float* row = sb + i * S;
          for (int64_t j = j0; j < j1; ++j) ob[(j - j0) * R + i] = row[j];
        }
      }
    });
  } else {  // pixel-major -> channel-major: blocks of pixels (the R axis)
    const int64_t nb = (R + kBlock - 1) / kBlock;
    at::parallel_for(0, B * nb, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / nb, i0 = (t % nb) * kBlock, i1 = std::min(R, i0 + kBlock);
        const float* sb = s + b * R * S + i0 * S;
        float* ob = o + b * R * S;
        for (int64_t j = 0; j < S; ++j) {
          float* col = ob + j * R;
          for (int64_t i = i0; i < i1; ++i) col[i] = sb[(i - i0) * S + j];
        }
      }
    });
  }
}

}  // namespace
}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_layout, m) {
  m.def("transpose(Tensor src, Tensor out) -> ()", &nclib::transpose);
}
