"""Training dataset mappers: geometry of images, masks and labels against the annotations they came from."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data.datasets import load_coco_json, load_sem_seg  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config  # noqa: E402

from peft_d2.data import MAPPERS, build_train_mapper  # noqa: E402
from peft_d2.data.synthetic import generate_split  # noqa: E402

add_maskformer2_config = pytest.importorskip("peft_d2.modeling.config").add_maskformer2_config

SIZE = 64


def make_cfg(mapper: str, **overrides):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.IMAGE_SIZE = SIZE
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 1.0  # identity LSJ unless overridden
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = 4 * SIZE
    cfg.INPUT.CROP.ENABLED = False
    cfg.DATASETS.TRAIN = ("synthetic_A_sem_seg_train",)
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    rle = generate_split(str(root / "rle"), "A", "train", 4, image_size=SIZE, seed=2)
    poly = generate_split(str(root / "poly"), "A", "train", 4, image_size=SIZE, seed=2, mask_format="polygon")
    return {
        "rle": load_coco_json(rle["json_file"], rle["image_root"], "synthetic_A_train"),
        "polygon": load_coco_json(poly["json_file"], poly["image_root"], "synthetic_A_train"),
        "sem": load_sem_seg(rle["sem_seg_root"], rle["image_root"], gt_ext="png", image_ext="png"),
    }


def _gt_masks(d):
    out = []
    for a in d["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):
            m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(seg, d["height"], d["width"])))
        else:
            m = mask_util.decode(seg)
        out.append(m.astype(bool))
    return out


def _image(d):
    return torch.from_numpy(cv2.imread(d["file_name"])[:, :, ::-1].copy()).permute(2, 0, 1)


def test_known_names():
    assert set(MAPPERS) >= {
        "coco_instance_lsj", "coco_panoptic_lsj", "mask_former_instance", "mask_former_semantic",
        "mask_former_panoptic", "tile_instance",
    }  # fmt: skip
    with pytest.raises(ValueError, match="coco_instance_lsj"):
        build_train_mapper(make_cfg("no_such_mapper"))


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_coco_instance_lsj_identity_keeps_masks(data, fmt):
    mapper = build_train_mapper(make_cfg("coco_instance_lsj"))
    d = data[fmt][0]
    out = mapper(copy.deepcopy(d))
    inst = out["instances"]
    assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.uint8
    assert torch.equal(out["image"], _image(d))
    assert out["padding_mask"].shape == (SIZE, SIZE) and not out["padding_mask"].any()
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (len(d["annotations"]), SIZE, SIZE)
    assert inst.gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]
    for got, want in zip(inst.gt_masks.numpy(), _gt_masks(d)):
        assert (got == want).all()
    boxes = inst.gt_boxes.tensor
    ys, xs = torch.nonzero(inst.gt_masks[0], as_tuple=True)
    assert boxes[0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_coco_instance_lsj_downscale_pads_and_masks_follow(data):
    cfg = make_cfg("coco_instance_lsj", **{"INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 0.5})
    mapper = build_train_mapper(cfg)
    d = data["rle"][1]
    out = mapper(copy.deepcopy(d))
    assert out["image"].shape == (3, SIZE, SIZE)
    pad = out["padding_mask"]
    assert not pad[: SIZE // 2, : SIZE // 2].any() and pad[SIZE // 2 :, :].all() and pad[:, SIZE // 2 :].all()
    masks = out["instances"].gt_masks
    assert not masks[:, SIZE // 2 :, :].any()
    # detectron2 resizes masks with PIL's nearest-neighbour filter (pixel centres), the same grid as the image
    half = (SIZE // 2, SIZE // 2)
    want = [np.asarray(Image.fromarray(m.astype(np.uint8)).resize(half, Image.NEAREST)) for m in _gt_masks(d)]
    kept = [w for w in want if w.any()]
    assert len(kept) == len(masks)
    for got, w in zip(masks, kept):
        assert (got[: SIZE // 2, : SIZE // 2].numpy() == w.astype(bool)).all()


def test_coco_instance_lsj_random_is_valid(data):
    opts = {"INPUT.MIN_SCALE": 0.3, "INPUT.MAX_SCALE": 2.0, "INPUT.RANDOM_FLIP": "horizontal"}
    cfg = make_cfg("coco_instance_lsj", **opts)
    mapper = build_train_mapper(cfg)
    for d in data["polygon"]:
        out = mapper(copy.deepcopy(d))
        inst = out["instances"]
        assert out["image"].shape == (3, SIZE, SIZE)
        assert inst.gt_masks.shape[1:] == (SIZE, SIZE)
        assert len(inst) == 0 or inst.gt_masks.flatten(1).any(1).all()  # no empty targets


def test_mask_former_instance_random_crop_polygons(data):
    crop = {"INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (40, 40)}
    cfg = make_cfg("mask_former_instance", **crop)
    mapper = build_train_mapper(cfg)
    for d in data["polygon"]:
        out = mapper(copy.deepcopy(d))
        assert out["image"].shape == (3, 40, 40) and out["instances"].gt_masks.shape[1:] == (40, 40)


def _one_crop_cuts_away(mapper_name, **overrides):
    """A 64 px image with a 20 px object in its top-left corner and one in its bottom-right: every 24 px crop misses
    at least one of them, so the mapper must drop that one instead of returning an all-zero target. About half the
    crops hold one object and half none, so 30 crops see both cases (a miss would take odds of 1e-8)."""
    crop = {"INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (24, 24), **overrides}
    mapper = build_train_mapper(make_cfg(mapper_name, **crop))
    masks = np.zeros((2, SIZE, SIZE), np.uint8)
    masks[0, :20, :20] = masks[1, 44:, 44:] = 1
    d = {"file_name": "", "height": SIZE, "width": SIZE, "image_id": 0, "annotations": [
        {"segmentation": mask_util.encode(np.asfortranarray(m)), "category_id": k, "iscrowd": 0, "bbox": box,
         "bbox_mode": 1} for k, (m, box) in enumerate(zip(masks, ([0, 0, 20, 20], [44, 44, 20, 20])))]}
    seen = set()
    for _ in range(30):
        out = mapper(copy.deepcopy(d))
        inst = out["instances"]
        assert out["image"].shape[1:] == (24, 24)
        assert len(inst) <= 1 and (len(inst) == 0 or inst.gt_masks.flatten(1).any(1).all())
        seen.add(len(inst))
    return seen


def test_instances_cut_away_by_the_crop_are_dropped(monkeypatch):
    from detectron2.data import detection_utils

    monkeypatch.setattr(detection_utils, "read_image", lambda *a, **k: np.zeros((SIZE, SIZE, 3), np.uint8))
    monkeypatch.setattr(detection_utils, "check_image_size", lambda *a: None)
    assert _one_crop_cuts_away("mask_former_instance") >= {0, 1}
    assert _one_crop_cuts_away("tile_instance", **{"INPUT.RANDOM_FLIP": "both"}) >= {0, 1}


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_masks_outside_the_crop_are_not_decoded_and_nothing_else_changes(data, fmt, monkeypatch):
    """The mappers decode only the masks whose box overlaps the crop (overlapping_annotations): with scale
    jitter, crops and flips both ways, every output equals the one that decodes every mask."""
    from peft_d2.data.dataset_mappers import mask_former

    opts = {"INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (24, 24),
            "INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 2.0, "INPUT.RANDOM_FLIP": "both"}  # fmt: skip
    mapper = build_train_mapper(make_cfg("tile_instance", **opts))
    decoded = []
    filtered = mask_former.overlapping_annotations

    def counting(annos, transforms, shape):
        kept = filtered(annos, transforms, shape)
        decoded.append((len(kept), len(annos)))
        return kept

    outputs = {}
    for name, fn in (("filtered", counting), ("all", lambda annos, transforms, shape: annos)):
        monkeypatch.setattr(mask_former, "overlapping_annotations", fn)
        np.random.seed(0)
        outputs[name] = [mapper(copy.deepcopy(d)) for _ in range(10) for d in data[fmt]]
    for a, b in zip(outputs["filtered"], outputs["all"]):
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
        assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks)
    assert sum(k for k, _ in decoded) < sum(n for _, n in decoded)  # some masks were never decoded
    assert sum(len(o["instances"]) for o in outputs["all"]) > 0


def test_tile_instance_keeps_native_scale(data):
    crop = {"INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (32, 32)}
    mapper = build_train_mapper(make_cfg("tile_instance", **crop))
    assert [type(a).__name__ for a in mapper.augmentations.augs] == ["RandomCrop"]
    d = data["rle"][0]
    out = mapper(copy.deepcopy(d))
    img = out["image"]
    assert img.shape == (3, 32, 32)
    full = _image(d)
    offsets = [(y, x) for y in range(SIZE - 31) for x in range(SIZE - 31)]
    assert any(torch.equal(full[:, y : y + 32, x : x + 32], img) for y, x in offsets), "a crop at the image's own scale"
    jitter = build_train_mapper(make_cfg("tile_instance", **crop, **{"INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 2.0}))
    assert [type(a).__name__ for a in jitter.augmentations.augs] == ["NativeScaleJitter", "RandomCrop"]


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_mask_former_instance_pads_to_divisibility(data, fmt):
    mapper = build_train_mapper(make_cfg("mask_former_instance", **{"INPUT.SIZE_DIVISIBILITY": 96}))
    d = data[fmt][2]
    out = mapper(copy.deepcopy(d))
    img = out["image"]
    assert img.shape == (3, 96, 96)
    assert torch.equal(img[:, :SIZE, :SIZE], _image(d)) and (img[:, SIZE:, :] == 128).all()
    masks = out["instances"].gt_masks
    assert masks.shape == (len(d["annotations"]), 96, 96) and not masks[:, SIZE:, :].any()
    for got, want in zip(masks[:, :SIZE, :SIZE].numpy(), _gt_masks(d)):
        assert (got == want).all()


def test_mask_former_semantic_targets_are_the_label_map(data):
    mapper = build_train_mapper(make_cfg("mask_former_semantic", **{"INPUT.SIZE_DIVISIBILITY": 96}))
    d = data["sem"][0]
    labels = cv2.imread(d["sem_seg_file_name"], 0)
    out = mapper(copy.deepcopy(d))
    sem = out["sem_seg"]
    assert sem.shape == (96, 96) and sem.dtype == torch.int64
    assert torch.equal(sem[:SIZE, :SIZE], torch.from_numpy(labels).long()) and (sem[SIZE:] == 255).all()
    inst = out["instances"]
    assert inst.gt_classes.tolist() == sorted(np.unique(labels).tolist())
    for c, m in zip(inst.gt_classes.tolist(), inst.gt_masks):
        assert torch.equal(m, sem == c)


def test_mask_former_semantic_with_crop_and_colour(data):
    cfg = make_cfg(
        "mask_former_semantic",
        **{"INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (32, 32)},
        **{"INPUT.COLOR_AUG_SSD": True},
        **{"INPUT.SIZE_DIVISIBILITY": 32},
    )
    mapper = build_train_mapper(cfg)
    out = mapper(copy.deepcopy(data["sem"][1]))
    assert out["image"].shape == (3, 32, 32) and out["sem_seg"].shape == (32, 32)
    inst = out["instances"]
    assert torch.equal(inst.gt_masks.sum(0), torch.ones(32, 32, dtype=torch.long))  # classes partition the crop


def _panoptic_sample(tmp_path):
    """A 48x64 image with two segments (a stuff region and a thing), written as a COCO panoptic PNG."""
    h, w = 48, 64
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ids = np.zeros((h, w), np.int64)
    ids[:, :] = 3  # stuff, segment id 3
    ids[10:30, 20:50] = 70000  # thing: needs G and B channels
    ids[40:, :10] = 0  # void
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), img[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "pan.png"), rgb[:, :, ::-1])
    sem = np.where(ids == 3, 0, np.where(ids == 70000, 1, 255)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "sem.png"), sem)
    d = {
        "file_name": str(tmp_path / "img.png"),
        "pan_seg_file_name": str(tmp_path / "pan.png"),
        "sem_seg_file_name": str(tmp_path / "sem.png"),
        "height": h,
        "width": w,
        "image_id": 1,
        "segments_info": [
            {"id": 3, "category_id": 0, "iscrowd": 0, "isthing": False},
            {"id": 70000, "category_id": 1, "iscrowd": 0, "isthing": True},
        ],
    }
    return d, ids


def test_mask_former_panoptic(tmp_path):
    d, ids = _panoptic_sample(tmp_path)
    cfg = make_cfg("mask_former_panoptic", **{"INPUT.MIN_SIZE_TRAIN": (48,), "INPUT.SIZE_DIVISIBILITY": 64})
    mapper = build_train_mapper(cfg)
    out = mapper(copy.deepcopy(d))
    assert out["image"].shape == (3, 64, 64)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 1]
    assert torch.equal(inst.gt_masks[0, :48], torch.from_numpy(ids == 3))
    assert torch.equal(inst.gt_masks[1, :48], torch.from_numpy(ids == 70000))
    assert not inst.gt_masks[:, 48:].any()
    assert (out["sem_seg"][48:] == 255).all() and out["sem_seg"][20, 30] == 1


def test_coco_panoptic_lsj(tmp_path):
    d, ids = _panoptic_sample(tmp_path)
    mapper = build_train_mapper(make_cfg("coco_panoptic_lsj", **{"INPUT.IMAGE_SIZE": 64}))
    out = mapper(copy.deepcopy(d))
    inst = out["instances"]
    assert out["image"].shape == (3, 64, 64)
    assert inst.gt_classes.tolist() == [0, 1]
    # ResizeScale(1.0) to a 64x64 target scales the 48x64 image by 1 (longer side fits): no resize, pad below
    assert torch.equal(inst.gt_masks[1, :48], torch.from_numpy(ids == 70000))
    assert out["padding_mask"][48:].all() and not out["padding_mask"][:48].any()
    assert inst.gt_boxes.tensor[1].tolist() == [20.0, 10.0, 50.0, 30.0]
