// CPU permutohedral lattice: build (embed + hash + neighbours) and filter (splat, blur, slice), and the fused
// symmetric filter (L + L') v of the NC loss (torch.ops.nclib_both.filter_sym) from the same splat, blur and slice.
// Parallel with ATen's primitives (at::parallel_for), so torch.set_num_threads governs it. Results do not depend
// on the thread count: every sum is taken in a fixed order, and vertex ids are first-touch ids in pixel order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "lattice_common.h"
#include "lattice_rows_cpu.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nclib {
namespace {

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

// embed_point() of lattice_common.h for kLanes pixels at once; with the dimension known at compile time (D > 0)
// the lane loops vectorise (D = 0: runtime dimension dr). Every double operation is the one embed_point() does,
// in the same order, never fused (-ffp-contract=off), so keys and weights are bitwise those of the CUDA kernel
// (tests/test_cuda.py's host emulation compares them).
constexpr int kLanes = 8;

// Corner keys and their hashes for kLanes pixels (struct of arrays: the key loops vectorise too).
struct LaneKeys {
  int32_t key[kMaxD + 1][kMaxD][kLanes];
  uint32_t hash[kMaxD + 1][kLanes];
};

// Multipliers of the block-local key hash (sum of key[i] * mult[i], mod 2^32): cheap and vectorisable.
constexpr uint32_t kHashMult[kMaxD] = {0x9E3779B1u, 0x85EBCA77u, 0xC2B2AE3Du, 0x27D4EB2Fu, 0x165667B1u, 0xD3A2646Bu,
                                       0xFD7046C5u, 0xB55A4F09u, 0x8CB92BA7u, 0xE6546B65u, 0x2545F491u, 0x9FB21C65u,
                                       0xC13FA9A9u, 0x91E10DA5u, 0xA54FF53Bu, 0x510E527Fu};

inline uint32_t key_hash(const int32_t* key, int d) {
  uint32_t h = 0;
  for (int i = 0; i < d; ++i) h += static_cast<uint32_t>(key[i]) * kHashMult[i];
  return h;
}

template <int D>
void embed_lanes(const float* pos, int lanes, int dr, const double* scale, LaneKeys& out, float* bary) {
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
  }
  // Corner r: rem0 + r, less d+1 on the coordinates ranked above d - r (embed_point's keys).
  for (int r = 0; r <= d; ++r) {
    uint32_t h[kLanes] = {0};
    for (int i = 0; i < d; ++i) {
      for (int l = 0; l < kLanes; ++l) {
        const int32_t k = rem0[i][l] + (rank[i][l] <= d - r ? r : r - (d + 1));
        out.key[r][i][l] = k;
        h[l] += static_cast<uint32_t>(k) * kHashMult[i];
      }
    }
    for (int l = 0; l < kLanes; ++l) out.hash[r][l] = h[l];
  }
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
// embed_lanes() with AVX-512 intrinsics, 8 pixels per register: the same double operations (explicit multiplies
// and subtractions, never fused), so the results are bitwise those of embed_point().
template <int D>
void embed_lanes_avx512(const float* pos, int lanes, const double* scale, LaneKeys& out, float* bary) {
  constexpr int d = D, d1 = D + 1;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // Feature row of each lane; tail lanes (beyond `lanes`) read pixel 0 and are never stored.
  const __mmask8 real = _mm256_cmpgt_epi32_mask(_mm256_set1_epi32(lanes), lane);
  const __m256i row = _mm256_mullo_epi32(_mm256_maskz_mov_epi32(real, lane), _mm256_set1_epi32(d));
  __m512d el[d1];
  __m512d sm = _mm512_setzero_pd();
  for (int i = d; i >= 1; --i) {
    const __m256 x = _mm256_i32gather_ps(pos + i - 1, row, 4);
    const __m512d cf = _mm512_mul_pd(_mm512_cvtps_pd(x), _mm512_set1_pd(scale[i - 1]));
    el[i] = _mm512_sub_pd(sm, _mm512_mul_pd(_mm512_set1_pd(static_cast<double>(i)), cf));
    sm = _mm512_add_pd(sm, cf);
  }
  el[0] = sm;
  const __m512d down_scale = _mm512_set1_pd(1.0 / (d + 1));
  const __m512d dd1 = _mm512_set1_pd(static_cast<double>(d + 1));
  const __m256i id1 = _mm256_set1_epi32(d + 1);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i rem0[d1], rank[d1];
  __m512d resid[d1];
  __m256i sum = _mm256_setzero_si256();
  for (int i = 0; i <= d; ++i) {
    const __m512d v = _mm512_mul_pd(el[i], down_scale);
    const __m512d up = _mm512_roundscale_pd(v, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __m512d down = _mm512_roundscale_pd(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __mmask8 take_up = _mm512_cmp_pd_mask(_mm512_sub_pd(_mm512_mul_pd(up, dd1), el[i]),
                                                _mm512_sub_pd(el[i], _mm512_mul_pd(down, dd1)), _CMP_LT_OQ);
    const __m256i k = _mm512_cvttpd_epi32(_mm512_mask_mov_pd(down, take_up, up));
    rem0[i] = _mm256_mullo_epi32(k, id1);
    resid[i] = _mm512_sub_pd(el[i], _mm512_cvtepi32_pd(rem0[i]));
    sum = _mm256_add_epi32(sum, k);
    rank[i] = _mm256_setzero_si256();
  }
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const __mmask8 lt = _mm512_cmp_pd_mask(resid[i], resid[j], _CMP_LT_OQ);  // ties rank j higher
      rank[i] = _mm256_mask_add_epi32(rank[i], lt, rank[i], one);
      rank[j] = _mm256_mask_add_epi32(rank[j], static_cast<__mmask8>(~lt), rank[j], one);
    }
  }
  const __m256i zero = _mm256_setzero_si256();
  const __mmask8 pos_sum = _mm256_cmpgt_epi32_mask(sum, zero), neg_sum = _mm256_cmpgt_epi32_mask(zero, sum);
  for (int i = 0; i <= d; ++i) {
    const __mmask8 wrap_down = pos_sum & _mm256_cmpge_epi32_mask(rank[i], _mm256_sub_epi32(id1, sum));
    const __mmask8 wrap_up = neg_sum & _mm256_cmpgt_epi32_mask(_mm256_sub_epi32(zero, sum), rank[i]);
    const __m256i wrap = _mm256_mask_mov_epi32(_mm256_mask_mov_epi32(zero, wrap_up, id1), wrap_down,
                                               _mm256_sub_epi32(zero, id1));
    rem0[i] = _mm256_add_epi32(rem0[i], wrap);
    rank[i] = _mm256_add_epi32(_mm256_add_epi32(rank[i], sum), wrap);
  }
  // by_rank[k] = (el[i] - rem0[i]) / (d+1) of the coordinate i ranked k (exactly one per lane): a select, no sum.
  __m512d by_rank[d1];
  for (int k = 0; k <= d; ++k) by_rank[k] = _mm512_setzero_pd();
  for (int i = 0; i <= d; ++i) {
    const __m512d v = _mm512_mul_pd(_mm512_sub_pd(el[i], _mm512_cvtepi32_pd(rem0[i])), down_scale);
    for (int k = 0; k <= d; ++k) {
      by_rank[k] = _mm512_mask_mov_pd(by_rank[k], _mm256_cmpeq_epi32_mask(rank[i], _mm256_set1_epi32(k)), v);
    }
  }
  const __mmask8 store = static_cast<__mmask8>((1u << lanes) - 1);
  const __m256i brow = _mm256_mullo_epi32(lane, id1);
  for (int r = 0; r <= d; ++r) {
    const __m512d b = r == 0 ? _mm512_add_pd(by_rank[d], _mm512_sub_pd(_mm512_set1_pd(1.0), by_rank[0]))
                             : _mm512_sub_pd(by_rank[d - r], by_rank[d + 1 - r]);
    _mm256_mask_i32scatter_ps(bary + r, store, brow, _mm512_cvtpd_ps(b), 4);
  }
  for (int r = 0; r <= d; ++r) {
    __m256i h = zero;
    for (int i = 0; i < d; ++i) {
      // Corner r: rem0 + r, less d+1 on the coordinates ranked above d - r.
      const __mmask8 above = _mm256_cmpgt_epi32_mask(rank[i], _mm256_set1_epi32(d - r));
      const __m256i k = _mm256_add_epi32(rem0[i], _mm256_mask_mov_epi32(_mm256_set1_epi32(r), above,
                                                                        _mm256_set1_epi32(r - (d + 1))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.key[r][i]), k);
      h = _mm256_add_epi32(h, _mm256_mullo_epi32(k, _mm256_set1_epi32(static_cast<int32_t>(kHashMult[i]))));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.hash[r]), h);
  }
}
#endif

