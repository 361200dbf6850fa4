"""A COCO-format dataset of one's own without writing Python: tools/train_net.py --dataset
NAME=ANNOTATIONS.json:IMAGE_ROOT and DATASETS.COCO_INSTANCES (peft_d2/data/datasets/coco_instances.py).

End to end: a tiny dataset written here, a 2-iteration training on 2 DDP processes (gloo, CPU) through the script,
whose workers register the dataset themselves, with the number of classes taken from the file; then an
evaluation from the run's own config.yaml, which names the dataset. And each error: a malformed spec, a missing
file or folder, a name clash, a class count that disagrees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from _models import load_tool, write_coco_dataset  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from peft_d2.data import DatasetNotFoundError, MalformedAnnotationError  # noqa: E402
from peft_d2.data.datasets.coco_instances import parse_coco_spec  # noqa: E402
from peft_d2.errors import PeftConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "synthetic" / "maskformer2_swin_micro_bs4_A.yaml")  # 4 classes
# category ids need not be 1..K: detectron2 maps them to 0..K-1 in id order
CATEGORIES = [{"id": 7, "name": "cell"}, {"id": 3, "name": "nucleus"}, {"id": 11, "name": "debris"}]
OPTS = [
    "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Train and val splits of a 3-class dataset; returns (folder, train spec, val spec)."""
    d = tmp_path_factory.mktemp("own")
    write_coco_dataset(d / "train.json", d / "images", 4, CATEGORIES, seed=1)
    write_coco_dataset(d / "val.json", d / "val_images", 2, CATEGORIES, seed=2)
    return d, f"cells_train={d / 'train.json'}:{d / 'images'}", f"cells_val={d / 'val.json'}:{d / 'val_images'}"


@pytest.fixture(scope="module")
def train_net():
    return load_tool()


def _setup(train_net, *argv):
    return train_net.setup(train_net.argument_parser().parse_args(["--config-file", CONFIG, *argv]))


@pytest.mark.parametrize("spec, expected", [
    ("cells=a/train.json:a/images", ("cells", "a/train.json", "a/images")),
    ("cells=/d/x:y.json:/d/images", ("cells", "/d/x:y.json", "/d/images")),  # the folder follows the last ':'
])
def test_spec_parses(spec, expected):
    assert parse_coco_spec(spec) == expected


