r"""Export a Mask2Former, with its adapter merged, to ONNX, torch.export or TorchScript.

    python tools/export_model.py --config-file configs/.../peft/lora.yaml --adapter output/adapter_final.safetensors \
        --format onnx --output export/ [--sample-image IMG] [--image-size H W] [KEY VALUE ...]

Builds the model as tools/merge_adapter.py does (MODEL.WEIGHTS, then the adapter file's own PeftConfig and
tensors; a config without PEFT exports MODEL.WEIGHTS as it is), folds LoRA, DoRA, conv LoRA, COBOT and SFA into
the base weights, keeps adapters, prefixes, Mona and MoPEFT's gated modules as modules, and exports the
inference graph (peft_d2/export.py: normalised images of a fixed size in; class and mask logits and the top
instances out). As detectron2's tools/deploy/export_model.py: a sample image to trace (--sample-image, resized
to the export size; a random one otherwise) and OUTPUT/model.onnx | model.pt2 | model.ts. Beside it,
OUTPUT/export.json records the input's normalisation, the outputs, what was merged and kept, and the largest
difference between the exported program and the eager model on the sample (batch 2) and on a batch of 3
(the batch size is dynamic).
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peft_d2.quiet import quiet_third_party_notices  # noqa: E402

quiet_third_party_notices()  # before detectron2's imports, which raise most of them

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.data.transforms import ResizeTransform  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import peft_d2.modeling  # noqa: E402,F401 - registers Mask2Former's parts
from peft_d2 import export  # noqa: E402
from peft_d2.config import get_cfg, merge_config, parse_command_line  # noqa: E402
from peft_d2.engine.checkpoint import load_adapted_model  # noqa: E402
from peft_d2.errors import PeftConfigError  # noqa: E402


def adapter_file(cfg, adapter: str) -> str:
    """The adapter file to merge: --adapter, else a PEFT config's MODEL.PEFT.WEIGHTS ("" for a plain config)."""
    if cfg.MODEL.META_ARCHITECTURE == "PEFT":
        adapter = adapter or cfg.MODEL.PEFT.WEIGHTS
        if not adapter:
            raise PeftConfigError("export: a PEFT config needs --adapter or MODEL.PEFT.WEIGHTS (the adapter file)")
    elif adapter:
        raise PeftConfigError(
            f"export: --adapter needs a PEFT config (MODEL.META_ARCHITECTURE 'PEFT'), got "
            f"{cfg.MODEL.META_ARCHITECTURE!r}"
        )
    return adapter


def build(cfg, adapter: str):
    """The eager model to export: the model `adapter` (adapter_file's answer) was trained into, or a plain config's
    model with MODEL.WEIGHTS."""
    if adapter:
        return load_adapted_model(cfg, adapter)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def image_size(cfg, model, size):
    """(H, W): --image-size, or INPUT.MIN_SIZE_TEST squared, checked against the model's size divisibility."""
    div = max(int(getattr(model, "size_divisibility", 0) or 0), 32)
    if not size:
        side = int(math.ceil(cfg.INPUT.MIN_SIZE_TEST / div) * div)
        size = (side, side)
    h, w = size
    if h <= 0 or w <= 0 or h % div or w % div:
        raise PeftConfigError(f"export: --image-size {h} {w}: both must be positive multiples of {div} (the model's "
                              "size divisibility, so that no padding is needed)")
    return h, w


def sample_images(cfg, path: str, size) -> torch.Tensor:
    """(2, 3, H, W) normalised: the sample image (resized to the export size) and its mirror, or two random ones."""
    h, w = size
    if path:
        img = read_image(path, format=cfg.INPUT.FORMAT)
        img = ResizeTransform(img.shape[0], img.shape[1], h, w).apply_image(img)
        x = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)), dtype=torch.float32)
        x = torch.stack([x, x.flip(-1)])
    else:
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, -1, 1, 1)
    return (x - mean) / std


