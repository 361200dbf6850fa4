"""Mask2Former's set criterion: classification cross-entropy and point-sampled mask BCE + dice on matched pairs,
for the final prediction and (deep supervision) every auxiliary one."""

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import get_uncertain_point_coords_with_randomness, point_sample
from detectron2.utils.comm import get_world_size
from torch import nn


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float):
    """Sum over masks of 1 - (2|X.Y| + 1) / (|X| + |Y| + 1), divided by num_masks. inputs: (M, P) logits."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float):
    """Per-mask mean binary cross-entropy, summed over masks, divided by num_masks. inputs: (M, P) logits."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits):
    """(R, 1, ...) mask logits -> (R, 1, ...) uncertainty -|logit| (highest at the decision boundary)."""
    if logits.shape[1] != 1:
        raise ValueError(f"expected class-agnostic logits (R, 1, ...), got {tuple(logits.shape)}")
    return -(torch.abs(logits))


def pad_masks_to_batch(masks):
    """List of (T_b, H_b, W_b) masks -> (N, T_max, H_max, W_max) zero-padded (what the official nested tensor
    gives for this use)."""
    T = max(m.shape[0] for m in masks)
    H = max(m.shape[1] for m in masks)
    W = max(m.shape[2] for m in masks)
    out = masks[0].new_zeros((len(masks), T, H, W))
    for dst, m in zip(out, masks):
        dst[: m.shape[0], : m.shape[1], : m.shape[2]].copy_(m)
    return out


class SetCriterion(nn.Module):
    """Loss of a set prediction: match (HungarianMatcher), then supervise each matched pair.

    Args:
        num_classes: K, without the no-object class.
        matcher: computes the assignment.
        weight_dict: loss name -> weight ("loss_ce", "loss_mask", "loss_dice", and "<name>_<i>" for aux outputs).
            The criterion returns unweighted losses; the meta-architecture applies the weights.
        eos_coef: classification weight of the no-object class.
        losses: which of "labels", "masks".
        num_points, oversample_ratio, importance_sample_ratio: PointRend sampling of the mask loss points.
    """

    # buffers computed from the arguments: PeftCheckpointer skips a checkpoint's of another shape (another class
    # count) without a warning, since the value here follows the config
    config_buffers = ("empty_weight",)

    def __init__(
        self,
        num_classes,
        matcher,
        weight_dict,
        eos_coef,
        losses,
        num_points,
        oversample_ratio,
        importance_sample_ratio,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)  # persistent: official checkpoints hold it
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def loss_labels(self, outputs, targets, indices, num_masks):
        """Cross-entropy over K+1 classes; unmatched queries target the no-object class K."""
        src_logits = outputs["pred_logits"].float()
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_o
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs, targets, indices, num_masks):
        """BCE and dice on num_points points per matched mask, sampled mostly where the prediction is uncertain."""
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx][:, None]  # (M, 1, H, W)
        target_masks = pad_masks_to_batch([t["masks"] for t in targets]).to(src_masks)
        target_masks = target_masks[tgt_idx][:, None]  # (M, 1, H', W')

        # normalised point coordinates, so predictions need no upsampling to the target size
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)

        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _get_src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    @staticmethod
    def _get_tgt_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def get_loss(self, loss, outputs, targets, indices, num_masks):
        loss_map = {"labels": self.loss_labels, "masks": self.loss_masks}
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_masks)

    def num_masks_across_workers(self, targets, device):
        """Average number of target masks per worker (at least 1), the normaliser of the mask losses."""
        num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / get_world_size(), min=1).item()

    def forward(self, outputs, targets):
        """
        Args:
            outputs: the decoder's dict ("pred_logits", "pred_masks", optional "aux_outputs").
            targets: N dicts {"labels": (T_b,), "masks": (T_b, H, W)}.
        Returns:
            dict of unweighted losses; aux losses suffixed "_<i>".
        """
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_masks = self.num_masks_across_workers(targets, outputs["pred_logits"].device)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)
            for loss in self.losses:
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses

    def __repr__(self):
        lines = [
            "Criterion " + self.__class__.__name__,
            f"matcher: {self.matcher.__repr__(_repr_indent=8)}",
            f"losses: {self.losses}",
            f"weight_dict: {self.weight_dict}",
            f"num_classes: {self.num_classes}",
            f"eos_coef: {self.eos_coef}",
            f"num_points: {self.num_points}",
            f"oversample_ratio: {self.oversample_ratio}",
            f"importance_sample_ratio: {self.importance_sample_ratio}",
        ]
        return "\n    ".join(lines)
