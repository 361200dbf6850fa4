"""LoRA: y = W x + b + s * B A dropout(x), s = alpha / r (or alpha / sqrt(r) when rank-stabilised); and DoRA.

A layer gains LoRA by becoming an instance of a subclass of its own class (`LoRALinear` for nn.Linear,
`LoRAConv2d` for nn.Conv2d, `LoRAD2Conv2d` for detectron2.layers.Conv2d, `LoRAMultiheadAttention` for
nn.MultiheadAttention): the object, its `weight`/`bias` Parameters, its hooks and its name in the model stay
the same, so base checkpoints load unchanged and only `lora_A`/`lora_B` (and DoRA's `lora_magnitude`) are new
keys (no base parameter is renamed; see docs/design.md).

LoRA may cover the whole output of a layer or only some row blocks of it ("q" and "v" of a packed qkv
projection): each block i has its own A_i (r, in) and B_i (rows_i, r), stored stacked as
`lora_A` (n_blocks, r, in) and `lora_B` (n_blocks, rows, r) when there is more than one block.

On a convolution (groups 1) A is a convolution with the layer's kernel size, stride, padding and dilation to
r channels and B a 1x1 convolution r -> out (`lora_A` (1, r, in, kh, kw), `lora_B` (1, out, r)): B A is LoRA
on the layer's weight flattened to (out, in kh kw), so it folds into the weight exactly; on detectron2's
Conv2d the update joins the convolution's output before the layer's norm and activation.

DoRA (`dora`, Liu et al. 2024): W' = m (W + dW) / ||W + dW||, dW = s B A, the norm taken per output channel
(over in, kh, kw) and detached from the gradient as in the paper's section 4.3 and Hugging Face PEFT; the
magnitude m starts at ||W||, so a fresh layer equals its base. On row blocks the magnitude covers the rows LoRA
covers, `lora_magnitude` (n_blocks, rows): each block behaves as a separate linear with DoRA.
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
            must be nn.Linear, nn.Conv2d (detectron2.layers.Conv2d included; groups 1) or nn.MultiheadAttention.
        msda_layers: which of the linears of every MSDeformAttn ("sampling_offsets", "attention_weights",
            "value_proj", "output_proj") get LoRA, wherever such a module is (found by shape).
        qkv_blocks: for packed q/k/v projections (nn.MultiheadAttention always; a Linear whose path ends in
            "qkv"), which of "q", "k", "v" get LoRA, each with its own A and B. Empty: the whole output.
        dora: DoRA (weight-decomposed LoRA): W' = m (W + s B A) / ||W + s B A||, the norm per output channel
            and detached from the gradient, m learned and initialised to ||W||. Not with MoPEFT's gates.
    """

    r: int = option(8, "rank r > 0", key="RANK")
    alpha: float = option(8.0, "scaling numerator: the update is scaled by alpha / r (> 0)")
    dropout: float = option(0.0, "dropout on the LoRA branch's input, in [0, 1)")
    rslora: bool = option(False, "scale by alpha / sqrt(r) instead of alpha / r")
    targets: list = option([], "glob patterns over module paths (`nn.Linear`, `nn.Conv2d` with groups 1, "
                               "`nn.MultiheadAttention`), e.g. `backbone.*.attn.qkv`, `backbone.bottom_up.res*.conv?`")
    msda_layers: list = option([], "linears of every MSDeformAttn that get LoRA: `sampling_offsets`, "
                                   "`attention_weights`, `value_proj`, `output_proj`")
    qkv_blocks: str = option("qv", "row blocks of packed q/k/v projections that get LoRA (`\"\"`: the whole output)")
    dora: bool = option(False, "DoRA: the adapted weight is m (W + s B A) / norm(W + s B A), a learned magnitude m "
                               "per output channel (starts at norm(W))")

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
        if not isinstance(self.dora, bool):
            raise PeftConfigError(f"MODEL.PEFT.LORA.DORA must be True or False, got {self.dora!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALayer:
    """Mixin holding the LoRA factors of a layer whose weight is (out, in) or, for a convolution,
    (out, in, kh, kw). `lora_conv` is the convolution's (stride, padding, dilation), None for a linear map."""

    peft_tensor_prefixes = ("lora_",)  # its own tensors an adapter file holds (the base weight stays out)
    lora_conv = None

    def _init_lora(self, weight: torch.Tensor, cfg: LoRAConfig, row_blocks=None):
        out_features = weight.shape[0]
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
        self.lora_A = nn.Parameter(torch.empty(n, cfg.r, *weight.shape[1:], **kw))
        self.lora_B = nn.Parameter(torch.zeros(n, rows, cfg.r, **kw))
        for a in self.lora_A:  # PEFT's init: Kaiming-uniform A, zero B, so a fresh layer changes nothing
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dora = cfg.dora
        if cfg.dora:  # m = ||W|| per output channel of each block: W' = W while B = 0
            norm = weight.detach().flatten(1).norm(dim=1)
            self.lora_magnitude = nn.Parameter(torch.stack([norm[s:e] for s, e in self.lora_row_blocks]))
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

    def _lora_whole(self) -> bool:
        return len(self.lora_row_blocks) == 1 and self.lora_row_blocks[0] == (0, self._lora_weight().shape[0])

    def _lora_in(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x through a weight shaped like the layer's (A, or W itself): a linear map or the layer's convolution."""
        if self.lora_conv is None:
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, *self.lora_conv)

    def _lora_mix(self, z: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """z through an (o, i) matrix over its channels (B, or COBOT's M): the last dim, or dim 1 of a feature map."""
        return F.linear(z, matrix) if self.lora_conv is None else F.conv2d(z, matrix[:, :, None, None])

    def _lora_channels(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the layer's output."""
        return v if self.lora_conv is None else v[:, None, None]

    def _lora_bias(self):
        return self.bias

    def lora_fusable(self) -> bool:
        """True when the update is s * B z with z = lora_down(x) over the whole output: what a fused kernel
        (peft_d2.ops.ms_deform_attn_lora) computes without forming the updated output."""
        plain = self.lora_conv is None and not self.lora_dora
        return plain and self._lora_whole() and not self.lora_merged and self.__dict__.get("lora_gate") is None

    def lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """z = A dropout(x) (then M_t z with COBOT), (..., in) -> (..., r), for a fusable layer."""
        z = F.linear(self.lora_dropout(x), self.lora_A[0])
        mid = self._lora_mid(0)
        return z if mid is None else F.linear(z, mid)

    def lora_delta_weight(self) -> torch.Tensor:
        """s * B A (or B M A with COBOT) scattered into the layer's weight shape (a convolution's B A is formed on
        its weight flattened to (out, in kh kw)). DoRA's adapted weight is `lora_adapted_weight`."""
        weight = self._lora_weight()
        blocks = []
        for i in range(len(self.lora_row_blocks)):
            mid = self._lora_mid(i)
            a = self.lora_A[i].flatten(1)
            a = a if mid is None else mid @ a
            blocks.append(self.lora_scaling * (self.lora_B[i] @ a))
        if self._lora_whole():
            return blocks[0].reshape(weight.shape)
        delta = weight.new_zeros(weight.shape, dtype=blocks[0].dtype)
        for (s, e), b in zip(self.lora_row_blocks, blocks):
            delta = delta.index_add(0, torch.arange(s, e, device=delta.device), b)
        return delta

    def lora_dora_factor(self) -> torch.Tensor:
        """DoRA's m / ||W + dW|| per output channel (1 on rows LoRA does not cover); the norm is a constant to
        the gradient (DoRA section 4.3, as Hugging Face PEFT)."""
        weight = self._lora_weight()
        with torch.no_grad():
            norm = (weight + self.lora_delta_weight().to(weight.dtype)).flatten(1).norm(dim=1)
        m = self.lora_magnitude.to(norm.dtype)
        if self._lora_whole():
            return m[0] / norm
        rows = torch.cat([torch.arange(s, e) for s, e in self.lora_row_blocks]).to(norm.device)
        return torch.ones_like(norm).index_copy(0, rows, m.flatten() / norm[rows])

    def lora_adapted_weight(self) -> torch.Tensor:
        """The weight the layer computes with: W + dW, or DoRA's m (W + dW) / ||W + dW||."""
        weight = self._lora_weight()
        w = weight + self.lora_delta_weight().to(weight.dtype)
        if self.lora_dora:
            w = self.lora_dora_factor().view(-1, *[1] * (w.dim() - 1)) * w
        return w

    def _lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x (B M A x with COBOT, times the MoPEFT gate) for an input already through the dropout."""
        outs = []
        for i in range(len(self.lora_row_blocks)):
            z = self._lora_in(x, self.lora_A[i])
            mid = self._lora_mid(i)
            if mid is not None:
                z = self._lora_mix(z, mid)
            outs.append(self.lora_scaling * self._lora_mix(z, self.lora_B[i]))
        if self._lora_whole():
            out = outs[0]
        else:
            out = x.new_zeros(*x.shape[:-1], self._lora_weight().shape[0])
            for (s, e), o in zip(self.lora_row_blocks, outs):
                out[..., s:e] = o
        gates = self.__dict__.get("lora_gate")
        return out if gates is None else out * gate_per_row(gates.value("lora"), out)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """LoRA's s * B A dropout(x) for an input x, without forming B A (DoRA's output is `lora_result`)."""
        return self._lora_update(self.lora_dropout(x))

    def lora_result(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output from its base output y = W x + b (before a norm or activation) and its input x.
        LoRA: y + s B A dropout(x). DoRA, in Hugging Face PEFT's form: y + (f - 1) W x' + f s B A x' with
        f = m / ||W + dW|| and x' = dropout(x) (W x' = y - b when no dropout is active)."""
        if self.lora_merged:
            return y
        x = self.lora_dropout(x)
        update = self._lora_update(x).to(y.dtype)
        if not self.lora_dora:
            return y + update
        factor = self._lora_channels(self.lora_dora_factor()).to(y.dtype)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            base = self._lora_in(x, self._lora_weight()).to(y.dtype)
        else:
            bias = self._lora_bias()
            base = y if bias is None else y - self._lora_channels(bias).to(y.dtype)
        return y + (factor - 1) * base + factor * update

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight: W + dW, or DoRA's m (W + dW) / ||W + dW|| (exact to float
        rounding); the LoRA branch is then skipped. DoRA keeps the factor m / ||W + dW|| for `unmerge`."""
        if self.__dict__.get("lora_gate") is not None:
            raise PeftConfigError("a MoPEFT-gated LoRA depends on the input and cannot be merged")
        if not self.lora_merged:
            weight = self._lora_weight()
            if self.lora_dora:
                self.lora_merged_factor = self.lora_dora_factor()
            weight.copy_(self.lora_adapted_weight())
            self.lora_merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo `merge`: W' - dW, or DoRA's W' / factor - dW with the factor kept at merge time."""
        if self.lora_merged:
            weight = self._lora_weight()
            if self.lora_dora:
                factor = self.__dict__.pop("lora_merged_factor").to(weight)
                weight.div_(factor.view(-1, *[1] * (weight.dim() - 1)))
            weight.sub_(self.lora_delta_weight().to(weight.dtype))
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
        return self.lora_result(F.linear(x, self.weight, self.bias), x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.lora_r}, lora_blocks={self.lora_row_blocks}, " \
               f"dora={self.lora_dora}"


def lora_conv_forward(conv: nn.Conv2d, x: torch.Tensor, lora: LoRALayer) -> torch.Tensor:
    """`conv`'s forward with `lora`'s update joining the convolution's output, before detectron2 Conv2d's norm
    and activation when it has them: the layer's own forward, and multi-adapter serving's for some images."""
    y = lora.lora_result(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation), x)
    if getattr(conv, "norm", None) is not None:
        y = conv.norm(y)
    if getattr(conv, "activation", None) is not None:
        y = conv.activation(y)
    return y


class LoRAConv2d(nn.Conv2d, LoRALayer):
    """nn.Conv2d (groups 1, zero padding) with LoRA: A a convolution with the layer's kernel size, stride,
    padding and dilation to r channels, B a 1x1 convolution r -> out. Build with `LoRAConv2d.wrap(conv, cfg)`,
    which converts the object in place (a detectron2 Conv2d becomes a `LoRAD2Conv2d`)."""

    peft_method = "lora"

    @classmethod
    def wrap(cls, conv: nn.Conv2d, cfg: LoRAConfig) -> "LoRAConv2d":
        conv.__class__ = __getattr__("LoRAD2Conv2d") if isinstance(conv, _d2_conv2d()) else cls
        conv.lora_conv = (conv.stride, conv.padding, conv.dilation)
        conv._init_lora(conv.weight, cfg)
        return conv

    def _lora_weight(self):
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_conv_forward(self, x, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.lora_r}, dora={self.lora_dora}"


def _d2_conv2d():
    """detectron2.layers.Conv2d, imported on first use, not with peft_d2: importing detectron2.layers raises
    TorchScript notices that the tools silence (peft_d2.quiet) only after importing peft_d2."""
    from detectron2.layers import Conv2d

    return Conv2d


def __getattr__(name):
    """`LoRAD2Conv2d` (detectron2.layers.Conv2d with LoRA: the update is added to the convolution's output, then
    the layer's `norm` and `activation` run as in detectron2), made on first use (see `_d2_conv2d`)."""
    if name != "LoRAD2Conv2d":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = type(name, (LoRAConv2d, _d2_conv2d()), {"__module__": __name__, "__doc__": __getattr__.__doc__})
    globals()[name] = cls
    return cls


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
        w = self.in_proj_weight if self.lora_merged else self.lora_adapted_weight()
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


def lora_parameter_count(in_features: int, out_rows: int, r: int, n_blocks: int = 1, dora: bool = False) -> int:
    """Closed form: r * (in + rows) per block, plus the rows of DoRA's magnitude. For a convolution `in_features`
    is in * kh * kw."""
    return n_blocks * (r * (in_features + out_rows) + (out_rows if dora else 0))


ACCEPTED = "nn.Linear, nn.Conv2d (detectron2.layers.Conv2d included) and nn.MultiheadAttention"


def lora_site(module: nn.Module, cfg: LoRAConfig, path: str = ""):
    """How `module` takes LoRA: ("linear", row blocks or None for the whole output), ("conv", None) or ("mha",
    q/k/v letters); raises PeftConfigError when it cannot. Changes nothing."""
    if isinstance(module, LoRALayer):
        raise PeftConfigError("already has LoRA (two target patterns match it)")
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        if path.split(".")[-1] == "qkv" and cfg.qkv_blocks:
            if module.out_features % 3:
                raise PeftConfigError(f"a qkv projection needs out_features divisible by 3, got {module.out_features}")
            d = module.out_features // 3
            return "linear", [("qkv".index(b) * d, ("qkv".index(b) + 1) * d) for b in cfg.qkv_blocks]
        return "linear", None
    if type(module) in (nn.Conv2d, _d2_conv2d()):  # the convolutions whose forwards LoRA knows
        if module.groups != 1:
            raise PeftConfigError(
                f"a grouped convolution (groups={module.groups}) cannot take LoRA: A would mix the channels of "
                f"different groups, so B A would not fold into the grouped weight; leave it out of "
                f"MODEL.PEFT.LORA.TARGETS"
            )
        if type(module) is nn.Conv2d and module.padding_mode != "zeros":
            raise PeftConfigError(f"padding_mode {module.padding_mode!r}: LoRA on nn.Conv2d needs 'zeros'")
        return "conv", None
    if type(module) is nn.MultiheadAttention:
        if not module._qkv_same_embed_dim:
            raise PeftConfigError("LoRA on nn.MultiheadAttention needs a packed in_proj_weight (kdim == vdim == d)")
        if cfg.dropout > 0:  # the update is applied to the weight, which has no per-input dropout
            raise PeftConfigError("MODEL.PEFT.LORA.DROPOUT must be 0 for nn.MultiheadAttention targets")
        return "mha", cfg.qkv_blocks or "qkv"
    raise PeftConfigError(f"LoRA applies to {ACCEPTED} only (a subclass only when it keeps their forward)")


def _wrap(module, cfg, site):
    kind, detail = site
    if kind == "linear":
        return LoRALinear.wrap(module, cfg, detail)
    if kind == "conv":
        return LoRAConv2d.wrap(module, cfg)
    return LoRAMultiheadAttention.wrap(module, cfg, detail)


def add_lora(module: nn.Module, cfg: LoRAConfig, path: str = "") -> nn.Module:
    """Give one layer LoRA in place. nn.Linear: the whole output, or the q/k/v row blocks named by
    `cfg.qkv_blocks` when the layer is a packed qkv projection (path ends with 'qkv'); nn.Conv2d and
    detectron2's Conv2d: the whole output; nn.MultiheadAttention: the `cfg.qkv_blocks` row blocks of its packed
    in_proj_weight."""
    return _wrap(module, cfg, lora_site(module, cfg, path))


@register_method
class LoRAMethod(PeftMethod):
    """LoRA on the modules matched by LORA.TARGETS and on the MSDA_LAYERS of every MSDeformAttn. Its plan's
    sites are (path, module, (kind, detail), number of row blocks, rank); COBOT reads them as its slots."""

    name, config_class, optim_group, mergeable = "lora", LoRAConfig, "lora", True

    def check(self, config):
        if config.lora.dora and "mopeft" in config.methods:
            raise PeftConfigError(
                "MODEL.PEFT.LORA.DORA cannot be used with 'mopeft' in MODEL.PEFT.METHODS: MoPEFT's gate scales the "
                "update per image, so the DoRA norm ||W + g dW|| and the adapted weight would differ per image"
            )

    def plan(self, model, cfg, planned, **inputs):
        if not cfg.targets and not cfg.msda_layers:
            raise PeftConfigError(
                "MODEL.PEFT.LORA.TARGETS and MODEL.PEFT.LORA.MSDA_LAYERS are empty: give glob patterns over module "
                "paths, or MSDeformAttn layer names"
            )
        key = "MODEL.PEFT.LORA.TARGETS"
        found = [(p, m, key) for p, m in sites.match_modules(model, cfg.targets, key)] if cfg.targets else []
        if cfg.msda_layers:
            key = "MODEL.PEFT.LORA.MSDA_LAYERS"
            for path, msda in sites.find_modules(model, sites.is_ms_deform_attn, ("*",), key):
                found += [(f"{path}.{name}", getattr(msda, name), key) for name in cfg.msda_layers]
        planned_sites, seen = [], set()
        for path, module, key in found:
            try:
                if path in seen:
                    raise PeftConfigError("already has LoRA (two target patterns match it)")
                site = lora_site(module, cfg, path)
            except PeftConfigError as e:
                raise PeftConfigError(f"{key}: LoRA on module '{path}' ({type(module).__name__}): {e}") from None
            seen.add(path)
            n_blocks = len(site[1]) if site[1] is not None else 1
            planned_sites.append((path, module, site, n_blocks, cfg.r))
        return Plan(converts=[p for p, *_ in planned_sites], sites=planned_sites)

    def apply(self, model, cfg, plan):
        for _, module, site, *_ in plan.sites:
            _wrap(module, cfg, site)

    def merge_deltas(self, model):
        """{weight key: update} of the layers not merged yet: s B A, or DoRA's adapted weight minus W."""
        out = {}
        for path, m in self.layers(model):
            if not m.lora_merged:
                key = f"{path}.{'in_proj_weight' if isinstance(m, nn.MultiheadAttention) else 'weight'}"
                out[key] = m.lora_adapted_weight() - m._lora_weight() if m.lora_dora else m.lora_delta_weight()
        return out
