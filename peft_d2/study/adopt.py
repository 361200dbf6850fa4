"""Reusing a cached base or run across code changes, after showing that the change leaves it unchanged.

A base and each run are cached under a key that covers the code which makes them (cache.fingerprint), so any
edit of peft_d2/ makes new ones: safe, but a 3-hour base would then be retrained for a new error message. Instead,
when the key's folder is missing, a finished folder made by older code for the same stage (a base of the same
study; a run of the same method, seed, learning-rate scale and split) is *adopted* if the current code,
replaying it, gets the same numbers:

1. **Training**: the current code trains the same spec for REPLAY_ITERS iterations from the same seed; every
   loss and the learning rate it logs (metrics.json, every 20 iterations) must equal the cached run's first
   ones to REPLAY_RTOL.
2. **Configuration**: the resolved config it dumps must hold every key of the cached config.yaml with the same
   value (OUTPUT_DIR and MODEL.WEIGHTS, which name cache folders, aside). Keys that the current code added are
   allowed: their effect is what step 1 and 3 measure.
3. **Evaluation**: the current code evaluates the cached final weights on the cached result's dataset and must
   get its AP and AP50 to EVAL_ATOL.

The replay is exact in practice (the DSB base: 40 iterations equal to the last bit) and sees what the config
does not: a clone without the compiled operator, running the pure-PyTorch reference, differed by 1.8% in a loss
at iteration 19 and 7% at 39, and was refused.

A run's other seeds and scales of the same method are then adopted when their specs differ from the cached
ones only in the cache folders they name (their config file passed step 2). The adopted folder holds links to
the cached files and an `adopted.json` saying where they came from and what was compared; result.json gains an
`adopted` field, which the page counts. Nothing in the cached folder changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import yaml

__all__ = ["REPLAY_ITERS", "REPLAY_RTOL", "EVAL_ATOL", "check", "replayed_rows", "compare_rows", "compare_configs",
           "same_spec", "link_adopted"]  # fmt: skip

REPLAY_ITERS = 40
REPLAY_RTOL = 1e-5
EVAL_ATOL = 1e-6
_IGNORED_KEYS = ("OUTPUT_DIR", "MODEL.WEIGHTS")


def replayed_rows(metrics_file: str, iters: int = REPLAY_ITERS) -> dict[int, dict]:
    """{iteration: {loss_*, total_loss, lr}} of the logged iterations below `iters`; a resumed run logged some
    iterations again: its first start's rows count."""
    out = {}
    for line in open(metrics_file):
        row = json.loads(line)
        it = row.get("iteration", iters)
        if it < iters and "total_loss" in row and it not in out:
            out[it] = {k: v for k, v in row.items() if k.startswith("loss") or k in ("total_loss", "lr")}
    return out


def compare_rows(replayed: dict, cached: dict, rtol: float = REPLAY_RTOL) -> tuple[float, str | None]:
    """(largest relative difference, None) when the replay logged what the cached run logged, else (.., why)."""
    if not replayed:
        return float("inf"), "the replay logged no training iteration"
    worst = 0.0
    for it, row in sorted(replayed.items()):
        if it not in cached or set(cached[it]) != set(row):
            return float("inf"), f"iteration {it} logged {sorted(row)}, the cached run {sorted(cached.get(it, {}))}"
        for k, v in row.items():
            diff = abs(v - cached[it][k]) / max(abs(cached[it][k]), 1e-12)
            worst = max(worst, diff)
            if diff > rtol:
                return worst, f"iteration {it}: {k} {v!r} != {cached[it][k]!r} (relative difference {diff:.2e})"
    return worst, None


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def compare_configs(new_yaml: str, cached_yaml: str) -> str | None:
    """None when the resolved config `new_yaml` holds every key of `cached_yaml` with its value (OUTPUT_DIR and
    MODEL.WEIGHTS aside), else the first difference."""
    new = dict(_flat(yaml.safe_load(open(new_yaml))))
    for k, v in _flat(yaml.safe_load(open(cached_yaml))):
        if k in _IGNORED_KEYS:
            continue
        if k not in new:
            return f"{k} is in the cached config, not in the current one"
        if new[k] != v:
            return f"{k}: {new[k]!r} now, {v!r} in the cached run"
    return None


def _normalised(spec: dict) -> dict:
    """The spec without what names folders: its output folder, its base's cache folder, the repository's path."""
    s = {k: v for k, v in spec.items() if k not in ("out_dir", "config", "replay")}
    s["config"] = os.path.basename(spec["config"])
    s["opts"] = [re.sub(r"^.*/pretrain-[0-9a-f]+/", "<base>/", str(o)) for o in spec["opts"]]
    return s


def same_spec(a: dict, b: dict) -> bool:
    """Whether two run specs ask for the same run, the cache folders they name aside."""
    return _normalised(a) == _normalised(b)


def link_adopted(cached_dir: str, target_dir: str, record: dict) -> None:
    """`target_dir` made of links to `cached_dir`'s files, result.json copied with an `adopted` field, and
    adopted.json; built beside it and renamed into place, so it exists only complete."""
    tmp = target_dir + ".adopting"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(cached_dir):
        if name not in ("result.json", "adopted.json"):
            os.symlink(os.path.realpath(os.path.join(cached_dir, name)), os.path.join(tmp, name))
    result = dict(json.load(open(os.path.join(cached_dir, "result.json"))), adopted=record)
    with open(os.path.join(tmp, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(tmp, "adopted.json"), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(target_dir, ignore_errors=True)
    os.replace(tmp, target_dir)


def check(replay_dir: str, cached_dir: str) -> tuple[dict | None, str | None]:
    """(the adoption record, None) when the replay in `replay_dir` reproduced `cached_dir`, else (None, why)."""
    why = compare_configs(os.path.join(replay_dir, "config.yaml"), os.path.join(cached_dir, "config.yaml"))
    if why:
        return None, why
    replayed = replayed_rows(os.path.join(replay_dir, "metrics.json"))
    worst, why = compare_rows(replayed, replayed_rows(os.path.join(cached_dir, "metrics.json")))
    if why:
        return None, why
    new = json.load(open(os.path.join(replay_dir, "result.json")))
    old = json.load(open(os.path.join(cached_dir, "result.json")))
    for k in ("AP", "AP50"):
        if abs(new[k] - old[k]) > EVAL_ATOL:
            return None, f"its weights evaluate to {k} {new[k]:.4f} now, {old[k]:.4f} when it was made"
    return {"from": os.path.realpath(cached_dir), "replayed_iterations": max(replayed) + 1,
            "largest_difference": worst, "AP": new["AP"], "AP50": new["AP50"]}, None  # fmt: skip
