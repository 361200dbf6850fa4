"""Numerical parity of peft_d2.modeling with the official Mask2Former code (reference copy, never installed).

The official modeling subpackages are imported under a private namespace module, so mask2former/__init__.py
(which needs detectron2's C++ COCOeval) never runs. Both sides register the same names in detectron2's global
registries; the official entries are kept aside and swapped in only while the official model is built.

One small config (tiny Swin, 2-layer deformable pixel decoder, 3-layer masked decoder, 12 queries) is built on
the official side, its weights are perturbed (fresh inits have many zeros that would hide errors) and loaded
into ours with zero missing and zero unexpected keys. Then, in float32 on CPU:
backbone features, pixel-decoder outputs, every decoder prediction (aux included), every loss (same seed before
each criterion), gradients, and semantic / instance / panoptic inference must agree.
"""

import importlib
import sys
import types
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, build_model
from detectron2.structures import BitMasks, Instances

import peft_d2.modeling as ours
from peft_d2.env import reference_dir
from peft_d2.modeling import add_maskformer2_config

REFS = Path(reference_dir())
PKG = REFS / "mask2former"
ALIAS = "_peft_d2_official_mask2former"
REGISTRIES = (BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, META_ARCH_REGISTRY)
REL_TOL = 1e-5

pytestmark = pytest.mark.skipif(
    not (PKG / "modeling" / "pixel_decoder" / "msdeformattn.py").is_file(),
    reason=f"official Mask2Former sources not found at {PKG} (set PEFT_D2_REFS; tools/fetch_reference.py fetches them)",
)


# ---------------------------------------------------------------------------------------------------------------
# importing the official code next to ours
# ---------------------------------------------------------------------------------------------------------------
def _ensure_timm_layers():
    """The official Swin imports DropPath, to_2tuple, trunc_normal_ from timm; provide them if timm is absent."""
    try:
        importlib.import_module("timm.models.layers")
        return
    except ImportError:
        pass
    from peft_d2.modeling.backbone.swin import DropPath, trunc_normal_

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = trunc_normal_
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


@lru_cache(maxsize=1)
def official():
    """Import the official modeling code; return (namespace of its classes, {registry: {name: official obj}})."""
    snapshot = {reg: dict(reg._obj_map) for reg in REGISTRIES}
    _ensure_timm_layers()
    try:
        for reg in REGISTRIES:  # make room for the official names: Registry.register asserts a name is new
            for name, obj in snapshot[reg].items():
                if getattr(obj, "__module__", "").startswith("peft_d2."):
                    del reg._obj_map[name]
        if ALIAS not in sys.modules:
            ns = types.ModuleType(ALIAS)
            ns.__path__ = [str(PKG)]  # a namespace: mask2former/__init__.py never runs
            sys.modules[ALIAS] = ns
        mods = {
            name: importlib.import_module(f"{ALIAS}.{name}")
            for name in (
                "modeling",
                "modeling.transformer_decoder",
                "modeling.criterion",
                "modeling.matcher",
                "modeling.pixel_decoder.ops.modules.ms_deform_attn",
                "maskformer_model",
                "config",
            )
        }
        entries = {reg: {k: v for k, v in reg._obj_map.items() if snapshot[reg].get(k) is not v} for reg in REGISTRIES}
    finally:
        for reg in REGISTRIES:  # exactly our entries again
            reg._obj_map.clear()
            reg._obj_map.update(snapshot[reg])
    cls = types.SimpleNamespace(
        MaskFormer=mods["maskformer_model"].MaskFormer,
        SetCriterion=mods["modeling.criterion"].SetCriterion,
        HungarianMatcher=mods["modeling.matcher"].HungarianMatcher,
        MSDeformAttn=mods["modeling.pixel_decoder.ops.modules.ms_deform_attn"].MSDeformAttn,
        add_maskformer2_config=mods["config"].add_maskformer2_config,
    )
    assert entries[BACKBONE_REGISTRY]["D2SwinTransformer"].__module__.startswith(ALIAS)
    assert entries[META_ARCH_REGISTRY]["MaskFormer"] is cls.MaskFormer
    return cls, entries


