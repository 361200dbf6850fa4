#!/usr/bin/env python3
"""ADE20K semantic + instance annotations -> COCO-format panoptic PNGs and JSON (ade20k_panoptic_{train,val}).

Reads  $DETECTRON2_DATASETS/ADEChallengeData2016/images/{training,validation}/*.jpg
       $DETECTRON2_DATASETS/ADEChallengeData2016/annotations/{training,validation}/*.png           (0 = other, 1..150)
       $DETECTRON2_DATASETS/ADEChallengeData2016/annotations_instance/{training,validation}/*.png  (R class, G id)
Writes $DETECTRON2_DATASETS/ADEChallengeData2016/ade20k_panoptic_{train,val}/*.png   (id = R + 256 G + 256^2 B)
       $DETECTRON2_DATASETS/ADEChallengeData2016/ade20k_panoptic_{train,val}.json

Stuff segments come from the semantic labels (one per stuff class present); thing segments from the instance
PNG, painted over the stuff (the two annotations overlap a little). Segment ids: (category + 1) * 1000 + n.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_d2.data.datasets.ade20k import ade20k_150_categories  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_ade20k_ins_seg import SPLITS, instance_segments, read_instance_png  # noqa: E402


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def panoptic_image(sem: np.ndarray, cls_map: np.ndarray, inst_map: np.ndarray, things: set[int]):
    """(segment id map (H, W) int64, segments_info) for one image."""
    ids = np.zeros(sem.shape, np.int64)
    segments = []
    counts: dict[int, int] = {}

    def add(cat: int, mask: np.ndarray):
        n = counts.get(cat, 0)
        counts[cat] = n + 1
        sid = (cat + 1) * 1000 + n
        ids[mask] = sid
        segments.append({"id": sid, "category_id": cat, "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 0]})

    sem0 = sem.astype(np.int64) - 1  # 0-based, -1 = other
    for cat in np.unique(sem0):
        if cat < 0 or cat in things:
            continue
        add(int(cat), sem0 == cat)
    for cat, mask in instance_segments(cls_map, inst_map):
        add(cat, mask)
    kept = []
    for seg in segments:  # things painted over stuff: recompute what stays visible
        mask = ids == seg["id"]
        if mask.any():
            seg.update(area=int(mask.sum()), bbox=_bbox(mask))
            kept.append(seg)
    return ids, kept


def convert_split(base: Path, split: str) -> Path:
    dirname = SPLITS[split]
    image_dir, sem_dir, inst_dir = (base / d / dirname for d in ("images", "annotations", "annotations_instance"))
    for d in (image_dir, sem_dir, inst_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} does not exist; expected ADEChallengeData2016's layout (datasets/README.md)")
    out_dir = base / f"ade20k_panoptic_{split}"
    out_dir.mkdir(exist_ok=True)
    categories = ade20k_150_categories()
    things = {c["id"] for c in categories if c["isthing"]}
    images, annotations = [], []
    for f in sorted(image_dir.glob("*.jpg")):
        w, h = Image.open(f).size
        sem = np.asarray(Image.open(sem_dir / f"{f.stem}.png"))
        cls_map, inst_map = read_instance_png(inst_dir / f"{f.stem}.png")
        if sem.shape != (h, w) or cls_map.shape != (h, w):
            raise ValueError(f"{f.stem}: image {w}x{h}, semantic {sem.shape}, instance {cls_map.shape} differ")
        ids, segments = panoptic_image(sem, cls_map, inst_map, things)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(out_dir / f"{f.stem}.png")
        images.append({"id": f.stem, "file_name": f.name, "width": w, "height": h})
        annotations.append({"image_id": f.stem, "file_name": f"{f.stem}.png", "segments_info": segments})
    out = base / f"ade20k_panoptic_{split}.json"
    with open(out, "w") as fh:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, fh)
    print(f"{split}: {len(images)} images -> {out_dir}, {out}")
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
