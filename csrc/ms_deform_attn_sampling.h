// The sampling arithmetic of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Everything here is a HOST_DEVICE_INLINE function (the pattern of detectron2's box_iou_rotated_utils.h): the
// CPU kernel (csrc/cpu, compiled by the host compiler) and the CUDA kernel (csrc/cuda, nvcc) call the same code,
// so the CPU tests (float64 against the reference, gradcheck, borders, out-of-range locations) exercise the very
// arithmetic the GPU runs. What stays in each kernel is the mapping of work to threads and how gradients are
// added to shared rows (a plain add on CPU, where a task owns its rows; atomicAdd on CUDA).
//
// Conventions: a location (x, y) in [0, 1] of a Hl x Wl level has pixel coordinates (x * Wl - 0.5, y * Hl - 0.5)
// (pixel centres at (i + 0.5) / size, grid_sample with align_corners=False); the four bilinear corners that fall
// inside the level are sampled, those outside read zero (zero padding).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PEFT_D2_HOST_DEVICE __host__ __device__
#define PEFT_D2_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define PEFT_D2_HOST_DEVICE
#define PEFT_D2_HOST_DEVICE_INLINE inline
#endif

namespace peft_d2 {
namespace msda {

// The corners of one sample that lie inside its level (0 to 4 of them).
template <typename A>
struct Corners {
  int n;
  int64_t idx[4];  // row of the corner in S (level start + y * Wl + x)
  A w[4];          // bilinear weight
  A dx[4];         // d w / d x, x in pixels of the level
  A dy[4];         // d w / d y
};

// floor(v) for v >= -1 by truncation: no libm call on a baseline x86-64 build, the same integer on the device.
template <typename A>
PEFT_D2_HOST_DEVICE_INLINE int64_t floor_from_minus_one(A v) {
  const int64_t t = static_cast<int64_t>(v);
  return t - (v < A(0) && static_cast<A>(t) != v);
}

// Corners of the location (loc_x, loc_y) on the Hl x Wl level whose rows start at `start`.
template <typename A>
PEFT_D2_HOST_DEVICE_INLINE void bilinear_corners(A loc_x, A loc_y, int64_t Hl, int64_t Wl, int64_t start,
                                                 Corners<A>& c) {
  c.n = 0;
  const A x = loc_x * static_cast<A>(Wl) - A(0.5);
  const A y = loc_y * static_cast<A>(Hl) - A(0.5);
  // x == -1 still has a corner at 0 (weight 0, non-zero gradient); NaN fails the test and samples nothing
  if (!(x >= A(-1) && x < static_cast<A>(Wl) && y >= A(-1) && y < static_cast<A>(Hl))) return;
  const int64_t x0 = floor_from_minus_one(x), y0 = floor_from_minus_one(y);
  const A ax = x - static_cast<A>(x0), ay = y - static_cast<A>(y0), bx = A(1) - ax, by = A(1) - ay;
  const bool vx0 = x0 >= 0, vx1 = x0 + 1 < Wl, vy0 = y0 >= 0, vy1 = y0 + 1 < Hl;
  const int64_t row0 = start + y0 * Wl + x0;  // the top-left corner's row (may lie outside the level)
  if (vy0 && vx0) {
    c.idx[c.n] = row0, c.w[c.n] = bx * by, c.dx[c.n] = -by, c.dy[c.n] = -bx, ++c.n;
  }
  if (vy0 && vx1) {
    c.idx[c.n] = row0 + 1, c.w[c.n] = ax * by, c.dx[c.n] = by, c.dy[c.n] = -ax, ++c.n;
  }
  if (vy1 && vx0) {
    c.idx[c.n] = row0 + Wl, c.w[c.n] = bx * ay, c.dx[c.n] = -ay, c.dy[c.n] = bx, ++c.n;
  }
  if (vy1 && vx1) {
    c.idx[c.n] = row0 + Wl + 1, c.w[c.n] = ax * ay, c.dx[c.n] = ay, c.dy[c.n] = ax, ++c.n;
  }
}

// Forward of one sample with attention weight a over n channels: out[i] += a * sum_k w_k * rows[idx_k * stride + i].
// The value channels of a head (stride H * D) and the z channels (stride R) go through the same call. The CPU
// passes a whole row (n = D or R); a CUDA lane passes its one channel (rows and out offset to it, n = 1).
template <typename A, typename V>
PEFT_D2_HOST_DEVICE_INLINE void accumulate_sample(const Corners<A>& c, A a, const V* __restrict__ rows,
                                                  int64_t stride, A* __restrict__ out, int64_t n) {
  for (int k = 0; k < c.n; ++k) {
    const A coef = a * c.w[k];
    const V* __restrict__ row = rows + c.idx[k] * stride;
    for (int64_t i = 0; i < n; ++i) out[i] += coef * static_cast<A>(row[i]);
  }
}

// Returns sum_i v[i] * g[i] and does Add::add(&gv[i], coef * g[i]) in the same pass; eight partial sums let the
// host compiler vectorise (n = 1 on the device leaves the plain tail).
template <typename Add, typename A, typename V, typename G>
PEFT_D2_HOST_DEVICE_INLINE A dot_and_scatter(A* __restrict__ gv, const V* __restrict__ v, const G* __restrict__ g,
                                             A coef, int64_t n) {
  A acc[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const A gj = static_cast<A>(g[i + j]);
      acc[j] += static_cast<A>(v[i + j]) * gj;
      Add::add(gv + i + j, coef * gj);
    }
  }
  A tail = A(0);
  for (; i < n; ++i) {
    const A gi = static_cast<A>(g[i]);
    tail += static_cast<A>(v[i]) * gi;
    Add::add(gv + i, coef * gi);
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// What one sample's backward accumulates for its attention weight and location: sum_k {w_k, dx_k, dy_k} * <row_k, g>.
template <typename A>
struct SampleGrad {
  A w, x, y;
};

// Backward of one sample over n channels of one kind (value or z): the gradient of the sampled rows,
// grad_rows[idx_k * grad_stride + i] += a * w_k * g[i] (through Add), and the dot products of the rows
// rows[idx_k * stride + i] with g for the sample's weight and location, into sg.
template <typename Add, typename A, typename V, typename G>
PEFT_D2_HOST_DEVICE_INLINE void backprop_sample(const Corners<A>& c, A a, const V* __restrict__ rows, int64_t stride,
                                                A* __restrict__ grad_rows, int64_t grad_stride,
                                                const G* __restrict__ g, int64_t n, SampleGrad<A>& sg) {
  for (int k = 0; k < c.n; ++k) {
    const A dot =
        dot_and_scatter<Add>(grad_rows + c.idx[k] * grad_stride, rows + c.idx[k] * stride, g, a * c.w[k], n);
    sg.w += c.w[k] * dot;
    sg.x += c.dx[k] * dot;
    sg.y += c.dy[k] * dot;
  }
}

// The gradients of the sample's attention weight and (normalised) location once sg holds all its channels:
// x = loc_x * Wl - 0.5, so d/d loc_x = Wl * d/dx.
template <typename A>
PEFT_D2_HOST_DEVICE_INLINE void sample_input_grads(const SampleGrad<A>& sg, A a, int64_t Hl, int64_t Wl, A& grad_attn,
                                                   A& grad_loc_x, A& grad_loc_y) {
  grad_attn = sg.w;
  grad_loc_x = a * sg.x * static_cast<A>(Wl);
  grad_loc_y = a * sg.y * static_cast<A>(Hl);
}

// The plain add of a task that owns the rows it writes (the CPU backward: one task per (n, h)).
struct PlainAdd {
  template <typename A>
  PEFT_D2_HOST_DEVICE_INLINE static void add(A* p, A v) {
    *p += v;
  }
};

}  // namespace msda
}  // namespace peft_d2
