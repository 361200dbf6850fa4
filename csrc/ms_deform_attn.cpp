// peft_d2._C: operator schemas (TORCH_LIBRARY), input checks, CPU and autocast registrations.
// Autograd and fake (meta) implementations are registered from Python (peft_d2/ops/_registration.py).
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace peft_d2 {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

}  // namespace

void check_msda_inputs(const at::Tensor& value, const at::Tensor& z, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights, bool allow_float_geometry) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, H, D), got shape ", shape_str(value));
  const auto N = value.size(0), S = value.size(1), H = value.size(2);
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == N && sampling_locations.size(2) == H &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Q, H, L, P, 2) = (", N, ", Q, ", H,
              ", L, P, 2) to match value ", shape_str(value), ", got ", shape_str(sampling_locations));
  const auto Q = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == N && attention_weights.size(1) == Q &&
                  attention_weights.size(2) == H && attention_weights.size(3) == L && attention_weights.size(4) == P,
              "ms_deform_attn: attention_weights must be (N, Q, H, L, P) = (", N, ", ", Q, ", ", H, ", ", L, ", ", P,
              "), got ", shape_str(attention_weights));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) = (", L, ", 2), got ", shape_str(spatial_shapes));
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) = (", L, ",), got ", shape_str(level_start_index));
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ", spatial_shapes.scalar_type(),
              " and ", level_start_index.scalar_type());
  const auto dev = value.device();
  for (const auto* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == dev, "ms_deform_attn: all inputs must be on value's device ", dev, ", got one on ",
                t->device());
  }
  const auto vt = value.scalar_type(), gt = sampling_locations.scalar_type();
  TORCH_CHECK(at::isFloatingType(vt), "ms_deform_attn: value must be floating point, got ", vt);
  TORCH_CHECK(attention_weights.scalar_type() == gt, "ms_deform_attn: attention_weights dtype ",
              attention_weights.scalar_type(), " must equal sampling_locations dtype ", gt);
  TORCH_CHECK(gt == vt || (allow_float_geometry && is_half(vt) && gt == at::kFloat),
              "ms_deform_attn: sampling_locations/attention_weights dtype ", gt, " must equal value dtype ", vt,
              allow_float_geometry ? " (or be float32 when value is float16/bfloat16)" : "");
  if (z.defined()) {
    TORCH_CHECK(z.dim() == 3 && z.size(0) == N && z.size(1) == S,
                "ms_deform_attn_lora: z must be (N, S, r) = (", N, ", ", S, ", r), got ", shape_str(z));
    TORCH_CHECK(z.scalar_type() == vt, "ms_deform_attn_lora: z dtype ", z.scalar_type(), " must equal value dtype ",
                vt);
    TORCH_CHECK(z.device() == dev, "ms_deform_attn_lora: z must be on value's device ", dev, ", got ", z.device());
  }
}

namespace {

using ForwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&);

template <ForwardFn F>
at::Tensor plain_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  return std::get<0>(F(value, at::Tensor(), spatial_shapes, level_start_index, sampling_locations, attention_weights));
}

template <BackwardFn F>
std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                              const at::Tensor& spatial_shapes,
                                                              const at::Tensor& level_start_index,
                                                              const at::Tensor& sampling_locations,
                                                              const at::Tensor& attention_weights) {
  auto g = F(grad_output, at::Tensor(), value, at::Tensor(), spatial_shapes, level_start_index, sampling_locations,
             attention_weights);
  return {std::get<0>(g), std::get<2>(g), std::get<3>(g)};
}

