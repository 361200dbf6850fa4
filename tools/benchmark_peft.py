"""The full synthetic benchmark: every method of the demo over several fine-tuning seeds, mean and std.

    python tools/benchmark_peft.py                         # all methods, seeds 0 1 2 (about 30 min on 2 cores)
    python tools/benchmark_peft.py --seeds 0 1 2 3 4 --methods full_finetune lora_backbone adapters_2

One domain-A model (pretrain seed 0) is fine-tuned on domain B by every method with each seed, through
tools/demo.py (so its caches are shared: the demo's own runs count as seed 0). Writes
<output>/benchmark.json and benchmark.md and prints the table.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=demo.ALL_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(demo.ROOT, "output", "demo"))
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        raise SystemExit("--seeds: give at least two seeds for a standard deviation")
    runs = {}
    for seed in args.seeds:
        for r in demo.main(["--methods", *args.methods, "--seed", str(seed), "--output", args.output]):
            runs.setdefault(r["method"], []).append(r)

    from tabulate import tabulate

    rows, summary = [], []
    for m, rs in runs.items():
        def ms(key, rs=rs):
            values = [r[key] for r in rs]
            return statistics.mean(values), statistics.stdev(values)

        ap, ap50, miou, step = ms("AP"), ms("AP50"), ms("mIoU"), ms("step_s")
        summary.append({"method": m, "seeds": args.seeds, "trainable": rs[0]["trainable"],
                        "percent": rs[0]["percent"], "AP": ap, "AP50": ap50, "mIoU": miou, "step_s": step,
                        "checkpoint_mib": rs[0]["checkpoint_mib"]})
        rows.append([m, f"{rs[0]['trainable']:,}", f"{rs[0]['percent']:.2f}", f"{ap[0]:.1f} ± {ap[1]:.1f}",
                     f"{ap50[0]:.1f} ± {ap50[1]:.1f}", f"{miou[0]:.1f} ± {miou[1]:.1f}",
                     f"{1000 * step[0]:.0f}", f"{rs[0]['checkpoint_mib']:.3f}"])
    headers = ["method", "trainable", "%", "AP", "AP50", "mIoU", "step ms", "checkpoint MiB"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    print(f"\nmean ± std over seeds {args.seeds}\n{table}")
    with open(os.path.join(args.output, "benchmark.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.output, "benchmark.md"), "w") as f:
        f.write(f"mean ± std over fine-tuning seeds {args.seeds}\n\n{table}\n")


if __name__ == "__main__":
    main()
