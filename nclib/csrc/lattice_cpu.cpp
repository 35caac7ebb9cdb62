// CPU permutohedral lattice: build (embed + hash + neighbours) and filter (splat, blur, slice).
// Parallel with ATen's primitives (at::parallel_for), so torch.set_num_threads governs it. Results do not depend
// on the thread count: every sum is taken in a fixed order, and vertex ids are first-touch ids in pixel order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "lattice_common.h"

namespace nclib {
namespace {

// Open-addressing hash map from a D-int key to a dense id (ids in insertion order), growing at half load.
class KeyTable {
 public:
  KeyTable() = default;
  KeyTable(int d, int64_t expected) { reset(d, expected); }

  // Empty the table for D-int keys, keeping its memory.
  void reset(int d, int64_t expected) {
    d_ = d;
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    slots_.assign(cap, -1);
    keys_.clear();
    count_ = 0;
  }

  int32_t insert(const int32_t* key) {
    if (2 * (count_ + 1) > static_cast<int64_t>(slots_.size())) grow();
    const int64_t s = find_slot(key);
    if (slots_[s] < 0) {
      slots_[s] = static_cast<int32_t>(count_++);
      keys_.insert(keys_.end(), key, key + d_);
    }
    return slots_[s];
  }

  int32_t find(const int32_t* key) const { return slots_[find_slot(key)]; }

  int64_t size() const { return count_; }
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
    slots_.assign(slots_.size() * 2, -1);
    const uint64_t mask = slots_.size() - 1;
    for (int64_t id = 0; id < count_; ++id) {
      uint64_t s = hash_key(key(id), d_) & mask;
      while (slots_[s] >= 0) s = (s + 1) & mask;
      slots_[s] = static_cast<int32_t>(id);
    }
  }

  int d_ = 0;
  int64_t count_ = 0;
  std::vector<int32_t> slots_;
  std::vector<int32_t> keys_;
};

// Wall-clock milliseconds of the phases of the last build() and filter() in this process (see profile()).
enum Phase { kEmbedHash, kMerge, kRemap, kNeighbours, kSplat, kBlur, kSlice, kPhases };
const char* const kPhaseNames[kPhases] = {"embed_hash", "merge", "remap", "neighbours", "splat", "blur", "slice"};
double g_phase_ms[kPhases] = {0};

class PhaseTimer {
 public:
  explicit PhaseTimer(Phase p) : p_(p), t0_(std::chrono::steady_clock::now()) {}
  ~PhaseTimer() {
    g_phase_ms[p_] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  Phase p_;
  std::chrono::steady_clock::time_point t0_;
};

// The simplex of one pixel: its remainder-0 point and the ranks of its residuals.
struct Simplex {
  int32_t rem0[kMaxD + 1];
  int32_t rank[kMaxD + 1];
};

// embed_point() of lattice_common.h for kLanes pixels at once; with the dimension known at compile time (D > 0)
// the lane loops vectorise (D = 0: runtime dimension dr). Every double operation is the one embed_point() does,
// in the same order, never fused (-ffp-contract=off), so keys and weights are bitwise those of the CUDA kernel
// (tests/test_cuda.py's host emulation compares them).
constexpr int kLanes = 8;

template <int D>
void embed_lanes(const float* pos, int lanes, int dr, const double* scale, Simplex* out, float* bary) {
  const int d = D > 0 ? D : dr;
  constexpr int kN = (D > 0 ? D : kMaxD) + 1;
  double el[kN][kLanes], resid[kN][kLanes], sm[kLanes];
  int32_t rem0[kN][kLanes], rank[kN][kLanes], sum[kLanes];
  for (int l = 0; l < kLanes; ++l) sm[l] = 0.0;
  for (int i = d; i >= 1; --i) {
    for (int l = 0; l < kLanes; ++l) {
      const double cf = static_cast<double>(pos[(l < lanes ? l : 0) * d + i - 1]) * scale[i - 1];
      el[i][l] = sm[l] - i * cf;
      sm[l] += cf;
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    el[0][l] = sm[l];
    sum[l] = 0;
  }
  const double down_scale = 1.0 / (d + 1);
  for (int i = 0; i <= d; ++i) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = el[i][l] * down_scale;
      const double up = std::ceil(v);
      const double down = std::floor(v);
      const int32_t k = static_cast<int32_t>((up * (d + 1) - el[i][l] < el[i][l] - down * (d + 1)) ? up : down);
      rem0[i][l] = k * (d + 1);
      resid[i][l] = el[i][l] - rem0[i][l];
      sum[l] += k;
      rank[i][l] = 0;
    }
  }
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      for (int l = 0; l < kLanes; ++l) {
        const int lt = resid[i][l] < resid[j][l];  // ties rank j higher
        rank[i][l] += lt;
        rank[j][l] += 1 - lt;
      }
    }
  }
  for (int i = 0; i <= d; ++i) {
    for (int l = 0; l < kLanes; ++l) {
      // sum > 0: the top `sum` ranks wrap down; sum < 0: the bottom -sum ranks wrap up.
      const int s = sum[l], r = rank[i][l];
      const int wrap = (s > 0 && r >= d + 1 - s) ? -(d + 1) : ((s < 0 && r < -s) ? d + 1 : 0);
      rem0[i][l] += wrap;
      rank[i][l] = r + s + wrap;
    }
  }
  for (int l = 0; l < lanes; ++l) {
    double by_rank[kMaxD + 1];
    for (int i = 0; i <= d; ++i) by_rank[rank[i][l]] = (el[i][l] - rem0[i][l]) * down_scale;
    // embed_point accumulates b[r] = (0 + v_a) - v_b or (0 - v_b) + v_a: both round like v_a - v_b.
    float* bw = bary + l * (d + 1);
    bw[0] = static_cast<float>(by_rank[d] + (1.0 - by_rank[0]));
    for (int r = 1; r <= d; ++r) bw[r] = static_cast<float>(by_rank[d - r] - by_rank[d + 1 - r]);
    for (int i = 0; i <= d; ++i) {
      out[l].rem0[i] = rem0[i][l];
      out[l].rank[i] = rank[i][l];
    }
  }
}

