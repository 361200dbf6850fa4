"""Large-scale jitter (LSJ) mappers for COCO-style instance and panoptic training.

LSJ: optional flip, then ResizeScale(MIN_SCALE..MAX_SCALE of IMAGE_SIZE) and FixedSizeCrop(IMAGE_SIZE), which
crops or pads every image to IMAGE_SIZE x IMAGE_SIZE.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from .common import flip_augmentation, image_to_tensor, rgb_to_panoptic_id, transformed_instance_masks

__all__ = ["COCOInstanceLSJDatasetMapper", "COCOPanopticLSJDatasetMapper", "lsj_augmentations"]


def lsj_augmentations(cfg) -> list[T.Augmentation]:
    size = cfg.INPUT.IMAGE_SIZE
    return flip_augmentation(cfg) + [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size, target_width=size
        ),
        T.FixedSizeCrop(crop_size=(size, size)),
    ]


class _LSJBase:
    @configurable
    def __init__(self, is_train: bool = True, *, augmentations, image_format: str):
        if not is_train:
            raise ValueError(f"{type(self).__name__} is a training mapper; tests use detectron2's DatasetMapper.")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logging.getLogger(__name__).info(f"[{type(self).__name__}] training augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train, "augmentations": lsj_augmentations(cfg), "image_format": cfg.INPUT.FORMAT}

    def _read_and_augment(self, dataset_dict: dict):
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        original_shape = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        # Which pixels are padding: push a map of ones through the same transforms. Padded pixels come back
        # with FixedSizeCrop's segmentation pad value (255 in current detectron2, 0 in older ones).
        valid = transforms.apply_segmentation(np.ones(original_shape, np.uint8))
        dataset_dict["image"] = image_to_tensor(image)
        dataset_dict["padding_mask"] = torch.as_tensor(np.ascontiguousarray(valid != 1))
        return image, transforms, original_shape


class COCOInstanceLSJDatasetMapper(_LSJBase):
    """Instance training with LSJ. Output: image (C, H, W) uint8, padding_mask (H, W) bool, and instances with
    gt_classes (N,) int64, gt_boxes (tight boxes of the cropped masks) and gt_masks (N, H, W) bool.
    Polygon, RLE and bitmask annotations are all accepted (polygons are rasterised before the crop, so no shapely
    is needed); crowd and empty-after-crop instances are dropped."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image, transforms, (h0, w0) = self._read_and_augment(dataset_dict)
        shape = image.shape[:2]
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        masks = transformed_instance_masks(annos, transforms, h0, w0)
        instances = Instances(shape)
        instances.gt_classes = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)
        if masks:
            bitmasks = BitMasks(torch.stack([torch.from_numpy(np.ascontiguousarray(m)) for m in masks]))
        else:
            bitmasks = BitMasks(torch.zeros((0, *shape), dtype=torch.bool))
        # Crops cut shapes: boxes are refitted to the masks, and instances that vanished are dropped.
        instances.gt_boxes = bitmasks.get_bounding_boxes()
        keep = bitmasks.nonempty()
        instances = instances[keep]
        instances.gt_masks = bitmasks.tensor[keep]
        dataset_dict["instances"] = instances
        return dataset_dict


class COCOPanopticLSJDatasetMapper(_LSJBase):
    """Panoptic training with LSJ: one target per non-crowd segment (things and stuff), from the panoptic PNG.
    Output instances: gt_classes (N,), gt_masks (N, H, W) bool, gt_boxes. Segments emptied by the crop are
    dropped."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"No 'pan_seg_file_name' for {dataset_dict['file_name']}: not a panoptic dataset dict.")
        image, transforms, _ = self._read_and_augment(dataset_dict)
        pan = utils.read_image(dataset_dict.pop("pan_seg_file_name"), "RGB")
        pan = rgb_to_panoptic_id(transforms.apply_segmentation(pan))
        shape = image.shape[:2]
        classes, masks = [], []
        for seg in dataset_dict.pop("segments_info"):
            if seg.get("iscrowd", 0):
                continue
            m = pan == seg["id"]
            if m.any():
                classes.append(seg["category_id"])
                masks.append(torch.from_numpy(m))
        instances = Instances(shape)
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if masks:
            bm = BitMasks(torch.stack(masks))
            instances.gt_masks = bm.tensor
            instances.gt_boxes = bm.get_bounding_boxes()
        else:
            instances.gt_masks = torch.zeros((0, *shape), dtype=torch.bool)
            instances.gt_boxes = Boxes(torch.zeros((0, 4)))
        dataset_dict["instances"] = instances
        return dataset_dict
