"""MoPEFT: LoRA, prefix and adapter in every backbone block, each scaled by a learned gate (see
docs/methods.md; the gate form is UniPELT's, our reading of the paper).

Per block and per submodule m in {lora, prefix, adapter}: g_m = mean over tokens of sigmoid(X w_m + b_m),
X the block input, one Linear(d, 1) each: a per-image scalar in (0, 1), gates independent (no softmax).
    LoRA on q and v:     q = X W_q + g_L * (X A^T B^T)     (the gate takes the place of alpha / r)
    prefix:              K' = [g_P * P_K ; X W_k],  V' = [g_P * P_V ; X W_v]
    adapter (after MLP): H' = H + g_A * W_up act(W_down H)
A forward pre-hook on the block computes the gates from its input; the block's PEFT modules read them
through a plain (unregistered) reference to the block's `MoPEFTGates`.

Note (ours): a prefix gated to 0 still takes softmax mass (zero keys score 0), so only LoRA and adapters
switch off exactly at g = 0.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import sites
from ..errors import PeftConfigError
from .adapter import ParallelAdapter, SequentialAdapter
from .base import PeftMethod, Plan, gate_per_row, option, param_device, register_method
from .lora import LoRALayer

SUBMODULES = ("lora", "prefix", "adapter")
__all__ = ["SUBMODULES", "MoPEFTConfig", "MoPEFTGates", "gates_pre_hook", "gate_per_row", "MoPEFTMethod"]


@dataclass
class MoPEFTConfig:
    """Gates over the "lora", "prefix" and "adapter" modules injected into backbone transformer blocks.

    Attributes:
        init_bias: initial gate bias (sigmoid(0) = 0.5 for every submodule).
    """

    init_bias: float = option(0.0, "initial gate bias (sigmoid(0) = 0.5 for every submodule)")


class MoPEFTGates(nn.Module):
    """The gates of one block: `proj` maps the block input (..., d) to one logit per submodule."""

    peft_method = "mopeft"

    def __init__(self, dim: int, submodules, init_bias: float = 0.0):
        super().__init__()
        self.submodules = tuple(submodules)
        self.proj = nn.Linear(dim, len(self.submodules))
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, init_bias)
        self.current = None  # (B, n_submodules), set by the block's pre-hook for the forward in flight
        self.override = {}  # submodule -> fixed gate value (analysis: switch a submodule off or on)
        self.record = False  # accumulate gate sums for tools/gate_stats.py
        self.sums, self.count = torch.zeros(len(self.submodules)), 0

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ..., d) -> gates (B, n_submodules), mean over tokens of the sigmoid."""
        g = torch.sigmoid(self.proj(x.flatten(1, -2))).mean(1)
        self.current = g
        if self.record:
            self.sums += g.detach().sum(0).cpu()
            self.count += g.shape[0]
        return g

    def mean(self) -> dict:
        """Average gate per submodule over the recorded images."""
        return {m: float(self.sums[i] / max(self.count, 1)) for i, m in enumerate(self.submodules)}

    def value(self, submodule: str) -> torch.Tensor:
        """(B,) gate of one submodule for the forward in flight."""
        if self.current is None:
            raise RuntimeError("MoPEFT gate read outside its block's forward")
        g = self.current[:, self.submodules.index(submodule)]
        if submodule in self.override:
            g = torch.full_like(g, float(self.override[submodule]))
        return g


def gates_pre_hook(block, args):
    block.mopeft_gates.compute(args[0])


def _gated_in_block(block: nn.Module):
    """(LoRA layers, whether the attention has a prefix, adapters) of one transformer block."""
    loras = [m for _, m in block.named_modules() if isinstance(m, LoRALayer)]
    prefixed = getattr(type(block.attn), "peft_prefix", False)
    adapters = [m for _, m in block.named_modules() if isinstance(m, (SequentialAdapter, ParallelAdapter))]
    return loras, prefixed, adapters


@register_method
class MoPEFTMethod(PeftMethod):
    """Gates in every backbone block that holds LoRA, prefix or adapter modules, wired to them. It comes
    after the methods it gates; its plan finds the blocks that their plans touch."""

    name, config_class, order = "mopeft", MoPEFTConfig, 200

    def check(self, config):
        if not set(SUBMODULES) & set(config.methods):
            raise PeftConfigError(
                "MODEL.PEFT.METHODS: 'mopeft' gates 'lora', 'prefix' and 'adapter'; list some of them"
            )

    def plan(self, model, cfg, planned, **inputs):
        blocks = sites.find_modules(model, sites.is_transformer_block, ("*",), "MODEL.PEFT.METHODS 'mopeft'")
        touched = [p for name in ("lora", "prefix") if name in planned for p in planned[name].converts]
        touched += [p for plan in planned.values() for p, attr in plan.adds if attr in ("adapter", "parallel_adapter")]
        chosen = [(path, block) for path, block in blocks
                  if any(t.startswith(path + ".") for t in touched) or any(_gated_in_block(block))]
        if not chosen:
            raise PeftConfigError("MODEL.PEFT.METHODS 'mopeft': no transformer block holds LoRA, prefix or adapters")
        return Plan(adds=[(p, "mopeft_gates") for p, _ in chosen], sites=chosen)

    def apply(self, model, cfg, plan):
        for _, block in plan.sites:
            loras, prefixed, adapters = _gated_in_block(block)
            present = [name for name, has in zip(SUBMODULES, (loras, prefixed, adapters)) if has]
            if not present:
                continue
            block.mopeft_gates = MoPEFTGates(sites.block_dim(block), present, cfg.init_bias).to(param_device(block))
            block.register_forward_pre_hook(gates_pre_hook)
            for m in loras:
                m.attach_gate(block.mopeft_gates)
            for m in adapters:
                object.__setattr__(m, "peft_gate", block.mopeft_gates)
            if prefixed:
                object.__setattr__(block.attn, "peft_prefix_gate", block.mopeft_gates)
