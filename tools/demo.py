"""The README's main job: does PEFT work? A synthetic domain-transfer study that runs on 2 CPU cores.

    python tools/demo.py                          # first run ~20 min on 2 cores (pretraining included)
    python tools/demo.py --methods all --seeds 0 1 2 3 4

1. generates the two synthetic domains (peft_d2/data/synthetic.py): A, plentiful (1000 training and 100
   validation images, 4 shape classes), and B, few-shot and shifted (64 training images; other textures,
   colours and object sizes; 5 classes of which 2 are new), with a B validation split (50 images, used only to
   choose learning rates) and a B test split (200 images, used only to report);
2. pretrains the demo Mask2Former (Swin backbone, MSDeformAttn pixel decoder, masked-attention decoder) on A
   and reports its mask AP on A's validation split with its learning curve. Data and model are cached once per
   machine under ~/.cache/peft_d2/demo (PEFT_D2_HOME moves it), keyed by a hash of the generator, the configs
   and the code that produce them, so every clone shares them and any change to those makes new ones;
3. fine-tunes the base on B with each method and seed (configs/synthetic/demo/<method>.yaml; "scratch" is full
   fine-tuning of the same model from random weights), two runs at a time, each through tools/train_net.py in
   its own process, at the learning-rate scale the benchmark's rule chose on B val (docs/benchmark_synthetic.json;
   1.0 for a method the benchmark has not run). Finished runs are cached too;
4. prints mean mask AP on B test with 95% intervals over the seeds, each method's paired difference to full
   fine-tuning, the study's checks and the verdicts on the papers' claims that its methods and seeds allow
   (peft_d2/study.py; the full benchmark is tools/benchmark_peft.py);
5. writes <output>/results.{json,md}, ap_vs_params.png (AP against trainable %, with the intervals) and
   predictions.png (the same B test images predicted by the base, full fine-tuning and the best PEFT method) and
   base_A_val.png (the base on A val images: what it learnt);
6. serves the B adapter files of two methods (lora_backbone and adapters_1 by default) from one base in one
   batch, images alternating between them, and prints whether the predictions equal each file's own model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecation notes about detectron2's code

CONFIGS = os.path.join(ROOT, "configs", "synthetic")
PRETRAIN_CONFIG = os.path.join(CONFIGS, "maskformer2_swin_demo_A.yaml")
METHOD_CONFIGS = os.path.join(CONFIGS, "demo")
BENCHMARK_JSON = os.path.join(ROOT, "docs", "benchmark_synthetic.json")  # the learning rates it chose

DEMO_METHODS = ["scratch", "full_finetune", "baseline_heads_only", "lora_backbone", "adapters_1", "sfa"]
ALL_METHODS = ["scratch", "full_finetune", "baseline_heads_only", "baseline_decoder_only", "baseline_whole_head",
               "lora_backbone", "lora_msdeformattn", "adapters_1", "adapters_2", "adapters_3", "adapters_parallel",
               "lora_adapters", "prefix", "mopeft", "cobot_lora", "cobot_adapter", "sfa"]

# The data of the study. B is few-shot; B val chooses hyperparameters, B test reports.
DATA = {"image_size": 128, "num_train": {"A": 1000, "B": 64}, "num_val": {"A": 100, "B": 50},
        "num_test": {"B": 200}, "seed": 0}
# --smoke: the same pipeline at toy size, for the test suite
SMOKE_DATA = {"image_size": 64, "num_train": {"A": 8, "B": 8}, "num_val": {"A": 4, "B": 4},
              "num_test": {"B": 4}, "seed": 0}

# code whose change must make a new base model / new fine-tuning runs
PRETRAIN_CODE = ["peft_d2/modeling", "peft_d2/data", "peft_d2/engine", "peft_d2/ops", "peft_d2/config.py",
                 "tools/train_net.py", "csrc", "configs/synthetic/Base-Synthetic-InstanceSegmentation.yaml",
                 "configs/synthetic/maskformer2_swin_micro_bs4_A.yaml",
                 "configs/synthetic/maskformer2_swin_demo_A.yaml"]
RUN_CODE = ["peft_d2", "tools/train_net.py", "csrc", "configs/synthetic"]


# ----------------------------------------------------------------------------------------------- caching


def cache_root() -> str:
    home = os.environ.get("PEFT_D2_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peft_d2")
    return os.path.join(home, "demo")


def fingerprint(paths, *extra) -> str:
    """sha256 (12 hex digits) of the contents of the files under `paths` (relative to ROOT) and of `extra`."""
    h = hashlib.sha256()
    for rel in paths:
        full = os.path.join(ROOT, rel)
        files = [full] if os.path.isfile(full) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs
            if f.endswith((".py", ".yaml", ".cpp", ".cu", ".h", ".cuh")))
        for f in files:
            h.update(os.path.relpath(f, ROOT).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:12]


class _Lock:
    """An exclusive lock on `path` (two demos on one machine wait for each other instead of racing)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "w")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def prepare_data(data: dict) -> str:
    """Generate the study's data once; returns the DETECTRON2_DATASETS folder that holds `synthetic/`."""
    from peft_d2.data.synthetic import generate_synthetic

    key = fingerprint(["peft_d2/data/synthetic.py"], data)
    root = os.path.join(cache_root(), f"data-{key}")
    with _Lock(root + ".lock"):
        if not os.path.exists(os.path.join(root, "ready")):
            tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".data-")
            generate_synthetic(os.path.join(tmp, "synthetic"), domains=("A", "B"), num_train=data["num_train"],
                               num_val=data["num_val"], num_test=data["num_test"], image_size=data["image_size"],
                               seed=data["seed"])
            open(os.path.join(tmp, "ready"), "w").close()
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    return root