@contextmanager
def registry_entries(entries):
    """Temporarily put `entries` ({registry: {name: obj}}) into the registries."""
    saved = {reg: dict(reg._obj_map) for reg in entries}
    try:
        for reg, objs in entries.items():
            reg._obj_map.update(objs)
        yield
    finally:
        for reg, objs in saved.items():
            reg._obj_map.clear()
            reg._obj_map.update(objs)


# ---------------------------------------------------------------------------------------------------------------
# the shared tiny config and models
# ---------------------------------------------------------------------------------------------------------------
NUM_CLASSES = 5
META = "peft_d2_parity_meta"


def tiny_cfg():
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = 32
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [2, 4, 8, 16]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0  # train-mode outputs must be deterministic
    h = cfg.MODEL.SEM_SEG_HEAD
    h.NAME = "MaskFormerHead"
    h.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    h.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    h.COMMON_STRIDE = 4
    h.TRANSFORMER_ENC_LAYERS = 2
    h.CONVS_DIM = 64
    h.MASK_DIM = 64
    h.NORM = "GN"
    h.NUM_CLASSES = NUM_CLASSES
    h.IGNORE_VALUE = 255
    m = cfg.MODEL.MASK_FORMER
    m.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    m.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    m.HIDDEN_DIM = 64
    m.NUM_OBJECT_QUERIES = 12
    m.NHEADS = 4
    m.DIM_FEEDFORWARD = 128
    m.DEC_LAYERS = 4  # 3 masked-attention layers + the prediction on the initial queries
    m.DROPOUT = 0.0
    m.TRAIN_NUM_POINTS = 200
    m.TEST.SEMANTIC_ON = m.TEST.INSTANCE_ON = m.TEST.PANOPTIC_ON = True
    m.TEST.OVERLAP_THRESHOLD = 0.5
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.DATASETS.TRAIN = (META,)
    return cfg


def metadata():
    meta = MetadataCatalog.get(META)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        meta.set(thing_dataset_id_to_contiguous_id={11: 0, 12: 1, 13: 2}, stuff_classes=[f"c{i}" for i in range(5)])
    return meta