// Open-addressing table from a D-int key to a dense id (insertion order), growing at half load; slots hold the
// key's hash (key_hash) beside its id, so a probe compares keys only on a hash match. reset() keeps the memory.
template <int D>
class KeyTable {
 public:
  void reset(int d, int64_t expected) {
    d_ = D > 0 ? D : d;
    int64_t cap = 64;
    shift_ = 26;
    while (cap < 2 * expected) {
      cap <<= 1;
      --shift_;
    }
    ids_.assign(cap, -1);
    hashes_.resize(cap);
    keys_.clear();
    count_ = 0;
  }

  int32_t insert(const int32_t* key, uint32_t h) {
    if (2 * (count_ + 1) > static_cast<int64_t>(ids_.size())) grow();
    const uint32_t mask = static_cast<uint32_t>(ids_.size() - 1);
    for (uint32_t s = slot(h);; s = (s + 1) & mask) {
      const int32_t id = ids_[s];
      if (id < 0) {
        ids_[s] = static_cast<int32_t>(count_++);
        hashes_[s] = h;
        keys_.insert(keys_.end(), key, key + dim());
        return ids_[s];
      }
      if (hashes_[s] == h && same_key(keys_.data() + static_cast<int64_t>(id) * dim(), key)) return id;
    }
  }

