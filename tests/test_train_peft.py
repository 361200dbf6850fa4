"""tools/train_net.py with every PEFT config on the synthetic domain B: training, adapter export, --resume,
--eval-only from the adapter, and a 2-process gloo run (DDP over trainable tensors only)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _models import load_tool

from peft_d2.checkpoint import read_adapter
from peft_d2.errors import PeftConfigError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
PEFT_DIR = ROOT / "configs" / "synthetic" / "peft"
OPTS = [
    "MODEL.WEIGHTS", "", "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "SEED", "1", "MODEL.PEFT.SFA.WARMUP_ITERS", "2",
]  # fmt: skip
METHODS = ["lora_backbone", "lora_msdeformattn", "adapters_1", "adapters_2", "adapters_3", "lora_adapters",
           "prefix", "mopeft", "cobot_lora", "cobot_adapter", "sfa", "baseline_heads_only", "baseline_decoder_only",
           "baseline_whole_head"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft_d2.data.synthetic import generate_split

    root = tmp_path_factory.mktemp("d2datasets")
    generate_split(str(root / "synthetic"), "B", "train", 8, image_size=64, seed=4)
    generate_split(str(root / "synthetic"), "B", "val", 4, image_size=64, seed=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root))
        train_net = load_tool()
        train_net.Trainer.log_period = 1
        yield train_net, root


def train(train_net, method, out_dir, *extra, opts=()):
    argv = ["--config-file", str(PEFT_DIR / f"{method}.yaml"), "--num-gpus", "1", *extra,
            "OUTPUT_DIR", str(out_dir), *OPTS, *opts]
    return train_net.main(train_net.argument_parser().parse_args(argv))


def metrics(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.json")]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_peft_config_trains(env, method, tmp_path):
    train_net, _ = env
    results = train(train_net, method, tmp_path, opts=["SOLVER.MAX_ITER", "3"])
    rows = metrics(tmp_path)
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    report = next(r for r in rows if "peft/trainable_params" in r)
    assert 0 < report["peft/trainable_percent"] < 100
    tensors, meta, config = read_adapter(str(tmp_path / "adapter_final.safetensors"))
    assert sum(t.numel() for k, t in tensors.items() if not k.endswith("sfa_index")) == report["peft/trainable_params"]
    assert "segm" in results
    # the training checkpoint holds trainable tensors only
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert final["peft_partial"] and len(final["model"]) == len(tensors)
    log = (tmp_path / "log.txt").read_text()
    assert f"trainable params: {int(report['peft/trainable_params']):,} ||" in log  # the parameter report
    if method == "sfa":  # its budget, warm-up and selection
        for line in ("SFA budget:", "SFA warm-up: 2 iterations", "SFA selection:"):
            assert line in log


def test_a_failed_run_leaves_no_empty_metrics_json(env, tmp_path):
    train_net, _ = env
    with pytest.raises(ValueError, match="missing.safetensors' does not exist"):
        train(train_net, "lora_backbone", tmp_path, opts=["MODEL.PEFT.WEIGHTS", str(tmp_path / "missing.safetensors")])
    assert (tmp_path / "config.yaml").exists()  # the run got as far as its set-up
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_resume_and_eval_only_from_adapter(env, tmp_path):
    train_net, _ = env
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2"]
    train(train_net, "lora_adapters", tmp_path, opts=[*opts, "SOLVER.MAX_ITER", "4"])
    first = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    results = train(train_net, "lora_adapters", tmp_path, "--resume", opts=[*opts, "SOLVER.MAX_ITER", "6"])
    iters = [r["iteration"] for r in metrics(tmp_path) if "total_loss" in r]
    assert iters == [0, 1, 2, 3, 4, 5]  # the second run continued at iteration 4
    second = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert f"Resumed from {tmp_path / 'model_final.pth'}: " in (tmp_path / "log.txt").read_text()
    adapter = str(tmp_path / "adapter_final.safetensors")
    again = train(train_net, "lora_adapters", tmp_path / "eval", "--eval-only", opts=["MODEL.PEFT.WEIGHTS", adapter])
    assert again["segm"]["AP"] == pytest.approx(results["segm"]["AP"], abs=1e-6)
    log = (tmp_path / "eval" / "log.txt").read_text()
    assert f"Adapter {adapter} loaded: " in log and "MODEL.PEFT.WEIGHTS is empty" not in log


@pytest.mark.slow
def test_eval_only_serves_several_adapters_from_one_base(env, tmp_path):
    """--adapter NAME=FILE (repeated): one base, every adapter evaluated on its dataset in one process, with the
    results of evaluating each adapter file alone."""
    train_net, _ = env
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(PEFT_DIR / "lora_backbone.yaml"), "OUTPUT_DIR", str(tmp_path / "base"), *OPTS])
    torch.manual_seed(0)
    base = train_net.build_base_model(train_net.setup(args)).state_dict()
    # a base of another class count (as domain A's is): each adapter file carries its own class head
    head = "sem_seg_head.predictor.class_embed"
    base[f"{head}.weight"], base[f"{head}.bias"] = base[f"{head}.weight"][:-1], base[f"{head}.bias"][:-1]
    base["criterion.empty_weight"] = base["criterion.empty_weight"][:-1]
    torch.save({"model": base}, tmp_path / "base.pth")
    weights = ["MODEL.WEIGHTS", str(tmp_path / "base.pth")]
    files, alone = {}, {}
    for name, method in (("lora", "lora_backbone"), ("adapters", "adapters_1")):
        train(train_net, method, tmp_path / name, opts=[*weights, "SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "0.01"])
        files[name] = str(tmp_path / name / "adapter_final.safetensors")
        alone[name] = train(train_net, method, tmp_path / f"{name}_eval", "--eval-only",
                            opts=[*weights, "MODEL.PEFT.WEIGHTS", files[name]])
    flags = [x for name, f in files.items() for x in ("--adapter", f"{name}={f}")]
    served = train(train_net, "lora_backbone", tmp_path / "served", "--eval-only", *flags, opts=weights)
    assert set(served) == {"lora", "adapters"}
    log = (tmp_path / "served" / "log.txt").read_text()  # each result block names its adapter; one table ends
    assert "Skip loading parameter" not in log  # the class heads come from the files
    assert [line.partition(": ")[2] for line in log.splitlines() if "Evaluation results of adapter" in line] == [
        "Evaluation results of adapter 'lora' on synthetic_B_val in csv format:",
        "Evaluation results of adapter 'adapters' on synthetic_B_val in csv format:"]
    table = train_net.adapter_summary(served)
    assert log.endswith(f"Evaluation results of 2 adapters on one base:\n{table}\n")
    rows = [[cell.strip() for cell in row.split("|")[1:4]] for row in table.splitlines()[2:]]
    assert rows == [[name, "synthetic_B_val", task] for name in ("lora", "adapters") for task in ("bbox", "segm")]
    for name in files:
        assert set(served[name]) == {"synthetic_B_val"}
        got, want = served[name]["synthetic_B_val"], alone[name]
        assert got.keys() == want.keys()
        for task in want:
            for metric, value in want[task].items():
                assert got[task][metric] == pytest.approx(value, abs=1e-6, nan_ok=True), (name, task, metric)
    # the metrics of a barely trained model are all 0: compare what each evaluator saw, its predictions
    preds = {k: _predictions(tmp_path / k / "inference") for k in ("lora_eval", "adapters_eval")}
    assert not _same_predictions(preds["lora_eval"], preds["adapters_eval"])  # serving the wrong one is seen
    for name in files:
        assert _same_predictions(_predictions(tmp_path / "served" / name / "inference"), preds[f"{name}_eval"])


def _predictions(folder):
    """COCOEvaluator's saved predictions: image id -> [(category, score, mask RLE)], by category and score."""
    out = {}
    for p in torch.load(folder / "instances_predictions.pth", weights_only=False):
        rows = [(x["category_id"], x["score"], x["segmentation"]["counts"]) for x in p["instances"]]
        out[p["image_id"]] = sorted(rows, key=lambda r: r[:2])
    return out