# ----------------------------------------------------------------------------------------------- runs


class Plan:
    """Where the study's stages live and how each is run: one object shared by the demo and the benchmark."""

    def __init__(self, smoke=False, pretrain_iters=None, finetune_iters=None, workers=2):
        self.smoke = smoke
        self.data = SMOKE_DATA if smoke else DATA
        self.workers = workers
        self.data_root = prepare_data(self.data)
        self.extra = (["INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
                      if smoke else [])
        self.pretrain_iters = pretrain_iters
        self.finetune_iters = finetune_iters
        self.pretrain_key = fingerprint(PRETRAIN_CODE, self.data, self.extra, pretrain_iters)
        self.pretrain_dir = os.path.join(cache_root(), f"pretrain-{self.pretrain_key}")
        self.base_weights = os.path.join(self.pretrain_dir, "model_final.pth")
        self.run_code = fingerprint(RUN_CODE)

    # -- the base model
    def pretrain(self):
        """Pretrain on A (cached). Returns the base's result: final A val AP and its learning curve."""
        result_file = os.path.join(self.pretrain_dir, "result.json")
        with _Lock(self.pretrain_dir + ".lock"):
            if os.path.exists(result_file):
                return json.load(open(result_file))
            opts = ["DATASETS.TEST", '("synthetic_A_val",)', *self.extra]
            if self.pretrain_iters:
                opts += ["SOLVER.MAX_ITER", str(self.pretrain_iters), "SOLVER.STEPS", "()",
                         "TEST.EVAL_PERIOD", str(max(self.pretrain_iters // 2, 1)),
                         "SOLVER.WARMUP_ITERS", str(min(self.pretrain_iters, 10))]
            spec = {"config": PRETRAIN_CONFIG, "opts": opts, "threads": 2, "eval": ["synthetic_A_val"]}
            run_child(spec, self.pretrain_dir, self.data_root, progress_label="pretraining on A")
            return json.load(open(result_file))

    # -- fine-tuning runs
    def run_dir(self, method, seed, lr_scale, split):
        key = fingerprint([], self.run_code, self.pretrain_key, method, seed, lr_scale, split, self.finetune_iters)
        name = f"{method}-seed{seed}-lr{lr_scale:g}-{split}-{key}"
        return os.path.join(cache_root(), f"runs-{self.pretrain_key}", name)

    def run_spec(self, method, seed, lr_scale, split):
        config = method_config(method)
        if not os.path.exists(config):
            raise SystemExit(f"no config for method {method!r}: expected {config}")
        weights = "" if method == "scratch" else self.base_weights
        opts = ["SEED", str(seed), "MODEL.WEIGHTS", weights, "DATASETS.TEST", f'("synthetic_B_{split}",)',
                *lr_opts(config, lr_scale), *self.extra]
        if self.finetune_iters:
            opts += ["SOLVER.MAX_ITER", str(self.finetune_iters), "SOLVER.STEPS", "()",
                     "SOLVER.WARMUP_ITERS", str(min(self.finetune_iters, 10))]
        return {"config": config, "opts": opts, "threads": 1, "eval": [f"synthetic_B_{split}"],
                "method": method, "seed": seed, "lr_scale": lr_scale, "split": split}

    def run_many(self, runs, progress=None):
        """Run (method, seed, lr_scale, split) tuples, `workers` at a time; returns their results in order.
        Finished runs are read from the cache."""
        todo = [r for r in runs if not os.path.exists(os.path.join(self.run_dir(*r), "result.json"))]
        progress = progress or Progress(len(todo), self.workers)
        if len(todo) < len(runs):
            print(f"{len(runs) - len(todo)} of {len(runs)} runs cached", flush=True)

        def one(r):
            t0 = time.perf_counter()
            run_child(self.run_spec(*r), self.run_dir(*r), self.data_root)
            res = load_result(self.run_dir(*r))
            progress.done(f"{r[0]} seed {r[1]} lr x{r[2]:g}: {r[3]} AP {res['AP']:.1f}", time.perf_counter() - t0)

        with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
            for f in [ex.submit(one, r) for r in todo]:
                f.result()
        return [load_result(self.run_dir(*r)) for r in runs]


def method_config(method: str) -> str:
    """The fine-tuning config of a method ("scratch" is full fine-tuning's config from random weights)."""
    return os.path.join(METHOD_CONFIGS, f"{'full_finetune' if method == 'scratch' else method}.yaml")


def lr_opts(config: str, scale: float) -> list[str]:
    """Config overrides that multiply every learning rate of `config` (SOLVER.BASE_LR and the non-zero
    MODEL.PEFT.OPTIM rates) by `scale`."""
    from peft_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config)
    opts = ["SOLVER.BASE_LR", repr(cfg.SOLVER.BASE_LR * scale)]
    for k in ("LORA_LR", "ADAPTER_LR", "HEAD_LR"):
        if cfg.MODEL.PEFT.OPTIM[k]:
            opts += [f"MODEL.PEFT.OPTIM.{k}", repr(cfg.MODEL.PEFT.OPTIM[k] * scale)]
    return opts


class Progress:
    """One line per finished run, with the elapsed time and an ETA from the measured pace."""

    def __init__(self, total, workers):
        self.total, self.workers, self.n, self.start, self.costs = total, workers, 0, time.perf_counter(), []

    def done(self, what, seconds):
        self.n += 1
        self.costs.append(seconds)
        left = (self.total - self.n) * statistics.mean(self.costs) / self.workers
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed / 60:5.1f} min, ETA {left / 60:4.1f} min] {self.n}/{self.total} {what} ({seconds:.0f} s)",
              flush=True)