  // Id of `key` (hash h), -1 when absent.
  int32_t find(const int32_t* key, uint32_t h) const {
    const uint32_t mask = static_cast<uint32_t>(ids_.size() - 1);
    for (uint32_t s = slot(h);; s = (s + 1) & mask) {
      const int32_t id = ids_[s];
      if (id < 0 || (hashes_[s] == h && same_key(keys_.data() + static_cast<int64_t>(id) * dim(), key))) return id;
    }
  }

  int64_t size() const { return count_; }
  const int32_t* key(int64_t id) const { return keys_.data() + id * dim(); }

  bool same_key(const int32_t* a, const int32_t* b) const {
    for (int i = 0; i < dim(); ++i) {
      if (a[i] != b[i]) return false;
    }
    return true;
  }

 private:
  int dim() const { return D > 0 ? D : d_; }
  // Fibonacci hashing: the top bits of h * 2^32/phi.
  uint32_t slot(uint32_t h) const { return (h * 0x9E3779B9u) >> shift_; }

  void grow() {
    std::vector<uint32_t> old_h(hashes_);
    std::vector<int32_t> old_id(ids_);
    ids_.assign(old_id.size() * 2, -1);
    hashes_.resize(ids_.size());
    --shift_;
    const uint32_t mask = static_cast<uint32_t>(ids_.size() - 1);
    for (size_t s = 0; s < old_id.size(); ++s) {
      if (old_id[s] < 0) continue;
      uint32_t t = slot(old_h[s]);
      while (ids_[t] >= 0) t = (t + 1) & mask;
      ids_[t] = old_id[s];
      hashes_[t] = old_h[s];
    }
  }

  int d_ = 0;
  int shift_ = 26;
  int64_t count_ = 0;
  std::vector<int32_t> ids_;
  std::vector<uint32_t> hashes_;
  std::vector<int32_t> keys_;
};

// Embed pixels [p0, p1) (those outside the roi get -1 / 0) and number their corners in the block-local table
// `local` in pixel order: vtx receives LOCAL ids. Touches only the block's own data, so blocks run in parallel.
// Neighbouring pixels share most corners: a corner is looked up among the previous pixel's before the table.
template <int D>
void embed_block(const float* f, const bool* keep, int dr, const double* scale, int64_t p0, int64_t p1,
                 KeyTable<D>& local, int32_t* vp, float* bp) {
  const int d = D > 0 ? D : dr;
  const int d1 = d + 1;
  LaneKeys lk;
  int32_t prev_key[kMaxD + 1][kMaxD], cur_key[kMaxD + 1][kMaxD];
  uint32_t prev_hash[kMaxD + 1];
  int32_t prev_id[kMaxD + 1];
  bool have_prev = false;
  for (int64_t q = p0; q < p1; q += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, p1 - q));
#if defined(__AVX512F__) && defined(__AVX512VL__)
    if constexpr (D > 0) {
      embed_lanes_avx512<D>(f + q * d, lanes, scale, lk, bp + q * d1);
    } else {
      embed_lanes<D>(f + q * d, lanes, d, scale, lk, bp + q * d1);
    }
#else
    embed_lanes<D>(f + q * d, lanes, d, scale, lk, bp + q * d1);
#endif
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
      for (int r = 0; r <= d; ++r) {
        for (int i = 0; i < d; ++i) cur_key[r][i] = lk.key[r][i][l];
        const uint32_t h = lk.hash[r][l];
        int32_t id = -1;
        if (have_prev) {
          for (int j = 0; j <= d; ++j) {
            if (prev_hash[j] == h && local.same_key(prev_key[j], cur_key[r])) {
              id = prev_id[j];
              break;
            }
          }
        }
        ids[r] = id >= 0 ? id : local.insert(cur_key[r], h);
      }
      for (int r = 0; r <= d; ++r) {
        for (int i = 0; i < d; ++i) prev_key[r][i] = cur_key[r][i];
        prev_hash[r] = lk.hash[r][l];
        prev_id[r] = ids[r];
      }
      have_prev = true;
    }
  }
}

// Pixels per build block: small enough for both cores on one image, large enough that the keys a block shares
// with its neighbours (merged serially) stay few.
constexpr int64_t kBlockPixels = 8192;

