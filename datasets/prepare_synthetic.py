#!/usr/bin/env python3
"""Write the synthetic two-domain dataset (peft_d2/data/synthetic.py) under $DETECTRON2_DATASETS/synthetic.

    python datasets/prepare_synthetic.py                       # A: 256 train, B: 32 train, 16 val each, 128 px
    python datasets/prepare_synthetic.py --num-train-a 16 --num-train-b 8 --num-val 4 --image-size 64

The datasets are then registered as synthetic_{A,B}_{train,val} (COCO instances) and
synthetic_{A,B}_sem_seg_{train,val} (semantic labels) by `import peft_d2.data`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft_d2.quiet import quiet_third_party_notices  # noqa: E402

quiet_third_party_notices()  # before detectron2's imports, which raise most of them

from peft_d2.data.synthetic import DOMAINS, generate_synthetic  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_root = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "synthetic")
    p.add_argument("--root", default=default_root, help=f"output folder (default: {default_root})")
    p.add_argument("--domains", nargs="+", default=sorted(DOMAINS), choices=sorted(DOMAINS))
    p.add_argument("--num-train-a", type=int, default=256, help="training images of domain A")
    p.add_argument("--num-train-b", type=int, default=32, help="training images of domain B (few-shot)")
    p.add_argument("--num-val", type=int, default=16, help="validation images per domain")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images, in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-format", choices=["rle", "polygon"], default="rle")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = generate_synthetic(
        args.root,
        domains=tuple(args.domains),
        num_train={"A": args.num_train_a, "B": args.num_train_b},
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
        mask_format=args.mask_format,
        image_format=args.image_format,
    )
    for name, paths in out.items():
        print(f"{name}: {paths['json_file']}")
    print(f"done in {time.perf_counter() - t0:.1f}s under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
