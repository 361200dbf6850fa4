"""SFA: the lottery-ticket selection, the budget, reproducibility, checkpoints and merging."""

import pytest
import torch
from _models import images, tiny_swin

from peft_d2 import PeftConfig, PeftConfigError, inject
from peft_d2 import checkpoint as ckpt
from peft_d2.tuners import sfa
from peft_d2.tuners.adapter import adapter_parameter_count


def loss_fn(model):
    x = torch.randn(2, 3, 64, 64)
    return sum(v.square().mean() for v in model(x).values())


def config(**kw):
    kw = {"budget": 3000, "adapter_fraction": 0.5, "adapter_bottleneck": 8, "warmup_iters": 3, **kw}
    return PeftConfig(methods=("sfa",), sfa=sfa.SFAConfig(**kw))


def test_selection_matches_the_largest_warmup_changes_and_resets_weights():
    model = tiny_swin()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config().sfa
    selection = sfa.select_internal(model, cfg, loss_fn, 500)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k  # reset to W_0
    assert sum(i.numel() for i in selection.values()) == 500
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    # recompute the warm-up by hand: the selected entries are the top-500 |W_k - W_0|
    layers = sfa.candidate_layers(model, cfg)
    params = [m.weight for _, m in layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.warmup_lr, momentum=0.9)
    model.train()
    torch.manual_seed(cfg.seed)
    for _ in range(cfg.warmup_iters):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    diffs = torch.cat([(m.weight.detach() - w0[f"{p}.weight"]).abs().flatten() for p, m in layers])
    threshold = torch.topk(diffs, 500).values.min()
    chosen = torch.cat([(m.weight.detach() - w0[f"{p}.weight"]).abs().flatten()[selection[p]] for p, m in layers])
    assert chosen.min() >= threshold * (1 - 1e-6)
    assert diffs.max() > 10 * diffs.median()  # the scores really rank the weights


def test_budget_is_never_exceeded_and_selection_is_reproducible():
    model = tiny_swin()
    cfg = config()
    selection = sfa.select(model, cfg.sfa, loss_fn)
    again = sfa.select(tiny_swin(), cfg.sfa, loss_fn)
    assert all(torch.equal(selection[k], again[k]) for k in selection)
    report = inject(model, cfg, sfa_selection=selection)
    assert report["trainable"] <= 3000
    n_adapters = sum(1 for n, _ in model.named_modules() if n.endswith("mlp.adapter"))
    assert n_adapters >= 1
    assert report["by_method"]["adapter"] == n_adapters * adapter_parameter_count(64, 8)
    assert report["by_method"]["sfa"] == sum(i.numel() for i in selection.values())
    over = {k: torch.arange(v.numel() + 2000) for k, v in selection.items()}
    with pytest.raises(PeftConfigError, match="exceed the budget 3000"):
        inject(tiny_swin(), cfg, sfa_selection=over)


@pytest.mark.parametrize("ranking", ["global", "layer"])
def test_training_round_trip_and_merge(tmp_path, ranking):
    model = tiny_swin()
    cfg = config(adapter_fraction=0.0, ranking=ranking)
    selection = sfa.select(model, cfg.sfa, loss_fn)
    if ranking == "layer":  # every candidate layer gets its share
        assert all(v.numel() > 0 for v in selection.values())
    inject(model, cfg, sfa_selection=selection)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "sfa" not in k}
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v), k  # W_0 untouched: only the selected deltas train
    x = images()
    y = model(x)
    path = ckpt.save_adapter(model, str(tmp_path / "sfa.safetensors"))
    fresh = tiny_swin()
    ckpt.inject_from_checkpoint(fresh, path)
    for k in y:
        assert torch.equal(fresh(x)[k], y[k])
    merged = tiny_swin()
    merged.load_state_dict(ckpt.merged_state_dict(model))
    changed = sum(int((merged.state_dict()[k] != v).sum()) for k, v in tiny_swin().state_dict().items())
    assert 0 < changed <= sum(v.numel() for v in selection.values())  # only masked entries move
    for k in y:
        torch.testing.assert_close(merged(x)[k], y[k], rtol=1e-5, atol=1e-5)


def test_sfa_errors():
    with pytest.raises(PeftConfigError, match="needs its internal selection"):
        inject(tiny_swin(), config())
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.SFA.SCORE"):
        sfa.SFAConfig(score="random")
    with pytest.raises(PeftConfigError, match="MODEL.PEFT.SFA.BUDGET"):
        sfa.SFAConfig(budget=0, budget_ratio=0.0)