// Pixels per tile when the values are channel-major (NCHW): the splat gathers, the slice scatters a tile.
constexpr int64_t kTile = 16;

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
  static std::vector<std::vector<int32_t>> local_to_global;
  if (static_cast<int64_t>(local_to_global.size()) < nblocks) local_to_global.resize(nblocks);
  auto block_range = [&](int64_t blk) {
    const int64_t b = blk / per_image, j = blk % per_image;
    const int64_t len = (n + per_image - 1) / per_image;
    const int64_t p0 = b * n + std::min(n, j * len);
    return std::make_pair(p0, b * n + std::min(n, (j + 1) * len));
  };

  // 1. Embed and number keys per block (parallel over blocks); 2. merge the block tables of each image in block
  //    order (serial per image, parallel over images).
  // 1. Embed and number keys per block (parallel over blocks); 2. merge the block tables of each image in block
  //    order (serial per image, parallel over images); 3. local -> global ids (parallel over blocks);
  //    4. neighbours along each of the D+1 axes (read-only lookups, parallel over vertices).
  torch::Tensor nbr, per_image_count;
  auto build_dim = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    static std::vector<KeyTable<D>> locals;  // one instance per D, kept between builds
    if (static_cast<int64_t>(locals.size()) < nblocks) locals.resize(nblocks);
    {
      PhaseTimer t(kEmbedHash);
      at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t blk = lo; blk < hi; ++blk) {
          const auto [p0, p1] = block_range(blk);
          locals[blk].reset(d, (p1 - p0) / 4 + 16);
          embed_block<D>(f, keep, d, scale, p0, p1, locals[blk], vp, bp);
        }
      });
    }
    std::vector<KeyTable<D>> tables(batch);
    {
      PhaseTimer t(kMerge);
      at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          int64_t expected = 16;
          for (int64_t j = 0; j < per_image; ++j) expected += locals[b * per_image + j].size();
          tables[b].reset(d, expected / 2);
          for (int64_t j = 0; j < per_image; ++j) {
            const KeyTable<D>& loc = locals[b * per_image + j];
            std::vector<int32_t>& map = local_to_global[b * per_image + j];
            map.resize(loc.size());
            for (int64_t id = 0; id < loc.size(); ++id) map[id] = tables[b].insert(loc.key(id), key_hash(loc.key(id), d));
          }
        }
      });
    }

    std::vector<int64_t> voff(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) voff[b + 1] = voff[b] + tables[b].size();
    const int64_t V = voff[batch];
    TORCH_CHECK(V < (int64_t(1) << 31), "lattice build: too many lattice vertices (", V, ")");
    per_image_count = torch::empty({batch}, torch::TensorOptions().dtype(torch::kInt64));
    for (int64_t b = 0; b < batch; ++b) per_image_count.data_ptr<int64_t>()[b] = tables[b].size();

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

    // Half the lookups: along an axis the two directions are inverse steps, so when u is v's dir-0 neighbour, v is
    // u's dir-1 neighbour. Each v looks up its dir-0 neighbour u and fills both slots; the slot (u, a, 1) has one
    // possible writer (the key one step up from u), so the parallel writes never collide, and slots nobody
    // writes keep -1 (no such vertex).
    nbr = torch::full({V, d1, 2}, -1, i32);
    int32_t* np = nbr.data_ptr<int32_t>();
    PhaseTimer t(kNeighbours);
    at::parallel_for(0, V, 1024, [&](int64_t lo, int64_t hi) {
      int32_t nk[kMaxD];
      int64_t b = std::upper_bound(voff.begin(), voff.end(), lo) - voff.begin() - 1;
      for (int64_t v = lo; v < hi; ++v) {
        while (v >= voff[b + 1]) ++b;
        const KeyTable<D>& t = tables[b];
        const int32_t* key = t.key(v - voff[b]);
        for (int a = 0; a < d1; ++a) {
          neighbour_key(key, d, a, 0, nk);
          const int32_t id = t.find(nk, key_hash(nk, d));
          if (id < 0) continue;
          const int64_t u = id + voff[b];
          np[(v * d1 + a) * 2] = static_cast<int32_t>(u);
          np[(u * d1 + a) * 2 + 1] = static_cast<int32_t>(v);
        }
      }
    });
  };
  switch (d) {
    case 2: build_dim(std::integral_constant<int, 2>()); break;
    case 3: build_dim(std::integral_constant<int, 3>()); break;
    case 5: build_dim(std::integral_constant<int, 5>()); break;
    default: build_dim(std::integral_constant<int, 0>()); break;
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

namespace {

// The three steps of the filter, shared by filter() and filter_sym(): one implementation of each.

// The vertex ids of image b: the contiguous range [vmin, vmax]. Ids are first-touch ids, image by image, so the
// image's first vertex is corner 0 of its first pixel in the roi, and its last one precedes the next image's first
// (or is V - 1). False where no pixel of the image is in the roi (it owns no vertex).
bool image_vertices(const int32_t* vp, int64_t n, int d1, int64_t batch, int64_t V, int64_t b, int64_t& vmin,
                    int64_t& vmax) {
  const auto first_vertex = [&](int64_t image) -> int64_t {
    for (int64_t p = image * n; p < (image + 1) * n; ++p)
      if (vp[p * d1] >= 0) return vp[p * d1];
    return -1;
  };
  vmin = first_vertex(b);
  if (vmin < 0) return false;
  vmax = V - 1;
  for (int64_t next = b + 1; next < batch; ++next) {
    const int64_t v = first_vertex(next);
    if (v >= 0) {
      vmax = v - 1;
      break;
    }
  }
  return true;
}

// Splat: lat (V, C) (rows padded to padded_row(C) floats, the padding 0) = S values, scattered in pixel order, so
// each vertex's sum has the same order whatever the thread count (deterministic). Tasks are (image, vertex range)
// pairs: images own disjoint vertex ranges, and where there are fewer images than threads each image's range is
// split, every task scanning all of the image's pixels but adding only to its own vertices (rows of lat it alone
// writes; every row is written). ones (V) zeroed, or null: also S 1 (the degree's splat, in the same pass).
// channel_major: `in` is (batch, C, P / batch) (NCHW) instead of (P, C); each pixel's channels are gathered
// into a short row first, so the sums are the same floats in the same order as from pixel-major input.
// pre (P), or null: splat pre[p] * in[p] (the dense CRF's normalized kernels).
void splat(const float* in, int64_t P, int64_t C, const int32_t* vp, const float* bp, int d1, int64_t V,
           int64_t batch, float* lat, float* ones, bool channel_major, const float* pre = nullptr) {
  const int64_t n = P / batch;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = std::max<int64_t>(1, (threads + batch - 1) / batch);  // vertex ranges per image
  const int64_t S = padded_row(C);
  const float one = 1.0f;
  at::parallel_for(0, batch * parts, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> tile(channel_major ? static_cast<size_t>(kTile * C) : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / parts, j = task % parts;
      int64_t vmin, vmax;
      if (!image_vertices(vp, n, d1, batch, V, b, vmin, vmax)) continue;  // no pixel in the roi: no vertex
      const int64_t len = (vmax - vmin + parts) / parts;
      const int64_t r0 = vmin + j * len, r1 = std::min(vmax + 1, r0 + len);
      if (r0 >= r1) continue;
      const uint64_t count = static_cast<uint64_t>(r1 - r0);
      std::fill(lat + r0 * S, lat + r1 * S, 0.f);
      // channel-major input: the channels of kTile pixels at a time, read channel by channel (contiguous runs)
      auto load_tile = [&](int64_t p) {
        const int64_t t0 = p - b * n, tn = std::min(kTile, n - t0);
        for (int64_t c = 0; c < C; ++c) {
          const float* from = in + (b * C + c) * n + t0;
          for (int64_t i = 0; i < tn; ++i) tile[i * C + c] = from[i];
        }
      };
      for (int64_t p = b * n; p < (b + 1) * n; ++p) {
        const int32_t* ids = vp + p * d1;
        if (channel_major && (p - b * n) % kTile == 0) load_tile(p);
        if (ids[0] < 0) continue;  // outside the roi: all corners are -1
        const float* src = channel_major ? tile.data() + ((p - b * n) % kTile) * C : in + p * C;
        splat_pixel(src, C, ids, bp + p * d1, d1, lat + r0 * S, S, r0, pre != nullptr ? pre[p] : 1.0f, count);
        if (ones != nullptr) splat_pixel(&one, 1, ids, bp + p * d1, d1, ones + r0, 1, r0, 1.0f, count);
      }
    }
  });
}

// Blurs of up to 2^17 values per axis (~0.1 ms) run on the calling thread: D+1 thread wake-ups would cost more
// than the work. A row costs at least as much as 8 values (its two neighbour lookups), so a one-channel blur of a
// large lattice (the degree W 1: 129k vertices for the dense CRF's batch of two 321^2 images, 0.6 ms per axis on
// one thread) is parallel too; with C >= 8 the rule is the plain count of values.
int64_t row_grain(int64_t V, int64_t C) {
  const int64_t cost = std::max<int64_t>(C, 8);
  return V * cost <= (int64_t(1) << 17) ? std::max<int64_t>(V, 1) : std::max<int64_t>(1, 16384 / cost);
}

// One axis of the blur for vertices [lo, hi): tmp = a + (a at the two neighbours along ax) / 2, rows of C floats.
void blur_axis(const float* a, float* tmp, const int32_t* np, int64_t C, int d1, int ax, int64_t lo, int64_t hi) {
  for (int64_t v = lo; v < hi; ++v) {
    const int32_t n0 = np[(v * d1 + ax) * 2];
    const int32_t n1 = np[(v * d1 + ax) * 2 + 1];
    const float* self = a + v * C;
    float* dst = tmp + v * C;
    if (n0 >= 0 && n1 >= 0) {
      const float* x0 = a + static_cast<int64_t>(n0) * C;
      const float* x1 = a + static_cast<int64_t>(n1) * C;
      if (C == 1) {  // the degree's one channel: a masked vector per vertex cost 4x more
        dst[0] = self[0] + 0.5f * (x0[0] + x1[0]);
        continue;
      }
#if defined(__AVX512F__)
      // explicit vectors: gcc's auto-vectorised loop for a runtime C (21) ran mostly in its scalar epilogue
      const __m512 half = _mm512_set1_ps(0.5f);
      int64_t c = 0;
      if (C % 8 == 0) {  // padded rows: unmasked
        for (; c + 16 <= C; c += 16) {
          const __m512 s = _mm512_add_ps(_mm512_loadu_ps(x0 + c), _mm512_loadu_ps(x1 + c));
          _mm512_storeu_ps(dst + c, _mm512_add_ps(_mm512_loadu_ps(self + c), _mm512_mul_ps(half, s)));
        }
        if (c < C) {
          const __m256 s = _mm256_add_ps(_mm256_loadu_ps(x0 + c), _mm256_loadu_ps(x1 + c));
          _mm256_storeu_ps(dst + c, _mm256_add_ps(_mm256_loadu_ps(self + c),
                                                  _mm256_mul_ps(_mm512_castps512_ps256(half), s)));
          c = C;
        }
      }
      for (; c < C; c += 16) {
        const __mmask16 m = C - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1);
        const __m512 s = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x0 + c), _mm512_maskz_loadu_ps(m, x1 + c));
        _mm512_mask_storeu_ps(dst + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, self + c), _mm512_mul_ps(half, s)));
      }