def run_child(spec, out_dir, data_root, progress_label=None):
    """tools/train_net.py (then evaluation) in a child process writing into a temporary folder that becomes
    `out_dir` only when everything succeeded."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    spec = dict(spec, out_dir=tmp)
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    env = dict(os.environ, DETECTRON2_DATASETS=data_root, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", os.path.join(tmp, "spec.json")]
    with open(os.path.join(tmp, "child.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        t0 = time.perf_counter()
        while proc.poll() is None:
            time.sleep(1)
            if progress_label and time.perf_counter() - t0 > 30:
                t0 = time.perf_counter()
                _print_iteration(progress_label, tmp)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({spec['config']}); see {os.path.join(tmp, 'child.log')}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _print_iteration(label, out_dir):
    """'pretraining on A: iteration 1200/4000, ETA 8.4 min' from the run's metrics.json."""
    try:
        rows = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.json"))]
        spec = json.load(open(os.path.join(out_dir, "spec.json")))
        cfg = json.load(open(os.path.join(out_dir, "max_iter.json")))
    except (OSError, ValueError):
        return
    if not rows:  # the run has not logged an iteration yet
        return
    it = rows[-1]["iteration"] + 1
    times = [r["time"] for r in rows if "time" in r]
    eta = (cfg["max_iter"] - it) * statistics.median(times) / 60 if times else float("nan")
    ap = [f"{r['iteration'] + 1}: {r['segm/AP']:.1f}" for r in rows if "segm/AP" in r]
    print(f"  {label} ({spec['config'].split('/')[-1]}): iteration {it}/{cfg['max_iter']}, ETA {eta:.1f} min"
          + (f"; A val AP at {', '.join(ap)}" if ap else ""), flush=True)


