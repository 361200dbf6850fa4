"""COBOT over LoRA: closed-form counts, the paper's 864 for ViT-B, the delta formula, merge, checkpoints."""

import copy

import pytest
import torch
import torch.nn as nn
from _models import images, tiny_vit

from peft_d2 import LoRAConfig, PeftConfig, PeftConfigError, inject
from peft_d2 import checkpoint as ckpt
from peft_d2.tuners.cobot import CobotOrchestrator, cobot_parameter_count


def cobot_config(r=4, targets=("*.attn.qkv",)):
    return PeftConfig(methods=("lora", "cobot"), lora=LoRAConfig(r=r, targets=list(targets), qkv_blocks="qv"))


def test_count_matches_the_paper_for_vit_b():
    assert cobot_parameter_count(24, 4) == 864  # ViT-B, LoRA r=4 on q and v of 12 blocks
    assert cobot_parameter_count(12, 16) == 1296  # ViT-B, one adapter of width 16 per block
    assert sum(p.numel() for p in CobotOrchestrator(24, 4).parameters()) == 864


def test_hamilton_structure():
    orch = CobotOrchestrator(1, 8)
    with torch.no_grad():
        orch.H.normal_()
    H, S = orch.projection(0), orch.H[0]
    q = 2
    torch.testing.assert_close(H[:q, :q], S[0])
    torch.testing.assert_close(H[q : 2 * q, :q], -S[1])
    torch.testing.assert_close(H[3 * q :, 2 * q : 3 * q], -S[1])
    torch.testing.assert_close(H[2 * q : 3 * q, 3 * q :], S[1])
    torch.testing.assert_close(H[q : 2 * q, 3 * q :], -S[2])
    # initial form: S_r = 0, the others in [0, 1)
    fresh = CobotOrchestrator(3, 8).H
    assert fresh[:, 0].abs().max() == 0 and fresh[:, 1:].min() >= 0 and fresh[:, 1:].max() < 1


def test_injection_counts_slots_and_is_exact_when_fresh():
    model = tiny_vit()
    x = images()
    before = model(x)["last_feat"]
    report = inject(model, cobot_config())
    T, r, d = 2 * 3, 4, 48  # q and v of 3 blocks
    assert model.cobot.num_slots == T
    assert report["by_method"]["cobot"] == cobot_parameter_count(T, r)
    assert report["by_method"]["lora"] == 3 * 2 * r * (d + d)
    assert torch.equal(model(x)["last_feat"], before)


def test_delta_is_B_H_diag_d_A():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            return self.qkv(x)

    lin = Holder()
    inject(lin, cobot_config(r=4, targets=["qkv"]))
    layer, orch = lin.qkv, lin.cobot
    with torch.no_grad():
        layer.lora_B.normal_()
        orch.P.add_(torch.randn_like(orch.P) * 0.1)
        orch.gamma.normal_()
    x = torch.randn(5, 8)
    y = lin(x) - nn.functional.linear(x, layer.weight, layer.bias)
    for i, (s, e) in enumerate([(0, 8), (16, 24)]):
        d = orch.C @ orch.P[:, i] + orch.gamma[i]
        expected = x @ layer.lora_A[i].T @ torch.diag(d) @ orch.projection(i).T @ layer.lora_B[i].T
        torch.testing.assert_close(y[:, s:e], expected, rtol=1e-5, atol=1e-5)
    assert y[:, 8:16].abs().max() == 0
    # gradients reach the shared relation matrix from every slot
    y.square().sum().backward()
    assert orch.P.grad is not None and orch.P.grad.abs().sum() > 0 and orch.C.grad.abs().sum() > 0


def test_merge_checkpoint_and_deepcopy(tmp_path):
    model = tiny_vit()
    inject(model, cobot_config())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("cobot."):
                p.add_(torch.randn_like(p) * 0.05)
    x = images()
    y = model(x)["last_feat"]
    clone = copy.deepcopy(model)
    assert clone.blocks[0].attn.qkv.lora_cobot is clone.cobot  # the copy routes through its own orchestrator
    torch.testing.assert_close(clone(x)["last_feat"], y)
    path = ckpt.save_adapter(model, str(tmp_path / "cobot.safetensors"))
    fresh = tiny_vit()
    ckpt.inject_from_checkpoint(fresh, path)
    assert torch.equal(fresh(x)["last_feat"], y)
    merged = tiny_vit()
    merged.load_state_dict(ckpt.merged_state_dict(model))
    torch.testing.assert_close(merged(x)["last_feat"], y, rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(PeftConfigError, match="'cobot' orchestrates 'lora'"):
        PeftConfig(methods=("cobot",))
    with pytest.raises(PeftConfigError, match="divisible by 4"):
        inject(tiny_vit(), cobot_config(r=6))


def test_cobot_over_parallel_adapters():
    from peft_d2 import AdapterConfig
    from peft_d2.tuners.cobot import CobotConfig

    model = tiny_vit()
    x = images()
    before = model(x)["last_feat"]
    cfg = PeftConfig(methods=("adapter", "cobot"), cobot=CobotConfig(enabled_on="adapter"),
                     adapter=AdapterConfig(bottleneck=8, placements=("parallel_mlp",)))
    report = inject(model, cfg)
    assert model.cobot.num_slots == 3  # one adapter per block (T = L)
    assert report["by_method"]["cobot"] == cobot_parameter_count(3, 8)
    assert torch.equal(model(x)["last_feat"], before)  # up is zero-initialised
    adapter, orch = model.blocks[1].mlp.parallel_adapter, model.cobot
    with torch.no_grad():
        adapter.up.weight.normal_()
        orch.gamma.normal_()
    model.eval()
    z = torch.randn(5, 48)
    d = orch.C @ orch.P[:, 1] + orch.gamma[1]
    h = torch.relu((adapter.down(z) * d) @ orch.projection(1).T)
    torch.testing.assert_close(adapter(z), adapter.up(h), rtol=1e-5, atol=1e-5)
    with pytest.raises(PeftConfigError, match="parallel adapters"):
        inject(tiny_vit(), PeftConfig(methods=("adapter", "cobot"), cobot=CobotConfig(enabled_on="adapter")))
