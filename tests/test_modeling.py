"""peft_d2.modeling on its own: builds from cfg with each backbone, trains a step, infers in every mode, loads old
checkpoint formats, and the Swin converter. Parity with the official code is in test_parity_mask2former.py."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

import peft_d2.modeling as m2f
from peft_d2 import ops
from peft_d2.modeling import add_maskformer2_config, add_vit_config

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
META = "peft_d2_test_modeling_meta"


def base_cfg(backbone="swin"):
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_vit_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    if backbone == "swin":
        cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
        cfg.MODEL.SWIN.EMBED_DIM = 32
        cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
        cfg.MODEL.SWIN.NUM_HEADS = [2, 4, 8, 16]
        cfg.MODEL.SWIN.DROP_PATH_RATE = 0.1
    elif backbone == "r50":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        cfg.MODEL.RESNETS.DEPTH = 50
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.RESNETS.NORM = "FrozenBN"
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    elif backbone == "vit":
        cfg.MODEL.BACKBONE.NAME = "D2ViTSimpleFeaturePyramid"
        v = cfg.MODEL.VIT
        v.IMG_SIZE, v.PATCH_SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS = 64, 16, 48, 2, 4
        v.WINDOW_SIZE, v.WINDOW_BLOCK_INDEXES, v.PRETRAIN_IMG_SIZE = 2, [0], 64
        v.OUT_CHANNELS = 64
    else:
        raise ValueError(backbone)
    h = cfg.MODEL.SEM_SEG_HEAD
    h.NAME = "MaskFormerHead"
    h.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    h.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    h.COMMON_STRIDE = 4
    h.TRANSFORMER_ENC_LAYERS = 1
    h.CONVS_DIM = h.MASK_DIM = 64
    h.NORM = "GN"
    h.NUM_CLASSES = NUM_CLASSES
    mf = cfg.MODEL.MASK_FORMER
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.HIDDEN_DIM, mf.NUM_OBJECT_QUERIES, mf.NHEADS, mf.DIM_FEEDFORWARD, mf.DEC_LAYERS = 64, 10, 4, 128, 3
    mf.TRAIN_NUM_POINTS = 100
    cfg.TEST.DETECTIONS_PER_IMAGE = 15
    cfg.DATASETS.TRAIN = (META,)
    meta = MetadataCatalog.get(META)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        meta.set(thing_dataset_id_to_contiguous_id={1: 0, 2: 1})
    return cfg


def inputs(with_instances, sizes=((64, 64), (48, 64))):
    g = torch.Generator().manual_seed(0)
    out = []
    for H, W in sizes:
        d = {"image": torch.randint(0, 256, (3, H, W), generator=g).float(), "height": H, "width": W}
        if with_instances:
            inst = Instances((H, W))
            inst.gt_classes = torch.tensor([0, 3])
            masks = torch.zeros(2, H, W, dtype=torch.bool)
            masks[0, : H // 2, : W // 2] = True
            masks[1, H // 3 :, W // 4 :] = True
            inst.gt_masks = masks
            d["instances"] = inst
        out.append(d)
    return out


@pytest.mark.parametrize("backbone", ["swin", "r50", "vit"])
def test_train_step_all_backbones(backbone):
    cfg = base_cfg(backbone)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, m2f.MaskFormer)
    shapes = model.backbone.output_shape()
    assert [shapes[k].stride for k in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    model.train()
    losses = model(inputs(with_instances=True))
    assert len(losses) == 3 * cfg.MODEL.MASK_FORMER.DEC_LAYERS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_dice"] > 0
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [], f"parameters without gradient: {no_grad[:5]}"
    head_grads = [p.grad.abs().sum() for p in model.sem_seg_head.parameters() if p.requires_grad]
    assert all(torch.isfinite(g) for g in head_grads) and sum(head_grads) > 0


def test_weight_dict_scales_losses():
    """The returned losses are the criterion's times MASK_WEIGHT etc.; deep supervision off drops aux losses."""
    cfg = base_cfg("swin")
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    model = build_model(cfg).train()
    assert set(model.criterion.weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}
    torch.manual_seed(3)
    weighted = model(inputs(with_instances=True))
    assert set(weighted) == {"loss_ce", "loss_mask", "loss_dice"}
    model.criterion.weight_dict = dict.fromkeys(model.criterion.weight_dict, 1.0)
    torch.manual_seed(3)
    raw = model(inputs(with_instances=True))
    torch.testing.assert_close(weighted["loss_mask"], raw["loss_mask"] * cfg.MODEL.MASK_FORMER.MASK_WEIGHT)