def load_result(run_dir):
    return json.load(open(os.path.join(run_dir, "result.json")))


# ----------------------------------------------------------------------------------------------- the child


def child(spec_file):
    """Train with tools/train_net.py in this process, evaluate the trained model on spec['eval'], and write
    result.json (metrics, trainable parameters, step time, peak memory, checkpoint size)."""
    import resource

    import torch
    import train_net
    from detectron2.engine import default_argument_parser

    spec = json.load(open(spec_file))
    torch.set_num_threads(spec["threads"])
    out = spec["out_dir"]
    args = default_argument_parser().parse_args(
        ["--config-file", spec["config"], "--num-gpus", "1", "OUTPUT_DIR", out,
         "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100000000", *spec["opts"]])
    cfg = train_net.setup(args)
    with open(os.path.join(out, "max_iter.json"), "w") as f:
        json.dump({"max_iter": cfg.SOLVER.MAX_ITER}, f)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    try:
        trainer.train()
        evals = trainer._last_eval_results  # DefaultTrainer's final evaluation on cfg.DATASETS.TEST (one dataset)
    except FloatingPointError as e:  # detectron2's "Loss became infinite or NaN": a result (0 AP), not a crash
        logging.getLogger(__name__).warning("run diverged: %s", e)
        evals = {"segm": {"AP": 0.0, "AP50": 0.0}, "diverged": str(e)}
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.json"))]
    model = train_net._unwrap(trainer.model)
    total = sum(p.numel() for p in model.parameters())
    report = next((r for r in rows if "peft/trainable_params" in r), None)
    trainable = int(report["peft/trainable_params"]) if report else total
    adapter = os.path.join(out, "adapter_final.safetensors")
    if os.path.exists(adapter):
        ckpt_bytes = os.path.getsize(adapter)
    else:  # what full fine-tuning must ship: the whole model's weights
        ckpt_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    times = [r["time"] for r in rows if "time" in r]
    name = spec["eval"][0]
    result = {k: spec.get(k) for k in ("method", "seed", "lr_scale", "split")}
    result.update({
        "dataset": name, "AP": evals["segm"]["AP"], "AP50": evals["segm"]["AP50"], "diverged": "diverged" in evals,
        "trainable": trainable, "total": total, "percent": 100.0 * trainable / total,
        "step_s": statistics.median(times) if times else None, "iterations": cfg.SOLVER.MAX_ITER,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checkpoint_mib": ckpt_bytes / 2**20,
        "curve": [{"iteration": r["iteration"] + 1, "AP": r["segm/AP"]} for r in rows if "segm/AP" in r],
    })
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


# ----------------------------------------------------------------------------------------------- report


def selected_lr_scales(path=BENCHMARK_JSON) -> dict:
    """The learning-rate scale the benchmark's rule chose for each method (empty before a benchmark exists)."""
    if not os.path.exists(path):
        return {}
    return json.load(open(path)).get("selected_lr_scale", {})


