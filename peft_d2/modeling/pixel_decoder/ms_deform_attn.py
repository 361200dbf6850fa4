"""Multi-scale deformable attention (Deformable DETR) with the official Mask2Former parameter names.

query (N, Q, d) -> sampling_offsets, attention_weights; input (N, S, d) -> value_proj -> (N, S, H, d/H);
peft_d2.ops.ms_deform_attn samples and mixes the values; output_proj maps the heads back to d.
See docs/methods.md, "MSDeformAttn, the module LoRA goes into".
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peft_d2 import ops
from peft_d2.tuners.lora import LoRALayer


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels d of query and input.
        n_levels: feature levels L.
        n_heads: heads H (d divisible by H).
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f"MSDeformAttn head dimension {head_dim} is not a power of 2: the CUDA kernel is slower with it.",
                stacklevel=2,
            )
        self.im2col_step = 128  # kept for compatibility with code that reads it; our op has no such knob
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Offsets start as a ring of directions per head (point k at distance k+1); uniform attention."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def project_value(self, input_flatten, input_padding_mask=None):
        """value_proj, padded positions zeroed, split into heads: (N, S, d) -> (N, S, H, d / H)."""
        N, S, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return value.view(N, S, self.n_heads, self.d_model // self.n_heads)

    def aggregate_values(
        self,
        input_flatten,
        input_padding_mask,
        input_spatial_shapes,
        input_level_start_index,
        sampling_locations,
        attention_weights,
    ):
        """value_proj, then sample and mix: (N, S, d) -> (N, Q, d), before output_proj.

        The one place where value_proj meets the operator. With a fusable LoRA on value_proj, the fused
        operator (peft_d2.ops.ms_deform_attn_lora) runs where it is the cheaper form for this call's shape and
        device (peft_d2.ops.choose_lora_path; PEFT_D2_MSDA_FUSED=0|1|auto overrides); otherwise value_proj's own
        forward (LoRA included) forms the value and the plain operator samples it. A model serving several
        adapters (peft_d2.multi) takes the fused path the same way, each image's LoRA chosen by adapter_index.
        After each call, `last_lora_path` says which path ran and why: ("fused" | "unfused", reason), or None
        when value_proj has no fusable LoRA.
        """
        vp = self.value_proj
        fused, path = None, None
        routes = getattr(vp, "peft_routes", None)  # several adapters served per image (peft_d2.multi)
        if (isinstance(vp, LoRALayer) and vp.lora_fusable()) or routes is not None:
            N, S, _ = input_flatten.shape
            path = ops.choose_lora_path(sampling_locations.shape[1], S, input_flatten.device.type)
            if path[0] == "fused":
                if isinstance(vp, LoRALayer):
                    fused = vp.lora_down(input_flatten), vp.lora_B[0], vp.lora_scaling, None
                else:  # each image's adapter by adapter_index, or None when an adapter here is not one LoRA
                    fused = routes.fused_lora(input_flatten)
                    if fused is None:
                        path = "unfused", ("peft_d2.multi: no fusable LoRA in this batch (the base alone, or "
                                           "adapters that are not one LoRA each of one rank)")
        if not torch.compiler.is_compiling():
            self.last_lora_path = path
        if fused is not None:
            # value = x W^T + b + s z B^T with z = x A^T: sample z (rank r) beside the base value in one pass
            # and apply B per head afterwards, never forming the LoRA-augmented value
            z, lora_B, scaling, adapter_index = fused
            base = F.linear(input_flatten, vp.weight, vp.bias)
            if input_padding_mask is not None:
                base = base.masked_fill(input_padding_mask[..., None], 0.0)
                z = z.masked_fill(input_padding_mask[..., None], 0.0)
            return ops.ms_deform_attn_lora(
                base.view(N, S, self.n_heads, self.d_model // self.n_heads), z, lora_B, scaling,
                input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights,
                adapter_index=adapter_index,
            )
        value = self.project_value(input_flatten, input_padding_mask)
        # looked up at call time so a backend installed after import (or a test's patch) is used
        return ops.ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights
        )

    def compute_sampling_locations(self, query, reference_points, input_spatial_shapes):
        """Sampling locations (N, Q, H, L, P, 2) as (x, y) in [0, 1] of each level (outside = zero padding).

        reference_points (N, Q, L, 2): offsets are in pixels of each level (divided by (W_l, H_l));
        reference_points (N, Q, L, 4): boxes (cx, cy, w, h); offsets are relative to half the box / P.
        """
        N, Q, _ = query.shape
        offsets = self.sampling_offsets(query).view(N, Q, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            if torch.is_tensor(input_spatial_shapes):
                normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            else:  # (H_l, W_l) ints: a constant (what export traces)
                normalizer = torch.tensor([[w, h] for h, w in input_spatial_shapes], dtype=offsets.dtype,
                                          device=offsets.device)
            return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            boxes = reference_points[:, :, None, :, None, :]
            return boxes[..., :2] + offsets / self.n_points * boxes[..., 2:] * 0.5
        raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]} instead.")

    def compute_attention_weights(self, query):
        """(N, Q, d) -> (N, Q, H, L, P), softmax over the L * P (level, point) pairs of each head."""
        N, Q, _ = query.shape
        logits = self.attention_weights(query).view(N, Q, self.n_heads, self.n_levels * self.n_points)
        return F.softmax(logits, -1).view(N, Q, self.n_heads, self.n_levels, self.n_points)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        Args:
            query: (N, Q, d).
            reference_points: (N, Q, L, 2) in [0, 1] (top-left (0, 0), bottom-right (1, 1), padding included),
                or (N, Q, L, 4) reference boxes.
            input_flatten: (N, S, d), S = sum_l H_l * W_l.
            input_spatial_shapes: (L, 2) int64 (H_l, W_l), or a list of L (H_l, W_l) int pairs (no host read of
                a tensor; what torch.export and ONNX export need).
            input_level_start_index: (L,) int64 start of each level in S (a list of ints with int pairs).
            input_padding_mask: (N, S) bool, True at padding, or None.
        Returns:
            (N, Q, d)
        """
        N, S, _ = input_flatten.shape
        if torch.is_tensor(input_spatial_shapes):
            total = None if torch.compiler.is_compiling() else int(input_spatial_shapes.prod(1).sum())
        else:
            total = sum(h * w for h, w in input_spatial_shapes)
        if total is not None and total != S:
            raise ValueError(f"input_spatial_shapes add up to {total} positions but input_flatten has {S}")
        sampling_locations = self.compute_sampling_locations(query, reference_points, input_spatial_shapes)
        attention_weights = self.compute_attention_weights(query)
        output = self.aggregate_values(
            input_flatten,
            input_padding_mask,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations,
            attention_weights,
        )
        return self.output_proj(output)