def build_official(cfg):
    """The official model from its parts (its MaskFormer.from_config passes weight_dict, which this copy's
    SetCriterion does not take)."""
    off, entries = official()
    metadata()
    with registry_entries(entries):
        from detectron2.modeling import build_backbone, build_sem_seg_head

        backbone = build_backbone(cfg)
        head = build_sem_seg_head(cfg, backbone.output_shape())
    m = cfg.MODEL.MASK_FORMER
    matcher = off.HungarianMatcher(
        cost_class=m.CLASS_WEIGHT, cost_mask=m.MASK_WEIGHT, cost_dice=m.DICE_WEIGHT, num_points=m.TRAIN_NUM_POINTS
    )
    criterion = off.SetCriterion(
        head.num_classes,
        matcher=matcher,
        class_weight=m.CLASS_WEIGHT,
        mask_weight=m.MASK_WEIGHT,
        dice_weight=m.DICE_WEIGHT,
        num_layers=m.DEC_LAYERS - 1,
        eos_coef=m.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=m.TRAIN_NUM_POINTS,
        oversample_ratio=m.OVERSAMPLE_RATIO,
        importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO,
    )
    return off.MaskFormer(
        backbone=backbone,
        sem_seg_head=head,
        criterion=criterion,
        num_queries=m.NUM_OBJECT_QUERIES,
        object_mask_threshold=m.TEST.OBJECT_MASK_THRESHOLD,
        overlap_threshold=m.TEST.OVERLAP_THRESHOLD,
        metadata=MetadataCatalog.get(cfg.DATASETS.TRAIN[0]),
        size_divisibility=m.SIZE_DIVISIBILITY,
        sem_seg_postprocess_before_inference=True,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        semantic_on=True,
        panoptic_on=True,
        instance_on=True,
        test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


@pytest.fixture(scope="module")
def models():
    """(official, ours) with identical perturbed weights; the loading report is checked in a test below."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    theirs = build_official(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    mine = build_model(cfg)
    assert type(mine) is ours.MaskFormer and type(mine.backbone) is ours.D2SwinTransformer
    incompatible = mine.load_state_dict(theirs.state_dict(), strict=False)
    return theirs, mine, incompatible


def batched_inputs(with_instances):
    """Two non-square images of different sizes (padded to 96 x 128 by size divisibility 32), 2 and 3 instances."""
    g = torch.Generator().manual_seed(5)
    out = []
    for (H, W), n in (((96, 128), 2), ((80, 112), 3)):
        d = {"image": torch.rand(3, H, W, generator=g) * 255, "height": H, "width": W}
        if with_instances:
            inst = Instances((H, W))
            inst.gt_classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)
            masks = torch.zeros(n, H, W)
            for i in range(n):  # random rectangles
                y0, x0 = torch.randint(0, H // 2, (2,), generator=g).tolist()
                masks[i, y0 : y0 + H // 3, x0 : x0 + W // 3] = 1
            inst.gt_masks = masks
            d["instances"] = inst
        out.append(d)
    return out


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both are all zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def assert_close(a, b, what, tol=REL_TOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
    return err


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------
def test_config_keys_and_defaults_match_official():
    off, _ = official()
    a, b = get_cfg(), get_cfg()
    off.add_maskformer2_config(a)
    add_maskformer2_config(b)
    assert a == b, "add_maskformer2_config differs from the official one"


def test_state_dict_layout_identical(models):
    theirs, mine, incompatible = models
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    sd_t, sd_m = theirs.state_dict(), mine.state_dict()
    assert list(sd_t) == list(sd_m), "parameter order or names differ"
    assert {k: tuple(v.shape) for k, v in sd_t.items()} == {k: tuple(v.shape) for k, v in sd_m.items()}
    for k in sd_t:
        assert torch.equal(sd_t[k], sd_m[k]), k
    assert len(sd_t) > 200  # the whole model, not a fragment


def test_fresh_init_identical_to_official():
    """Same seed, same construction order and init functions: the untrained models are bitwise equal."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    sd_t = build_official(cfg).state_dict()
    torch.manual_seed(0)
    sd_m = build_model(cfg).state_dict()
    different = [k for k in sd_t if not torch.equal(sd_t[k], sd_m[k])]
    assert different == [], f"{len(different)} tensors initialised differently, e.g. {different[:5]}"


def test_msdeformattn_module_parity():
    """The attention module alone, both reference-point forms, with a padding mask, output and input grads."""
    off, _ = official()
    torch.manual_seed(0)
    theirs = off.MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=4)
    mine = ours.MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=4)
    mine.load_state_dict(theirs.state_dict())
    # fresh init must be the same distribution-free parts: offsets bias ring, zero attention logits
    fresh = ours.MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=4)
    assert torch.equal(fresh.sampling_offsets.bias, theirs.sampling_offsets.bias)
    assert not fresh.attention_weights.weight.any() and not fresh.sampling_offsets.weight.any()
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs.load_state_dict(mine.state_dict())

    shapes = torch.tensor([[8, 10], [4, 5], [2, 3]])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    x = torch.randn(2, S, 64)
    q = torch.randn(2, 7, 64)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, -5:] = True
    for ref in (torch.rand(2, 7, 3, 2), torch.cat([torch.rand(2, 7, 3, 2), 0.1 + 0.3 * torch.rand(2, 7, 3, 2)], -1)):
        outs, grads = [], []
        for module in (theirs, mine):
            xi, qi = x.clone().requires_grad_(), q.clone().requires_grad_()
            out = module(qi, ref, xi, shapes, starts, pad)
            out.square().sum().backward()
            outs.append(out)
            grads.append((xi.grad, qi.grad))
        assert_close(outs[1], outs[0], f"MSDeformAttn output (reference dim {ref.shape[-1]})")
        assert_close(grads[1][0], grads[0][0], "grad wrt input")
        assert_close(grads[1][1], grads[0][1], "grad wrt query")


