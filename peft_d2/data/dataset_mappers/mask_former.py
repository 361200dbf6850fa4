"""MaskFormer-style training mappers: semantic, panoptic and instance targets as per-segment binary masks.

All three: read the image, apply resize / crop / colour jitter / flip, pad to INPUT.SIZE_DIVISIBILITY (image with
grey 128, labels with the ignore value or 0), and return `instances` with gt_classes (N,) int64 and gt_masks
(N, H, W) (bool for semantic/panoptic/instance). Semantic and panoptic also return `sem_seg` (H, W) int64.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .common import (
    IMAGE_PAD_VALUE,
    color_augmentation,
    flip_augmentation,
    image_to_tensor,
    overlapping_annotations,
    pad_to_divisible,
    resize_crop_flip_augmentations,
    rgb_to_panoptic_id,
    transformed_instance_masks,
)

__all__ = [
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "TileInstanceDatasetMapper",
]


def _instances_from_masks(shape, classes: list[int], masks: list[np.ndarray]) -> Instances:
    instances = Instances(shape)
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks:
        instances.gt_masks = torch.stack([torch.from_numpy(np.ascontiguousarray(m, dtype=bool)) for m in masks])
    else:
        instances.gt_masks = torch.zeros((0, *shape), dtype=torch.bool)
    return instances


class _MaskFormerMapperBase:
    category_area_crop = True

    @configurable
    def __init__(
        self, is_train: bool = True, *, augmentations, image_format: str, ignore_label: int, size_divisibility: int
    ):
        if not is_train:
            raise ValueError(f"{type(self).__name__} is a training mapper; tests use detectron2's DatasetMapper.")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        logging.getLogger(__name__).info(f"[{type(self).__name__}] training augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        return {
            "is_train": is_train,
            "augmentations": resize_crop_flip_augmentations(cfg, category_area_crop=cls.category_area_crop),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": getattr(meta, "ignore_label", cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def _read(self, dataset_dict: dict):
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem = None
        if "sem_seg_file_name" in dataset_dict:
            # float64: detectron2 cannot resize uint16 label images
            sem = utils.read_image(dataset_dict.pop("sem_seg_file_name")).astype("double")
        return image, sem

    def _pad(self, image: np.ndarray, sem: np.ndarray | None):
        image_t = pad_to_divisible(image_to_tensor(image), self.size_divisibility, IMAGE_PAD_VALUE)
        sem_t = None
        if sem is not None:
            sem_t = pad_to_divisible(torch.as_tensor(sem.astype("long")), self.size_divisibility, self.ignore_label)
        return image_t, sem_t


class MaskFormerSemanticDatasetMapper(_MaskFormerMapperBase):
    """Semantic training: one target mask per class present in the (cropped) label map, ignore label excluded."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image, sem = self._read(dataset_dict)
        if sem is None:
            raise ValueError(f"No 'sem_seg_file_name' for {dataset_dict['file_name']}: not a semantic dataset dict.")
        if "annotations" in dataset_dict:
            raise ValueError("A semantic segmentation dataset dict must not carry 'annotations'.")
        aug_input = T.AugInput(image, sem_seg=sem)
        self.augmentations(aug_input)
        image_t, sem_t = self._pad(aug_input.image, aug_input.sem_seg)
        dataset_dict["image"] = image_t
        dataset_dict["sem_seg"] = sem_t
        labels = sem_t.numpy()
        classes = [int(c) for c in np.unique(labels) if c != self.ignore_label]
        dataset_dict["instances"] = _instances_from_masks(labels.shape, classes, [labels == c for c in classes])
        return dataset_dict


