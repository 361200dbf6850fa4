#!/usr/bin/env python3
"""Convert the 2018 Data Science Bowl stage-1 training set (nuclei) into COCO instances by imaging kind.

    python datasets/prepare_dsb2018.py ROOT            # ROOT holds stage1_train/<id>/{images,masks}/
    python datasets/prepare_dsb2018.py ROOT --out DIR --fewshot 32 --tile 128

Writes $DETECTRON2_DATASETS/dsb2018/ (or --out): RGB images, COCO JSON per kind and split, the val and test
splits also as native-scale tiles (the evaluation unit), and summary.json. The datasets are then registered as
dsb2018_<kind>_<split> (whole images) and dsb2018_<kind>_<split>_tiles (val, test) by `import peft_d2.data`.
Kinds, splits, tiles and the handling of bad mask files: peft_d2/data/dsb2018.py and datasets/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft_d2.data.checks import MalformedAnnotationError  # noqa: E402
from peft_d2.data.dsb2018 import prepare_dsb2018  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "dsb2018")
    p.add_argument("root", help="the downloaded set: a folder holding stage1_train/ (or stage1_train itself)")
    p.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    p.add_argument("--fewshot", type=int, default=32, help="images of each kind's few-shot training split")
    p.add_argument("--tile", type=int, default=128, help="side of the evaluation tiles, in pixels")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        summary = prepare_dsb2018(args.root, args.out, fewshot=args.fewshot, tile=args.tile)
    except MalformedAnnotationError as e:
        print(f"prepare_dsb2018: {e}", file=sys.stderr)
        return 2
    for kind, splits in summary["kinds"].items():
        print(f"{kind}: " + ", ".join(f"{s} {v['images']} images" for s, v in splits.items()))
    print(
        f"skipped {summary['skipped_empty_masks']} empty masks; {summary['overlap_pixels']} pixels in more than one "
        f"mask (kept)"
    )
    print(f"done in {time.perf_counter() - t0:.0f}s under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