def test_forward_parity_eval(models):
    """Backbone features, pixel-decoder outputs and every decoder prediction."""
    theirs, mine, _ = models
    theirs.eval(), mine.eval()
    inputs = batched_inputs(with_instances=False)
    with torch.no_grad():
        x = mine.preprocess_image(inputs).tensor
        feats_t, feats_m = theirs.backbone(x), mine.backbone(x)
        assert sorted(feats_t) == sorted(feats_m) == ["res2", "res3", "res4", "res5"]
        for k in feats_t:
            assert_close(feats_m[k], feats_t[k], f"backbone {k}")

        pd_t = theirs.sem_seg_head.pixel_decoder.forward_features(feats_t)
        pd_m = mine.sem_seg_head.pixel_decoder.forward_features(feats_t)
        assert_close(pd_m[0], pd_t[0], "mask_features")
        assert_close(pd_m[1], pd_t[1], "transformer encoder features")
        assert len(pd_m[2]) == len(pd_t[2]) == 3
        for i, (a, b) in enumerate(zip(pd_m[2], pd_t[2])):
            assert_close(a, b, f"multi-scale feature {i}")

        out_t = theirs.sem_seg_head.predictor(pd_t[2], pd_t[0])
        out_m = mine.sem_seg_head.predictor(pd_t[2], pd_t[0])
        assert len(out_m["aux_outputs"]) == len(out_t["aux_outputs"]) == 3
        preds_t = out_t["aux_outputs"] + [out_t]
        preds_m = out_m["aux_outputs"] + [out_m]
        for i, (a, b) in enumerate(zip(preds_m, preds_t)):
            assert_close(a["pred_logits"], b["pred_logits"], f"pred_logits of prediction {i}")
            assert_close(a["pred_masks"], b["pred_masks"], f"pred_masks of prediction {i}")

        # spatially constant mask features: whole queries fall below 0.5 everywhere, the fully-masked-row path
        flat = pd_t[0].mean((2, 3), keepdim=True).expand_as(pd_t[0]).contiguous()
        out_t = theirs.sem_seg_head.predictor(pd_t[2], flat)
        out_m = mine.sem_seg_head.predictor(pd_t[2], flat)
        empty = (out_t["aux_outputs"][0]["pred_masks"].flatten(2) < 0).all(-1)
        assert empty.any() and not empty.all(), "the constant-feature check needs some empty and some full masks"
        for i, (a, b) in enumerate(zip(out_m["aux_outputs"] + [out_m], out_t["aux_outputs"] + [out_t])):
            assert_close(a["pred_logits"], b["pred_logits"], f"pred_logits of prediction {i} (constant features)")
            assert_close(a["pred_masks"], b["pred_masks"], f"pred_masks of prediction {i} (constant features)")

        # and end to end through the whole head
        full_t = theirs.sem_seg_head(feats_t)
        full_m = mine.sem_seg_head(feats_m)
        assert_close(full_m["pred_masks"], full_t["pred_masks"], "head pred_masks")


