// CUDA permutohedral lattice: build (embed + hash + neighbours + splat CSR) and filter (splat, blur, slice).
//
// Same contract and data layout as the CPU kernel (see lattice_common.h), and the SAME lattice:
//   * the embedding, the tie-breaking and the neighbour keys are the shared functions of lattice_common.h;
//   * vertex ids are numbered exactly like the CPU hash table numbers them: image by image, in the order of the
//     first (pixel, corner) flat index p*(D+1)+r that touches a vertex. On the GPU that order is obtained without
//     any sequential pass: a hash table keeps, per key, the MINIMUM flat index (atomicMin), an entry is the
//     representative of its vertex when it is that minimum, and an inclusive scan over the representative flags
//     numbers the vertices in increasing flat order. Hence vtx, nbr and the per-image counts are identical to the
//     CPU ones, and independent of thread scheduling, given identically rounded embeddings (no fused
//     multiply-add on either side: nvcc -fmad=false, g++ -ffp-contract=off); csr_ptr/csr_idx are the CSR the
//     layout contract defines (the CPU build, which scatters, returns them empty);
//   * the splat is a gather over each vertex's CSR list (sorted flat indices, made with torch's stable sort), cut
//     into fixed segments: one warp per segment with a fixed-order butterfly sum, segment sums added in order;
//     the blur and slice read fixed neighbours: no
//     floating-point atomics, so results are bitwise reproducible run to run. Float products and sums use
//     explicit round-to-nearest intrinsics (never contracted into FMA); blur and slice add in the CPU loops'
//     order, the splat in fixed segments of 32 strided partial sums, so GPU and CPU outputs agree to float rounding.
// Every buffer comes from PyTorch's caching allocator on the input's device, every launch goes to the current
// stream, the whole batch is handled by each launch. One device-to-host copy per build (vertex counts), none per
// filter (its sizes come from the tensors' shapes).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "lattice_common.h"

#ifndef NCLIB_CUDA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define NCLIB_GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)
// Launch `kernel` over a grid-stride loop of n items on the current stream (nothing to do for n == 0).
#define NCLIB_LAUNCH(kernel, n, ...)                                                  \
  do {                                                                              \
    if ((n) > 0) {                                                                  \
      kernel<<<nclib::blocks_for(n), nclib::kThreads, 0, stream>>>(__VA_ARGS__);  \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                               \
    }                                                                               \
  } while (0)
#define NCLIB_ON_DEVICE_OF(t)                 \
  c10::cuda::CUDAGuard guard((t).device()); \
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream((t).device().index()).stream()
#else
// Host emulation, for machines without a GPU (tests/test_cuda.py compiles this file as C++ with
// NCLIB_CUDA_EMULATE defined, on CPU tensors): each launch runs its grid-stride loop on one host thread, in
// DECREASING index order (a legal GPU schedule that makes larger entries claim hash slots first, so the
// atomicMin path is exercised), and the atomics are plain read-modify-writes. It runs the very kernel code
// below against the CPU kernel; it cannot show races or launch errors, which only a GPU run can
// (scripts/gpu_check.sh).
#define __global__
#define __device__
#define __forceinline__ inline
#define NCLIB_GRID_LOOP(i, n) for (int64_t i = (n) - 1; i >= 0; --i)
#define NCLIB_LAUNCH(kernel, n, ...) \
  do {                               \
    if ((n) > 0) kernel(__VA_ARGS__); \
  } while (0)
#define NCLIB_ON_DEVICE_OF(t) \
  do {                        \
  } while (0)