template <ForwardFn F>
std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& value, const at::Tensor& z,
                                                const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights) {
  return F(value, z, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

// ---- autocast: CPU computes half inputs in float32; CUDA runs value/z natively in the autocast dtype and keeps
// the geometry (locations, weights) in float32, where half precision would cost sub-pixel accuracy.
at::Tensor to_float_if_half(const at::Tensor& t) { return is_half(t.scalar_type()) ? t.to(at::kFloat) : t; }

at::Tensor to_lowp(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == at::kFloat || is_half(t.scalar_type()) ? t.to(dt) : t;
}

at::Tensor to_float_geometry(const at::Tensor& t, const at::Tensor& value) {
  return is_half(value.scalar_type()) ? t.to(at::kFloat) : t.to(value.scalar_type());
}

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor forward_autocast_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::AutocastCPU);
  static auto op = find_op("peft_d2::ms_deform_attn_forward")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(to_float_if_half(value), spatial_shapes, level_start_index, to_float_if_half(sampling_locations),
                 to_float_if_half(attention_weights));
}

std::tuple<at::Tensor, at::Tensor> lora_forward_autocast_cpu(const at::Tensor& value, const at::Tensor& z,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::AutocastCPU);
  static auto op = find_op("peft_d2::ms_deform_attn_lora_forward")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&)>();
  return op.call(to_float_if_half(value), to_float_if_half(z), spatial_shapes, level_start_index,
                 to_float_if_half(sampling_locations), to_float_if_half(attention_weights));
}

at::Tensor forward_autocast_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::AutocastCUDA);
  static auto op = find_op("peft_d2::ms_deform_attn_forward")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  const auto dt = at::autocast::get_autocast_dtype(at::kCUDA);
  auto v = to_lowp(value, dt);
  return op.call(v, spatial_shapes, level_start_index, to_float_geometry(sampling_locations, v),
                 to_float_geometry(attention_weights, v));
}

std::tuple<at::Tensor, at::Tensor> lora_forward_autocast_cuda(const at::Tensor& value, const at::Tensor& z,
                                                              const at::Tensor& spatial_shapes,
                                                              const at::Tensor& level_start_index,
                                                              const at::Tensor& sampling_locations,
                                                              const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::AutocastCUDA);
  static auto op = find_op("peft_d2::ms_deform_attn_lora_forward")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&)>();
  const auto dt = at::autocast::get_autocast_dtype(at::kCUDA);
  auto v = to_lowp(value, dt);
  return op.call(v, z.to(v.scalar_type()), spatial_shapes, level_start_index, to_float_geometry(sampling_locations, v),
                 to_float_geometry(attention_weights, v));
}

}  // namespace

TORCH_LIBRARY(peft_d2, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ms_deform_attn_lora_forward(Tensor value, Tensor z, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor)");
  m.def(
      "ms_deform_attn_lora_backward(Tensor grad_output, Tensor grad_zs, Tensor value, Tensor z, "
      "Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_d2, CPU, m) {
  m.impl("ms_deform_attn_forward", &plain_forward<&msda_forward_cpu>);
  m.impl("ms_deform_attn_backward", &plain_backward<&msda_backward_cpu>);
  m.impl("ms_deform_attn_lora_forward", &lora_forward<&msda_forward_cpu>);
  m.impl("ms_deform_attn_lora_backward", &msda_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(peft_d2, CUDA, m) {
  m.impl("ms_deform_attn_forward", &plain_forward<&msda_forward_cuda>);
  m.impl("ms_deform_attn_backward", &plain_backward<&msda_backward_cuda>);
  m.impl("ms_deform_attn_lora_forward", &lora_forward<&msda_forward_cuda>);
  m.impl("ms_deform_attn_lora_backward", &msda_backward_cuda);
}
#endif

TORCH_LIBRARY_IMPL(peft_d2, AutocastCPU, m) {
  m.impl("ms_deform_attn_forward", &forward_autocast_cpu);
  m.impl("ms_deform_attn_lora_forward", &lora_forward_autocast_cpu);
}

TORCH_LIBRARY_IMPL(peft_d2, AutocastCUDA, m) {
  m.impl("ms_deform_attn_forward", &forward_autocast_cuda);
  m.impl("ms_deform_attn_lora_forward", &lora_forward_autocast_cuda);
}

}  // namespace peft_d2

// A plain extension module: importing peft_d2._C runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "peft_d2 compiled operators", -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod != nullptr) {
#ifdef WITH_CUDA
    PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
    PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  }
  return mod;
}
