"""Mona (peft_d2/tuners/mona.py): the layer against the paper's equations written out here, its grid layout in
every supported block family (Swin with padded and shifted windows, detectron2's ViT windowed and global blocks,
SAM's encoder), exactness when fresh, counts, config errors, adapter files, merging and multi-adapter serving."""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import images, tiny_swin, tiny_vit
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from test_modeling import base_cfg, inputs
from test_multi_adapter import trained
from test_peft_mask2former import build, peft_cfg

import peft_d2
from peft_d2 import LoRAConfig, PeftCheckpointError, PeftConfig, PeftConfigError, inject, multi
from peft_d2 import checkpoint as ckpt
from peft_d2.config import peft_config_from_cfg
from peft_d2.modeling.backbone.sam import D2SAMSimpleFeaturePyramid, add_sam_config
from peft_d2.modeling.backbone.swin import SwinTransformer, shifted_window_mask
from peft_d2.tuners.mona import Mona, MonaConfig, mona_parameter_count

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import merge_adapter  # noqa: E402

MONA = PeftConfig(methods=("mona",), mona=MonaConfig(bottleneck=6))


# ------------------------------------------------------------------------------------ the paper's equations
def depthwise_same(z, weight, bias):
    """A depth-wise k x k convolution with zero 'same' padding, written as the sum over the kernel's offsets:
    out[c, h, w] = b[c] + sum_ij K[c, i, j] z[c, h + i - k//2, w + j - k//2]. z (B, m, H, W)."""
    k = weight.shape[-1]
    H, W = z.shape[-2:]
    padded = F.pad(z, (k // 2,) * 4)
    out = bias[None, :, None, None].expand_as(z)
    for i in range(k):
        for j in range(k):
            out = out + weight[None, :, 0, i, j, None, None] * padded[:, :, i:i + H, j:j + W]
    return out


def reference_mona(mona: Mona, x, training_dropout=None):
    """Mona(x) = x + U dropout(GeLU(MonaOp(D(gamma LN(x) + gammax x)))) on x (B, H, W, d), each step as the paper
    writes it; the convolutions as sums over offsets and proj as a sum over channels."""
    d = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    ln = (x - mean) / torch.sqrt(var + mona.norm.eps) * mona.norm.weight + mona.norm.bias
    s = mona.gamma * ln + mona.gammax * x
    z = (s @ mona.down.weight.T + mona.down.bias).permute(0, 3, 1, 2)  # (B, m, H, W)
    multi_scale = sum(depthwise_same(z, c.weight, c.bias) for c in (mona.conv3, mona.conv5, mona.conv7)) / 3
    z = multi_scale + z
    z = z + torch.einsum("oc,bchw->bohw", mona.proj.weight[:, :, 0, 0], z) + mona.proj.bias[None, :, None, None]
    h = 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))  # GeLU
    h = h.permute(0, 2, 3, 1)
    if training_dropout is not None:
        h = F.dropout(h, training_dropout, training=True)
    assert h.shape[-1] == mona.up.in_features and x.shape[-1] == d
    return x + h @ mona.up.weight.T + mona.up.bias


def randomise(module, seed=0):
    """Every Mona tensor to random values (U too), so that no comparison is vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Mona):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def test_layer_equals_the_papers_equations_forward_and_gradients():
    torch.manual_seed(0)
    mona = randomise(Mona(12, 5, dropout=0.0).double()).eval()
    x = torch.randn(2, 6, 9, 12, dtype=torch.float64, requires_grad=True)
    out, want = mona(x), reference_mona(mona, x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, x)  # U is not zero: the branch contributes
    weights = torch.randn_like(out)
    params = [x, *mona.parameters()]
    got = torch.autograd.grad((out * weights).sum(), params)
    expected = torch.autograd.grad((want * weights).sum(), params)
    for (name, _), a, b in zip([("x", x), *mona.named_parameters()], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        assert a.abs().sum() > 0, name


def test_dropout_acts_on_the_gelu_output_in_training():
    mona = randomise(Mona(8, 4, dropout=0.5).double()).train()
    x = torch.randn(1, 5, 7, 8, dtype=torch.float64)
    torch.manual_seed(3)
    out = mona(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, reference_mona(mona, x, training_dropout=0.5), rtol=1e-12, atol=1e-12)
    mona.eval()
    assert not torch.allclose(out, mona(x))


def test_fresh_mona_is_the_identity_and_starts_as_the_paper_does():
    mona = Mona(16, 8)
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(mona(x), x)
    assert torch.equal(mona.gamma, torch.full((16,), 1e-6)) and torch.equal(mona.gammax, torch.ones(16))
    assert [c.kernel_size for c in (mona.conv3, mona.conv5, mona.conv7)] == [(3, 3), (5, 5), (7, 7)]
    assert all(c.groups == 8 for c in (mona.conv3, mona.conv5, mona.conv7)) and mona.dropout.p == 0.1
    assert sum(p.numel() for p in mona.parameters()) == mona_parameter_count(16, 8)


# ------------------------------------------------------------------------------------ the grid in each family
class Zero(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def without(block, sublayer):
    """A copy of the base block whose `sublayer` outputs zeros: block(x) is then x plus the other branch alone,
    the value after that branch's residual addition."""
    copied = copy.deepcopy(block)
    setattr(copied, sublayer, Zero())
    return copied