def summarise(results):
    """Per method: mean test AP with interval, paired difference to full fine-tuning, and the rest."""
    from peft_d2 import study

    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    ap = {m: {r["seed"]: r["AP"] for r in rs} for m, rs in by.items()}
    def mean_step(rs):
        steps = [r["step_s"] for r in rs if r["step_s"] is not None]
        return statistics.mean(steps) if steps else None

    full_step = mean_step(by.get("full_finetune", []))
    rows = []
    for m, rs in by.items():
        row = {"method": m, "seeds": sorted(ap[m]), "trainable": rs[0]["trainable"], "percent": rs[0]["percent"],
               "lr_scale": rs[0]["lr_scale"], "AP": study.interval(list(ap[m].values())),
               "AP50": statistics.mean(r["AP50"] for r in rs), "step_s": mean_step(rs),
               "checkpoint_mib": rs[0]["checkpoint_mib"], "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
        row["step_vs_full"] = row["step_s"] / full_step if full_step and row["step_s"] else None
        if "full_finetune" in ap and m != "full_finetune" and len(ap[m]) >= study.MIN_SEEDS:
            row["vs_full"] = study.paired(ap[m], ap["full_finetune"])
        rows.append(row)
    total = results[0]["total"]
    trainable = {m: rs[0]["trainable"] for m, rs in by.items()}
    return rows, study.checks(ap), study.verdicts(ap, trainable, total)


def table(rows, fmt="github"):
    from tabulate import tabulate

    body = []
    for r in rows:
        d = r.get("vs_full")
        body.append([r["method"], f"{r['trainable']:,}", f"{r['percent']:.2f}", f"{r['lr_scale']:g}", str(r["AP"]),
                     f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]" if d else "",
                     f"{r['AP50']:.1f}", f"{r['step_vs_full']:.2f}" if r["step_vs_full"] else "",
                     f"{r['checkpoint_mib']:.3f}"])
    headers = ["method", "trainable", "%", "lr x", "AP (95% CI)", "AP - full (paired 95% CI)", "AP50",
               "step / full", "file MiB"]
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)


def checks_and_verdicts_text(checks, verdicts):
    lines = ["Checks:"]
    lines += [f"  [{'pass' if ok else 'FAIL'}] {name}: {ev}" for name, ok, ev in checks]
    lines.append("Claims (rules: README, 'Decision rules'):")
    lines += [f"  {v.verdict.upper():12s} {v.claim}: {v.evidence}" for v in verdicts.values()]
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        half = r["AP"].half if r["AP"].half == r["AP"].half else 0.0
        ax.errorbar(r["percent"], r["AP"].mean, yerr=half, fmt="o", capsize=3)
        ax.annotate(r["method"], (r["percent"], r["AP"].mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("mask AP on B test (mean, 95% CI over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCORE_THRESHOLD = 0.3  # predictions drawn in the PNGs


def _panel(title, model, dicts, meta):
    """One column of images under a title: the ground truth (model None) or `model`'s predictions scoring above
    SCORE_THRESHOLD."""
    import cv2
    import numpy as np
    import torch
    from detectron2.structures import BitMasks
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image

    images = []
    for d in dicts:
        img = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        vis = Visualizer(img, meta, scale=2.0, instance_mode=ColorMode.IMAGE)
        if model is None:
            vis = vis.draw_dataset_dict(d)
        else:
            model.eval()
            with torch.no_grad():
                out = model([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()),
                              "height": img.shape[0], "width": img.shape[1]}])[0]["instances"].to("cpu")
            out = out[out.scores > SCORE_THRESHOLD]
            # Mask2Former predicts no boxes (all zero): box the masks, so each label sits on its object
            out.pred_boxes = BitMasks(out.pred_masks).get_bounding_boxes()
            vis = vis.draw_instance_predictions(out)
        images.append(vis.get_image())
    col = np.concatenate(images, axis=0)
    header = np.full((28, col.shape[1], 3), 255, np.uint8)
    cv2.putText(header, title, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, col], axis=0)


def _config(plan, path):
    import torch

    from peft_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(plan.extra)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def _first_run(plan, results, method, rank=0):
    """The run directory of `method`'s run of the rank-th lowest seed."""
    run = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])[rank]
    return plan.run_dir(method, run["seed"], run["lr_scale"], run["split"]), run["seed"]


def _load(plan, results, method, rank=0):
    """A model to predict with: "base" (the A-trained model) or `method`'s fine-tuned model (the lowest seed's
    run by default). Returns (model, the dataset name whose metadata its classes follow)."""
    from detectron2.modeling import build_model

    from peft_d2.build import build_base_model
    from peft_d2.checkpoint import inject_from_checkpoint
    from peft_d2.engine import PeftCheckpointer

    if method == "base":
        model = build_model(_config(plan, PRETRAIN_CONFIG))
        PeftCheckpointer(model).load(plan.base_weights)
        return model, "synthetic_A_train"
    run_dir, _ = _first_run(plan, results, method, rank)
    cfg = _config(plan, method_config(method))
    if cfg.MODEL.META_ARCHITECTURE == "PEFT":
        model = build_base_model(cfg)
        PeftCheckpointer(model).load(plan.base_weights)
        inject_from_checkpoint(model, os.path.join(run_dir, "adapter_final.safetensors"))
    else:
        model = build_model(cfg)
        PeftCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    return model, "synthetic_B_test"


