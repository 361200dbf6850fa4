"""A transfer benchmark: every method, paired seeds, learning rates chosen on the target's val split, verdicts.

    python tools/benchmark_peft.py                # the synthetic study: 20 methods x 5 seeds, ~1 h on 2 cores
    python tools/benchmark_peft.py --study dsb2018 --data ROOT --source fluorescence --target tissue
    python tools/benchmark_peft.py --report-only  # rewrite the page from the committed raw results

Studies (peft_d2/study/studies.py): `synthetic` (generated textures, domain A -> B) and `dsb2018` (the 2018 Data
Science Bowl nuclei under ROOT, official layout: any two imaging kinds its preparation finds).

The protocol (fixed before any result; the README's "Decision rules" states the claims' rules):
1. the base is pretrained on the source domain once per machine (cached, resumable);
2. every method (peft_d2.study.studies.METHODS, "scratch" included) gets the same iteration budget (the
   fine-tuning config's SOLVER.MAX_ITER) and the same learning-rate search (peft_d2/study/engine.py): every
   learning rate of its config multiplied by a scale from LR_LADDER, starting with LR_SCALES, one run per scale
   with the selection seed scored on the target's val split, the best scale wins (ties: the smaller), extended
   beyond the edge of the range tried at most MAX_EXTENSIONS times; a diverged run scores 0 AP;
3. at its chosen scale, every method runs with each reporting seed (the study's: 0-4 synthetic, 0-14 dsb2018,
   whose first run's 5 failed the power check; seed s is shared by all methods: data order and the
   initialisation of new modules) and is scored on the target's test split, which nothing was tuned on;
4. the page reports mean AP with 95% t intervals, each method's paired difference to full fine-tuning with
   its interval, the study's checks and the verdict of each claim by peft_d2.study's rules.

Finished runs are cached (resumable); docs/<page>.json holds every raw run, and docs/<page>.md and
docs/<page>.png are generated from it; after a run, docs/<page>_predictions.png (target test images: ground
truth, the base, full fine-tuning, the best PEFT method) and docs/<page>_base_<source>_val.png are drawn from
the cached models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peft_d2.study import report, studies  # noqa: E402
from peft_d2.study.cache import ROOT  # noqa: E402
from peft_d2.study.engine import (  # noqa: E402
    LR_LADDER,
    LR_SCALES,
    MAX_EXTENSIONS,
    SELECTION_SEED,
    Plan,
    choose,
    select,
)

DOCS = os.path.join(ROOT, "docs")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=studies.STUDIES, default="synthetic")
    parser.add_argument("--data", help="dsb2018: the downloaded set (a folder holding stage1_train/)")
    parser.add_argument("--source", default="fluorescence", help="dsb2018: the imaging kind the base is trained on")
    parser.add_argument("--target", default="tissue", help="dsb2018: the imaging kind it is fine-tuned on")
    parser.add_argument("--methods", nargs="+", default=list(studies.METHODS))
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="the reporting runs' paired seeds (default: the study's: synthetic 0-4, dsb2018 0-14)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr-scales", nargs="+", type=float, default=list(LR_SCALES),
                        help="the starting learning-rate grid (multipliers of each config's rates), on the ladder")
    parser.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS,
                        help="how often the search may step beyond the edge of the range tried")
    parser.add_argument("--output", help="prefix of the .json/.md/.png it writes (default: docs/<the study's page>)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page from <output>.json")
    parser.add_argument("--smoke", action="store_true", help="toy data and sizes: the test suite's run")
    parser.add_argument("--pretrain-iters", type=int)
    parser.add_argument("--finetune-iters", type=int)
    parser.add_argument("--no-adopt", dest="adopt", action="store_false",
                        help="never reuse a base or runs made by older code, even where the current code replays "
                             "them identically (peft_d2/study/adopt.py)")
    args = parser.parse_args(argv)
    if args.study == "dsb2018" and not args.data and not args.report_only:
        parser.error("--study dsb2018 needs --data ROOT: the folder that holds stage1_train/ (datasets/README.md)")
    unknown = [m for m in args.methods if m not in studies.METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(studies.METHODS)}")
    if args.seeds is not None and (len(args.seeds) < 2 or SELECTION_SEED in args.seeds):
        parser.error(f"--seeds: give at least two seeds, none of them the selection seed {SELECTION_SEED}")
    off = [x for x in args.lr_scales if x not in LR_LADDER]
    if off:
        parser.error(f"--lr-scales: {off} are not on the ladder {LR_LADDER}")
    return parser, args


def make_study(parser, args) -> studies.Study:
    if args.study == "synthetic":
        return studies.synthetic(args.smoke)
    try:
        # --smoke: a few-shot split of 2 images, so that a small sample still has test images
        fewshot = 2 if args.smoke else studies.DSB_FEWSHOT
        return studies.dsb2018(args.data, args.source, args.target, smoke=args.smoke, fewshot=fewshot)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    parser, args = parse_args(argv)
    if args.report_only:
        output = args.output or os.path.join(DOCS, f"benchmark_{args.study}")
        raw = json.load(open(output + ".json"))
        text, checks, verdicts = report.write_page(raw, output)
        print(text)
        return raw
    t0 = time.perf_counter()
    study = make_study(parser, args)
    output = args.output or os.path.join(DOCS, study.page)
    seeds = args.seeds or list(study.seeds)
    plan = Plan(study, args.pretrain_iters, args.finetune_iters, args.workers, adopt=args.adopt)
    base = plan.pretrain()
    print(f"base model: mask AP {base['AP']:.1f} on {study.source} val", flush=True)

    print(f"1. learning-rate selection on {study.target} val: {len(args.methods)} methods x scales "
          f"{args.lr_scales}", flush=True)  # fmt: skip
    selection = select(plan, args.methods, args.lr_scales, args.max_extensions)
    scales = choose(selection)
    print(f"chosen scales: {scales}", flush=True)

    print(f"2. reporting runs on {study.target} test: {len(args.methods)} methods x seeds {seeds}", flush=True)
    runs = plan.run_many([(m, s, scales[m], "test") for m in args.methods for s in seeds])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    raw = {
        "command": "python tools/benchmark_peft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "commit": commit + (" (with local changes)" if dirty else ""),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU" if not _cuda() else "CUDA",
        "operator": plan.operator,
        "duration_min": (time.perf_counter() - t0) / 60, "study": study.info(), "data": plan.data, "base": base,
        "methods": args.methods, "seeds": seeds, "selection_seed": SELECTION_SEED,
        "lr_scales": args.lr_scales, "lr_ladder": list(LR_LADDER), "max_extensions": args.max_extensions,
        "workers": args.workers,
        "selected_lr_scale": scales, "selection": selection, "runs": runs,
    }  # fmt: skip
    with open(output + ".json", "w") as f:
        json.dump(raw, f, indent=1)
    text, checks, verdicts = report.write_page(raw, output)
    print(f"\n{text}\n\n{report.checks_and_verdicts_text(checks, verdicts)}\n\nwrote {output}.{{json,md,png}}")
    # the pictures need the trained models (the cache), not only the raw results: drawn after a run, not by
    # --report-only
    rows = report.summarise(runs)[0]
    best = report.predictions_png(plan, runs, rows, f"{output}_predictions.png",
                                  base_path=f"{output}_base_{study.source}_val.png")  # fmt: skip
    if best:
        print(f"wrote {output}_predictions.png ({study.target} test: ground truth, the base, full fine-tuning, "
              f"{best}) and {output}_base_{study.source}_val.png", flush=True)  # fmt: skip
    return raw


def _cuda():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
