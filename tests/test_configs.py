"""Every YAML in configs/ parses with _BASE_ inheritance (peft_d2.config.merge_config, the tools' loader: a base may be
a model-zoo config), names registered datasets and a known mapper, and (for all but the Base-* files) builds its
model on CPU without loading weights. Spot checks pin the official Mask2Former schedules, crops and query counts,
and the detectron2 model-zoo values of the Mask R-CNN configs."""

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


def default_cfg():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    for fn in _train_net().CONFIG_FUNCTIONS:
        fn(cfg)
    return cfg


def load(rel: str):
    from peft_d2.config import merge_config

    return merge_config(default_cfg(), str(CONFIG_DIR / rel))


def test_loads_as_with_detectron2s_merge_from_file():
    """merge_config reads _BASE_ chains itself (for model-zoo bases): every other config loads exactly as detectron2's
    CfgNode.merge_from_file loads it."""
    plain = [c for c in ALL if "model_zoo://" not in (CONFIG_DIR / c).read_text()]
    assert len(plain) >= 200
    for rel in plain:
        with_d2 = default_cfg()
        with_d2.merge_from_file(str(CONFIG_DIR / rel))
        assert load(rel) == with_d2, rel


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
    assert cfg.INPUT.DATASET_MAPPER_NAME in (*MAPPERS, "detectron2"), rel  # "detectron2": its DatasetMapper


@pytest.mark.parametrize("rel", MODELS)
def test_builds_on_cpu(rel):
    import torch
    from detectron2.modeling import build_model

    from peft_d2 import PeftConfigError

    cfg = load(rel)
    cfg.MODEL.DEVICE = "cpu"
    assert cfg.MODEL.META_ARCHITECTURE in ("MaskFormer", "PEFT"), rel
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "PEFT":
        arch = cfg.MODEL.PEFT.BASE_META_ARCHITECTURE
        assert arch == ("GeneralizedRCNN" if rel.startswith("coco/mask_rcnn/") else "MaskFormer"), rel
        if "sfa" in cfg.MODEL.PEFT.METHODS:  # SFA selects weights on data first (train_net does it)
            with pytest.raises(PeftConfigError, match="needs its internal selection"):
                build_model(cfg)
            return
    model = build_model(cfg)
    if arch == "GeneralizedRCNN":
        assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    else:
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


# the keys configs/coco/mask_rcnn/*.yaml set over their model-zoo base: the PEFT node, the COCO weights, the mapper
# and the fine-tuning schedule
MASK_RCNN_OWN_KEYS = ("MODEL.META_ARCHITECTURE", "MODEL.WEIGHTS", "MODEL.PEFT.", "INPUT.DATASET_MAPPER_NAME",
                      "SOLVER.OPTIMIZER", "SOLVER.BASE_LR", "SOLVER.STEPS", "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS")


def _flat(node, prefix=""):
    from detectron2.config import CfgNode

    for k, v in node.items():
        yield from _flat(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [(prefix + k, v)]


def test_mask_rcnn_r50_fpn_lora_is_the_model_zoo_model():
    """Every value the config does not set is the model zoo's mask_rcnn_R_50_FPN_3x.yaml's (as detectron2 loads
    it); its weights are the zoo's COCO checkpoint; its ResNet keeps FrozenBN."""
    from detectron2 import model_zoo

    zoo_name = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    cfg = load("coco/mask_rcnn/mask_rcnn_R_50_FPN_3x_lora.yaml")
    zoo = default_cfg()
    zoo.merge_from_file(model_zoo.get_config_file(zoo_name))
    ours, theirs = dict(_flat(cfg)), dict(_flat(zoo))
    assert set(ours) == set(theirs)
    differ = sorted(k for k in ours if ours[k] != theirs[k])
    assert differ and all(k.startswith(MASK_RCNN_OWN_KEYS) for k in differ), differ
    assert cfg.MODEL.WEIGHTS.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/") == \
        model_zoo.get_checkpoint_url(zoo_name)
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.MASK_ON
    assert cfg.MODEL.PEFT.BASE_META_ARCHITECTURE == zoo.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"


def test_mask_rcnn_r50_fpn_lora_adapts_every_block_and_fpn_convolution_and_the_box_head():
    import torch
    from detectron2.layers import Conv2d
    from detectron2.modeling import build_model

    from peft_d2.inject import peft_parameter_names

    cfg = load("coco/mask_rcnn/mask_rcnn_R_50_FPN_3x_lora.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    adapted = {n.rpartition(".lora_")[0] for n in peft_parameter_names(model)}
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    expected = {n for n in convs if n.startswith(("backbone.bottom_up.res", "backbone.fpn_"))}
    assert len(expected) == 16 * 3 + 4 + 4 + 4  # 16 bottleneck blocks, 4 shortcuts, 4 lateral and 4 output convs
    assert all(isinstance(dict(model.named_modules())[n], Conv2d) for n in expected)
    assert adapted == expected | {"roi_heads.box_head.fc1", "roi_heads.box_head.fc2"}
    r = cfg.MODEL.PEFT.LORA.RANK
    modules = dict(model.named_modules())
    lora = sum(r * (m.weight[0].numel() + m.weight.shape[0]) for m in (modules[n] for n in adapted))
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == {f"roi_heads.{h}.{t}" for h in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                        "mask_head.predictor") for t in ("weight", "bias")}


def test_peft_configs_are_what_make_peft_configs_writes(tmp_path):
    """The committed configs/*/peft/ and configs/synthetic/demo/ files are tools/make_peft_configs.py's output, and
    every file it writes is committed."""
    tool = load_tool("make_peft_configs.py", "peft_d2_make_peft_configs")
    tool.main(str(tmp_path))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.yaml"))
    assert len(written) > 100
    for rel in written:
        assert (CONFIG_DIR / rel).read_text() == (tmp_path / rel).read_text(), rel
    for folder in tool.BASES:
        committed = sorted(str(p.relative_to(CONFIG_DIR)) for p in (CONFIG_DIR / folder).glob("*.yaml"))
        assert committed == sorted(w for w in written if w.startswith(f"{folder}/")), folder


@pytest.mark.parametrize("folder", list(load_tool("make_peft_configs.py", "peft_d2_make_peft_configs").BASES))
def test_mona_is_half_as_wide_as_the_first_swin_stage(folder):
    """MONA.BOTTLENECK is half of the base's MODEL.SWIN.EMBED_DIM: the paper's m = 64 at Swin-B (128 wide), 16 on the
    micro models (32 wide)."""
    cfg = load(f"{folder}/mona.yaml")
    assert cfg.MODEL.PEFT.MONA.BOTTLENECK * 2 == cfg.MODEL.SWIN.EMBED_DIM, folder
    assert cfg.MODEL.PEFT.MONA.BOTTLENECK == (64 if cfg.MODEL.SWIN.EMBED_DIM == 128 else 16), folder