def _same_predictions(a, b, tol=1e-5):
    if a.keys() != b.keys():
        return False
    for image in a:
        if len(a[image]) != len(b[image]):
            return False
        for (ca, sa, ma), (cb, sb, mb) in zip(a[image], b[image]):
            if ca != cb or abs(sa - sb) > tol or ma != mb:
                return False
    return True


def test_eval_only_adapter_flag_errors(env, tmp_path):
    train_net, _ = env
    cfg = train_net.setup(train_net.argument_parser().parse_args(
        ["--config-file", str(PEFT_DIR / "lora_backbone.yaml"), "OUTPUT_DIR", str(tmp_path), *OPTS]))
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    with pytest.raises(PeftConfigError, match=r"expected NAME=FILE, got '/.*/a\.safetensors'"):
        train_net.adapter_pairs(cfg, [str(f)])
    with pytest.raises(PeftConfigError, match="no such adapter file"):
        train_net.adapter_pairs(cfg, [f"a={tmp_path / 'missing.safetensors'}"])
    with pytest.raises(PeftConfigError, match=r"repeated names in \['a', 'a'\]"):
        train_net.adapter_pairs(cfg, [f"a={f}", f"a={f}"])
    two = cfg.clone()
    two.defrost()
    two.DATASETS.TEST = ("x", "y", "z")
    with pytest.raises(PeftConfigError, match="2 adapters but DATASETS.TEST has 3 datasets"):
        train_net.adapter_pairs(two, [f"a={f}", f"b={f}"])
    pairs = train_net.adapter_pairs(cfg, [f"a={f}", f"b={f}"])  # one dataset: every adapter on it
    assert pairs == [("a", str(f), "synthetic_B_val"), ("b", str(f), "synthetic_B_val")]
    two.DATASETS.TEST = ("synthetic_B_val",)
    two.MODEL.PEFT.WEIGHTS = str(f)
    with pytest.raises(PeftConfigError, match="leave MODEL.PEFT.WEIGHTS empty"):
        train_net.adapter_pairs(two, [f"a={f}"])
    argv = ["--config-file", str(PEFT_DIR / "lora_backbone.yaml"), "--adapter", f"a={f}", "OUTPUT_DIR",
            str(tmp_path), *OPTS]
    with pytest.raises(PeftConfigError, match="needs --eval-only"):
        train_net.main(train_net.argument_parser().parse_args(argv))


