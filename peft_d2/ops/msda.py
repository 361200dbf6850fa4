"""The public face of the multi-scale deformable attention operator: checks, dtype policy, backend dispatch.

Backends (docs/design.md, principle 5): `cuda` and `cpu` run the compiled kernels of peft_d2._C (torch custom ops
`torch.ops.peft_d2.*` with fake, autograd and autocast implementations), `reference` runs grid_sample in pure
PyTorch. The choice is automatic per device; PEFT_D2_MSDA_BACKEND=cuda|cpu|reference overrides it.
"""

import torch

from ._extension import select_backend
from .reference import ms_deform_attn_lora_reference, ms_deform_attn_reference

_HALF = (torch.float16, torch.bfloat16)


def _shape(t):
    return tuple(t.shape)


def _require(cond, msg):
    if not cond:
        raise ValueError(msg)


def level_starts(spatial_shapes) -> list[int]:
    """The start of each level in S for levels given as (H_l, W_l) ints: the exclusive prefix sum of H_l * W_l."""
    starts, total = [], 0
    for h, w in spatial_shapes:
        starts.append(total)
        total += h * w
    return starts


def _static_levels(name, spatial_shapes, L, S):
    """Checks levels given as a sequence of (H_l, W_l) ints (no tensor read: what export traces); returns them."""
    try:
        shapes = [(h, w) for h, w in spatial_shapes]
    except (TypeError, ValueError):
        shapes = None
    _require(
        shapes is not None and all(isinstance(v, (int, torch.SymInt)) for hw in shapes for v in hw),
        f"{name}: spatial_shapes must be an (L, 2) int64 tensor or a sequence of L (H_l, W_l) int pairs, "
        f"got {spatial_shapes!r}",
    )
    _require(len(shapes) == L, f"{name}: spatial_shapes has {len(shapes)} levels but sampling_locations has L = {L}")
    _require(all(h > 0 and w > 0 for h, w in shapes), f"{name}: spatial_shapes must be positive, got {shapes}")
    _require(
        sum(h * w for h, w in shapes) == S,
        f"{name}: spatial_shapes sum of H_l*W_l is {sum(h * w for h, w in shapes)} but value has S = {S} positions",
    )
    return shapes