def test_loss_and_gradient_parity(models):
    """Train mode, same seed before each call (the matcher's and the criterion's point sampling)."""
    theirs, mine, _ = models
    theirs.train(), mine.train()
    inputs = batched_inputs(with_instances=True)
    losses = []
    for model in (theirs, mine):
        model.zero_grad()
        torch.manual_seed(1234)
        loss_dict = model(inputs)
        sum(loss_dict.values()).backward()
        losses.append(loss_dict)
    lt, lm = losses
    assert sorted(lt) == sorted(lm)
    assert len(lm) == 3 * 4  # (ce, mask, dice) x (final + 3 aux)
    for k in lt:
        assert torch.isfinite(lm[k])
        assert_close(lm[k], lt[k], k)
    grads_t = dict(theirs.named_parameters())
    for name, p in mine.named_parameters():
        gt = grads_t[name].grad
        assert (p.grad is None) == (gt is None), name
        if gt is not None:
            assert_close(p.grad, gt, f"grad {name}", tol=1e-4)  # achieved ~1.5e-6; summation order differs
    theirs.zero_grad(), mine.zero_grad()


def test_inference_parity(models):
    """Semantic, panoptic and instance outputs of the whole model."""
    theirs, mine, _ = models
    theirs.eval(), mine.eval()
    inputs = batched_inputs(with_instances=False)
    with torch.no_grad():
        res_t, res_m = theirs(inputs), mine(inputs)
    assert len(res_t) == len(res_m) == 2
    n_segments = 0
    for rt, rm, inp in zip(res_t, res_m, inputs):
        assert sorted(rm) == ["instances", "panoptic_seg", "sem_seg"]
        assert rm["sem_seg"].shape == (NUM_CLASSES, inp["height"], inp["width"])
        assert_close(rm["sem_seg"], rt["sem_seg"], "sem_seg")
        seg_t, info_t = rt["panoptic_seg"]
        seg_m, info_m = rm["panoptic_seg"]
        assert torch.equal(seg_m, seg_t) and info_m == info_t
        n_segments += len(info_m)
        it, im = rt["instances"], rm["instances"]
        assert im.image_size == it.image_size == (inp["height"], inp["width"])
        assert torch.equal(im.pred_classes, it.pred_classes)
        assert torch.equal(im.pred_masks, it.pred_masks)
        assert_close(im.scores, it.scores, "instance scores")
        assert not it.pred_boxes.tensor.any()  # the official code leaves zeros; ours are the masks' extents
        assert torch.equal(im.pred_boxes.tensor, BitMasks(it.pred_masks > 0).get_bounding_boxes().tensor)
    assert n_segments > 0, "panoptic inference found no segment: the comparison would be vacuous"


def test_base_pixel_decoder_parity():
    """The FPN pixel decoder (official default PIXEL_DECODER_NAME): same init, same outputs through the decoder."""
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    torch.manual_seed(0)
    theirs = build_official(cfg).eval()
    torch.manual_seed(0)
    mine = build_model(cfg).eval()
    assert type(mine.sem_seg_head.pixel_decoder) is ours.BasePixelDecoder
    sd_t, sd_m = theirs.state_dict(), mine.state_dict()
    assert list(sd_t) == list(sd_m) and all(torch.equal(sd_t[k], sd_m[k]) for k in sd_t)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    mine.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        x = mine.preprocess_image(batched_inputs(with_instances=False)).tensor
        feats = theirs.backbone(x)
        pd_t = theirs.sem_seg_head.pixel_decoder.forward_features(feats)
        pd_m = mine.sem_seg_head.pixel_decoder.forward_features(feats)
        assert pd_t[1] is None and pd_m[1] is None
        assert_close(pd_m[0], pd_t[0], "FPN mask_features")
        for i, (a, b) in enumerate(zip(pd_m[2], pd_t[2])):
            assert_close(a, b, f"FPN multi-scale feature {i}")
        out_t, out_m = theirs.sem_seg_head(feats), mine.sem_seg_head(feats)
        assert_close(out_m["pred_masks"], out_t["pred_masks"], "pred_masks (FPN pixel decoder)")
        assert_close(out_m["pred_logits"], out_t["pred_logits"], "pred_logits (FPN pixel decoder)")
