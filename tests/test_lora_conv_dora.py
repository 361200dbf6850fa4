"""LoRA on convolutions and DoRA: against Hugging Face PEFT itself in float64 (forward, gradients, merge, unmerge),
detectron2's Conv2d (the update before its norm and activation), fresh models, adapter files, merging, COBOT,
multi-adapter serving and the errors."""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import small_rcnn_cfg
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from peft import LoraConfig, get_peft_model

import peft_d2
from peft_d2 import LoRAConfig, PeftConfig, PeftConfigError, inject, multi
from peft_d2 import checkpoint as ckpt
from peft_d2.inject import parameter_report
from peft_d2.tuners.cobot import CobotConfig
from peft_d2.tuners.lora import add_lora, lora_parameter_count

TIGHT = {"rtol": 0.0, "atol": 1e-10}  # float64


def _hf(base, name, dora, r, alpha, rslora=False, dropout=0.0):
    """Hugging Face PEFT's LoRA (or DoRA) on module `name` of a copy of `base`, B and the magnitude moved off their
    initial values so that every term of the update is exercised; returns (model, its LoRA layer)."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[name], use_rslora=rslora, use_dora=dora,
                     lora_dropout=dropout)
    hf = get_peft_model(copy.deepcopy(base), cfg).double()
    layer = hf.base_model.model.get_submodule(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
        if dora:
            m = layer.lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g, dtype=m.dtype))
    return hf, layer


def _copy_from_hf(ours, layer, dora, blocks=None):
    """Our factors <- HF's (blocks: our row block index i gets HF layer blocks[i])."""
    layers = blocks or [layer]
    with torch.no_grad():
        for i, hl in enumerate(layers):
            ours.lora_A[i].copy_(hl.lora_A["default"].weight)
            ours.lora_B[i].copy_(hl.lora_B["default"].weight.flatten(1))
            if dora:
                ours.lora_magnitude[i].copy_(hl.lora_magnitude_vector["default"].weight.flatten())


def _compare_with_hf(hf, hf_layer, ours, our_layer, x, dora, train=False):
    """Forward, input and factor gradients, merged forward and weights, unmerge: ours against HF's; returns the
    largest difference seen."""
    hf.train(train)
    ours.train(train)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout mask in both (each draws it once, from the input)
    y_hf = hf(x1)
    torch.manual_seed(7)
    y = ours(x2)
    worst = [(y - y_hf).abs().max()]
    torch.testing.assert_close(y, y_hf, **TIGHT)
    g = torch.randn_like(y)
    y_hf.backward(g)
    y.backward(g)
    pairs = [(x2.grad, x1.grad), (our_layer.lora_A.grad[0], hf_layer.lora_A["default"].weight.grad),
             (our_layer.lora_B.grad[0], hf_layer.lora_B["default"].weight.grad.flatten(1))]
    if dora:
        hf_m = hf_layer.lora_magnitude_vector["default"].weight
        pairs.append((our_layer.lora_magnitude.grad[0], hf_m.grad.flatten()))
    for a, b in pairs:
        assert b.abs().max() > 0  # a gradient that is there, so that the comparison can fail
        torch.testing.assert_close(a, b, **TIGHT)
        worst.append((a - b).abs().max())
    if train:
        return max(worst)
    hf.eval()
    ours.eval()
    w0 = our_layer.weight.detach().clone()
    with torch.no_grad():
        y = ours(x)
        hf_layer.merge()
        our_layer.merge()
        base_w = hf_layer.get_base_layer().weight
        torch.testing.assert_close(our_layer.weight, base_w, **TIGHT)
        torch.testing.assert_close(ours(x), hf(x), **TIGHT)
        torch.testing.assert_close(ours(x), y, **TIGHT)
        worst += [(our_layer.weight - base_w).abs().max(), (ours(x) - y).abs().max()]
        hf_layer.unmerge()
        our_layer.unmerge()
        torch.testing.assert_close(our_layer.weight, w0, **TIGHT)
        torch.testing.assert_close(hf_layer.get_base_layer().weight, w0, **TIGHT)
        worst.append((our_layer.weight - w0).abs().max())
    return max(worst)


