"""peft_d2.evaluation.PanopticEvaluator (torchmetrics' PanopticQuality) against PQ computed by hand on two
fabricated 10x10 images in the COCO panoptic format (PNG + JSON), and its selection by tools/train_net.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("torchmetrics")

import torch  # noqa: E402
from _models import load_tool  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from peft_d2.evaluation import PanopticEvaluator, rgb_to_id  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# dataset category ids: 0 wall and 3 sky, 4 road (stuff); 1 person, 2 car (things). 0 is a real category, as in
# ADE20K; contiguous ids index all classes, as in Mask2Former's registrations.
THINGS, STUFF = {1: 1, 2: 2}, {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}


def _id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _write_png(path: Path, ids: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(_id2rgb(ids)).save(path)


def _sample(root: Path) -> None:
    """Two images; segment ids above 255 use the green channel."""
    pan = root / "panoptic"
    pan.mkdir(parents=True)
    a = np.zeros((10, 10), np.int64)
    a[0:5] = 1  # wall, 50 px
    a[5:, 0:5] = 300  # person, 25 px
    a[5:, 5:] = 301  # car, 25 px
    b = np.zeros((10, 10), np.int64)
    b[0:4] = 7  # sky, 40 px; row 4 is void (id 0)
    b[5:, 0:5] = 8  # person, 25 px
    b[5:, 5:] = 9  # car crowd, 25 px
    _write_png(pan / "a.png", a)
    _write_png(pan / "b.png", b)
    js = {
        "images": [{"id": 11, "file_name": "a.jpg", "height": 10, "width": 10},
                   {"id": 12, "file_name": "b.jpg", "height": 10, "width": 10}],
        "annotations": [
            {"image_id": 11, "file_name": "a.png", "segments_info": [
                {"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 300, "category_id": 1, "iscrowd": 0},
                {"id": 301, "category_id": 2, "iscrowd": 0}]},
            {"image_id": 12, "file_name": "b.png", "segments_info": [
                {"id": 7, "category_id": 3, "iscrowd": 0}, {"id": 8, "category_id": 1, "iscrowd": 0},
                {"id": 9, "category_id": 2, "iscrowd": 1}]},
        ],
        "categories": [{"id": i, "name": n, "isthing": int(i in THINGS)}
                       for i, n in enumerate(["wall", "person", "car", "sky", "road"])],
    }
    (root / "panoptic.json").write_text(json.dumps(js))


def _predictions():
    """Image a: detectron2's (panoptic_img, segments_info) with contiguous ids; image b: label-divisor ids."""
    a = torch.zeros(10, 10, dtype=torch.int32)
    a[0:4] = 1  # wall, 40 px; row 4 predicted void (0)
    a[5:, 0:4] = 2  # person, 20 px: IoU 20/25
    a[5:, 4:] = 3  # car, 30 px: IoU 25/30
    info_a = [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 1, "isthing": True},
              {"id": 3, "category_id": 2, "isthing": True}]
    b = torch.empty(10, 10, dtype=torch.int32)
    b[0:3] = 3 * 1000  # sky, 30 px: IoU 30/40 (void row 4 is not in the union)
    b[3:5] = 0 * 1000  # wall, 20 px: half on sky, half on void -> a false positive (void share 0.5, not > 0.5)
    b[5:, 0:2] = 1 * 1000 + 1  # person, 10 px: IoU 10/25 -> unmatched: one FP and one FN for person
    b[5:, 2:] = 2 * 1000 + 1  # car, 40 px: 25 px on the crowd car (void) -> 0.625 void, so not a false positive
    return [{"panoptic_seg": (a, info_a)}, {"panoptic_seg": (b, None)}]


# Per class (torchmetrics' conventions; see datasets/README.md):
#   wall:   a TP with IoU 40/40 (the prediction's void row 4 leaves the union), b one FP -> SQ 1, RQ 1/1.5
#   person: a TP with IoU 0.8; b one FP and one FN -> SQ 0.8, RQ 1/2
#   car:    a TP with IoU 25/30; b nothing (crowd is void, the car prediction mostly on it) -> SQ 5/6, RQ 1
#   sky:    b TP with IoU 30/40 -> SQ 0.75, RQ 1
#   road:   neither ground truth nor prediction: left out of every mean
_PER_CLASS = {"wall": (1.0, 2 / 3), "person": (0.8, 0.5), "car": (5 / 6, 1.0), "sky": (0.75, 1.0)}


def _mean(names, i):
    vals = [(sq * rq, sq, rq)[i] for n, (sq, rq) in _PER_CLASS.items() if n in names]
    return 100 * sum(vals) / len(vals)


