// CUDA kernels of multi-scale deformable attention (float32, float64, float16, bfloat16), with the optional LoRA
// side input z. The sampling arithmetic (corners, weights, derivatives, per-sample accumulation) is
// ms_deform_attn_sampling.h, shared with the CPU kernel; what is here is the thread mapping, the warp reduction
// and the atomics. One warp per (n, q, h): lanes cover the D value channels then the R channels of z, so loads
// of a corner's row are coalesced; the geometry (corners, weights) is computed redundantly by every lane in
// registers.
// Half types accumulate in float32; sampling_locations/attention_weights may be float32 under half values (the
// autocast policy keeps the geometry in float32). Backward scatter-adds go through atomics into float32 (or
// float64) buffers that are cast to the input dtype at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace peft_d2 {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;

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

Dims dims_of(const at::Tensor& value, const at::Tensor& z, const at::Tensor& loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), z.defined() ? z.size(2) : 0,
          loc.size(1),   loc.size(3),   loc.size(4)};
}

int64_t num_blocks(const Dims& d) { return (d.N * d.Q * d.H * kWarp + kBlock - 1) / kBlock; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> msda_forward_cuda(const at::Tensor& value_, const at::Tensor& z_,
                                                     const at::Tensor& spatial_shapes_,
                                                     const at::Tensor& level_start_index_,
                                                     const at::Tensor& sampling_locations_,
                                                     const at::Tensor& attention_weights_) {
  check_msda_inputs(value_, z_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_, true);
  const c10::cuda::CUDAGuard guard(value_.device());
  const auto value = value_.contiguous(), loc = sampling_locations_.contiguous(),
             attn = attention_weights_.contiguous(), ss = spatial_shapes_.contiguous(),
             lsi = level_start_index_.contiguous();
  const auto z = z_.defined() ? z_.contiguous() : z_;
  const Dims d = dims_of(value, z, loc);
  auto out = at::empty({d.N, d.Q, d.H * d.D}, value.options());
  auto zs = at::empty({d.N, d.Q, d.H, d.R}, value.options());
  if (out.numel() + zs.numel() == 0) return {out, zs};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const scalar_t* zp = d.R ? z.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* zsp = d.R ? zs.mutable_data_ptr<scalar_t>() : nullptr;
    if (loc.scalar_type() == value.scalar_type()) {
      forward_kernel<scalar_t, scalar_t><<<num_blocks(d), kBlock, 0, stream>>>(
          d, value.const_data_ptr<scalar_t>(), zp, ss.const_data_ptr<int64_t>(), lsi.const_data_ptr<int64_t>(),
          loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), zsp);
    } else {
      forward_kernel<scalar_t, float><<<num_blocks(d), kBlock, 0, stream>>>(
          d, value.const_data_ptr<scalar_t>(), zp, ss.const_data_ptr<int64_t>(), lsi.const_data_ptr<int64_t>(),
          loc.const_data_ptr<float>(), attn.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), zsp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, zs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& grad_zs_, const at::Tensor& value_, const at::Tensor& z_,
    const at::Tensor& spatial_shapes_, const at::Tensor& level_start_index_, const at::Tensor& sampling_locations_,
    const at::Tensor& attention_weights_) {
  check_msda_inputs(value_, z_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_, true);
  const c10::cuda::CUDAGuard guard(value_.device());
  const auto value = value_.contiguous(), loc = sampling_locations_.contiguous(),
             attn = attention_weights_.contiguous(), ss = spatial_shapes_.contiguous(),
             lsi = level_start_index_.contiguous();
  const auto z = z_.defined() ? z_.contiguous() : z_;
  const Dims d = dims_of(value, z, loc);
  TORCH_CHECK(grad_output_.numel() == d.N * d.Q * d.H * d.D && grad_output_.scalar_type() == value.scalar_type() &&
                  grad_output_.device() == value.device(),
              "ms_deform_attn backward: grad_output must be (N, Q, H*D) of value's dtype and device, got ",
              grad_output_.sizes(), " ", grad_output_.scalar_type(), " on ", grad_output_.device());
  const auto grad_output = grad_output_.contiguous();
  at::Tensor grad_zs;
  if (d.R) {
    TORCH_CHECK(grad_zs_.defined() && grad_zs_.numel() == d.N * d.Q * d.H * d.R &&
                    grad_zs_.scalar_type() == value.scalar_type() && grad_zs_.device() == value.device(),
                "ms_deform_attn_lora backward: grad_zs must be (N, Q, H, r) of value's dtype and device");
    grad_zs = grad_zs_.contiguous();
  }
  const auto acc = value.options().dtype(at::toOpMathType(value.scalar_type()));
  auto grad_value = at::zeros(value.sizes(), acc);
  auto grad_z = at::zeros({d.N, d.S, d.R}, acc);
  auto grad_loc = at::zeros(loc.sizes(), acc);
  auto grad_attn = at::zeros(attn.sizes(), acc);
  if (d.N * d.Q * d.H > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using A = at::opmath_type<scalar_t>;
          const scalar_t* zp = d.R ? z.const_data_ptr<scalar_t>() : nullptr;
          const scalar_t* gzsp = d.R ? grad_zs.const_data_ptr<scalar_t>() : nullptr;
          A* gzp = d.R ? grad_z.mutable_data_ptr<A>() : nullptr;
          if (loc.scalar_type() == value.scalar_type()) {
            backward_kernel<scalar_t, scalar_t><<<num_blocks(d), kBlock, 0, stream>>>(
                d, grad_output.const_data_ptr<scalar_t>(), gzsp, value.const_data_ptr<scalar_t>(), zp,
                ss.const_data_ptr<int64_t>(), lsi.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                attn.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<A>(), gzp, grad_loc.mutable_data_ptr<A>(),
                grad_attn.mutable_data_ptr<A>());
          } else {
            backward_kernel<scalar_t, float><<<num_blocks(d), kBlock, 0, stream>>>(
                d, grad_output.const_data_ptr<scalar_t>(), gzsp, value.const_data_ptr<scalar_t>(), zp,
                ss.const_data_ptr<int64_t>(), lsi.const_data_ptr<int64_t>(), loc.const_data_ptr<float>(),
                attn.const_data_ptr<float>(), grad_value.mutable_data_ptr<A>(), gzp, grad_loc.mutable_data_ptr<A>(),
                grad_attn.mutable_data_ptr<A>());
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor gz;
  if (z.defined()) gz = grad_z.to(value.scalar_type());
  return {grad_value.to(value.scalar_type()), gz, grad_loc.to(loc.scalar_type()), grad_attn.to(attn.scalar_type())};
}

}  // namespace peft_d2
