"""Mona, the multi-cognitive visual adapter (Yin et al., CVPR 2025; see docs/methods.md).

After the attention's and after the MLP's residual addition in a backbone transformer block, on the block's
tokens x laid out as the image grid (B, H, W, d):

    s(x)    = gamma * LayerNorm(x) + gammax * x           gamma (d,) starts at 1e-6, gammax (d,) at 1
    z       = D s(x)                                      D: d -> m (BOTTLENECK, the paper's 64 at every stage)
    z       = (dw3(z) + dw5(z) + dw7(z)) / 3 + z          depth-wise k x k convolutions over (H, W), 'same' padding
    z       = z + proj(z)                                 proj: 1x1 convolution m -> m
    Mona(x) = x + U dropout(GeLU(z))                      U: m -> d, zero at start (ours), so Mona starts as x

The grid is the block's whole map of real tokens: a Swin block's (B, H*W, d) viewed as (B, H, W, d) with the
H, W its stage passes (not its windows, shifted or padded), a ViT or SAM block's (B, H, W, d) after the window
unpartition. A forward hook cannot reach a residual sum, so a block gains Mona by becoming an instance of a
subclass of its own class whose forward is its family's computation with Mona after the two residual
additions (`BLOCK_FAMILIES`); the Mona modules are its children `mona_attn` and `mona_mlp`.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sites
from ..errors import PeftConfigError
from .base import PeftMethod, Plan, option, register_method

PLACEMENTS = ("attn", "mlp")
KERNELS = (3, 5, 7)
BLOCK_FAMILIES = ("peft_d2's SwinTransformerBlock (peft_d2.modeling.backbone.swin), detectron2's "
                  "SwinTransformerBlock and ViT Block (detectron2.modeling.backbone.swin / .vit), SAM's image-encoder "
                  "Block (segment_anything.modeling.image_encoder)")


@dataclass
class MonaConfig:
    """Attributes:
    bottleneck: hidden width m of every Mona (the paper uses 64 at every stage).
    dropout: dropout on the GeLU's output, before the up-projection.
    placements: "attn" (after the attention sub-layer's residual addition) and/or "mlp" (after the MLP's).
    blocks: glob patterns over backbone transformer-block paths that get Mona.
    """

    bottleneck: int = option(64, "hidden width m of every Mona (the paper's 64 at every stage)")
    dropout: float = option(0.1, "dropout on the GeLU's output, in [0, 1)")
    placements: tuple = option(("attn", "mlp"), "`attn` (after the attention's residual addition), `mlp` (after "
                                                "the MLP's)")
    blocks: tuple = option(("*",), "glob patterns over backbone transformer-block paths that get Mona")

    def __post_init__(self):
        self.placements, self.blocks = tuple(self.placements), tuple(self.blocks)
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise PeftConfigError(f"MODEL.PEFT.MONA.BOTTLENECK must be a positive integer, got {self.bottleneck!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftConfigError(f"MODEL.PEFT.MONA.DROPOUT must be in [0, 1), got {self.dropout!r}")
        bad = [p for p in self.placements if p not in PLACEMENTS]
        if bad or not self.placements or len(set(self.placements)) != len(self.placements):
            raise PeftConfigError(f"MODEL.PEFT.MONA.PLACEMENTS must be a non-empty subset of {PLACEMENTS}, got "
                                  f"{self.placements!r}")
        if not self.blocks:
            raise PeftConfigError("MODEL.PEFT.MONA.BLOCKS must name at least one pattern (e.g. ['*'])")


class Mona(nn.Module):
    """One Mona: (B, H, W, d) -> (B, H, W, d). Parameters: 2 d m + m^2 + 88 m + 5 d (`mona_parameter_count`)."""

    peft_method = "mona"

    def __init__(self, dim: int, width: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.down = nn.Linear(dim, width)
        self.conv3, self.conv5, self.conv7 = (nn.Conv2d(width, width, k, padding=k // 2, groups=width) for k in KERNELS)
        self.proj = nn.Conv2d(width, width, 1)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, dim)
        nn.init.trunc_normal_(self.down.weight, std=0.02)  # what the official backbone's init gives its linears
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.down(self.gamma * self.norm(x) + self.gammax * x).permute(0, 3, 1, 2)  # (B, m, H, W)
        z = (self.conv3(z) + self.conv5(z) + self.conv7(z)) / 3.0 + z
        z = z + self.proj(z)
        return x + self.up(self.dropout(F.gelu(z.permute(0, 2, 3, 1))))


def mona_parameter_count(dim: int, width: int) -> int:
    """Closed form of one Mona: LayerNorm and the two scales 4 d, D d m + m, depth-wise convolutions
    (9 + 25 + 49) m + 3 m, proj m^2 + m, U m d + d."""
    return 2 * dim * width + width * width + 88 * width + 5 * dim


# ------------------------------------------------------------------------------ block forwards with Mona
def _mona(block, name: str, x: torch.Tensor) -> torch.Tensor:
    mona = block._modules.get(name)
    return x if mona is None else mona(x)


def _swin(block, x, H: int, W: int, attn_mask):
    """A Swin block on tokens (B, H*W, C): the shifted-window attention of peft_d2's block (pad, shift, attend,
    undo both, crop to the H x W real tokens), Mona on (B, H, W, C) after each residual addition."""
    from ..modeling.backbone.swin import SwinTransformerBlock

    B, L, C = x.shape
    if L != H * W:
        raise ValueError(f"input has {L} tokens, expected H*W = {H}*{W}")
    attn = SwinTransformerBlock.window_attention(block, block.norm1(x).view(B, H, W, C), attn_mask).view(B, L, C)
    x = _mona(block, "mona_attn", (x + block.drop_path(attn)).view(B, H, W, C)).reshape(B, L, C)
    return _mona(block, "mona_mlp", (x + block.drop_path(block.mlp(block.norm2(x)))).view(B, H, W, C)).reshape(B, L, C)


def _peft_d2_swin_forward(self, x, H: int, W: int, attn_mask):
    return _swin(self, x, H, W, attn_mask)


def _detectron2_swin_forward(self, x, mask_matrix):
    return _swin(self, x, self.H, self.W, mask_matrix)  # detectron2's stage sets blk.H, blk.W before the call


def _vit_forward(self, x):
    """detectron2's ViT Block and SAM's Block on (B, H, W, C): windowed (window_size > 0) or global attention,
    Mona on the unpartitioned map after each residual addition (SAM's blocks have no drop path, detectron2's
    may end in a residual conv block, which comes after Mona)."""
    from detectron2.modeling.backbone.utils import window_partition, window_unpartition

    shortcut, x = x, self.norm1(x)
    if self.window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, self.window_size)
    x = self.attn(x)
    if self.window_size > 0:
        x = window_unpartition(x, self.window_size, pad_hw, (H, W))
    drop_path = getattr(self, "drop_path", _identity)
    x = _mona(self, "mona_attn", shortcut + drop_path(x))
    x = _mona(self, "mona_mlp", x + drop_path(self.mlp(self.norm2(x))))
    if getattr(self, "use_residual_block", False):
        x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return x


def _identity(x):
    return x


def _families() -> dict:
    """{block class: its forward with Mona}."""
    from detectron2.modeling.backbone import swin as d2_swin
    from detectron2.modeling.backbone import vit as d2_vit

    from ..modeling.backbone import swin

    families = {swin.SwinTransformerBlock: _peft_d2_swin_forward,
                d2_swin.SwinTransformerBlock: _detectron2_swin_forward, d2_vit.Block: _vit_forward}
    try:
        from segment_anything.modeling.image_encoder import Block as SAMBlock
    except ImportError:  # SAM's package is only needed for SAM's encoder
        return families
    return {**families, SAMBlock: _vit_forward}


def mona_forward(block: nn.Module):
    """The forward with Mona of `block`'s family, or None: its class must be one of the families' or a subclass
    that keeps the family's forward (another forward computes something this one does not reproduce)."""
    for base, forward in _families().items():
        if isinstance(block, base) and type(block).forward is base.forward:
            return forward
    return None