inline int32_t atomicCAS(int32_t* p, int32_t expected, int32_t desired) {
  const int32_t old = *p;
  if (old == expected) *p = desired;
  return old;
}
inline int32_t atomicMin(int32_t* p, int32_t v) {
  const int32_t old = *p;
  if (v < old) *p = v;
  return old;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
#endif

namespace nclib {
namespace {

constexpr int kThreads = 256;
constexpr int32_t kEmpty = INT32_MAX;  // empty hash slot (entry indices are < 2^30)

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < (int64_t(1) << 30) ? b : (int64_t(1) << 30));
}

// Slot hash of a key of image b (keys of different images never meet).
__device__ __forceinline__ uint64_t slot_hash(const int32_t* key, int d, int64_t b) {
  uint64_t h = hash_key(key, d) ^ (static_cast<uint64_t>(b) * 0xD6E8FEB86659FD93ull);
  h ^= h >> 32;
  h *= 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  return h;
}

__device__ __forceinline__ bool keys_equal(const int32_t* a, const int32_t* b, int d) {
  for (int i = 0; i < d; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// Per-axis embedding scales, computed once on the host with embed_scales() exactly as the CPU kernel does.
struct Scales {
  double s[kMaxD];
};

// 1. One thread per pixel: D+1 corner keys and barycentric weights (0 outside the roi).
__global__ void embed_kernel(const float* __restrict__ f, const bool* __restrict__ keep, int d, Scales scales,
                             int64_t P, int32_t* __restrict__ keys, float* __restrict__ bary) {
  const int d1 = d + 1;
  NCLIB_GRID_LOOP(p, P) {
    if (keep != nullptr && !keep[p]) {
      for (int r = 0; r < d1; ++r) bary[p * d1 + r] = 0.f;
      continue;
    }
    embed_point(f + p * d, d, scales.s, keys + p * d1 * d, bary + p * d1);
  }
}

// 2. One thread per (pixel, corner) entry: insert its key; the slot ends up holding the smallest entry index
//    with that key (slots only go EMPTY -> entry -> smaller entry of the same key, so a stale read is harmless).
__global__ void insert_kernel(const int32_t* __restrict__ keys, const bool* __restrict__ keep, int d, int64_t E,
                              int64_t image_entries, int32_t* slots, int64_t mask, int32_t* __restrict__ entry_slot) {
  const int d1 = d + 1;
  NCLIB_GRID_LOOP(e, E) {
    if (keep != nullptr && !keep[e / d1]) {
      entry_slot[e] = -1;
      continue;
    }
    const int32_t me = static_cast<int32_t>(e);
    const int32_t* key = keys + e * d;
    const int64_t b = e / image_entries;
    int64_t s = static_cast<int64_t>(slot_hash(key, d, b) & static_cast<uint64_t>(mask));
    while (true) {
      int32_t cur = *reinterpret_cast<volatile int32_t*>(slots + s);
      if (cur == kEmpty) {
        cur = atomicCAS(slots + s, kEmpty, me);
        if (cur == kEmpty) break;  // claimed an empty slot
      }
      if (cur / image_entries == b && keys_equal(keys + static_cast<int64_t>(cur) * d, key, d)) {
        if (me < cur) atomicMin(slots + s, me);
        break;
      }
      s = (s + 1) & mask;
    }
    entry_slot[e] = static_cast<int32_t>(s);
  }
}

// 3. Representative flag: the entry is the smallest flat index of its vertex. After an inclusive scan `incl`
//    of the flags, vertex id of representative entry e = incl[e] - 1 (ids in increasing flat order).
__global__ void flag_kernel(const int32_t* __restrict__ entry_slot, const int32_t* __restrict__ slots, int64_t E,
                            int32_t* __restrict__ flag) {
  NCLIB_GRID_LOOP(e, E) {
    const int32_t s = entry_slot[e];
    flag[e] = (s >= 0 && slots[s] == static_cast<int32_t>(e)) ? 1 : 0;
  }
}

// meta[b] = first global vertex id of image b (b = 0..B, meta[B] = V).
__global__ void offsets_kernel(const int32_t* __restrict__ incl, int64_t image_entries, int64_t batch,
                               int64_t* __restrict__ meta) {
  NCLIB_GRID_LOOP(b, batch + 1) {
    const int64_t e = b * image_entries;  // first entry of image b (E for b = batch)
    meta[b] = e == 0 ? 0 : static_cast<int64_t>(incl[e - 1]);
  }
}

// 4. Vertex id of every entry (-1 outside the roi), the representative entry of every vertex, sort inputs.
__global__ void assign_kernel(const int32_t* __restrict__ entry_slot, const int32_t* __restrict__ slots,
                              const int32_t* __restrict__ incl, int64_t E, int32_t* __restrict__ vtx,
                              int32_t* __restrict__ rep, int32_t* __restrict__ sort_key) {
  NCLIB_GRID_LOOP(e, E) {
    const int32_t s = entry_slot[e];
    if (s < 0) {
      vtx[e] = -1;
      sort_key[e] = INT32_MAX;  // after every vertex id
      continue;
    }
    const int32_t first = slots[s];
    const int32_t id = incl[first] - 1;
    vtx[e] = id;
    sort_key[e] = id;
    if (first == static_cast<int32_t>(e)) rep[id] = first;
  }
}

// 5. One thread per (vertex, axis): both neighbours by hash lookup; -1 where the neighbour is not occupied.
__global__ void neighbour_kernel(const int32_t* __restrict__ keys, const int32_t* __restrict__ slots, int64_t mask,
                                 const int32_t* __restrict__ incl, const int32_t* __restrict__ rep, int d, int64_t V,
                                 int64_t image_entries, int32_t* __restrict__ nbr) {
  const int d1 = d + 1;
  NCLIB_GRID_LOOP(t, V * d1) {
    const int64_t v = t / d1;
    const int a = static_cast<int>(t - v * d1);
    const int32_t first = rep[v];
    const int64_t b = first / image_entries;
    const int32_t* key = keys + static_cast<int64_t>(first) * d;
    int32_t nk[kMaxD];
    for (int dir = 0; dir < 2; ++dir) {
      neighbour_key(key, d, a, dir, nk);
      int64_t s = static_cast<int64_t>(slot_hash(nk, d, b) & static_cast<uint64_t>(mask));
      int32_t id = -1;
      while (true) {
        const int32_t cur = slots[s];
        if (cur == kEmpty) break;
        if (cur / image_entries == b && keys_equal(keys + static_cast<int64_t>(cur) * d, nk, d)) {
          id = incl[cur] - 1;
          break;
        }
        s = (s + 1) & mask;
      }
      nbr[t * 2 + dir] = id;
    }
  }
}

// 6. CSR row starts from the vertex-sorted entries (every vertex has at least one entry: its representative).
__global__ void csr_ptr_kernel(const int32_t* __restrict__ sorted_key, int64_t nnz, int64_t* __restrict__ ptr) {
  NCLIB_GRID_LOOP(i, nnz) {
    const int32_t k = sorted_key[i];
    if (i == 0 || sorted_key[i - 1] != k) ptr[k] = i;
  }
}

// Filter kernels: one thread per (row, channel); t = row * C + c so a warp reads/writes contiguous channels.
// Splat: a vertex may gather tens of thousands of entries (11k at 321^2, 25k at 2000^2 under sigma_xy = 100), so
// each CSR row is cut into fixed segments of kSegment entries and one warp takes one (segment, chunk of kSplatCh
// channels): the lanes split the segment (lane l takes entries l, l+32, ...) and the 32 partial sums are combined
// by a fixed butterfly. A row of one segment is written straight to the output; the segment sums of a longer row
// go to a scratch buffer and a second pass adds them in segment order. The segmentation depends only on the CSR,
// so the summation order is the same on every run: deterministic, and a hot vertex costs len/kSegment warps
// working in parallel plus a short ordered tail, not one warp walking len/32 steps.
constexpr int kWarp = 32;
constexpr int kSplatCh = 8;
constexpr int64_t kSegment = 16 * kWarp;  // entries per splat segment (16 per lane)

// Lane `lane`'s partial sums of channels c0 .. c0+cw-1 over the entries begin+lane, begin+lane+32, ... < end.
__device__ __forceinline__ void splat_lane_partial(const float* __restrict__ in, const float* __restrict__ bary,
                                                   const int32_t* __restrict__ idx, int64_t begin, int64_t end,
                                                   int lane, int d1, int64_t C, int64_t c0, int cw, float* acc) {
#pragma unroll
  for (int j = 0; j < kSplatCh; ++j) acc[j] = 0.f;
#pragma unroll 2
  for (int64_t k = begin + lane; k < end; k += kWarp) {
    const int64_t flat = idx[k];
    const float w = bary[flat];
    const float* src = in + (flat / d1) * C + c0;
#pragma unroll
    for (int j = 0; j < kSplatCh; ++j) {
      if (j < cw) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, src[j]));
    }
  }
}

// seg_count[v] = number of splat segments of vertex v's CSR row (>= 1; a row of <= kSegment entries is one).
__global__ void segment_count_kernel(const int64_t* __restrict__ ptr, int64_t V, int32_t* __restrict__ seg_count) {
  NCLIB_GRID_LOOP(v, V) {
    const int64_t len = ptr[v + 1] - ptr[v];
    seg_count[v] = static_cast<int32_t>(len <= kSegment ? 1 : (len + kSegment - 1) / kSegment);
  }
}

// The splat task of segment s (global number, segments of vertex v are seg_incl[v-1] .. seg_incl[v]-1 with
// seg_incl the inclusive scan of seg_count): its vertex (V when s is past the last segment), its entry range
// [begin, end) and whether it is its row's only segment.
struct SplatSegment {
  int64_t v, begin, end;
  bool whole_row;
};

__device__ __forceinline__ SplatSegment locate_segment(const int64_t* __restrict__ ptr,
                                                       const int32_t* __restrict__ seg_incl, int64_t V, int64_t s) {
  int64_t lo = 0, hi = V;  // first v with seg_incl[v] > s
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (seg_incl[mid] > s) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  SplatSegment seg{lo, 0, 0, false};
  if (lo == V) return seg;
  const int64_t first = lo == 0 ? 0 : seg_incl[lo - 1];
  seg.begin = ptr[lo] + (s - first) * kSegment;
  seg.end = ptr[lo + 1] < seg.begin + kSegment ? ptr[lo + 1] : seg.begin + kSegment;
  seg.whole_row = seg_incl[lo] - first == 1;
  return seg;
}

// Pass 1: one warp per (segment, channel chunk); tasks = segments_bound * chunks (tasks past the last segment do
// nothing). A whole row's sum goes to out[v], a segment's to partial[s].
#ifndef NCLIB_CUDA_EMULATE
__global__ void splat_kernel(const float* __restrict__ in, const float* __restrict__ bary,
                             const int64_t* __restrict__ ptr, const int32_t* __restrict__ idx,
                             const int32_t* __restrict__ seg_incl, int d1, int64_t V, int64_t segments_bound,
                             int64_t C, float* __restrict__ out, float* __restrict__ partial) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t chunks = (C + kSplatCh - 1) / kSplatCh;
  const int64_t first = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x / kWarp;
  for (int64_t task = first; task < segments_bound * chunks; task += stride) {  // uniform across the warp
    const int64_t s = task / chunks;
    const SplatSegment seg = locate_segment(ptr, seg_incl, V, s);
    if (seg.v == V) continue;
    const int64_t c0 = (task - s * chunks) * kSplatCh;
    const int cw = static_cast<int>(C - c0 < kSplatCh ? C - c0 : kSplatCh);
    float acc[kSplatCh];
    splat_lane_partial(in, bary, idx, seg.begin, seg.end, lane, d1, C, c0, cw, acc);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {  // a + b == b + a: every lane ends with the same sums
#pragma unroll
      for (int j = 0; j < kSplatCh; ++j) acc[j] = __fadd_rn(acc[j], __shfl_xor_sync(0xffffffffu, acc[j], off));
    }
    float* dst = (seg.whole_row ? out + seg.v * C : partial + s * C) + c0;
#pragma unroll
    for (int j = 0; j < kSplatCh; ++j) {
      if (lane == j && j < cw) dst[j] = acc[j];
    }
  }
}
#else
// Emulation: the same segments, lane partials and butterfly, lane by lane.
void splat_kernel(const float* in, const float* bary, const int64_t* ptr, const int32_t* idx, const int32_t* seg_incl,
                  int d1, int64_t V, int64_t segments_bound, int64_t C, float* out, float* partial) {
  const int64_t chunks = (C + kSplatCh - 1) / kSplatCh;
  NCLIB_GRID_LOOP(task, segments_bound * chunks) {
    const int64_t s = task / chunks;
    const SplatSegment seg = locate_segment(ptr, seg_incl, V, s);
    if (seg.v == V) continue;
    const int64_t c0 = (task - s * chunks) * kSplatCh;
    const int cw = static_cast<int>(C - c0 < kSplatCh ? C - c0 : kSplatCh);
    float acc[kWarp][kSplatCh], next[kWarp][kSplatCh];
    for (int lane = 0; lane < kWarp; ++lane) {
      splat_lane_partial(in, bary, idx, seg.begin, seg.end, lane, d1, C, c0, cw, acc[lane]);
    }
    for (int off = kWarp / 2; off > 0; off /= 2) {
      for (int lane = 0; lane < kWarp; ++lane) {
        for (int j = 0; j < kSplatCh; ++j) next[lane][j] = __fadd_rn(acc[lane][j], acc[lane ^ off][j]);
      }
      std::memcpy(acc, next, sizeof(acc));
    }
    float* dst = (seg.whole_row ? out + seg.v * C : partial + s * C) + c0;
    for (int j = 0; j < cw; ++j) dst[j] = acc[j][j];
  }
}
#endif

