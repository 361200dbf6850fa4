"""Every YAML in configs/ parses with _BASE_ inheritance, names registered datasets and a known mapper, and (for
all but the Base-* files) builds its model on CPU without loading weights. Spot checks pin the official
Mask2Former schedules, crops and query counts."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from _models import load_tool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ALL = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
MODELS = [c for c in ALL if not Path(c).name.startswith("Base-")]


@lru_cache(maxsize=1)
def _train_net():
    return load_tool()


def load(rel: str):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    for fn in _train_net().CONFIG_FUNCTIONS:
        fn(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / rel))
    return cfg


def test_config_tree_is_complete():
    for dataset, tasks in {
        "coco": ["instance", "panoptic"],
        "cityscapes": ["instance", "semantic", "panoptic"],
        "ade20k": ["semantic", "panoptic", "instance"],
        "lvis": ["instance"],
    }.items():
        for task in tasks:
            d = CONFIG_DIR / dataset / f"{task}-segmentation"
            assert list(d.glob("Base-*.yaml")), d
            assert list(d.glob("maskformer2_R50_bs16_*.yaml")), d
            for size in ("tiny", "small", "base", "large"):
                assert list((d / "swin").glob(f"maskformer2_swin_{size}_*.yaml")), (d, size)
    assert len(MODELS) >= 50
    assert any("synthetic" in c for c in MODELS)


@pytest.mark.parametrize("rel", ALL)
def test_parses_with_registered_datasets_and_mapper(rel):
    from detectron2.data import DatasetCatalog

    from peft_d2.data import MAPPERS

    cfg = load(rel)
    registered = set(DatasetCatalog.list())
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        assert name in registered, f"{rel}: dataset {name!r} is not registered"
    assert cfg.INPUT.DATASET_MAPPER_NAME in MAPPERS, rel


@pytest.mark.parametrize("rel", MODELS)
def test_builds_on_cpu(rel):
    import torch
    from detectron2.modeling import build_model

    from peft_d2 import PeftConfigError

    cfg = load(rel)
    cfg.MODEL.DEVICE = "cpu"
    assert cfg.MODEL.META_ARCHITECTURE in ("MaskFormer", "PEFT"), rel
    if cfg.MODEL.META_ARCHITECTURE == "PEFT":
        assert cfg.MODEL.PEFT.BASE_META_ARCHITECTURE == "MaskFormer", rel
        if "sfa" in cfg.MODEL.PEFT.METHODS:  # SFA selects weights on data first (train_net does it)
            with pytest.raises(PeftConfigError, match="needs its internal selection"):
                build_model(cfg)
            return
    model = build_model(cfg)
    assert model.sem_seg_head.num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert model.num_queries == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    del model


@pytest.mark.parametrize(
    "rel, checks",
    [
        (
            "coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
            {"SOLVER.MAX_ITER": 368750, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100, "INPUT.IMAGE_SIZE": 1024,
             "INPUT.DATASET_MAPPER_NAME": "coco_instance_lsj", "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 80,
             "MODEL.MASK_FORMER.DEC_LAYERS": 10, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model"},
        ),
        (
            "coco/instance-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml",
            {"SOLVER.MAX_ITER": 737500, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 200, "MODEL.SWIN.EMBED_DIM": 192,
             "MODEL.SWIN.WINDOW_SIZE": 12, "MODEL.SWIN.PRETRAIN_IMG_SIZE": 384,
             "MODEL.WEIGHTS": "swin_large_patch4_window12_384_22k.pkl"},
        ),
        (
            "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
            {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 133, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True},
        ),
        (
            "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
            {"SOLVER.MAX_ITER": 160000, "INPUT.CROP.SIZE": (512, 512), "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 150,
             "SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR", "INPUT.SIZE_DIVISIBILITY": 512},
        ),
        (
            "ade20k/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml",
            {"INPUT.CROP.SIZE": (640, 640), "INPUT.MIN_SIZE_TEST": 640, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100},
        ),
        (
            "ade20k/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k.yaml",
            {"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 200, "INPUT.CROP.SIZE": (640, 640)},
        ),
        (
            "ade20k/instance-segmentation/maskformer2_R50_bs16_160k.yaml",
            {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 100, "INPUT.DATASET_MAPPER_NAME": "mask_former_instance"},
        ),
        (
            "cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml",
            {"SOLVER.MAX_ITER": 90000, "INPUT.CROP.SIZE": (512, 1024), "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19},
        ),
        (
            "cityscapes/instance-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml",
            {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 8, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 200},
        ),
        (
            "lvis/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
            {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 1203, "DATASETS.TRAIN": ("lvis_v1_train",)},
        ),
    ],
)  # fmt: skip
def test_official_values(rel, checks):
    cfg = load(rel)
    for key, expected in checks.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        if isinstance(expected, tuple):
            value = tuple(value)
        assert value == expected, f"{rel}: {key} = {value!r}, expected {expected!r}"
