"""ADE20K (SceneParsing 150) panoptic and instance splits, and checks on detectron2's semantic splits.

On-disk layout (under DETECTRON2_DATASETS, see datasets/README.md)::

    ADEChallengeData2016/
      images/{training,validation}/*.jpg
      annotations/{training,validation}/*.png             raw semantic labels, 0 = other, 1..150
      annotations_detectron2/{training,validation}/*.png  labels 0..149, 255 = ignore (prepare_ade20k_sem_seg.py)
      annotations_instance/{training,validation}/*.png    R = instance class 1..100, G = instance id
      ade20k_panoptic_{train,val}/*.png + ade20k_panoptic_{train,val}.json    (prepare_ade20k_pan_seg.py)
      ade20k_instance_{train,val}.json                                          (prepare_ade20k_ins_seg.py)
"""

from __future__ import annotations

import colorsys
import json
import os

from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES
from detectron2.data.datasets.coco import load_coco_json

from ..checks import checked_loader
from .catalog import replace_registration

__all__ = [
    "ADE20K_THING_IDS",
    "ade20k_150_categories",
    "ade20k_instance_categories",
    "load_ade20k_panoptic_json",
    "register_all_ade20k",
]

# 0-based SceneParsing-150 ids of the 100 "thing" classes, in the order of the ADE20K instance challenge:
# instance class k (1-based, the R channel of annotations_instance PNGs) is ADE20K_THING_IDS[k - 1].
ADE20K_THING_IDS = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37,
    38, 39, 41, 42, 43, 44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67,
    69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92,
    93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124,
    125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)  # fmt: skip
assert len(ADE20K_THING_IDS) == 100 and len(set(ADE20K_THING_IDS)) == 100


def _palette(n: int) -> list[list[int]]:
    """Distinct display colours (golden-ratio hue walk); only used for visualisation."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.35 * ((i * 7) % 3) / 2, 0.75 + 0.25 * ((i * 5) % 2))
        out.append([int(r * 255), int(g * 255), int(b * 255)])
    return out


def ade20k_150_categories() -> list[dict]:
    """The 150 SceneParsing categories as panoptic categories: id (0-based), name, isthing, color."""
    things = set(ADE20K_THING_IDS)
    colors = _palette(len(ADE20K_SEM_SEG_CATEGORIES))
    return [
        {"id": i, "name": name, "isthing": int(i in things), "color": colors[i]}
        for i, name in enumerate(ADE20K_SEM_SEG_CATEGORIES)
    ]


def ade20k_instance_categories() -> list[dict]:
    """The 100 instance categories with their 0-based SceneParsing ids (shared by the panoptic split)."""
    cats = {c["id"]: c for c in ade20k_150_categories()}
    return [{"id": i, "name": cats[i]["name"]} for i in ADE20K_THING_IDS]


def _instance_metadata() -> dict:
    cats = ade20k_instance_categories()
    colors = {c["id"]: c["color"] for c in ade20k_150_categories()}
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [colors[c["id"]] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def _panoptic_metadata() -> dict:
    cats = ade20k_150_categories()
    # As in the official registration: contiguous ids index all 150 classes (things keep their 0-based id, e.g.
    # "bed" 7), so one classifier covers stuff and things; the instance evaluator renumbers things itself.
    thing_cats = [c for c in cats if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in thing_cats],
        "thing_colors": [c["color"] for c in thing_cats],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def load_ade20k_panoptic_json(json_file: str, image_dir: str, gt_dir: str, semseg_dir: str, meta: dict) -> list[dict]:
    """Read an ADE20K panoptic split into detectron2 dicts (image, panoptic PNG, semantic PNG, segments)."""
    with open(json_file) as f:
        info = json.load(f)
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    ret = []
    for ann in info["annotations"]:
        stem = os.path.splitext(ann["file_name"])[0]
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            cid = seg["category_id"]
            seg["isthing"] = cid in thing_map
            seg["category_id"] = thing_map[cid] if cid in thing_map else stuff_map[cid]
            segments.append(seg)
        ret.append(
            {
                "file_name": os.path.join(image_dir, stem + ".jpg"),
                "image_id": ann["image_id"],
                "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
                "sem_seg_file_name": os.path.join(semseg_dir, ann["file_name"]),
                "segments_info": segments,
            }
        )
    return ret


def register_all_ade20k(root: str) -> list[str]:
    """(Re-)register ade20k_panoptic_{train,val} and ade20k_instance_{train,val}; guard ade20k_sem_seg_*."""
    base = os.path.join(root, "ADEChallengeData2016")
    names = []
    for split, dirname in [("train", "training"), ("val", "validation")]:
        image_root = os.path.join(base, "images", dirname)
        semseg_root = os.path.join(base, "annotations_detectron2", dirname)
        instance_json = os.path.join(base, f"ade20k_instance_{split}.json")

        # semantic: detectron2's builtin loader, re-registered under the current root with checks
        name = f"ade20k_sem_seg_{split}"
        from detectron2.data.datasets import load_sem_seg

        replace_registration(
            name,
            checked_loader(
                name,
                lambda x=image_root, y=semseg_root: load_sem_seg(y, x, gt_ext="png", image_ext="jpg"),
                {image_root: ("dir", "the ADE20K images"), semseg_root: ("dir", "the ADE20K semantic labels")},
            ),
            dict(
                stuff_classes=list(ADE20K_SEM_SEG_CATEGORIES),
                image_root=image_root,
                sem_seg_root=semseg_root,
                evaluator_type="sem_seg",
                ignore_label=255,
            ),
        )
        names.append(name)

        # panoptic
        name = f"ade20k_panoptic_{split}"
        pan_root = os.path.join(base, f"ade20k_panoptic_{split}")
        pan_json = os.path.join(base, f"ade20k_panoptic_{split}.json")
        meta = _panoptic_metadata()
        loader = lambda j=pan_json, i=image_root, p=pan_root, s=semseg_root, m=meta: load_ade20k_panoptic_json(  # noqa
            j, i, p, s, m
        )
        replace_registration(
            name,
            checked_loader(
                name,
                loader,
                {
                    image_root: ("dir", "the ADE20K images"),
                    pan_root: ("dir", "the panoptic PNGs (datasets/prepare_ade20k_pan_seg.py)"),
                    semseg_root: ("dir", "the semantic labels (datasets/prepare_ade20k_sem_seg.py)"),
                    pan_json: ("panoptic_json", "the panoptic annotation file (datasets/prepare_ade20k_pan_seg.py)"),
                },
            ),
            dict(
                meta,
                image_root=image_root,
                panoptic_root=pan_root,
                panoptic_json=pan_json,
                json_file=instance_json,
                sem_seg_root=semseg_root,
                evaluator_type="ade20k_panoptic_seg",
                ignore_label=255,
                label_divisor=1000,
            ),
        )
        names.append(name)

        # instance
        name = f"ade20k_instance_{split}"
        meta = _instance_metadata()
        replace_registration(
            name,
            checked_loader(
                name,
                lambda j=instance_json, i=image_root, n=name: load_coco_json(j, i, n),
                {
                    image_root: ("dir", "the ADE20K images"),
                    instance_json: ("coco_json", "the instance annotation file (datasets/prepare_ade20k_ins_seg.py)"),
                },
            ),
            dict(meta, image_root=image_root, json_file=instance_json, evaluator_type="coco"),
        )
        names.append(name)
    return names