_CLASSES = {}


def convert_block(block: nn.Module) -> None:
    """Make `block` an instance of Mona<Class>, its class with the family's forward with Mona. Without children
    `mona_attn` / `mona_mlp` that forward is the block's own computation."""
    if getattr(type(block), "peft_mona", False):
        return
    base = type(block)
    if base not in _CLASSES:
        attrs = {"forward": mona_forward(block), "peft_mona": True, "__module__": __name__}
        _CLASSES[base] = type(f"Mona{base.__name__}", (base,), attrs)
    block.__class__ = _CLASSES[base]


def routing_slot(block: nn.Module, attr: str) -> nn.Module:
    """For serving several adapters (peft_d2.multi): the block's Mona site `attr` as an identity module, whose
    output the router replaces, for each image, by that image's adapter's Mona of it (images on the base, or on
    an adapter without Mona there, keep the identity)."""
    convert_block(block)
    if attr not in block._modules:
        block.add_module(attr, nn.Identity())
    return block._modules[attr]


@register_method
class MonaMethod(PeftMethod):
    """Mona after the attention and/or the MLP of every backbone transformer block matching MONA.BLOCKS. Plan
    sites: (block path, block)."""

    name, config_class = "mona", MonaConfig

    def plan(self, model, cfg, planned, **inputs):
        blocks = sites.find_modules(model, sites.is_transformer_block, cfg.blocks, "MODEL.PEFT.MONA.BLOCKS")
        for path, block in blocks:
            if mona_forward(block) is None:
                raise PeftConfigError(
                    f"MODEL.PEFT.MONA: the transformer block '{path}' ({type(block).__module__}."
                    f"{type(block).__qualname__}) is of no block family Mona supports; it supports {BLOCK_FAMILIES} "
                    "(MODEL.PEFT.MONA.BLOCKS chooses the blocks)"
                )
        adds = [(path, f"mona_{p}") for path, _ in blocks for p in cfg.placements]
        return Plan(converts=[path for path, _ in blocks], adds=adds, sites=blocks)

    def apply(self, model, cfg, plan):
        for _, block in plan.sites:
            p = next(block.parameters())
            convert_block(block)
            for placement in cfg.placements:
                mona = Mona(sites.block_dim(block), cfg.bottleneck, cfg.dropout).train(block.training)  # its dropout
                setattr(block, f"mona_{placement}", mona.to(device=p.device, dtype=p.dtype))
