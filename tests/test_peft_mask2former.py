"""PEFT inside our Mask2Former: the adapter and LoRA sites of docs/methods.md, exactness, merging, exact counts."""

import pytest
import torch
from detectron2.modeling import build_model
from test_modeling import base_cfg, inputs

import peft_d2.build  # noqa: F401
from peft_d2 import checkpoint as ckpt
from peft_d2.config import add_peft_config
from peft_d2.inject import peft_parameter_names
from peft_d2.tuners.adapter import adapter_parameter_count

HEADS = ["sem_seg_head.predictor.class_embed.*", "sem_seg_head.predictor.mask_embed.*"]


def peft_cfg(backbone="swin", **opts):
    cfg = base_cfg(backbone)
    add_peft_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "PEFT"
    cfg.MODEL.PEFT.BASE_META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.PEFT.TRAINABLE = HEADS
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


def build(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def outputs(model):
    batch = inputs(False)
    dtype = next(model.parameters()).dtype
    for d in batch:
        d["image"] = d["image"].to(dtype)
    with torch.no_grad():
        return [r["sem_seg"] for r in model(batch)]


ALL_SITES = {
    "MODEL.PEFT.METHODS": ["lora", "adapter"],
    "MODEL.PEFT.LORA.TARGETS": ["backbone.layers.*.attn.qkv", "sem_seg_head.predictor.*.self_attn",
                                "sem_seg_head.predictor.*.multihead_attn"],
    "MODEL.PEFT.LORA.MSDA_LAYERS": ["sampling_offsets", "attention_weights", "value_proj", "output_proj"],
    "MODEL.PEFT.ADAPTER.NUM_PER_SITE": 2,
    "MODEL.PEFT.ADAPTER.PLACEMENTS": ["attn", "mlp", "msdeform_attn", "decoder_self_attn", "decoder_cross_attn"],
}


def test_every_site_fresh_is_exact_and_names_are_official():
    # float64: the injected model computes the same values; in float32 only BLAS blocking (which can follow
    # memory alignment) would differ, at 1e-7, so float64 lets the check be tight (1e-12)
    base = build(base_cfg()).double()
    model = build(peft_cfg(**ALL_SITES)).double()
    assert type(model) is type(base)
    base_names = {n: p.shape for n, p in base.named_parameters()}
    names = dict(model.named_parameters())
    assert all(names[n].shape == s for n, s in base_names.items())
    assert set(names) - set(base_names) == set(peft_parameter_names(model))
    for a, b in zip(outputs(base), outputs(model)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # the same comparison sees a change once the PEFT tensors move
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith("up.weight"):
                p.normal_(std=0.02)
    assert any(not torch.allclose(a, b) for a, b in zip(outputs(base), outputs(model)))


def test_closed_form_counts_for_the_head_sites():
    cfg = peft_cfg(**{"MODEL.PEFT.METHODS": ["lora", "adapter"], "MODEL.PEFT.LORA.RANK": 4,
                      "MODEL.PEFT.LORA.MSDA_LAYERS": ["sampling_offsets", "value_proj"],
                      "MODEL.PEFT.ADAPTER.NUM_PER_SITE": 3,
                      "MODEL.PEFT.ADAPTER.PLACEMENTS": ["msdeform_attn", "decoder_self_attn", "decoder_cross_attn"]})
    model = build(cfg)
    d, H, L, P, r, enc, hidden = 64, 4, 3, 4, 4, 1, 64
    dec = cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1  # Mask2Former counts the query-only prediction as a layer
    lora = enc * (r * (d + H * L * P * 2) + r * (d + d))
    adapters = 3 * (enc + 2 * dec) * adapter_parameter_count(d, d // 4)
    assert model.peft_report["by_method"]["lora"] == lora
    assert model.peft_report["by_method"]["adapter"] == adapters
    heads = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("sem_seg_head.predictor.class_embed",
                                                                               "sem_seg_head.predictor.mask_embed")))
    assert model.peft_report["by_method"]["base"] == heads
    assert hidden == cfg.MODEL.MASK_FORMER.HIDDEN_DIM


@pytest.mark.parametrize("layers", [["value_proj"], ["sampling_offsets", "attention_weights", "output_proj"]])
def test_msdeform_lora_merge_equals_unmerged(layers):
    cfg = peft_cfg(**{"MODEL.PEFT.METHODS": ["lora"], "MODEL.PEFT.LORA.MSDA_LAYERS": layers,
                      "MODEL.PEFT.LORA.TARGETS": ["sem_seg_head.predictor.*.self_attn"]})
    model = build(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    adapted = outputs(model)
    plain = build(base_cfg())
    plain.load_state_dict(ckpt.merged_state_dict(model))
    for a, b in zip(adapted, outputs(plain)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_training_step_moves_only_peft_and_heads():
    model = build(peft_cfg(**ALL_SITES))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    from detectron2.utils.events import EventStorage

    for _ in range(2):
        with EventStorage(0):
            loss = sum(model(inputs(True)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


def test_value_proj_lora_runs_the_fused_operator(monkeypatch):
    from peft_d2 import ops

    cfg = peft_cfg(**{"MODEL.PEFT.METHODS": ["lora"], "MODEL.PEFT.LORA.MSDA_LAYERS": ["value_proj"]})
    model = build(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    calls = []
    fused = ops.ms_deform_attn_lora
    monkeypatch.setattr(ops, "ms_deform_attn_lora", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setenv(ops.FUSED_ENV_VAR, "1")
    out_fused = outputs(model)
    assert calls
    # the unfused path (LoRA applied to value_proj's output, then the plain operator) agrees
    monkeypatch.setenv(ops.FUSED_ENV_VAR, "0")
    n_calls = len(calls)
    for a, b in zip(out_fused, outputs(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(calls) == n_calls
    # auto: the pixel decoder's self-attention (Q = S) runs the unfused path on CPU, where it is the faster one
    monkeypatch.setenv(ops.FUSED_ENV_VAR, "auto")
    assert ops.choose_lora_path(100, 100, "cpu")[0] == "unfused"
    outputs(model)
    assert len(calls) == n_calls


def test_lora_reaches_a_foreign_msdeformattn_by_its_shape():
    """A module that is not ours but has MSDeformAttn's four linears and head/level/point attributes."""
    import torch.nn as nn

    from peft_d2 import LoRAConfig, PeftConfig, inject

    class ThirdPartyDeformAttn(nn.Module):
        def __init__(self, d=16, heads=2, levels=2, points=2):
            super().__init__()
            self.n_heads, self.n_levels, self.n_points = heads, levels, points
            self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
            self.attention_weights = nn.Linear(d, heads * levels * points)
            self.value_proj = nn.Linear(d, d)
            self.output_proj = nn.Linear(d, d)

    model = nn.Sequential(ThirdPartyDeformAttn(), nn.Linear(16, 16))
    report = inject(model, PeftConfig(methods=("lora",), lora=LoRAConfig(r=2, msda_layers=["value_proj",
                                                                                           "attention_weights"])))
    assert report["by_method"]["lora"] == 2 * (16 + 16) + 2 * (16 + 8)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.value_proj.lora_A", "0.value_proj.lora_B", "0.attention_weights.lora_A", "0.attention_weights.lora_B"}
