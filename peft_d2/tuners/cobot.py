"""COBOT: cross-block orchestration (Peng et al., CVPR 2024; METHODS.md method 3).

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
        dropout: dropout inside the adapter form (METHODS.md: 0.1).
    """

    enabled_on: str = "lora"
    dropout: float = 0.1

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
