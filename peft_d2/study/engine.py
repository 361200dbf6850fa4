"""How a study runs: its data and base are made once per machine (cached, keyed by what made them); each
fine-tuning run is tools/train_net.py in a child process, its result cached; the learning-rate search is one
rule for every method. What older code made is reused where the current code replays it identically (adopt.py).

The protocol's learning-rate search: every learning rate of a method's config multiplied by a scale from
LR_LADDER, starting with LR_SCALES. One run per scale with SELECTION_SEED, scored on the target's val split; the
scale with the highest val AP wins (ties: the smaller scale). When the winner is the largest (smallest) scale
tried, the next rung of the ladder above (below) is run too, up to MAX_EXTENSIONS times, so that the winner lies
inside the searched range wherever the ladder allows. A run whose loss diverges scores 0 AP.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time

from . import adopt
from .cache import ROOT, Lock, cache_root, fingerprint
from .studies import Study

__all__ = ["Plan", "Progress", "WallClock", "run_child", "lr_opts", "learning_curve", "curve_text", "choose",
           "extensions", "select", "LR_SCALES", "LR_LADDER", "MAX_EXTENSIONS", "SELECTION_SEED"]  # fmt: skip

LR_SCALES = (0.3, 1.0, 3.0)  # the starting grid
LR_LADDER = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # where the search may go
MAX_EXTENSIONS = 2
SELECTION_SEED = 100


class Plan:
    """Where a study's stages live and how each is run: one object shared by the demo and the benchmark."""

    def __init__(self, study: Study, pretrain_iters=None, finetune_iters=None, workers=2, adopt=True):
        self.study = study
        self.adopt = adopt  # reuse a base or runs of older code that replay identically (adopt.py)
        self.replayed = {}  # method -> the adoption record of its replayed run (None: it did not match)
        self.data = study.data
        self.workers = workers
        self.data_root = study.prepare()
        self.extra = list(study.extra)
        self.pretrain_iters = pretrain_iters
        self.finetune_iters = finetune_iters
        self.home = os.path.join(cache_root(), study.name)
        # the deformable-attention operator the children will run (compiled kernel or reference): their numbers
        # differ in the last bits, so it is part of every key (a clone without the build makes its own runs)
        self.operator = operator_backend()
        self.pretrain_key = fingerprint(study.pretrain_code, self.data, self.extra, pretrain_iters, self.operator)
        self.pretrain_dir = os.path.join(self.home, f"pretrain-{self.pretrain_key}")
        self.base_weights = os.path.join(self.pretrain_dir, "model_final.pth")
        self.run_code = fingerprint(study.run_code, self.operator)

    # -- the base model
    def pretrain(self):
        """Pretrain on the source domain (cached; resumed from its last checkpoint where the study says so).
        Returns the base's result: its final source val AP and its learning curve."""
        s = self.study
        result_file = os.path.join(self.pretrain_dir, "result.json")
        with Lock(self.pretrain_dir + ".lock"):
            if os.path.exists(result_file):
                return json.load(open(result_file))
            spec = self.pretrain_spec()
            cached = [d for d in self._finished("pretrain-") if adopt.same_spec(spec, _spec_of(d))]
            if self._adopt(spec, self.pretrain_dir, cached, f"the base pretrained on {s.source}"):
                return json.load(open(result_file))
            run_child(spec, self.pretrain_dir, self.data_root, progress_label=f"pretraining on {s.source}")
            return json.load(open(result_file))

    def pretrain_spec(self):
        s = self.study
        opts = ["DATASETS.TRAIN", f'("{s.datasets["source_train"]}",)',
                "DATASETS.TEST", f'("{s.datasets["source_val"]}",)', *self.extra]  # fmt: skip
        if self.pretrain_iters:
            opts += ["SOLVER.MAX_ITER", str(self.pretrain_iters), "SOLVER.STEPS", "()",
                     "TEST.EVAL_PERIOD", str(max(self.pretrain_iters // 2, 1)),
                     "SOLVER.WARMUP_ITERS", str(min(self.pretrain_iters, 10))]  # fmt: skip
        return {"config": os.path.join(ROOT, s.pretrain_config), "opts": opts, "threads": 2,
                "eval": [s.datasets["source_val"]], "resume": s.pretrain_resumable}  # fmt: skip

    # -- adopting what older code made (adopt.py)
    def _finished(self, prefix, folders=None):
        """Finished folders whose names start with `prefix` in `folders` (default: the study's cache), newest
        first."""
        out = []
        for parent in folders or [self.home]:
            if os.path.isdir(parent):
                out += [os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(prefix)
                        and os.path.exists(os.path.join(parent, d, "result.json"))]  # fmt: skip
        return sorted(out, key=lambda d: os.path.getmtime(os.path.join(d, "result.json")), reverse=True)

    def _adopt(self, spec, target_dir, cached_dirs, label) -> bool:
        """Adopt the first of `cached_dirs` (finished by older code, same spec) that the current code replays
        identically into `target_dir`; True when one was. Folders adopted from one origin are replayed once."""
        origins = set()
        for cached in cached_dirs if self.adopt else []:
            origin = os.path.realpath(os.path.join(cached, "metrics.json"))
            if origin in origins:
                continue
            origins.add(origin)
            record, why = self._replay(spec, target_dir, cached)
            if record:
                adopt.link_adopted(cached, target_dir, record)
                print(f"   {label}: adopted {os.path.basename(cached)}, made by older code (replayed "
                      f"{record['replayed_iterations']} iterations, largest relative difference "
                      f"{record['largest_difference']:.1e}; its weights evaluate to AP {record['AP']:.2f} as "
                      "recorded)", flush=True)  # fmt: skip
                return True
            print(f"   {label}: not adopting {os.path.basename(cached)}: {why}", flush=True)
        return False

    def _replay(self, spec, target_dir, cached):
        """adopt.check's verdict on one replay of `cached` by the current code."""
        replay_dir = target_dir + ".replay"
        shutil.rmtree(replay_dir + ".tmp", ignore_errors=True)  # a replay starts afresh, never resumes
        rspec = dict(spec, replay={"iters": adopt.REPLAY_ITERS, "weights": os.path.join(cached, "model_final.pth")})
        try:
            run_child(rspec, replay_dir, self.data_root)
            return adopt.check(replay_dir, cached)
        except SystemExit as e:  # the current code cannot even replay it
            return None, str(e)
        finally:
            shutil.rmtree(replay_dir, ignore_errors=True)

    def _run_folders(self):
        """The runs folders of this base and of the bases it was adopted from."""
        folders, d = [], self.pretrain_dir
        while d:
            folders.append(os.path.join(self.home, "runs-" + os.path.basename(d).split("-", 1)[1]))
            record = os.path.join(d, "adopted.json")
            d = json.load(open(record))["from"] if os.path.exists(record) else None
        return folders

    def adopt_runs(self, todo):
        """Adopts cached runs of older code for `todo`, a method at a time: one of its runs is replayed
        (adopt.py; once per plan and method); when it matches, every run of the method with a cached same-spec run
        is adopted. Returns the runs still to do."""
        if not self.adopt:
            return todo
        folders = self._run_folders()

        def candidates(r):
            spec = self.run_spec(*r)
            prefix = os.path.basename(self.run_dir(*r)).rsplit("-", 1)[0] + "-"
            return [d for d in self._finished(prefix, folders) if adopt.same_spec(spec, _spec_of(d))]

        def one(method):
            runs = [(r, c) for r in todo if r[0] == method for c in [candidates(r)] if c]
            if not runs:
                return set()
            done = set()
            if method not in self.replayed:  # a method is replayed once per plan
                (first, cached), runs = runs[0], runs[1:]
                record = os.path.join(self.run_dir(*first), "adopted.json")
                ok = self._adopt(self.run_spec(*first), self.run_dir(*first), cached, method)
                self.replayed[method] = json.load(open(record)) if ok else None
                done.add(first)
            replayed = self.replayed[method]
            if replayed is None:  # its replay did not match: none of its runs is adopted
                return set()
            for r, c in runs:
                record = dict(replayed, replayed_run=replayed["from"])
                adopt.link_adopted(c[0], self.run_dir(*r), dict(record, **{"from": os.path.realpath(c[0])}))
                done.add(r)
            print(f"   {method}: adopted {len(done)} cached run(s)", flush=True)
            return done

        with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
            done = set().union(*ex.map(one, sorted({r[0] for r in todo})))
        return [r for r in todo if r not in done]

    # -- fine-tuning runs
    def run_dir(self, method, seed, lr_scale, split):
        key = fingerprint([], self.run_code, self.pretrain_key, method, seed, lr_scale, split, self.finetune_iters)
        name = f"{method}-seed{seed}-lr{lr_scale:g}-{split}-{key}"
        return os.path.join(self.home, f"runs-{self.pretrain_key}", name)

    def run_spec(self, method, seed, lr_scale, split):
        s = self.study
        config = s.method_config(method)
        if not os.path.exists(config):
            raise SystemExit(f"no config for method {method!r}: expected {config}")
        weights = "" if method == "scratch" else self.base_weights
        opts = ["SEED", str(seed), "MODEL.WEIGHTS", weights, "DATASETS.TRAIN", f'("{s.datasets["target_train"]}",)',
                "DATASETS.TEST", f'("{s.dataset(split)}",)', *lr_opts(config, lr_scale), *self.extra]  # fmt: skip
        if self.finetune_iters:
            opts += ["SOLVER.MAX_ITER", str(self.finetune_iters), "SOLVER.STEPS", "()",
                     "SOLVER.WARMUP_ITERS", str(min(self.finetune_iters, 10))]  # fmt: skip
        return {"config": config, "opts": opts, "threads": 1, "eval": [s.dataset(split)],
                "method": method, "seed": seed, "lr_scale": lr_scale, "split": split}  # fmt: skip

    def run_many(self, runs, progress=None):
        """Run (method, seed, lr_scale, split) tuples, `workers` at a time; returns their results in order.
        Finished runs are read from the cache."""
        todo = [r for r in runs if not os.path.exists(os.path.join(self.run_dir(*r), "result.json"))]
        todo = self.adopt_runs(todo)
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
              flush=True)  # fmt: skip


def run_child(spec, out_dir, data_root, progress_label=None):
    """tools/train_net.py (then evaluation) in a child process writing into `out_dir`.tmp, which becomes
    `out_dir` only when everything succeeded. With spec["resume"], a run stopped half-way (the same spec, with a
    checkpoint) continues from its last checkpoint instead of starting again."""
    tmp = out_dir + ".tmp"
    spec_file = os.path.join(tmp, "spec.json")
    same = os.path.exists(spec_file) and json.load(open(spec_file)) == dict(spec, out_dir=tmp)
    if not (spec.get("resume") and same and os.path.exists(os.path.join(tmp, "last_checkpoint"))):
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, exist_ok=True)
    spec = dict(spec, out_dir=tmp)
    with open(spec_file, "w") as f:
        json.dump(spec, f, indent=1)
    env = dict(os.environ, DETECTRON2_DATASETS=data_root, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    cmd = [sys.executable, "-m", "peft_d2.study.engine", spec_file]
    line = ProgressLine(progress_label, tmp) if progress_label else None
    clock = WallClock(os.path.join(tmp, "wall_s.json"))
    with open(os.path.join(tmp, "child.log"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while proc.poll() is None:
            time.sleep(1)
            clock.tick()
            if line:
                line.update()
    if line:
        line.close()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({spec['config']}); see {os.path.join(tmp, 'child.log')}")
    result_file = os.path.join(tmp, "result.json")
    result = dict(json.load(open(result_file)), wall_s=clock.tick(force=True))
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


class WallClock:
    """The wall-clock seconds a run has taken over all its resumptions: kept in `path` (rewritten at most every
    `period` s, so a kill loses at most that much) and continued from there when the run is resumed."""

    def __init__(self, path, period=30.0):
        self.path, self.period = path, period
        self.spent = json.load(open(path))["wall_s"] if os.path.exists(path) else 0.0
        self.start = self.saved = time.perf_counter()

    def tick(self, force=False) -> float:
        now = time.perf_counter()
        total = self.spent + now - self.start
        if force or now - self.saved >= self.period:
            with open(self.path, "w") as f:
                json.dump({"wall_s": total}, f)
            self.saved = now
        return total


class ProgressLine:
    """'pretraining on A (x.yaml): iteration 1200/4000, ETA 8.4 min (01:23); A val AP at 1500: 27.8' from the
    run's metrics.json: rewritten in place on a terminal, a new line every 30 s otherwise."""

    def __init__(self, label, out_dir, period=30.0):
        self.label, self.out_dir, self.period, self.last, self.text = label, out_dir, period, 0.0, ""
        self.tty = sys.stdout.isatty()

    def update(self, force=False):
        if not force and time.perf_counter() - self.last < (1.0 if self.tty else self.period):
            return
        self.last = time.perf_counter()
        text = iteration_text(self.label, self.out_dir)
        if not text or text == self.text:
            return
        self.text = text
        if self.tty:
            print(f"\r\033[K  {text}", end="", flush=True)
        else:
            print(f"  {text}", flush=True)

    def close(self):
        if self.tty and self.text:
            print(flush=True)


def iteration_text(label, out_dir) -> str | None:
    """The progress of a run from its metrics.json (None before its first logged iteration)."""
    try:
        rows = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.json"))]
        spec = json.load(open(os.path.join(out_dir, "spec.json")))
        cfg = json.load(open(os.path.join(out_dir, "max_iter.json")))
    except (OSError, ValueError):
        return None
    if not rows:  # the run has not logged an iteration yet
        return None
    it = rows[-1]["iteration"] + 1
    times = [r["time"] for r in rows if "time" in r]
    left = (cfg["max_iter"] - it) * statistics.median(times) if times else float("nan")
    eta = f"ETA {left / 60:.1f} min"
    if left == left:
        eta += f" ({(datetime.datetime.now() + datetime.timedelta(seconds=left)).strftime('%H:%M')})"
    ap = curve_text(learning_curve(rows))
    return (f"{label} ({spec['config'].split('/')[-1]}): iteration {it}/{cfg['max_iter']}, {eta}"
            + (f"; val AP at {ap}" if ap else ""))  # fmt: skip


def learning_curve(rows, metrics=("AP",)) -> list[dict]:
    """[{iteration, AP}] (and the other segm `metrics`) from metrics.json rows; a resumed run may have logged an
    evaluation twice: the last wins."""
    evals = {r["iteration"] + 1: r for r in rows if "segm/AP" in r}
    return [{"iteration": it, **{m: r[f"segm/{m}"] for m in metrics}} for it, r in sorted(evals.items())]


def curve_text(curve) -> str:
    """'1500: 27.8, 3000: 35.1' (iteration: AP) from a `learning_curve`."""
    return ", ".join(f"{c['iteration']}: {c['AP']:.1f}" for c in curve)


def load_result(run_dir):
    return json.load(open(os.path.join(run_dir, "result.json")))


def operator_backend() -> str:
    """'cpu', 'cuda' or 'reference': what runs the deformable-attention operator on the device the runs use."""
    import torch

    from peft_d2.ops import backend_info

    backend = backend_info()["backend_for_cuda" if torch.cuda.is_available() else "backend_for_cpu"]
    return backend.split(" (")[0]


def _spec_of(run_dir):
    return json.load(open(os.path.join(run_dir, "spec.json")))


# ----------------------------------------------------------------------------------------- the learning rate


def choose(selection_runs):
    """{method: lr scale with the highest val AP (ties: the smaller)} from the selection runs."""
    best = {}
    for r in sorted(selection_runs, key=lambda r: r["lr_scale"]):
        if r["method"] not in best or r["AP"] > best[r["method"]]["AP"]:
            best[r["method"]] = r
    return {m: r["lr_scale"] for m, r in best.items()}


def extensions(selection_runs, ladder=LR_LADDER) -> dict:
    """{method: the next scale to try} for every method whose best scale is the largest or smallest one it has
    tried and has a further rung on the ladder in that direction (the rung just beyond the range tried)."""
    tried = {}
    for r in selection_runs:
        tried.setdefault(r["method"], set()).add(r["lr_scale"])
    out = {}
    for m, best in choose(selection_runs).items():
        above = [x for x in ladder if x > max(tried[m])]
        below = [x for x in ladder if x < min(tried[m])]
        if best == max(tried[m]) and above:
            out[m] = above[0]
        elif best == min(tried[m]) and below:
            out[m] = below[-1]
    return out


def select(plan, methods, scales, max_extensions=MAX_EXTENSIONS, ladder=LR_LADDER):
    """The learning-rate search on the target's val split; returns every selection run."""
    selection = plan.run_many([(m, SELECTION_SEED, s, "val") for m in methods for s in scales])
    for i in range(max_extensions):
        more = extensions(selection, ladder)
        if not more:
            break
        print(f"   extending the search at the grid's edge ({i + 1}/{max_extensions}): "
              + ", ".join(f"{m} x{s:g}" for m, s in more.items()), flush=True)  # fmt: skip
        selection += plan.run_many([(m, SELECTION_SEED, s, "val") for m, s in more.items()])
    return selection


# ----------------------------------------------------------------------------------------------- the child


def child(spec_file):
    """Train with tools/train_net.py in this process, evaluate the trained model on spec['eval'], and write
    result.json (metrics, trainable parameters, step time, peak memory, checkpoint size)."""
    import resource

    import torch

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_net
    from detectron2.engine import default_argument_parser

    spec = json.load(open(spec_file))
    torch.set_num_threads(spec["threads"])
    out = spec["out_dir"]
    period = [] if spec.get("resume") else ["SOLVER.CHECKPOINT_PERIOD", "100000000"]
    resume = bool(spec.get("resume")) and not spec.get("replay")  # a replay has the run's config, starts afresh
    args = default_argument_parser().parse_args(
        ["--config-file", spec["config"], "--num-gpus", "1", "OUTPUT_DIR", out,
         "DATALOADER.NUM_WORKERS", "0", *period, *spec["opts"]])  # fmt: skip
    cfg = train_net.setup(args)
    with open(os.path.join(out, "max_iter.json"), "w") as f:
        json.dump({"max_iter": cfg.SOLVER.MAX_ITER}, f)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    if spec.get("replay"):
        return replay(trainer, cfg, spec)
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
        "curve": learning_curve(rows),
    })  # fmt: skip
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    if resume:  # the periodic checkpoints served the resumption; the base is model_final.pth
        for f in os.listdir(out):
            if f.startswith("model_0") and f.endswith(".pth"):
                os.remove(os.path.join(out, f))


def replay(trainer, cfg, spec):
    """adopt.py's replay: train spec["replay"]["iters"] iterations (the schedule of the whole run, logged to
    metrics.json), then evaluate the cached weights spec["replay"]["weights"] on spec['eval']: result.json."""
    import train_net
    from detectron2.engine import hooks

    from peft_d2.engine import PeftCheckpointer

    # the loop ends early (the learning-rate schedule was built for the whole run); the periodic evaluations
    # before that end still run, as they did in the run replayed (they draw random numbers), the final one not
    trainer.max_iter = min(spec["replay"]["iters"], trainer.max_iter)
    for h in trainer._hooks:
        if isinstance(h, hooks.EvalHook):
            h.after_train = lambda: None
    trainer.train()
    model = train_net._unwrap(trainer.model)
    PeftCheckpointer(model).load(spec["replay"]["weights"])
    evals = train_net.Trainer.test(cfg, model)
    with open(os.path.join(spec["out_dir"], "result.json"), "w") as f:
        json.dump({"AP": evals["segm"]["AP"], "AP50": evals["segm"]["AP50"]}, f, indent=1)


if __name__ == "__main__":
    child(sys.argv[1])