// Pass 2: rows of several segments add their segment sums in segment order (one thread per (vertex, channel)).
__global__ void splat_combine_kernel(const float* __restrict__ partial, const int32_t* __restrict__ seg_incl,
                                     int64_t V, int64_t C, float* __restrict__ out) {
  NCLIB_GRID_LOOP(t, V * C) {
    const int64_t v = t / C;
    const int64_t c = t - v * C;
    const int64_t first = v == 0 ? 0 : seg_incl[v - 1];
    const int64_t n = seg_incl[v] - first;
    if (n == 1) continue;  // written by pass 1
    float acc = partial[first * C + c];
    for (int64_t k = 1; k < n; ++k) acc = __fadd_rn(acc, partial[(first + k) * C + c]);
    out[t] = acc;
  }
}

__global__ void blur_kernel(const float* __restrict__ a, const int32_t* __restrict__ nbr, int d1, int axis,
                            int64_t V, int64_t C, float* __restrict__ out) {
  NCLIB_GRID_LOOP(t, V * C) {
    const int64_t v = t / C;
    const int64_t c = t - v * C;
    const int32_t n0 = nbr[(v * d1 + axis) * 2];
    const int32_t n1 = nbr[(v * d1 + axis) * 2 + 1];
    const float self = a[t];
    if (n0 >= 0 && n1 >= 0) {
      out[t] = __fadd_rn(self, __fmul_rn(0.5f, __fadd_rn(a[n0 * C + c], a[n1 * C + c])));
    } else if (n0 >= 0 || n1 >= 0) {
      out[t] = __fadd_rn(self, __fmul_rn(0.5f, a[static_cast<int64_t>(n0 >= 0 ? n0 : n1) * C + c]));
    } else {
      out[t] = self;  // absent neighbours hold 0
    }
  }
}