@pytest.mark.parametrize("mode", ["semantic", "instance", "panoptic"])
def test_inference_output_formats(mode):
    cfg = base_cfg("swin")
    t = cfg.MODEL.MASK_FORMER.TEST
    t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON = mode == "semantic", mode == "instance", mode == "panoptic"
    model = build_model(cfg).eval()
    batch = inputs(with_instances=False)
    batch[1]["height"], batch[1]["width"] = 96, 128  # output resized to the requested size
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 2
    for r, d in zip(results, batch):
        H, W = d["height"], d["width"]
        if mode == "semantic":
            assert set(r) == {"sem_seg"}
            assert r["sem_seg"].shape == (NUM_CLASSES, H, W) and r["sem_seg"].dtype == torch.float32
            assert (r["sem_seg"] >= 0).all()
        elif mode == "instance":
            assert set(r) == {"instances"}
            inst = r["instances"]
            assert inst.image_size == (H, W) and len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE
            assert inst.pred_masks.shape == (len(inst), H, W)
            assert inst.pred_classes.dtype == torch.int64 and inst.pred_classes.max() < NUM_CLASSES
            assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
            assert inst.pred_boxes.tensor.shape == (len(inst), 4)
        else:
            assert set(r) == {"panoptic_seg"}
            seg, info = r["panoptic_seg"]
            assert seg.shape == (H, W) and seg.dtype == torch.int32
            assert sorted(torch.unique(seg).tolist()) == sorted({0} | {s["id"] for s in info})
            for s in info:
                assert set(s) == {"id", "isthing", "category_id"}
                assert s["isthing"] == (s["category_id"] in (0, 1))


def _instance_model():
    cfg = base_cfg("swin")
    t = cfg.MODEL.MASK_FORMER.TEST
    t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON = False, True, False
    return cfg, build_model(cfg).eval()


def test_instance_boxes_are_the_masks_extents():
    """Instance results carry each mask's box (detectron2's BitMasks.get_bounding_boxes), not zeros, so that
    box AP is measured."""
    from detectron2.structures import BitMasks

    cfg, model = _instance_model()
    with torch.no_grad():
        results = model(inputs(with_instances=False))
    for r in results:
        inst = r["instances"]
        boxes = inst.pred_boxes.tensor
        torch.testing.assert_close(boxes, BitMasks(inst.pred_masks > 0).get_bounding_boxes().tensor)
        filled = inst.pred_masks.flatten(1).any(1)
        assert filled.any() and (boxes[filled, 2:] > boxes[filled, :2]).all()
    Q, K = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, NUM_CLASSES
    mask_cls = torch.full((Q, K + 1), -10.0)  # query 0: class 1, a mask over rows 3..7 and columns 10..20
    mask_cls[0, 1] = 10.0
    mask_pred = torch.full((Q, 32, 32), -10.0)
    mask_pred[0, 3:8, 10:21] = 10.0
    inst = model.instance_inference(mask_cls, mask_pred)
    top = inst.scores.argmax()
    assert inst.pred_classes[top] == 1 and inst.pred_boxes.tensor[top].tolist() == [10.0, 3.0, 21.0, 8.0]
    masks = torch.rand(6, 9, 7) > 0.9  # sparse, some empty; and no masks at all
    masks[2] = False
    for m in (masks, masks[:0]):
        torch.testing.assert_close(m2f.meta_arch.maskformer.mask_boxes(m), BitMasks(m).get_bounding_boxes().tensor)


