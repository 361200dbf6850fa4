"""LVIS through `tools/train_net.py --eval-only`: detectron2's builtin `lvis_v1_val` on two images and an annotation
file fabricated in the LVIS v1 format (COCO images under coco/val2017, lvis/lvis_v1_val.json), evaluated by
detectron2's LVISEvaluator (the `lvis` package) for a model whose predictions are the ground truth but one missed
instance. The expected APs are worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("lvis")

import torch  # noqa: E402
from _models import load_tool, register_oracle  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from PIL import Image  # noqa: E402

pytestmark = [
    # pycocotools under numpy 2 warns on every mask decode; lvis 0.5.3 calls Logger.warn
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
# LVIS category id -> frequency group (ids 1..3 of LVIS v1: frequent, common, rare here)
FREQUENCY = {1: "f", 2: "c", 3: "r"}
# image id -> [(category id, (x0, y0, x1, y1) box, predicted score or None when the model misses it)]
OBJECTS = {
    1: [(1, (8, 8, 24, 24), 0.9), (1, (8, 40, 24, 56), None), (2, (40, 8, 56, 24), 0.8)],
    2: [(3, (20, 20, 44, 44), 0.7)],
}


def _file(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def _annotations() -> dict:
    from detectron2.data.datasets.lvis import get_lvis_instances_meta

    names = get_lvis_instances_meta("lvis_v1")["thing_classes"]
    anns = []
    for image_id, objects in OBJECTS.items():
        for cat, (x0, y0, x1, y1), _ in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0)})
    return {
        "images": [{"id": i, "height": SIZE, "width": SIZE, "coco_url": f"val2017/{_file(i)}",
                    "not_exhaustive_category_ids": [], "neg_category_ids": []} for i in OBJECTS],
        "annotations": anns,
        "categories": [{"id": c, "name": names[c - 1], "frequency": f, "synonyms": [names[c - 1]]}
                       for c, f in FREQUENCY.items()],
    }


def _fabricate(root: Path) -> None:
    (root / "coco" / "val2017").mkdir(parents=True)
    (root / "lvis").mkdir()
    rng = np.random.default_rng(0)
    for i in OBJECTS:
        pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "coco" / "val2017" / _file(i))
    (root / "lvis" / "lvis_v1_val.json").write_text(json.dumps(_annotations()))


def _predictions() -> dict:
    """The ground truth (masks rasterized from the polygons as the LVIS API does, boxes as annotated) but the
    second category-1 instance of image 1."""
    from pycocotools import mask as mask_util

    out = {}
    for image_id, objects in OBJECTS.items():
        kept = [(cat, box, score) for cat, box, score in objects if score is not None]
        masks = [
            mask_util.decode(mask_util.merge(mask_util.frPyObjects([[x0, y0, x1, y0, x1, y1, x0, y1]], SIZE, SIZE)))
            for _, (x0, y0, x1, y1), _ in kept
        ]
        inst = Instances((SIZE, SIZE))
        inst.pred_masks = torch.from_numpy(np.array(masks, bool))
        inst.pred_boxes = Boxes(torch.tensor([box for _, box, _ in kept], dtype=torch.float32))
        inst.scores = torch.tensor([score for _, _, score in kept])
        inst.pred_classes = torch.tensor([cat - 1 for cat, _, _ in kept])  # LVIS v1: contiguous id = id - 1
        out[_file(image_id)] = {"instances": inst}
    return out


register_oracle("PeftD2TestLVISOracle", _predictions)  # returns _predictions() for each image


# Every prediction overlaps its ground truth exactly, so each IoU threshold gives the same per-category AP
# (101-point interpolated precision): category 1 finds one of its two instances with its top score -> precision 1
# at recalls 0, 0.01, ..., 0.5 (51 of 101 points), 0 beyond; categories 2 and 3 -> 1. Boxes and masks alike.
CAT1 = 51 / 101
EXPECTED = {"AP": 100 * (CAT1 + 1 + 1) / 3, "AP50": 100 * (CAT1 + 1 + 1) / 3, "APf": 100 * CAT1, "APc": 100.0,
            "APr": 100.0}


@pytest.fixture
def lvis_root(tmp_path, monkeypatch):
    """Re-point detectron2's builtin lvis_v1_val at a fabricated root for the test, then restore it."""
    from detectron2.data.datasets.lvis import get_lvis_instances_meta, register_lvis_instances

    name = "lvis_v1_val"
    saved = DatasetCatalog[name], MetadataCatalog.get(name)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    _fabricate(tmp_path)
    register_lvis_instances(name, get_lvis_instances_meta("lvis_v1"), str(tmp_path / "lvis" / "lvis_v1_val.json"),
                            str(tmp_path / "coco") + "/")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    yield tmp_path
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    DatasetCatalog.register(name, saved[0])
    MetadataCatalog[name] = saved[1]


def test_eval_only_reports_lvis_ap(lvis_root):
    train_net = load_tool("train_net.py", "peft_d2_train_net_lvis")
    config = lvis_root / "oracle.yaml"
    config.write_text(
        "MODEL:\n  META_ARCHITECTURE: PeftD2TestLVISOracle\n  DEVICE: cpu\n  WEIGHTS: ''\n"
        "DATASETS:\n  TRAIN: ()\n  TEST: ('lvis_v1_val',)\n"
        "DATALOADER:\n  NUM_WORKERS: 0\nINPUT:\n  MIN_SIZE_TEST: 64\n  MAX_SIZE_TEST: 64\n"
    )
    argv = ["--config-file", str(config), "--eval-only", "--num-gpus", "1", "OUTPUT_DIR", str(lvis_root / "out")]
    res = train_net.main(train_net.default_argument_parser().parse_args(argv))
    for task in ("bbox", "segm"):
        got = {k: res[task][k] for k in EXPECTED}
        assert got == pytest.approx(EXPECTED, abs=1e-6), task
    assert (lvis_root / "out" / "inference" / "lvis_instances_results.json").is_file()


def test_numpy_compat_is_scoped_to_lvis_eval():
    import lvis.eval

    from peft_d2.evaluation import lvis_numpy_compat

    with lvis_numpy_compat():
        assert lvis.eval.np.float is float and lvis.eval.np.cumsum is np.cumsum
    assert lvis.eval.np is np
    if not hasattr(np, "float"):  # NumPy >= 1.24: numpy itself never gains the alias
        with lvis_numpy_compat():
            assert not hasattr(np, "float")
