r"""Trainable-parameter report of PEFT configs, and adapter-checkpoint size against the full checkpoint.

    python tools/param_report.py --config-file configs/coco/peft/*.yaml
    python tools/param_report.py --config-file configs/coco/peft/*.yaml \
        --bases configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml \
                configs/coco/instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml
    python tools/param_report.py --config-file configs/coco/mask_rcnn/mask_rcnn_R_50_FPN_3x_lora.yaml

Counts need no data and no weights: each model is built on CPU from its config. With --bases, every PEFT
config's MODEL.META_ARCHITECTURE and MODEL.PEFT node is applied on top of each base config instead of its
own _BASE_ chain (a scale sweep). The adapter checkpoint is written for real (safetensors); the full
checkpoint size is the float32 state dict's size. A config whose method cannot apply to a base (LoRA on
transformer blocks of a ResNet, on a ResNet's convolutions in a Swin) is reported with the reason. Any model
detectron2's build_model builds is counted: the Mask2Former configs and detectron2's own (the Mask R-CNN R50-FPN
of configs/coco/mask_rcnn, whose _BASE_ is a model-zoo config).
"""

import argparse
import os
import sys
import tempfile

import torch
from detectron2.modeling import build_model
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft_d2.modeling  # noqa: E402,F401
from peft_d2 import PeftConfigError  # noqa: E402
from peft_d2.build import build_base_model  # noqa: E402
from peft_d2.checkpoint import save_adapter  # noqa: E402
from peft_d2.config import get_cfg, merge_config  # noqa: E402
from peft_d2.inject import parameter_report  # noqa: E402
from peft_d2.tuners import sfa  # noqa: E402


def load_cfg(path, base=None):
    cfg = get_cfg()
    if base is None:
        merge_config(cfg, path)
    else:
        merge_config(cfg, base)
        peft = merge_config(get_cfg(), path)
        cfg.MODEL.META_ARCHITECTURE = peft.MODEL.META_ARCHITECTURE
        cfg.MODEL.PEFT = peft.MODEL.PEFT
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def measure(cfg) -> dict:
    torch.manual_seed(0)
    if "sfa" in cfg.MODEL.PEFT.METHODS:
        # the selection needs a warm-up on data; for counting, any selection of the budgeted size will do
        return _measure_sfa(cfg)
    model = build_model(cfg)
    return _sizes(model, parameter_report(model), cfg.MODEL.META_ARCHITECTURE == "PEFT")


def _measure_sfa(cfg):
    from peft_d2.config import peft_config_from_cfg
    from peft_d2.inject import inject

    model = build_base_model(cfg)
    config = peft_config_from_cfg(cfg)
    selection = sfa.random_selection(model, config.sfa)
    return _sizes(model, inject(model, config, sfa_selection=selection), True)


def _sizes(model, report, peft) -> dict:
    full = sum(t.numel() * 4 for t in model.state_dict().values())
    adapter = None
    if peft:
        with tempfile.TemporaryDirectory() as tmp:
            adapter = os.path.getsize(save_adapter(model, os.path.join(tmp, "a.safetensors")))
    return {"report": report, "full_bytes": full, "adapter_bytes": adapter}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", nargs="+", required=True)
    parser.add_argument("--bases", nargs="*", default=None, help="base configs to sweep over")
    args = parser.parse_args(argv)
    rows = []
    for base in args.bases or [None]:
        for path in args.config_file:
            name = os.path.splitext(os.path.basename(path))[0]
            scale = os.path.splitext(os.path.basename(base))[0] if base else "own-base"
            try:
                m = measure(load_cfg(path, base))
            except PeftConfigError as e:
                rows.append([scale, name, "n/a", "", "", "", "", f"not applicable: {str(e)[:70]}"])
                continue
            r = m["report"]
            methods = ", ".join(f"{k}={v:,}" for k, v in r["by_method"].items())
            ckpt = "" if m["adapter_bytes"] is None else f"{m['adapter_bytes'] / 2**20:.2f}"
            ratio = "" if m["adapter_bytes"] is None else f"{100 * m['adapter_bytes'] / m['full_bytes']:.2f}"
            rows.append([scale, name, f"{r['total']:,}", f"{r['trainable']:,}", f"{r['percent']:.2f}",
                         ckpt, f"{m['full_bytes'] / 2**20:.1f}", ratio + ("  " + methods if methods else "")])
    print(tabulate(rows, headers=["base", "config", "params", "trainable", "trainable %", "adapter MiB",
                                  "full MiB", "adapter % of full / by method"], disable_numparse=True))


if __name__ == "__main__":
    main()