def _register(plan):
    from peft_d2.data import register_all_datasets

    os.environ["DETECTRON2_DATASETS"] = plan.data_root
    register_all_datasets()


def predictions_png(plan, results, rows, path, num_images=3):
    """The same B test images: ground truth, the base (its A classes), full fine-tuning and the best PEFT
    method (highest mean test AP), each run of the lowest seed; and beside it base_A_val.png, the base's
    predictions on A val images (the domain it was trained on)."""
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    import peft_d2.modeling  # noqa: F401
    from peft_d2 import study

    _register(plan)
    peft_rows = [r for r in rows if r["method"] not in study.BASELINES]
    if "full_finetune" not in {r["method"] for r in rows} or not peft_rows:
        return None
    best = max(peft_rows, key=lambda r: r["AP"].mean)["method"]
    dicts = DatasetCatalog.get("synthetic_B_test")[:num_images]
    columns = [("ground truth", None), ("base (trained on A)", "base"), ("full fine-tuning", "full_finetune"),
               (f"best PEFT: {best}", best)]
    panels = []
    for title, method in columns:
        model, meta_name = _load(plan, results, method) if method else (None, "synthetic_B_test")
        panels.append(_panel(title, model, dicts, MetadataCatalog.get(meta_name)))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    base, _ = _load(plan, results, "base")
    a_val = DatasetCatalog.get("synthetic_A_val")[:num_images]
    meta = MetadataCatalog.get("synthetic_A_val")
    panels = [_panel("ground truth (A val)", None, a_val, meta), _panel("base (trained on A)", base, a_val, meta)]
    Image.fromarray(np.concatenate(panels, axis=1)).save(os.path.join(os.path.dirname(path), "base_A_val.png"))
    return best


