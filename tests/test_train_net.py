"""tools/train_net.py end to end on CPU: train the micro Mask2Former on a fabricated synthetic dataset, evaluate
with COCOEvaluator, re-evaluate the saved checkpoint with --eval-only, and continue with --resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from _models import load_tool  # noqa: E402

# pycocotools under numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "synthetic" / "maskformer2_swin_micro_bs4_A.yaml")
ITERS = 40
# 64 px images, batch 2, no loader workers: about a quarter of a second per iteration on 2 cores
OPTS = [
    "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0005", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "20", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "SEED", "1",
]  # fmt: skip


def _args(train_net, out_dir, *extra, opts=()):
    argv = ["--config-file", CONFIG, "--num-gpus", "1", *extra, "OUTPUT_DIR", str(out_dir), *OPTS, *opts]
    return train_net.default_argument_parser().parse_args(argv)


def _metrics(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]
    return [r for r in rows if "total_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from peft_d2.data.synthetic import generate_split

    data_root = tmp_path_factory.mktemp("d2datasets")
    generate_split(str(data_root / "synthetic"), "A", "train", 16, image_size=64, seed=3)
    generate_split(str(data_root / "synthetic"), "A", "val", 6, image_size=64, seed=3, mask_format="polygon")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(data_root))
        train_net = load_tool()
        train_net.Trainer.log_period = 1
        out_dir = tmp_path_factory.mktemp("train_out")
        results = train_net.main(_args(train_net, out_dir, opts=["SOLVER.MAX_ITER", str(ITERS)]))
        yield train_net, out_dir, results


@pytest.mark.slow
def test_loss_falls(trained):
    _, out_dir, _ = trained
    rows = _metrics(out_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERS))
    losses = [r["total_loss"] for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(math.isfinite(x) for x in losses)
    assert last < 0.85 * first, f"loss did not fall: first five {losses[:5]}, last five {losses[-5:]}"


@pytest.mark.slow
def test_coco_evaluator_reports_ap(trained):
    _, out_dir, results = trained
    segm = results["segm"]  # one test dataset: DefaultTrainer.test returns its results directly
    assert math.isfinite(segm["AP"]) and 0.0 <= segm["AP"] <= 100.0
    assert (out_dir / "inference" / "coco_instances_results.json").is_file()
    assert (out_dir / "model_final.pth").is_file()


@pytest.mark.slow
def test_eval_only_reproduces_final_evaluation(trained):
    train_net, out_dir, results = trained
    weights = str(out_dir / "model_final.pth")
    res = train_net.main(_args(train_net, out_dir / "eval", "--eval-only", opts=["MODEL.WEIGHTS", weights]))
    assert res["segm"]["AP"] == pytest.approx(results["segm"]["AP"], abs=1e-6)


@pytest.mark.slow
def test_resume_continues_iterations(trained):
    train_net, out_dir, _ = trained
    assert (out_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    n_before = len(_metrics(out_dir))
    train_net.main(_args(train_net, out_dir, "--resume", opts=["SOLVER.MAX_ITER", str(ITERS + 6)]))
    new_iters = [r["iteration"] for r in _metrics(out_dir)[n_before:]]
    assert new_iters == list(range(ITERS, ITERS + 6)), new_iters


@pytest.mark.slow
def test_semantic_config_trains_and_reports_miou(trained, tmp_path):
    train_net, _, _ = trained
    config = str(ROOT / "configs" / "synthetic" / "maskformer2_swin_micro_bs4_sem_A.yaml")
    argv = ["--config-file", config, "OUTPUT_DIR", str(tmp_path), *OPTS, "SOLVER.MAX_ITER", "3"]
    argv += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(64, 64)", "INPUT.SIZE_DIVISIBILITY", "64"]
    res = train_net.main(train_net.default_argument_parser().parse_args(argv))
    assert math.isfinite(res["sem_seg"]["mIoU"]) and 0.0 <= res["sem_seg"]["mIoU"] <= 100.0


# ------------------------------------------------------------------------------------ fast unit tests


@pytest.fixture(scope="module")
def train_net_module():
    return load_tool()


def _solver_cfg(train_net_module, **solver):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    for fn in train_net_module.CONFIG_FUNCTIONS:
        fn(cfg)
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for k, v in solver.items():
        node = cfg.SOLVER
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _toy_model():
    import torch
    from torch import nn

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.query_embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 2)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.tied = self.head  # a shared module: its parameters must be counted once

    return Toy()


def test_param_groups_multiplier_decay_and_trainable_only(train_net_module):
    cfg = _solver_cfg(train_net_module)
    model = _toy_model()
    groups = {g["name"]: g for g in train_net_module.optimizer_param_groups(cfg, model)}
    assert not any(n.startswith("frozen") for n in groups)  # requires_grad=False stays out
    assert len(groups) == 8  # backbone.proj (2), backbone.norm (2), table, embedding, head (2)
    assert groups["backbone.proj.weight"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone.proj.weight"]["weight_decay"] == 0.05
    assert groups["backbone.norm.weight"]["weight_decay"] == 0.0
    assert groups["backbone.relative_position_bias_table"]["weight_decay"] == 0.0
    assert groups["query_embed.weight"]["weight_decay"] == 0.0
    assert groups["head.weight"]["lr"] == pytest.approx(1e-3) and groups["head.weight"]["weight_decay"] == 0.05


def test_full_model_gradient_clipping(train_net_module):
    import torch

    cfg = _solver_cfg(
        train_net_module,
        **{"CLIP_GRADIENTS.ENABLED": True, "CLIP_GRADIENTS.CLIP_TYPE": "full_model", "CLIP_GRADIENTS.CLIP_VALUE": 0.01},
    )
    model = _toy_model()
    opt = train_net_module.build_optimizer_from_trainable(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert total.item() == pytest.approx(0.01, rel=1e-4)  # clipped jointly, in step()


def test_no_trainable_parameters_is_an_error(train_net_module):
    model = _toy_model().requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameters"):
        train_net_module.build_optimizer_from_trainable(_solver_cfg(train_net_module), model)


def test_sgd_and_unknown_optimizer(train_net_module):
    import torch

    opt = train_net_module.build_optimizer_from_trainable(_solver_cfg(train_net_module, OPTIMIZER="SGD"), _toy_model())
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ValueError, match="ADAMW"):
        train_net_module.build_optimizer_from_trainable(_solver_cfg(train_net_module, OPTIMIZER="LAMB"), _toy_model())


@pytest.mark.parametrize(
    "dataset, module",
    [
        ("lvis_v1_val", "lvis"),
        ("coco_2017_val_panoptic", "torchmetrics"),
        ("cityscapes_fine_sem_seg_val", "cityscapesscripts"),
    ],
)
def test_missing_evaluation_package_is_a_clear_error(train_net_module, tmp_path, monkeypatch, dataset, module):
    find_spec = importlib.util.find_spec  # the package is installed here: hide it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    cfg = _solver_cfg(train_net_module)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    with pytest.raises(RuntimeError, match=f"'{module}' package, which is not installed"):
        train_net_module.build_evaluators(cfg, dataset)


def test_evaluator_for_unknown_type(train_net_module, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register("peft_d2_test_no_evaluator", lambda: [])
    MetadataCatalog.get("peft_d2_test_no_evaluator").evaluator_type = "pascal_voc"
    cfg = _solver_cfg(train_net_module)
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(NotImplementedError, match="peft_d2_test_no_evaluator"):
        train_net_module.build_evaluators(cfg, "peft_d2_test_no_evaluator")


def test_ade20k_panoptic_instance_evaluation_renumbers_things(train_net_module, tmp_path):
    """A panoptic model's instance predictions use all-150-class ids; perfect thing masks must score AP 100."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances
    from test_datasets_prepare import _ade_sample, _script

    from peft_d2.data import register_all_datasets

    _ade_sample(tmp_path, "validation", "ADE_val_00000001", 0)
    _ade_sample(tmp_path, "training", "ADE_train_00000001", 0)
    for name in ("prepare_ade20k_sem_seg", "prepare_ade20k_ins_seg", "prepare_ade20k_pan_seg"):
        assert _script(name).main(["--dataset-dir", str(tmp_path)]) == 0
    try:
        register_all_datasets(str(tmp_path))
        cfg = _solver_cfg(train_net_module)
        cfg.OUTPUT_DIR = str(tmp_path / "out")
        t = cfg.MODEL.MASK_FORMER.TEST
        t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON = False, True, False
        evaluator = train_net_module.build_evaluators(cfg, "ade20k_panoptic_val")
        assert isinstance(evaluator, train_net_module.ThingSubsetCOCOEvaluator)
        d = DatasetCatalog.get("ade20k_panoptic_val")[0]
        masks = torch.zeros(3, 32, 40, dtype=torch.bool)
        masks[0, 12:20, 5:15] = True
        masks[1, 12:20, 25:35] = True
        masks[2, :10] = True  # a stuff ("sky", class 2) prediction: not an instance, must be dropped
        inst = Instances((32, 40))
        inst.pred_masks = masks
        inst.pred_boxes = Boxes(torch.zeros(3, 4))
        inst.scores = torch.tensor([0.9, 0.8, 0.95])
        inst.pred_classes = torch.tensor([12, 12, 2])
        evaluator.reset()
        evaluator.process([{"image_id": d["image_id"], "file_name": d["file_name"]}], [{"instances": inst}])
        res = evaluator.evaluate()
        assert res["segm"]["AP"] == pytest.approx(100.0)
    finally:
        register_all_datasets()


