"""Hungarian matching of predicted masks to ground-truth masks (cost on a shared random point set per image)."""

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn


def batch_dice_loss(inputs: torch.Tensor, targets: torch.Tensor):
    """Pairwise dice cost. inputs: (M, P) logits; targets: (T, P) in {0, 1}. Returns (M, T)."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor):
    """Pairwise mean binary cross-entropy. inputs: (M, P) logits; targets: (T, P). Returns (M, T)."""
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / hw


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    cost_class * (-p(target class)) + cost_mask * BCE + cost_dice * dice, masks compared on num_points random
    points (the same points for all masks of an image). Unmatched queries are "no object"."""

    def __init__(self, cost_class: float = 1, cost_mask: float = 1, cost_dice: float = 1, num_points: int = 0):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all costs cant be 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def memory_efficient_forward(self, outputs, targets):
        """Match image by image (memory O(Q * T * num_points))."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        indices = []
        for b in range(bs):
            out_prob = outputs["pred_logits"][b].softmax(-1)  # (Q, K+1)
            tgt_ids = targets[b]["labels"]
            # -p[target class] approximates the NLL; the constant 1 of 1 - p does not change the matching
            cost_class = -out_prob[:, tgt_ids]

            out_mask = outputs["pred_masks"][b][:, None]  # (Q, 1, H, W)
            tgt_mask = targets[b]["masks"].to(out_mask)[:, None]  # (T, 1, H', W'), already padded
            point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            tgt_mask = point_sample(tgt_mask, point_coords.repeat(tgt_mask.shape[0], 1, 1), align_corners=False)
            out_mask = point_sample(out_mask, point_coords.repeat(out_mask.shape[0], 1, 1), align_corners=False)

            with torch.autocast(device_type=out_mask.device.type, enabled=False):
                out_mask = out_mask.squeeze(1).float()
                tgt_mask = tgt_mask.squeeze(1).float()
                cost_mask = batch_sigmoid_ce_loss(out_mask, tgt_mask)
                cost_dice = batch_dice_loss(out_mask, tgt_mask)

            C = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            indices.append(linear_sum_assignment(C.reshape(num_queries, -1).cpu()))

        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: {"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, H, W)}.
            targets: N dicts {"labels": (T_b,) int64, "masks": (T_b, H', W')}.
        Returns:
            N pairs (query indices, target indices), each of length min(Q, T_b).
        """
        return self.memory_efficient_forward(outputs, targets)

    def __repr__(self, _repr_indent=4):
        lines = [
            "Matcher " + self.__class__.__name__,
            f"cost_class: {self.cost_class}",
            f"cost_mask: {self.cost_mask}",
            f"cost_dice: {self.cost_dice}",
        ]
        return ("\n" + " " * _repr_indent).join(lines)
