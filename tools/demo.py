"""The README's main job: a synthetic domain-transfer benchmark that tells the whole peft_d2 story.

    python tools/demo.py                          # default method subset, about 10 minutes on 2 CPU cores
    python tools/demo.py --methods all            # every PEFT config of configs/synthetic/peft/
    python tools/demo.py --seed 1 --output output/demo_seed1

1. generates the two-domain synthetic dataset (datasets/prepare_synthetic.py) under $DETECTRON2_DATASETS;
2. pretrains a micro Mask2Former (reduced Swin) on domain A (cached in <output>/pretrain_A);
3. fine-tunes it on the shifted domain B with full fine-tuning, the baselines and the PEFT methods
   (configs/synthetic/peft/<method>.yaml), each through tools/train_net.py in its own process;
4. evaluates mask AP / AP50 (COCOEvaluator) and mIoU (background + classes) on B's validation split;
5. prints and writes the comparison (results.json, results.md), plots AP against trainable % (ap_vs_params.png)
   and saves prediction visualisations (vis_<method>_<image>.png).
Every stage is cached: a second run reuses the data, the pretrained model and each finished method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecation notes about detectron2's code

DEFAULT_METHODS = ["full_finetune", "baseline_heads_only", "baseline_whole_head", "lora_backbone",
                   "lora_msdeformattn", "adapters_1", "adapters_2", "adapters_3"]
ALL_METHODS = DEFAULT_METHODS + ["baseline_decoder_only", "lora_adapters", "prefix", "mopeft", "cobot_lora",
                                  "cobot_adapter", "sfa"]
CONFIGS = os.path.join(ROOT, "configs", "synthetic")

# the child process: tools/train_net.py, then its peak memory (RSS on CPU, allocator peak on CUDA)
CHILD = """
import json, resource, runpy, sys
sys.argv = ["train_net.py", *sys.argv[2:]]
try:
    runpy.run_path({train_net!r}, run_name="__main__")
finally:
    import torch
    peak = {{"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
    if torch.cuda.is_available():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    json.dump(peak, open({peak_file!r}, "w"))
"""


class Progress:
    """One line per step, with the elapsed time and an ETA from the planned step costs."""

    def __init__(self, plan):
        self.plan, self.done, self.start = plan, 0.0, time.perf_counter()

    def step(self, name, key, cached=False):
        """Announce the step `key` of the plan; a cached step costs nothing."""
        if cached:
            self.plan[key] = 0
            name += " (cached)"
        cost = self.plan[key]
        elapsed = time.perf_counter() - self.start
        remaining = sum(self.plan.values()) - self.done
        speed = elapsed / self.done if self.done > 30 else 1.0  # calibrate the plan once it means something
        print(f"[{elapsed / 60:5.1f} min, ETA {remaining * speed / 60:.1f} min] {name}", flush=True)
        self.done += cost


def run_train(config, out_dir, opts, log_name="log.txt"):
    """tools/train_net.py in a child process; returns its peak memory. Output goes to <out_dir>/log.txt."""
    os.makedirs(out_dir, exist_ok=True)
    peak_file = os.path.join(out_dir, "peak_memory.json")
    code = CHILD.format(train_net=os.path.join(ROOT, "tools", "train_net.py"), peak_file=peak_file)
    cmd = [sys.executable, "-c", code, "-", "--config-file", config, "--num-gpus", "1", "OUTPUT_DIR", out_dir, *opts]
    with open(os.path.join(out_dir, log_name), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({config}); see {os.path.join(out_dir, log_name)}")
    return json.load(open(peak_file))


def step_time(out_dir):
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.json"))]
    times = [r["time"] for r in rows if "time" in r]
    return statistics.median(times) if times else float("nan")


def evaluate(method_dir, config, weights, adapter, vis_dir=None, vis_images=3):
    """Mask AP / AP50 and mIoU on synthetic_B_val; optional visualisations. Runs in this process."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model
    from PIL import Image

    import peft_d2.modeling  # noqa: F401
    from peft_d2.build import build_base_model
    from peft_d2.checkpoint import inject_from_checkpoint
    from peft_d2.config import get_cfg
    from peft_d2.data import register_all_datasets
    from peft_d2.engine import PeftCheckpointer

    register_all_datasets()
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    peft = cfg.MODEL.META_ARCHITECTURE == "PEFT"
    # the base, then the adapter file (which carries the method config and, for SFA, its selection)
    model = build_base_model(cfg) if peft else build_model(cfg)
    PeftCheckpointer(model).load(weights)
    base_params = sum(p.numel() for p in model.parameters())
    if peft:
        inject_from_checkpoint(model, adapter)
    model.eval()
    name = "synthetic_B_val"
    loader = build_detection_test_loader(cfg, name)
    coco = COCOEvaluator(name, tasks=("segm",), output_dir=os.path.join(method_dir, "inference"),
                         use_fast_impl=False)
    labels = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get("synthetic_B_sem_seg_val")}
    miou = MeanIoU(len(MetadataCatalog.get(name).thing_classes), labels)
    with torch.no_grad():
        res = inference_on_dataset(model, loader, _Both(coco, miou))
    if vis_dir:
        from detectron2.utils.visualizer import ColorMode, Visualizer

        meta = MetadataCatalog.get(name)
        for d in DatasetCatalog.get(name)[:vis_images]:
            img = np.asarray(Image.open(d["file_name"]).convert("RGB"))
            with torch.no_grad():
                out = model([{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()).float(),
                              "height": img.shape[0], "width": img.shape[1]}])[0]
            inst = out["instances"].to("cpu")
            inst = inst[inst.scores.argsort(descending=True)[:6]]  # the most confident few, labelled with scores
            inst = inst[inst.scores > 0.05]
            vis = Visualizer(img, meta, scale=2.0, instance_mode=ColorMode.IMAGE).draw_instance_predictions(inst)
            base = os.path.splitext(os.path.basename(d["file_name"]))[0]
            vis.save(os.path.join(vis_dir, f"vis_{os.path.basename(method_dir)}_{base}.png"))
    return {"AP": res["segm"]["AP"], "AP50": res["segm"]["AP50"], "mIoU": res["miou"], "base_params": base_params}


