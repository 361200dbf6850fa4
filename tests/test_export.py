"""tools/export_model.py and peft_d2.export: merged PEFT Mask2Formers exported to ONNX (run by ONNX Runtime),
torch.export and TorchScript equal the eager merged model, for every method, with a dynamic batch.

The methods are exported in three models that together hold every registered method and LoRA option (an export
costs tens of seconds of tracing, so one model per method would cost minutes of the suite):
- "fold":   LoRA (DoRA) on the backbone's qkv, on the pixel decoder's convolutions (conv LoRA) and inside
            MSDeformAttn, with COBOT over its slots; SFA on the backbone's first MLP layers (its internal weights
            fold; its external adapters, bottleneck adapters, stay);
- "keep":   sequential adapters (3 per site) and COBOT-orchestrated parallel adapters, prefixes, Mona;
- "mopeft": MoPEFT's gated LoRA, prefixes and adapters (a gate depends on the input: nothing folds).
"""

import json
import os

import pytest
import torch
from _models import load_tool
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.modeling import build_model

import peft_d2
import peft_d2.build  # noqa: F401 - registers PEFT
from peft_d2 import PeftConfigError, export
from peft_d2 import checkpoint as ckpt
from peft_d2.build import build_base_model
from peft_d2.config import get_cfg, merge_config, peft_config_from_cfg
from peft_d2.engine.checkpoint import load_adapted_model
from peft_d2.inject import inject
from peft_d2.tuners import METHODS
from peft_d2.tuners.sfa import random_selection

export_model = load_tool("export_model.py", "peft_d2_export_model")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEFT_BASE = os.path.join(ROOT, "configs/synthetic/peft/Base-PEFT.yaml")
BASE = os.path.join(ROOT, "configs/synthetic/maskformer2_swin_micro_bs4_B.yaml")
CONVS = ["sem_seg_head.pixel_decoder.input_proj.*.0", "sem_seg_head.pixel_decoder.adapter_?",
         "sem_seg_head.pixel_decoder.layer_?", "sem_seg_head.pixel_decoder.mask_features"]
QKV = "backbone.layers.*.blocks.*.attn.qkv"
MODELS = {
    "fold": (
        {"MODEL.PEFT.METHODS": ["lora", "cobot", "sfa"], "MODEL.PEFT.LORA.TARGETS": [QKV, *CONVS],
         "MODEL.PEFT.LORA.MSDA_LAYERS": ["sampling_offsets", "value_proj"], "MODEL.PEFT.LORA.DORA": True,
         "MODEL.PEFT.SFA.TARGETS": ["backbone.layers.*.blocks.*.mlp.fc1"], "MODEL.PEFT.SFA.BUDGET_RATIO": 0.03},
        {"merged": ["cobot", "lora", "sfa"], "kept": ["adapter"]},
    ),
    "keep": (
        {"MODEL.PEFT.METHODS": ["adapter", "cobot", "prefix", "mona"], "MODEL.PEFT.ADAPTER.BOTTLENECK": 16,
         "MODEL.PEFT.ADAPTER.NUM_PER_SITE": 3,
         "MODEL.PEFT.ADAPTER.PLACEMENTS": ["parallel_mlp", "msdeform_attn", "decoder_self_attn", "decoder_cross_attn"],
         "MODEL.PEFT.COBOT.BASE_METHOD": "adapter", "MODEL.PEFT.PREFIX.LENGTH": 8,
         "MODEL.PEFT.PREFIX.PLACEMENTS": ["attn", "decoder_self_attn"], "MODEL.PEFT.MONA.BOTTLENECK": 16},
        {"merged": [], "kept": ["adapter", "cobot", "mona", "prefix"]},
    ),
    "mopeft": (
        {"MODEL.PEFT.METHODS": ["lora", "prefix", "adapter", "mopeft"], "MODEL.PEFT.LORA.TARGETS": [QKV],
         "MODEL.PEFT.PREFIX.LENGTH": 8, "MODEL.PEFT.ADAPTER.PLACEMENTS": ["mlp"]},
        {"merged": [], "kept": ["adapter", "lora", "mopeft", "prefix"]},
    ),
}


def _opts(d):
    return [x for k, v in d.items() for x in (k, str(v))]


def test_the_models_hold_every_method():
    held = {m for opts, _ in MODELS.values() for m in opts["MODEL.PEFT.METHODS"]}
    assert held == set(METHODS), f"a registered method is not exported by the tests: {set(METHODS) - held}"


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(merge_config(get_cfg(), BASE, ["MODEL.DEVICE", "cpu"])).state_dict()}, path)
    return str(path)