#else
      for (int64_t c = 0; c < C; ++c) dst[c] = self[c] + 0.5f * (x0[c] + x1[c]);
#endif
    } else if (n0 >= 0 || n1 >= 0) {
      const float* x = a + static_cast<int64_t>(n0 >= 0 ? n0 : n1) * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = self[c] + 0.5f * x[c];
    } else {
      std::copy(self, self + C, dst);
    }
  }
}

// Blur lat (V, C) (C: the row length, padded_row of the channels) with [1/2, 1, 1/2] along each axis (transpose:
// in reverse axis order, the exact adjoint); absent neighbours hold 0. Ping-pongs between lat and tmp; returns the
// buffer holding the result.
float* blur(float* a, float* tmp, const int32_t* np, int64_t V, int64_t C, int d1, bool transpose) {
  const int64_t grain = row_grain(V, C);
  for (int step = 0; step < d1; ++step) {
    const int ax = transpose ? d1 - 1 - step : step;
    at::parallel_for(0, V, grain, [&](int64_t lo, int64_t hi) { blur_axis(a, tmp, np, C, d1, ax, lo, hi); });
    std::swap(a, tmp);
  }
  return a;
}

// blur(), where there are at least as many images as threads, with each image's vertices blurred along every axis
// by one task (neighbours never leave an image): one parallel region instead of one per axis, and no thread waits
// for the others between axes (dense CRF batch of two: 10-15% faster). The same floats either way.
float* blur(float* a, float* tmp, const int32_t* np, int64_t V, int64_t C, int d1, bool transpose,
            const int32_t* vp, int64_t n, int64_t batch) {
  if (batch < at::get_num_threads()) return blur(a, tmp, np, V, C, d1, transpose);
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t vmin, vmax;
      if (!image_vertices(vp, n, d1, batch, V, b, vmin, vmax)) continue;
      float* x = a;
      float* y = tmp;
      for (int step = 0; step < d1; ++step) {
        blur_axis(x, y, np, C, d1, transpose ? d1 - 1 - step : step, vmin, vmax + 1);
        std::swap(x, y);
      }
    }
  });
  return d1 % 2 == 0 ? a : tmp;
}

