"""Transfer studies: a base pretrained on a source domain, fine-tuned on a few-shot target domain by every
method with paired seeds, a learning-rate rule applied alike, intervals and the papers' claims decided by rules
fixed in advance.

- `rules`: the statistics and decision rules (intervals, paired differences, checks, verdicts);
- `studies`: what a study is (data, configs, datasets, budgets): the synthetic domains and the DSB 2018 nuclei;
- `engine`: how it runs: cached data and base, resumable pretraining, runs in child processes, the
  learning-rate search;
- `report`: tables, pages, plots, prediction pictures and the serving check, from the raw per-run results.
"""

from .rules import (
    BASELINES,
    CLAIMS,
    MIN_SEEDS,
    NON_INFERIORITY_MARGIN,
    Interval,
    Verdict,
    checks,
    interval,
    paired,
    verdicts,
)

__all__ = [
    "BASELINES",
    "CLAIMS",
    "MIN_SEEDS",
    "NON_INFERIORITY_MARGIN",
    "Interval",
    "Verdict",
    "checks",
    "interval",
    "paired",
    "verdicts",
]