def make_adapter(tmp_path, base_weights, name):
    """An adapter file of MODELS[name] whose trainable tensors moved away from their initialisation."""
    cfg = merge_config(get_cfg(), PEFT_BASE, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", base_weights,
                                             *_opts(MODELS[name][0])])
    model = build_base_model(cfg)
    DetectionCheckpointer(model).load(base_weights)
    config = peft_config_from_cfg(cfg)
    inject(model, config, **({"sfa_selection": random_selection(model, config.sfa)} if "sfa" in config.methods else {}))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return cfg, ckpt.save_adapter(model, str(tmp_path / f"{name}.safetensors"))


def _assert_exact(diffs):
    for check, d in diffs.items():
        for output, v in d.items():
            assert v <= (1e-4 if isinstance(v, float) else 0), f"{check}: {output} differs by {v}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(export.FORMATS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_model_equals_the_eager_merged_model(tmp_path, base_weights, name, fmt):
    cfg, adapter = make_adapter(tmp_path, base_weights, name)
    out = tmp_path / "export"
    manifest = export_model.run(cfg.clone(), adapter, fmt, str(out))
    assert sorted(os.listdir(out)) == sorted(["export.json", export.FORMATS[fmt]])
    assert json.loads((out / "export.json").read_text()) == manifest
    assert {k: manifest[k] for k in ("merged", "kept")} == MODELS[name][1]
    assert manifest["deformable_attention"] == ("reference" if fmt == "onnx" else "cpu")
    assert manifest["input"]["shape"] == ["batch", 3, 128, 128]
    # run by the tool: the sample (batch 2) and a batch of 3 through the program loaded back from disk
    assert set(manifest["largest_difference_to_eager"]) == {"sample", "batch of 3"}
    _assert_exact(manifest["largest_difference_to_eager"])

    # again here, from the file, on other images; and the eager merged model equals the unmerged adapted one
    exported = export.load(str(out / export.FORMATS[fmt]), fmt)
    merged = load_adapted_model(cfg, adapter)
    export.prepare(merged)
    unmerged = load_adapted_model(cfg, adapter).eval()
    images = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        want = export.InstanceSegmentationExport(merged, cfg.TEST.DETECTIONS_PER_IMAGE)(images)
        before = export.InstanceSegmentationExport(unmerged, cfg.TEST.DETECTIONS_PER_IMAGE)(images)
        got = exported(images)
    _assert_exact({"4 other images": export.differences(want, got)})
    torch.testing.assert_close(before[0], want[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(before[1], want[1], rtol=0, atol=1e-4)


def test_postprocessing_equals_maskformer_instance_inference(base_weights):
    """The exported instances are MaskFormer's own instance inference on an unpadded image, sorted by score."""
    cfg = merge_config(get_cfg(), BASE, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", base_weights])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(base_weights)
    export.prepare(model)
    images = torch.rand(2, 3, 128, 128) * 255
    mean, std = model.pixel_mean, model.pixel_std
    with torch.no_grad():
        logits, masks, scores, classes, binary = export.InstanceSegmentationExport(
            model, cfg.TEST.DETECTIONS_PER_IMAGE
        )((images - mean) / std)
        results = model([{"image": im} for im in images])
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first

    def instances(scores, classes, masks):  # order-free: instances of equal score may come in any order
        return sorted((round(float(s), 5), int(c), m.numpy().tobytes()) for s, c, m in zip(scores, classes, masks))

    for i, r in enumerate(results):
        inst = r["instances"]
        assert len(inst) == scores.shape[1] == min(cfg.TEST.DETECTIONS_PER_IMAGE, 16 * 4)
        assert instances(scores[i], classes[i], binary[i]) == instances(
            inst.scores, inst.pred_classes, inst.pred_masks.bool()
        )


def test_stable_descending_order():
    scores = torch.tensor([[0.0, 0.5, 0.0, 0.7, 0.5, 0.0], [1.0, 1.0, 1.0, 0.0, 2.0, -1.0]])
    want = torch.stack([torch.sort(r, descending=True, stable=True).indices for r in scores])
    assert torch.equal(export.stable_descending_order(scores), want)
    assert torch.equal(want[0], torch.tensor([3, 1, 4, 0, 2, 5]))


def test_refusals_name_what_cannot_be_exported(tmp_path, base_weights):
    rcnn = d2_get_cfg()
    rcnn.MODEL.DEVICE = "cpu"
    with pytest.raises(PeftConfigError, match="the model is a GeneralizedRCNN.*merge_adapter.py.*tools/deploy"):
        export.prepare(build_model(rcnn))
    cfg, adapter = make_adapter(tmp_path, base_weights, "keep")
    serving = build_base_model(cfg)
    DetectionCheckpointer(serving).load(base_weights)
    peft_d2.load_adapters(serving, {"cells": adapter, "roads": adapter})
    with pytest.raises(PeftConfigError, match=r"serves several adapters \(\['cells', 'roads'\]\).*one adapter file"):
        export.prepare(serving)
    assert serving.training  # refused before any change
    with pytest.raises(PeftConfigError, match="--image-size 100 128: both must be positive multiples of 32"):
        export_model.main(["--config-file", BASE, "--format", "onnx", "--output", str(tmp_path / "x"),
                           "--image-size", "100", "128", "MODEL.WEIGHTS", base_weights])
    with pytest.raises(PeftConfigError, match="a PEFT config needs --adapter or MODEL.PEFT.WEIGHTS"):
        export_model.main(["--config-file", PEFT_BASE, "--format", "onnx", "--output", str(tmp_path / "x"),
                           "MODEL.PEFT.METHODS", "['lora']"])
    with pytest.raises(PeftConfigError, match="--adapter needs a PEFT config"):
        export_model.main(["--config-file", BASE, "--format", "onnx", "--output", str(tmp_path / "x"),
                           "--adapter", adapter])
    assert not (tmp_path / "x").exists()


def test_a_failed_export_leaves_the_earlier_one_as_it_was(tmp_path, base_weights, monkeypatch):
    """The program is exported and checked in a hidden folder: an export that fails (here: its check against the
    eager model) changes nothing in OUTPUT and leaves no partial files."""
    out = tmp_path / "export"
    argv = ["--config-file", BASE, "--format", "torchscript", "--output", str(out), "--image-size", "64", "64",
            "MODEL.WEIGHTS", base_weights]
    export_model.main(argv)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert sorted(before) == ["export.json", "model.ts"]

    def fail(*args):
        raise RuntimeError("the check failed")

    monkeypatch.setattr(export, "differences", fail)
    with pytest.raises(RuntimeError, match="the check failed"):  # another program: traced at 96 x 96
        export_model.main([a if a != "64" else "96" for a in argv])
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_onnx_export_of_shifted_windows_on_grids_that_need_padding(tmp_path):
    """Two blocks per stage, so every stage has a shifted-window block; at 96 px the third stage (6 x 6 tokens)
    pads to whole 4-token windows, and the shift mask must export with the padded size (ONNX's integer division
    truncates where Python's floors). Random weights."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]"]
    cfg = merge_config(get_cfg(), BASE, opts)
    manifest = export_model.run(cfg, "", "onnx", str(tmp_path / "export"), size=(96, 96))
    _assert_exact(manifest["largest_difference_to_eager"])


def test_benchmark_tells_near_tie_swaps_and_threshold_flips_from_real_mask_differences():
    """tools/benchmark_export.py's mask_check: an exported instance that traded places with a near-tied one of
    the same class is a swap, a flipped pixel whose eager logit is within 1e-4 of 0 is noise; anything else is
    counted as unexplained."""
    mask_check = load_tool("benchmark_export.py", "peft_d2_benchmark_export").mask_check
    logits = torch.tensor([[[[2.0, -1.0], [1e-6, -3.0]], [[1.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [1.0, 1.0]]]])
    scores, classes = torch.tensor([[0.5, 0.30000, 0.29999]]), torch.tensor([[1, 2, 2]])
    want = (None, None, scores, classes, logits > 0)
    swapped = logits[:, [0, 2, 1]].clone()
    swapped[0, 0, 1, 0] = -1e-6  # a pixel at the threshold flips
    got = (None, None, scores[:, [0, 2, 1]], classes, swapped > 0)
    assert mask_check(want, got, logits) == {"instance_masks_swapped": 2, "instance_masks_beyond_tolerance": 0}
    swapped[0, 0, 0, 0] = -2.0  # a confident pixel flips
    got = (None, None, scores, classes, swapped > 0)
    assert mask_check(want, got, logits) == {"instance_masks_swapped": 2, "instance_masks_beyond_tolerance": 1}
    far = (None, None, torch.tensor([[0.5, 0.3, 0.2]]), classes, swapped > 0)  # not tied: no swap explains it
    assert mask_check((None, None, torch.tensor([[0.5, 0.3, 0.2]]), classes, logits > 0), far, logits) == {
        "instance_masks_swapped": 0, "instance_masks_beyond_tolerance": 9}
