"""Injection into detectron2's Swin and ViT backbones: exactness, freezing, counts, errors."""

import copy

import pytest
import torch
import torch.nn as nn
from _models import images, tiny_swin, tiny_vit

from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig, PeftConfigError, inject, parameter_report
from peft_d2.inject import peft_parameter_names
from peft_d2.tuners.adapter import adapter_parameter_count

BUILDERS = {"swin": tiny_swin, "vit": tiny_vit}


def full_config(num=2):
    return PeftConfig(
        methods=("lora", "adapter"),
        lora=LoRAConfig(r=4, alpha=4.0, targets=["*.attn.qkv", "*.attn.proj", "*.mlp.fc1"]),
        adapter=AdapterConfig(num_per_site=num, placements=("attn", "mlp", "parallel_mlp")),
    )


def outputs(model, x):
    return [v.detach().clone() for v in model(x).values()]


def perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("up.weight"):
                p.normal_(std=0.05)


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_fresh_injection_is_exact(arch):
    model = BUILDERS[arch]()
    x = images()
    before = outputs(model, x)
    inject(model, full_config())
    after = outputs(model, x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    perturb(model)  # the same check detects a real change
    assert any(not torch.allclose(a, b) for a, b in zip(before, outputs(model, x)))


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_base_names_unchanged_and_only_peft_trains(arch):
    model = BUILDERS[arch]()
    base_names = {n: p.shape for n, p in model.named_parameters()}
    inject(model, full_config())
    names = dict(model.named_parameters())
    for n, shape in base_names.items():
        assert names[n].shape == shape
    peft = peft_parameter_names(model)
    assert set(names) - set(base_names) == set(peft)
    assert {n for n, p in names.items() if p.requires_grad} == set(peft)

    frozen = {n: p.detach().clone() for n, p in names.items() if n not in peft}
    trained = {n: p.detach().clone() for n, p in names.items() if n in peft}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        loss = sum(v.square().mean() for v in model(images()).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, t in frozen.items():
        assert torch.equal(names[n], t), n
    for n, t in trained.items():
        assert not torch.equal(names[n], t), f"{n} did not train"


def test_trainable_counts_match_closed_forms():
    model = tiny_vit()
    d, depth, r, hidden = 48, 3, 4, 4 * 48
    cfg = full_config(num=3)
    report = inject(model, cfg)
    m = d // 4
    lora = depth * (2 * r * (d + d) + r * (d + d) + r * (d + hidden))  # qkv (q and v blocks), proj, fc1
    adapters = depth * (3 + 3 + 1) * adapter_parameter_count(d, m)
    assert report["by_method"] == {"lora": lora, "adapter": adapters}
    assert report["trainable"] == lora + adapters
    total = sum(p.numel() for p in model.parameters())
    assert report["total"] == total
    assert report["percent"] == pytest.approx(100 * (lora + adapters) / total)
    assert sum(r["trainable"] for r in report["by_module"].values()) == lora + adapters


def test_extra_trainable_patterns_and_report():
    model = tiny_swin()
    cfg = PeftConfig(methods=("adapter",), adapter=AdapterConfig(blocks=("layers.1.*",)), trainable=("*norm*",))
    report = inject(model, cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and "adapter" not in n)
    assert report["by_method"]["base"] == norms
    adapted = [n for n, _ in model.named_modules() if n.endswith("attn.adapter")]
    assert adapted == ["layers.1.blocks.0.attn.adapter", "layers.1.blocks.1.attn.adapter"]


def test_deepcopy_keeps_hooks_working():
    model = tiny_vit()
    inject(model, full_config())
    perturb(model)
    clone = copy.deepcopy(model)
    x = images()
    for a, b in zip(outputs(model, x), outputs(clone, x)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the clone's adapters are its own
        for n, p in clone.named_parameters():
            if n.endswith("up.weight"):
                p.zero_()
    assert any(not torch.allclose(a, b) for a, b in zip(outputs(model, x), outputs(clone, x)))


def test_pattern_matching_nothing_suggests_the_pattern_repaired():
    model = tiny_vit()
    cfg = PeftConfig(methods=("lora",), lora=LoRAConfig(targets=["blocks.*.atn.qkv"]))
    with pytest.raises(PeftConfigError, match=r"MODEL.PEFT.LORA.TARGETS: pattern 'blocks.\*.atn.qkv' matches no module "
                       r"of ViT; did you mean 'blocks.\*.attn.qkv' \(3 modules, e.g. blocks.0.attn.qkv\)\?"):
        inject(model, cfg)
    assert not any(p for n, p in model.named_parameters() if "lora" in n)


@pytest.mark.parametrize("pattern, suggestion", [
    ("layers.*.blocks.*.attn.qvk",
     "did you mean 'layers.*.blocks.*.attn.qkv' (4 modules, e.g. layers.0.blocks.0.attn.qkv)?"),
    ("layers.*.block.*.attn.qkv", "did you mean 'layers.*.blocks.*.attn.qkv' (4 modules"),
    ("*qvk", "did you mean '*qkv' (4 modules"),  # was: ['layers.1.blocks', 'layers.0.blocks', ...]
    ("*.mlp.fc3", "did you mean '*.mlp.fc2' (4 modules, e.g. layers.0.blocks.0.mlp.fc2) or '*.mlp.fc1' (4 modules"),
    ("layers.5.blocks.0.attn.qkv", "closest module names: ['layers.1.blocks.0.attn.qkv', 'layers.0.blocks.0.attn.qkv'"),
    ("head.classifier",
     "no module name is close; the top-level names are ['layers', 'norm0', 'norm1', 'patch_embed', 'pos_drop']"),
])
def test_a_target_matching_nothing_gets_names_near_its_own_parts(pattern, suggestion):
    cfg = PeftConfig(methods=("lora",), lora=LoRAConfig(targets=[pattern]))
    with pytest.raises(PeftConfigError) as e:
        inject(tiny_swin(), cfg)
    prefix = f"MODEL.PEFT.LORA.TARGETS: pattern {pattern!r} matches no module of SwinTransformer; "
    assert str(e.value).startswith(prefix) and suggestion in str(e.value)


def test_a_block_pattern_matching_no_block_gets_a_block_pattern():
    cfg = PeftConfig(methods=("adapter",), adapter=AdapterConfig(blocks=("layers.*.blcks.*",)))
    with pytest.raises(PeftConfigError, match=r"MODEL.PEFT.ADAPTER.BLOCKS \['layers.\*.blcks.\*'\] matches no site in "
                       r"SwinTransformer; did you mean 'layers.\*.blocks.\*' \(4 sites, e.g. layers.0.blocks.0\)\?"):
        inject(tiny_swin(), cfg)


def test_trainable_pattern_matching_nothing():
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.TRAINABLE.*'head.nope'"):
        inject(tiny_vit(), PeftConfig(methods=("adapter",), trainable=("head.nope",)))
    with pytest.raises(PeftConfigError, match=r"pattern 'blocks.\*.nrm1.\*' matches no parameter; did you mean "
                       r"'blocks.\*.norm1.\*' \(6 parameters, e.g. blocks.0.norm1.weight\) or 'blocks.\*.norm2.\*'"):
        inject(tiny_vit(), PeftConfig(methods=("adapter",), trainable=("blocks.*.nrm1.*",)))


def test_method_on_wrong_module_names_path_and_type():
    model = tiny_vit()
    cfg = PeftConfig(methods=("lora",), lora=LoRAConfig(targets=["blocks.0.norm1"]))
    with pytest.raises(PeftConfigError, match=r"LORA.TARGETS: LoRA on module 'blocks.0.norm1' \(LayerNorm\): LoRA"):
        inject(model, cfg)


def test_adapters_need_blocks():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.ADAPTER.BLOCKS"):
        inject(model, PeftConfig(methods=("adapter",)))


@pytest.mark.parametrize(
    "make, key",
    [(lambda: PeftConfig(methods=("lora", "ia3")), "MODEL.PEFT.METHODS.*ia3"),
     (lambda: AdapterConfig(num_per_site=0), "NUM_PER_SITE"),
     (lambda: AdapterConfig(num_per_site=4), "NUM_PER_SITE"),
     (lambda: AdapterConfig(placements=("ffn",)), "PLACEMENTS"),
     (lambda: AdapterConfig(bottleneck=0, reduction=0), "BOTTLENECK")],
)
def test_bad_configs(make, key):
    with pytest.raises(PeftConfigError, match=key):
        make()


def test_double_injection_is_refused():
    model = tiny_vit()
    inject(model, full_config())
    with pytest.raises(PeftConfigError, match="already"):
        inject(model, full_config())


def test_parameter_report_without_peft():
    model = tiny_vit()
    report = parameter_report(model)
    assert report["trainable"] == report["total"] == sum(p.numel() for p in model.parameters())
