"""What a transfer study is: its data, configs, datasets and budgets. The engine (engine.py) runs any of them.

Two studies ship: `synthetic` (generated textures, domain A -> B, tools/demo.py's and the synthetic benchmark's)
and `dsb2018` (the 2018 Data Science Bowl nuclei, one imaging kind -> another, e.g. fluorescence -> tissue).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .cache import ROOT, cache_root, fingerprint, locked_build

__all__ = ["Study", "synthetic", "dsb2018", "STUDIES", "METHODS"]

# every method a study runs: the baselines ("scratch" is full fine-tuning's config from random weights) and the
# PEFT methods, each a <method>.yaml in the study's method_configs folder
METHODS = ("scratch", "full_finetune", "baseline_heads_only", "baseline_decoder_only", "baseline_whole_head",
           "lora_backbone", "lora_msdeformattn", "adapters_1", "adapters_2", "adapters_3", "adapters_parallel",
           "lora_adapters", "prefix", "mopeft", "cobot_lora", "cobot_adapter", "sfa", "lora_dora", "lora_conv",
           "mona")  # fmt: skip


@dataclass(frozen=True)
class Study:
    name: str
    title: str  # of the page
    source: str  # the source domain's name (pretraining)
    target: str  # the target domain's name (fine-tuning)
    pretrain_config: str  # relative to the repository
    method_configs: str  # the folder of <method>.yaml fine-tuning configs
    datasets: dict[str, str]  # source_train, source_val, target_train, target_val, target_test
    pretrain_code: tuple[str, ...]  # files and folders whose change makes a new base
    run_code: tuple[str, ...]  # ... new fine-tuning runs
    data: dict  # what the data are: part of every cache key, written into the raw results
    prepare: Callable[[], str] = field(compare=False)  # makes the data (cached); returns DETECTRON2_DATASETS
    sizes: dict[str, str] = field(default_factory=dict)  # role -> "100 images", for the pages
    extra: tuple[str, ...] = ()  # config overrides of every run (toy sizes)
    page: str = ""  # docs/<page>.{md,json,png}
    pretrain_resumable: bool = False  # checkpoints every SOLVER.CHECKPOINT_PERIOD, resumed after a stop
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # the paired seeds of its reporting runs (--seeds overrides)

    def info(self) -> dict:
        """What the pages say of the study (written into the raw results)."""
        return {"name": self.name, "title": self.title, "source": self.source, "target": self.target,
                "sizes": self.sizes, "page": self.page}  # fmt: skip

    def dataset(self, split: str) -> str:
        """The target's dataset that a fine-tuning run of `split` ('val' or 'test') is scored on."""
        return self.datasets[f"target_{split}"]

    def method_config(self, method: str) -> str:
        """The fine-tuning config of a method ("scratch" is full fine-tuning's config from random weights)."""
        name = "full_finetune" if method == "scratch" else method
        return os.path.join(ROOT, self.method_configs, f"{name}.yaml")


# ------------------------------------------------------------------------------------------------ synthetic

# The data of the synthetic study. B is few-shot; B val chooses hyperparameters, B test reports.
SYNTHETIC_DATA = {"image_size": 128, "num_train": {"A": 1000, "B": 64}, "num_val": {"A": 100, "B": 50},
                  "num_test": {"B": 200}, "seed": 0}  # fmt: skip
# --smoke: the same pipeline at toy size, for the test suite
SYNTHETIC_SMOKE = {"image_size": 64, "num_train": {"A": 8, "B": 8}, "num_val": {"A": 4, "B": 4},
                   "num_test": {"B": 4}, "seed": 0}  # fmt: skip


def _prepare_synthetic(data: dict) -> str:
    """Generate the study's data once; returns the DETECTRON2_DATASETS folder that holds `synthetic/`."""
    from peft_d2.data.synthetic import generate_synthetic

    def build(tmp):
        generate_synthetic(os.path.join(tmp, "synthetic"), domains=("A", "B"), num_train=data["num_train"],
                           num_val=data["num_val"], num_test=data["num_test"], image_size=data["image_size"],
                           seed=data["seed"])  # fmt: skip

    key = fingerprint(["peft_d2/data/synthetic.py"], data)
    return locked_build(os.path.join(cache_root(), "synthetic", f"data-{key}"), build)


def synthetic(smoke: bool = False) -> Study:
    data = SYNTHETIC_SMOKE if smoke else SYNTHETIC_DATA
    cfg = "configs/synthetic"
    return Study(
        name="synthetic",
        title="Synthetic transfer benchmark",
        source="A",
        target="B",
        pretrain_config=f"{cfg}/maskformer2_swin_demo_A.yaml",
        method_configs=f"{cfg}/demo",
        datasets={"source_train": "synthetic_A_train", "source_val": "synthetic_A_val",
                  "target_train": "synthetic_B_train", "target_val": "synthetic_B_val",
                  "target_test": "synthetic_B_test"},  # fmt: skip
        pretrain_code=("peft_d2/modeling", "peft_d2/data", "peft_d2/engine", "peft_d2/ops", "peft_d2/config.py",
                       "tools/train_net.py", "csrc", f"{cfg}/Base-Synthetic-InstanceSegmentation.yaml",
                       f"{cfg}/maskformer2_swin_micro_bs4_A.yaml", f"{cfg}/maskformer2_swin_demo_A.yaml"),
        run_code=("peft_d2", "tools/train_net.py", "csrc", cfg),
        data=data,
        prepare=lambda: _prepare_synthetic(data),
        sizes={"source_val": f"{data['num_val']['A']} images", "target_val": f"{data['num_val']['B']} images",
               "target_test": f"{data['num_test']['B']} images"},  # fmt: skip
        extra=("INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64") if smoke else (),
        page="benchmark_synthetic",
    )


