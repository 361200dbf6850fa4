"""The synthetic two-domain generator (peft_d2/data/synthetic.py), its prepare script and its registration."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from peft_d2.data.synthetic import CATEGORIES, domain_categories, generate_split, generate_synthetic

ROOT = Path(__file__).resolve().parents[1]


def _json(paths):
    return json.loads(Path(paths["json_file"]).read_text())


def _masks(data, size):
    out = {}
    for a in data["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):
            rles = mask_util.frPyObjects(seg, size, size)
            m = mask_util.decode(mask_util.merge(rles))
        else:
            m = mask_util.decode(seg)
        out.setdefault(a["image_id"], []).append((a["category_id"], m.astype(bool)))
    return out


def test_deterministic_and_seed_dependent(tmp_path):
    a = generate_split(str(tmp_path / "a"), "A", "train", 6, image_size=64, seed=5)
    b = generate_split(str(tmp_path / "b"), "A", "train", 6, image_size=64, seed=5)
    c = generate_split(str(tmp_path / "c"), "A", "train", 6, image_size=64, seed=6)
    assert _json(a) == _json(b)
    for name in ("000000.png", "000005.png"):
        assert (Path(a["image_root"]) / name).read_bytes() == (Path(b["image_root"]) / name).read_bytes()
        assert (Path(a["sem_seg_root"]) / name).read_bytes() == (Path(b["sem_seg_root"]) / name).read_bytes()
    assert _json(a)["annotations"] != _json(c)["annotations"]


def test_coco_structure_masks_and_semantic_labels_agree(tmp_path):
    size = 96
    p = generate_split(str(tmp_path), "A", "train", 12, image_size=size, seed=0)
    data = _json(p)
    assert {c["id"] for c in data["categories"]} == {1, 2, 3, 4}
    assert len(data["images"]) == 12 and len(data["annotations"]) >= 12
    label_of = {c["id"]: i + 1 for i, c in enumerate(data["categories"])}
    masks = _masks(data, size)
    overlapping = 0
    for img in data["images"]:
        image = cv2.imread(str(Path(p["image_root"]) / img["file_name"]))
        assert image.shape == (size, size, 3)
        sem = cv2.imread(str(Path(p["sem_seg_root"]) / img["file_name"].replace(".png", ".png")), 0)
        union = np.zeros((size, size), bool)
        for cat, m in masks.get(img["id"], []):
            assert m.any()
            assert (sem[m] == label_of[cat]).all()  # visible masks: disjoint, labelled with their class
            assert not (union & m).any()
            union |= m
        assert (sem[~union] == 0).all()
        bbox_overlap = _any_bbox_overlap([a for a in data["annotations"] if a["image_id"] == img["id"]])
        overlapping += bbox_overlap
    assert overlapping > 0, "expected some overlapping shapes"
    for a in data["annotations"]:
        m = mask_util.decode(a["segmentation"])
        assert a["area"] == m.sum()
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())


def _any_bbox_overlap(anns):
    for i, a in enumerate(anns):
        for b in anns[i + 1 :]:
            ax, ay, aw, ah = a["bbox"]
            bx, by, bw, bh = b["bbox"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                return 1
    return 0


def test_polygon_masks_match_rle_masks(tmp_path):
    rle = generate_split(str(tmp_path / "r"), "B", "val", 6, image_size=96, seed=1, mask_format="rle")
    poly = generate_split(str(tmp_path / "p"), "B", "val", 6, image_size=96, seed=1, mask_format="polygon")
    mr, mp = _masks(_json(rle), 96), _masks(_json(poly), 96)
    assert mr.keys() == mp.keys()
    for k in mr:
        for (ca, a), (cb, b) in zip(mr[k], mp[k]):
            assert ca == cb
            assert (a & b).sum() / (a | b).sum() > 0.6


def test_domain_shift(tmp_path):
    a = _json(generate_split(str(tmp_path), "A", "train", 24, image_size=128, seed=0))
    b = _json(generate_split(str(tmp_path), "B", "train", 24, image_size=128, seed=0))
    ids_a = {c["id"] for c in a["categories"]}
    ids_b = {c["id"] for c in b["categories"]}
    assert ids_b - ids_a and ids_a & ids_b  # new classes and shared ones
    assert {x["category_id"] for x in b["annotations"]} - ids_a  # new classes do occur
    assert np.median([x["area"] for x in b["annotations"]]) < np.median([x["area"] for x in a["annotations"]])
    img_a = cv2.imread(str(tmp_path / "A" / "train" / "000000.png")).astype(float)
    img_b = cv2.imread(str(tmp_path / "B" / "train" / "000000.png")).astype(float)
    assert img_a.mean() != img_b.mean()
    assert [c["name"] for c in domain_categories("B")] == [c["name"] for c in CATEGORIES if c["id"] in ids_b]


def test_jpg_images_and_bad_arguments(tmp_path):
    p = generate_split(str(tmp_path), "A", "val", 2, image_size=64, image_format="jpg")
    assert sorted(x.name for x in Path(p["image_root"]).iterdir()) == ["000000.jpg", "000001.jpg"]
    with pytest.raises(ValueError, match="domain"):
        generate_split(str(tmp_path), "C", "val", 2)
    with pytest.raises(ValueError, match="mask_format"):
        generate_split(str(tmp_path), "A", "val", 2, mask_format="bitmap")


def test_test_split_and_the_domain_shift(tmp_path):
    out = generate_synthetic(str(tmp_path), num_train={"A": 3, "B": 3}, num_val={"A": 2, "B": 2},
                             num_test={"B": 4}, image_size=64)
    assert "synthetic_B_test" in out and "synthetic_A_test" not in out
    test, train = _json(out["synthetic_B_test"]), _json(out["synthetic_B_train"])
    assert len(test["images"]) == 4 and test["annotations"] != train["annotations"]  # its own seed
    # train and val are unchanged by the test split (its seed index is appended)
    again = generate_split(str(tmp_path / "again"), "B", "train", 3, image_size=64)
    assert _json(again) == train
    a_ids = {c["id"] for c in domain_categories("A")}
    b_ids = {c["id"] for c in domain_categories("B")}
    assert len(b_ids - a_ids) == 2 and len(a_ids & b_ids) == 3  # two new classes, three shared


def test_registered_in_catalogs(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from peft_d2.data import register_all_datasets
    from peft_d2.data.checks import MalformedAnnotationError

    generate_synthetic(str(tmp_path / "synthetic"), num_train={"A": 5, "B": 3}, num_val=2, image_size=64)
    try:
        names = register_all_datasets(str(tmp_path))
        for n in ("synthetic_A_train", "synthetic_A_val", "synthetic_B_train", "synthetic_B_val"):
            assert n in names and MetadataCatalog.get(n).evaluator_type == "coco"
        warned = []
        coco_logger = logging.getLogger("detectron2.data.datasets.coco")
        handler = logging.Handler(logging.WARNING)
        handler.emit = warned.append
        coco_logger.addHandler(handler)
        try:
            dicts = DatasetCatalog.get("synthetic_B_train")
        finally:
            coco_logger.removeHandler(handler)
        assert warned == []  # B's ids (1, 2, 3, 5, 6) are mapped by the registration, not by detectron2 with a warning
        assert len(dicts) == 3 and all("annotations" in d for d in dicts)
        meta = MetadataCatalog.get("synthetic_B_train")
        assert meta.thing_classes == [c["name"] for c in domain_categories("B")]
        # contiguous ids after loading, each the index of its json category among B's
        data = json.loads(Path(meta.json_file).read_text())
        in_json = [meta.thing_dataset_id_to_contiguous_id[a["category_id"]] for a in data["annotations"]]
        assert [a["category_id"] for d in dicts for a in d["annotations"]] == in_json
        assert set(in_json) <= set(range(len(meta.thing_classes)))
        data["annotations"][0]["category_id"] = 4  # "plain", a material of domain A only
        Path(meta.json_file).write_text(json.dumps(data))
        with pytest.raises(MalformedAnnotationError, match=r"synthetic_B_train.*category_id 4, not one of the "
                           r"domain's \[1, 2, 3, 5, 6\]"):
            DatasetCatalog.get("synthetic_B_train")
        sem = DatasetCatalog.get("synthetic_A_sem_seg_val")
        assert len(sem) == 2 and all(Path(d["sem_seg_file_name"]).is_file() for d in sem)
        assert MetadataCatalog.get("synthetic_A_sem_seg_val").stuff_classes[0] == "background"
    finally:
        register_all_datasets()


def test_prepare_script(tmp_path):
    out = tmp_path / "synthetic"
    cmd = [sys.executable, str(ROOT / "datasets" / "prepare_synthetic.py"), "--root", str(out)]
    cmd += ["--num-train-a", "3", "--num-train-b", "2", "--num-val", "1", "--image-size", "48"]
    cmd += ["--mask-format", "polygon"]
    subprocess.run(cmd, check=True, capture_output=True)
    data = json.loads((out / "B" / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 2
    assert all(isinstance(a["segmentation"], list) for a in data["annotations"])


@pytest.mark.parametrize("domain", ["A", "B"])
def test_datasets_readme_names_each_domains_classes(domain):
    """datasets/README.md says which classes each domain has: the generator's materials, none missing, no other."""
    text = (ROOT / "datasets" / "README.md").read_text(encoding="utf-8")
    bullet = re.search(rf"^- \*\*Domain {domain}\*\*(.*?)(?=^- |^$)", text, re.MULTILINE | re.DOTALL)
    assert bullet, f"datasets/README.md has no '- **Domain {domain}**' bullet"
    named = re.findall(r"`(\w+)`", bullet.group(1))
    assert named == [c["name"] for c in domain_categories(domain)]
    assert f"has {len(named)} classes" in bullet.group(1)
