"""MaskFormer meta-architecture (Mask2Former): backbone -> MaskFormerHead -> set criterion or inference.

Training returns weighted losses; inference returns per image "sem_seg" (K, H, W), "panoptic_seg"
((H, W) int32 ids, segments_info) and/or "instances" (Instances with pred_masks, pred_boxes (the masks' extents),
scores, pred_classes). `model(batched_inputs, do_postprocess=False)` returns the raw predictions instead.
"""

import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher


def build_weight_dict(class_weight, mask_weight, dice_weight, num_aux: int):
    """{"loss_ce", "loss_mask", "loss_dice"} weights, repeated with suffix "_<i>" for i < num_aux."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    for i in range(num_aux):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, 4) float boxes (x0, y0, x1, y1), x1 / y1 one past the last pixel, zeros for an
    empty mask: detectron2's BitMasks.get_bounding_boxes, without its per-mask loop (and host syncs)."""
    x_any, y_any = masks.any(1), masks.any(2)  # (N, W), (N, H)
    xs = torch.arange(masks.shape[2], device=masks.device)
    ys = torch.arange(masks.shape[1], device=masks.device)
    boxes = torch.stack([torch.where(x_any, xs, masks.shape[2]).amin(1), torch.where(y_any, ys, masks.shape[1]).amin(1),
                         torch.where(x_any, xs + 1, 0).amax(1), torch.where(y_any, ys + 1, 0).amax(1)], dim=1)
    return boxes.float() * x_any.any(1, keepdim=True)


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification model for semantic, instance and panoptic segmentation."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: tuple[float],
        pixel_std: tuple[float],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
    ):
        """
        Args:
            backbone: a detectron2 backbone. sem_seg_head: MaskFormerHead. criterion: SetCriterion.
            num_queries: Q.
            object_mask_threshold: panoptic: drop queries whose class score is at most this.
            overlap_threshold: panoptic: drop segments keeping less than this fraction of their mask.
            metadata: dataset metadata (thing_dataset_id_to_contiguous_id for panoptic/instance).
            size_divisibility: pad inputs to a multiple of this (< 0: the backbone's).
            sem_seg_postprocess_before_inference: resize mask predictions to the output size before the
                semantic/panoptic/instance inference (required unless only semantic is on).
            pixel_mean, pixel_std: per-channel normalisation.
            semantic_on, panoptic_on, instance_on: which outputs inference produces.
            test_topk_per_image: instance inference keeps this many (query, class) pairs.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        if not self.semantic_on and not self.sem_seg_postprocess_before_inference:
            raise ValueError("with SEMANTIC_ON off, SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE must be on")

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER

        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        num_aux = mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0
        criterion = SetCriterion(
            sem_seg_head.num_classes,
            matcher=matcher,
            weight_dict=build_weight_dict(mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, num_aux),
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        )
        # the official code reads DATASETS.TRAIN[0]; an empty list (a bare test config) gets empty metadata
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else "__peft_d2_empty__")
        most = mf.NUM_OBJECT_QUERIES * sem_seg_head.num_classes
        if mf.TEST.INSTANCE_ON and cfg.TEST.DETECTIONS_PER_IMAGE > most:
            logging.getLogger(__name__).warning(
                f"TEST.DETECTIONS_PER_IMAGE={cfg.TEST.DETECTIONS_PER_IMAGE}, but instance inference ranks "
                f"(query, class) pairs and can return at most MODEL.MASK_FORMER.NUM_OBJECT_QUERIES x "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {mf.NUM_OBJECT_QUERIES} x {sem_seg_head.num_classes} = {most} "
                "an image: raise the queries for crowded images, or lower TEST.DETECTIONS_PER_IMAGE to silence this."
            )
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": metadata,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise and pad the images of a batch into an ImageList (N, 3, H_pad, W_pad)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs, do_postprocess: bool = True):
        """
        Args:
            batched_inputs: list of dicts from a dataset mapper: "image" (3, H, W); in training "instances"
                with gt_classes (T,) and gt_masks (T, H, W); optional "height", "width" (output size).
            do_postprocess: inference only; False returns the raw predictions (as detectron2's
                GeneralizedRCNN.inference(do_postprocess=False)).
        Returns:
            training: dict of weighted losses. Inference: one dict per image with "sem_seg",
            "panoptic_seg" and/or "instances" depending on the *_ON flags; with do_postprocess=False, the
            head's outputs: {"pred_logits": (N, Q, K+1) class logits (the last: no object), "pred_masks":
            (N, Q, H_pad/4, W_pad/4) mask logits over the padded batch, "aux_outputs": the same per earlier
            decoder layer}, plus "image_sizes": each image's (H, W) inside the padding.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        outputs = self.sem_seg_head(features)

        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("training needs 'instances' (gt_classes, gt_masks) in every input")
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            targets = self.prepare_targets(gt_instances, images)
            losses = self.criterion(outputs, targets)
            # keep only the losses with a weight, weighted
            return {k: v * self.criterion.weight_dict[k] for k, v in losses.items() if k in self.criterion.weight_dict}
        if not do_postprocess:
            return {**outputs, "image_sizes": images.image_sizes}

        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        del outputs
        return [
            self.inference_single(mask_cls, mask_pred, inputs, image_size)
            for mask_cls, mask_pred, inputs, image_size in zip(
                mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
            )
        ]

    def inference_single(self, mask_cls, mask_pred, inputs, image_size):
        """mask_cls (Q, K+1), mask_pred (Q, H_pad, W_pad) of one image -> its result dict."""
        height = inputs.get("height", image_size[0])
        width = inputs.get("width", image_size[1])
        result = {}
        if self.sem_seg_postprocess_before_inference:
            mask_pred = retry_if_cuda_oom(sem_seg_postprocess)(mask_pred, image_size, height, width)
            mask_cls = mask_cls.to(mask_pred)
        if self.semantic_on:
            r = retry_if_cuda_oom(self.semantic_inference)(mask_cls, mask_pred)
            if not self.sem_seg_postprocess_before_inference:
                r = retry_if_cuda_oom(sem_seg_postprocess)(r, image_size, height, width)
            result["sem_seg"] = r
        if self.panoptic_on:
            result["panoptic_seg"] = retry_if_cuda_oom(self.panoptic_inference)(mask_cls, mask_pred)
        if self.instance_on:
            result["instances"] = retry_if_cuda_oom(self.instance_inference)(mask_cls, mask_pred)
        return result

    def prepare_targets(self, targets, images):
        """Instances -> [{"labels": (T,), "masks": (T, H_pad, W_pad)}], masks zero-padded like the images."""
        h_pad, w_pad = images.tensor.shape[-2:]
        new_targets = []
        for per_image in targets:
            gt_masks = per_image.gt_masks
            if hasattr(gt_masks, "tensor"):  # BitMasks from detectron2's mappers
                gt_masks = gt_masks.tensor
            padded = torch.zeros((gt_masks.shape[0], h_pad, w_pad), dtype=gt_masks.dtype, device=gt_masks.device)
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            new_targets.append({"labels": per_image.gt_classes, "masks": padded})
        return new_targets

    def semantic_inference(self, mask_cls, mask_pred):
        """(Q, K+1), (Q, H, W) -> (K, H, W): sum over queries of p(class) * sigmoid(mask)."""
        mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
        return torch.einsum("qc,qhw->chw", mask_cls, mask_pred.sigmoid())

    def is_thing(self, class_id: int) -> bool:
        return class_id in self.metadata.thing_dataset_id_to_contiguous_id.values()

    def panoptic_inference(self, mask_cls, mask_pred):
        """Each pixel goes to the kept query maximising score * mask prob; stuff segments of a class merge.
        Returns (panoptic_seg (H, W) int32, segments_info [{"id", "isthing", "category_id"}])."""
        scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
        mask_pred = mask_pred.sigmoid()
        keep = labels.ne(self.sem_seg_head.num_classes) & (scores > self.object_mask_threshold)
        cur_scores = scores[keep]
        cur_classes = labels[keep]
        cur_masks = mask_pred[keep]
        cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks

        h, w = cur_masks.shape[-2:]
        panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
        segments_info = []
        if cur_masks.shape[0] == 0:
            return panoptic_seg, segments_info

        current_segment_id = 0
        cur_mask_ids = cur_prob_masks.argmax(0)
        stuff_memory_list = {}
        for k in range(cur_classes.shape[0]):
            pred_class = cur_classes[k].item()
            isthing = self.is_thing(pred_class)
            mask_area = (cur_mask_ids == k).sum().item()
            original_area = (cur_masks[k] >= 0.5).sum().item()
            mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
            if not (mask_area > 0 and original_area > 0 and mask.sum().item() > 0):
                continue
            if mask_area / original_area < self.overlap_threshold:
                continue
            if not isthing:
                if int(pred_class) in stuff_memory_list:
                    panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
                    continue
                stuff_memory_list[int(pred_class)] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": bool(isthing), "category_id": int(pred_class)})
        return panoptic_seg, segments_info

    def instance_inference(self, mask_cls, mask_pred):
        """Top-k (query, class) pairs by class probability; score = p(class) * mean mask prob inside the mask.
        Boxes are the masks' extents (`mask_boxes`), where the official code leaves zeros, so that box AP means
        something."""
        image_size = mask_pred.shape[-2:]
        num_classes = self.sem_seg_head.num_classes
        scores = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
        labels = torch.arange(num_classes, device=self.device).unsqueeze(0).repeat(self.num_queries, 1).flatten(0, 1)
        topk = min(self.test_topk_per_image, scores.numel())  # the official code fails when Q * K < topk
        scores_per_image, topk_indices = scores.flatten(0, 1).topk(topk, sorted=False)
        labels_per_image = labels[topk_indices]
        mask_pred = mask_pred[topk_indices // num_classes]

        if self.panoptic_on:  # only "thing" classes are instances
            keep = torch.tensor([self.is_thing(int(lab)) for lab in labels_per_image], dtype=torch.bool)
            keep = keep.to(scores_per_image.device)
            scores_per_image = scores_per_image[keep]
            labels_per_image = labels_per_image[keep]
            mask_pred = mask_pred[keep]

        result = Instances(image_size)
        result.pred_masks = (mask_pred > 0).float()
        result.pred_boxes = Boxes(mask_boxes(mask_pred > 0))
        binary = result.pred_masks.flatten(1)
        mask_scores = (mask_pred.sigmoid().flatten(1) * binary).sum(1) / (binary.sum(1) + 1e-6)
        result.scores = scores_per_image * mask_scores
        result.pred_classes = labels_per_image
        return result
