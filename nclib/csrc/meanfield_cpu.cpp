// One dense-CRF mean-field update in a single pass over the pixels (CPU): for each pixel p,
//   m = unary[p] + sum_j post_j[p] * filtered_j[p]      (K labels; Potts: the filtered Q is an agreement bonus)
//   q = softmax(m)                                      (max subtracted: never overflows)
//   out_j[p] = pre_j[p] * q                             (the next filters' inputs, or Q itself)
// instead of about ten torch elementwise calls, each its own pass over (P, K) and its own parallel region (the
// per-pixel code is in meanfield_rows.h, shared with the fused blur update of gauss_xy_cpu.cpp).
// Registered as torch.ops.nclib_meanfield.update; linked into the "cpu" build next to lattice_cpu.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "meanfield_rows.h"

namespace nclib {
namespace {

// The checked pointers of an update's tensors: unary (P, K); filtered[j] (P, K) and post[j] (P, 1); pre[i]
// (P, 1) and out[i] (P, K). `extra` more terms are left for the caller (the fused blur's).
mf::Rows check_rows(const at::Tensor& unary, at::TensorList filtered, at::TensorList post, at::TensorList pre,
                    at::TensorList out, int extra, const char* op) {
  TORCH_CHECK(unary.device().is_cpu() && unary.scalar_type() == at::kFloat && unary.dim() == 2 &&
                  unary.is_contiguous(),
              op, ": unary must be a contiguous (P, K) float32 CPU tensor");
  const int64_t P = unary.size(0);
  const int64_t K = unary.size(1);
  TORCH_CHECK(post.size() == filtered.size() && pre.size() == out.size(), op, ": one post per filtered input");
  TORCH_CHECK(static_cast<int>(filtered.size()) + extra <= mf::kMaxTerms && out.size() <= mf::kMaxOuts, op,
              ": at most ", mf::kMaxTerms, " filtered inputs and ", mf::kMaxOuts, " outputs");
  mf::Rows r{};
  r.u = unary.data_ptr<float>();
  r.J = static_cast<int>(filtered.size());
  for (int j = 0; j < r.J; ++j) {
    TORCH_CHECK(filtered[j].is_contiguous() && filtered[j].scalar_type() == at::kFloat &&
                    filtered[j].numel() == P * K && post[j].is_contiguous() && post[j].numel() == P &&
                    post[j].scalar_type() == at::kFloat,
                op, ": filtered (P, K) and post (P, 1) must be contiguous float32");
    r.f[j] = filtered[j].data_ptr<float>();
    r.po[j] = post[j].data_ptr<float>();
  }
  r.O = static_cast<int>(out.size());
  for (int i = 0; i < r.O; ++i) {
    TORCH_CHECK(out[i].is_contiguous() && out[i].scalar_type() == at::kFloat && out[i].numel() == P * K &&
                    pre[i].is_contiguous() && pre[i].numel() == P && pre[i].scalar_type() == at::kFloat,
                op, ": out (P, K) and pre (P, 1) must be contiguous float32");
    r.pr[i] = pre[i].data_ptr<float>();
    r.o[i] = out[i].data_ptr<float>();
  }
  return r;
}

void update(const at::Tensor& unary, at::TensorList filtered, at::TensorList post, at::TensorList pre,
            at::TensorList out) {
  const mf::Rows r = check_rows(unary, filtered, post, pre, out, 0, "meanfield update");
  const int64_t P = unary.size(0), K = unary.size(1);
  at::parallel_for(0, P, 1024, [&](int64_t lo, int64_t hi) { mf::update_pixels(mf::offset(r, lo, K), hi - lo, K); });
}

}  // namespace

// Also the fused blur update's checks (gauss_xy_cpu.cpp).
mf::Rows check_meanfield_rows(const at::Tensor& unary, at::TensorList filtered, at::TensorList post,
                              at::TensorList pre, at::TensorList out, int extra, const char* op) {
  return check_rows(unary, filtered, post, pre, out, extra, op);
}

}  // namespace nclib

TORCH_LIBRARY_FRAGMENT(nclib_meanfield, m) {
  m.def("update(Tensor unary, Tensor[] filtered, Tensor[] post, Tensor[] pre, Tensor[] out) -> ()", &nclib::update);
}