CONV_CASES = [  # kernel, stride, padding, r, alpha, rslora, bias, dropout
    (1, 1, 0, 4, 8.0, False, True, 0.0),
    (3, 2, 1, 4, 6.0, False, True, 0.0),
    (3, 1, 2, 8, 4.0, True, False, 0.0),
    (3, 2, 0, 2, 5.0, False, True, 0.3),
]


@pytest.mark.parametrize("k, stride, padding, r, alpha, rslora, bias, dropout", CONV_CASES)
@pytest.mark.parametrize("dora", [False, True])
def test_conv_matches_huggingface_peft(k, stride, padding, r, alpha, rslora, bias, dropout, dora):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("conv", nn.Conv2d(5, 7, k, stride=stride, padding=padding, bias=bias))
    base.double()
    hf, hf_layer = _hf(base, "conv", dora, r, alpha, rslora, dropout)
    ours = copy.deepcopy(base)
    add_lora(ours.conv, LoRAConfig(r=r, alpha=alpha, rslora=rslora, dropout=dropout, dora=dora), "conv")
    assert ours.conv.lora_scaling == hf_layer.scaling["default"]
    _copy_from_hf(ours.conv, hf_layer, dora)
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    _compare_with_hf(hf, hf_layer, ours, ours.conv, x, dora, train=dropout > 0)


@pytest.mark.parametrize("rslora, dropout, bias", [(False, 0.0, True), (True, 0.0, False), (False, 0.25, True)])
def test_dora_linear_matches_huggingface_peft(rslora, dropout, bias):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(12, 10, bias=bias))
    base.double()
    hf, hf_layer = _hf(base, "fc", True, 4, 6, rslora, dropout)
    ours = copy.deepcopy(base)
    add_lora(ours.fc, LoRAConfig(r=4, alpha=6.0, rslora=rslora, dropout=dropout, dora=True), "fc")
    _copy_from_hf(ours.fc, hf_layer, True)
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    _compare_with_hf(hf, hf_layer, ours, ours.fc, x, True, train=dropout > 0)


class _SplitQKV(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


def test_dora_on_qkv_row_blocks_is_dora_on_separate_q_and_v_linears():
    """LORA.QKV_BLOCKS 'qv' with DoRA equals Hugging Face's DoRA on separate q and v linears (k untouched)."""
    d = 8
    torch.manual_seed(0)
    split = _SplitQKV(d).double()
    hf = get_peft_model(copy.deepcopy(split), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], use_dora=True))
    hf.double()
    hq, hv = hf.base_model.model.q, hf.base_model.model.v
    with torch.no_grad():
        for hl in (hq, hv):
            hl.lora_B["default"].weight.normal_()
            hl.lora_magnitude_vector["default"].weight.mul_(1.3)
    packed = nn.Linear(d, 3 * d).double()
    with torch.no_grad():
        packed.weight.copy_(torch.cat([split.q.weight, split.k.weight, split.v.weight]))
        packed.bias.copy_(torch.cat([split.q.bias, split.k.bias, split.v.bias]))
    add_lora(packed, LoRAConfig(r=2, alpha=4.0, dora=True, qkv_blocks="qv"), "blocks.0.attn.qkv")
    assert packed.lora_magnitude.shape == (2, d)
    _copy_from_hf(packed, None, True, blocks=[hq, hv])
    x = torch.randn(6, d, dtype=torch.float64, requires_grad=True)
    y_hf = hf(x)
    y = packed(x)
    torch.testing.assert_close(y, y_hf, **TIGHT)
    y.sum().backward()
    y_hf.sum().backward()
    torch.testing.assert_close(packed.lora_magnitude.grad[1], hv.lora_magnitude_vector["default"].weight.grad, **TIGHT)
    torch.testing.assert_close(packed.lora_B.grad[0], hq.lora_B["default"].weight.grad, **TIGHT)
    w0 = packed.weight.detach().clone()
    with torch.no_grad():
        packed.merge()
        hf.merge_adapter()
        torch.testing.assert_close(packed.weight[2 * d:], hv.get_base_layer().weight, **TIGHT)
        assert torch.equal(packed.weight[d:2 * d], w0[d:2 * d])  # k untouched
        torch.testing.assert_close(packed(x), y, **TIGHT)
        packed.unmerge()
    torch.testing.assert_close(packed.weight, w0, **TIGHT)