EXPECTED = {
    f"{m}{suffix}": _mean(names, i)
    for suffix, names in (("", _PER_CLASS), ("_th", ("person", "car")), ("_st", ("wall", "sky")))
    for i, m in enumerate(("PQ", "SQ", "RQ"))
}


@pytest.fixture
def dataset(tmp_path):
    _sample(tmp_path)
    name = f"peft_d2_test_panoptic_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        panoptic_json=str(tmp_path / "panoptic.json"), panoptic_root=str(tmp_path / "panoptic"),
        thing_dataset_id_to_contiguous_id=THINGS, stuff_dataset_id_to_contiguous_id=STUFF, label_divisor=1000,
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_pq_matches_hand_computation(dataset, tmp_path):
    ev = PanopticEvaluator(dataset, output_dir=str(tmp_path))
    ev.reset()
    ev.process([{"image_id": 11}, {"image_id": 12}], _predictions())
    res = ev.evaluate()["panoptic_seg"]
    assert res == pytest.approx(EXPECTED, abs=1e-4)
    per_class = json.loads((tmp_path / "panoptic_per_class.json").read_text())
    assert sorted(per_class) == ["0", "1", "2", "3"]  # road (4) counted nowhere
    assert per_class["1"] == pytest.approx({"PQ": 40.0, "SQ": 80.0, "RQ": 50.0})
    ev.reset()  # a second pass starts from nothing
    ev.process([{"image_id": 11}], _predictions()[:1])
    assert ev.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100 * (1 + 0.8 + 5 / 6) / 3, abs=1e-4)


def test_ground_truth_decoding(dataset):
    gt = PanopticEvaluator(dataset).ground_truth(12)
    assert gt.shape == (10, 10, 2)
    assert gt[0, 0].tolist() == [3, 7] and gt[4, 0].tolist() == [-1, 0]  # sky; void
    assert gt[9, 9].tolist()[0] == -1  # the crowd car is void
    assert rgb_to_id(_id2rgb(np.array([[300, 70000]]))).tolist() == [[300, 70000]]


def test_bad_inputs_name_the_problem(dataset, tmp_path):
    ev = PanopticEvaluator(dataset)
    with pytest.raises(KeyError, match=r"image_id 99 .* has no annotation in .*panoptic.json"):
        ev.process([{"image_id": 99}], _predictions()[:1])
    pred = torch.ones(10, 10, dtype=torch.int32) * 5
    with pytest.raises(ValueError, match=r"segment ids \[5\] appear in the image but not in segments_info"):
        ev.process([{"image_id": 11}], [{"panoptic_seg": (pred, [])}])
    with pytest.raises(ValueError, match=r"categories \['7'\], which are not categories of dataset"):
        ev.process([{"image_id": 11}], [{"panoptic_seg": (pred, [{"id": 5, "category_id": 7}])}])
    with pytest.raises(ValueError, match=r"categories \['contiguous id 9'\]"):
        ev.process([{"image_id": 11}], [{"panoptic_seg": (pred, [{"id": 5, "category_id": 9, "isthing": True}])}])
    with pytest.raises(ValueError, match="differ in size"):
        ev.process([{"image_id": 11}], [{"panoptic_seg": (torch.zeros(5, 5, dtype=torch.int32), [])}])
    DatasetCatalog.register("peft_d2_test_panoptic_nometa", lambda: [])
    try:
        with pytest.raises(ValueError, match="'peft_d2_test_panoptic_nometa' has no 'panoptic_json'"):
            PanopticEvaluator("peft_d2_test_panoptic_nometa")
    finally:
        DatasetCatalog.remove("peft_d2_test_panoptic_nometa")
        MetadataCatalog.remove("peft_d2_test_panoptic_nometa")


@pytest.mark.parametrize("etype", ["coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg"])
def test_train_net_selects_it_by_evaluator_type(dataset, tmp_path, etype):
    train_net = load_tool("train_net.py", "peft_d2_train_net_pq")
    from detectron2.config import get_cfg

    cfg = get_cfg()
    for fn in train_net.CONFIG_FUNCTIONS:
        fn(cfg)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    t = cfg.MODEL.MASK_FORMER.TEST
    t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON = False, False, True
    MetadataCatalog.get(dataset).evaluator_type = etype
    ev = train_net.build_evaluators(cfg, dataset)
    assert isinstance(ev, PanopticEvaluator)
    ev.reset()
    ev.process([{"image_id": 11}, {"image_id": 12}], _predictions())
    assert ev.evaluate()["panoptic_seg"] == pytest.approx(EXPECTED, abs=1e-4)
