"""Pieces shared by the dataset mappers: augmentation lists, padding, mask decoding, panoptic ids."""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, polygons_to_bitmask
from torch.nn import functional as F

__all__ = [
    "flip_augmentation",
    "color_augmentation",
    "resize_crop_flip_augmentations",
    "pad_to_divisible",
    "segmentation_to_mask",
    "transformed_instance_masks",
    "overlapping_annotations",
    "rgb_to_panoptic_id",
    "image_to_tensor",
]

IMAGE_PAD_VALUE = 128  # grey, as the official mappers pad images


def flip_augmentation(cfg) -> list[T.Augmentation]:
    """INPUT.RANDOM_FLIP: 'none', 'horizontal', 'vertical', or 'both' (each direction with probability 1/2, for
    images without an up, such as microscopy)."""
    mode = cfg.INPUT.RANDOM_FLIP
    if mode == "none":
        return []
    if mode not in ("horizontal", "vertical", "both"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'none', 'horizontal', 'vertical' or 'both', got {mode!r}")
    directions = ("horizontal", "vertical") if mode == "both" else (mode,)
    return [T.RandomFlip(horizontal=d == "horizontal", vertical=d == "vertical") for d in directions]


def color_augmentation(cfg) -> list[T.Augmentation]:
    if not cfg.INPUT.COLOR_AUG_SSD:
        return []
    from detectron2.projects.point_rend import ColorAugSSDTransform

    return [ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT)]


def resize_crop_flip_augmentations(cfg, category_area_crop: bool) -> list[T.Augmentation]:
    """MaskFormer's training augmentation: shortest-edge resize, random crop, SSD colour jitter, flip.

    category_area_crop: use RandomCrop_CategoryAreaConstraint (semantic/panoptic), which retries crops until
    no single category covers more than INPUT.CROP.SINGLE_CATEGORY_MAX_AREA of the crop.
    """
    augs: list[T.Augmentation] = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    ]
    if cfg.INPUT.CROP.ENABLED:
        if category_area_crop:
            augs.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                )
            )
        else:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    augs += color_augmentation(cfg)
    augs += flip_augmentation(cfg)
    return augs


def pad_to_divisible(tensor: torch.Tensor, divisor: int, value: float) -> torch.Tensor:
    """Pad the last two dims (bottom/right) up to the next multiple of `divisor` (no-op if divisor <= 0).

    With crops no larger than `divisor` (the official configs: crop 512, SIZE_DIVISIBILITY 512) this pads every
    sample to one fixed size.
    """
    if divisor <= 0:
        return tensor
    h, w = tensor.shape[-2:]
    ph, pw = math.ceil(h / divisor) * divisor - h, math.ceil(w / divisor) * divisor - w
    if ph == 0 and pw == 0:
        return tensor
    return F.pad(tensor, [0, pw, 0, ph], value=value).contiguous()


def segmentation_to_mask(segm, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE dict, or an HxW array) as an (H, W) uint8 mask."""
    if isinstance(segm, list):
        return polygons_to_bitmask(segm, height, width).astype(np.uint8)
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):  # uncompressed RLE
            segm = mask_util.frPyObjects(segm, *segm["size"])
        return mask_util.decode(segm).astype(np.uint8)
    if isinstance(segm, np.ndarray):
        if segm.ndim != 2:
            raise ValueError(f"A segmentation mask array must be 2-D (H, W), got shape {segm.shape}.")
        return segm.astype(np.uint8)
    raise ValueError(
        f"Cannot read a segmentation of type {type(segm).__name__}: expected polygons (list of lists of floats), "
        "a COCO RLE dict, or an (H, W) array."
    )


def transformed_instance_masks(annos: list[dict], transforms, height: int, width: int) -> list[np.ndarray]:
    """Each annotation's mask (polygons, RLE or array at height x width) pushed through `transforms`, as bool.

    Pixel masks instead of polygons: cropping polygons would need shapely. `== 1` rather than a cast: padding
    transforms fill segmentations with their pad value (255 in FixedSizeCrop), which must not become foreground.
    """
    return [transforms.apply_segmentation(segmentation_to_mask(a["segmentation"], height, width)) == 1 for a in annos]


def overlapping_annotations(annos: list[dict], transforms, shape: tuple[int, int]) -> list[dict]:
    """The annotations whose box, pushed through `transforms`, overlaps the transformed image of `shape` (H, W):
    the others cannot have a pixel in it, so their masks need not be decoded (a 128 px crop of a crowded
    520 x 696 image holds a tenth of its nuclei). Boxes are widened by a pixel on each side first (a polygon's
    rasterised pixels may stray past its box), and a rotation's transformed box bounds the rotated one, so no
    overlapping mask is dropped; an annotation kept but cut away is dropped by its empty mask later.
    Annotations without a box are all kept."""
    if not annos or any("bbox" not in a for a in annos):
        return annos
    boxes = np.array([BoxMode.convert(a["bbox"], a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
                      for a in annos], dtype=np.float64).reshape(-1, 4)  # fmt: skip
    boxes = transforms.apply_box(boxes + np.array([-1.0, -1.0, 1.0, 1.0]))
    h, w = shape
    inside = (boxes[:, 2] > 0) & (boxes[:, 0] < w) & (boxes[:, 3] > 0) & (boxes[:, 1] < h)
    return [a for a, keep in zip(annos, inside) if keep]


def rgb_to_panoptic_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colour -> segment id: R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) tensor, keeping the dtype (uint8 stays uint8 for cheap IPC)."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