__global__ void slice_kernel(const float* __restrict__ a, const int32_t* __restrict__ vtx,
                             const float* __restrict__ bary, int d1, float alpha, int64_t P, int64_t C,
                             float* __restrict__ out) {
  NCLIB_GRID_LOOP(t, P * C) {
    const int64_t p = t / C;
    const int64_t c = t - p * C;
    float acc = 0.f;
    for (int r = 0; r < d1; ++r) {
      const int32_t v = vtx[p * d1 + r];
      if (v < 0) continue;
      const float w = __fmul_rn(alpha, bary[p * d1 + r]);
      acc = __fadd_rn(acc, __fmul_rn(w, a[static_cast<int64_t>(v) * C + c]));
    }
    out[t] = acc;
  }
}

}  // namespace

// features (P, D) float32 contiguous CUDA; roi (P) bool or empty; P = batch * pixels_per_image.
// Returns {vtx (P, D+1) int32, bary (P, D+1) float32, nbr (V, D+1, 2) int32, csr_ptr (V+1) int64,
// csr_idx (nnz) int32} on the device of features, and vertices per image (B) int64 on the CPU.
std::vector<at::Tensor> build_cuda(const at::Tensor& features, const at::Tensor& roi, int64_t batch) {
  NCLIB_ON_DEVICE_OF(features);
  const int64_t P = features.size(0);
  const int d = static_cast<int>(features.size(1));
  const int d1 = d + 1;
  const int64_t E = P * d1;
  const int64_t image_entries = (P / batch) * d1;
  const bool has_roi = roi.numel() > 0;
  const bool* keep = has_roi ? roi.data_ptr<bool>() : nullptr;
  const auto i32 = features.options().dtype(at::kInt);
  const auto i64 = features.options().dtype(at::kLong);

  at::Tensor keys = at::empty({E, d}, i32);
  at::Tensor bary = at::empty({P, d1}, features.options());
  Scales scales;
  embed_scales(d, scales.s);
  NCLIB_LAUNCH(embed_kernel, P, features.data_ptr<float>(), keep, d, scales, P, keys.data_ptr<int32_t>(),
               bary.data_ptr<float>());

  // Open addressing with linear probing, at most half full (2x entries >= 2x distinct keys).
  int64_t slots_n = 1024;
  while (slots_n < 2 * E) slots_n <<= 1;
  const int64_t mask = slots_n - 1;
  at::Tensor slots = at::full({slots_n}, kEmpty, i32);
  at::Tensor entry_slot = at::empty({E}, i32);
  NCLIB_LAUNCH(insert_kernel, E, keys.data_ptr<int32_t>(), keep, d, E, image_entries, slots.data_ptr<int32_t>(),
               mask, entry_slot.data_ptr<int32_t>());

  at::Tensor flag = at::empty({E}, i32);
  NCLIB_LAUNCH(flag_kernel, E, entry_slot.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), E,
               flag.data_ptr<int32_t>());
  // Integer scan (torch's, on the current stream): deterministic.
  const at::Tensor incl = at::cumsum(flag, 0, at::kInt);

  // meta[0..B] vertex offsets, meta[B+1] valid entries: the one device-to-host copy of the build.
  at::Tensor meta = at::empty({batch + 2}, i64);
  NCLIB_LAUNCH(offsets_kernel, batch + 1, incl.data_ptr<int32_t>(), image_entries, batch, meta.data_ptr<int64_t>());
  if (has_roi) {
    meta.narrow(0, batch + 1, 1).copy_(roi.sum().mul(d1).view({1}));
  } else {
    meta.narrow(0, batch + 1, 1).fill_(E);
  }
  const at::Tensor meta_cpu = meta.to(at::kCPU);  // synchronizes with the stream
  const int64_t* mp = meta_cpu.data_ptr<int64_t>();
  const int64_t V = mp[batch];
  const int64_t nnz = mp[batch + 1];
  at::Tensor per_image = at::empty({batch}, meta_cpu.options());
  for (int64_t b = 0; b < batch; ++b) per_image.data_ptr<int64_t>()[b] = mp[b + 1] - mp[b];

  at::Tensor vtx = at::empty({P, d1}, i32);
  at::Tensor rep = at::empty({V}, i32);
  at::Tensor sort_key = at::empty({E}, i32);
  NCLIB_LAUNCH(assign_kernel, E, entry_slot.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), incl.data_ptr<int32_t>(),
               E, vtx.data_ptr<int32_t>(), rep.data_ptr<int32_t>(), sort_key.data_ptr<int32_t>());

  at::Tensor nbr = at::empty({V, d1, 2}, i32);
  NCLIB_LAUNCH(neighbour_kernel, V * d1, keys.data_ptr<int32_t>(), slots.data_ptr<int32_t>(), mask,
               incl.data_ptr<int32_t>(), rep.data_ptr<int32_t>(), d, V, image_entries, nbr.data_ptr<int32_t>());

  // Splat CSR: a STABLE sort of the entries by vertex id keeps each vertex's flat indices increasing (torch's
  // radix sort, on the current stream); entries outside the roi (key INT32_MAX) come last and are dropped.
  const auto sorted = at::sort(sort_key, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor& key_out = std::get<0>(sorted);
  at::Tensor csr_ptr = at::full({V + 1}, nnz, i64);
  NCLIB_LAUNCH(csr_ptr_kernel, nnz, key_out.data_ptr<int32_t>(), nnz, csr_ptr.data_ptr<int64_t>());
  at::Tensor csr_idx = std::get<1>(sorted).narrow(0, 0, nnz).to(at::kInt);
  return {vtx, bary, nbr, csr_ptr, csr_idx, per_image};
}

