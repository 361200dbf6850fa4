"""What a study reports, from the raw per-run results only: the table (mean AP with 95% intervals, paired
differences to full fine-tuning), the checks and verdicts (rules.py), the page and plot, the pictures of
predictions, and the serving check (several adapter files on one base in one batch)."""

from __future__ import annotations

import json
import os
import statistics
import time

from . import adopt
from . import rules as study
from .cache import ROOT
from .engine import curve_text
from .studies import synthetic

__all__ = ["summarise", "table", "checks_and_verdicts_text", "plot", "predictions_png", "serve_adapters",
           "write_page", "edge_note", "SCORE_THRESHOLD"]  # fmt: skip


def summarise(results):
    """Per method: mean test AP with interval, paired difference to full fine-tuning, and the rest."""
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


def plot(rows, path, title, target="B"):
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
    ax.set_ylabel(f"mask AP on {target} test (mean, 95% CI over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCORE_THRESHOLD = 0.3  # predictions drawn in the PNGs


def _read(d):
    """A dataset dict's image: (H, W, 3) uint8 RGB, and the model's input for it."""
    import numpy as np
    import torch
    from PIL import Image

    img = np.asarray(Image.open(d["file_name"]).convert("RGB"))
    return img, {"image": torch.as_tensor(img.transpose(2, 0, 1).copy()), "height": img.shape[0],
                 "width": img.shape[1]}


def _panel(title, model, dicts, meta):
    """One column of images under a title: the ground truth (model None) or `model`'s predictions scoring above
    SCORE_THRESHOLD."""
    import cv2
    import numpy as np
    import torch
    from detectron2.utils.visualizer import ColorMode, Visualizer

    images = []
    for d in dicts:
        img, inputs = _read(d)
        vis = Visualizer(img, meta, scale=2.0, instance_mode=ColorMode.IMAGE)
        if model is None:
            vis = vis.draw_dataset_dict(d)
        else:
            model.eval()
            with torch.no_grad():
                out = model([inputs])[0]["instances"].to("cpu")
            out = out[out.scores > SCORE_THRESHOLD]  # its boxes are the masks' extents: labels sit on objects
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

    s = plan.study
    if method == "base":
        model = build_model(_config(plan, os.path.join(ROOT, s.pretrain_config)))
        PeftCheckpointer(model).load(plan.base_weights)
        return model, s.datasets["source_train"]
    run_dir, _ = _first_run(plan, results, method, rank)
    cfg = _config(plan, s.method_config(method))
    if cfg.MODEL.META_ARCHITECTURE == "PEFT":
        model = build_base_model(cfg)
        PeftCheckpointer(model).load(plan.base_weights)
        inject_from_checkpoint(model, os.path.join(run_dir, "adapter_final.safetensors"))
    else:
        model = build_model(cfg)
        PeftCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    return model, s.datasets["target_test"]


def _pictured(dataset: str, num_images: int) -> list[dict]:
    """`num_images` dataset dicts with at least one object, spread evenly over the dataset (deterministic)."""
    from detectron2.data import DatasetCatalog

    dicts = [d for d in DatasetCatalog.get(dataset) if any(not a.get("iscrowd", 0) for a in d["annotations"])]
    step = max(len(dicts) / num_images, 1.0)
    return [dicts[int(i * step)] for i in range(min(num_images, len(dicts)))]


def _register(plan):
    from peft_d2.data import register_all_datasets

    os.environ["DETECTRON2_DATASETS"] = plan.data_root
    register_all_datasets()


def predictions_png(plan, results, rows, path, num_images=3, base_path=None):
    """The same target test images: ground truth, the base (its source classes), full fine-tuning and the best
    PEFT method (highest mean test AP), each run of the lowest seed; and in `base_path` (default: beside it,
    base_<source>_val.png) the base's predictions on source val images (the domain it was trained on)."""
    import numpy as np
    from detectron2.data import MetadataCatalog
    from PIL import Image

    import peft_d2.modeling  # noqa: F401

    _register(plan)
    s = plan.study
    peft_rows = [r for r in rows if r["method"] not in study.BASELINES]
    if "full_finetune" not in {r["method"] for r in rows} or not peft_rows:
        return None
    best = max(peft_rows, key=lambda r: r["AP"].mean)["method"]
    dicts = _pictured(s.datasets["target_test"], num_images)
    columns = [("ground truth", None), (f"base (trained on {s.source})", "base"), ("full fine-tuning", "full_finetune"),
               (f"best PEFT: {best}", best)]
    panels = []
    for title, method in columns:
        model, meta_name = _load(plan, results, method) if method else (None, s.datasets["target_test"])
        panels.append(_panel(title, model, dicts, MetadataCatalog.get(meta_name)))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    base, _ = _load(plan, results, "base")
    src_val = _pictured(s.datasets["source_val"], num_images)
    meta = MetadataCatalog.get(s.datasets["source_val"])
    panels = [_panel(f"ground truth ({s.source} val)", None, src_val, meta),
              _panel(f"base (trained on {s.source})", base, src_val, meta)]  # fmt: skip
    base_path = base_path or os.path.join(os.path.dirname(path), f"base_{s.source}_val.png")
    Image.fromarray(np.concatenate(panels, axis=1)).save(base_path)
    return best


def serve_adapters(plan, results, num_images=4):
    """The last step: the B adapter files of two PEFT methods (or, with one servable, of its two lowest seeds)
    served from one base in one batch (peft_d2.load_adapters), images alternating between them, against each
    file's own single-adapter model. Returns a dict of what was compared, or None when fewer than two adapter
    files can be served (peft_d2.multi.ROUTABLE_METHODS)."""
    import torch

    import peft_d2
    import peft_d2.modeling  # noqa: F401
    from peft_d2.build import build_base_model
    from peft_d2.engine import PeftCheckpointer
    from peft_d2.multi import ROUTABLE_METHODS

    _register(plan)
    servable = []
    for method in dict.fromkeys(r["method"] for r in results if r["method"] not in study.BASELINES):
        cfg = _config(plan, plan.study.method_config(method))
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
    model = build_base_model(_config(plan, plan.study.method_config(chosen[0][0])))
    PeftCheckpointer(model).load(plan.base_weights)
    peft_d2.load_adapters(model, files)
    model.eval()
    batch = [_read(d)[1] for d in _pictured(plan.study.datasets["target_test"], num_images)]
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


def serving_text(served: dict) -> str:
    """serve_adapters' result in one sentence."""
    return (f"one base, one batch of {served['images']} test images alternating between the adapter files of "
            f"{' and '.join(served['adapters'])} ({served['seconds']:.1f} s): predictions "
            + ("equal" if served["equal"] else "DIFFER FROM")
            + f" each file's own model (max |score difference| {served['max_score_diff']:.1e}, "
            f"{served['differing']} of {served['mask_pixels']} mask pixels and classes differ; the two files' own "
            f"predictions differ by up to {served['adapters_apart']:.2f} in score)")  # fmt: skip


def write_page(raw, out_prefix):
    """docs page + plot from the raw results (nothing else goes into them). raw["study"] names the study, its
    domains and split sizes (raw results written before it existed are the synthetic study's). The page names its
    files by out_prefix, so an archived copy (docs/<page>_5seeds) links its own plot and raw JSON."""
    info = raw.get("study") or synthetic().info()
    page = os.path.basename(out_prefix)
    src, tgt, sizes = info["source"], info["target"], info["sizes"]
    runs = [r for r in raw["runs"] if r["split"] == "test"]
    rows, checks, verdicts = summarise(runs)
    text = table(rows)
    sel = raw["selection"]
    tried = sorted({r["lr_scale"] for r in sel})
    sel_rows = "\n".join(
        f"| {m} | " + " | ".join(
            next((f"{r['AP']:.1f}" for r in sel if r["method"] == m and r["lr_scale"] == s), "")
            for s in tried) + f" | {raw['selected_lr_scale'][m]:g} |"
        for m in raw["methods"])
    base = raw["base"]
    curve = curve_text(base["curve"])
    lines = [
        f"# {info['title']}",
        "",
        f"Generated by `tools/benchmark_peft.py` from `docs/{page}.json` (the raw result of every run);",
        "do not edit by hand. The protocol is in the tool's docstring, the decision rules in the README.",
        "",
        f"- command: `{raw['command']}`",
        f"- date: {raw['date']}; machine: {raw['machine']}"
        + (f" (deformable attention: the {OPERATORS[raw['operator']]})" if "operator" in raw else "")
        + f"; duration: {raw['duration_min']:.0f} min"
        + wall_text(raw),
        f"- commit: {raw['commit']}" + adopted_text(raw),
        f"- data: {json.dumps(raw['data'])}",
        f"- base: mask AP **{base['AP']:.1f}** on {src} val ({sizes['source_val']}) after "
        f"{base['iterations']} iterations; learning curve (iteration: AP) {curve}",
        f"- fine-tuning: {runs[0]['iterations']} iterations for every method; learning-rate scales "
        f"{list(raw['lr_scales'])} x each config's rates, extended along {raw.get('lr_ladder', '(no ladder)')} "
        f"where the best sat at an edge (at most {raw.get('max_extensions', 0)} times), chosen on {tgt} val with "
        f"seed {raw['selection_seed']}; "
        f"reported on {tgt} test ({sizes['target_test']}) over seeds {raw['seeds']}",
        "",
        f"## Results on {tgt} test",
        "",
        f"Mean mask AP with its 95% t interval over the {len(raw['seeds'])} seeds; the paired difference to full "
        "fine-tuning is taken seed by seed. `step / full` is the training step time against full fine-tuning "
        "(CPU, two runs side by side); `file MiB` is what must be shipped: the adapter file, or the whole "
        "model's weights for full fine-tuning and scratch.",
        "",
        text,
        "",
        f"![AP against trainable parameters]({page}.png)",
        "",
        "## Checks",
        "",
        *[f"- **{'pass' if ok else 'FAIL'}**: {name}. {ev}" for name, ok, ev in checks],
        "",
        "## Verdicts",
        "",
        "| claim | verdict | rule | evidence |",
        "|---|---|---|---|",
        *[f"| {v.claim} | **{v.verdict}** | {v.rule} | {v.evidence} |" for v in verdicts.values()],
        "",
        f"## Learning-rate selection ({tgt} val AP, selection seed)",
        "",
        "| method | " + " | ".join(f"x{s:g}" for s in tried) + " | chosen |",
        "|---|" + "---|" * (len(tried) + 1),
        sel_rows,
        "",
        edge_note(raw),
        "",
    ]
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(lines))
    plot(rows, out_prefix + ".png", f"{info['title']} ({len(raw['seeds'])} paired seeds)", tgt)
    return text, checks, verdicts