// Coordinates 0..D-1 of the remainder-0 point and of the ranks determine the simplex.
inline bool same_simplex(const Simplex& a, const Simplex& b, int d) {
  return std::memcmp(a.rem0, b.rem0, sizeof(int32_t) * d) == 0 && std::memcmp(a.rank, b.rank, sizeof(int32_t) * d) == 0;
}

// Embed pixels [p0, p1) (those outside the roi get -1 / 0) and number their corners in the block-local table
// `local` in pixel order: vtx receives LOCAL ids. Touches only the block's own data, so blocks run in parallel.
template <int D>
void embed_block(const float* f, const bool* keep, int dr, const double* scale, int64_t p0, int64_t p1,
                 KeyTable& local, int32_t* vp, float* bp) {
  const int d = D > 0 ? D : dr;
  const int d1 = d + 1;
  Simplex sx[kLanes], last;
  int64_t prev = -1;
  int32_t keys[(kMaxD + 1) * kMaxD];
  for (int64_t q = p0; q < p1; q += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, p1 - q));
    embed_lanes<D>(f + q * d, lanes, d, scale, sx, bp + q * d1);
    for (int l = 0; l < lanes; ++l) {
      const int64_t p = q + l;
      int32_t* ids = vp + p * d1;
      if (keep && !keep[p]) {
        for (int r = 0; r < d1; ++r) {
          ids[r] = -1;
          bp[p * d1 + r] = 0.f;
        }
        continue;
      }
      const Simplex& s = sx[l];
      if (prev >= 0 && same_simplex(s, last, d)) {  // neighbouring pixels often share it: no hashing
        std::memcpy(ids, vp + prev * d1, sizeof(int32_t) * d1);
      } else {
        for (int r = 0; r <= d; ++r) {
          int32_t* k = keys + r * d;
          for (int i = 0; i < d; ++i) k[i] = s.rem0[i] + (s.rank[i] <= d - r ? r : r - (d + 1));
          ids[r] = local.insert(k);
        }
        last = s;
      }
      prev = p;
    }
  }
}

void embed_block_any(const float* f, const bool* keep, int d, const double* scale, int64_t p0, int64_t p1,
                     KeyTable& local, int32_t* vp, float* bp) {
  switch (d) {
    case 2: return embed_block<2>(f, keep, d, scale, p0, p1, local, vp, bp);
    case 3: return embed_block<3>(f, keep, d, scale, p0, p1, local, vp, bp);
    case 5: return embed_block<5>(f, keep, d, scale, p0, p1, local, vp, bp);
    default: return embed_block<0>(f, keep, d, scale, p0, p1, local, vp, bp);
  }
}

// Pixels per build block: small enough for both cores on one image, large enough that the keys a block shares
// with its neighbours (merged serially) stay few.
constexpr int64_t kBlockPixels = 8192;

}  // namespace

