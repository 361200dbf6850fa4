"""A missing dataset folder or a malformed annotation file is one clear error that names the path."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog  # noqa: E402

from peft_d2.data import DatasetNotFoundError, MalformedAnnotationError, register_all_datasets  # noqa: E402
from peft_d2.data.synthetic import generate_split  # noqa: E402


@pytest.fixture
def root(tmp_path):
    register_all_datasets(str(tmp_path))
    yield tmp_path
    register_all_datasets()


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("synthetic_A_train", "synthetic/A/train"),
        ("synthetic_B_sem_seg_val", "synthetic/B/val"),
        ("ade20k_sem_seg_train", "ADEChallengeData2016/images/training"),
        ("ade20k_panoptic_val", "ADEChallengeData2016/images/validation"),
        ("ade20k_instance_train", "ADEChallengeData2016/images/training"),
        ("coco_2017_val_panoptic_with_sem_seg", "coco/val2017"),
    ],
)
def test_missing_directory_names_the_path(root, name, fragment):
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get(name)
    msg = str(e.value)
    assert name in msg and os.path.join(str(root), fragment) in msg and "DETECTRON2_DATASETS" in msg


def test_builtin_coco_is_guarded(root):
    # detectron2's own registration (root fixed at its import): still one readable error, not a json traceback
    with pytest.raises(DatasetNotFoundError, match="coco_2017_val.*does not exist"):
        DatasetCatalog.get("coco_2017_val")


def test_missing_json_file(root):
    p = generate_split(str(root / "synthetic"), "A", "val", 2, image_size=32)
    os.remove(p["json_file"])
    with pytest.raises(DatasetNotFoundError, match="instances_val.json"):
        DatasetCatalog.get("synthetic_A_val")


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"images": [], "categories": []}), r"lacks the top-level key\(s\) \['annotations'\]"),
        (json.dumps({"images": {}, "annotations": [], "categories": []}), "'images' must be a list"),
        (json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}), r"images\[0\].*'file_name'"),
        (
            json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1}], "categories": []}),
            r"annotations\[0\].*'category_id'",
        ),
    ],
)
def test_malformed_annotation_file(root, content, match):
    p = generate_split(str(root / "synthetic"), "A", "train", 2, image_size=32)
    with open(p["json_file"], "w") as f:
        f.write(content)
    with pytest.raises(MalformedAnnotationError, match=match) as e:
        DatasetCatalog.get("synthetic_A_train")
    assert p["json_file"] in str(e.value)


def test_lvis_v1_images_name_their_file_by_coco_url(tmp_path):
    from peft_d2.data.checks import check_coco_json

    path = tmp_path / "lvis_v1_val.json"
    image = {"id": 1, "coco_url": "val2017/000000000001.jpg", "height": 8, "width": 8}
    path.write_text(json.dumps({"images": [image], "annotations": [], "categories": []}))
    check_coco_json(str(path), "lvis_v1_val")
    del image["coco_url"]
    path.write_text(json.dumps({"images": [image], "annotations": [], "categories": []}))
    with pytest.raises(MalformedAnnotationError, match=r"images\[0\].*'file_name' \(or, in LVIS v1 files, 'coco_url'"):
        check_coco_json(str(path), "lvis_v1_val")


def test_valid_dataset_loads_after_checks(root):
    generate_split(str(root / "synthetic"), "A", "train", 3, image_size=32)
    assert len(DatasetCatalog.get("synthetic_A_train")) == 3
