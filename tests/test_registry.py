"""The method registry: a method defined here, outside the package, goes from YAML keys to build_model, a
training step, an adapter file and the parameter report; injection is all or nothing; the config node and
the README's key table come from the registered configs."""

import os
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from _models import detection_batch, images, small_rcnn_cfg, tiny_swin
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import peft_d2.build  # noqa: F401 - registers "PEFT"
from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig, PeftConfigError, inject, sites
from peft_d2 import checkpoint as ckpt
from peft_d2.build import build_base_model
from peft_d2.config import add_peft_config, key_table, peft_config_from_cfg
from peft_d2.engine import build_peft_optimizer
from peft_d2.tuners import METHODS, PeftMethod, Plan, config_keys, option, register_method, unregister_method
from peft_d2.tuners.cobot import CobotConfig
from peft_d2.tuners.sfa import SFAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a method of the test's own
@dataclass
class ScaleConfig:
    """Per-channel output scaling of linears, y * (1 + s) with s zero-initialised (an (IA)^3-like toy)."""

    targets: list = option([], "glob patterns over nn.Linear module paths")
    init: float = option(0.0, "initial value of s")

    def __post_init__(self):
        if self.init <= -1.0:
            raise PeftConfigError(f"MODEL.PEFT.SCALE.INIT must be > -1, got {self.init!r}")


class ChannelScale(nn.Module):
    peft_method = "scale"

    def __init__(self, width, init):
        super().__init__()
        self.s = nn.Parameter(torch.full((width,), float(init)))


def _scale_hook(module, args, output):
    return output * (1 + module.channel_scale.s)


class ScaleMethod(PeftMethod):
    name, config_class = "scale", ScaleConfig

    def plan(self, model, cfg, planned, **inputs):
        found = sites.match_modules(model, cfg.targets, "MODEL.PEFT.SCALE.TARGETS")
        bad = [p for p, m in found if not isinstance(m, nn.Linear)]
        if bad:
            raise PeftConfigError(f"MODEL.PEFT.SCALE.TARGETS: {bad} are not nn.Linear")
        return Plan(adds=[(p, "channel_scale") for p, _ in found], sites=found)

    def apply(self, model, cfg, plan):
        for _, linear in plan.sites:
            linear.channel_scale = ChannelScale(linear.out_features, cfg.init)
            linear.register_forward_hook(_scale_hook)


class FailingMethod(PeftMethod):
    """Plans fine, then fails half-way through `apply`: what the rollback is for."""

    name, config_class, order = "failing", ScaleConfig, 1000

    def plan(self, model, cfg, planned, **inputs):
        return Plan(sites=sites.match_modules(model, cfg.targets, "MODEL.PEFT.FAILING.TARGETS"))

    def apply(self, model, cfg, plan):
        path, first = plan.sites[0]
        first.channel_scale = ChannelScale(first.out_features, 0.0)
        first.register_forward_hook(_scale_hook)
        raise RuntimeError(f"failed after changing {path}")


@pytest.fixture
def registered():
    register_method(ScaleMethod)
    register_method(FailingMethod())
    yield
    unregister_method("scale")
    unregister_method("failing")
    assert "scale" not in METHODS