def _dora_weight(w, delta, m, rows):
    """Reference: DoRA's weight on the given rows, W elsewhere."""
    out = w.clone()
    v = w[rows] + delta[rows]
    out[rows] = m[:, None] * v / v.norm(dim=1, keepdim=True)
    return out


def test_dora_on_multihead_attention():
    d = 8
    mha = nn.MultiheadAttention(d, 2).double().eval()
    ref = copy.deepcopy(mha)
    q = torch.randn(4, 2, d, dtype=torch.float64)
    y0 = mha(q, q, q)[0]
    add_lora(mha, LoRAConfig(r=2, alpha=2.0, dora=True, qkv_blocks="qv"), "self_attn")
    assert torch.equal(mha(q, q, q)[0], y0)
    with torch.no_grad():
        mha.lora_B.normal_()
        mha.lora_magnitude.mul_(1.5)
        rows = torch.cat([torch.arange(0, d), torch.arange(2 * d, 3 * d)])
        ref.in_proj_weight.copy_(_dora_weight(mha.in_proj_weight, mha.lora_delta_weight(), mha.lora_magnitude.flatten(),
                                              rows))
    y = mha(q, q, q)[0]
    torch.testing.assert_close(y, ref(q, q, q)[0], **TIGHT)
    with torch.no_grad():
        mha.merge()
        torch.testing.assert_close(mha.in_proj_weight, ref.in_proj_weight, **TIGHT)
        torch.testing.assert_close(mha(q, q, q)[0], y, **TIGHT)


def test_dilated_conv_lora_folds_exactly():
    """Dilation (which Hugging Face's A ignores) and a 'same' padding: the forward is the convolution with W + dW."""
    for conv in (nn.Conv2d(4, 6, 3, padding=2, dilation=2), nn.Conv2d(4, 6, 3, padding="same", bias=False)):
        conv.double()
        for dora in (False, True):
            layer = add_lora(copy.deepcopy(conv), LoRAConfig(r=2, alpha=3.0, dora=dora), "conv")
            with torch.no_grad():
                layer.lora_B.normal_()
            x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
            expected = F.conv2d(x, layer.lora_adapted_weight(), layer.bias, 1, layer.padding, layer.dilation)
            torch.testing.assert_close(layer(x), expected, **TIGHT)


@pytest.mark.parametrize("dora", [False, True])
def test_detectron2_conv_gets_the_update_before_norm_and_activation(dora):
    torch.manual_seed(0)
    conv = D2Conv2d(4, 6, 3, stride=2, padding=1, bias=True, norm=nn.GroupNorm(2, 6), activation=F.relu).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    y0 = conv(x)
    layer = add_lora(conv, LoRAConfig(r=2, alpha=4.0, dora=dora), "backbone.res2.0.conv1")
    assert isinstance(layer, D2Conv2d) and type(layer).__name__ == "LoRAD2Conv2d"
    assert torch.equal(layer(x), y0)  # a fresh layer is the base, exactly
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = F.relu(layer.norm(F.conv2d(x, layer.lora_adapted_weight(), layer.bias, 2, 1)))
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    added_after = F.relu(layer.norm(F.conv2d(x, layer.weight, layer.bias, 2, 1))) + layer.lora_output(x)
    assert not torch.allclose(layer(x), added_after)


