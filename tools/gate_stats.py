r"""Average MoPEFT gate per submodule (LoRA, prefix, adapter) and block over a dataset.

    python tools/gate_stats.py --config-file configs/synthetic/peft/mopeft.yaml \
        MODEL.WEIGHTS output/synthetic_A/model_final.pth MODEL.PEFT.WEIGHTS output/mopeft/adapter_final.safetensors

As in the MoPEFT paper's analysis: which method each dataset favours. Runs inference over DATASETS.TEST[0]
(or --dataset) with the gates recording, then prints one row per block and the mean over blocks;
--json writes the numbers too.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from tabulate import tabulate  # noqa: E402

import peft_d2.build  # noqa: E402,F401
import peft_d2.modeling  # noqa: E402,F401
from peft_d2.config import get_cfg, merge_config, parse_command_line  # noqa: E402
from peft_d2.data import register_all_datasets  # noqa: E402
from peft_d2.engine import PeftCheckpointer  # noqa: E402
from peft_d2.tuners.mopeft import SUBMODULES, MoPEFTGates  # noqa: E402


def gate_stats(model, loader, max_images=None) -> dict:
    """{block path: {submodule: mean gate}} over the loader's images."""
    gates = {p: m for p, m in model.named_modules() if isinstance(m, MoPEFTGates)}
    if not gates:
        raise SystemExit("the model has no MoPEFT gates: use a config with MODEL.PEFT.METHODS including 'mopeft'")
    for g in gates.values():
        g.record, g.sums, g.count = True, torch.zeros(len(g.submodules)), 0
    model.eval()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            model(batch)
            seen += len(batch)
            if max_images and seen >= max_images:
                break
    for g in gates.values():
        g.record = False
    return {p.rsplit(".mopeft_gates", 1)[0]: g.mean() for p, g in gates.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", default="", help="default: DATASETS.TEST[0]")
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the numbers here")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parse_command_line(parser, argv)
    register_all_datasets()
    cfg = merge_config(get_cfg(), args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg)
    ckpt = PeftCheckpointer(model)
    if cfg.MODEL.WEIGHTS:
        ckpt.load(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.PEFT.WEIGHTS:
        from peft_d2.checkpoint import load_adapter

        load_adapter(model, cfg.MODEL.PEFT.WEIGHTS, check_base=cfg.MODEL.PEFT.CHECK_BASE)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    stats = gate_stats(model, build_detection_test_loader(cfg, dataset), args.max_images or None)
    rows = [[block, *(f"{s[m]:.3f}" if m in s else "" for m in SUBMODULES)] for block, s in stats.items()]
    means = [sum(s[m] for s in stats.values() if m in s) / max(1, sum(m in s for s in stats.values()))
             for m in SUBMODULES]
    rows.append(["mean over blocks", *(f"{v:.3f}" for v in means)])
    print(f"MoPEFT gates on {dataset}:")
    print(tabulate(rows, headers=["block", *SUBMODULES]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": dataset, "blocks": stats}, f, indent=1)


if __name__ == "__main__":
    main()
