r"""Exported Mask2Former vs eager PyTorch on the CPU: exactness and inference time, side by side in one process.

    python tools/benchmark_export.py [--models micro swin_b] [--rounds 5] [--threads 2]
    python tools/benchmark_export.py --report-only          # the page again from its JSON

For each model (random weights: exactness and speed do not depend on training), exports the merged inference
graph (tools/export_model.py) to ONNX, torch.export and TorchScript, checks each against the eager model on the
sample batch (largest difference per output), then times batch-1 inference of eager PyTorch, ONNX Runtime
(CPUExecutionProvider) and the two PyTorch programs in interleaved rounds on the same image; the page gives
each one's median and the ratio eager / exported (> 1: the export is faster). PyTorch and ONNX Runtime get the
same number of threads. Writes the raw results to OUTPUT with suffix json and the page generated from them
with suffix md.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # peft_d2, and export_model beside this file
import export_model  # noqa: E402

from peft_d2 import export  # noqa: E402
from peft_d2.config import get_cfg, merge_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "micro": ("configs/synthetic/maskformer2_swin_micro_bs4_B.yaml", 128),
    "swin_b": ("configs/coco/instance-segmentation/swin/maskformer2_swin_base_384_bs16_50ep.yaml", 512),
}
FORMATS = ("onnx", "torch_export", "torchscript")
TOLERANCE = 1e-4  # the float outputs' exactness goal


def measure(name: str, rounds: int, threads: int, work: str) -> dict:
    config, size = MODELS[name]
    cfg = merge_config(get_cfg(), os.path.join(ROOT, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    module, images, _ = export_model.exportable(cfg, size=(size, size))
    result = {"config": config, "image_size": size, "parameters": sum(p.numel() for p in module.parameters()),
              "export_seconds": {}, "largest_difference": {}}
    runners = {"eager": module}
    with torch.no_grad():
        want = module(images)
        mask_logits = module.instances(want[0], want[1], images.shape[-2:])[2]  # the eager masks' logits
        result["mask_pixels"] = want[4].numel()
        for fmt in FORMATS:
            start = time.perf_counter()
            path = export.export(module, images, fmt, os.path.join(work, f"{name}-{fmt}"))
            result["export_seconds"][fmt] = round(time.perf_counter() - start, 1)
            runners[fmt] = export.load(path, fmt, threads=threads)
            got = runners[fmt](images)
            diff = dict(export.differences(want, got), **mask_check(want, got, mask_logits))
            result["largest_difference"][fmt] = diff
        one = images[:1]
        for run in runners.values():  # warm-up: first-call costs (TorchScript's optimisation) stay out
            run(one)
        seconds = {k: [] for k in runners}
        for _ in range(rounds):
            for k, run in runners.items():
                start = time.perf_counter()
                run(one)
                seconds[k].append(time.perf_counter() - start)
    result["seconds"] = seconds
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result["median_ms"] = {k: round(v * 1e3, 1) for k, v in median.items()}
    result["eager_over"] = {k: round(median["eager"] / median[k], 2) for k in FORMATS}
    return result


def mask_check(want, got, mask_logits) -> dict:
    """Why exported instance masks differ from the eager ones. A mask pixel is logit > 0, so a logit difference
    within TOLERANCE flips pixels whose eager logit is that close to 0; and two instances whose scores are closer
    than TOLERANCE (random weights make many: every query scores about the same) may trade places. Returns the
    instances that took the place of a near-tied one of the same class ("swapped") and the flipped pixels that
    neither explains ("beyond_tolerance": where the eager logit lies farther than TOLERANCE from 0)."""
    scores, classes, masks = want[2], want[3], want[4]
    got_scores, got_classes, got_masks = (g.to(scores.device) for g in got[2:])

    def unexplained(n, t, u):  # exported instance t against eager instance u
        return int(((got_masks[n, t] != masks[n, u]) & (mask_logits[n, u].abs() > TOLERANCE)).sum())

    swapped = beyond = 0
    for n, t in ((got_masks != masks).flatten(2).any(2)).nonzero().tolist():
        own = unexplained(n, t, t)
        if not own:
            continue
        ties = [u for u in range(masks.shape[1]) if u != t and classes[n, u] == got_classes[n, t]
                and abs(float(scores[n, u] - got_scores[n, t])) <= TOLERANCE and not unexplained(n, t, u)]
        swapped += bool(ties)
        beyond += 0 if ties else own
    return {"instance_masks_swapped": swapped, "instance_masks_beyond_tolerance": beyond}


def report(data: dict) -> str:
    lines = [
        "# Exported Mask2Former vs eager PyTorch (CPU)",
        "",
        f"Generated by `python tools/benchmark_export.py` from `{data['output']}.json`; do not edit.",
        f"{data['machine']}; torch {data['torch']}, onnxruntime {data['onnxruntime']}, {data['threads']} threads "
        f"each; batch 1, median of {data['rounds']} interleaved rounds after a warm-up. Random weights.",
        "",
        "| model | input | parameters | eager PyTorch | ONNX Runtime | torch.export | TorchScript |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in data["models"].items():
        cells = [f"{r['median_ms'][f]:.0f} ms (x{r['eager_over'][f]:.2f})" for f in FORMATS]
        lines.append(f"| {name} (`{os.path.basename(r['config'])}`) | {r['image_size']} px | "
                     f"{r['parameters'] / 1e6:.1f} M | {r['median_ms']['eager']:.0f} ms | " + " | ".join(cells) + " |")
    lines += ["", "x: eager time / exported time (> 1: the export is faster).", "",
              "## Exactness and export time", "",
              "Largest difference to the eager merged model on the sample batch (2 images): class logits, mask "
              "logits, scores; pred_classes counts differing entries; instance_masks counts differing mask "
              "pixels, then the instances that traded places with one of the same class whose score lies within "
              f"{TOLERANCE:g} (a near tie), then the differing pixels that neither such a swap nor a mask logit "
              f"within {TOLERANCE:g} of the threshold 0 explains (`mask_check` in the tool).", "",
              "| model | format | export | pred_logits | pred_masks | scores | pred_classes | instance_masks |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in data["models"].items():
        for fmt in FORMATS:
            d = r["largest_difference"][fmt]
            lines.append(f"| {name} | {fmt} | {r['export_seconds'][fmt]:.0f} s | {d['pred_logits']:.1e} | "
                         f"{d['pred_masks']:.1e} | {d['scores']:.1e} | {d['pred_classes']} | {d['instance_masks']} of "
                         f"{r['mask_pixels']:,}; {d['instance_masks_swapped']} swapped; "
                         f"{d['instance_masks_beyond_tolerance']} unexplained |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(ROOT, "docs/benchmark_export"))
    parser.add_argument("--report-only", action="store_true", help="regenerate the page from the JSON of --output")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(args.output + ".json") as f:
            data = json.load(f)
    else:
        import onnxruntime

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as work:
            models = {name: measure(name, args.rounds, args.threads, work) for name in args.models}
        data = {"output": os.path.basename(args.output), "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "threads": args.threads, "rounds": args.rounds, "models": models}
        with open(args.output + ".json", "w") as f:
            json.dump(data, f, indent=1)
    with open(args.output + ".md", "w") as f:
        f.write(report(data))
    print(report(data))


if __name__ == "__main__":
    main()