// Slice: out (P, C) = alpha S' lat with the splat's barycentric weights; deg (P) = alpha S' lat_deg when given.
// channel_major: `out` is (batch, C, P / batch); each pixel is sliced into a short row, then scattered.
void slice(float* out, int64_t P, int64_t C, const int32_t* vp, const float* bp, int d1, const float* lat,
           float* deg, const float* lat_deg, int64_t batch, bool channel_major) {
  const float alpha = lattice_alpha(d1 - 1);
  const int64_t S = padded_row(C);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  const int64_t n = P / batch;
  at::parallel_for(0, P, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> tile(channel_major ? static_cast<size_t>(kTile * C) : 0);
    int64_t p = lo;
    while (p < hi) {
      // channel-major output: up to kTile pixels of one image sliced into a tile, written channel by channel
      const int64_t b = p / n, q = p - b * n, tn = channel_major ? std::min({kTile, hi - p, n - q}) : 1;
      for (int64_t i = p; i < p + tn; ++i) {
        float* dst = channel_major ? tile.data() + (i - p) * C : out + i * C;
        slice_pixel(dst, C, vp + i * d1, bp + i * d1, d1, alpha, lat, S);
        if (deg != nullptr) slice_pixel(deg + i, 1, vp + i * d1, bp + i * d1, d1, alpha, lat_deg, 1);
      }
      if (channel_major) {
        for (int64_t c = 0; c < C; ++c) {
          float* to = out + (b * C + c) * n + q;
          for (int64_t i = 0; i < tn; ++i) to[i] = tile[i * C + c];
        }
      }
      p += tn;
    }
  });
}

// The splat / blur buffers of filter(), kept per calling thread between calls: the dense CRF filters the same
// lattice 20 times per image, and a fresh allocation of this size is fresh pages (faults and zeroing) every time.
// Above kScratchCap the buffer is `fresh`, a per-call tensor freed when the caller's `fresh` goes.
constexpr int64_t kScratchCap = int64_t(64) << 20;  // floats (256 MB)