@pytest.mark.parametrize("spec", ["cells", "cells=a.json", "=a.json:imgs", "cells=:imgs", "cells=a.json:", " c=a:b"])
def test_malformed_spec_is_a_usage_error(train_net, spec, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_net.argument_parser().parse_args(["--config-file", CONFIG, "--dataset", spec])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dataset" in err and f"expected NAME=ANNOTATIONS.json:IMAGE_ROOT, got {spec!r}" in err
    with pytest.raises(PeftConfigError, match="DATASETS.COCO_INSTANCES / --dataset: expected"):  # the config key
        _setup(train_net, "DATASETS.COCO_INSTANCES", f"['{spec}']")


def test_missing_files_are_named(train_net, own, tmp_path):
    d, _, _ = own
    with pytest.raises(DatasetNotFoundError, match=f"the annotation file '{tmp_path / 'nope.json'}' does not exist"):
        _setup(train_net, "--dataset", f"x={tmp_path / 'nope.json'}:{d / 'images'}")
    with pytest.raises(DatasetNotFoundError, match=f"the image folder '{tmp_path / 'nope'}' does not exist"):
        _setup(train_net, "--dataset", f"x={d / 'train.json'}:{tmp_path / 'nope'}")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(MalformedAnnotationError, match=r"lacks the top-level key\(s\) \['annotations', 'categories'\]"):
        _setup(train_net, "--dataset", f"x={tmp_path / 'bad.json'}:{d / 'images'}")
    (tmp_path / "empty.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(MalformedAnnotationError, match="has no categories; the model's classes are taken from them"):
        _setup(train_net, "--dataset", f"x={tmp_path / 'empty.json'}:{d / 'images'}")


def test_name_clashes(train_net, own):
    d, train, _ = own
    clash = f"synthetic_A_train={d / 'train.json'}:{d / 'images'}"  # a peft_d2 dataset
    with pytest.raises(PeftConfigError, match="a dataset named 'synthetic_A_train' is already registered"):
        _setup(train_net, "--dataset", clash)
    builtin = f"coco_2017_val={d / 'train.json'}:{d / 'images'}"
    with pytest.raises(PeftConfigError, match="a dataset named 'coco_2017_val' is already registered"):
        _setup(train_net, "--dataset", builtin)
    other = f"cells_train={d / 'val.json'}:{d / 'val_images'}"
    with pytest.raises(PeftConfigError, match=r"the name\(s\) \['cells_train'\] are given to different files"):
        _setup(train_net, "--dataset", train, "--dataset", other)


def test_number_of_classes_comes_from_the_file(train_net, own, tmp_path):
    d, train, val = own
    used = ["DATASETS.TRAIN", "('cells_train',)", "DATASETS.TEST", "('cells_val',)", "OUTPUT_DIR", str(tmp_path)]
    cfg = _setup(train_net, "--dataset", train, "--dataset", val, "--dataset", train, *used)  # a repeat is one
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3  # the config file says 4
    assert list(cfg.DATASETS.COCO_INSTANCES) == [train, val]
    meta = MetadataCatalog.get("cells_train")
    assert meta.thing_classes == ["nucleus", "cell", "debris"]  # in id order
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2} and meta.evaluator_type == "coco"
    records = DatasetCatalog.get("cells_train")
    assert len(records) == 4 and {a["category_id"] for r in records for a in r["annotations"]} <= {0, 1, 2}
    # the same count on the command line is fine, another is an error, not a silent override
    assert _setup(train_net, "--dataset", train, *used, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3").MODEL.SEM_SEG_HEAD
    with pytest.raises(PeftConfigError, match=r"MODEL.SEM_SEG_HEAD.NUM_CLASSES 5 is set on the command line, but "
                       r"'cells_train' has 3 classes \['nucleus', 'cell', 'debris'\] in its annotation file"):
        _setup(train_net, "--dataset", train, "--dataset", val, *used, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5")
    # a dataset that training and testing do not use leaves the count alone
    assert _setup(train_net, "--dataset", train, "OUTPUT_DIR", str(tmp_path)).MODEL.SEM_SEG_HEAD.NUM_CLASSES == 4
    # training and test datasets must have the same classes
    write_coco_dataset(tmp_path / "two.json", tmp_path / "images", 1, CATEGORIES[:2])
    two = f"two={tmp_path / 'two.json'}:{tmp_path / 'images'}"
    with pytest.raises(PeftConfigError, match=r"'cells_train' has the classes .* but 'two' has \['nucleus', 'cell'\]"):
        _setup(train_net, "--dataset", train, "--dataset", two, "DATASETS.TRAIN", "('cells_train',)",
               "DATASETS.TEST", "('two',)", "OUTPUT_DIR", str(tmp_path))


@pytest.mark.slow
def test_two_process_training_and_evaluation_through_the_script(train_net, own, tmp_path):
    """--num-gpus 2 on CPU: each spawned worker runs setup() and registers the dataset (nothing from the parent
    process reaches it); then --eval-only from the run's config.yaml, which carries DATASETS.COCO_INSTANCES."""
    d, train, val = own
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", CONFIG, "--num-gpus", "2",
            "--dataset", train, "--dataset", val, "DATASETS.TRAIN", "('cells_train',)", "DATASETS.TEST",
            "('cells_val',)", "OUTPUT_DIR", str(out), *OPTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(tmp_path / "none")}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Dataset 'cells_train': COCO instances of {d / 'train.json'}, images in {d / 'images'}, 3 classes" in log
    head = torch.load(out / "model_final.pth", weights_only=False)["model"]["sem_seg_head.predictor.class_embed.weight"]
    assert head.shape[0] == 3 + 1  # the file's classes and "no object"
    trained = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert trained and {p["category_id"] for p in trained} <= {3, 7, 11}  # back to the file's ids

    res = train_net.main(train_net.argument_parser().parse_args(
        ["--config-file", str(out / "config.yaml"), "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
         "OUTPUT_DIR", str(out / "eval")]))
    assert 0.0 <= res["segm"]["AP"] <= 100.0
    evaluated = json.loads((out / "eval" / "inference" / "coco_instances_results.json").read_text())
    key = lambda p: (p["image_id"], p["category_id"], p["score"])  # noqa: E731
    assert [key(p)[:2] for p in sorted(evaluated, key=key)] == [key(p)[:2] for p in sorted(trained, key=key)]
    assert [p["score"] for p in sorted(evaluated, key=key)] == pytest.approx(
        [p["score"] for p in sorted(trained, key=key)], abs=1e-5)
