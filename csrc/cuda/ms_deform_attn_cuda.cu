// CUDA kernels of multi-scale deformable attention (float32, float64, float16, bfloat16), with the optional LoRA
// side input z: the host side (checks, dispatch, launches). The kernels and their launch configuration are
// ms_deform_attn_kernels.cuh (compiled on the CPU by the emulated-kernel test as well); the sampling arithmetic
// (corners, weights, derivatives, per-sample accumulation) is ms_deform_attn_sampling.h, shared with the CPU
// kernel. What the kernels add to it is the thread mapping, the warp reduction and the atomics.
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
#include "ms_deform_attn_kernels.cuh"

namespace peft_d2 {
using namespace msda_cuda;  // Dims, the kernels, kBlock and num_blocks

namespace {

Dims dims_of(const at::Tensor& value, const at::Tensor& z, const at::Tensor& loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), z.defined() ? z.size(2) : 0,
          loc.size(1),   loc.size(3),   loc.size(4)};
}

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