float* lattice_scratch(int64_t count, torch::Tensor& fresh) {
  if (count > kScratchCap) {
    fresh = torch::empty({count}, torch::TensorOptions().dtype(torch::kFloat32));
    return fresh.data_ptr<float>();
  }
  thread_local std::vector<float> kept;
  if (static_cast<int64_t>(kept.size()) < count) kept.resize(static_cast<size_t>(count));
  return kept.data();
}

// (P, C) pixel-major, or (batch, C, P / batch) channel-major; returns (P, C).
std::pair<int64_t, int64_t> check_values(const torch::Tensor& values, const torch::Tensor& vtx, int64_t batch,
                                         bool channel_major, const char* op) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == torch::kFloat32, op,
              ": values must be float32 on the CPU");
  TORCH_CHECK(batch >= 1 && vtx.size(0) % batch == 0, op, ": P must be a multiple of the batch size");
  if (channel_major) {
    TORCH_CHECK(values.dim() == 3 && values.size(0) == batch && values.size(2) == vtx.size(0) / batch, op,
                ": channel-major values must be (B, C, H*W) = (", batch, ", C, ", vtx.size(0) / batch, ")");
    return {vtx.size(0), values.size(1)};
  }
  TORCH_CHECK(values.dim() == 2, op, ": values must be (P, C)");
  TORCH_CHECK(vtx.size(0) == values.size(0), op, ": values have ", values.size(0), " pixels, the lattice ",
              vtx.size(0));
  return {values.size(0), values.size(1)};
}

}  // namespace

// values (P, C) float32 -> alpha * S' B S values (transpose: blur axes in reverse order, the exact adjoint).
// channel_major: values and the result are (B, C, H*W) (NCHW, no transposes around the call) instead of (P, C).
torch::Tensor filter(torch::Tensor values, torch::Tensor vtx, torch::Tensor bary, torch::Tensor nbr,
                     torch::Tensor csr_ptr, torch::Tensor csr_idx, bool transpose, int64_t batch,
                     bool channel_major, std::optional<torch::Tensor> out_buffer) {
  const auto pc = check_values(values, vtx, batch, channel_major, "lattice filter");
  const int64_t P = pc.first, C = pc.second;  // not a structured binding: lambdas capture these
  values = values.contiguous();
  const int64_t V = nbr.size(0);
  const int d1 = static_cast<int>(vtx.size(1));
  const int32_t* vp = vtx.data_ptr<int32_t>();
  const float* bp = bary.data_ptr<float>();
  torch::Tensor fresh;
  const int64_t S = padded_row(C);
  float* a = lattice_scratch(2 * V * S, fresh);  // every row is written by the splat
  std::optional<PhaseTimer> timer(kSplat);
  splat(values.data_ptr<float>(), P, C, vp, bp, d1, V, batch, a, nullptr, channel_major);
  timer.emplace(kBlur);
  const float* lat = blur(a, a + V * S, nbr.data_ptr<int32_t>(), V, S, d1, transpose, vp, P / batch, batch);
  timer.emplace(kSlice);
  torch::Tensor out = out_buffer.has_value() ? *out_buffer : torch::empty_like(values);
  TORCH_CHECK(out.sizes() == values.sizes() && out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                  out.device().is_cpu() && out.data_ptr<float>() != values.data_ptr<float>(),
              "lattice filter: out must be a contiguous float32 CPU tensor shaped like values, not values itself");
  slice(out.data_ptr<float>(), P, C, vp, bp, d1, lat, nullptr, nullptr, batch, channel_major);
  return out;
}

// The dense CRF's lattice half of a mean-field step: B S (pre * values) for pixel-major values (P, C) and pre
// (P, 1), computed in buffer `a` with `tmp` for the blur's ping-pong, both (V, padded_row(C)); returns the one that
// holds the result. The slice is fused into the update (torch.ops.nclib_gauss.blur_slice_update).
torch::Tensor splat_blur(const torch::Tensor& values, const torch::Tensor& pre, const torch::Tensor& vtx,
                         const torch::Tensor& bary, const torch::Tensor& nbr, int64_t batch, const torch::Tensor& a,
                         const torch::Tensor& tmp) {
  const auto pc = check_values(values, vtx, batch, false, "splat_blur");
  const int64_t P = pc.first, C = pc.second;
  const int64_t V = nbr.size(0), S = padded_row(C);
  const int d1 = static_cast<int>(vtx.size(1));
  TORCH_CHECK(values.is_contiguous() && pre.is_contiguous() && pre.scalar_type() == torch::kFloat32 &&
                  pre.numel() == P,
              "splat_blur: values (P, C) and pre (P, 1) must be contiguous float32");
  for (const torch::Tensor* t : {&a, &tmp})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat32 && t->dim() == 2 && t->size(0) == V &&
                    t->size(1) == S,
                "splat_blur: buffers must be contiguous float32 (V, ", S, ")");
  splat(values.data_ptr<float>(), P, C, vtx.data_ptr<int32_t>(), bary.data_ptr<float>(), d1, V, batch,
        a.data_ptr<float>(), nullptr, false, pre.data_ptr<float>());
  const float* out = blur(a.data_ptr<float>(), tmp.data_ptr<float>(), nbr.data_ptr<int32_t>(), V, S, d1, false,
                          vtx.data_ptr<int32_t>(), P / batch, batch);
  return out == a.data_ptr<float>() ? a : tmp;
}

