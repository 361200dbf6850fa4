// CPU kernels of multi-scale deformable attention (float32, float64), with the optional LoRA side input z.
//
// The sampling arithmetic (corners, weights, derivatives, per-sample accumulation) is ms_deform_attn_sampling.h,
// shared with the CUDA kernel; this file maps the work to CPU tasks.
// Forward: one task per (n, q, h); each (level, point) gives up to four bilinear corners whose D value channels
// (and R channels of z) are accumulated with weight attention * bilinear into contiguous rows.
// Backward: one task per (n, h). A head owns the slice grad_value[n, :, h, :], so the scatter-adds need neither
// atomics nor per-thread copies. z is shared by the heads: its gradient goes to a (N, S, H, R) buffer that is
// summed over H at the end (deterministic, R is small).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace peft_d2 {
namespace {

// spatial_shapes must tile S, and level_start_index must be its exclusive prefix sum (the kernels index by both).
void check_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  const int64_t* ss = spatial_shapes.data_ptr<int64_t>();
  const int64_t* lsi = level_start_index.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    TORCH_CHECK(ss[2 * l] > 0 && ss[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", ss[2 * l], ", ",
                ss[2 * l + 1], ") must be positive");
    TORCH_CHECK(lsi[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", lsi[l],
                " but the levels before it hold ", total, " positions (expected the exclusive prefix sum of H_l*W_l)");
    total += ss[2 * l] * ss[2 * l + 1];
  }
  TORCH_CHECK(total == S, "ms_deform_attn: spatial_shapes sum of H_l*W_l is ", total, " but value has S = ", S);
}

struct Dims {
  int64_t N, S, H, D, R, Q, L, P;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& z, const at::Tensor& loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), z.defined() ? z.size(2) : 0,
          loc.size(1),   loc.size(3),   loc.size(4)};
}

template <typename T>
void forward_kernel(const Dims& d, const T* value, const T* z, const int64_t* ss, const int64_t* lsi, const T* loc,
                    const T* attn, T* out, T* zs) {
  const int64_t LP = d.L * d.P, HD = d.H * d.D;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, LP));
  at::parallel_for(0, d.N * d.Q * d.H, grain, [&](int64_t begin, int64_t end) {
    msda::Corners<T> c;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b / (d.Q * d.H), h = b % d.H;
      const T* vb = value + n * d.S * HD + h * d.D;
      const T* zb = d.R ? z + n * d.S * d.R : nullptr;
      const T* lb = loc + b * LP * 2;
      const T* ab = attn + b * LP;
      T* o = out + b * d.D;
      T* zo = d.R ? zs + b * d.R : nullptr;
      std::fill(o, o + d.D, T(0));
      if (d.R) std::fill(zo, zo + d.R, T(0));
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t Hl = ss[2 * l], Wl = ss[2 * l + 1], start = lsi[l];
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t lp = l * d.P + p;
          msda::bilinear_corners(lb[2 * lp], lb[2 * lp + 1], Hl, Wl, start, c);
          msda::accumulate_sample(c, ab[lp], vb, HD, o, d.D);
          if (d.R) msda::accumulate_sample(c, ab[lp], zb, d.R, zo, d.R);
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const Dims& d, const T* grad_out, const T* grad_zs, const T* value, const T* z,
                     const int64_t* ss, const int64_t* lsi, const T* loc, const T* attn, T* grad_value,
                     T* grad_z_heads, T* grad_loc, T* grad_attn) {
  const int64_t LP = d.L * d.P, HD = d.H * d.D, HR = d.H * d.R;
  at::parallel_for(0, d.N * d.H, 1, [&](int64_t begin, int64_t end) {
    msda::Corners<T> c;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / d.H, h = nh % d.H;
      const T* vb = value + n * d.S * HD + h * d.D;
      T* gvb = grad_value + n * d.S * HD + h * d.D;
      const T* zb = d.R ? z + n * d.S * d.R : nullptr;
      T* gzb = d.R ? grad_z_heads + n * d.S * HR + h * d.R : nullptr;
      for (int64_t q = 0; q < d.Q; ++q) {
        const int64_t b = (n * d.Q + q) * d.H + h;
        const T* go = grad_out + b * d.D;
        const T* gz = d.R ? grad_zs + b * d.R : nullptr;
        const T* lb = loc + b * LP * 2;
        const T* ab = attn + b * LP;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t Hl = ss[2 * l], Wl = ss[2 * l + 1], start = lsi[l];
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t lp = l * d.P + p;
            msda::bilinear_corners(lb[2 * lp], lb[2 * lp + 1], Hl, Wl, start, c);
            const T a = ab[lp];
            msda::SampleGrad<T> sg{T(0), T(0), T(0)};
            msda::backprop_sample<msda::PlainAdd>(c, a, vb, HD, gvb, HD, go, d.D, sg);
            if (d.R) msda::backprop_sample<msda::PlainAdd>(c, a, zb, d.R, gzb, HR, gz, d.R, sg);
            T* gl = grad_loc + (b * LP + lp) * 2;
            msda::sample_input_grads(sg, a, Hl, Wl, grad_attn[b * LP + lp], gl[0], gl[1]);
          }
        }
      }
    }
  });
}

