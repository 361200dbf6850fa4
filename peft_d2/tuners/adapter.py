"""Bottleneck adapters (Houlsby et al.; their placements in Mask2Former are described in docs/methods.md).

A unit maps h -> h + up(act(down(h))) with `up` zero-initialised, so a fresh adapter is the identity.
`SequentialAdapter` chains 1-3 units at a site; `ParallelAdapter` is the AdaptFormer-style branch added
beside a sub-layer: out = f(z) + s * up(act(down(z))).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sites
from ..errors import PeftConfigError
from .base import PeftMethod, Plan, gate_per_row, option, param_device, register_method

BLOCK_PLACEMENTS = ("attn", "mlp", "parallel_mlp")  # in backbone transformer blocks
HEAD_PLACEMENTS = ("msdeform_attn", "decoder_self_attn", "decoder_cross_attn")  # in the segmentation head
PLACEMENTS = BLOCK_PLACEMENTS + HEAD_PLACEMENTS
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class AdapterConfig:
    """Configuration of bottleneck adapters.

    Attributes:
        num_per_site: units chained at each sequential site (1, 2 or 3).
        bottleneck: hidden width m; 0 means use `reduction`.
        reduction: m = d // reduction when `bottleneck` is 0 (the default m = d / 4).
        placements: in backbone transformer blocks, any of "attn" (after the attention sub-layer, before its
            residual add), "mlp" (after the MLP sub-layer), "parallel_mlp" (a branch beside the MLP); in the
            head, "msdeform_attn" (after every MSDeformAttn, i.e. the pixel-decoder
            encoder's self-attention), "decoder_self_attn" and "decoder_cross_attn" (after the
            nn.MultiheadAttention named `self_attn` / `multihead_attn` of each transformer-decoder layer).
        activation: "relu" or "gelu".
        parallel_scale: s of the parallel branch.
        blocks: glob patterns over transformer-block paths that get adapters (default: every block).
    """

    num_per_site: int = option(1, "adapters chained at each sequential site (1-3)")
    bottleneck: int = option(0, "hidden width m; 0: dim // REDUCTION")
    reduction: int = option(4, "m = dim // REDUCTION when BOTTLENECK is 0")
    placements: tuple = option(("attn",), "`attn`, `mlp`, `parallel_mlp` (backbone blocks); `msdeform_attn`, "
                                          "`decoder_self_attn`, `decoder_cross_attn` (head)")
    activation: str = option("relu", "`relu` or `gelu`")
    parallel_scale: float = option(1.0, "scale s of the parallel branch")
    blocks: tuple = option(("*",), "glob patterns over transformer-block paths that get adapters")

    def __post_init__(self):
        self.placements = tuple(self.placements)
        self.blocks = tuple(self.blocks)
        if self.num_per_site not in (1, 2, 3):
            raise PeftConfigError(
                f"MODEL.PEFT.ADAPTER.NUM_PER_SITE must be 1, 2 or 3, got {self.num_per_site!r}"
            )
        if self.bottleneck < 0 or (self.bottleneck == 0 and self.reduction <= 0):
            raise PeftConfigError(
                "MODEL.PEFT.ADAPTER.BOTTLENECK must be > 0, or 0 with MODEL.PEFT.ADAPTER.REDUCTION > 0; got "
                f"{self.bottleneck!r} and {self.reduction!r}"
            )
        bad = [p for p in self.placements if p not in PLACEMENTS]
        if bad or not self.placements:
            raise PeftConfigError(
                f"MODEL.PEFT.ADAPTER.PLACEMENTS must be a non-empty subset of {PLACEMENTS}, got {self.placements!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise PeftConfigError(
                f"MODEL.PEFT.ADAPTER.ACTIVATION must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )

    def width(self, dim: int) -> int:
        return self.bottleneck if self.bottleneck > 0 else max(1, dim // self.reduction)


class Bottleneck(nn.Module):
    """up(act(down(z))), `up` zero-initialised. Parameters: 2 * d * m + m + d."""

    def __init__(self, dim: int, width: int, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))


class SequentialAdapter(nn.ModuleList):
    """n units in sequence, each h -> h + unit(h). Input and output (..., d)."""

    peft_method = "adapter"

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__([Bottleneck(dim, cfg.width(dim), cfg.activation) for _ in range(cfg.num_per_site)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gates = self.__dict__.get("peft_gate")
        g = None if gates is None else gate_per_row(gates.value("adapter"), h)
        for unit in self:
            h = h + (unit(h) if g is None else g * unit(h))
        return h


class ParallelAdapter(Bottleneck):
    """s * up(act(down(z))), added to a sub-layer's output by the site that owns it."""

    peft_method = "adapter"

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__(dim, cfg.width(dim), cfg.activation)
        self.scale = cfg.parallel_scale

    def attach_cobot(self, orchestrator, slot: int, dropout: float = 0.1):
        """COBOT's adapter form: s * up(Dropout(ReLU(M_t down(z)))), M_t = H_t diag(d_t) of slot t."""
        object.__setattr__(self, "cobot", orchestrator)
        self.cobot_slot = slot
        self.cobot_dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cobot = self.__dict__.get("cobot")
        if cobot is None:
            out = self.scale * super().forward(z)
        else:
            h = F.linear(self.down(z), cobot.slot_matrix(self.cobot_slot))
            out = self.scale * self.up(self.cobot_dropout(self.act(h)))
        gates = self.__dict__.get("peft_gate")
        return out if gates is None else gate_per_row(gates.value("adapter"), out) * out