# ------------------------------------------------------------------------------------------------ DSB 2018

DSB_FEWSHOT = 32
DSB_TILE = 128


def _prepare_dsb2018(data_dir: str, fewshot: int, tile: int) -> str:
    """Prepare the official layout under `data_dir` once per machine (datasets/prepare_dsb2018.py's work);
    returns the DETECTRON2_DATASETS folder that holds `dsb2018/`. Keyed by the preparation code, its settings,
    the folder and its sample ids."""
    from peft_d2.data.dsb2018 import _sample_dir, prepare_dsb2018

    ids = sorted(os.listdir(_sample_dir(data_dir)))
    key = fingerprint(["peft_d2/data/dsb2018.py"], os.path.abspath(data_dir), ids, fewshot, tile)
    return locked_build(
        os.path.join(cache_root(), "dsb2018", f"data-{key}"),
        lambda tmp: prepare_dsb2018(data_dir, os.path.join(tmp, "dsb2018"), fewshot=fewshot, tile=tile),
    )


def dsb2018(data_dir: str, source: str = "fluorescence", target: str = "tissue", smoke: bool = False,
            fewshot: int = DSB_FEWSHOT, tile: int = DSB_TILE) -> Study:  # fmt: skip
    """The nuclei study: a base trained from scratch on the `source` kind's train split (scored on its val
    tiles), fine-tuned on the `target` kind's few-shot split, learning rates chosen on its val tiles, reported on
    its test tiles. `data_dir` holds the official layout (stage1_train/); any two kinds its preparation found."""
    from peft_d2.data.dsb2018 import KINDS

    for role, kind in (("--source", source), ("--target", target)):
        if kind not in KINDS:
            raise ValueError(f"{role} {kind!r}: expected one of the imaging kinds {list(KINDS)}")
    if source == target:
        raise ValueError(f"--source and --target are both {source!r}: a transfer study needs two kinds")
    root = _prepare_dsb2018(data_dir, fewshot, tile)
    with open(os.path.join(root, "dsb2018", "summary.json")) as f:
        summary = json.load(f)
    missing = [k for k in (source, target) if k not in summary["kinds"]]
    if missing:
        raise ValueError(f"the data under {data_dir!r} have no {missing} images; its kinds: {list(summary['kinds'])}")
    counts = {k: summary["kinds"][k] for k in (source, target)}
    empty = [f"{k} {split}" for k, splits in ((source, ("train", "val")), (target, ("fewshot", "val", "test")))
             for split in splits if not counts[k][split]["images"]]  # fmt: skip
    if empty:
        raise ValueError(f"the data under {data_dir!r} leave these splits empty: {empty} "
                         f"({ {k: {s: v['images'] for s, v in c.items()} for k, c in counts.items()} } images)")

    def tiles(kind, split):
        c = counts[kind][split]
        return f"{c['tiles']} tiles of {c['images']} images"

    cfg = "configs/dsb2018"
    extra = ("INPUT.CROP.SIZE", f"({tile}, {tile})") if tile != DSB_TILE else ()
    if smoke:
        extra += ("SOLVER.IMS_PER_BATCH", "2", "TEST.EVAL_PERIOD", "0")
    return Study(
        name="dsb2018",
        title=f"DSB 2018 nuclei transfer benchmark ({source} -> {target})",
        source=source,
        target=target,
        pretrain_config=f"{cfg}/maskformer2_swin_dsb2018_base.yaml",
        method_configs=f"{cfg}/peft",
        datasets={"source_train": f"dsb2018_{source}_train", "source_val": f"dsb2018_{source}_val_tiles",
                  "target_train": f"dsb2018_{target}_fewshot", "target_val": f"dsb2018_{target}_val_tiles",
                  "target_test": f"dsb2018_{target}_test_tiles"},  # fmt: skip
        pretrain_code=("peft_d2/modeling", "peft_d2/data", "peft_d2/engine", "peft_d2/ops", "peft_d2/config.py",
                       "tools/train_net.py", "csrc", f"{cfg}/Base-DSB2018.yaml",
                       f"{cfg}/maskformer2_swin_dsb2018_micro.yaml", f"{cfg}/maskformer2_swin_dsb2018_small.yaml",
                       f"{cfg}/maskformer2_swin_dsb2018_base.yaml"),
        run_code=("peft_d2", "tools/train_net.py", "csrc", cfg),
        data={"source": source, "target": target, "fewshot": fewshot, "tile": tile, "counts": counts,
              "smoke": smoke},  # fmt: skip
        prepare=lambda: root,
        sizes={"source_val": tiles(source, "val"), "target_val": tiles(target, "val"),
               "target_test": tiles(target, "test")},  # fmt: skip
        extra=extra,
        page="benchmark_dsb2018" + ("" if (source, target) == ("fluorescence", "tissue") else f"_{source}_{target}"),
        pretrain_resumable=True,
        # 15, not 5: with 5, full fine-tuning's interval half-width was 2.9 AP (seed standard deviation 2.3), above
        # the power check's 1.5 (docs/benchmark_dsb2018_5seeds.md); 15 seeds give about 1.3
        seeds=tuple(range(15)),
    )


STUDIES = ("synthetic", "dsb2018")