def wall_text(raw) -> str:
    """What the study's parts took (their wall-clock times, measured over resumptions; results written before
    runs measured them have none): the invocation's duration covers only what it did not find cached."""
    runs = [r for r in raw["selection"] + raw["runs"] if "wall_s" in r]
    parts = []
    if "wall_s" in raw["base"]:
        parts.append(f"the base's pretraining {raw['base']['wall_s'] / 60:.0f} min")
    if runs:
        workers = raw.get("workers", 1)
        parts.append(f"{len(runs)} fine-tuning runs {sum(r['wall_s'] for r in runs) / 60:.0f} min of run time "
                     f"({workers} at a time)")
    return f" (in the last invocation, which reused what was cached; in all: {', '.join(parts)})" if parts else ""


OPERATORS = {"cpu": "compiled CPU kernel", "cuda": "compiled CUDA kernel", "reference": "PyTorch reference"}


def adopted_text(raw) -> str:
    """What of the study the commit's code reused from folders that older code made (adopt.py)."""
    runs = raw["selection"] + raw["runs"]
    n = sum("adopted" in r for r in runs)
    parts = (["the base"] if "adopted" in raw["base"] else []) + ([f"{n} of {len(runs)} runs"] if n else [])
    if not parts:
        return ""
    return (f"; {' and '.join(parts)} made by older code, adopted after this code replayed "
            f"{adopt.REPLAY_ITERS} iterations of each (one run per method) and re-evaluated its weights with equal "
            "results (peft_d2/study/adopt.py)")


def edge_note(raw) -> str:
    """Names the methods whose chosen scale is still the largest or smallest one tried: their optimum may lie
    outside the searched range, which the reader must know."""
    tried = {}
    for r in raw["selection"]:
        tried.setdefault(r["method"], set()).add(r["lr_scale"])
    edge = [f"{m} (x{c:g})" for m, c in raw["selected_lr_scale"].items() if c in (min(tried[m]), max(tried[m]))]
    text = ("Every chosen scale lies inside the range searched for its method." if not edge else
            "Chosen at the edge of the range searched (the best learning rate may lie beyond it): "
            + ", ".join(edge) + ".")
    diverged = [f"{r['method']} x{r['lr_scale']:g} seed {r['seed']} ({r['split']})"
                for r in raw["selection"] + raw["runs"] if r.get("diverged")]
    return text + (" Diverged (scored 0 AP): " + ", ".join(diverged) + "." if diverged else "")