def adapter_parameter_count(dim: int, width: int) -> int:
    """Closed form of one unit: 2 * d * m + m + d."""
    return 2 * dim * width + width + dim


def _sequential_adapter_hook(module, args, output):
    if isinstance(output, tuple):  # e.g. nn.MultiheadAttention returns (output, weights)
        return (module.adapter(output[0]),) + tuple(output[1:])
    return module.adapter(output)


def _parallel_adapter_hook(module, args, output):
    return output + module.parallel_adapter(args[0])


def attach_sequential_adapter(sublayer: nn.Module, dim: int, cfg: AdapterConfig) -> SequentialAdapter:
    """Chain `cfg.num_per_site` adapters after `sublayer`'s output (its child `adapter`, called by a forward
    hook: a module-level function that looks the adapter up on the module it is called with, so deep copies
    stay correct)."""
    sublayer.adapter = SequentialAdapter(dim, cfg).to(param_device(sublayer))
    sublayer.register_forward_hook(_sequential_adapter_hook)
    return sublayer.adapter


def attach_parallel_adapter(sublayer: nn.Module, dim: int, cfg: AdapterConfig) -> ParallelAdapter:
    """Add s * up(act(down(z))) of `sublayer`'s input z to its output (its child `parallel_adapter`)."""
    sublayer.parallel_adapter = ParallelAdapter(dim, cfg).to(param_device(sublayer))
    sublayer.register_forward_hook(_parallel_adapter_hook)
    return sublayer.parallel_adapter


HEAD_SITES = {  # placement -> (predicate, width of the site's output)
    "msdeform_attn": (sites.is_ms_deform_attn, lambda m: m.output_proj.out_features),
    "decoder_self_attn": (sites.is_decoder_attention("self_attn"), lambda m: m.embed_dim),
    "decoder_cross_attn": (sites.is_decoder_attention("multihead_attn"), lambda m: m.embed_dim),
}
ATTACH = {"adapter": attach_sequential_adapter, "parallel_adapter": attach_parallel_adapter}


@register_method
class AdapterMethod(PeftMethod):
    """Bottleneck adapters at ADAPTER.PLACEMENTS. Plan sites: (path of the sub-layer, sub-layer, attribute
    "adapter" or "parallel_adapter", width d of its output, bottleneck width m); COBOT's adapter form reads the
    parallel ones."""

    name, config_class = "adapter", AdapterConfig

    def plan(self, model, cfg, planned, **inputs):
        found = []
        block_placements = [p for p in cfg.placements if p not in HEAD_SITES]
        if block_placements:
            blocks = sites.find_modules(model, sites.is_transformer_block, cfg.blocks, "MODEL.PEFT.ADAPTER.BLOCKS")
            for path, block in blocks:
                dim = sites.block_dim(block)
                for placement in block_placements:
                    sub = "attn" if placement == "attn" else "mlp"
                    attr = "parallel_adapter" if placement == "parallel_mlp" else "adapter"
                    found.append((f"{path}.{sub}", getattr(block, sub), attr, dim))
        for placement in cfg.placements:
            if placement in HEAD_SITES:
                predicate, width = HEAD_SITES[placement]
                key = f"MODEL.PEFT.ADAPTER.PLACEMENTS '{placement}'"
                modules = sites.find_modules(model, predicate, ("*",), key)
                found += [(path, m, "adapter", width(m)) for path, m in modules]
        found = [(path, m, attr, dim, cfg.width(dim)) for path, m, attr, dim in found]
        return Plan(adds=[(path, attr) for path, _, attr, *_ in found], sites=found)

    def apply(self, model, cfg, plan):
        for _, sublayer, attr, dim, _ in plan.sites:
            ATTACH[attr](sublayer, dim, cfg)
