"""Registration of the synthetic domains (see peft_d2/data/synthetic.py) in detectron2's catalogs."""

from __future__ import annotations

import os

from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.coco import load_coco_json

from ..checks import MalformedAnnotationError, checked_loader
from ..synthetic import DOMAINS, domain_categories, split_paths
from .catalog import replace_registration

__all__ = ["register_all_synthetic"]


def load_synthetic_json(json_file: str, image_root: str, id_map: dict, dataset: str = "") -> list[dict]:
    """The COCO records of a synthetic split, category ids mapped to contiguous ones by `id_map` (the registered
    thing_dataset_id_to_contiguous_id). The ids are those of the global material table, shared across domains, so
    B's (1, 2, 3, 5, 6) are not 1..5: given no dataset name, detectron2's loader leaves them for this mapping
    rather than derive its own with a warning that they are not in [1, #categories]."""
    records = load_coco_json(json_file, image_root)
    for record in records:
        for ann in record["annotations"]:
            if ann["category_id"] not in id_map:
                raise MalformedAnnotationError(
                    f"Dataset '{dataset}': {json_file}: an annotation of {record['file_name']} has category_id "
                    f"{ann['category_id']}, not one of the domain's {sorted(id_map)} (rewrite the data with "
                    "datasets/prepare_synthetic.py)")
            ann["category_id"] = id_map[ann["category_id"]]
    return records


def register_all_synthetic(root: str) -> list[str]:
    """Register synthetic_{A,B}_{train,val,test} (COCO instances) and synthetic_{A,B}_sem_seg_{train,val,test}.

    `root` is the DETECTRON2_DATASETS folder; the data live in `root/synthetic/` (datasets/prepare_synthetic.py).
    """
    base = os.path.join(root, "synthetic")
    names = []
    for domain in DOMAINS:
        cats = domain_categories(domain)
        thing_classes = [c["name"] for c in cats]
        id_map = {c["id"]: i for i, c in enumerate(cats)}
        for split in ("train", "val", "test"):
            p = split_paths(base, domain, split)
            name = f"synthetic_{domain}_{split}"
            replace_registration(
                name,
                checked_loader(
                    name,
                    lambda j=p["json_file"], i=p["image_root"], m=id_map, n=name: load_synthetic_json(j, i, m, n),
                    {
                        p["image_root"]: ("dir", "the synthetic images (datasets/prepare_synthetic.py)"),
                        p["json_file"]: ("coco_json", "the synthetic instance annotations"),
                    },
                ),
                dict(
                    thing_classes=thing_classes,
                    thing_dataset_id_to_contiguous_id=id_map,
                    image_root=p["image_root"],
                    json_file=p["json_file"],
                    evaluator_type="coco",
                ),
            )
            names.append(name)
            name = f"synthetic_{domain}_sem_seg_{split}"
            replace_registration(
                name,
                checked_loader(
                    name,
                    lambda s=p["sem_seg_root"], i=p["image_root"]: load_sem_seg(s, i, gt_ext="png", image_ext=""),
                    {
                        p["image_root"]: ("dir", "the synthetic images (datasets/prepare_synthetic.py)"),
                        p["sem_seg_root"]: ("dir", "the synthetic semantic labels"),
                    },
                ),
                dict(
                    stuff_classes=["background", *thing_classes],
                    image_root=p["image_root"],
                    sem_seg_root=p["sem_seg_root"],
                    evaluator_type="sem_seg",
                    ignore_label=255,
                ),
            )
            names.append(name)
    return names
