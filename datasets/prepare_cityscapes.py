#!/usr/bin/env python3
"""Cityscapes label images for detectron2: *_gtFine_labelTrainIds.png (semantic) and, with cityscapesscripts,
the panoptic PNGs (gtFine/cityscapes_panoptic_{split}/ + cityscapes_panoptic_{split}.json).

    python datasets/prepare_cityscapes.py [--dataset-dir DIR] [--panoptic]

With cityscapesscripts installed, its own converters run (createTrainIdLabelImgs draws from the polygon JSONs;
createPanopticImgs for --panoptic). Without it, train ids are made from the *_gtFine_labelIds.png images with
the official id -> trainId table below (the same mapping), and --panoptic stops with a message.
Note: detectron2's Cityscapes *instance* loader imports cityscapesscripts itself (pip install cityscapesscripts).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Cityscapes label id -> train id (19 evaluated classes; 255 = ignored). From cityscapesscripts/helpers/labels.py.
ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
TRAIN_ID_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


def _lut() -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for k, v in ID_TO_TRAIN_ID.items():
        lut[k] = v
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    if label_ids.ndim != 2:
        raise ValueError(f"expected a single-channel labelIds image, got shape {label_ids.shape}")
    return _lut()[label_ids.astype(np.uint8)]


def convert_train_ids(gt_fine: Path) -> int:
    files = sorted(gt_fine.glob("*/*/*_gtFine_labelIds.png"))
    if not files:
        raise FileNotFoundError(
            f"no */*/*_gtFine_labelIds.png under {gt_fine}; expected gtFine_trainvaltest.zip unpacked there "
            "(or install cityscapesscripts to draw the labels from the polygon JSONs)"
        )
    for f in files:
        out = f.with_name(f.name.replace("_labelIds.png", "_labelTrainIds.png"))
        Image.fromarray(label_ids_to_train_ids(np.asarray(Image.open(f)))).save(out)
    return len(files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    p.add_argument("--panoptic", action="store_true", help="also make the panoptic PNGs (needs cityscapesscripts)")
    p.add_argument("--no-cityscapesscripts", action="store_true", help="use the built-in table even if installed")
    args = p.parse_args(argv)
    root = Path(args.dataset_dir) / "cityscapes"
    gt_fine = root / "gtFine"
    if not gt_fine.is_dir():
        print(f"error: {gt_fine} does not exist; expected cityscapes/gtFine and cityscapes/leftImg8bit under "
              "--dataset-dir (see datasets/README.md)", file=sys.stderr)  # fmt: skip
        return 1
    have_scripts = importlib.util.find_spec("cityscapesscripts") is not None and not args.no_cityscapesscripts
    os.environ["CITYSCAPES_DATASET"] = str(root)
    if have_scripts:
        from cityscapesscripts.preparation import createTrainIdLabelImgs

        createTrainIdLabelImgs.main()
    else:
        try:
            n = convert_train_ids(gt_fine)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{n} labelTrainIds images written under {gt_fine} (built-in id -> trainId table)")
    if args.panoptic:
        if not have_scripts:
            print("error: --panoptic needs cityscapesscripts (pip install cityscapesscripts)", file=sys.stderr)
            return 1
        from cityscapesscripts.preparation import createPanopticImgs

        createPanopticImgs.convert2panoptic(
            cityscapesPath=str(root), outputFolder=str(gt_fine), useTrainId=False, setNames=["train", "val"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
