// CPU permutohedral lattice: build (embed + hash + neighbours + splat CSR) and filter (splat, blur, slice).
// Parallel with ATen's primitives (at::parallel_for), so torch.set_num_threads governs it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lattice_common.h"

namespace nclib {
namespace {

// Open-addressing hash map from a D-int key to a dense vertex id, growing at half load.
class KeyTable {
 public:
  explicit KeyTable(int d, int64_t expected) : d_(d) {
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    slots_.assign(cap, -1);
  }

  int32_t insert(const int32_t* key) {
    if (2 * (size() + 1) > static_cast<int64_t>(slots_.size())) grow();
    int64_t s = find_slot(key);
    if (slots_[s] < 0) {
      slots_[s] = static_cast<int32_t>(size());
      keys_.insert(keys_.end(), key, key + d_);
    }
    return slots_[s];
  }

  int32_t find(const int32_t* key) const {
    const int32_t id = slots_[find_slot(key)];
    return id;
  }

  int64_t size() const { return d_ == 0 ? 0 : static_cast<int64_t>(keys_.size()) / d_; }
  const int32_t* key(int64_t id) const { return keys_.data() + id * d_; }

 private:
  int64_t find_slot(const int32_t* key) const {
    const uint64_t mask = slots_.size() - 1;
    uint64_t s = hash_key(key, d_) & mask;
    while (true) {
      const int32_t id = slots_[s];
      if (id < 0 || std::memcmp(keys_.data() + static_cast<int64_t>(id) * d_, key, d_ * sizeof(int32_t)) == 0) {
        return static_cast<int64_t>(s);
      }
      s = (s + 1) & mask;
    }
  }

  void grow() {
    std::vector<int32_t> old(slots_.size() * 2, -1);
    slots_.swap(old);
    const uint64_t mask = slots_.size() - 1;
    for (int64_t id = 0; id < size(); ++id) {
      uint64_t s = hash_key(key(id), d_) & mask;
      while (slots_[s] >= 0) s = (s + 1) & mask;
      slots_[s] = static_cast<int32_t>(id);
    }
  }

  int d_;
  std::vector<int32_t> slots_;
  std::vector<int32_t> keys_;
};

}  // namespace

// features (P, D) float32 contiguous; roi (P) bool or empty; P = batch * pixels_per_image.
std::vector<torch::Tensor> build(torch::Tensor features, torch::Tensor roi, int64_t batch) {
  TORCH_CHECK(features.device().is_cpu() && features.scalar_type() == torch::kFloat32 && features.is_contiguous(),
              "lattice build: features must be contiguous float32 on the CPU");
  TORCH_CHECK(features.dim() == 2, "lattice build: features must be (P, D)");
  const int64_t P = features.size(0);
  const int d = static_cast<int>(features.size(1));
  TORCH_CHECK(d >= 1 && d <= kMaxD, "lattice build: D must be in 1..", kMaxD);
  TORCH_CHECK(batch >= 1 && P % batch == 0, "lattice build: P must be a multiple of the batch size");
  const bool has_roi = roi.numel() > 0;
  TORCH_CHECK(!has_roi || (roi.numel() == P && roi.scalar_type() == torch::kBool && roi.is_contiguous()),
              "lattice build: roi must be a contiguous bool tensor with P entries");
  const int d1 = d + 1;
  const int64_t n = P / batch;

  auto i32 = torch::TensorOptions().dtype(torch::kInt32);
  torch::Tensor vtx = torch::empty({P, d1}, i32);
  torch::Tensor bary = torch::empty({P, d1}, torch::TensorOptions().dtype(torch::kFloat32));
  const float* f = features.data_ptr<float>();
  const bool* keep = has_roi ? roi.data_ptr<bool>() : nullptr;
  float* bp = bary.data_ptr<float>();
  int32_t* vp = vtx.data_ptr<int32_t>();
  double scale[kMaxD];
  embed_scales(d, scale);

  // 1. Embed each pixel and hash its D+1 corners into dense per-image ids, in pixel order (parallel over
  //    images; the keys never leave the cache).
  std::vector<KeyTable> tables;
  tables.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) tables.emplace_back(d, n / 8 + 16);
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    int32_t keys[(kMaxD + 1) * kMaxD];
    int32_t prev_keys[(kMaxD + 1) * kMaxD];
    for (int64_t b = lo; b < hi; ++b) {
      int64_t prev = -1;
      for (int64_t p = b * n; p < (b + 1) * n; ++p) {
        if (keep && !keep[p]) {
          for (int r = 0; r < d1; ++r) {
            vp[p * d1 + r] = -1;
            bp[p * d1 + r] = 0.f;
          }
          continue;
        }
        embed_point(f + p * d, d, scale, keys, bp + p * d1);
        // Neighbouring pixels often fall in the same simplex: reuse its vertex ids without hashing.
        if (prev >= 0 && std::memcmp(keys, prev_keys, sizeof(int32_t) * d1 * d) == 0) {
          std::copy(vp + prev * d1, vp + prev * d1 + d1, vp + p * d1);
        } else {
          for (int r = 0; r < d1; ++r) vp[p * d1 + r] = tables[b].insert(keys + r * d);
          std::copy(keys, keys + d1 * d, prev_keys);
        }
        prev = p;
      }
    }
  });

  std::vector<int64_t> voff(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) voff[b + 1] = voff[b] + tables[b].size();
  const int64_t V = voff[batch];
  TORCH_CHECK(V < (int64_t(1) << 31), "lattice build: too many lattice vertices (", V, ")");
  torch::Tensor per_image = torch::empty({batch}, torch::TensorOptions().dtype(torch::kInt64));
  for (int64_t b = 0; b < batch; ++b) per_image.data_ptr<int64_t>()[b] = tables[b].size();

  // 2. Local -> global vertex ids.
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int32_t off = static_cast<int32_t>(voff[b]);
      if (off == 0) continue;
      for (int64_t e = b * n * d1; e < (b + 1) * n * d1; ++e) {
        if (vp[e] >= 0) vp[e] += off;
      }
    }
  });

  // 3. Neighbours along each of the D+1 axes (read-only lookups, parallel over vertices).
  torch::Tensor nbr = torch::empty({V, d1, 2}, i32);
  int32_t* np = nbr.data_ptr<int32_t>();
  at::parallel_for(0, V, 1024, [&](int64_t lo, int64_t hi) {
    int32_t nk[kMaxD];
    int64_t b = std::upper_bound(voff.begin(), voff.end(), lo) - voff.begin() - 1;
    for (int64_t v = lo; v < hi; ++v) {
      while (v >= voff[b + 1]) ++b;
      const KeyTable& t = tables[b];
      const int32_t* key = t.key(v - voff[b]);
      for (int a = 0; a < d1; ++a) {
        for (int dir = 0; dir < 2; ++dir) {
          neighbour_key(key, d, a, dir, nk);
          const int32_t id = t.find(nk);
          np[(v * d1 + a) * 2 + dir] = id < 0 ? -1 : id + static_cast<int32_t>(voff[b]);
        }
      }
    }
  });

  // The CPU filter scatters in pixel order and needs no splat CSR (the CUDA build makes one).
  torch::Tensor none = torch::empty({0}, torch::TensorOptions().dtype(torch::kInt64));
  return {vtx, bary, nbr, none, none.to(torch::kInt32), per_image};
}

