// Permutohedral lattice (Adams, Baek & Davis, Eurographics 2010): the pieces shared by the CPU and CUDA kernels.
//
// Data layout (identical on both devices, so the Python side does not care which one built it):
//   features  (P, D) float32, P = B*H*W pixels, pixel-major
//   vtx       (P, D+1) int32   global vertex index of each simplex corner, -1 for pixels outside the roi
//   bary      (P, D+1) float32 barycentric weight of each corner (0 outside the roi)
//   nbr       (V, D+1, 2) int32 neighbour of each vertex along lattice axis a: [.., 0] = key - 1 + (D+1) e_a,
//             [.., 1] = key + 1 - (D+1) e_a; -1 when that vertex is not occupied (the missing-neighbour rule:
//             an absent vertex holds the value 0)
//   csr_ptr   (V+1) int64, csr_idx (nnz) int32: for each vertex, the flat indices p*(D+1)+r of the (pixel,
//             corner) pairs that splat onto it, in increasing order: the CUDA kernel's deterministic
//             gather-based splat. The CPU build returns them empty: it scatters serially in pixel order, which
//             is deterministic too and reads each pixel once.
//
// Tie-breaking in the simplex search (both devices): for i < j, coordinate i outranks j only if its residual is
// strictly smaller; on a tie j is ranked higher. Vertices of image b never mix with those of image b' != b.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define NCLIB_HD __host__ __device__ __forceinline__
#else
#define NCLIB_HD inline
#endif

namespace nclib {

constexpr int kMaxD = 16;

// Output scale of the standard [1/2, 1, 1/2] blur: alpha = 1 / (1 + 2^-D).
NCLIB_HD float lattice_alpha(int d) { return 1.0f / (1.0f + std::pow(2.0f, -static_cast<float>(d))); }

// Per-axis scale of the embedding: the lattice spacing that makes the blur approximate a unit-variance Gaussian.
NCLIB_HD void embed_scales(int d, double* scale) {
  const double inv_std = std::sqrt(2.0 / 3.0) * (d + 1);
  for (int i = 1; i <= d; ++i) scale[i - 1] = inv_std / std::sqrt(static_cast<double>(i) * (i + 1));
}

// Embed one D-dimensional point; writes the D+1 corner keys (each D ints, row-major (D+1, D)) and the D+1
// barycentric weights. Computed in double so that coordinates of thousands of sigmas stay exact enough.
// `scale` holds the D per-axis factors from embed_scales().
NCLIB_HD void embed_point(const float* pos, int d, const double* scale, int32_t* keys, float* bary) {
  double elevated[kMaxD + 1];
  int32_t rem0[kMaxD + 1];
  int32_t rank[kMaxD + 1];
  double b[kMaxD + 2];

  // Elevate onto the hyperplane x_0 + ... + x_D = 0 (basis of Adams et al., Sec 3.1).
  double sm = 0.0;
  for (int i = d; i >= 1; --i) {
    const double cf = pos[i - 1] * scale[i - 1];
    elevated[i] = sm - i * cf;
    sm += cf;
  }
  elevated[0] = sm;

  // Nearest remainder-0 point, then rank the residuals.
  int sum = 0;
  const double down_scale = 1.0 / (d + 1);
  double resid[kMaxD + 1];
  for (int i = 0; i <= d; ++i) {
    const double v = elevated[i] * down_scale;
    const double up = std::ceil(v);
    const double down = std::floor(v);
    const int32_t k = static_cast<int32_t>((up * (d + 1) - elevated[i] < elevated[i] - down * (d + 1)) ? up : down);
    rem0[i] = k * (d + 1);
    resid[i] = elevated[i] - rem0[i];
    sum += k;
    rank[i] = 0;
  }
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const int lt = resid[i] < resid[j];  // branch-free: ties rank j higher
      rank[i] += lt;
      rank[j] += 1 - lt;
    }
  }
  // Wrap the point back onto the hyperplane when the rounding drifted off it.
  if (sum > 0) {
    for (int i = 0; i <= d; ++i) {
      if (rank[i] >= d + 1 - sum) {
        rem0[i] -= d + 1;
        rank[i] += sum - (d + 1);
      } else {
        rank[i] += sum;
      }
    }
  } else if (sum < 0) {
    for (int i = 0; i <= d; ++i) {
      if (rank[i] < -sum) {
        rem0[i] += d + 1;
        rank[i] += (d + 1) + sum;
      } else {
        rank[i] += sum;
      }
    }
  }

  for (int i = 0; i <= d + 1; ++i) b[i] = 0.0;
  for (int i = 0; i <= d; ++i) {
    const double v = (elevated[i] - rem0[i]) * down_scale;
    b[d - rank[i]] += v;
    b[d + 1 - rank[i]] -= v;
  }
  b[0] += 1.0 + b[d + 1];

  for (int r = 0; r <= d; ++r) {
    for (int i = 0; i < d; ++i) keys[r * d + i] = rem0[i] + (rank[i] <= d - r ? r : r - (d + 1));
    bary[r] = static_cast<float>(b[r]);
  }
}

NCLIB_HD uint64_t hash_key(const int32_t* key, int d) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < d; ++i) {
    h ^= static_cast<uint32_t>(key[i]);
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  }
  return h;
}

// Key of the neighbour of `key` along axis a in direction dir (0: +, 1: -).
NCLIB_HD void neighbour_key(const int32_t* key, int d, int a, int dir, int32_t* out) {
  const int32_t s = dir == 0 ? -1 : 1;
  for (int i = 0; i < d; ++i) out[i] = key[i] + s;
  if (a < d) out[a] -= s * (d + 1);
}

}  // namespace nclib

namespace nclib {
// Convenience overload computing the scales on the fly.
NCLIB_HD void embed_point(const float* pos, int d, int32_t* keys, float* bary) {
  double scale[kMaxD];
  embed_scales(d, scale);
  embed_point(pos, d, scale, keys, bary);
}
}  // namespace nclib
