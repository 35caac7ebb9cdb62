// Python binding of the CUDA permutohedral lattice (kernels in lattice_cuda.cu): the same `build` and `filter`
// functions, arguments and results as the CPU kernel (lattice_cpu.cpp), for tensors on one CUDA device.
// Plain C++ (no CUDA headers): the input checks live here so that misuse fails with a clear message before any
// kernel is launched. Only the headers it needs (not torch/extension.h): the JIT build stays short.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "lattice_common.h"

namespace nclib {

std::vector<at::Tensor> build_cuda(const at::Tensor& features, const at::Tensor& roi, int64_t batch);
at::Tensor filter_cuda(const at::Tensor& values, const at::Tensor& vtx, const at::Tensor& bary, const at::Tensor& nbr,
                       const at::Tensor& csr_ptr, const at::Tensor& csr_idx, bool transpose);

namespace {

// Tensors the kernels run on: CUDA ones; CPU ones in the host emulation used by tests (see lattice_cuda.cu).
bool on_target(const at::Tensor& t) {
#ifdef NCLIB_CUDA_EMULATE
  return t.device().is_cpu();
#else
  return t.is_cuda();
#endif
}

void check_lattice_tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim,
                          const c10::Device& device) {
  TORCH_CHECK(t.device() == device, "lattice filter: ", name, " is on ", t.device(), " but values are on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "lattice filter: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), "lattice filter: ", name, " must be a contiguous ", dim,
              "-d tensor, got shape ", t.sizes());
}

}  // namespace

// features (P, D) float32 contiguous on a CUDA device; roi (P) bool or empty; P = batch * pixels_per_image.
std::vector<at::Tensor> build(at::Tensor features, at::Tensor roi, int64_t batch) {
  TORCH_CHECK(on_target(features), "lattice build (CUDA kernel): features must be on a CUDA device, got ",
              features.device());
  TORCH_CHECK(features.scalar_type() == at::kFloat && features.is_contiguous(),
              "lattice build: features must be contiguous float32, got ", features.scalar_type());
  TORCH_CHECK(features.dim() == 2, "lattice build: features must be (P, D), got shape ", features.sizes());
  const int64_t P = features.size(0);
  const int64_t d = features.size(1);
  TORCH_CHECK(d >= 1 && d <= kMaxD, "lattice build: D must be in 1..", kMaxD, ", got ", d);
  TORCH_CHECK(batch >= 1 && P % batch == 0, "lattice build: P = ", P, " must be a multiple of the batch size ",
              batch);
  TORCH_CHECK(P * (d + 1) <= (int64_t(1) << 30), "lattice build: P * (D + 1) = ", P * (d + 1),
              " (pixel, corner) entries exceed the CUDA kernel's limit of 2^30; split the batch");
  if (roi.numel() > 0) {
    TORCH_CHECK(roi.device() == features.device(), "lattice build: roi is on ", roi.device(), " but features are on ",
                features.device());
    TORCH_CHECK(roi.numel() == P && roi.scalar_type() == at::kBool && roi.is_contiguous(),
                "lattice build: roi must be a contiguous bool tensor with P = ", P, " entries, got ",
                roi.scalar_type(), " ", roi.sizes());
  }
  return build_cuda(features, roi, batch);
}

// values (P, C) float32 -> alpha * S' B S values (transpose: blur axes in reverse order, the exact adjoint).
// `batch` is unused here (the CSR gather needs no image ranges) but keeps the CPU kernel's signature.
at::Tensor filter(at::Tensor values, at::Tensor vtx, at::Tensor bary, at::Tensor nbr,
                     at::Tensor csr_ptr, at::Tensor csr_idx, bool transpose, int64_t batch) {
  TORCH_CHECK(on_target(values), "lattice filter (CUDA kernel): values must be on a CUDA device, got ",
              values.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 2,
              "lattice filter: values must be (P, C) float32, got ", values.scalar_type(), " ", values.sizes());
  values = values.contiguous();
  const auto dev = values.device();
  check_lattice_tensor("vtx", vtx, at::kInt, 2, dev);
  check_lattice_tensor("bary", bary, at::kFloat, 2, dev);
  check_lattice_tensor("nbr", nbr, at::kInt, 3, dev);
  check_lattice_tensor("csr_ptr", csr_ptr, at::kLong, 1, dev);
  check_lattice_tensor("csr_idx", csr_idx, at::kInt, 1, dev);
  const int64_t d1 = vtx.size(1);
  TORCH_CHECK(vtx.size(0) == values.size(0), "lattice filter: values have ", values.size(0), " pixels, the lattice ",
              vtx.size(0));
  TORCH_CHECK(d1 >= 2 && d1 <= kMaxD + 1 && bary.sizes() == vtx.sizes(),
              "lattice filter: vtx and bary must both be (P, D+1), got ", vtx.sizes(), " and ", bary.sizes());
  TORCH_CHECK(nbr.size(1) == d1 && nbr.size(2) == 2 && csr_ptr.size(0) == nbr.size(0) + 1,
              "lattice filter: inconsistent lattice (nbr ", nbr.sizes(), ", csr_ptr ", csr_ptr.sizes(), ")");
  return filter_cuda(values, vtx, bary, nbr, csr_ptr, csr_idx, transpose);
}

}  // namespace nclib

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nclib permutohedral lattice, CUDA kernel";
  m.def("build", &nclib::build, "Build the lattice for a batch of (P, D) features");
  m.def("filter", &nclib::filter, "Splat, blur and slice (P, C) values; transpose=True applies the adjoint");
}
