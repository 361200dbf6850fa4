// Multi-scale deformable attention (MSDeformAttn) with an optional fused LoRA side input.
//
// Shapes (all tensors contiguous after the entry points below):
//   value               (N, S, H, D)    S = sum_l H_l * W_l, levels flattened row-major
//   z                   (N, S, R)       the LoRA rank-R projection x A^T, shared by all heads; R = 0: absent
//   spatial_shapes      (L, 2) int64    (H_l, W_l)
//   level_start_index   (L,) int64      offset of level l in S
//   sampling_locations  (N, Q, H, L, P, 2)  (x, y) in [0, 1] per level (outside means zero padding)
//   attention_weights   (N, Q, H, L, P)
// Outputs: out (N, Q, H * D); zs (N, Q, H, R): z sampled at each head's locations with each head's weights.
// Bilinear sampling with zero padding, pixel centres at (i + 0.5) / size (grid_sample, align_corners=False).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace peft_d2 {

// Shape/dtype/device checks shared by every backend; z may be undefined (no LoRA input).
void check_msda_inputs(const at::Tensor& value, const at::Tensor& z, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights, bool allow_float_geometry);

std::tuple<at::Tensor, at::Tensor> msda_forward_cpu(const at::Tensor& value, const at::Tensor& z,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights);

// Returns grad_value, grad_z (undefined when z is), grad_sampling_locations, grad_attention_weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_zs, const at::Tensor& value, const at::Tensor& z,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> msda_forward_cuda(const at::Tensor& value, const at::Tensor& z,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_zs, const at::Tensor& value, const at::Tensor& z,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);
#endif

}  // namespace peft_d2