class _Small(nn.Module):
    """A conv, a detectron2 conv with a norm and an activation, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = D2Conv2d(8, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8), activation=F.relu)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _small_config(dora, **kw):
    return PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, alpha=8.0, dora=dora, targets=["stem", "block", "head"],
                                                         **kw))


def _trained(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_fresh_model_adapter_file_merge_and_parameter_counts(tmp_path, dora):
    x = torch.randn(2, 3, 16, 16)
    base = _Small().eval()
    y0 = base(x)
    model = copy.deepcopy(base)
    report = inject(model, _small_config(dora))
    assert torch.equal(model.eval()(x), y0)  # freshly injected: the base exactly
    expected = (lora_parameter_count(3 * 9, 8, 4, dora=dora) + lora_parameter_count(8 * 9, 8, 4, dora=dora)
                + lora_parameter_count(8, 5, 4, dora=dora))
    assert report["by_method"]["lora"] == expected == parameter_report(model)["trainable"]
    _trained(model)
    y = model(x)
    assert not torch.allclose(y, y0, atol=1e-4)
    path = ckpt.save_adapter(model, str(tmp_path / "a.safetensors"))
    tensors, _, _ = ckpt.read_adapter(path)
    assert ("stem.lora_magnitude" in tensors) == dora and "stem.lora_A" in tensors and "stem.weight" not in tensors
    fresh = copy.deepcopy(base)
    ckpt.inject_from_checkpoint(fresh, path)
    torch.testing.assert_close(fresh.eval()(x), y, rtol=0, atol=0)
    plain = copy.deepcopy(base)
    plain.load_state_dict(ckpt.merged_state_dict(model))  # merge_deltas: what tools/merge_adapter.py writes
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)
    peft_d2.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    peft_d2.unmerge(model)
    torch.testing.assert_close(model.stem.weight, base.stem.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_cobot_over_conv_lora(dora):
    """COBOT's slot matrix M goes between A and B of a convolution as of a linear: the update is B M A."""
    model = _Small().double().eval()
    inject(model, PeftConfig(methods=("lora", "cobot"), lora=LoRAConfig(r=4, dora=dora, targets=["stem", "block"]),
                             cobot=CobotConfig("lora")))
    _trained(model.double())
    with torch.no_grad():
        model.cobot.H.normal_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    stem = model.stem
    delta = stem.lora_B[0] @ model.cobot.slot_matrix(0) @ stem.lora_A[0].flatten(1)
    torch.testing.assert_close(stem.lora_delta_weight(), delta.view_as(stem.weight), **TIGHT)
    expected = F.conv2d(x, stem.lora_adapted_weight(), stem.bias, 2, 1)
    torch.testing.assert_close(stem(x), expected, **TIGHT)
    y = model(x)
    with torch.no_grad():
        peft_d2.merge(model)
        torch.testing.assert_close(model(x), y, **TIGHT)


class _Gates:
    def __init__(self, g):
        self.g = g

    def value(self, name):
        return self.g


def test_mopeft_gate_scales_conv_lora_per_image_and_dora_with_mopeft_is_refused():
    conv = add_lora(nn.Conv2d(3, 4, 3, padding=1), LoRAConfig(r=2), "conv")
    with torch.no_grad():
        conv.lora_B.normal_()
    x = torch.randn(2, 3, 6, 6)
    update = conv.lora_output(x) / conv.lora_scaling
    conv.attach_gate(_Gates(torch.tensor([0.25, 1.0])))
    base = F.conv2d(x, conv.weight, conv.bias, 1, 1)
    torch.testing.assert_close(conv(x), base + update * torch.tensor([0.25, 1.0])[:, None, None, None])
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.LORA.DORA cannot be used with 'mopeft'"):
        PeftConfig(methods=("lora", "mopeft"), lora=LoRAConfig(dora=True, targets=["*.attn.qkv"]))


def _backbone():
    """R18-FPN whose frozen batch norms are not the identity and FPN biases not the zeros of a fresh one (an update
    added after the norm, or DoRA's factor applied to the bias, must show)."""
    torch.manual_seed(5)
    model = build_backbone(small_rcnn_cfg()).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.normal_(0, 0.1)
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.double()  # float64: the convolutions of one image and of four round alike


BACKBONE_TARGETS = ["bottom_up.stem.conv1", "bottom_up.res*.*.conv?", "bottom_up.res*.*.shortcut", "fpn_lateral*",
                    "fpn_output*"]


