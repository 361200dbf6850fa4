"""Registration of the 2018 Data Science Bowl nuclei set (datasets/prepare_dsb2018.py) in detectron2's catalogs."""

from __future__ import annotations

import json
import os

from detectron2.data.datasets.coco import load_coco_json

from ..checks import checked_loader
from ..dsb2018 import KINDS, SPLITS, TILED_SPLITS, annotation_file
from .catalog import replace_registration

__all__ = ["register_all_dsb2018"]

_PREPARE = "datasets/prepare_dsb2018.py"


def _tile_size(base: str) -> int:
    """The tile side that the preparation used (summary.json), 128 before any preparation."""
    try:
        with open(os.path.join(base, "summary.json")) as f:
            return int(json.load(f)["tile"])
    except (OSError, ValueError, KeyError):
        return 128


def register_all_dsb2018(root: str) -> list[str]:
    """Register dsb2018_<kind>_<split> (whole images; kind: fluorescence, tissue, brightfield; split: train, val,
    fewshot, test) and dsb2018_<kind>_{val,test}_tiles (the evaluation unit: native-scale tiles whose border-cut
    nuclei are ignore regions). `root` is the DETECTRON2_DATASETS folder; the data live in `root/dsb2018/`."""
    base = os.path.join(root, "dsb2018")
    tile = _tile_size(base)
    names = []
    for kind in KINDS:
        for split in SPLITS:
            variants = [("", None, os.path.join(base, "images"))]
            if split in TILED_SPLITS:
                variants.append(("_tiles", tile, os.path.join(base, f"tiles{tile}")))
            for suffix, t, image_root in variants:
                name = f"dsb2018_{kind}_{split}{suffix}"
                json_file = annotation_file(base, kind, split, t)
                replace_registration(
                    name,
                    checked_loader(
                        name,
                        lambda j=json_file, i=image_root, n=name: load_coco_json(j, i, n),
                        {
                            image_root: ("dir", f"the DSB 2018 images ({_PREPARE})"),
                            json_file: ("coco_json", f"the DSB 2018 {kind} {split} annotations ({_PREPARE})"),
                        },
                    ),
                    dict(
                        thing_classes=["nucleus"],
                        thing_dataset_id_to_contiguous_id={1: 0},
                        image_root=image_root,
                        json_file=json_file,
                        evaluator_type="coco",
                        kind=kind,
                        tile=t,
                    ),
                )
                names.append(name)
    return names
