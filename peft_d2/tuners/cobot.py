"""COBOT: cross-block orchestration (Peng et al., CVPR 2024; see docs/methods.md).

Over T homogeneous PEFT slots of bottleneck width r (LoRA on q and v of L blocks: T = 2L; one adapter per
block: T = L), one small module holds

    C (r, T)        shared coefficients, ones          P (T, T)   relation matrix, identity
    gamma (T, r)    private coefficients, ones         H (T, 4, r/4, r/4)  quaternion blocks per slot

and gives slot t the r x r matrix  M_t = H_t diag(d_t),  d_t = (C P)[:, t] + gamma_t, where H_t is the
Hamilton-product arrangement of its four blocks (S_r starts at 0, S_i, S_j, S_k uniform in [0, 1)).
LoRA + COBOT: delta y = B_t M_t A_t x (no alpha / r); parallel adapter + COBOT:
s * W_up Dropout(ReLU(M_t W_down z)). Extra parameters: rT + T^2 + rT + T r^2 / 4.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import PeftConfigError
from .adapter import ParallelAdapter
from .base import PeftMethod, Plan, option, param_device, register_method
from .lora import LoRALayer

# Hamilton product layout: row i, column j holds sign * S[index]
_HAMILTON = [[(1, 0), (1, 1), (1, 2), (1, 3)],
             [(-1, 1), (1, 0), (1, 3), (-1, 2)],
             [(-1, 2), (-1, 3), (1, 0), (1, 1)],
             [(-1, 3), (1, 2), (-1, 1), (1, 0)]]


@dataclass
class CobotConfig:
    """COBOT on top of another method's homogeneous slots.

    Attributes:
        enabled_on: "lora" (every LoRA row block is a slot: q and v of L blocks give T = 2L) or "adapter"
            (every parallel adapter is a slot, AdaptFormer style: one per block gives T = L).
        dropout: dropout inside the adapter form (0.1 as in the paper).
    """

    enabled_on: str = option("lora", "the slots COBOT orchestrates: `lora` (every LoRA row block) or `adapter` "
                                      "(every parallel adapter, ADAPTER.PLACEMENTS `parallel_mlp`)", key="BASE_METHOD")
    dropout: float = option(0.1, "dropout inside the adapter form")

    def __post_init__(self):
        if self.enabled_on not in ("lora", "adapter"):
            raise PeftConfigError(
                f"MODEL.PEFT.COBOT.BASE_METHOD must be 'lora' or 'adapter', got {self.enabled_on!r}"
            )


class CobotOrchestrator(nn.Module):
    """The shared COBOT parameters of T slots of width r."""

    peft_method = "cobot"

    def __init__(self, num_slots: int, width: int):
        super().__init__()
        if width % 4:
            raise PeftConfigError(f"COBOT needs a bottleneck width divisible by 4 (quaternions), got r={width}")
        self.num_slots, self.width = num_slots, width
        self.C = nn.Parameter(torch.ones(width, num_slots))
        self.P = nn.Parameter(torch.eye(num_slots))
        self.gamma = nn.Parameter(torch.ones(num_slots, width))
        blocks = torch.rand(num_slots, 4, width // 4, width // 4)
        blocks[:, 0] = 0.0
        self.H = nn.Parameter(blocks)

    def projection(self, t: int) -> torch.Tensor:
        """H_t (r, r) from its quaternion blocks."""
        S = self.H[t]
        return torch.cat([torch.cat([sign * S[k] for sign, k in row], 1) for row in _HAMILTON], 0)

    def coefficients(self, t: int) -> torch.Tensor:
        """d_t (r,) = (C P)[:, t] + gamma_t."""
        return self.C @ self.P[:, t] + self.gamma[t]

    def slot_matrix(self, t: int) -> torch.Tensor:
        """M_t = H_t diag(d_t), the r x r map between A_t x and B_t."""
        return self.projection(t) * self.coefficients(t)[None, :]


def cobot_parameter_count(num_slots: int, width: int) -> int:
    """Closed form: rT + T^2 + rT + T r^2 / 4."""
    return 2 * width * num_slots + num_slots**2 + num_slots * width * width // 4


@register_method
class CobotMethod(PeftMethod):
    """One orchestrator at `model.cobot` over the slots of COBOT.BASE_METHOD, in module order: every LoRA row
    block, or every parallel adapter. It comes after the method it orchestrates and plans from its plan."""

    name, config_class, order, mergeable = "cobot", CobotConfig, 300, True  # merges through LoRA's B M A

    def check(self, config):
        if self.enabled_on(config) not in config.methods:
            raise PeftConfigError(
                f"MODEL.PEFT.METHODS: 'cobot' orchestrates '{self.enabled_on(config)}', which must be listed too"
            )

    @staticmethod
    def enabled_on(config):
        return config.cobot.enabled_on

    def plan(self, model, cfg, planned, **inputs):
        base = planned[cfg.enabled_on]
        if cfg.enabled_on == "lora":
            num_slots, widths = sum(n for *_, n, _ in base.sites), {r for *_, r in base.sites}
        else:
            parallel = [width for _, _, attr, _, width in base.sites if attr == "parallel_adapter"]
            if not parallel:
                raise PeftConfigError("MODEL.PEFT.COBOT.BASE_METHOD 'adapter' needs parallel adapters "
                                      "(ADAPTER.PLACEMENTS 'parallel_mlp')")
            num_slots, widths = len(parallel), set(parallel)
        if len(widths) != 1:
            raise PeftConfigError(f"COBOT needs slots of one width, found {sorted(widths)}")
        width = widths.pop()
        if width % 4:
            raise PeftConfigError(f"COBOT needs a bottleneck width divisible by 4 (quaternions), got r={width}")
        return Plan(adds=[("", "cobot")], sites=(num_slots, width))

    def apply(self, model, cfg, plan):
        if cfg.enabled_on == "lora":
            layers = [m for _, m in model.named_modules() if isinstance(m, LoRALayer)]
            counts = [len(m.lora_row_blocks) for m in layers]
        else:
            layers = [m for _, m in model.named_modules() if isinstance(m, ParallelAdapter)]
            counts = [1] * len(layers)
        num_slots, width = plan.sites
        if sum(counts) != num_slots:
            raise PeftConfigError(f"COBOT planned {num_slots} slots but the model holds {sum(counts)}")
        model.cobot = CobotOrchestrator(num_slots, width).to(param_device(model))
        t = 0
        for m, n in zip(layers, counts):
            if cfg.enabled_on == "lora":
                m.attach_cobot(model.cobot, range(t, t + n))
            else:
                m.attach_cobot(model.cobot, t, cfg.dropout)
            t += n