class MaskFormerPanopticDatasetMapper(_MaskFormerMapperBase):
    """Panoptic training: one target per non-crowd segment of the panoptic PNG (things and stuff)."""

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image, sem = self._read(dataset_dict)
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"No 'pan_seg_file_name' for {dataset_dict['file_name']}: not a panoptic dataset dict.")
        if "annotations" in dataset_dict:
            raise ValueError("A panoptic segmentation dataset dict must not carry 'annotations'.")
        pan = utils.read_image(dataset_dict.pop("pan_seg_file_name"), "RGB")
        aug_input = T.AugInput(image, sem_seg=sem)
        transforms = self.augmentations(aug_input)
        pan = rgb_to_panoptic_id(transforms.apply_segmentation(pan))
        image_t, sem_t = self._pad(aug_input.image, aug_input.sem_seg)
        pan_t = pad_to_divisible(torch.as_tensor(pan), self.size_divisibility, 0)  # 0 = void segment id
        dataset_dict["image"] = image_t
        if sem_t is not None:
            dataset_dict["sem_seg"] = sem_t
        pan = pan_t.numpy()
        classes, masks = [], []
        for seg in dataset_dict["segments_info"]:
            if not seg.get("iscrowd", 0):
                classes.append(int(seg["category_id"]))
                masks.append(pan == seg["id"])
        dataset_dict["instances"] = _instances_from_masks(pan.shape, classes, masks)
        return dataset_dict


class MaskFormerInstanceDatasetMapper(_MaskFormerMapperBase):
    """Instance training with MaskFormer augmentation (shortest-edge resize, random crop, colour, flip).
    Accepts polygon, RLE and bitmask annotations; crowd annotations, and instances that the crop cut away
    entirely (all-zero masks, which would be matched as targets nothing can predict), are dropped."""

    category_area_crop = False

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image, _ = self._read(dataset_dict)
        if "annotations" not in dataset_dict:
            raise ValueError(f"No 'annotations' for {dataset_dict['file_name']}: not an instance dataset dict.")
        h0, w0 = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        annos = [a for a in dataset_dict.pop("annotations") if a.get("iscrowd", 0) == 0]
        annos = overlapping_annotations(annos, transforms, image.shape[:2])
        masks = transformed_instance_masks(annos, transforms, h0, w0)
        kept = [i for i, m in enumerate(masks) if m.any()]
        masks = [masks[i] for i in kept]
        classes = [int(annos[i]["category_id"]) for i in kept]
        image_t = pad_to_divisible(image_to_tensor(image), self.size_divisibility, IMAGE_PAD_VALUE)
        div = self.size_divisibility
        masks_t = [pad_to_divisible(torch.from_numpy(m.astype(np.uint8)), div, 0).numpy() for m in masks]
        dataset_dict["image"] = image_t
        dataset_dict["instances"] = _instances_from_masks(tuple(image_t.shape[-2:]), classes, masks_t)
        return dataset_dict


class NativeScaleJitter(T.Augmentation):
    """Resize by a factor drawn uniformly from [min_scale, max_scale] of the image's own size."""

    def __init__(self, min_scale: float, max_scale: float):
        super().__init__()
        self.min_scale, self.max_scale = min_scale, max_scale

    def get_transform(self, image):
        h, w = image.shape[:2]
        s = np.random.uniform(self.min_scale, self.max_scale)
        return T.ResizeTransform(h, w, max(1, round(h * s)), max(1, round(w * s)))


class TileInstanceDatasetMapper(MaskFormerInstanceDatasetMapper):
    """Instance training on native-scale tiles: a scale jitter of INPUT.MIN_SCALE..INPUT.MAX_SCALE times the image's
    own size (none when both are 1), a random INPUT.CROP.SIZE crop (absolute pixels), colour jitter, flips.
    For small crowded objects (nuclei), where the unit of training and evaluation is a tile, not an image."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs: list[T.Augmentation] = []
        if (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) != (1.0, 1.0):
            augs.append(NativeScaleJitter(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE))
        augs.append(T.RandomCrop("absolute", tuple(cfg.INPUT.CROP.SIZE)))
        augs += color_augmentation(cfg) + flip_augmentation(cfg)
        return dict(super().from_config(cfg, is_train), augmentations=augs)
