"""The PEFT meta-architecture / backbone hooks, the PEFT checkpointer and the optimizer groups."""

import logging
import os

import pytest
import torch
from _models import PEFT_OPTS, detection_batch, small_rcnn_cfg
from detectron2.modeling import build_model

import peft_d2.build  # noqa: F401 - registers "PEFT" and "PEFTBackbone"
from peft_d2 import PeftConfigError
from peft_d2.engine import PeftCheckpointer, build_peft_optimizer, peft_param_groups


def test_meta_arch_hook_returns_base_model_with_base_names():
    torch.manual_seed(0)
    plain = build_model(small_rcnn_cfg())
    torch.manual_seed(0)
    model = build_model(small_rcnn_cfg(**PEFT_OPTS))
    assert type(model) is type(plain)
    base = dict(plain.named_parameters())
    names = dict(model.named_parameters())
    assert set(names) - set(base) == {f"roi_heads.box_head.fc{i}.lora_{m}" for i in (1, 2) for m in "AB"}
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == {n for n in names if "lora_" in n or n.startswith("roi_heads.box_predictor.")
                         or (n.startswith("backbone.fpn_output") and n.endswith(".bias"))}
    assert model.peft_report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_backbone_hook_freezes_the_backbone_only():
    cfg = small_rcnn_cfg(**{"MODEL.BACKBONE.NAME": "PEFTBackbone",
                            "MODEL.PEFT.BASE_BACKBONE": "build_resnet_fpn_backbone",
                            "MODEL.PEFT.METHODS": ["adapter"], "MODEL.PEFT.TRAINABLE": ["fpn_output*"]})
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.ADAPTER.BLOCKS"):  # a ResNet has no transformer blocks
        build_model(cfg)
    cfg.MODEL.PEFT.METHODS = ["lora"]
    cfg.MODEL.PEFT.LORA.TARGETS = ["bottom_up.stem.conv1.norm"]
    with pytest.raises(PeftConfigError, match=r"'bottom_up.stem.conv1.norm' \(\w+\): LoRA applies to nn.Linear"):
        build_model(cfg)
    cfg.MODEL.PEFT.LORA.TARGETS = ["bottom_up.stem.conv1"]  # a convolution takes LoRA
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n in trainable if n.startswith("backbone.")}
    assert {"backbone.bottom_up.stem.conv1.lora_A", "backbone.bottom_up.stem.conv1.lora_B"} <= backbone
    assert all(".lora_" in n or n.startswith("backbone.fpn_output") for n in backbone)
    assert trainable - backbone == {n for n, _ in model.named_parameters() if not n.startswith("backbone.")}


@pytest.mark.parametrize("key, value, match", [
    ("MODEL.PEFT.BASE_META_ARCHITECTURE", "NoSuchArch", "MODEL.PEFT.BASE_META_ARCHITECTURE='NoSuchArch'"),
    ("MODEL.PEFT.METHODS", [], None),
])
def test_bad_hook_configs(key, value, match):
    cfg = small_rcnn_cfg(**PEFT_OPTS)
    cfg.merge_from_list([key, value])
    if match is None:  # empty METHODS with TRAINABLE: a freezing baseline, valid; both empty: an error
        model = build_model(cfg)
        assert model.peft_report["by_method"].keys() == {"base"}
        cfg.MODEL.PEFT.TRAINABLE = []
        match = "MODEL.PEFT.METHODS is empty and so is MODEL.PEFT.TRAINABLE"
    with pytest.raises(PeftConfigError, match=match):
        build_model(cfg)


def test_checkpointer_loads_base_quietly_and_saves_trainable_only(tmp_path, caplog):
    torch.manual_seed(0)
    plain = build_model(small_rcnn_cfg())
    torch.save({"model": plain.state_dict()}, tmp_path / "base.pth")
    model = build_model(small_rcnn_cfg(**PEFT_OPTS))
    ckp = PeftCheckpointer(model, str(tmp_path / "out"))
    with caplog.at_level(logging.INFO):
        ckp.load(str(tmp_path / "base.pth"))
    assert "4 PEFT tensors are not in this base checkpoint" in caplog.text
    assert "lora_A" not in caplog.text
    for n, p in plain.state_dict().items():
        assert torch.equal(model.state_dict()[n], p)

    with torch.no_grad():
        model.roi_heads.box_head.fc1.lora_B.fill_(0.5)
    ckp.save("model_0000009", iteration=9)
    saved = torch.load(tmp_path / "out" / "model_0000009.pth", weights_only=False)
    assert saved["peft_partial"] and set(saved["model"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert os.path.getsize(tmp_path / "out" / "model_0000009.pth") < 0.2 * os.path.getsize(tmp_path / "base.pth")

    resumed = build_model(small_rcnn_cfg(**PEFT_OPTS))
    ckr = PeftCheckpointer(resumed, str(tmp_path / "out"))
    ckr.load(str(tmp_path / "base.pth"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        extra = ckr.resume_or_load("", resume=True)
    assert extra["iteration"] == 9 and "not found in the checkpoint" not in caplog.text
    for n, p in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[n], p), n


def test_optimizer_groups_hold_only_trainable_tensors():
    cfg = small_rcnn_cfg(**PEFT_OPTS)
    cfg.merge_from_list(["MODEL.PEFT.OPTIM.LORA_LR", 1e-3, "SOLVER.BASE_LR", 1e-4, "SOLVER.WEIGHT_DECAY_NORM", 0.0])
    model = build_model(cfg)
    groups = {g["name"]: g for g in peft_param_groups(cfg, model)}
    assert groups["lora"]["lr"] == 1e-3 and groups["head"]["lr"] == 1e-4 and groups["norm"]["weight_decay"] == 0.0
    opt = build_peft_optimizer(cfg, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


def test_mask_rcnn_with_a_vit_backbone_adopts_peft_through_the_backbone_hook():
    from detectron2.utils.events import EventStorage

    from peft_d2.modeling import add_vit_config

    cfg = small_rcnn_cfg(**{"MODEL.BACKBONE.NAME": "PEFTBackbone",
                            "MODEL.PEFT.BASE_BACKBONE": "D2ViTSimpleFeaturePyramid",
                            "MODEL.PEFT.METHODS": ["lora", "adapter"],
                            "MODEL.PEFT.LORA.TARGETS": ["net.blocks.*.attn.qkv"], "MODEL.PEFT.TRAINABLE": []})
    add_vit_config(cfg)
    v = cfg.MODEL.VIT
    v.IMG_SIZE, v.PATCH_SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.WINDOW_SIZE = 128, 16, 48, 2, 4, 4
    v.WINDOW_BLOCK_INDEXES, v.PRETRAIN_IMG_SIZE, v.OUT_CHANNELS = [0], 128, 32
    feats = ["res2", "res3", "res4", "res5"]
    cfg.merge_from_list(["MODEL.RPN.IN_FEATURES", feats, "MODEL.ROI_HEADS.IN_FEATURES", feats,
                         "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256]]])
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone_trainable = {n for n in trainable if n.startswith("backbone.")}
    assert backbone_trainable and all(".lora_" in n or ".adapter." in n for n in backbone_trainable)
    assert any(n.startswith("roi_heads.") for n in trainable)  # the detector's heads train as usual
    model.train()
    with EventStorage(0):
        losses = model(detection_batch(128, (10, 10, 60, 70)))
    sum(losses.values()).backward()
    assert model.backbone.net.blocks[0].attn.qkv.lora_B.grad is not None
    assert model.backbone.net.blocks[0].attn.qkv.weight.grad is None
