"""Prefix tuning against torch's attention on explicitly extended keys, and MoPEFT's gates."""

import copy

import pytest
import torch
import torch.nn as nn
from _models import images, tiny_swin, tiny_vit
from detectron2.modeling.backbone.swin import WindowAttention
from detectron2.modeling.backbone.utils import add_decomposed_rel_pos
from detectron2.modeling.backbone.vit import Attention

from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig, PeftConfigError, inject
from peft_d2 import checkpoint as ckpt
from peft_d2.tuners.prefix import PrefixConfig, add_prefix, prefix_parameter_count


def reference_mha(qkv: nn.Linear, proj: nn.Linear, heads: int) -> nn.MultiheadAttention:
    d = qkv.in_features
    mha = nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(qkv.weight)
        mha.in_proj_bias.copy_(qkv.bias)
        mha.out_proj.weight.copy_(proj.weight)
        mha.out_proj.bias.copy_(proj.bias)
    return mha.eval()


def set_prefix_from_tokens(module, qkv_weight, qkv_bias, tokens):
    """P_K = W_k x_p + b_k, P_V = W_v x_p + b_v: the prefix a real token sequence x_p would give."""
    d = tokens.shape[-1]
    with torch.no_grad():
        module.prefix.keys.copy_(tokens @ qkv_weight[d : 2 * d].T + qkv_bias[d : 2 * d])
        module.prefix.values.copy_(tokens @ qkv_weight[2 * d :].T + qkv_bias[2 * d :])


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_prefix_equals_attention_over_extended_keys(batch_first):
    d, h, n_prefix = 16, 4, 3
    mha = nn.MultiheadAttention(d, h, batch_first=batch_first).eval()
    ref = copy.deepcopy(mha)
    add_prefix(mha, PrefixConfig(length=n_prefix, placements=("decoder_self_attn",)))
    x_p = torch.randn(n_prefix, d)
    set_prefix_from_tokens(mha, mha.in_proj_weight, mha.in_proj_bias, x_p)
    N, L, S = 2, 5, 6
    q, k = torch.randn(L, N, d), torch.randn(S, N, d)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True
    mask = torch.randn(L, S)
    k_ext = torch.cat([x_p[:, None].expand(-1, N, -1), k])
    kpm_ext = torch.cat([torch.zeros(N, n_prefix, dtype=torch.bool), kpm], 1)
    mask_ext = torch.cat([torch.zeros(L, n_prefix), mask], 1)
    bf = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
    out = mha(bf(q), bf(k), bf(k), key_padding_mask=kpm, attn_mask=mask)[0]
    expected = ref(bf(q), bf(k_ext), bf(k_ext), key_padding_mask=kpm_ext, attn_mask=mask_ext)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rel_pos", [False, True])
