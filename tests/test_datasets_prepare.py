"""datasets/prepare_*.py on tiny samples fabricated in each dataset's real on-disk layout."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"prep_{name}", ROOT / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------- ADE20K
H, W = 32, 40
PERSON_INSTANCE_CLASS = 4  # instance class k -> SceneParsing id ADE20K_THING_IDS[k - 1] = 12 ("person")


def _ade_sample(root: Path, split_dir: str, stem: str, seed: int):
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for d in ("images", "annotations", "annotations_instance"):
        (base / d / split_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(base / "images" / split_dir / f"{stem}.jpg")
    sem = np.full((H, W), 1, np.uint8)  # wall (1-based 1)
    sem[:10] = 3  # sky
    sem[28:, :5] = 0  # "other"
    sem[12:20, 5:15] = 13  # person (1-based 13 -> 0-based 12)
    sem[12:20, 25:35] = 13
    Image.fromarray(sem).save(base / "annotations" / split_dir / f"{stem}.png")
    ins = np.zeros((H, W, 3), np.uint8)
    ins[12:20, 5:15] = (PERSON_INSTANCE_CLASS, 1, 0)
    ins[12:20, 25:35] = (PERSON_INSTANCE_CLASS, 2, 0)
    Image.fromarray(ins).save(base / "annotations_instance" / split_dir / f"{stem}.png")
    return sem, ins


@pytest.fixture
def ade_root(tmp_path):
    splits = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}
    for split_dir, stems in splits.items():
        for i, s in enumerate(stems):
            _ade_sample(tmp_path, split_dir, s, i)
    return tmp_path


def test_ade20k_sem_seg(ade_root):
    assert _script("prepare_ade20k_sem_seg").main(["--dataset-dir", str(ade_root)]) == 0
    base = ade_root / "ADEChallengeData2016"
    out = np.asarray(Image.open(base / "annotations_detectron2/training/ADE_train_00000001.png"))
    sem = np.asarray(Image.open(base / "annotations/training/ADE_train_00000001.png"))
    assert out[0, 0] == 2 and out[20, 20] == 0 and out[15, 10] == 12 and out[30, 1] == 255
    assert ((sem.astype(int) - 1) % 256 == out).all()


def test_ade20k_ins_seg(ade_root):
    assert _script("prepare_ade20k_ins_seg").main(["--dataset-dir", str(ade_root)]) == 0
    data = json.loads((ade_root / "ADEChallengeData2016/ade20k_instance_train.json").read_text())
    assert len(data["categories"]) == 100 and {c["id"] for c in data["categories"]} >= {12}
    assert len(data["images"]) == 2 and len(data["annotations"]) == 4
    a = data["annotations"][0]
    assert a["category_id"] == 12 and a["area"] == 80 and a["bbox"] == [5.0, 12.0, 10.0, 8.0]
    m = mask_util.decode(a["segmentation"])
    assert m.shape == (H, W) and m[12:20, 5:15].all() and m.sum() == 80


def test_ade20k_pan_seg_and_registrations(ade_root):
    for name in ("prepare_ade20k_sem_seg", "prepare_ade20k_ins_seg", "prepare_ade20k_pan_seg"):
        assert _script(name).main(["--dataset-dir", str(ade_root)]) == 0
    base = ade_root / "ADEChallengeData2016"
    data = json.loads((base / "ade20k_panoptic_val.json").read_text())
    assert len(data["categories"]) == 150 and sum(c["isthing"] for c in data["categories"]) == 100
    ann = data["annotations"][0]
    rgb = np.asarray(Image.open(base / "ade20k_panoptic_val" / ann["file_name"])).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    by_cat = {}
    for seg in ann["segments_info"]:
        mask = ids == seg["id"]
        assert mask.sum() == seg["area"] > 0
        by_cat.setdefault(seg["category_id"], []).append(mask)
    assert sorted(by_cat) == [0, 2, 12] and len(by_cat[12]) == 2  # wall, sky, two persons
    assert by_cat[12][0][12:20, 5:15].all() and (ids[28:, :5] == 0).all()  # "other" is void

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from peft_d2.data import build_train_mapper, register_all_datasets

    try:
        register_all_datasets(str(ade_root))
        pan = DatasetCatalog.get("ade20k_panoptic_train")
        assert len(pan) == 2 and all(Path(d["pan_seg_file_name"]).is_file() for d in pan)
        assert {s["category_id"] for s in pan[0]["segments_info"]} == {0, 2, 12}
        meta = MetadataCatalog.get("ade20k_panoptic_train")
        assert meta.evaluator_type == "ade20k_panoptic_seg" and len(meta.stuff_classes) == 150
        ins = DatasetCatalog.get("ade20k_instance_val")
        person = MetadataCatalog.get("ade20k_instance_val").thing_classes.index("person")
        assert [a["category_id"] for a in ins[0]["annotations"]] == [person, person]
        sem = DatasetCatalog.get("ade20k_sem_seg_train")
        assert len(sem) == 2

        from detectron2.config import get_cfg
        from detectron2.projects.deeplab import add_deeplab_config

        add_maskformer2_config = pytest.importorskip("peft_d2.modeling.config").add_maskformer2_config
        cfg = get_cfg()
        add_deeplab_config(cfg)
        add_maskformer2_config(cfg)
        cfg.DATASETS.TRAIN = ("ade20k_panoptic_train",)
        cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
        cfg.INPUT.MIN_SIZE_TRAIN = (H,)
        cfg.INPUT.SIZE_DIVISIBILITY = 64
        out = build_train_mapper(cfg)(copy.deepcopy(pan[0]))
        assert out["image"].shape[-2:] == (64, 64)
        assert sorted(out["instances"].gt_classes.tolist()) == [0, 2, 12, 12]
    finally:
        register_all_datasets()


def test_ade20k_missing_folders_report(tmp_path, capsys):
    assert _script("prepare_ade20k_pan_seg").main(["--dataset-dir", str(tmp_path)]) == 1
    assert "images/training does not exist" in capsys.readouterr().err
    assert _script("prepare_ade20k_sem_seg").main(["--dataset-dir", str(tmp_path)]) == 1
    assert "annotations/training does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_train_ids(tmp_path, capsys):
    mod = _script("prepare_cityscapes")
    d = tmp_path / "cityscapes" / "gtFine" / "train" / "aachen"
    d.mkdir(parents=True)
    ids = np.array([[7, 26, 0, 33], [24, 23, 9, 255]], np.uint8)
    Image.fromarray(ids).save(d / "aachen_000000_000019_gtFine_labelIds.png")
    assert mod.main(["--dataset-dir", str(tmp_path), "--no-cityscapesscripts"]) == 0
    out = np.asarray(Image.open(d / "aachen_000000_000019_gtFine_labelTrainIds.png"))
    assert out.tolist() == [[0, 13, 255, 18], [11, 10, 255, 255]]
    assert len(mod.TRAIN_ID_NAMES) == len(mod.ID_TO_TRAIN_ID) == 19
    assert sorted(mod.ID_TO_TRAIN_ID.values()) == list(range(19))
    assert mod.main(["--dataset-dir", str(tmp_path), "--no-cityscapesscripts", "--panoptic"]) == 1
    assert "needs cityscapesscripts" in capsys.readouterr().err


def test_cityscapes_missing_layout(tmp_path, capsys):
    mod = _script("prepare_cityscapes")
    assert mod.main(["--dataset-dir", str(tmp_path)]) == 1
    assert "cityscapes/gtFine does not exist" in capsys.readouterr().err
    (tmp_path / "cityscapes" / "gtFine").mkdir(parents=True)
    assert mod.main(["--dataset-dir", str(tmp_path), "--no-cityscapesscripts"]) == 1
    assert "_gtFine_labelIds.png" in capsys.readouterr().err
