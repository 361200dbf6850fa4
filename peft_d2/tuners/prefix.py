"""Prefix tuning: learned keys and values prepended in attention (Li and Liang; see docs/methods.md).

    K' = [P_K ; X W_k],  V' = [P_V ; X W_v],  P_K, P_V: (l, d) per attention layer

optionally produced by an MLP from a learned (l, d) embedding (reparameterisation). Queries attend over the
l prefix tokens and the real ones. In windowed attention (Swin, windowed ViT/SAM blocks) every window sees
the same prefix; relative-position bias and the shifted-window mask get zero columns for the prefix.

An attention layer gains a prefix by becoming an instance of a subclass of its own class whose forward is
the base computation with the prefix spliced in (`add_prefix`); its parameters keep their names and the
prefix lives in a new child `prefix`. Supported shapes (found by attributes, so detectron2's, the official
Mask2Former's and SAM's modules all work):
- ViT-style `Attention` (qkv, proj, num_heads, scale, use_rel_pos): input (B, H, W, C);
- Swin `WindowAttention` (qkv, proj, num_heads, scale, relative_position_bias_table): input (B*nW, N, C);
- `nn.MultiheadAttention` with packed projections (the Mask2Former decoder's self-attention).

A MoPEFT gate (tuners/mopeft.py) may scale the prefix per image: [g * P_K ; ...], [g * P_V ; ...].
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sites
from ..errors import PeftConfigError
from .base import PeftMethod, Plan, option, register_method

PREFIX_PLACEMENTS = ("attn", "decoder_self_attn")


@dataclass
class PrefixConfig:
    """Attributes:
    length: prefix tokens l per attention layer.
    hidden: width of the reparameterisation MLP (embedding -> Linear -> tanh -> Linear -> (P_K, P_V));
        0 learns P_K and P_V directly.
    placements: "attn" (the attention of backbone transformer blocks) and/or "decoder_self_attn".
    blocks: glob patterns over backbone transformer-block paths (for "attn").
    """

    length: int = option(8, "prefix tokens l per attention layer")
    hidden: int = option(0, "> 0: prefixes produced by an MLP of this width (reparameterisation); 0: learned directly")
    placements: tuple = option(("attn",), "`attn` (backbone blocks), `decoder_self_attn`")
    blocks: tuple = option(("*",), "glob patterns over backbone transformer-block paths (for `attn`)")

    def __post_init__(self):
        self.placements, self.blocks = tuple(self.placements), tuple(self.blocks)
        if not isinstance(self.length, int) or self.length <= 0:
            raise PeftConfigError(f"MODEL.PEFT.PREFIX.LENGTH must be a positive integer, got {self.length!r}")
        if self.hidden < 0:
            raise PeftConfigError(f"MODEL.PEFT.PREFIX.HIDDEN must be >= 0, got {self.hidden!r}")
        bad = [p for p in self.placements if p not in PREFIX_PLACEMENTS]
        if bad or not self.placements:
            raise PeftConfigError(
                f"MODEL.PEFT.PREFIX.PLACEMENTS must be a non-empty subset of {PREFIX_PLACEMENTS}, got {self.placements}"
            )


class PrefixKV(nn.Module):
    """The (l, d) prefix keys and values of one attention layer."""

    peft_method = "prefix"

    def __init__(self, dim: int, cfg: PrefixConfig):
        super().__init__()
        self.length = cfg.length
        if cfg.hidden > 0:
            self.embedding = nn.Parameter(torch.randn(cfg.length, dim) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 2 * dim))
        else:
            self.keys = nn.Parameter(torch.randn(cfg.length, dim) * 0.02)
            self.values = nn.Parameter(torch.randn(cfg.length, dim) * 0.02)

    def forward(self):
        """(P_K, P_V), each (l, d)."""
        if hasattr(self, "mlp"):
            return self.mlp(self.embedding).chunk(2, dim=-1)
        return self.keys, self.values

    def per_sample(self, batch: int, gate=None):
        """(P_K, P_V), each (batch, l, d); a gate (B,) with batch a multiple of B (windows of one image are
        contiguous) scales each sample's prefix."""
        pk, pv = self()
        pk, pv = pk.expand(batch, -1, -1), pv.expand(batch, -1, -1)
        if gate is not None:
            g = gate.repeat_interleave(batch // gate.shape[0])[:, None, None].to(pk.dtype)
            pk, pv = g * pk, g * pv
        return pk, pv


def _heads(t, heads):
    """(B, n, C) -> (B, heads, n, C / heads)."""
    B, n, C = t.shape
    return t.view(B, n, heads, C // heads).transpose(1, 2)


def _prefix_gate(module):
    gate = module.__dict__.get("peft_prefix_gate")
    return None if gate is None else gate.value("prefix")


def _vit_attention_forward(self, x):
    """ViT/SAM attention with prefix: x (B, H, W, C) -> (B, H, W, C)."""
    from detectron2.modeling.backbone.utils import add_decomposed_rel_pos

    B, H, W, C = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    pk, pv = self.prefix.per_sample(B, _prefix_gate(self))
    pk, pv = (_heads(t, self.num_heads).reshape(B * self.num_heads, self.prefix.length, -1) for t in (pk, pv))
    logits = (q * self.scale) @ k.transpose(-2, -1)
    if self.use_rel_pos:
        logits = add_decomposed_rel_pos(logits, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
    attn = torch.cat([(q * self.scale) @ pk.transpose(-2, -1), logits], -1).softmax(-1)
    out = attn @ torch.cat([pv, v], 1)
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


def _window_attention_forward(self, x, mask=None):
    """Swin window attention with prefix: x (B*nW, N, C); mask (nW, N, N) of 0/-inf or None."""
    B_, N, C = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    pk, pv = (_heads(t, self.num_heads) for t in self.prefix.per_sample(B_, _prefix_gate(self)))
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
    logits = q @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        logits = (logits.view(B_ // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
    attn = torch.cat([q @ pk.transpose(-2, -1), logits], -1).softmax(-1)  # prefix columns: no bias, no mask
    attn = self.attn_drop(attn)
    out = (attn @ torch.cat([pv, v], 2)).transpose(1, 2).reshape(B_, N, C)
    return self.proj_drop(self.proj(out))


def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention with prefix: projected keys/values are extended and passed as static_k/v.
    Inputs and outputs as nn.MultiheadAttention.forward."""
    if self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    S, N, E = key.shape
    n_prefix, h = self.prefix.length, self.num_heads
    w_k, w_v = self.in_proj_weight[E : 2 * E], self.in_proj_weight[2 * E :]
    bias = self.in_proj_bias
    b_k, b_v = (None, None) if bias is None else (bias[E : 2 * E], bias[2 * E :])
    pk, pv = self.prefix.per_sample(N, _prefix_gate(self))  # (N, l, E)
    k = torch.cat([pk.transpose(0, 1), F.linear(key, w_k, b_k)], 0)  # (l + S, N, E)
    v = torch.cat([pv.transpose(0, 1), F.linear(value, w_v, b_v)], 0)
    static_k = k.reshape(n_prefix + S, N * h, E // h).transpose(0, 1)
    static_v = v.reshape(n_prefix + S, N * h, E // h).transpose(0, 1)
    if key_padding_mask is not None:  # prefix columns are never masked
        key_padding_mask = F.pad(key_padding_mask, (n_prefix, 0), value=0)
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (n_prefix, 0), value=0)
    # torch checks masks against the key's length, so the key/value arguments carry the extended length; their
    # projections are discarded in favour of static_k/static_v (a small cost at decoder sizes).
    key = value = key.new_zeros(()).expand(n_prefix + S, N, E)
    out, weights = F.multi_head_attention_forward(
        query, key, value, E, h, self.in_proj_weight, self.in_proj_bias, None, None, False, self.dropout,
        self.out_proj.weight, self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
        need_weights=need_weights, attn_mask=attn_mask, static_k=static_k, static_v=static_v,
        average_attn_weights=average_attn_weights,
    )
    if self.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def attention_kind(module: nn.Module):
    """"vit", "window", "mha" or None: which prefix forward fits this attention module."""
    if type(module) is nn.MultiheadAttention:
        return "mha" if module._qkv_same_embed_dim and module.bias_k is None else None
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("qkv", "proj")):
        return None
    if hasattr(module, "relative_position_bias_table") and hasattr(module, "relative_position_index"):
        return "window"
    if hasattr(module, "use_rel_pos") and hasattr(module, "scale"):
        return "vit"
    return None


_FORWARDS = {"vit": _vit_attention_forward, "window": _window_attention_forward, "mha": _mha_forward}
_CLASSES = {}


def _prefix_class(base: type, kind: str) -> type:
    """Prefix<Base>: a subclass of the module's own class whose forward splices in the prefix."""
    key = (base, kind)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Prefix{base.__name__}", (base,), {"forward": _FORWARDS[kind], "peft_prefix": True})
    return _CLASSES[key]


def prefix_site(module: nn.Module) -> str:
    """The attention kind of `module`, or a PeftConfigError saying why it cannot take a prefix."""
    kind = attention_kind(module)
    if kind is None:
        raise PeftConfigError("prefix tuning applies to ViT/SAM Attention, Swin WindowAttention and packed "
                              "nn.MultiheadAttention modules")
    if getattr(type(module), "peft_prefix", False) or getattr(type(module), "peft_method", None) == "lora":
        raise PeftConfigError("this attention already has a prefix or LoRA on its own weights")
    return kind


def add_prefix(module: nn.Module, cfg: PrefixConfig) -> PrefixKV:
    """Give one attention layer a prefix in place (its class becomes Prefix<Class>)."""
    kind = prefix_site(module)
    dim = module.embed_dim if kind == "mha" else module.qkv.in_features
    p = next(module.parameters())
    prefix = PrefixKV(dim, cfg).to(device=p.device, dtype=p.dtype)
    module.__class__ = _prefix_class(type(module), kind)
    module.prefix = prefix
    return prefix


def prefix_parameter_count(dim: int, cfg: PrefixConfig) -> int:
    """2 l d directly; l d + (d h + h) + (2 d h + 2 d) with the MLP."""
    if cfg.hidden > 0:
        return cfg.length * dim + dim * cfg.hidden + cfg.hidden + 2 * dim * cfg.hidden + 2 * dim
    return 2 * cfg.length * dim


@register_method
class PrefixMethod(PeftMethod):
    """Prefixes in the attention of backbone blocks and/or the decoder's self-attention. Plan sites: (path,
    attention module)."""

    name, config_class = "prefix", PrefixConfig

    def plan(self, model, cfg, planned, **inputs):
        targets = []
        if "attn" in cfg.placements:
            blocks = sites.find_modules(model, sites.is_transformer_block, cfg.blocks, "MODEL.PEFT.PREFIX.BLOCKS")
            targets += [(f"{path}.attn", block.attn) for path, block in blocks]
        if "decoder_self_attn" in cfg.placements:
            key = "MODEL.PEFT.PREFIX.PLACEMENTS 'decoder_self_attn'"
            targets += sites.find_modules(model, sites.is_decoder_attention("self_attn"), ("*",), key)
        for path, module in targets:
            try:
                prefix_site(module)
            except PeftConfigError as e:
                raise PeftConfigError(f"prefix on module '{path}' ({type(module).__name__}): {e}") from None
        return Plan(converts=[p for p, _ in targets], adds=[(p, "prefix") for p, _ in targets], sites=targets)

    def apply(self, model, cfg, plan):
        for _, module in plan.sites:
            add_prefix(module, cfg)