def test_vit_attention_prefix(rel_pos):
    d, heads, H, W, B, n_prefix = 24, 3, 4, 5, 2, 4
    attn = Attention(d, num_heads=heads, use_rel_pos=rel_pos, input_size=(H, W)).eval()
    if rel_pos:
        with torch.no_grad():
            attn.rel_pos_h.normal_()
            attn.rel_pos_w.normal_()
    ref = reference_mha(attn.qkv, attn.proj, heads)
    add_prefix(attn, PrefixConfig(length=n_prefix))
    assert type(attn).__name__ == "PrefixAttention" and isinstance(attn, Attention)
    x_p = torch.randn(n_prefix, d)
    set_prefix_from_tokens(attn, attn.qkv.weight, attn.qkv.bias, x_p)
    x = torch.randn(B, H, W, d)
    tokens = x.reshape(B, H * W, d)
    ext = torch.cat([x_p.expand(B, -1, -1), tokens], 1)
    bias = torch.zeros(B * heads, H * W, n_prefix + H * W)
    if rel_pos:  # the decomposed relative-position bias acts on the real keys only
        q = (tokens @ attn.qkv.weight[:d].T + attn.qkv.bias[:d]).view(B, H * W, heads, -1).transpose(1, 2)
        q = q.reshape(B * heads, H * W, -1)
        zeros = torch.zeros(B * heads, H * W, H * W)
        bias[..., n_prefix:] = add_decomposed_rel_pos(zeros, q, attn.rel_pos_h, attn.rel_pos_w, (H, W), (H, W))
    expected = ref(tokens, ext, ext, attn_mask=bias)[0].view(B, H, W, d)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_window_attention_prefix_with_shift_mask():
    d, heads, ws, n_prefix, B, nW = 16, 2, 3, 2, 2, 4
    attn = WindowAttention(d, (ws, ws), heads).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    ref = reference_mha(attn.qkv, attn.proj, heads)
    add_prefix(attn, PrefixConfig(length=n_prefix))
    x_p = torch.randn(n_prefix, d)
    set_prefix_from_tokens(attn, attn.qkv.weight, attn.qkv.bias, x_p)
    N = ws * ws
    mask = torch.where(torch.rand(nW, N, N) < 0.3, -100.0, 0.0)
    x = torch.randn(B * nW, N, d)
    rel = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(N, N, heads).permute(2, 0, 1)
    bias = torch.zeros(B * nW, heads, N, n_prefix + N)
    bias[..., n_prefix:] = rel[None] + mask.repeat(B, 1, 1)[:, None]
    ext = torch.cat([x_p.expand(B * nW, -1, -1), x], 1)
    expected = ref(x, ext, ext, attn_mask=bias.view(B * nW * heads, N, n_prefix + N))[0]
    torch.testing.assert_close(attn(x, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [0, 16])
def test_prefix_injection_counts_and_training(hidden):
    model = tiny_swin()
    cfg = PrefixConfig(length=4, hidden=hidden)
    report = inject(model, PeftConfig(methods=("prefix",), prefix=cfg))
    dims = [32, 32, 64, 64]  # 2 blocks at 32, 2 at 64
    assert report["by_method"] == {"prefix": sum(prefix_parameter_count(d, cfg) for d in dims)}
    model.train()
    loss = sum(v.square().mean() for v in model(images()).values())
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "prefix" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prefix_errors():
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.PREFIX.LENGTH"):
        PrefixConfig(length=0)
    model = nn.Module()
    model.self_attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    with pytest.raises(PeftConfigError, match=r"'self_attn' \(MultiheadAttention\)"):
        inject(model, PeftConfig(methods=("prefix",), prefix=PrefixConfig(placements=("decoder_self_attn",))))


def mopeft_config():
    return PeftConfig(
        methods=("lora", "prefix", "adapter", "mopeft"),
        lora=LoRAConfig(r=4, targets=["blocks.*.attn.qkv"], qkv_blocks="qv"),
        prefix=PrefixConfig(length=3),
        adapter=AdapterConfig(placements=("mlp",)),
    )


def test_mopeft_gates_respond_and_switch_submodules_off():
    model = tiny_vit()
    report = inject(model, mopeft_config())
    d = 48
    assert report["by_method"]["mopeft"] == 3 * (3 * d + 3)  # one Linear(d, 3) per block
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mopeft_gates.proj.weight") or "lora_B" in n or n.endswith("up.weight"):
                p.normal_(std=0.3)
    a, b = images(1), images(1) * 3 + 1
    gates = model.blocks[0].mopeft_gates
    model(a)
    ga = gates.current.clone()
    model(b)
    assert ga.shape == (1, 3) and not torch.allclose(ga, gates.current)  # the gates depend on the input
    assert ((ga > 0) & (ga < 1)).all()

    # switching LoRA and adapter off leaves exactly the prefix-only model
    prefix_only = tiny_vit()
    inject(prefix_only, PeftConfig(methods=("prefix",), prefix=PrefixConfig(length=3)))
    prefix_only.load_state_dict(model.state_dict(), strict=False)
    for blk, ref_blk in zip(model.blocks, prefix_only.blocks):
        blk.mopeft_gates.override = {"lora": 0.0, "adapter": 0.0, "prefix": 1.0}
        with torch.no_grad():
            blk.mopeft_gates.proj.bias.fill_(40.0)  # sigmoid -> 1 for the (unused) recorded value
        ref_blk.attn.prefix.load_state_dict(blk.attn.prefix.state_dict())
    torch.testing.assert_close(model(a)["last_feat"], prefix_only(a)["last_feat"], rtol=1e-5, atol=1e-5)
    for blk in model.blocks:
        blk.mopeft_gates.override = {}
    assert not torch.allclose(model(a)["last_feat"], prefix_only(a)["last_feat"])


def test_mopeft_trains_gates_and_round_trips(tmp_path):
    model = tiny_vit()
    inject(model, mopeft_config())
    model.train()
    sum(v.square().mean() for v in model(images()).values()).backward()
    assert model.blocks[1].mopeft_gates.proj.weight.grad.abs().sum() > 0
    model.eval()
    path = ckpt.save_adapter(model, str(tmp_path / "mopeft.safetensors"))
    fresh = tiny_vit()
    ckpt.inject_from_checkpoint(fresh, path)
    x = images()
    assert torch.equal(fresh(x)["last_feat"], model(x)["last_feat"])
    with pytest.raises(ckpt.PeftCheckpointError, match="cannot merge"):
        ckpt.merged_state_dict(model)
    with pytest.raises(PeftConfigError, match="MoPEFT-gated LoRA"):
        model.blocks[0].attn.qkv.merge()


def test_mopeft_needs_a_gated_method():
    with pytest.raises(PeftConfigError, match="'mopeft' gates"):
        PeftConfig(methods=("mopeft",))