def test_command_line_mistakes_are_named_before_anything_runs(train_net_module, tmp_path, monkeypatch, capsys):
    """A misspelt key gets the closest valid keys; --adapter after the KEY VALUE overrides is a usage error
    (argparse had handed it to the overrides: "Non-existent key: --adapter")."""
    from peft_d2.errors import PeftConfigError

    monkeypatch.setattr(train_net_module, "launch", lambda *a, **k: pytest.fail("launched"))
    peft = str(ROOT / "configs" / "synthetic" / "peft" / "lora_backbone.yaml")
    with pytest.raises(SystemExit) as e:
        train_net_module.run(["--config-file", peft, "--eval-only", "MODEL.WEIGHTS", "base.pth", "--adapter", "a=a.st"])
    assert e.value.code == 2
    assert ("error: option --adapter after the KEY VALUE config overrides (they start at "
            "'MODEL.WEIGHTS'), where it would be read as a config key: options go before the KEY VALUE "
            "overrides") in capsys.readouterr().err
    args = train_net_module.argument_parser().parse_args(
        ["--config-file", peft, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.PEFT.LORA.RANKK", "4"])
    with pytest.raises(PeftConfigError, match=r"^Non-existent config key MODEL.PEFT.LORA.RANKK on the command line "
                       r"\(KEY VALUE overrides\); closest valid keys: MODEL.PEFT.LORA.RANK, "):
        train_net_module.setup(args)
    assert not (tmp_path / "out").exists()  # refused before the run's set-up


def test_adapter_summary_has_a_row_per_adapter_dataset_and_task(train_net_module):
    segm = {"AP": 41.25, "AP50": 60.0, "AP75": float("nan"), "AP-stripes": 12.0}
    results = {"cells": {"cells_val": {"segm": segm, "sem_seg": {"mIoU": 70.5, "IoU-cell": 70.5}}},
               "roads": {"roads_val": {"segm": {"AP": 9.0, "AP50": 20.0, "AP75": 5.0}}}}
    assert train_net_module.adapter_summary(results).splitlines() == [  # per-category metrics ('AP-stripes') left out
        "| adapter   | dataset   | task    |     AP |   AP50 |   AP75 |   mIoU |",
        "|:----------|:----------|:--------|-------:|-------:|-------:|-------:|",
        "| cells     | cells_val | segm    | 41.250 | 60.000 |    nan |        |",
        "| cells     | cells_val | sem_seg |        |        |        | 70.500 |",
        "| roads     | roads_val | segm    |  9.000 | 20.000 |  5.000 |        |",
    ]
    assert train_net_module.adapter_summary({"cells": {"cells_val": {}}}) == "(the evaluators returned no results)"
