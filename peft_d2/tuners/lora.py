"""LoRA: y = W x + b + s * B A dropout(x), s = alpha / r (or alpha / sqrt(r) when rank-stabilised).

A layer gains LoRA by becoming an instance of a subclass of its own class (`LoRALinear` for nn.Linear,
`LoRAMultiheadAttention` for nn.MultiheadAttention): the object, its `weight`/`bias` Parameters, its hooks
and its name in the model stay the same, so base checkpoints load unchanged and only `lora_A`/`lora_B`
are new keys (no base parameter is renamed; see docs/design.md).

LoRA may cover the whole output of a layer or only some row blocks of it ("q" and "v" of a packed qkv
projection): each block i has its own A_i (r, in) and B_i (rows_i, r), stored stacked as
`lora_A` (n_blocks, r, in) and `lora_B` (n_blocks, rows, r) when there is more than one block.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sites
from ..errors import PeftConfigError
from ..sites import MSDA_LINEARS
from .base import PeftMethod, Plan, gate_per_row, option, register_method

QKV_BLOCKS = {"q": 0, "k": 1, "v": 2}


@dataclass
class LoRAConfig:
    """Configuration of LoRA.

    Attributes:
        r: rank.
        alpha: scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with `rslora`).
        dropout: dropout on the LoRA branch's input, in [0, 1).
        rslora: rank-stabilised scaling.
        targets: glob patterns over module paths (fnmatch), e.g. "backbone.*.attn.qkv". Matching modules
            must be nn.Linear or nn.MultiheadAttention.
        msda_layers: which of the linears of every MSDeformAttn ("sampling_offsets", "attention_weights",
            "value_proj", "output_proj") get LoRA, wherever such a module is (found by shape).
        qkv_blocks: for packed q/k/v projections (nn.MultiheadAttention always; a Linear whose path ends in
            "qkv"), which of "q", "k", "v" get LoRA, each with its own A and B. Empty: the whole output.
    """

    r: int = option(8, "rank r > 0", key="RANK")
    alpha: float = option(8.0, "scaling numerator: the update is scaled by alpha / r (> 0)")
    dropout: float = option(0.0, "dropout on the LoRA branch's input, in [0, 1)")
    rslora: bool = option(False, "scale by alpha / sqrt(r) instead of alpha / r")
    targets: list = option([], "glob patterns over module paths (`nn.Linear`, `nn.MultiheadAttention`), "
                               "e.g. `backbone.*.attn.qkv`")
    msda_layers: list = option([], "linears of every MSDeformAttn that get LoRA: `sampling_offsets`, "
                                   "`attention_weights`, `value_proj`, `output_proj`")
    qkv_blocks: str = option("qv", "row blocks of packed q/k/v projections that get LoRA (`\"\"`: the whole output)")

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise PeftConfigError(f"MODEL.PEFT.LORA.RANK must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise PeftConfigError(f"MODEL.PEFT.LORA.ALPHA must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftConfigError(f"MODEL.PEFT.LORA.DROPOUT must be in [0, 1), got {self.dropout!r}")
        unknown = [n for n in self.msda_layers if n not in MSDA_LINEARS]
        if unknown:
            raise PeftConfigError(
                f"MODEL.PEFT.LORA.MSDA_LAYERS: unknown layer(s) {unknown}; known: {list(MSDA_LINEARS)}"
            )
        bad = set(self.qkv_blocks) - set(QKV_BLOCKS)
        if bad or len(set(self.qkv_blocks)) != len(self.qkv_blocks):
            raise PeftConfigError(
                f"MODEL.PEFT.LORA.QKV_BLOCKS must be distinct letters of 'qkv', got {self.qkv_blocks!r}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALayer:
    """Mixin holding the LoRA factors of a layer whose weight is (out_features, in_features)."""

    peft_tensor_prefixes = ("lora_",)  # its own tensors an adapter file holds (the base weight stays out)

    def _init_lora(self, weight: torch.Tensor, cfg: LoRAConfig, row_blocks=None):
        out_features, in_features = weight.shape
        if row_blocks is None:
            row_blocks = [(0, out_features)]
        sizes = {e - s for s, e in row_blocks}
        if len(sizes) != 1:
            raise PeftConfigError(f"LoRA row blocks must have equal sizes, got {row_blocks}")
        rows = sizes.pop()
        n = len(row_blocks)
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_row_blocks = [tuple(b) for b in row_blocks]
        self.lora_r = cfg.r
        self.lora_scaling = cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(n, cfg.r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n, rows, cfg.r, **kw))
        for a in self.lora_A:  # PEFT's init: Kaiming-uniform A, zero B, so a fresh layer changes nothing
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_merged = False

    def attach_cobot(self, orchestrator, slots):
        """Route row block i through COBOT slot `slots[i]`: delta y = B_i M_t A_i x, no alpha / r scaling.
        The orchestrator is owned by the model root; here it is a plain (unregistered) reference."""
        object.__setattr__(self, "lora_cobot", orchestrator)
        self.lora_slots = list(slots)
        self.lora_scaling = 1.0

    def attach_gate(self, gates):
        """MoPEFT: scale the LoRA output by the block's per-image gate g_L instead of alpha / r."""
        object.__setattr__(self, "lora_gate", gates)
        self.lora_scaling = 1.0

    def _lora_mid(self, i):
        cobot = self.__dict__.get("lora_cobot")
        return None if cobot is None else cobot.slot_matrix(self.lora_slots[i])

    def lora_fusable(self) -> bool:
        """True when the update is s * B z with z = lora_down(x) over the whole output: what a fused kernel
        (peft_d2.ops.ms_deform_attn_lora) computes without forming the updated output."""
        full = len(self.lora_row_blocks) == 1 and self.lora_row_blocks[0] == (0, self._lora_weight().shape[0])
        return full and not self.lora_merged and self.__dict__.get("lora_gate") is None

    def lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """z = A dropout(x) (then M_t z with COBOT), (..., in) -> (..., r), for a fusable layer."""
        z = F.linear(self.lora_dropout(x), self.lora_A[0])
        mid = self._lora_mid(0)
        return z if mid is None else F.linear(z, mid)

    def lora_delta_weight(self) -> torch.Tensor:
        """s * B A (or B M A with COBOT) scattered into the layer's (out, in) weight shape."""
        weight = self._lora_weight()
        blocks = []
        for i in range(len(self.lora_row_blocks)):
            mid = self._lora_mid(i)
            a = self.lora_A[i] if mid is None else mid @ self.lora_A[i]
            blocks.append(self.lora_scaling * (self.lora_B[i] @ a))
        if len(blocks) == 1 and self.lora_row_blocks[0] == (0, weight.shape[0]):
            return blocks[0]
        delta = weight.new_zeros(weight.shape, dtype=blocks[0].dtype)
        for (s, e), b in zip(self.lora_row_blocks, blocks):
            delta = delta.index_add(0, torch.arange(s, e, device=delta.device), b)
        return delta

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A dropout(x) for an input x (..., in) -> (..., out) without forming B A."""
        x = self.lora_dropout(x)
        outs = []
        for i in range(len(self.lora_row_blocks)):
            z = F.linear(x, self.lora_A[i])
            mid = self._lora_mid(i)
            if mid is not None:
                z = F.linear(z, mid)
            outs.append(self.lora_scaling * F.linear(z, self.lora_B[i]))
        w = self._lora_weight()
        if len(outs) == 1 and self.lora_row_blocks[0] == (0, w.shape[0]):
            out = outs[0]
        else:
            out = x.new_zeros(*x.shape[:-1], w.shape[0])
            for (s, e), o in zip(self.lora_row_blocks, outs):
                out[..., s:e] = o
        gates = self.__dict__.get("lora_gate")
        return out if gates is None else out * gate_per_row(gates.value("lora"), out)

    @torch.no_grad()
    def merge(self):
        """Fold s * B A into the base weight (exact to float rounding); the LoRA branch is then skipped."""
        if self.__dict__.get("lora_gate") is not None:
            raise PeftConfigError("a MoPEFT-gated LoRA depends on the input and cannot be merged")
        if not self.lora_merged:
            self._lora_weight().add_(self.lora_delta_weight().to(self._lora_weight().dtype))
            self.lora_merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.lora_merged:
            self._lora_weight().sub_(self.lora_delta_weight().to(self._lora_weight().dtype))
            self.lora_merged = False


class LoRALinear(nn.Linear, LoRALayer):
    """nn.Linear with LoRA. Build with `LoRALinear.wrap(linear, cfg)`, which converts the object in place."""

    peft_method = "lora"

    @classmethod
    def wrap(cls, linear: nn.Linear, cfg: LoRAConfig, row_blocks=None) -> "LoRALinear":
        linear.__class__ = cls
        linear._init_lora(linear.weight, cfg, row_blocks)
        return linear

    def _lora_weight(self):
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_merged:
            return y
        return y + self.lora_output(x).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.lora_r}, lora_blocks={self.lora_row_blocks}"


class LoRAMultiheadAttention(nn.MultiheadAttention, LoRALayer):
    """nn.MultiheadAttention with LoRA on row blocks of the packed `in_proj_weight` (q: rows [0, d),
    k: [d, 2d), v: [2d, 3d)). The effective projection W + s * B A is formed once per call (3d x d, small)
    and passed to the functional attention, so masks, batch_first and dropout behave exactly as in torch.
    """

    peft_method = "lora"

    @classmethod
    def wrap(cls, mha: nn.MultiheadAttention, cfg: LoRAConfig, blocks: str) -> "LoRAMultiheadAttention":
        if not mha._qkv_same_embed_dim:
            raise PeftConfigError("LoRA on nn.MultiheadAttention needs a packed in_proj_weight (kdim == vdim == d)")
        if cfg.dropout > 0:  # the update is applied to the weight, which has no per-input dropout
            raise PeftConfigError("MODEL.PEFT.LORA.DROPOUT must be 0 for nn.MultiheadAttention targets")
        d = mha.embed_dim
        mha.__class__ = cls
        mha._init_lora(mha.in_proj_weight, cfg, [(QKV_BLOCKS[b] * d, (QKV_BLOCKS[b] + 1) * d) for b in blocks])
        return mha

    def _lora_weight(self):
        return self.in_proj_weight

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        w = self.in_proj_weight
        if not self.lora_merged:
            w = w + self.lora_delta_weight().to(w.dtype)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, w, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def lora_parameter_count(in_features: int, out_rows: int, r: int, n_blocks: int = 1) -> int:
    """Closed form: r * (in + rows) per block."""
    return n_blocks * r * (in_features + out_rows)


def lora_site(module: nn.Module, cfg: LoRAConfig, path: str = ""):
    """How `module` takes LoRA: ("linear", row blocks or None for the whole output) or ("mha", q/k/v letters);
    raises PeftConfigError when it cannot. Changes nothing."""
    if isinstance(module, LoRALayer):
        raise PeftConfigError("already has LoRA (two target patterns match it)")
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        if path.split(".")[-1] == "qkv" and cfg.qkv_blocks:
            if module.out_features % 3:
                raise PeftConfigError(f"a qkv projection needs out_features divisible by 3, got {module.out_features}")
            d = module.out_features // 3
            return "linear", [("qkv".index(b) * d, ("qkv".index(b) + 1) * d) for b in cfg.qkv_blocks]
        return "linear", None
    if type(module) is nn.MultiheadAttention:
        if not module._qkv_same_embed_dim:
            raise PeftConfigError("LoRA on nn.MultiheadAttention needs a packed in_proj_weight (kdim == vdim == d)")
        if cfg.dropout > 0:  # the update is applied to the weight, which has no per-input dropout
            raise PeftConfigError("MODEL.PEFT.LORA.DROPOUT must be 0 for nn.MultiheadAttention targets")
        return "mha", cfg.qkv_blocks or "qkv"
    raise PeftConfigError("LoRA applies to nn.Linear and nn.MultiheadAttention only")


def _wrap(module, cfg, site):
    kind, detail = site
    if kind == "linear":
        return LoRALinear.wrap(module, cfg, detail)
    return LoRAMultiheadAttention.wrap(module, cfg, detail)


def add_lora(module: nn.Module, cfg: LoRAConfig, path: str = "") -> nn.Module:
    """Give one layer LoRA in place. nn.Linear: the whole output, or the q/k/v row blocks named by
    `cfg.qkv_blocks` when the layer is a packed qkv projection (path ends with 'qkv'); nn.MultiheadAttention:
    the `cfg.qkv_blocks` row blocks of its packed in_proj_weight."""
    return _wrap(module, cfg, lora_site(module, cfg, path))


@register_method
class LoRAMethod(PeftMethod):
    """LoRA on the modules matched by LORA.TARGETS and on the MSDA_LAYERS of every MSDeformAttn. Its plan's
    sites are (path, module, (kind, detail), number of row blocks, rank); COBOT reads them as its slots."""

    name, config_class, optim_group, mergeable = "lora", LoRAConfig, "lora", True

    def plan(self, model, cfg, planned, **inputs):
        if not cfg.targets and not cfg.msda_layers:
            raise PeftConfigError(
                "MODEL.PEFT.LORA.TARGETS and MODEL.PEFT.LORA.MSDA_LAYERS are empty: give glob patterns over module "
                "paths, or MSDeformAttn layer names"
            )
        found = sites.match_modules(model, cfg.targets, "MODEL.PEFT.LORA.TARGETS") if cfg.targets else []
        if cfg.msda_layers:
            key = "MODEL.PEFT.LORA.MSDA_LAYERS"
            for path, msda in sites.find_modules(model, sites.is_ms_deform_attn, ("*",), key):
                found += [(f"{path}.{name}", getattr(msda, name)) for name in cfg.msda_layers]
        planned_sites, seen = [], set()
        for path, module in found:
            try:
                if path in seen:
                    raise PeftConfigError("already has LoRA (two target patterns match it)")
                site = lora_site(module, cfg, path)
            except PeftConfigError as e:
                raise PeftConfigError(f"LoRA on module '{path}' ({type(module).__name__}): {e}") from None
            seen.add(path)
            n_blocks = len(site[1]) if site[1] is not None else 1
            planned_sites.append((path, module, site, n_blocks, cfg.r))
        return Plan(converts=[p for p, *_ in planned_sites], sites=planned_sites)

    def apply(self, model, cfg, plan):
        for _, module, site, *_ in plan.sites:
            _wrap(module, cfg, site)

    def merge_deltas(self, model):
        out = {}
        for path, m in self.layers(model):
            if not m.lora_merged:
                out[f"{path}.{'in_proj_weight' if isinstance(m, nn.MultiheadAttention) else 'weight'}"] = \
                    m.lora_delta_weight()
        return out