def test_mixed_batch_with_conv_lora_and_dora_equals_each_adapter_alone(tmp_path):
    """R18-FPN: LoRA and DoRA on every convolution (detectron2 Conv2d with FrozenBN in the ResNet, without a norm
    in the FPN), served from one base: each image as through its own adapted model."""
    configs = {
        "lora": PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=BACKBONE_TARGETS)),
        "dora": PeftConfig(methods=("lora",), lora=LoRAConfig(r=2, alpha=4.0, dora=True, targets=BACKBONE_TARGETS)),
    }
    singles, paths = {}, {}
    for i, (name, config) in enumerate(configs.items()):
        model = _backbone()
        inject(model, config)
        singles[name] = _trained(model, i, scale=0.02)
        paths[name] = ckpt.save_adapter(model, str(tmp_path / f"{name}.safetensors"))
    serve = _backbone()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    routing = ["dora", None, "lora", "dora"]
    with torch.no_grad():
        base = serve(x)
        peft_d2.load_adapters(serve, paths)
        with multi.route(serve, routing):
            mixed = serve(x)
        single = {name: m(x) for name, m in singles.items()}
    for key in mixed:
        for i, name in enumerate(routing):
            expected = base[key][i] if name is None else single[name][key][i]
            torch.testing.assert_close(mixed[key][i], expected, **TIGHT)
            if name is not None:
                assert not torch.allclose(expected, base[key][i], rtol=1e-5, atol=1e-5)


def test_merge_adapter_tool_folds_conv_lora_and_dora(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import merge_adapter
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    targets = [f"backbone.{t}" for t in BACKBONE_TARGETS] + ["roi_heads.box_head.fc1"]
    cfg = small_rcnn_cfg(**{"MODEL.META_ARCHITECTURE": "PEFT", "MODEL.PEFT.BASE_META_ARCHITECTURE": "GeneralizedRCNN",
                            "MODEL.PEFT.METHODS": ["lora"], "MODEL.PEFT.LORA.TARGETS": targets,
                            "MODEL.PEFT.LORA.DORA": True})
    torch.manual_seed(0)
    torch.save({"model": build_model(small_rcnn_cfg()).state_dict()}, tmp_path / "base.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "base.pth")
    (tmp_path / "peft.yaml").write_text(cfg.dump())
    adapted = build_model(cfg)
    DetectionCheckpointer(adapted).load(cfg.MODEL.WEIGHTS)
    _trained(adapted, scale=0.02)
    adapter = ckpt.save_adapter(adapted, str(tmp_path / "adapter.safetensors"))
    out = str(tmp_path / "merged.pth")
    merge_adapter.main(["--config-file", str(tmp_path / "peft.yaml"), "--adapter", adapter, "--output", out])
    plain_cfg = get_cfg()
    plain_cfg.set_new_allowed(True)
    plain_cfg.merge_from_file(out + ".yaml")
    plain = build_model(plain_cfg).eval()
    DetectionCheckpointer(plain).load(plain_cfg.MODEL.WEIGHTS)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = adapted.backbone(x), plain.backbone(x)
        box = torch.randn(4, 32, 7, 7)
        torch.testing.assert_close(plain.roi_heads.box_head(box), adapted.roi_heads.box_head(box), rtol=1e-5, atol=1e-5)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module, match", [
    (nn.Conv2d(4, 4, 3, groups=2),
     r"MODEL.PEFT.LORA.TARGETS: LoRA on module 'layer' \(Conv2d\): a grouped convolution \(groups=2\)"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
    (nn.Conv1d(4, 4, 3), r"'layer' \(Conv1d\): LoRA applies to nn.Linear, nn.Conv2d \(detectron2.layers.Conv2d"),
    (nn.ReLU(),
     r"LoRA applies to nn.Linear, nn.Conv2d \(detectron2.layers.Conv2d included\) and nn.MultiheadAttention only"),
])
def test_modules_lora_cannot_take_are_named(module, match):
    model = nn.Sequential()
    model.add_module("layer", module)
    with pytest.raises(PeftConfigError, match=match):
        inject(model, PeftConfig(methods=("lora",), lora=LoRAConfig(dora=True, targets=["layer"])))
    assert type(model.layer) is type(module)  # nothing changed


def test_bad_dora_value_is_named():
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.LORA.DORA must be True or False"):
        LoRAConfig(dora="yes")