// (L + L') values, L = alpha S' B S and L' = alpha S' B' S (the NC loss needs (L + L') S for its gradient and
// S'(L + L')S / 2 = S'LS for its value): the two differ only in the order of the blur axes, so one splat serves
// both blurs and, the slice being linear, one slice of the blurred sum serves both. Same routines as filter(), so
// the output equals filter(v) + filter(v, transpose) to float rounding. with_norm: also the degree L 1 as (P, 1),
// bitwise filter(ones) (its own channel: same splat order, forward blur, slice); else an empty (0, 1) tensor.
std::vector<torch::Tensor> filter_sym(const torch::Tensor& values_in, const torch::Tensor& vtx,
                                      const torch::Tensor& bary, const torch::Tensor& nbr, int64_t batch,
                                      bool with_norm, bool channel_major) {
  const auto pc = check_values(values_in, vtx, batch, channel_major, "filter_sym");
  const int64_t P = pc.first, C = pc.second;
  const torch::Tensor values = values_in.contiguous();
  const int64_t V = nbr.size(0);
  const int d1 = static_cast<int>(vtx.size(1));
  const int32_t* vp = vtx.data_ptr<int32_t>();
  const int32_t* np = nbr.data_ptr<int32_t>();
  const float* bp = bary.data_ptr<float>();
  const int64_t S = padded_row(C);
  torch::Tensor bufs = torch::empty({4, V, S}, values.options());  // splat + copy, and a ping-pong buffer each
  float* fwd = bufs[0].data_ptr<float>();
  float* rev = bufs[2].data_ptr<float>();
  torch::Tensor nbufs = torch::zeros({with_norm ? 2 : 0, V}, values.options());
  float* ones = with_norm ? nbufs[0].data_ptr<float>() : nullptr;

  std::optional<PhaseTimer> timer(kSplat);
  splat(values.data_ptr<float>(), P, C, vp, bp, d1, V, batch, fwd, ones, channel_major);
  timer.emplace(kBlur);
  std::copy(fwd, fwd + V * S, rev);
  float* a = blur(fwd, bufs[1].data_ptr<float>(), np, V, S, d1, false, vp, P / batch, batch);
  const float* t = blur(rev, bufs[3].data_ptr<float>(), np, V, S, d1, true, vp, P / batch, batch);
  const float* deg_lat = with_norm ? blur(ones, nbufs[1].data_ptr<float>(), np, V, 1, d1, false, vp, P / batch, batch)
                                   : nullptr;
  at::parallel_for(0, V, row_grain(V, S), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo * S; i < hi * S; ++i) a[i] += t[i];
  });
  timer.emplace(kSlice);
  torch::Tensor out = torch::empty_like(values);
  torch::Tensor norm = torch::empty({with_norm ? P : 0, 1}, values.options());
  slice(out.data_ptr<float>(), P, C, vp, bp, d1, a, with_norm ? norm.data_ptr<float>() : nullptr, deg_lat, batch,
        channel_major);
  return {out, norm};
}

}  // namespace nclib

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nclib permutohedral lattice, CPU kernel";
  m.def("build", &nclib::build, "Build the lattice for a batch of (P, D) features");
  m.def("filter", &nclib::filter, "Splat, blur and slice (P, C) values (or (B, C, H*W) with channel_major); "
        "transpose=True applies the adjoint", py::arg("values"), py::arg("vtx"), py::arg("bary"), py::arg("nbr"),
        py::arg("csr_ptr"), py::arg("csr_idx"), py::arg("transpose"), py::arg("batch"),
        py::arg("channel_major") = false, py::arg("out") = py::none());
  m.def("profile", &nclib::profile, "Wall-clock ms of each phase of the last build and filter in this process");
}

// The dense CRF's lattice half of a mean-field step (nclib/crf.py).
TORCH_LIBRARY_FRAGMENT(nclib_meanfield, m) {
  m.def("splat_blur(Tensor values, Tensor pre, Tensor vtx, Tensor bary, Tensor nbr, int batch, Tensor a, "
        "Tensor tmp) -> Tensor",
        &nclib::splat_blur);
}

// The NC loss's fused operator, as a torch op (nclib/lattice.py calls torch.ops.nclib_both.filter_sym).
TORCH_LIBRARY_FRAGMENT(nclib_both, m) {
  m.def("filter_sym(Tensor values, Tensor vtx, Tensor bary, Tensor nbr, int batch, bool with_norm, "
        "bool channel_major=False) -> Tensor[]",
        &nclib::filter_sym);
}
