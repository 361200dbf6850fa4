#!/usr/bin/env python3
"""ADE20K instance annotations -> COCO-format instance JSON (ade20k_instance_{train,val}).

Reads  $DETECTRON2_DATASETS/ADEChallengeData2016/images/{training,validation}/*.jpg
       $DETECTRON2_DATASETS/ADEChallengeData2016/annotations_instance/{training,validation}/*.png
         (from the ADE20K instance-segmentation challenge: R = instance class 1..100, G = instance id, 0 = none)
Writes $DETECTRON2_DATASETS/ADEChallengeData2016/ade20k_instance_{train,val}.json
       with RLE masks; category ids are the 0-based SceneParsing-150 ids, shared with the panoptic split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_d2.data.datasets.ade20k import ADE20K_THING_IDS, ade20k_instance_categories  # noqa: E402

SPLITS = {"train": "training", "val": "validation"}


def read_instance_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(class map with 0-based SceneParsing ids or -1, instance id map) from an annotations_instance PNG."""
    ins = np.asarray(Image.open(path))
    if ins.ndim != 3 or ins.shape[2] < 2 or ins.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit RGB instance PNG (R = class, G = instance), got {ins.shape}")
    cls = ins[..., 0].astype(np.int64)
    if cls.max() > len(ADE20K_THING_IDS):
        raise ValueError(f"{path}: instance class {cls.max()} is outside 1..{len(ADE20K_THING_IDS)}")
    lut = np.array([-1, *ADE20K_THING_IDS], dtype=np.int64)
    return lut[cls], ins[..., 1].astype(np.int64)


def instance_segments(cls_map: np.ndarray, inst_map: np.ndarray):
    """Yield (category_id, bool mask) per instance id (0 = void is skipped)."""
    for iid in np.unique(inst_map):
        if iid == 0:
            continue
        mask = inst_map == iid
        cats = np.unique(cls_map[mask])
        cats = cats[cats >= 0]
        if len(cats) != 1:
            raise ValueError(f"instance {iid} covers classes {cats.tolist()}; expected exactly one")
        yield int(cats[0]), mask


def convert_split(base: Path, split: str) -> Path:
    image_dir = base / "images" / SPLITS[split]
    inst_dir = base / "annotations_instance" / SPLITS[split]
    for d, what in ((image_dir, "the ADE20K images"), (inst_dir, "the ADE20K instance annotations")):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} does not exist; expected {what} there")
    images, annotations = [], []
    for f in sorted(image_dir.glob("*.jpg")):
        w, h = Image.open(f).size
        images.append({"id": f.stem, "file_name": f.name, "width": w, "height": h})
        cls_map, inst_map = read_instance_png(inst_dir / f"{f.stem}.png")
        for cat, mask in instance_segments(cls_map, inst_map):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": f.stem,
                    "category_id": cat,
                    "iscrowd": 0,
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                }
            )
    out = base / f"ade20k_instance_{split}.json"
    with open(out, "w") as fh:
        json.dump({"images": images, "annotations": annotations, "categories": ade20k_instance_categories()}, fh)
    print(f"{split}: {len(images)} images, {len(annotations)} instances -> {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    args = p.parse_args(argv)
    base = Path(args.dataset_dir) / "ADEChallengeData2016"
    try:
        for split in args.splits:
            convert_split(base, split)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
