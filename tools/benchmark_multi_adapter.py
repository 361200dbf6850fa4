r"""Inference time of one mixed batch of K adapters against K single-adapter passes and the base alone.

    python tools/benchmark_multi_adapter.py                      # micro model, CPU, K = 1, 4, 16
    python tools/benchmark_multi_adapter.py --device cuda --size 512 --batch 16 \
        --base configs/coco/instance-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml \
        --peft-dir configs/coco/peft                              # Swin-B scale
    python tools/benchmark_multi_adapter.py --each --k 1 4 \
        --methods lora_backbone adapters_1 mona lora_dora lora_conv  # one block of rows per method

The K adapters are made from the PEFT configs in --peft-dir named by --methods, in turn (adapter k uses
methods[k % len]), each with its trainable tensors moved by a seeded random step so that they differ; with
--each, every method in turn has all K adapters (what serving costs per method). The batch of --batch images is
split evenly over the K adapters. Timed side by side, in interleaved rounds
(median reported), on the same images:
- base: the plain base model over the whole batch;
- mixed: the serving model (peft_d2.load_adapters) over the whole batch, each image routed to its adapter;
- separate: for each adapter, its own single-adapter model over its images (K passes).
Goal (issue 14): mixed <= 1.25 x base, and mixed < separate for K >= 4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_cfg(base, peft_yaml, device):
    from peft_d2.config import get_cfg, merge_config

    cfg = merge_config(get_cfg(), peft_yaml)
    if base:
        peft = cfg.MODEL.PEFT.clone()
        cfg = merge_config(get_cfg(), base)
        cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.PEFT = "PEFT", peft
        cfg.MODEL.PEFT.BASE_META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = device, ""
    return cfg


def make_adapters(args, methods, folder):
    """K single-adapter models and their files, plus the config of the base."""
    from detectron2.modeling import build_model

    from peft_d2.checkpoint import save_adapter

    models, paths, cfg = [], {}, None
    for k in range(max(args.k)):
        method = methods[k % len(methods)]
        cfg = load_cfg(args.base, os.path.join(args.peft_dir, f"{method}.yaml"), args.device)
        torch.manual_seed(0)  # the same base weights for every adapter
        model = build_model(cfg).eval()
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
        name = f"{method}_{k}"
        paths[name] = save_adapter(model, os.path.join(folder, f"{name}.safetensors"))
        models.append((name, model))
    return models, paths, cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="base config (default: the PEFT configs' own _BASE_)")
    parser.add_argument("--peft-dir", default=os.path.join(ROOT, "configs/synthetic/peft"))
    parser.add_argument("--methods", nargs="+", default=["lora_backbone", "adapters_1"])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--each", action="store_true", help="each method alone: K adapters of that method")
    args = parser.parse_args(argv)
    if any(args.batch % k for k in args.k):
        parser.error(f"--batch {args.batch} must be a multiple of every --k {args.k}")

    import peft_d2.build  # noqa: F401
    import peft_d2.modeling  # noqa: F401

    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.randint(0, 256, (3, args.size, args.size), generator=g).float(),
               "height": args.size, "width": args.size} for _ in range(args.batch)]
    groups = [[m] for m in args.methods] if args.each else [args.methods]
    rows = [(" ".join(methods), *row) for methods in groups for row in measure(args, methods, images)]
    print(f"device {args.device}, batch {args.batch} x {args.size}px, methods {args.methods}"
          f"{' (each alone)' if args.each else ''}, median of {args.rounds} interleaved rounds")
    width = max(len("methods"), *(len(r[0]) for r in rows))
    print(f"{'methods':<{width}} {'K':>3} {'base s':>9} {'mixed s':>9} {'separate s':>11} {'mixed/base':>11} "
          f"{'separate/mixed':>15}")
    for methods, k, b, m, s in rows:
        print(f"{methods:<{width}} {k:>3} {b:9.4f} {m:9.4f} {s:11.4f} {m / b:11.3f} {s / m:15.3f}")


@torch.no_grad()  # not set_grad_enabled(False): main() is called in-process by the tests
def measure(args, methods, images):
    """(K, base s, mixed s, separate s) for each K, with adapters made from `methods` in turn."""
    from peft_d2.build import build_base_model
    from peft_d2.multi import load_adapters

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        singles, paths, cfg = make_adapters(args, methods, folder)
        torch.manual_seed(0)
        base = build_base_model(cfg).eval()
        rows = []
        for k in args.k:
            names = list(paths)[:k]
            serve = build_base_model(cfg).eval()
            serve.load_state_dict(base.state_dict())
            load_adapters(serve, {n: paths[n] for n in names})
            per = args.batch // k
            mixed_batch = [dict(d, adapter=names[i // per]) for i, d in enumerate(images)]
            runs = {
                "base": lambda: base(images),
                "mixed": lambda s=serve, b=mixed_batch: s(b),
                "separate": lambda k=k, per=per: [m(images[i * per:(i + 1) * per])
                                                  for i, (_, m) in enumerate(singles[:k])],
            }
            for fn in runs.values():  # warm-up
                fn()
            times = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    sync()
                    t = time.perf_counter()
                    fn()
                    sync()
                    times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(v) for name, v in times.items()}
            rows.append((k, med["base"], med["mixed"], med["separate"]))
            del serve
    return rows


if __name__ == "__main__":
    main()
