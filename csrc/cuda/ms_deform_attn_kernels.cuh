// The CUDA kernels of multi-scale deformable attention and their launch configuration (kBlock threads a block,
// num_blocks blocks): the device code of ms_deform_attn_cuda.cu, which launches them. Kept apart from the host
// code (ATen tensors, dispatch, streams) so that tests/test_ms_deform_attn_emulated.py compiles this very file,
// unchanged, on the CPU under HIP-CPU (tests/hip_cpu/cuda_on_hip_cpu.h maps the CUDA names) and launches it with
// the same configuration. Device code belongs here, not in the .cu, or the emulation does not see it.
//
// One warp per (n, q, h): lanes cover the D value channels then the R channels of z, so loads of a corner's row
// are coalesced; the geometry (corners, weights) is computed redundantly by every lane in registers.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "ms_deform_attn_sampling.h"

namespace peft_d2 {
namespace msda_cuda {

inline constexpr int kWarp = 32;
inline constexpr int kBlock = 256;

struct Dims {
  int64_t N, S, H, D, R, Q, L, P;
};

// Gradients into rows that other warps also write: the one scatter operation that differs from the CPU kernel.
struct AtomicAdd {
  template <typename A>
  __device__ __forceinline__ static void add(A* p, A v) {
    atomicAdd(p, v);
  }
};

// The level's rows must lie inside S: the Python face checks spatial_shapes / level_start_index on the host, but
// a direct call of the op (or a compiled graph, where that check is skipped) must not read or write past S.
__device__ __forceinline__ void level_in_bounds(const Dims& d, int64_t Hl, int64_t Wl, int64_t start) {
  CUDA_KERNEL_ASSERT(Hl > 0 && Wl > 0 && start >= 0 && start + Hl * Wl <= d.S);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename geom_t>
__global__ void __launch_bounds__(kBlock) forward_kernel(Dims d, const scalar_t* __restrict__ value,
                                                         const scalar_t* __restrict__ z,
                                                         const int64_t* __restrict__ ss,
                                                         const int64_t* __restrict__ lsi,
                                                         const geom_t* __restrict__ loc,
                                                         const geom_t* __restrict__ attn,
                                                         scalar_t* __restrict__ out, scalar_t* __restrict__ zs) {
  using A = at::opmath_type<scalar_t>;
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= d.N * d.Q * d.H) return;  // uniform across the warp
  const int64_t n = b / (d.Q * d.H), h = b % d.H, LP = d.L * d.P, HD = d.H * d.D, C = d.D + d.R;
  const scalar_t* vb = value + n * d.S * HD + h * d.D;
  const scalar_t* zb = z + n * d.S * d.R;
  for (int64_t c0 = 0; c0 < C; c0 += kWarp) {
    const int64_t ch = c0 + lane;
    if (ch >= C) break;
    const bool is_v = ch < d.D;
    // this lane's channel: a value channel of head h (rows of stride H * D) or a z channel (rows of stride R)
    const scalar_t* rows = is_v ? vb + ch : zb + (ch - d.D);
    const int64_t stride = is_v ? HD : d.R;
    A acc = A(0);
    msda::Corners<A> c;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t Hl = ss[2 * l], Wl = ss[2 * l + 1], start = lsi[l];
      level_in_bounds(d, Hl, Wl, start);
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t lp = b * LP + l * d.P + p;
        msda::bilinear_corners<A>(static_cast<A>(loc[2 * lp]), static_cast<A>(loc[2 * lp + 1]), Hl, Wl, start, c);
        msda::accumulate_sample(c, static_cast<A>(attn[lp]), rows, stride, &acc, 1);
      }
    }
    if (is_v) {
      out[b * d.D + ch] = static_cast<scalar_t>(acc);
    } else {
      zs[b * d.R + ch - d.D] = static_cast<scalar_t>(acc);
    }
  }
}

template <typename scalar_t, typename geom_t>
__global__ void __launch_bounds__(kBlock) backward_kernel(
    Dims d, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grad_zs,
    const scalar_t* __restrict__ value, const scalar_t* __restrict__ z, const int64_t* __restrict__ ss,
    const int64_t* __restrict__ lsi, const geom_t* __restrict__ loc, const geom_t* __restrict__ attn,
    at::opmath_type<scalar_t>* __restrict__ grad_value, at::opmath_type<scalar_t>* __restrict__ grad_z,
    at::opmath_type<scalar_t>* __restrict__ grad_loc, at::opmath_type<scalar_t>* __restrict__ grad_attn) {
  using A = at::opmath_type<scalar_t>;
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= d.N * d.Q * d.H) return;  // uniform across the warp: every lane below joins the shuffles
  const int64_t n = b / (d.Q * d.H), h = b % d.H, LP = d.L * d.P, HD = d.H * d.D, C = d.D + d.R;
  const scalar_t* vb = value + n * d.S * HD + h * d.D;
  A* gvb = grad_value + n * d.S * HD + h * d.D;
  const scalar_t* zb = z + n * d.S * d.R;
  A* gzb = grad_z + n * d.S * d.R;
  msda::Corners<A> c;
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t Hl = ss[2 * l], Wl = ss[2 * l + 1], start = lsi[l];
    level_in_bounds(d, Hl, Wl, start);
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t lp = b * LP + l * d.P + p;
      msda::bilinear_corners<A>(static_cast<A>(loc[2 * lp]), static_cast<A>(loc[2 * lp + 1]), Hl, Wl, start, c);
      const A a = static_cast<A>(attn[lp]);
      msda::SampleGrad<A> sg{A(0), A(0), A(0)};
      for (int64_t ch = lane; ch < C; ch += kWarp) {
        if (ch < d.D) {
          msda::backprop_sample<AtomicAdd>(c, a, vb + ch, HD, gvb + ch, HD, grad_out + b * d.D + ch, 1, sg);
        } else {
          const int64_t cz = ch - d.D;
          msda::backprop_sample<AtomicAdd>(c, a, zb + cz, d.R, gzb + cz, d.R, grad_zs + b * d.R + cz, 1, sg);
        }
      }
      sg.w = warp_sum(sg.w);
      sg.x = warp_sum(sg.x);
      sg.y = warp_sum(sg.y);
      if (lane == 0) msda::sample_input_grads(sg, a, Hl, Wl, grad_attn[lp], grad_loc[2 * lp], grad_loc[2 * lp + 1]);
    }
  }
}

inline int64_t num_blocks(const Dims& d) { return (d.N * d.Q * d.H * kWarp + kBlock - 1) / kBlock; }

}  // namespace msda_cuda
}  // namespace peft_d2