// values (P, C) float32 contiguous CUDA -> alpha * S' B S values (transpose: blur axes in reverse order).
at::Tensor filter_cuda(const at::Tensor& values, const at::Tensor& vtx, const at::Tensor& bary, const at::Tensor& nbr,
                       const at::Tensor& csr_ptr, const at::Tensor& csr_idx, bool transpose) {
  NCLIB_ON_DEVICE_OF(values);
  const int64_t P = values.size(0);
  const int64_t C = values.size(1);
  const int d1 = static_cast<int>(vtx.size(1));
  const int d = d1 - 1;
  const int64_t V = nbr.size(0);
  at::Tensor out = at::empty({P, C}, values.options());
  if (P == 0 || C == 0) return out;
  if (V == 0) return out.zero_();  // every pixel outside the roi

  at::Tensor buf_a = at::empty({V, C}, values.options());
  at::Tensor buf_b = at::empty({V, C}, values.options());
  float* a = buf_a.data_ptr<float>();
  float* b = buf_b.data_ptr<float>();
  // Splat segments, from the CSR alone (no device-to-host copy): the bound V + nnz / kSegment on their number
  // needs only the sizes, known on the host; the exact layout stays on the device.
  const int64_t nnz = csr_idx.size(0);
  const int64_t segments_bound = V + nnz / kSegment;
  at::Tensor seg_count = at::empty({V}, vtx.options());
  NCLIB_LAUNCH(segment_count_kernel, V, csr_ptr.data_ptr<int64_t>(), V, seg_count.data_ptr<int32_t>());
  const at::Tensor seg_incl = at::cumsum(seg_count, 0, at::kInt);
  at::Tensor partial = at::empty({nnz > kSegment ? segments_bound : 0, C}, values.options());
  NCLIB_LAUNCH(splat_kernel, segments_bound * ((C + kSplatCh - 1) / kSplatCh) * kWarp, values.data_ptr<float>(),
               bary.data_ptr<float>(), csr_ptr.data_ptr<int64_t>(), csr_idx.data_ptr<int32_t>(),
               seg_incl.data_ptr<int32_t>(), d1, V, segments_bound, C, a, partial.data_ptr<float>());
  if (nnz > kSegment) {  // else every row is one segment
    NCLIB_LAUNCH(splat_combine_kernel, V * C, partial.data_ptr<float>(), seg_incl.data_ptr<int32_t>(), V, C, a);
  }
  for (int step = 0; step < d1; ++step) {
    const int axis = transpose ? d - step : step;
    NCLIB_LAUNCH(blur_kernel, V * C, a, nbr.data_ptr<int32_t>(), d1, axis, V, C, b);
    std::swap(a, b);
  }
  // alpha computed on the host, with the host's pow, exactly as the CPU kernel does.
  NCLIB_LAUNCH(slice_kernel, P * C, a, vtx.data_ptr<int32_t>(), bary.data_ptr<float>(), d1, lattice_alpha(d), P, C,
               out.data_ptr<float>());
  return out;
}

}  // namespace nclib