def test_raw_outputs_at_inference_with_do_postprocess_false():
    """model(batch, do_postprocess=False): the raw pred_logits / pred_masks the per-image results come from."""
    cfg, model = _instance_model()
    batch = inputs(with_instances=False)
    with torch.no_grad():
        results = model(batch)
        raw = model(batch, do_postprocess=False)
    Q, K = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, NUM_CLASSES
    assert raw["pred_logits"].shape == (2, Q, K + 1) and raw["image_sizes"] == [(64, 64), (48, 64)]
    assert raw["pred_masks"].shape == (2, Q, 16, 16) and len(raw["aux_outputs"]) == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
    for i, r in enumerate(results):
        mask_pred = torch.nn.functional.interpolate(raw["pred_masks"], size=(64, 64), mode="bilinear")[i]
        again = model.inference_single(raw["pred_logits"][i], mask_pred, batch[i], raw["image_sizes"][i])
        torch.testing.assert_close(again["instances"].scores, r["instances"].scores)


def test_msdeformattn_calls_the_op_with_projected_values(monkeypatch):
    """The module's core is peft_d2.ops.ms_deform_attn; values come from project_value (the LoRA fusion point)."""
    attn = m2f.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    assert not attn.sampling_offsets.weight.any() and not attn.value_proj.bias.any()
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    x, q, ref = torch.randn(2, 30, 32), torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[0, -6:] = True
    seen = {}
    reference = ops.ms_deform_attn

    def spy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        seen.update(value=value, loc=sampling_locations, w=attention_weights)
        return reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    monkeypatch.setattr(ops, "ms_deform_attn", spy)
    out = attn(q, ref, x, shapes, starts, pad)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(seen["value"], attn.project_value(x, pad))
    assert seen["value"].shape == (2, 30, 4, 8) and not seen["value"][0, -6:].any()
    assert seen["loc"].shape == (2, 5, 4, 2, 3, 2)
    # fresh attention weights are uniform over the 2 levels x 3 points
    torch.testing.assert_close(seen["w"], torch.full((2, 5, 4, 2, 3), 1 / 6))