def _check(name, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Checks shapes, dtypes and devices; returns (spatial_shapes, level_start_index) as int64 tensors, or, where
    the levels came as (H_l, W_l) ints, as a list of pairs and a list of starts."""
    for arg, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not torch.is_tensor(t):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    _require(value.dim() == 4, f"{name}: value must be (N, S, H, D), got shape {_shape(value)}")
    N, S, H, _ = value.shape
    _require(
        sampling_locations.dim() == 6
        and sampling_locations.shape[0] == N
        and sampling_locations.shape[2] == H
        and sampling_locations.shape[5] == 2,
        f"{name}: sampling_locations must be (N, Q, H, L, P, 2) with N={N}, H={H} from value, "
        f"got shape {_shape(sampling_locations)}",
    )
    _, Q, _, L, P, _ = sampling_locations.shape
    _require(
        _shape(attention_weights) == (N, Q, H, L, P),
        f"{name}: attention_weights must be (N, Q, H, L, P) = {(N, Q, H, L, P)}, got {_shape(attention_weights)}",
    )
    for arg, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        _require(t.is_floating_point(), f"{name}: {arg} must be floating point, got {t.dtype}")
    for arg, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        _require(
            t.device == value.device, f"{name}: {arg} is on {t.device} but value is on {value.device}: move it there"
        )
    if not torch.is_tensor(spatial_shapes):
        shapes = _static_levels(name, spatial_shapes, L, S)
        starts = level_starts(shapes)
        if level_start_index is not None and not torch.is_tensor(level_start_index):
            _require(
                list(level_start_index) == starts,
                f"{name}: level_start_index must be the exclusive prefix sum of H_l*W_l = {starts}, "
                f"got {list(level_start_index)}",
            )
        return shapes, starts
    for arg, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    _require(
        _shape(spatial_shapes) == (L, 2),
        f"{name}: spatial_shapes must be (L, 2) = ({L}, 2) (L from sampling_locations), got {_shape(spatial_shapes)}",
    )
    _require(
        _shape(level_start_index) == (L,),
        f"{name}: level_start_index must be (L,) = ({L},), got {_shape(level_start_index)}",
    )
    for arg, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        _require(
            not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
            f"{name}: {arg} must be an integer tensor (int64), got {t.dtype}",
        )
        _require(
            t.device == value.device, f"{name}: {arg} is on {t.device} but value is on {value.device}: move it there"
        )
    spatial_shapes = spatial_shapes.long()
    level_start_index = level_start_index.long()
    if not torch.compiler.is_compiling():
        # one host read (a sync on CUDA): the kernels index by these numbers
        levels = torch.cat([spatial_shapes.flatten(), level_start_index]).tolist()
        sizes = [levels[2 * i] * levels[2 * i + 1] for i in range(L)]
        _require(
            all(levels[2 * i] > 0 and levels[2 * i + 1] > 0 for i in range(L)),
            f"{name}: spatial_shapes must be positive, got {levels[: 2 * L]}",
        )
        _require(
            sum(sizes) == S,
            f"{name}: spatial_shapes sum of H_l*W_l is {sum(sizes)} but value has S = {S} positions",
        )
        starts = [sum(sizes[:i]) for i in range(L)]
        _require(
            levels[2 * L :] == starts,
            f"{name}: level_start_index must be the exclusive prefix sum of H_l*W_l = {starts}, got {levels[2 * L :]}",
        )
    return spatial_shapes, level_start_index


def _level_tensors(spatial_shapes, level_start_index, device):
    """What the compiled kernels take: both as int64 tensors on the values' device."""
    if torch.is_tensor(spatial_shapes):
        return spatial_shapes, level_start_index
    levels = torch.tensor([v for hw in spatial_shapes for v in hw] + level_start_index, dtype=torch.long)
    levels = levels.to(device, non_blocking=True)
    L = len(level_start_index)
    return levels[: 2 * L].view(L, 2), levels[2 * L :]


def _kernel_dtypes(backend, value, sampling_locations, attention_weights):
    """(value dtype, geometry dtype) the compiled kernel runs in."""
    geometry = torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    if backend == "cuda" and value.dtype in _HALF:
        return value.dtype, (value.dtype if geometry == value.dtype else torch.float32)
    dtype = torch.promote_types(value.dtype, geometry)
    if backend == "cpu" and dtype in _HALF:
        dtype = torch.float32  # the CPU kernel computes half inputs in float32
    return dtype, dtype


def _reference_dtype(value, sampling_locations, attention_weights):
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    return torch.float32 if (value.device.type == "cpu" and dtype in _HALF) else dtype


def _output_dtype(out, value):
    """Half inputs computed in float32 on CPU come back in their dtype, unless autocast asked for float32."""
    if out.dtype != value.dtype and value.dtype in _HALF and not torch.is_autocast_enabled(value.device.type):
        return out.to(value.dtype)
    return out


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Deformable DETR / Mask2Former), bilinear with zero padding.

    Args:
        value: (N, S, H, D) values per head, S = sum_l H_l * W_l, levels flattened row-major in order.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level; or a sequence of L (H_l, W_l) int pairs, which
            spares the host read of the tensor's values and lets torch.export / ONNX export trace the levels.
        level_start_index: (L,) int64, offset of each level in S (the exclusive prefix sum of H_l * W_l); with
            spatial_shapes as int pairs, a list of ints or None (derived).
        sampling_locations: (N, Q, H, L, P, 2), (x, y) normalised to [0, 1] per level (pixel centres at
            (i + 0.5) / size, as grid_sample with align_corners=False); outside the level reads zeros.
        attention_weights: (N, Q, H, L, P); used as given (no normalisation).
    Returns:
        (N, Q, H * D), heads concatenated.

    Gradients flow to value, sampling_locations and attention_weights. float32/float64 everywhere, plus
    float16/bfloat16 on CUDA (natively, float32 accumulation; the geometry may stay float32). Half inputs on CPU
    are computed in float32.
    """
    name = "ms_deform_attn"
    spatial_shapes, level_start_index = _check(
        name, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    backend = select_backend(value.device.type)
    if backend == "reference":
        dt = _reference_dtype(value, sampling_locations, attention_weights)
        out = ms_deform_attn_reference(
            value.to(dt), spatial_shapes, level_start_index, sampling_locations.to(dt), attention_weights.to(dt)
        )
        return _output_dtype(out, value)
    vdt, gdt = _kernel_dtypes(backend, value, sampling_locations, attention_weights)
    spatial_shapes, level_start_index = _level_tensors(spatial_shapes, level_start_index, value.device)
    out = torch.ops.peft_d2.ms_deform_attn_forward(
        value.to(vdt), spatial_shapes, level_start_index, sampling_locations.to(gdt), attention_weights.to(gdt)
    )
    return _output_dtype(out, value)


def _check_lora(name, value, z, lora_B, scaling, adapter_index):
    N, S, H, D = value.shape
    for arg, t in (("z", z), ("lora_B", lora_B)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        _require(t.is_floating_point(), f"{name}: {arg} must be floating point, got {t.dtype}")
        _require(t.device == value.device, f"{name}: {arg} is on {t.device} but value is on {value.device}")
    _require(
        z.dim() == 3 and z.shape[:2] == (N, S),
        f"{name}: z must be (N, S, r) = ({N}, {S}, r) (the rank-r projection x A^T), got {_shape(z)}",
    )
    r = z.shape[2]
    if lora_B.dim() == 2:
        _require(_shape(lora_B) == (H * D, r), f"{name}: lora_B must be (H*D, r) = {(H * D, r)}, got {_shape(lora_B)}")
        _require(adapter_index is None, f"{name}: adapter_index is only for a stacked lora_B of shape (K, H*D, r)")
    else:
        _require(
            lora_B.dim() == 3 and lora_B.shape[1:] == (H * D, r),
            f"{name}: lora_B must be (H*D, r) or (K, H*D, r) with H*D={H * D}, r={r}, got {_shape(lora_B)}",
        )
        K = lora_B.shape[0]
        _require(
            torch.is_tensor(adapter_index),
            f"{name}: a stacked lora_B of shape {_shape(lora_B)} needs adapter_index, an (N,) = ({N},) int64 tensor",
        )
        _require(
            _shape(adapter_index) == (N,) and not adapter_index.is_floating_point(),
            f"{name}: adapter_index must be an (N,) = ({N},) integer tensor, got {_shape(adapter_index)} "
            f"{adapter_index.dtype}",
        )
        _require(
            adapter_index.device == value.device,
            f"{name}: adapter_index is on {adapter_index.device} but value is on {value.device}",
        )
        if not torch.compiler.is_compiling() and N > 0:
            lo, hi = torch.aminmax(adapter_index)
            lo, hi = int(lo), int(hi)
            _require(0 <= lo and hi < K, f"{name}: adapter_index values must be in [0, {K}), got [{lo}, {hi}]")
    if torch.is_tensor(scaling):
        ok = scaling.dim() == 0 or (lora_B.dim() == 3 and _shape(scaling) == (lora_B.shape[0],))
        _require(
            ok,
            f"{name}: scaling must be a number, a 0-d tensor, or (K,) with a stacked lora_B; "
            f"got shape {_shape(scaling)}",
        )
    else:
        _require(isinstance(scaling, (int, float)), f"{name}: scaling must be a number or a tensor, got {scaling!r}")


def ms_deform_attn_lora(
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
    """`ms_deform_attn` on value + scaling * (z @ B^T), without materialising the augmented value.

    Sampling and the weighted sum are linear, so z is sampled at each head's locations with each head's weights
    in the same pass as value (zs, (N, Q, H, r)) and head h's slice B[h*D:(h+1)*D] is applied afterwards:
    out[n, q, h] = sample(value)[n, q, h] + scaling * B_h zs[n, q, h].

    Args:
        value: (N, S, H, D) base values (value_proj(x) of the frozen layer) per head.
        z: (N, S, r) the LoRA rank-r projection of the value input, x A^T (dropout applied by the caller).
        lora_B: (H*D, r) LoRA up-projection of value_proj, or (K, H*D, r) for K adapters.
        scaling: LoRA scale (alpha / r): a number, a 0-d tensor, or a (K,) tensor with a stacked lora_B.
        spatial_shapes, level_start_index, sampling_locations, attention_weights: as in `ms_deform_attn`.
        adapter_index: (N,) int64, required with a stacked lora_B: image n uses lora_B[adapter_index[n]].
    Returns:
        (N, Q, H * D). Gradients flow to value, z, lora_B, (tensor) scaling, sampling_locations and
        attention_weights.
    """
    name = "ms_deform_attn_lora"
    spatial_shapes, level_start_index = _check(
        name, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    _check_lora(name, value, z, lora_B, scaling, adapter_index)
    backend = select_backend(value.device.type)
    if backend == "reference":
        dt = _reference_dtype(value, sampling_locations, attention_weights)
        out = ms_deform_attn_lora_reference(
            value.to(dt),
            z.to(dt),
            lora_B.to(dt),
            scaling,
            spatial_shapes,
            level_start_index,
            sampling_locations.to(dt),
            attention_weights.to(dt),
            adapter_index,
        )
        return _output_dtype(out, value)
    vdt, gdt = _kernel_dtypes(backend, value, sampling_locations, attention_weights)
    spatial_shapes, level_start_index = _level_tensors(spatial_shapes, level_start_index, value.device)
    out, zs = torch.ops.peft_d2.ms_deform_attn_lora_forward(
        value.to(vdt),
        z.to(vdt),
        spatial_shapes,
        level_start_index,
        sampling_locations.to(gdt),
        attention_weights.to(gdt),
    )
    N, Q, H, r = zs.shape
    D = value.shape[3]
    B = lora_B.to(zs.dtype)
    if B.dim() == 2:
        delta = torch.einsum("nqhr,hdr->nqhd", zs, B.view(H, D, r))
    else:
        delta = torch.einsum("nqhr,nhdr->nqhd", zs, B[adapter_index].view(N, H, D, r))
    if torch.is_tensor(scaling) and scaling.dim() == 1:
        scale = scaling[adapter_index].to(out.dtype).view(N, 1, 1)
    else:
        scale = scaling
    return _output_dtype(out + scale * delta.reshape(N, Q, H * D), value)
