"""LoRA layer math: against Hugging Face PEFT, merge/unmerge, q/v row blocks, nn.MultiheadAttention."""

import copy

import pytest
import torch
import torch.nn as nn

from peft_d2 import LoRAConfig, PeftConfigError
from peft_d2.tuners.lora import add_lora, lora_parameter_count


def _randomize_b(layer):
    with torch.no_grad():
        layer.lora_B.normal_()


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_huggingface_peft(rslora):
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential()
    base.add_module("fc", nn.Linear(16, 24))
    hf = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=["fc"], use_rslora=rslora))
    ours = copy.deepcopy(base)
    add_lora(ours.fc, LoRAConfig(r=4, alpha=6.0, rslora=rslora), "fc")
    hf_fc = hf.base_model.model.fc
    with torch.no_grad():
        hf_fc.lora_B["default"].weight.normal_()
        ours.fc.lora_A.copy_(hf_fc.lora_A["default"].weight[None])
        ours.fc.lora_B.copy_(hf_fc.lora_B["default"].weight[None])
    assert ours.fc.lora_scaling == pytest.approx(hf_fc.scaling["default"])
    x1 = torch.randn(5, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y_hf, y = hf(x1), ours(x2)
    torch.testing.assert_close(y, y_hf, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y_hf.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.fc.lora_A.grad[0], hf_fc.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.fc.lora_B.grad[0], hf_fc.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)


def test_fresh_layer_is_exact_and_keeps_parameters():
    lin = nn.Linear(8, 8)
    w, b = lin.weight, lin.bias
    x = torch.randn(3, 8)
    y0 = lin(x)
    add_lora(lin, LoRAConfig(r=2), "fc")
    assert lin.weight is w and lin.bias is b  # same Parameter objects, same names
    assert torch.equal(lin(x), y0)
    assert set(dict(lin.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}


def test_merge_unmerge_round_trip():
    lin = nn.Linear(12, 10)
    w0 = lin.weight.detach().clone()
    add_lora(lin, LoRAConfig(r=3, alpha=5.0), "fc")
    _randomize_b(lin)
    x = torch.randn(4, 12)
    y = lin(x)
    lin.merge()
    assert not torch.equal(lin.weight, w0)
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-6)
    lin.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin(x), y, rtol=1e-6, atol=1e-6)


def test_qkv_row_blocks_only_touch_q_and_v():
    d = 8
    lin = nn.Linear(d, 3 * d)
    add_lora(lin, LoRAConfig(r=2, alpha=2.0, qkv_blocks="qv"), "blocks.0.attn.qkv")
    _randomize_b(lin)
    x = torch.randn(5, d)
    delta = lin(x) - nn.functional.linear(x, lin.weight, lin.bias)
    assert delta[:, d : 2 * d].abs().max() == 0  # k untouched
    expected_q = x @ lin.lora_A[0].T @ lin.lora_B[0].T
    expected_v = x @ lin.lora_A[1].T @ lin.lora_B[1].T
    torch.testing.assert_close(delta[:, :d], expected_q)
    torch.testing.assert_close(delta[:, 2 * d :], expected_v)
    torch.testing.assert_close(lin.lora_delta_weight() @ x.T, delta.T, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for n, p in lin.named_parameters() if "lora" in n) == lora_parameter_count(d, d, 2, 2)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_lora(batch_first):
    d = 16
    mha = nn.MultiheadAttention(d, 4, batch_first=batch_first).eval()
    ref = copy.deepcopy(mha)
    q = torch.randn(5, 2, d) if not batch_first else torch.randn(2, 5, d)
    k = torch.randn(7, 2, d) if not batch_first else torch.randn(2, 7, d)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, -2:] = True
    out0 = mha(q, k, k, key_padding_mask=mask)[0]
    add_lora(mha, LoRAConfig(r=2, alpha=4.0, qkv_blocks="qv"), "self_attn")
    assert torch.equal(mha(q, k, k, key_padding_mask=mask)[0], out0)
    _randomize_b(mha)
    with torch.no_grad():
        ref.in_proj_weight += mha.lora_delta_weight()
        d_rows = mha.lora_delta_weight().abs().sum(1)
    assert d_rows[d : 2 * d].max() == 0 and d_rows[:d].min() > 0 and d_rows[2 * d :].min() > 0
    out = mha(q, k, k, key_padding_mask=mask)[0]
    torch.testing.assert_close(out, ref(q, k, k, key_padding_mask=mask)[0], rtol=1e-5, atol=1e-6)
    mha.merge()
    torch.testing.assert_close(mha(q, k, k, key_padding_mask=mask)[0], out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"r": 0}, "RANK"), ({"r": -2}, "RANK"), ({"alpha": 0.0}, "ALPHA"), ({"dropout": 1.0}, "DROPOUT"),
     ({"dropout": -0.1}, "DROPOUT"), ({"qkv_blocks": "qx"}, "QKV_BLOCKS")],
)
def test_bad_lora_config(kwargs, key):
    with pytest.raises(PeftConfigError, match=f"MODEL.PEFT.LORA.{key}"):
        LoRAConfig(**kwargs)


def test_dropout_only_on_the_lora_branch():
    lin = nn.Linear(6, 6)
    add_lora(lin, LoRAConfig(r=2, dropout=0.5), "fc")
    x = torch.randn(100, 6)
    lin.train()
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))  # B = 0: no branch yet
    _randomize_b(lin)
    torch.manual_seed(0)
    y1 = lin(x)
    torch.manual_seed(1)
    assert not torch.equal(y1, lin(x))  # dropout is active in training
    lin.eval()
    assert torch.equal(lin(x), lin(x))