def exportable(cfg, adapter="", sample_image="", size=()):
    """(the InstanceSegmentationExport of the merged model, the normalised sample batch, what was merged / kept)."""
    model = build(cfg, adapter_file(cfg, adapter))
    what = export.prepare(model)
    module = export.InstanceSegmentationExport(model, cfg.TEST.DETECTIONS_PER_IMAGE).eval()
    return module, sample_images(cfg, sample_image, image_size(cfg, model, size)), what


def run(cfg, adapter, fmt, output, sample_image="", size=(), msda="kernel") -> dict:
    """Exports and checks; returns the manifest written to OUTPUT/export.json. The program is exported and checked
    in a hidden folder inside OUTPUT and moved into place with its manifest only then: a failed or killed export
    leaves an earlier one in OUTPUT as it was."""
    module, images, what = exportable(cfg, adapter, sample_image, size)
    h, w = images.shape[-2:]
    os.makedirs(output, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=output)
    try:
        start = time.perf_counter()
        path = export.export(module, images, fmt, staging, msda=msda)
        seconds = time.perf_counter() - start
        exported = export.load(path, fmt)
        checks = {}
        with torch.no_grad():
            for name, batch in (("sample", images), ("batch of 3", torch.cat([images, images[:1].flip(-2)]))):
                checks[name] = export.differences(module(batch), exported(batch))
        manifest = {
            "format": fmt,
            "file": os.path.basename(path),
            "adapter": adapter_file(cfg, adapter),
            "input": {"name": "images", "shape": ["batch", 3, h, w], "dtype": "float32",
                      "normalisation": "(pixel - pixel_mean) / pixel_std", "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
                      "pixel_std": list(cfg.MODEL.PIXEL_STD), "channels": cfg.INPUT.FORMAT},
            "outputs": {
                "pred_logits": ["batch", module.num_queries, module.num_classes + 1],
                "pred_masks": ["batch", module.num_queries, h // 4, w // 4],
                "scores": ["batch", module.detections],
                "pred_classes": ["batch", module.detections],
                "instance_masks": ["batch", module.detections, h, w],
            },
            "merged": what["merged"],
            "kept": what["kept"],
            "deformable_attention": export.msda_backend_for(fmt, msda, images.device.type),
            "onnx_opset": export.ONNX_OPSET if fmt == "onnx" else None,
            "torch": torch.__version__,
            "export_seconds": round(seconds, 1),
            "largest_difference_to_eager": checks,
        }
        for name in os.listdir(staging):  # the program (ONNX may write external weight files beside it)
            os.replace(os.path.join(staging, name), os.path.join(output, name))
        export.write_manifest(output, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--adapter", default="", help="adapter file (default: MODEL.PEFT.WEIGHTS)")
    parser.add_argument("--format", required=True, choices=sorted(export.FORMATS))
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--sample-image", default="", help="an image to trace and check with (default: random)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(), metavar=("H", "W"),
                        help="the fixed input size (default: INPUT.MIN_SIZE_TEST, square)")
    parser.add_argument("--msda", default="kernel", choices=("kernel", "reference"),
                        help="deformable attention as peft_d2's compiled operator (torch.export, TorchScript; needs "
                             "peft_d2 where the program runs) or decomposed into grid_sample (ONNX: always)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = parse_command_line(parser, argv)
    cfg = merge_config(get_cfg(), args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    manifest = run(cfg, args.adapter, args.format, args.output, args.sample_image, tuple(args.image_size), args.msda)
    print(f"exported {os.path.join(args.output, manifest['file'])} in {manifest['export_seconds']} s "
          f"(merged: {', '.join(manifest['merged']) or 'nothing'}; kept as modules: "
          f"{', '.join(manifest['kept']) or 'nothing'}; deformable attention: {manifest['deformable_attention']})")
    for name, diff in manifest["largest_difference_to_eager"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v} differ"
                                        for k, v in diff.items()))


if __name__ == "__main__":
    main()
