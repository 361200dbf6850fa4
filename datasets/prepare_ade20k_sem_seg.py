#!/usr/bin/env python3
"""ADE20K SceneParsing semantic labels -> the detectron2 label convention (ade20k_sem_seg_{train,val}).

Reads  $DETECTRON2_DATASETS/ADEChallengeData2016/annotations/{training,validation}/*.png  (0 = other, 1..150)
Writes $DETECTRON2_DATASETS/ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
       with class k -> k - 1 (0..149) and 0 ("other") -> 255, the ignore label.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def convert(src: Path, dst: Path) -> None:
    label = np.asarray(Image.open(src))
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"{src}: expected a single-channel 8-bit label image, got shape {label.shape} {label.dtype}")
    out = label.astype(np.int16) - 1
    out[out < 0] = 255
    Image.fromarray(out.astype(np.uint8)).save(dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    p.add_argument("--splits", nargs="+", default=["training", "validation"])
    args = p.parse_args(argv)
    base = Path(args.dataset_dir) / "ADEChallengeData2016"
    for split in args.splits:
        src_dir, dst_dir = base / "annotations" / split, base / "annotations_detectron2" / split
        if not src_dir.is_dir():
            print(f"error: {src_dir} does not exist; expected ADEChallengeData2016 from the SceneParsing benchmark "
                  "(ADEChallengeData2016.zip) under --dataset-dir", file=sys.stderr)  # fmt: skip
            return 1
        dst_dir.mkdir(parents=True, exist_ok=True)
        files = sorted(src_dir.glob("*.png"))
        for f in files:
            convert(f, dst_dir / f.name)
        print(f"{split}: {len(files)} label images -> {dst_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