def test_a_method_defined_outside_the_package_runs_end_to_end(registered, tmp_path):
    yaml = tmp_path / "scale.yaml"
    yaml.write_text(
        "VERSION: 2\nMODEL:\n  META_ARCHITECTURE: PEFT\n  PEFT:\n    BASE_META_ARCHITECTURE: GeneralizedRCNN\n"
        "    METHODS: [scale]\n    TRAINABLE: ['roi_heads.box_predictor.*']\n    OPTIM:\n      ADAPTER_LR: 0.01\n"
        "    SCALE:\n      TARGETS: ['roi_heads.box_head.fc[12]']\n      INIT: 0.5\n"
    )
    cfg = small_rcnn_cfg()
    cfg.merge_from_file(str(yaml))
    assert cfg.MODEL.PEFT.SCALE.INIT == 0.5 and "`SCALE.TARGETS`" in key_table()
    torch.manual_seed(0)
    model = build_model(cfg)
    fc1 = model.roi_heads.box_head.fc1
    assert torch.equal(fc1.channel_scale.s, torch.full((64,), 0.5))
    assert model.peft_report["by_method"]["scale"] == 2 * 64  # fc1 and fc2, FC_DIM 64

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("channel_scale.s")}
    opt = build_peft_optimizer(cfg, model)
    model.train()
    with EventStorage(0):
        loss = sum(model(detection_batch(64, (8, 8, 40, 48))).values())
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(dict(model.named_parameters())[n], v) for n, v in scales.items())

    path = ckpt.save_adapter(model, str(tmp_path / "scale.safetensors"))
    tensors, _, config = ckpt.read_adapter(path)
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert config.scale.init == 0.5 and config.methods == ("scale",)
    torch.manual_seed(0)
    fresh = build_base_model(cfg)
    report = ckpt.inject_from_checkpoint(fresh, path)
    assert report["by_method"] == model.peft_report["by_method"]
    model.eval()
    fresh.eval()
    x = [{"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        a, b = model(x)[0]["instances"], fresh(x)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    with pytest.raises(ckpt.PeftCheckpointError, match=r"cannot merge.*\(scale\)"):
        ckpt.merged_state_dict(model)


def test_registration_errors(registered):
    with pytest.raises(PeftConfigError, match="'scale' is already registered"):
        register_method(ScaleMethod)

    class Undocumented(PeftMethod):
        name, config_class = "undocumented", dataclass(type("C", (), {"__annotations__": {"x": int}, "x": 1}))

    with pytest.raises(PeftConfigError, match=r"field 'x'.*option\(default, doc\)"):
        register_method(Undocumented)

    class Clash(PeftMethod):
        name, config_class, node = "clash", ScaleConfig, "OPTIM"

    with pytest.raises(PeftConfigError, match="MODEL.PEFT.OPTIM is already taken"):
        register_method(Clash)
    with pytest.raises(TypeError, match=r"unexpected keyword.*'sfa_selection'"):
        inject(tiny_swin(), PeftConfig(methods=("scale",)), lora_selection={})
    with pytest.raises(PeftConfigError, match=r"MODEL.PEFT.SCALE.INIT must be a number, got 'x'"):
        cfg = add_peft_config(small_rcnn_cfg())
        cfg.MODEL.PEFT.SCALE.INIT = "x"
        peft_config_from_cfg(cfg)


# -------------------------------------------------------------------------------- all or nothing (13.7)
def model_state(model):
    """Everything injection may touch: module classes, children, parameters (identity, value, flag),
    buffers and hooks of every module."""
    return (
        [(p, type(m), tuple(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m)))
         for p, m in model.named_modules()],
        [(n, id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        [(n, b.clone()) for n, b in model.named_buffers()],
    )


def assert_same(a, b):
    assert a[0] == b[0]
    assert [(n, i, f) for n, i, _, f in a[1]] == [(n, i, f) for n, i, _, f in b[1]]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a[1], b[1]))
    assert [n for n, _ in a[2]] == [n for n, _ in b[2]] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a[2], b[2]))


def lora_adapter_cobot(r):
    return PeftConfig(methods=("lora", "adapter", "cobot"), lora=LoRAConfig(r=r, targets=["*.attn.qkv"]),
                      adapter=AdapterConfig(placements=("attn", "mlp")), cobot=CobotConfig("lora"),
                      trainable=["*norm*"])


@pytest.mark.parametrize("case", ["last method's plan", "last method's apply", "freezing", "attribute taken"])
def test_a_failing_injection_leaves_the_model_as_it_was(registered, case):
    model = tiny_swin()
    for p in model.layers[0].parameters():  # flags of the caller's own, to be kept
        p.requires_grad_(False)
    x = images()
    before, out = model_state(model), [v.clone() for v in model(x).values()]
    if case == "last method's plan":  # COBOT (applied last) needs a rank divisible by 4
        config, error = lora_adapter_cobot(r=6), (PeftConfigError, "divisible by 4")
    elif case == "last method's apply":
        config = PeftConfig(methods=("lora", "adapter", "failing"), lora=LoRAConfig(r=4, targets=["*.attn.qkv"]),
                            failing=ScaleConfig(targets=["*.mlp.fc1"]))
        error = (RuntimeError, "failed after changing")
    elif case == "freezing":  # everything injected, then a TRAINABLE pattern matches nothing
        config = lora_adapter_cobot(r=4)
        config.trainable = ("no_such_parameter",)
        error = (PeftConfigError, "MODEL.PEFT.TRAINABLE")
    else:
        config = PeftConfig(methods=("lora", "scale"), lora=LoRAConfig(r=4, targets=["*.mlp.fc1"]),
                            scale=ScaleConfig(targets=["*.mlp.fc1", "layers.0.blocks.0.mlp.fc1"]))
        model.layers[0].blocks[0].mlp.fc1.channel_scale = 1  # an attribute of the caller's that would be replaced
        before = model_state(model)
        error = (PeftConfigError, "already has an attribute 'channel_scale'")
    with pytest.raises(error[0], match=error[1]):
        inject(model, config)
    assert_same(model_state(model), before)
    assert getattr(model, "peft_config", None) is None
    for a, b in zip(out, model(x).values()):
        assert torch.equal(a, b)
    if case != "attribute taken":  # and the same model takes a good config afterwards
        report = inject(model, lora_adapter_cobot(r=4))
        assert report["by_method"]["cobot"] > 0


def test_two_methods_converting_one_module_are_refused_before_any_change():
    model = tiny_swin()
    before = model_state(model)
    selection = {"layers.0.blocks.0.attn.qkv": torch.tensor([0, 1, 2])}
    config = PeftConfig(methods=("sfa", "lora"), lora=LoRAConfig(r=4, targets=["layers.0.blocks.0.attn.qkv"]),
                        sfa=SFAConfig(budget=10**6))
    with pytest.raises(PeftConfigError, match="'layers.0.blocks.0.attn.qkv' would be converted by both 'sfa' and"):
        inject(model, config, sfa_selection=selection)
    assert_same(model_state(model), before)


