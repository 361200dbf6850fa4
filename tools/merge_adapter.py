r"""Fold an adapter's LoRA into its base model and write a plain detectron2 checkpoint.

    python tools/merge_adapter.py --config-file configs/.../peft/lora.yaml \
        --adapter output/adapter_final.safetensors --output output/merged.pth [KEY VALUE ...]

Builds the base of the config (MODEL.META_ARCHITECTURE "PEFT": MODEL.PEFT.BASE_META_ARCHITECTURE), loads
MODEL.WEIGHTS, injects the adapter file's own PeftConfig and loads its tensors (as `inject_from_checkpoint`,
so SFA files bring their internal selection), and writes `--output` ({"model": state dict}) plus
`<output>.yaml`, the same config without PEFT (no MODEL.PEFT node, no DATASETS.COCO_INSTANCES unless it names
datasets: a config without peft_d2's keys reads it) that loads it. Mergeable methods: LoRA, COBOT through
LoRA, SFA; adapters (bottleneck modules), prefixes and gates cannot be folded into base weights: such an
adapter file is refused.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peft_d2.quiet import quiet_third_party_notices  # noqa: E402

quiet_third_party_notices()  # before detectron2's imports, which raise most of them

import peft_d2.modeling  # noqa: E402,F401 - registers Mask2Former's parts
from peft_d2.checkpoint import atomic_write, merged_state_dict  # noqa: E402
from peft_d2.config import get_cfg, merge_config, parse_command_line  # noqa: E402
from peft_d2.engine.checkpoint import load_adapted_model  # noqa: E402


def merge(cfg, adapter: str, output: str) -> str:
    if cfg.MODEL.META_ARCHITECTURE != "PEFT":
        raise SystemExit(
            f"MODEL.META_ARCHITECTURE must be 'PEFT' to merge an adapter, got {cfg.MODEL.META_ARCHITECTURE!r}"
        )
    state = merged_state_dict(load_adapted_model(cfg, adapter))
    atomic_write(output, lambda tmp: torch.save({"model": state, "__author__": "peft_d2.merge_adapter"}, tmp))
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.META_ARCHITECTURE = cfg.MODEL.PEFT.BASE_META_ARCHITECTURE
    del plain.MODEL["PEFT"]
    if not plain.DATASETS.COCO_INSTANCES:  # peft_d2's too; kept when it names datasets (train_net.py reads it)
        del plain.DATASETS["COCO_INSTANCES"]
    plain.MODEL.WEIGHTS = os.path.abspath(output)
    with open(output + ".yaml", "w") as f:
        f.write(plain.dump())
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--adapter", default="", help="adapter file (default: MODEL.PEFT.WEIGHTS)")
    parser.add_argument("--output", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = parse_command_line(parser, argv)
    cfg = merge_config(get_cfg(), args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    adapter = args.adapter or cfg.MODEL.PEFT.WEIGHTS
    if not adapter:
        raise SystemExit("give --adapter or MODEL.PEFT.WEIGHTS")
    print(f"merged checkpoint written to {merge(cfg, adapter, args.output)} (config: {args.output}.yaml)")


if __name__ == "__main__":
    main()
