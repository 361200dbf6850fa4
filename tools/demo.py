"""The README's main job: does PEFT work? A synthetic domain-transfer study that runs on 2 CPU cores.

    python tools/demo.py                          # first run ~20 min on 2 cores (pretraining included)
    python tools/demo.py --methods all --seeds 0 1 2 3 4

1. generates the two synthetic domains (peft_d2/data/synthetic.py): A, plentiful (1000 training and 100
   validation images, 4 shape classes), and B, few-shot and shifted (64 training images; other textures,
   colours and object sizes; 5 classes of which 2 are new), with a B validation split (50 images, used only to
   choose learning rates) and a B test split (200 images, used only to report);
2. pretrains the demo Mask2Former (Swin backbone, MSDeformAttn pixel decoder, masked-attention decoder) on A
   and reports its mask AP on A's validation split with its learning curve. Data and model are cached once per
   machine under ~/.cache/peft_d2/synthetic (PEFT_D2_HOME moves it), keyed by a hash of the generator, the
   configs and the code that produce them, so every clone shares them and any change to those makes new ones;
3. fine-tunes the base on B with each method and seed (configs/synthetic/demo/<method>.yaml; "scratch" is full
   fine-tuning of the same model from random weights), two runs at a time, each through tools/train_net.py in
   its own process, at the learning-rate scale the benchmark's rule chose on B val (docs/benchmark_synthetic.json;
   1.0 for a method the benchmark has not run). Finished runs are cached too;
4. prints mean mask AP on B test with 95% intervals over the seeds, each method's paired difference to full
   fine-tuning, the study's checks and the verdicts on the papers' claims that its methods and seeds allow
   (peft_d2/study/rules.py; the full benchmark is tools/benchmark_peft.py);
5. writes <output>/results.{json,md}, ap_vs_params.png (AP against trainable %, with the intervals) and
   predictions.png (the same B test images predicted by the base, full fine-tuning and the best PEFT method) and
   base_A_val.png (the base on A val images: what it learnt);
6. serves the B adapter files of two methods (lora_backbone and adapters_1 by default) from one base in one
   batch, images alternating between them, and prints whether the predictions equal each file's own model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft_d2.study import report, studies  # noqa: E402
from peft_d2.study.cache import ROOT, cache_root  # noqa: E402
from peft_d2.study.engine import Plan, curve_text  # noqa: E402

BENCHMARK_JSON = os.path.join(ROOT, "docs", "benchmark_synthetic.json")  # the learning rates it chose
DEMO_METHODS = ["scratch", "full_finetune", "baseline_heads_only", "lora_backbone", "adapters_1", "sfa"]
ALL_METHODS = list(studies.METHODS)


def selected_lr_scales(path=BENCHMARK_JSON) -> dict:
    """The learning-rate scale the benchmark's rule chose for each method (empty before a benchmark exists)."""
    if not os.path.exists(path):
        return {}
    return json.load(open(path)).get("selected_lr_scale", {})


@contextlib.contextmanager
def quiet_into(path):
    """stdout, stderr and warnings into `path` (the pictures and the serving check log detectron2's notes about
    the re-initialised class head, which are expected here)."""
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEMO_METHODS, help=f"'all' or any of {ALL_METHODS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--workers", type=int, default=2, help="fine-tuning runs at a time (one thread each)")
    parser.add_argument("--pretrain-iters", type=int, help="override the pretraining config's SOLVER.MAX_ITER")
    parser.add_argument("--finetune-iters", type=int, help="override the fine-tuning configs' SOLVER.MAX_ITER")
    parser.add_argument("--lr-scales-from", default=BENCHMARK_JSON,
                        help="the benchmark results whose chosen learning-rate scales the runs use")
    parser.add_argument("--smoke", action="store_true", help="toy data and sizes: the test suite's run")
    parser.add_argument("--no-adopt", dest="adopt", action="store_false",
                        help="never reuse a base or runs made by older code, even where the current code replays "
                             "them identically (peft_d2/study/adopt.py)")
    args = parser.parse_args(argv)
    if args.methods == ["all"]:
        args.methods = ALL_METHODS
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {ALL_METHODS} or 'all'")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: repeated seeds in {args.seeds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    print(f"[setup] data and models are cached under {os.path.join(cache_root(), 'synthetic')}", flush=True)
    study = studies.synthetic(args.smoke)
    plan = Plan(study, args.pretrain_iters, args.finetune_iters, args.workers, adopt=args.adopt)

    base = plan.pretrain()
    curve = curve_text(base["curve"])
    print(f"\nbase model: mask AP {base['AP']:.1f} on A val ({study.sizes['source_val']}) after "
          f"{base['iterations']} iterations (learning curve, iteration: AP = {curve})\n", flush=True)

    scales = selected_lr_scales(args.lr_scales_from)
    runs = [(m, s, float(scales.get(m, 1.0)), "test") for m in args.methods for s in args.seeds]
    print(f"fine-tuning on B: {len(args.methods)} methods x {len(args.seeds)} seeds, learning-rate scales "
          f"{ {m: float(scales.get(m, 1.0)) for m in args.methods} } "
          f"({'chosen by the benchmark on B val' if scales else 'default: no benchmark results found'})", flush=True)
    results = plan.run_many(runs)

    rows, checks, verdicts = report.summarise(results)
    text = report.table(rows)
    summary = report.checks_and_verdicts_text(checks, verdicts)
    print(f"\nmask AP on B test ({study.sizes['target_test']}), mean and 95% interval over seeds "
          f"{args.seeds}\n{text}\n\n{summary}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"base": base, "runs": results}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{text}\n\n```\n{summary}\n```\n")
    report.plot(rows, os.path.join(out, "ap_vs_params.png"), "Fine-tuning the domain-A model on domain B")
    log = os.path.join(out, "predictions.log")
    open(log, "w").close()
    with quiet_into(log):
        best = report.predictions_png(plan, results, rows, os.path.join(out, "predictions.png"))
    with quiet_into(log):
        served = report.serve_adapters(plan, results)
    if served:
        print(f"\nserving: {report.serving_text(served)}", flush=True)
    print("\nwrote results.json, results.md, ap_vs_params.png"
          + (f", predictions.png (base, full fine-tuning, {best}), base_A_val.png" if best else "")
          + f" in {out}; done in {(time.perf_counter() - t0) / 60:.1f} min")
    return {"base": base, "rows": rows, "checks": checks, "verdicts": verdicts, "served": served}


if __name__ == "__main__":
    main()
