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

namespace nclib {
namespace {

// exp(x) for x <= 0 to ~2 ulp, branch-free so that the compiler vectorises the loop around it: x = n ln2 + r
// (ln2 split in two for an exact reduction), e^r by its degree-6 Taylor-minimax polynomial on |r| <= ln2 / 2,
// 2^n built in the exponent bits. Below -87 (the float32 normal range) the result is 2^-126-ish, not 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (r * r) * p + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return e * scale;
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
  at::parallel_for(0, P, 2048, [&](int64_t lo, int64_t hi) {
    std::vector<float> m(static_cast<size_t>(K));
    for (int64_t p = lo; p < hi; ++p) {
      const float* up = u + p * K;
      float* mp = m.data();
      for (int64_t k = 0; k < K; ++k) mp[k] = up[k];
      for (size_t j = 0; j < J; ++j) {
        const float w = po[j][p];
        const float* fp = f[j] + p * K;
        for (int64_t k = 0; k < K; ++k) mp[k] += w * fp[k];
      }
      float mx = mp[0];
      for (int64_t k = 1; k < K; ++k) mx = std::max(mx, mp[k]);
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        mp[k] = exp_nonpositive(mp[k] - mx);
        total += mp[k];
      }
      const float inv = 1.0f / total;  // >= 1 term is exp(0) = 1
      for (size_t i = 0; i < o.size(); ++i) {
        const float s = inv * pr[i][p];
        float* op = o[i] + p * K;
        for (int64_t k = 0; k < K; ++k) op[k] = mp[k] * s;
      }
    }
  });
}

}  // namespace
}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_meanfield, m) {
  m.def("update(Tensor unary, Tensor[] filtered, Tensor[] post, Tensor[] pre, Tensor[] out) -> ()", &nclib::update);
}
