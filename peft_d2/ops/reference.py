"""Pure-PyTorch multi-scale deformable attention: the ground truth the compiled kernels are tested against."""

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention by `grid_sample` (bilinear, zero padding, align_corners=False).

    Args:
        value: (N, S, H, D), S = sum_l H_l * W_l, levels flattened row-major in the order of spatial_shapes.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level, or a sequence of L (H_l, W_l) int pairs.
        level_start_index: (L,) offsets of each level in S (unused here; kept for the common signature).
        sampling_locations: (N, Q, H, L, P, 2), (x, y) normalised to [0, 1] per level.
        attention_weights: (N, Q, H, L, P).
    Returns:
        (N, Q, H * D)
    """
    N, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H_l*W_l, H, D) -> (N*H, D, H_l, W_l)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * H, D, h, w)
        # (N, Q, H, P, 2) -> (N*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Q, H, L, P) -> (N*H, 1, Q, L*P)
    attn = attention_weights.transpose(1, 2).reshape(N * H, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # (N*H, D, Q)
    return out.view(N, H * D, Q).transpose(1, 2).contiguous()


def lora_value_delta(z, lora_B, scaling, adapter_index=None):
    """scaling * z @ B^T per image: z (N, S, r), lora_B (H*D, r) or (K, H*D, r) with adapter_index (N,).

    scaling: a number, a 0-d tensor, or a (K,) tensor with adapter_index. Returns (N, S, H*D).
    """
    if lora_B.dim() == 2:
        delta = torch.matmul(z, lora_B.transpose(0, 1))
    else:
        delta = torch.bmm(z, lora_B[adapter_index].transpose(1, 2))
    if torch.is_tensor(scaling) and scaling.dim() == 1:
        return delta * scaling[adapter_index].view(-1, 1, 1)
    return delta * scaling


def ms_deform_attn_lora_reference(
    value,
    z,
    lora_B,
    scaling,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    adapter_index=None,
):
    """The definition of the fused LoRA operator: the plain operator on the explicitly LoRA-augmented value.

    value (N, S, H, D) plus scaling * (z @ B^T) viewed (N, S, H, D); see `peft_d2.ops.ms_deform_attn_lora`.
    """
    N, S, H, D = value.shape
    augmented = value + lora_value_delta(z, lora_B, scaling, adapter_index).view(N, S, H, D)
    return ms_deform_attn_reference(augmented, spatial_shapes, level_start_index, sampling_locations, attention_weights)
