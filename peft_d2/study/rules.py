"""Statistics and decision rules of the transfer studies (tools/benchmark_peft.py, tools/demo.py).

The study is paired: fine-tuning seed s is shared by every method (data order and the initialisation of new
modules), so a difference between two methods is taken seed by seed and its interval is that of the mean
paired difference. Intervals are two-sided 95% Student-t intervals over seeds.

The rules below were written down before the benchmark's results existed (see the README's "Decision rules"),
and the verdicts are computed from the raw per-run results by `verdicts`, never by hand.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

__all__ = ["BASELINES", "CLAIMS", "Interval", "Verdict", "checks", "interval", "paired", "verdicts"]

# Methods that are not PEFT methods in the papers' sense: they train existing parameters only.
BASELINES = ("scratch", "full_finetune", "baseline_heads_only", "baseline_decoder_only", "baseline_whole_head")
NON_INFERIORITY_MARGIN = 1.0  # AP points, for the "at least as good as" claim (MoPEFT)
MIN_SEEDS = 2


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval (nan with fewer than two values)
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.half:.1f}"


@dataclass(frozen=True)
class Verdict:
    claim: str
    rule: str
    verdict: str  # supported | refuted | inconclusive | not run
    evidence: str


def interval(values: Sequence[float]) -> Interval:
    """Mean and the half-width of its two-sided 95% t interval."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("interval of no values")
    if n < MIN_SEEDS:
        return Interval(values[0], math.nan, 1)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Interval(statistics.mean(values), half, n)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """Interval of mean(a_s - b_s) over the seeds s that both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired difference of two methods with no common seed")
    return interval([a[s] - b[s] for s in seeds])


def _fmt(d: Interval) -> str:
    return f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


# The six claims and their rules, word for word as the README states them.
CLAIMS = {
    "peft_90": (
        "PEFT with 1-6% of the parameters reaches >= 90% of full fine-tuning's AP",
        "candidates: PEFT methods training <= 6% of the model. Per seed d = AP(method) - 0.9 AP(full). Supported "
        "if some candidate's d has a 95% interval above 0; refuted if every candidate's interval is below 0; "
        "else inconclusive.",
    ),
    "adapters_23": (
        "2-3 sequential adapters per site beat 1",
        "d_k = AP(adapters_k) - AP(adapters_1), k = 2, 3. Supported if some d_k's interval is above 0; refuted "
        "if both are below 0; else inconclusive.",
    ),
    "lora_msda": (
        "LoRA in MSDeformAttn is parameter-efficient and sometimes beats adapters",
        "LoRA in MSDeformAttn must train fewer parameters than 1 adapter per site (else refuted). "
        "d_k = AP(lora_msdeformattn) - AP(adapters_k), k = 1, 2, 3. Supported if some d_k's interval is above "
        "0; refuted if all are below 0; else inconclusive.",
    ),
    "mopeft": (
        "MoPEFT is at least as good as its best single method",
        "best single = the highest mean AP of lora_backbone, prefix, adapters_1. d = AP(mopeft) - AP(best "
        f"single). Refuted if d's interval is below 0; supported if its lower end is above -{NON_INFERIORITY_MARGIN:g} "
        "AP (non-inferiority margin); else inconclusive.",
    ),
    "cobot": (
        "COBOT improves its base method with about 1K extra parameters",
        "pairs cobot_lora - lora_backbone and cobot_adapter - adapters_parallel. Supported if some pair's "
        "interval is above 0; refuted if every pair's interval is below 0; else inconclusive.",
    ),
    "sfa": (
        "SFA is the best method at a fixed budget",
        "competitors: every other method, baselines included, training no more parameters than SFA. "
        "d_c = AP(sfa) - AP(c). Supported if every d_c's interval is above 0; refuted if some d_c's interval is "
        "below 0; else inconclusive.",
    ),
}


def _verdict(key, verdict, evidence):
    claim, rule = CLAIMS[key]
    return Verdict(claim, rule, verdict, evidence)


def verdicts(ap: Mapping[str, Mapping[int, float]], trainable: Mapping[str, int],
             total_params: int) -> dict[str, Verdict]:
    """Apply the six rules. `ap[method][seed]` is a test AP, `trainable[method]` its trainable parameter count.

    A claim whose methods are missing from `ap` gets "not run".
    """
    out = {}

    def have(*methods):
        return all(m in ap and len(ap[m]) >= MIN_SEEDS for m in methods)

    def d(a, b):
        return paired(ap[a], ap[b])

    # 1. PEFT at <= 6% reaches 90% of full fine-tuning
    cands = [m for m in ap if m not in BASELINES and 100.0 * trainable[m] / total_params <= 6.0]
    if have("full_finetune") and cands and have(*cands):
        full = ap["full_finetune"]
        ds = {m: paired(ap[m], {s: 0.9 * v for s, v in full.items()}) for m in cands}
        ev = "; ".join(f"{m} ({100.0 * trainable[m] / total_params:.2f}%): {_fmt(x)}" for m, x in ds.items())
        if any(x.low > 0 for x in ds.values()):
            v = "supported"
        elif all(x.high < 0 for x in ds.values()):
            v = "refuted"
        else:
            v = "inconclusive"
        out["peft_90"] = _verdict("peft_90", v, ev)
    else:
        out["peft_90"] = _verdict("peft_90", "not run", "needs full_finetune and a PEFT method <= 6%")

    # 2. 2-3 adapters beat 1
    if have("adapters_1", "adapters_2", "adapters_3"):
        ds = {k: d(f"adapters_{k}", "adapters_1") for k in (2, 3)}
        v = ("supported" if any(x.low > 0 for x in ds.values()) else
             "refuted" if all(x.high < 0 for x in ds.values()) else "inconclusive")
        out["adapters_23"] = _verdict("adapters_23", v, "; ".join(f"{k} vs 1: {_fmt(x)}" for k, x in ds.items()))
    else:
        out["adapters_23"] = _verdict("adapters_23", "not run", "needs adapters_1, adapters_2, adapters_3")

    # 3. LoRA in MSDeformAttn
    if have("lora_msdeformattn", "adapters_1", "adapters_2", "adapters_3"):
        fewer = trainable["lora_msdeformattn"] < trainable["adapters_1"]
        ds = {k: d("lora_msdeformattn", f"adapters_{k}") for k in (1, 2, 3)}
        ev = (f"trainable {trainable['lora_msdeformattn']:,} vs {trainable['adapters_1']:,} (1 adapter); "
              + "; ".join(f"vs {k} adapter(s): {_fmt(x)}" for k, x in ds.items()))
        if not fewer or all(x.high < 0 for x in ds.values()):
            v = "refuted"
        elif any(x.low > 0 for x in ds.values()):
            v = "supported"
        else:
            v = "inconclusive"
        out["lora_msda"] = _verdict("lora_msda", v, ev)
    else:
        out["lora_msda"] = _verdict("lora_msda", "not run", "needs lora_msdeformattn and adapters_1..3")

    # 4. MoPEFT >= best single
    singles = ("lora_backbone", "prefix", "adapters_1")
    if have("mopeft", *singles):
        best = max(singles, key=lambda m: statistics.mean(ap[m].values()))
        x = d("mopeft", best)
        v = ("refuted" if x.high < 0 else "supported" if x.low > -NON_INFERIORITY_MARGIN else "inconclusive")
        out["mopeft"] = _verdict("mopeft", v, f"best single {best}; mopeft - {best}: {_fmt(x)}")
    else:
        out["mopeft"] = _verdict("mopeft", "not run", "needs mopeft, lora_backbone, prefix, adapters_1")

    # 5. COBOT improves its base method
    pairs = [(c, b) for c, b in (("cobot_lora", "lora_backbone"), ("cobot_adapter", "adapters_parallel"))
             if have(c, b)]
    if pairs:
        ds = {(c, b): d(c, b) for c, b in pairs}
        ev = "; ".join(f"{c} - {b}: {_fmt(x)} with {trainable[c] - trainable[b]:,} extra parameters"
                       for (c, b), x in ds.items())
        v = ("supported" if any(x.low > 0 for x in ds.values()) else
             "refuted" if all(x.high < 0 for x in ds.values()) else "inconclusive")
        out["cobot"] = _verdict("cobot", v, ev)
    else:
        out["cobot"] = _verdict("cobot", "not run", "needs cobot_lora with lora_backbone or cobot_adapter with "
                                "adapters_parallel")

    # 6. SFA best at a fixed budget
    comps = [m for m in ap if m not in ("sfa", "scratch") and trainable[m] <= trainable.get("sfa", -1)]
    if have("sfa") and comps and have(*comps):
        ds = {m: d("sfa", m) for m in comps}
        ev = f"SFA trains {trainable['sfa']:,}; " + "; ".join(f"vs {m}: {_fmt(x)}" for m, x in ds.items())
        v = ("refuted" if any(x.high < 0 for x in ds.values()) else
             "supported" if all(x.low > 0 for x in ds.values()) else "inconclusive")
        out["sfa"] = _verdict("sfa", v, ev)
    else:
        out["sfa"] = _verdict("sfa", "not run", "needs sfa and a method training no more parameters")
    return out


def checks(ap: Mapping[str, Mapping[int, float]], max_half_width: float = 1.5) -> list[tuple[str, bool, str]]:
    """The study's own conditions (does the base matter, can the benchmark rank methods, has it the power):
    (name, passed, evidence) for the ones whose methods were run."""
    out = []
    if "full_finetune" in ap and "scratch" in ap:
        x = paired(ap["full_finetune"], ap["scratch"])
        out.append(("the base matters: full fine-tuning beats training from scratch by more than its interval",
                    x.low > 0, f"full - scratch: {_fmt(x)}"))
    if "full_finetune" in ap and "baseline_heads_only" in ap:
        x = paired(ap["full_finetune"], ap["baseline_heads_only"])
        out.append(("methods can be ranked: full fine-tuning and heads-only differ by more than their interval",
                    x.low > 0 or x.high < 0, f"full - heads only: {_fmt(x)}"))
    if "full_finetune" in ap:
        x = interval(list(ap["full_finetune"].values()))
        out.append((f"power: full fine-tuning's interval half-width <= {max_half_width:g} AP",
                    x.half <= max_half_width, f"full fine-tuning: {x} AP over {x.n} seeds"))
    return out