def capture_calls(model, blocks, run):
    """(block, args, kwargs, output) of every call of `blocks` during run()."""
    calls, handles = [], []
    for b in blocks:
        handles.append(b.register_forward_hook(
            lambda m, a, k, o: calls.append((m, a, k, o)), with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def check_grid(base, injected, run, to_grid, from_grid, min_calls):
    """Each injected block's output equals Mona_mlp(after-MLP(Mona_attn(after-attention(x)))), where the
    after-residual values come from the base block itself (one sub-layer zeroed) and the reference Mona sees
    them as the (B, H, W, C) map given by `to_grid(tokens, block, args)`."""
    base_blocks = [m for m in base.modules() if hasattr(m, "norm1") and hasattr(m, "attn")]
    blocks = [m for m in injected.modules() if getattr(type(m), "peft_mona", False)]
    assert len(blocks) == len(base_blocks) and len(blocks) >= 2
    calls = capture_calls(injected, blocks, run)
    assert len(calls) >= min_calls
    for block, args, kwargs, output in calls:
        plain = base_blocks[blocks.index(block)]
        if hasattr(block, "H"):  # detectron2's Swin stage sets the block's H, W before calling it
            plain.H, plain.W = block.H, block.W
        attn_only, mlp_only = without(plain, "mlp"), without(plain, "attn")
        with torch.no_grad():
            x1 = attn_only(*args, **kwargs)
            grid = reference_mona(block.mona_attn, to_grid(x1, block, args))
            x2 = mlp_only(from_grid(grid, x1), *args[1:], **kwargs)
            want = from_grid(reference_mona(block.mona_mlp, to_grid(x2, block, args)), x2)
        torch.testing.assert_close(output, want, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(output, plain(*args, **kwargs))


def swin_to_grid(tokens, block, args):
    """(B, H*W, C) -> (B, H, W, C), H, W the stage's real sizes (row-major, as the patch embedding flattens)."""
    H, W = (args[1], args[2]) if len(args) == 4 else (block.H, block.W)
    return tokens.reshape(tokens.shape[0], H, W, tokens.shape[-1])


def tokens_from_grid(grid, like):
    return grid.reshape(like.shape)


def test_grid_in_peft_d2_swin_with_padding_and_shifted_windows():
    torch.manual_seed(0)
    base = SwinTransformer(pretrain_img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4,
                           drop_path_rate=0.0, out_indices=(0, 1)).double().eval()
    injected = copy.deepcopy(base)
    inject(injected, MONA)
    randomise(injected)
    x = torch.randn(2, 3, 4 * 7, 4 * 9, dtype=torch.float64)  # grids 7 x 9 and 4 x 5: padded to whole windows
    calls = capture_calls(injected, [m for m in injected.modules() if hasattr(m, "mona_attn")], lambda: injected(x))
    assert {(a[1], a[2], blk.shift_size) for blk, a, _, _ in calls} == {(7, 9, 0), (7, 9, 2), (4, 5, 0), (4, 5, 2)}
    check_grid(base, injected, lambda: injected(x), swin_to_grid, tokens_from_grid, 4)


def test_grid_in_detectron2_swin():
    base = tiny_swin().double()
    injected = copy.deepcopy(base)
    inject(injected, MONA)
    randomise(injected)
    x = torch.randn(2, 3, 4 * 5, 4 * 11, dtype=torch.float64)  # grids 5 x 11 and 3 x 6, windows of 4
    check_grid(base, injected, lambda: injected(x), swin_to_grid, tokens_from_grid, 4)


def identity_grid(x, block, args):
    return x


def keep(grid, like):
    return grid


def test_grid_in_detectron2_vit_windowed_and_global_blocks():
    base = tiny_vit().double()
    injected = copy.deepcopy(base)
    inject(injected, MONA)
    randomise(injected)
    assert [b.window_size for b in injected.blocks] == [4, 4, 0]
    x = torch.randn(2, 3, 8 * 5, 8 * 7, dtype=torch.float64)  # a 5 x 7 map: windows of 4 are padded
    check_grid(base, injected, lambda: injected(x), identity_grid, keep, 3)


def sam_cfg():
    cfg = add_sam_config(get_cfg())
    s = cfg.MODEL.SAM
    s.IMG_SIZE, s.PATCH_SIZE, s.EMBED_DIM, s.DEPTH, s.NUM_HEADS = 64, 16, 32, 3, 2
    s.GLOBAL_ATTN_INDEXES, s.WINDOW_SIZE, s.NECK_CHANS, s.OUT_CHANNELS = [2], 2, 16, 24
    return cfg


def test_grid_in_sams_encoder_windowed_and_global_blocks():
    torch.manual_seed(0)
    base = D2SAMSimpleFeaturePyramid(sam_cfg(), None).double().eval()
    injected = copy.deepcopy(base)
    inject(injected, MONA)
    randomise(injected)
    assert [b.window_size for b in injected.net.blocks] == [2, 2, 0]
    x = torch.randn(1, 3, 16 * 3, 16 * 5, dtype=torch.float64)  # a 3 x 5 map: windows of 2 are padded
    check_grid(base, injected, lambda: injected(x), identity_grid, keep, 3)


def test_a_token_moves_mona_only_within_the_7x7_neighbourhood_on_the_true_grid():
    """Swin at 7 x 9 tokens (padded, shifted windows of 4): with the sub-layers zeroed, block = Mona_mlp o Mona_attn;
    one Mona alone (placement attn) reaches exactly the tokens within 3 rows and 3 columns of the moved one."""
    torch.manual_seed(0)
    swin = SwinTransformer(pretrain_img_size=64, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                           drop_path_rate=0.0, out_indices=(0,)).double().eval()
    inject(swin, PeftConfig(methods=("mona",), mona=MonaConfig(bottleneck=6, placements=("attn",))))
    randomise(swin)
    block = swin.layers[0].blocks[1]
    block.attn, block.mlp = Zero(), Zero()
    H, W = 7, 9
    mask = shifted_window_mask(H, W, 4, 2, "cpu").double()
    x = torch.randn(1, H * W, 16, dtype=torch.float64)
    moved = x.clone()
    moved[0, 4 * W + 7] += 1.0  # row 4, column 7: its 7 x 7 neighbourhood crosses windows, padding and the shift
    with torch.no_grad():
        changed = (block(moved, H, W, mask) - block(x, H, W, mask)).abs().sum(-1).view(H, W) > 0
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    assert torch.equal(changed, ((rows - 4).abs() <= 3) & ((cols - 7).abs() <= 3))


# ------------------------------------------------------------------------------------ exact when fresh
def _exact(model, run):
    """`run()` before and after injecting Mona. The base runs frozen, as it is after injection: our Mask2Former's
    head computes differently (1e-7 in float32) when its parameters do not require gradients, whatever PEFT does."""
    model.requires_grad_(False)
    with torch.no_grad():
        before = run()
    report = inject(model, PeftConfig(methods=("mona",)))
    assert report["by_method"]["mona"] > 0
    with torch.no_grad():
        after = run()
    return before, after


def test_fresh_mask2former_with_our_swin_equals_the_base_exactly():
    model = build(base_cfg())
    batch = inputs(False, sizes=((64, 64), (40, 56)))
    before, after = _exact(model, lambda: [r["sem_seg"] for r in model(batch)])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert sum(isinstance(m, Mona) for m in model.modules()) == 2 * 8  # every block of the 4 stages, twice


@pytest.mark.parametrize("backbone", ["vit", "sam", "detectron2_swin"])
def test_fresh_backbones_equal_the_base_exactly(backbone):
    torch.manual_seed(0)
    model = {"vit": tiny_vit, "detectron2_swin": tiny_swin,
             "sam": lambda: D2SAMSimpleFeaturePyramid(sam_cfg(), None).eval()}[backbone]()
    x = images(2)
    before, after = _exact(model, lambda: model(x))
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------ counts, keys, errors
def test_closed_form_count_and_the_parameter_report():
    model = tiny_swin()  # two stages of two blocks, d = 32 and 64
    report = inject(model, PeftConfig(methods=("mona",), mona=MonaConfig(bottleneck=16)))
    assert report["by_method"]["mona"] == 4 * mona_parameter_count(32, 16) + 4 * mona_parameter_count(64, 16)
    assert mona_parameter_count(32, 16) == 2 * 32 * 16 + 16 ** 2 + 88 * 16 + 5 * 32
    one = tiny_swin()
    report = inject(one, PeftConfig(methods=("mona",), mona=MonaConfig(placements=("mlp",), blocks=("layers.1.*",))))
    assert report["by_method"]["mona"] == 2 * mona_parameter_count(64, 64)
    assert not hasattr(one.layers[1].blocks[0], "mona_attn") and not hasattr(one.layers[0].blocks[0], "mona_mlp")
    assert all(p.requires_grad == (".mona_" in n) for n, p in one.named_parameters())


def test_yaml_keys_reach_the_config():
    cfg = peft_cfg(**{"MODEL.PEFT.METHODS": ["mona"], "MODEL.PEFT.MONA.BOTTLENECK": 8,
                      "MODEL.PEFT.MONA.DROPOUT": 0.0, "MODEL.PEFT.MONA.PLACEMENTS": ["mlp"],
                      "MODEL.PEFT.MONA.BLOCKS": ["backbone.layers.3.*"]})
    assert peft_config_from_cfg(cfg).mona == MonaConfig(bottleneck=8, dropout=0.0, placements=("mlp",),
                                                        blocks=("backbone.layers.3.*",))
    model = build(cfg)
    assert model.peft_report["by_method"]["mona"] == 2 * mona_parameter_count(256, 8)
    assert model.backbone.layers[3].blocks[1].mona_mlp.dropout.p == 0.0


@pytest.mark.parametrize("values, key", [
    ({"bottleneck": 0}, "MODEL.PEFT.MONA.BOTTLENECK must be a positive integer, got 0"),
    ({"bottleneck": 2.5}, "MODEL.PEFT.MONA.BOTTLENECK"),
    ({"dropout": 1.0}, r"MODEL.PEFT.MONA.DROPOUT must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, "MODEL.PEFT.MONA.DROPOUT"),
    ({"placements": ("attn", "ffn")}, "MODEL.PEFT.MONA.PLACEMENTS must be a non-empty subset of"),
    ({"placements": ()}, "MODEL.PEFT.MONA.PLACEMENTS"),
    ({"blocks": ()}, "MODEL.PEFT.MONA.BLOCKS"),
])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(PeftConfigError, match=key):
        MonaConfig(**values)


def test_bad_yaml_value_names_the_key():
    cfg = peft_cfg(**{"MODEL.PEFT.METHODS": ["mona"], "MODEL.PEFT.MONA.BOTTLENECK": -4})
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.MONA.BOTTLENECK"):
        peft_config_from_cfg(cfg)


def test_blocks_that_match_nothing_and_unsupported_block_families_are_refused_unchanged():
    model = tiny_swin()
    with pytest.raises(PeftConfigError, match=r"MODEL.PEFT.MONA.BLOCKS \['layer.*'\] matches no site"):
        inject(model, PeftConfig(methods=("mona",), mona=MonaConfig(blocks=("layer.*",))))

    class OwnBlock(nn.Module):  # a transformer block by shape, of no family Mona knows
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.mlp = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.mlp(x + self.attn(self.norm1(x)))

    class Patched(type(model.layers[0].blocks[0])):  # a known family with a forward of its own
        def forward(self, x, mask_matrix):
            return x

    model = nn.Sequential(tiny_swin(), nn.ModuleDict({"own": OwnBlock()}))
    with pytest.raises(PeftConfigError, match=r"block '1.own' \(test_mona.*OwnBlock\) is of no block family Mona "
                                              r"supports; it supports peft_d2's SwinTransformerBlock.*SAM's"):
        inject(model, PeftConfig(methods=("mona",)))
    assert not any(getattr(type(m), "peft_mona", False) or isinstance(m, Mona) for m in model.modules())
    model[0].layers[1].blocks[0].__class__ = Patched
    with pytest.raises(PeftConfigError, match=r"'0.layers.1.blocks.0' \(test_mona.*Patched\)"):
        inject(model, PeftConfig(methods=("mona",), mona=MonaConfig(blocks=("0.*",))))
    assert not any(getattr(type(m), "peft_mona", False) or isinstance(m, Mona) for m in model.modules())


def test_with_adapters_lora_and_prefix_on_the_same_blocks():
    from peft_d2 import AdapterConfig
    from peft_d2.tuners.prefix import PrefixConfig

    model = tiny_vit()
    x = images(2)
    with torch.no_grad():
        before = model(x)
    config = PeftConfig(methods=("lora", "adapter", "mona"), lora=LoRAConfig(r=2, targets=["blocks.*.attn.qkv"]),
                        adapter=AdapterConfig(placements=("attn", "mlp")))
    inject(model, config)
    with torch.no_grad():
        after = model(x)
    assert all(torch.equal(before[k], after[k]) for k in before)
    prefixed = tiny_vit()
    inject(prefixed, PeftConfig(methods=("prefix", "mona"), prefix=PrefixConfig(length=2)))
    sum(v.sum() for v in prefixed(images(1)).values()).backward()
    assert prefixed.blocks[2].mona_mlp.up.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ files, merging, serving
def test_adapter_file_round_trip(tmp_path):
    model = randomise(tiny_swin())
    inject(model, MONA)
    randomise(model)
    x = images(2)
    path = ckpt.save_adapter(model, str(tmp_path / "mona.safetensors"))
    tensors, _, config = ckpt.read_adapter(path)
    assert config == MONA and set(tensors) == {n for n, _ in model.named_parameters() if ".mona_" in n}
    fresh = tiny_swin()
    ckpt.inject_from_checkpoint(fresh, path)
    with torch.no_grad():
        want, got = model(x), fresh(x)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert type(fresh.layers[0].blocks[1]).__name__ == "MonaSwinTransformerBlock"


def test_merging_is_refused_because_mona_cannot_fold_into_base_weights(tmp_path):
    model = tiny_swin()
    inject(model, MONA)
    with pytest.raises(PeftCheckpointError, match=r"cannot merge: modules \['layers.0.blocks.0 \(mona\)'.* add "
                                                  r"computation that no base weight can absorb"):
        ckpt.merged_state_dict(model)
    # the tool on a Mask2Former adapter file: the same refusal, nothing written
    cfg = peft_cfg(**{"MODEL.PEFT.METHODS": ["mona"], "MODEL.PEFT.MONA.BOTTLENECK": 4})
    base = build(base_cfg())
    torch.save({"model": base.state_dict()}, tmp_path / "base.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "base.pth")
    (tmp_path / "mona.yaml").write_text(cfg.dump())
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    adapter = ckpt.save_adapter(model, str(tmp_path / "mona.safetensors"))
    out = tmp_path / "merged.pth"
    with pytest.raises(PeftCheckpointError, match=r"cannot merge: .*\(mona\)"):
        merge_adapter.main(["--config-file", str(tmp_path / "mona.yaml"), "--adapter", adapter, "--output", str(out)])
    assert not out.exists()


def test_mixed_batch_with_mona_equals_each_image_through_its_own_model(tmp_path):
    """Mona on both sites, Mona after the MLP of the last stage only, and LoRA, served from one detectron2 Swin;
    8 images, so that the last stage's 8 x 8 map has as many rows as the batch has images."""
    configs = {
        "mona": MONA,
        "late": PeftConfig(methods=("mona",), mona=MonaConfig(bottleneck=4, placements=("mlp",),
                                                                  blocks=("layers.1.*",))),
        "lora": PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.attn.qkv"])),
    }
    singles, paths = {}, {}
    for i, (name, config) in enumerate(configs.items()):
        model = tiny_swin()
        inject(model, PeftConfig.from_dict(config.to_dict()))
        singles[name] = trained(model, i)
        paths[name] = ckpt.save_adapter(model, str(tmp_path / f"{name}.safetensors"))
    serve = tiny_swin()
    x = images(8)
    routing = ["mona", None, "late", "lora", "mona", "late", None, "lora"]
    with torch.no_grad():
        base = serve(x)
        peft_d2.load_adapters(serve, paths)
        with multi.route(serve, routing):
            mixed = serve(x)
        single = {name: m(x) for name, m in singles.items()}
        with peft_d2.disable_adapters(serve):
            assert all(torch.equal(serve(x)[k], base[k]) for k in base)
    slots = [m for n, m in serve.named_modules() if n.endswith((".mona_attn", ".mona_mlp"))]
    assert len(slots) == 8 and all(isinstance(m, nn.Identity) for m in slots)  # the adapters' Mona: routed ops
    for key in mixed:
        for i, name in enumerate(routing):
            expected = base[key][i] if name is None else single[name][key][i]
            torch.testing.assert_close(mixed[key][i], expected, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(routing):  # every adapter changes the last stage: the comparison can fail
        assert name is None or not torch.allclose(single[name]["p1"][i], base["p1"][i], rtol=1e-5, atol=1e-5)