def test_old_checkpoint_formats_convert():
    """MaskFormer v1 pixel-decoder keys directly under sem_seg_head and 'static_query' load with nothing missing."""
    model = build_model(base_cfg("swin"))
    sd = model.state_dict()
    old = {}
    for k, v in sd.items():
        k = k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.")
        k = k.replace("predictor.query_feat", "predictor.static_query")
        old[k] = v + 1 if v.is_floating_point() else v  # shifted, so a key left unloaded would show
    assert not hasattr(old, "_metadata")  # version-less, like a plain pickled dict
    fresh = build_model(base_cfg("swin"))
    incompatible = fresh.load_state_dict(old, strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, sd[k] + 1 if v.is_floating_point() else sd[k], msg=k)
    # the current format without metadata must not be touched by the conversion
    again = build_model(base_cfg("swin"))
    incompatible = again.load_state_dict(dict(sd), strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []


def test_official_yaml_keys_parse(tmp_path):
    """A config written with the official key names (Mask2Former Swin panoptic) merges into our defaults."""
    yaml = tmp_path / "m2f.yaml"
    yaml.write_text(
        """
MODEL:
  META_ARCHITECTURE: "MaskFormer"
  BACKBONE: {NAME: "D2SwinTransformer"}
  SWIN: {EMBED_DIM: 128, DEPTHS: [2, 2, 18, 2], NUM_HEADS: [4, 8, 16, 32], WINDOW_SIZE: 12,
         APE: False, DROP_PATH_RATE: 0.3, PATCH_NORM: True, PRETRAIN_IMG_SIZE: 384}
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    IGNORE_VALUE: 255
    NUM_CLASSES: 133
    LOSS_WEIGHT: 1.0
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
    PIXEL_DECODER_NAME: "MSDeformAttnPixelDecoder"
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    COMMON_STRIDE: 4
    TRANSFORMER_ENC_LAYERS: 6
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: "MultiScaleMaskedTransformerDecoder"
    TRANSFORMER_IN_FEATURE: "multi_scale_pixel_decoder"
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 0.1
    CLASS_WEIGHT: 2.0
    MASK_WEIGHT: 5.0
    DICE_WEIGHT: 5.0
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 200
    NHEADS: 8
    DROPOUT: 0.0
    DIM_FEEDFORWARD: 2048
    ENC_LAYERS: 0
    PRE_NORM: False
    ENFORCE_INPUT_PROJ: False
    SIZE_DIVISIBILITY: 32
    DEC_LAYERS: 10
    TRAIN_NUM_POINTS: 12544
    OVERSAMPLE_RATIO: 3.0
    IMPORTANCE_SAMPLE_RATIO: 0.75
    TEST: {SEMANTIC_ON: True, INSTANCE_ON: True, PANOPTIC_ON: True, OVERLAP_THRESHOLD: 0.8,
           OBJECT_MASK_THRESHOLD: 0.8}
SOLVER: {OPTIMIZER: "ADAMW", BACKBONE_MULTIPLIER: 0.1, WEIGHT_DECAY_EMBED: 0.0}
INPUT: {IMAGE_SIZE: 1024, MIN_SCALE: 0.1, MAX_SCALE: 2.0, FORMAT: "RGB",
        DATASET_MAPPER_NAME: "coco_panoptic_lsj", COLOR_AUG_SSD: False, SIZE_DIVISIBILITY: -1}
"""
    )
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(yaml))
    assert cfg.MODEL.SWIN.DEPTHS == [2, 2, 18, 2] and cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_panoptic_lsj"
    with pytest.raises((KeyError, AssertionError)):  # unknown keys are still rejected (yacs asserts)
        cfg.merge_from_list(["MODEL.MASK_FORMER.NOT_A_KEY", 1])


def tiny_swin_classification_state_dict():
    """What an official Swin ImageNet checkpoint holds, for a tiny Swin: backbone keys without prefix + head."""
    torch.manual_seed(7)
    swin = m2f.SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=7)
    sd = {k: v for k, v in swin.state_dict().items() if not k.startswith("norm")}  # classification: no norm0..3
    sd["norm.weight"], sd["norm.bias"] = torch.ones(256), torch.zeros(256)
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 256), torch.zeros(1000)
    return sd


def test_convert_swin_to_d2_roundtrip(tmp_path):
    src_sd = tiny_swin_classification_state_dict()
    src, dst = tmp_path / "swin.pth", tmp_path / "swin.pkl"
    torch.save({"model": src_sd}, src)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_swin_to_d2.py"), str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with open(dst, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "third_party" and obj["matching_heuristics"] is True
    assert sorted(obj["model"]) == sorted(src_sd)

    # detectron2's checkpointer maps the names onto backbone.* by suffix
    model = build_model(base_cfg("swin"))
    head_before = {k: v.clone() for k, v in model.sem_seg_head.state_dict().items()}
    DetectionCheckpointer(model).load(str(dst))
    model_sd = model.state_dict()
    for k, v in model.sem_seg_head.state_dict().items():  # the classifier's norm/head must not land in the head
        assert torch.equal(v, head_before[k]), k
    for k, v in src_sd.items():
        if k.startswith(("patch_embed.", "layers.")):
            torch.testing.assert_close(model_sd["backbone." + k], v, msg=k)


def test_convert_swin_rejects_other_files(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from convert_swin_to_d2 import convert_swin_state_dict
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="Swin"):
        convert_swin_state_dict({"model": {"conv1.weight": torch.zeros(1)}})
    with pytest.raises(ValueError):
        convert_swin_state_dict({"model": {"patch_embed.proj.weight": "not a tensor"}})