DRIVER = """
import sys, torch
sys.path.insert(0, {tools!r})
import train_net
from detectron2.engine import launch
from detectron2.utils import comm

def worker(argv, out):
    args = train_net.argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    train_net.patch_cpu_ddp()
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = train_net._unwrap(trainer.model)
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    before = {{n: p.detach().clone() for n, p in model.named_parameters()}}
    trainer.train()
    after = dict(model.named_parameters())
    changed = [n for n, p in after.items() if not torch.equal(p, before[n])]
    torch.save({{"trainable": {{n: p.detach() for n, p in after.items() if p.requires_grad}},
                "frozen_changed": [n for n in changed if not after[n].requires_grad],
                "trainable_changed": [n for n in changed if after[n].requires_grad]}},
               f"{{out}}/rank{{comm.get_rank()}}.pt")

if __name__ == "__main__":
    launch(worker, 2, dist_url="auto", args=(sys.argv[2:], sys.argv[1]))
"""


@pytest.mark.slow
def test_two_process_gloo_training(env, tmp_path):
    _, root = env
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(tools=str(ROOT / "tools"))))
    argv = ["--config-file", str(PEFT_DIR / "lora_adapters.yaml"), "OUTPUT_DIR", str(tmp_path / "out"), *OPTS,
            "SOLVER.MAX_ITER", "3"]
    env_vars = {**os.environ, "DETECTRON2_DATASETS": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(driver), str(tmp_path), *argv], env=env_vars, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["frozen_changed"] == [] and r1["frozen_changed"] == []
    assert len(r0["trainable_changed"]) == len(r0["trainable"]) > 0
    for name, t in r0["trainable"].items():
        assert torch.equal(t, r1["trainable"][name]), name
