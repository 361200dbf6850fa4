"""Cityscapes through `tools/train_net.py --eval-only`: detectron2's builtin splits
`cityscapes_fine_{instance_seg,sem_seg}_val` on two images fabricated in Cityscapes' on-disk layout, evaluated by
detectron2's Cityscapes evaluators (cityscapesscripts), for a model whose predictions are the ground truth with known
perturbations. The expected instance AP and semantic mIoU are worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("cityscapesscripts")
pytest.importorskip("shapely")

import torch  # noqa: E402
from _models import load_tool, register_oracle  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from PIL import Image  # noqa: E402

# cityscapesscripts 2.3.0 calls np.in1d
pytestmark = pytest.mark.filterwarnings("ignore:`in1d` is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 128
# Cityscapes label ids (cityscapesscripts.helpers.labels): id, trainId
SKY, BUILDING, ROAD, EGO, CAR, PERSON = 23, 11, 7, 1, 26, 24
TRAIN_ID = {SKY: 10, BUILDING: 2, ROAD: 0, EGO: 255, CAR: 13, PERSON: 11}
CAR1 = (slice(36, 56), slice(8, 28))  # 20 x 20 = 400 px each
CAR2 = (slice(36, 56), slice(40, 60))
PERSON1 = (slice(30, 50), slice(80, 100))  # crosses building (rows 30-31) and road
IMAGES = ("frankfurt_000000_000294", "frankfurt_000001_000019")


def _box(sl) -> list[list[int]]:
    (r, c) = sl
    return [[c.start, r.start], [c.stop - 1, r.start], [c.stop - 1, r.stop - 1], [c.start, r.stop - 1]]


def _label_maps():
    """{image: (labelIds, instanceIds, polygons)}. Image 1: sky, building, road, ego vehicle (void, bottom rows),
    two cars and a person; image 2: sky and road only."""
    out = {}
    lab = np.zeros((H, W), np.uint8)
    lab[0:16], lab[16:32], lab[32:60], lab[60:] = SKY, BUILDING, ROAD, EGO
    inst = lab.astype(np.uint16)
    objects = [("sky", (slice(0, 16), slice(0, W))), ("building", (slice(16, 32), slice(0, W))),
               ("road", (slice(32, 60), slice(0, W))), ("ego vehicle", (slice(60, H), slice(0, W)))]
    for k, (name, label, sl) in enumerate([("car", CAR, CAR1), ("car", CAR, CAR2), ("person", PERSON, PERSON1)]):
        lab[sl] = label
        inst[sl] = label * 1000 + (k if label == CAR else 0)
        objects.append((name, sl))
    out[IMAGES[0]] = (lab, inst, objects)
    lab = np.full((H, W), ROAD, np.uint8)
    lab[0:32] = SKY
    out[IMAGES[1]] = (lab, lab.astype(np.uint16), [("sky", (slice(0, 32), slice(0, W))),
                                                    ("road", (slice(32, H), slice(0, W)))])
    return out


def _fabricate(root: Path) -> None:
    """cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png and gtFine/val/<city>/*_gtFine_{labelIds,instanceIds,
    labelTrainIds}.png, *_gtFine_polygons.json (later polygons drawn over earlier ones, as in Cityscapes)."""
    for stem, (lab, inst, objects) in _label_maps().items():
        city = stem.split("_")[0]
        img_dir = root / "cityscapes" / "leftImg8bit" / "val" / city
        gt_dir = root / "cityscapes" / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(lab).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
        train = np.vectorize(TRAIN_ID.get)(lab).astype(np.uint8)
        Image.fromarray(train).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
        polygons = {"imgHeight": H, "imgWidth": W,
                    "objects": [{"label": name, "polygon": _box(sl)} for name, sl in objects]}
        (gt_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))


def _predictions():
    """Per image: instances and per-pixel trainId logits.

    Instances (image 1): car 1 exactly (score 0.9); the person without a 9 x 10 block (IoU 310/400 = 0.775, score
    0.8); car 2 missed. Image 2: none.
    Semantic: the ground truth, except sky rows 12-15 of image 1 predicted building (512 px), car 2 predicted road
    (400 px), and the ego-vehicle rows (void) predicted road.
    """
    maps = _label_maps()
    out = {}
    for stem, (lab, _, _) in maps.items():
        train = np.vectorize(TRAIN_ID.get)(lab)
        train[train == 255] = TRAIN_ID[ROAD]
        inst = Instances((H, W))
        masks, classes, scores = [], [], []
        if stem == IMAGES[0]:
            train[12:16] = TRAIN_ID[BUILDING]
            train[CAR2] = TRAIN_ID[ROAD]
            car = np.zeros((H, W), bool)
            car[CAR1] = True
            person = np.zeros((H, W), bool)
            person[PERSON1] = True
            person[40:49, 80:90] = False
            masks, classes, scores = [car, person], [2, 0], [0.9, 0.8]  # thing_classes: person 0, car 2
        inst.pred_masks = torch.from_numpy(np.array(masks, bool).reshape(-1, H, W))
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inst.scores = torch.tensor(scores)
        inst.pred_boxes = Boxes(torch.zeros(len(classes), 4))
        logits = torch.nn.functional.one_hot(torch.from_numpy(train), 19).permute(2, 0, 1).float()
        out[f"{stem}_leftImg8bit.png"] = {"instances": inst, "sem_seg": logits}
    return out


register_oracle("PeftD2TestCityscapesOracle", _predictions)  # returns _predictions() for each image


# Instance AP (cityscapesscripts: 10 IoU thresholds 0.5:0.95, AP averaged over classes with ground truth):
#   car: one of two instances found with the top score at every threshold -> precision 1 up to recall 1/2 -> 0.5
#   person: matched while 0.775 > threshold (0.50 ... 0.75: 6 of 10) -> 1 there, 0 at the other 4
EXPECTED_AP = 100 * (10 * 0.5 + 6 * 1.0) / 20
EXPECTED_AP50 = 100 * (0.5 + 1.0) / 2
# Semantic IoU over both images (void pixels ignored; classes absent from ground truth and prediction left out):
#   sky 6144 px, 512 of them predicted building: 5632 / 6144; building 2008 px (40 are the person) + 512 FP
#   road 6520 px + 400 FP (car 2); car 400 / 800; person 400 / 400
EXPECTED_MIOU = 100 * (5632 / 6144 + 2008 / 2520 + 6520 / 6920 + 400 / 800 + 1.0) / 5


@pytest.fixture
def cityscapes_root(tmp_path, monkeypatch):
    """Re-point detectron2's builtin Cityscapes splits at a fabricated root for the test, then restore them."""
    from detectron2.data.datasets.builtin import register_all_cityscapes

    names = [f"cityscapes_fine_{t}_{s}" for t in ("instance_seg", "sem_seg") for s in ("train", "val", "test")]
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n)) for n in names}
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
    _fabricate(tmp_path)
    register_all_cityscapes(str(tmp_path))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # cityscapesscripts writes matches.json into the working directory
    yield tmp_path
    for n, (loader, meta) in saved.items():
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
        DatasetCatalog.register(n, loader)
        MetadataCatalog[n] = meta


def test_eval_only_reports_cityscapes_ap_and_miou(cityscapes_root):
    train_net = load_tool("train_net.py", "peft_d2_train_net_cs")
    config = cityscapes_root / "oracle.yaml"
    config.write_text(
        "MODEL:\n  META_ARCHITECTURE: PeftD2TestCityscapesOracle\n  DEVICE: cpu\n  WEIGHTS: ''\n"
        "DATASETS:\n  TRAIN: ()\n  TEST: ('cityscapes_fine_instance_seg_val', 'cityscapes_fine_sem_seg_val')\n"
        "DATALOADER:\n  NUM_WORKERS: 0\nINPUT:\n  MIN_SIZE_TEST: 64\n  MAX_SIZE_TEST: 128\n"
    )
    argv = ["--config-file", str(config), "--eval-only", "--num-gpus", "1", "OUTPUT_DIR", str(cityscapes_root / "out")]
    res = train_net.main(train_net.default_argument_parser().parse_args(argv))
    inst = res["cityscapes_fine_instance_seg_val"]["segm"]
    assert inst["AP"] == pytest.approx(EXPECTED_AP) and inst["AP50"] == pytest.approx(EXPECTED_AP50)
    sem = res["cityscapes_fine_sem_seg_val"]["sem_seg"]
    assert sem["IoU"] == pytest.approx(EXPECTED_MIOU)