class MeanIoU:
    """mIoU over background + thing classes: a pixel's prediction is the arg-max class of the semantic
    output (+1), or background (0) where no class reaches 0.5; ground truth from the dataset's semantic
    label PNGs (0 = background, k = k-th class)."""

    def __init__(self, num_classes, label_files):
        import numpy as np

        self.n, self.labels = num_classes + 1, label_files
        self.conf = np.zeros((self.n, self.n), dtype=np.int64)

    def reset(self):
        self.conf[:] = 0

    def process(self, inputs, outputs):
        import numpy as np
        from PIL import Image

        for inp, out in zip(inputs, outputs):
            score, cls = out["sem_seg"].cpu().max(0)
            pred = np.where(score.numpy() >= 0.5, cls.numpy() + 1, 0)
            gt = np.asarray(Image.open(self.labels[inp["file_name"]]), dtype=np.int64)
            keep = gt != 255
            gt, pred = gt[keep], pred[keep]
            self.conf += np.bincount(self.n * gt.ravel() + pred.ravel(), minlength=self.n**2).reshape(self.n, -1)

    def evaluate(self):
        import numpy as np

        inter = np.diag(self.conf)
        union = self.conf.sum(0) + self.conf.sum(1) - inter
        valid = union > 0
        return {"miou": float(100 * (inter[valid] / union[valid]).mean())}