def serve_adapters(plan, results, num_images=4):
    """The last step: the B adapter files of two PEFT methods (or, with one servable, of its two lowest seeds)
    served from one base in one batch (peft_d2.load_adapters), images alternating between them, against each
    file's own single-adapter model. Returns a dict of what was compared, or None when fewer than two adapter
    files can be served (peft_d2.multi.ROUTABLE_METHODS)."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog
    from PIL import Image

    import peft_d2
    import peft_d2.modeling  # noqa: F401
    from peft_d2 import study
    from peft_d2.build import build_base_model
    from peft_d2.engine import PeftCheckpointer
    from peft_d2.multi import ROUTABLE_METHODS

    _register(plan)
    servable = []
    for method in dict.fromkeys(r["method"] for r in results if r["method"] not in study.BASELINES):
        cfg = _config(plan, method_config(method))
        if cfg.MODEL.META_ARCHITECTURE == "PEFT" and set(cfg.MODEL.PEFT.METHODS) <= set(ROUTABLE_METHODS):
            servable.append(method)
    if len(servable) >= 2:
        chosen = [(servable[0], 0), (servable[1], 0)]
    elif servable and len({r["seed"] for r in results if r["method"] == servable[0]}) >= 2:
        chosen = [(servable[0], 0), (servable[0], 1)]
    else:
        return None
    files = {}
    for method, rank in chosen:
        run_dir, seed = _first_run(plan, results, method, rank)
        files[f"{method} (seed {seed})"] = os.path.join(run_dir, "adapter_final.safetensors")
    names = list(files)
    model = build_base_model(_config(plan, method_config(chosen[0][0])))
    PeftCheckpointer(model).load(plan.base_weights)
    peft_d2.load_adapters(model, files)
    model.eval()
    batch = []
    for d in DatasetCatalog.get("synthetic_B_test")[:num_images]:
        img = torch.as_tensor(np.asarray(Image.open(d["file_name"]).convert("RGB")).transpose(2, 0, 1).copy())
        batch.append({"image": img, "height": img.shape[1], "width": img.shape[2]})
    routing = [names[i % 2] for i in range(len(batch))]
    with torch.no_grad():
        t0 = time.perf_counter()
        mixed = model([dict(x, adapter=a) for x, a in zip(batch, routing)])
        seconds = time.perf_counter() - t0
        single = {}
        for name, (method, rank) in zip(names, chosen):
            alone, _ = _load(plan, results, method, rank)
            single[name] = [r["instances"] for r in alone.eval()(batch)]
    score_diff, pixels, differ = 0.0, 0, 0
    for i, name in enumerate(routing):
        g, w = mixed[i]["instances"], single[name][i]
        score_diff = max(score_diff, (g.scores - w.scores).abs().max().item())
        differ += int((g.pred_classes != w.pred_classes).sum()) + int((g.pred_masks != w.pred_masks).sum())
        pixels += w.pred_masks.numel()
    # how far apart the two files' own predictions are: what a mix-up of adapters would show
    apart = max((a.scores - b.scores).abs().max().item() for a, b in zip(*single.values()))
    return {"adapters": names, "images": len(batch), "seconds": seconds, "max_score_diff": score_diff,
            "mask_pixels": pixels, "differing": differ, "equal": score_diff <= 1e-5 and differ == 0,
            "adapters_apart": apart}


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
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
    if args.child:
        return child(args.child)
    t0 = time.perf_counter()
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    print(f"[setup] data and models are cached under {cache_root()}", flush=True)
    plan = Plan(args.smoke, args.pretrain_iters, args.finetune_iters, args.workers)

    base = plan.pretrain()
    curve = ", ".join(f"{c['iteration']}: {c['AP']:.1f}" for c in base["curve"])
    print(f"\nbase model: mask AP {base['AP']:.1f} on A val ({plan.data['num_val']['A']} images) after "
          f"{base['iterations']} iterations (learning curve, iteration: AP = {curve})\n", flush=True)

    scales = selected_lr_scales(args.lr_scales_from)
    runs = [(m, s, float(scales.get(m, 1.0)), "test") for m in args.methods for s in args.seeds]
    print(f"fine-tuning on B: {len(args.methods)} methods x {len(args.seeds)} seeds, learning-rate scales "
          f"{ {m: float(scales.get(m, 1.0)) for m in args.methods} } "
          f"({'chosen by the benchmark on B val' if scales else 'default: no benchmark results found'})", flush=True)
    results = plan.run_many(runs)

    rows, checks, verdicts = summarise(results)
    text = table(rows)
    summary = checks_and_verdicts_text(checks, verdicts)
    print(f"\nmask AP on B test ({plan.data['num_test']['B']} images), mean and 95% interval over seeds "
          f"{args.seeds}\n{text}\n\n{summary}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"base": base, "runs": results}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{text}\n\n```\n{summary}\n```\n")
    plot(rows, os.path.join(out, "ap_vs_params.png"), "Fine-tuning the domain-A model on domain B")
    with open(os.path.join(out, "predictions.log"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        logging.disable(logging.WARNING)  # detectron2's notes about the re-initialised class head
        try:
            best = predictions_png(plan, results, rows, os.path.join(out, "predictions.png"))
        finally:
            logging.disable(logging.NOTSET)
    with open(os.path.join(out, "predictions.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        logging.disable(logging.WARNING)
        try:
            served = serve_adapters(plan, results)
        finally:
            logging.disable(logging.NOTSET)
    if served:
        print(f"\nserving: one base, one batch of {served['images']} B test images alternating between the adapter "
              f"files of {' and '.join(served['adapters'])} ({served['seconds']:.1f} s): predictions "
              + ("equal" if served["equal"] else "DIFFER FROM")
              + f" each file's own model (max |score difference| {served['max_score_diff']:.1e}, "
              f"{served['differing']} of {served['mask_pixels']} mask pixels and classes differ; the two files' own "
              f"predictions differ by up to {served['adapters_apart']:.2f} in score)", flush=True)
    print("\nwrote results.json, results.md, ap_vs_params.png"
          + (f", predictions.png (base, full fine-tuning, {best}), base_A_val.png" if best else "")
          + f" in {out}; done in {(time.perf_counter() - t0) / 60:.1f} min")
    return {"base": base, "rows": rows, "checks": checks, "verdicts": verdicts, "served": served}


if __name__ == "__main__":
    main()