// features (P, D) float32 contiguous; roi (P) bool or empty; P = batch * pixels_per_image.
//
// Vertex ids are first-touch ids: image by image, in the order of the first (pixel, corner) flat index that
// touches a vertex (the CUDA kernel numbers them the same way). Three steps keep that order with parallel blocks:
// each block of pixels numbers its keys locally in pixel order; the blocks' key lists are merged serially, in
// block order, into the image's table (a key's global id is set by the first block that has it, and within
// that block by its first pixel); then every entry is mapped from local to global id.
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

  // Blocks never straddle images. Their tables are kept between calls (reset, not reallocated).
  const int64_t per_image = std::max<int64_t>(1, (n + kBlockPixels - 1) / kBlockPixels);
  const int64_t nblocks = batch * per_image;
  static std::vector<KeyTable> locals;
  static std::vector<std::vector<int32_t>> local_to_global;
  if (static_cast<int64_t>(locals.size()) < nblocks) {
    locals.resize(nblocks);
    local_to_global.resize(nblocks);
  }
  auto block_range = [&](int64_t blk) {
    const int64_t b = blk / per_image, j = blk % per_image;
    const int64_t len = (n + per_image - 1) / per_image;
    const int64_t p0 = b * n + std::min(n, j * len);
    return std::make_pair(p0, b * n + std::min(n, (j + 1) * len));
  };

  // 1. Embed and number keys per block (parallel over blocks).
  {
    PhaseTimer t(kEmbedHash);
    at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const auto [p0, p1] = block_range(blk);
        locals[blk].reset(d, (p1 - p0) / 4 + 16);
        embed_block_any(f, keep, d, scale, p0, p1, locals[blk], vp, bp);
      }
    });
  }

  // 2. Merge the block tables of each image in block order (serial per image, parallel over images).
  std::vector<KeyTable> tables(batch);
  {
    PhaseTimer t(kMerge);
    at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        int64_t expected = 16;
        for (int64_t j = 0; j < per_image; ++j) expected += locals[b * per_image + j].size();
        tables[b].reset(d, expected / 2);
        for (int64_t j = 0; j < per_image; ++j) {
          const KeyTable& loc = locals[b * per_image + j];
          std::vector<int32_t>& map = local_to_global[b * per_image + j];
          map.resize(loc.size());
          for (int64_t id = 0; id < loc.size(); ++id) map[id] = tables[b].insert(loc.key(id));
        }
      }
    });
  }

  std::vector<int64_t> voff(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) voff[b + 1] = voff[b] + tables[b].size();
  const int64_t V = voff[batch];
  TORCH_CHECK(V < (int64_t(1) << 31), "lattice build: too many lattice vertices (", V, ")");
  torch::Tensor per_image_count = torch::empty({batch}, torch::TensorOptions().dtype(torch::kInt64));
  for (int64_t b = 0; b < batch; ++b) per_image_count.data_ptr<int64_t>()[b] = tables[b].size();

  // 3. Local -> global vertex ids (parallel over blocks).
  {
    PhaseTimer t(kRemap);
    at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t blk = lo; blk < hi; ++blk) {
        const auto [p0, p1] = block_range(blk);
        const int32_t off = static_cast<int32_t>(voff[blk / per_image]);
        const int32_t* map = local_to_global[blk].data();
        for (int64_t e = p0 * d1; e < p1 * d1; ++e) {
          if (vp[e] >= 0) vp[e] = map[vp[e]] + off;
        }
      }
    });
  }

  // 4. Neighbours along each of the D+1 axes (read-only lookups, parallel over vertices).
  torch::Tensor nbr = torch::empty({V, d1, 2}, i32);
  int32_t* np = nbr.data_ptr<int32_t>();
  {
    PhaseTimer t(kNeighbours);
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
  }

  // The CPU filter scatters in pixel order and needs no splat CSR (the CUDA build makes one).
  torch::Tensor none = torch::empty({0}, torch::TensorOptions().dtype(torch::kInt64));
  return {vtx, bary, nbr, none, none.to(torch::kInt32), per_image_count};
}

// Phase times (ms) of the last build and filter in this process: for scripts/profile_lattice.py.
std::vector<std::pair<std::string, double>> profile() {
  std::vector<std::pair<std::string, double>> out;
  for (int i = 0; i < kPhases; ++i) out.emplace_back(kPhaseNames[i], g_phase_ms[i]);
  return out;
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
  std::optional<PhaseTimer> timer(kSplat);
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
  timer.emplace(kBlur);
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
  timer.emplace(kSlice);
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
  timer.reset();
  return out;
}

}  // namespace nclib

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nclib permutohedral lattice, CPU kernel";
  m.def("build", &nclib::build, "Build the lattice for a batch of (P, D) features");
  m.def("filter", &nclib::filter, "Splat, blur and slice (P, C) values; transpose=True applies the adjoint");
  m.def("profile", &nclib::profile, "Wall-clock ms of each phase of the last build and filter in this process");
}