// values (P, C) float32 -> alpha * S' B S values (transpose: blur axes in reverse order, the exact adjoint).
torch::Tensor filter(torch::Tensor values, torch::Tensor vtx, torch::Tensor bary, torch::Tensor nbr,
                     torch::Tensor csr_ptr, torch::Tensor csr_idx, bool transpose, int64_t batch) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == torch::kFloat32 && values.dim() == 2,
              "lattice filter: values must be (P, C) float32 on the CPU");
  values = values.contiguous();
  const int64_t P = values.size(0);
  const int64_t C = values.size(1);
  const int d1 = static_cast<int>(vtx.size(1));
  const int d = d1 - 1;
  const int64_t V = nbr.size(0);
  TORCH_CHECK(vtx.size(0) == P, "lattice filter: values have ", P, " pixels, the lattice ", vtx.size(0));
  TORCH_CHECK(batch >= 1 && P % batch == 0, "lattice filter: P must be a multiple of the batch size");

  const float* in = values.data_ptr<float>();
  const float* bp = bary.data_ptr<float>();
  const int32_t* vp = vtx.data_ptr<int32_t>();
  const int32_t* np = nbr.data_ptr<int32_t>();

  torch::Tensor buf_a = torch::empty({V, C}, values.options());  // every column is written by the splat
  torch::Tensor buf_b = torch::empty({V, C}, values.options());
  float* a = buf_a.data_ptr<float>();
  float* bb = buf_b.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));

  // Splat: scatter in pixel order, so each sum has the same order whatever the thread count (deterministic).
  // Tasks are (image, channel chunk) pairs: images own disjoint vertex ranges, and chunks split the channels
  // only when there are fewer images than threads. Each task accumulates into a private buffer (no false
  // sharing) and copies back the vertex rows of its image, the [min, max] of the ids it touched.
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
        }
      }
      for (int64_t v = vmin; v <= vmax; ++v) {
        std::copy(acc.data() + v * cw, acc.data() + (v + 1) * cw, a + v * C + c0);
      }
    }
  });

  // Blur with [1/2, 1, 1/2] along each axis; absent neighbours hold 0.
  for (int step = 0; step < d1; ++step) {
    const int ax = transpose ? d - step : step;
    at::parallel_for(0, V, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t v = lo; v < hi; ++v) {
        const int32_t n0 = np[(v * d1 + ax) * 2];
        const int32_t n1 = np[(v * d1 + ax) * 2 + 1];
        const float* self = a + v * C;
        float* dst = bb + v * C;
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
    std::swap(a, bb);
  }

  // Slice with the same barycentric weights.
  torch::Tensor out = torch::empty({P, C}, values.options());
  float* op = out.data_ptr<float>();
  const float alpha = lattice_alpha(d);
  at::parallel_for(0, P, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      float* dst = op + p * C;
      std::fill(dst, dst + C, 0.f);
      for (int r = 0; r < d1; ++r) {
        const int32_t v = vp[p * d1 + r];
        if (v < 0) continue;
        const float w = alpha * bp[p * d1 + r];
        const float* src = a + static_cast<int64_t>(v) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += w * src[c];
      }
    }
  });
  return out;
}

}  // namespace nclib

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nclib permutohedral lattice, CPU kernel";
  m.def("build", &nclib::build, "Build the lattice for a batch of (P, D) features");
  m.def("filter", &nclib::filter, "Splat, blur and slice (P, C) values; transpose=True applies the adjoint");
}