class _Both:
    def __init__(self, coco, miou):
        self.parts = (coco, miou)

    def reset(self):
        for p in self.parts:
            p.reset()

    def process(self, inputs, outputs):
        for p in self.parts:
            p.process(inputs, outputs)

    def evaluate(self):
        res = dict(self.parts[0].evaluate())
        res.update(self.parts[1].evaluate())
        return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help=f"'all' or any of {ALL_METHODS}")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--pretrain-iters", type=int, default=600)
    parser.add_argument("--finetune-iters", type=int, default=150)
    parser.add_argument("--num-train-a", type=int, default=256)
    parser.add_argument("--num-train-b", type=int, default=32)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (the data are fixed)")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = ALL_METHODS if args.methods == ["all"] else args.methods
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {ALL_METHODS} or 'all'")
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    data_root = os.environ["DETECTRON2_DATASETS"]
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)

    # planned seconds per stage on 2 CPU cores (calibrated against the measured pace as the run goes)
    plan = {"data": 10, "pretrain": args.pretrain_iters * 0.3 + 20,
            **{m: args.finetune_iters * 0.25 + 25 for m in methods}}
    progress = Progress(plan)

    # 1. data
    marker = os.path.join(data_root, "synthetic", f".demo-{args.num_train_a}-{args.num_train_b}-{args.num_val}")
    progress.step("generating the synthetic domains A and B", "data", os.path.exists(marker))
    if not os.path.exists(marker):
        from peft_d2.data.synthetic import generate_synthetic

        generate_synthetic(os.path.join(data_root, "synthetic"),
                           num_train={"A": args.num_train_a, "B": args.num_train_b}, num_val=args.num_val)
        open(marker, "w").close()

    # 2. pretrain on A
    common = ["DATALOADER.NUM_WORKERS", "1", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    pre_dir = os.path.join(out, f"pretrain_A_{args.pretrain_iters}_seed{args.pretrain_seed}")
    base_weights = os.path.join(pre_dir, "model_final.pth")
    progress.step(f"pretraining the micro Mask2Former on domain A ({args.pretrain_iters} iterations)", "pretrain",
                  os.path.exists(base_weights))
    if not os.path.exists(base_weights):
        run_train(os.path.join(CONFIGS, "maskformer2_swin_micro_bs4_A.yaml"), pre_dir,
                  [*common, "SEED", str(args.pretrain_seed), "SOLVER.MAX_ITER", str(args.pretrain_iters),
                   "SOLVER.STEPS", f"({int(args.pretrain_iters * 0.8)},)", "SOLVER.CHECKPOINT_PERIOD", "100000"])

    # 3-4. fine-tune on B and evaluate
    results = []
    for m in methods:
        config = os.path.join(CONFIGS, "peft", f"{m}.yaml")
        mdir = os.path.join(out, f"{m}_{args.finetune_iters}_seed{args.seed}")
        result_file = os.path.join(mdir, "result.json")
        progress.step(f"fine-tuning on domain B: {m}", m, os.path.exists(result_file))
        if os.path.exists(result_file):
            results.append(json.load(open(result_file)))
            continue
        peak = run_train(config, mdir, [*common, "SEED", str(args.seed), "MODEL.WEIGHTS", base_weights,
                                        "SOLVER.MAX_ITER", str(args.finetune_iters), "SOLVER.STEPS", "()",
                                        "SOLVER.CHECKPOINT_PERIOD", "100000"])
        adapter = os.path.join(mdir, "adapter_final.safetensors")
        peft = os.path.exists(adapter)
        with (open(os.path.join(mdir, "eval_log.txt"), "w") as log, contextlib.redirect_stdout(log),
              contextlib.redirect_stderr(log)):
            metrics = evaluate(mdir, config, base_weights if peft else os.path.join(mdir, "model_final.pth"),
                               adapter if peft else None, vis_dir=out)
        rows = [json.loads(x) for x in open(os.path.join(mdir, "metrics.json"))]
        report = next((r for r in rows if "peft/trainable_params" in r), None)
        total = metrics.pop("base_params")
        trainable = report["peft/trainable_params"] if report else total
        ckpt = adapter if peft else os.path.join(mdir, "model_final.pth")
        result = {"method": m, "trainable": int(trainable), "percent": 100.0 * trainable / total, **metrics,
                  "step_s": step_time(mdir), "peak_rss_mib": peak["rss_mib"], "peak_cuda_mib": peak.get("cuda_mib"),
                  "checkpoint_mib": os.path.getsize(ckpt) / 2**20}
        json.dump(result, open(result_file, "w"), indent=1)
        results.append(result)

    # 5. report
    write_report(results, out)
    print(f"\ndone in {(time.perf_counter() - progress.start) / 60:.1f} min; outputs in {out}")
    return results


def write_report(results, out):
    from tabulate import tabulate

    full = next((r for r in results if r["method"] == "full_finetune"), None)
    rows = []
    for r in results:
        rel = f"{r['step_s'] / full['step_s']:.2f}" if full else ""
        rows.append([r["method"], f"{r['trainable']:,}", f"{r['percent']:.2f}", f"{r['AP']:.1f}", f"{r['AP50']:.1f}",
                     f"{r['mIoU']:.1f}", f"{1000 * r['step_s']:.0f}", rel, f"{r['peak_rss_mib']:.0f}",
                     f"{r['checkpoint_mib']:.3f}"])
    headers = ["method", "trainable", "%", "AP", "AP50", "mIoU", "step ms", "step / full", "peak RSS MiB",
               "checkpoint MiB"]
    print()
    print(tabulate(rows, headers=headers))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(tabulate(rows, headers=headers, tablefmt="github") + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r["percent"], r["AP"], s=40)
        ax.annotate(r["method"], (r["percent"], r["AP"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("mask AP on domain B (val)")
    ax.set_title("Fine-tuning the domain-A model on domain B")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ap_vs_params.png"), dpi=120)


if __name__ == "__main__":
    main()
