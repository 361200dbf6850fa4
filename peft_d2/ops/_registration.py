"""Fake (meta) and autograd implementations of the compiled peft_d2 operators (schemas live in csrc/)."""

import torch

_registered = False


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, H, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], H * D))


def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _fake_lora_forward(value, z, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    return value.new_empty((N, Q, H * D)), value.new_empty((N, Q, H, z.shape[2]))


def _fake_lora_backward(
    grad_output, grad_zs, value, z, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    return (
        torch.empty_like(value),
        torch.empty_like(z),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_forward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.peft_d2.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    need = ctx.needs_input_grad
    return (
        grad_value if need[0] else None,
        None,
        None,
        grad_loc if need[3] else None,
        grad_attn if need[4] else None,
    )


def _lora_backward(ctx, grad_output, grad_zs):
    value, z, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    N, _, H, _ = value.shape
    Q = sampling_locations.shape[1]
    if grad_output is None:
        grad_output = value.new_zeros((N, Q, value.shape[2] * value.shape[3]))
    if grad_zs is None:
        grad_zs = value.new_zeros((N, Q, H, z.shape[2]))
    grad_value, grad_z, grad_loc, grad_attn = torch.ops.peft_d2.ms_deform_attn_lora_backward(
        grad_output.contiguous(),
        grad_zs.contiguous(),
        value,
        z,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
    )
    need = ctx.needs_input_grad
    return (
        grad_value if need[0] else None,
        grad_z if need[1] else None,
        None,
        None,
        grad_loc if need[4] else None,
        grad_attn if need[5] else None,
    )


def register():
    """Registers once; called by the loader after peft_d2._C imported (its schemas must exist)."""
    global _registered
    if _registered:
        return
    lib = "peft_d2::"
    torch.library.register_fake(lib + "ms_deform_attn_forward")(_fake_forward)
    torch.library.register_fake(lib + "ms_deform_attn_backward")(_fake_backward)
    torch.library.register_fake(lib + "ms_deform_attn_lora_forward")(_fake_lora_forward)
    torch.library.register_fake(lib + "ms_deform_attn_lora_backward")(_fake_lora_backward)
    torch.library.register_autograd(lib + "ms_deform_attn_forward", _backward, setup_context=_setup_forward)
    torch.library.register_autograd(lib + "ms_deform_attn_lora_forward", _lora_backward, setup_context=_setup_forward)
    _registered = True