# ------------------------------------------------------------------------------------ one source of keys
def test_the_config_node_is_built_from_the_registered_configs():
    cfg = add_peft_config(small_rcnn_cfg())
    for method in METHODS.values():
        node = cfg.MODEL.PEFT[method.node]
        defaults = peft_config_from_cfg(cfg).method_config(method.name)
        assert defaults == method.config_class(), method.name
        assert set(node) == {k for _, k, _, _ in config_keys(method)}
    assert cfg.MODEL.PEFT.LORA.RANK == 8 and cfg.MODEL.PEFT.COBOT.BASE_METHOD == "lora"
    assert cfg.MODEL.PEFT.ADAPTER.PLACEMENTS == ["attn"]  # YACS lists, as YAML files write them


def test_readme_key_table_is_the_generated_one():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"<!-- key table: python -m peft_d2.config -->\n(.*?)\n<!-- end of key table -->", readme, re.S)
    assert block, "README.md lacks the generated MODEL.PEFT key table markers"
    assert block.group(1).strip() == key_table().strip(), "README's key table is stale: python -m peft_d2.config"


def test_an_adapter_file_depends_only_on_the_methods_it_uses(registered, tmp_path):
    """A LoRA file saved while the user's own methods were registered reads where they are not."""
    import json

    from safetensors.torch import save_file

    model = tiny_swin()
    inject(model, PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.attn.qkv"])))
    path = ckpt.save_adapter(model, str(tmp_path / "lora.safetensors"))
    written = json.loads(ckpt.read_adapter(path)[1]["peft_config"])
    assert set(written) == {"methods", "lora", "trainable"}
    earlier = {**written, "scale": {"targets": [], "init": 0.0}, "adapter": {}}  # every registered method's config
    unregister_method("scale")
    unregister_method("failing")
    try:
        _, _, config = ckpt.read_adapter(path)
        assert config.methods == ("lora",) and config.lora.r == 4
        ckpt.inject_from_checkpoint(tiny_swin(), path)
        assert PeftConfig.from_dict(earlier) == config
        used = tmp_path / "scale.safetensors"  # a file that uses a method not registered: the error names both
        save_file({}, str(used), metadata={**ckpt.read_adapter(path)[1],
                                           "peft_config": json.dumps({**earlier, "methods": ["lora", "scale"]})})
        with pytest.raises(ckpt.PeftCheckpointError, match=r"scale.safetensors.*no registered method \['scale'\]"):
            ckpt.read_adapter(str(used))
    finally:
        register_method(ScaleMethod)
        register_method(FailingMethod())


def test_a_method_with_its_own_optimizer_group_gets_default_settings_that_users_override():
    """docs/adding_a_method.md: `optim_group`. The LazyConfig groups default its lr and weight decay."""
    from peft_d2.lazy import peft_param_groups

    class OwnScale(ChannelScale):
        peft_method = "own_scale"

    class OwnGroup(ScaleMethod):
        name, optim_group = "own_scale", "own"

        def apply(self, model, cfg, plan):
            for _, linear in plan.sites:
                linear.channel_scale = OwnScale(linear.out_features, cfg.init)
                linear.register_forward_hook(_scale_hook)

    register_method(OwnGroup)
    try:
        lora = tiny_swin()
        inject(lora, PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.attn.qkv"])))
        assert [g["name"] for g in peft_param_groups(lora, base_lr=1e-3)] == ["lora"]  # any model, as before
        model = tiny_swin()
        inject(model, PeftConfig(methods=("lora", "own_scale"), lora=LoRAConfig(r=4, targets=["*.attn.qkv"]),
                                 own_scale=ScaleConfig(targets=["*.mlp.fc1"])))
        groups = {g["name"]: g for g in peft_param_groups(model, base_lr=1e-3, lora_lr=1e-2)}
        assert (groups["own"]["lr"], groups["own"]["weight_decay"]) == (1e-3, 0.0)  # the defaults
        assert groups["lora"]["lr"] == 1e-2
        assert {id(p) for p in groups["own"]["params"]} == {
            id(p) for n, p in model.named_parameters() if n.endswith("channel_scale.s")}
        groups = {g["name"]: g for g in peft_param_groups(model, base_lr=1e-3, own_lr=0.5, own_weight_decay=0.1)}
        assert (groups["own"]["lr"], groups["own"]["weight_decay"]) == (0.5, 0.1)
        with pytest.raises(PeftConfigError, match=r"unknown argument\(s\) \['ownn_lr'\].*'own_lr'"):
            peft_param_groups(model, base_lr=1e-3, ownn_lr=0.5)
        cfg = add_peft_config(small_rcnn_cfg())  # YACS: MODEL.PEFT.OPTIM.OWN_LR / OWN_WEIGHT_DECAY
        assert cfg.MODEL.PEFT.OPTIM.OWN_LR == 0.0 and "`OPTIM.OWN_LR`" in key_table()
    finally:
        unregister_method("own_scale")
