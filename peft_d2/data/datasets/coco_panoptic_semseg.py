"""COCO panoptic splits that also carry semantic labels (coco_2017_{train,val}_panoptic_with_sem_seg).

Mask2Former evaluates panoptic, instance and semantic results of one panoptic model; the semantic evaluator needs
a label PNG per image: `coco/panoptic_semseg_{train,val}2017/*.png` (contiguous ids 0..132, 255 = ignore),
made from the panoptic PNGs (see datasets/README.md).
"""

from __future__ import annotations

import os

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from ..checks import checked_loader
from .catalog import replace_registration

__all__ = ["register_all_coco_panoptic_semseg"]

_SPLITS = {
    "coco_2017_train_panoptic_with_sem_seg": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
        "coco/panoptic_semseg_train2017",
        "coco/annotations/instances_train2017.json",
    ),
    "coco_2017_val_panoptic_with_sem_seg": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/panoptic_semseg_val2017",
        "coco/annotations/instances_val2017.json",
    ),
}


def _load(json_file, image_root, panoptic_root, semseg_root, meta):
    dicts = load_coco_panoptic_json(json_file, image_root, panoptic_root, meta)
    for d in dicts:
        d["sem_seg_file_name"] = os.path.join(semseg_root, os.path.basename(d["pan_seg_file_name"]))
    return dicts


def register_all_coco_panoptic_semseg(root: str) -> list[str]:
    meta = _get_builtin_metadata("coco_panoptic_standard")
    names = []
    for name, rel in _SPLITS.items():
        image_root, pan_root, pan_json, sem_root, ins_json = (os.path.join(root, r) for r in rel)
        replace_registration(
            name,
            checked_loader(
                name,
                lambda j=pan_json, i=image_root, p=pan_root, s=sem_root: _load(j, i, p, s, meta),
                {
                    image_root: ("dir", "the COCO images"),
                    pan_root: ("dir", "the COCO panoptic PNGs"),
                    sem_root: ("dir", "the semantic labels made from the panoptic PNGs"),
                    pan_json: ("panoptic_json", "the COCO panoptic annotation file"),
                },
            ),
            dict(
                meta,
                image_root=image_root,
                panoptic_root=pan_root,
                panoptic_json=pan_json,
                sem_seg_root=sem_root,
                json_file=ins_json,
                evaluator_type="coco_panoptic_seg",
                ignore_label=255,
                label_divisor=1000,
            ),
        )
        names.append(name)
    assert MetadataCatalog.get(names[0]).evaluator_type == "coco_panoptic_seg"
    return names