void check_cpu(const at::Tensor& value, const at::Tensor& z, const at::Tensor& spatial_shapes,
               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
               const at::Tensor& attention_weights) {
  check_msda_inputs(value, z, spatial_shapes, level_start_index, sampling_locations, attention_weights, false);
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn (cpu kernel): value must be float32 or float64, got ", value.scalar_type(),
              " (half types are computed in float32 by autocast and by peft_d2.ops.ms_deform_attn)");
  check_levels(spatial_shapes.contiguous(), level_start_index.contiguous(), value.size(1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> msda_forward_cpu(const at::Tensor& value_, const at::Tensor& z_,
                                                    const at::Tensor& spatial_shapes_,
                                                    const at::Tensor& level_start_index_,
                                                    const at::Tensor& sampling_locations_,
                                                    const at::Tensor& attention_weights_) {
  check_cpu(value_, z_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_);
  const auto value = value_.contiguous(), loc = sampling_locations_.contiguous(),
             attn = attention_weights_.contiguous(), ss = spatial_shapes_.contiguous(),
             lsi = level_start_index_.contiguous();
  const auto z = z_.defined() ? z_.contiguous() : z_;
  const Dims d = dims_of(value, z, loc);
  auto out = at::empty({d.N, d.Q, d.H * d.D}, value.options());
  auto zs = at::empty({d.N, d.Q, d.H, d.R}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
          d, value.data_ptr<scalar_t>(), d.R ? z.data_ptr<scalar_t>() : nullptr, ss.data_ptr<int64_t>(),
          lsi.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          d.R ? zs.data_ptr<scalar_t>() : nullptr);
  });
  return {out, zs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& grad_zs_, const at::Tensor& value_, const at::Tensor& z_,
    const at::Tensor& spatial_shapes_, const at::Tensor& level_start_index_, const at::Tensor& sampling_locations_,
    const at::Tensor& attention_weights_) {
  check_cpu(value_, z_, spatial_shapes_, level_start_index_, sampling_locations_, attention_weights_);
  const auto value = value_.contiguous(), loc = sampling_locations_.contiguous(),
             attn = attention_weights_.contiguous(), ss = spatial_shapes_.contiguous(),
             lsi = level_start_index_.contiguous();
  const auto z = z_.defined() ? z_.contiguous() : z_;
  const Dims d = dims_of(value, z, loc);
  TORCH_CHECK(grad_output_.numel() == d.N * d.Q * d.H * d.D && grad_output_.scalar_type() == value.scalar_type(),
              "ms_deform_attn backward: grad_output must be (N, Q, H*D) of value's dtype, got ",
              grad_output_.sizes(), " ", grad_output_.scalar_type());
  const auto grad_output = grad_output_.contiguous();
  at::Tensor grad_zs;
  if (d.R) {
    TORCH_CHECK(grad_zs_.defined() && grad_zs_.numel() == d.N * d.Q * d.H * d.R &&
                    grad_zs_.scalar_type() == value.scalar_type(),
                "ms_deform_attn_lora backward: grad_zs must be (N, Q, H, r) of value's dtype");
    grad_zs = grad_zs_.contiguous();
  }
  auto grad_value = at::zeros_like(value);
  auto grad_z_heads = d.R ? at::zeros({d.N, d.S, d.H, d.R}, value.options()) : at::Tensor();
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
          d, grad_output.data_ptr<scalar_t>(), d.R ? grad_zs.data_ptr<scalar_t>() : nullptr,
          value.data_ptr<scalar_t>(), d.R ? z.data_ptr<scalar_t>() : nullptr, ss.data_ptr<int64_t>(),
          lsi.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(), d.R ? grad_z_heads.data_ptr<scalar_t>() : nullptr,
          grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>());
  });
  at::Tensor grad_z;
  if (z.defined()) grad_z = d.R ? grad_z_heads.sum(2) : at::zeros_like(z);
  return {grad_value, grad_z, grad_loc, grad_attn};
}

}  // namespace peft_d2
