"""peft_d2.lazy and tools/lazyconfig_train_net.py: PEFT for detectron2 LazyConfig projects.

The wrapper and optimizer groups on a tiny ViT; the shipped configs instantiate; and the tiny ViTDet config
trains a few iterations on generated data through the script, with only PEFT and trainable tensors moving,
an adapter file that rebuilds the trained model, --eval-only from it and --resume from the last checkpoint.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from _models import images, load_tool, tiny_vit  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402

from peft_d2 import checkpoint as ckpt  # noqa: E402
from peft_d2.errors import PeftConfigError  # noqa: E402
from peft_d2.inject import peft_parameter_names  # noqa: E402
from peft_d2.lazy import peft_config_from_dict, peft_model, peft_param_groups  # noqa: E402
from peft_d2.tuners import LoRAConfig, PeftConfig  # noqa: E402

# pycocotools under numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
LAZY = ROOT / "configs" / "lazy"
TINY = LAZY / "synthetic" / "mask_rcnn_vitdet_tiny_lora.py"
LORA = dict(methods=["lora"], lora=dict(r=4, targets=["blocks.*.attn.qkv"]), trainable=["blocks.2.mlp.fc2.*"])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ the wrapper


def test_peft_model_returns_the_base_object_with_its_own_names():
    base_names = set(tiny_vit().state_dict())
    model = instantiate(L(peft_model)(model=L(tiny_vit)(), peft=LORA))
    assert type(model).__name__ == "ViT"  # the base object itself, no wrapper
    peft = peft_parameter_names(model)
    assert peft and all(".lora_" in n for n in peft)
    assert base_names == set(model.state_dict()) - set(peft)  # no base name renamed or lost
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(peft) | {"blocks.2.mlp.fc2.weight", "blocks.2.mlp.fc2.bias"}
    assert model.peft_report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a freshly injected model computes what the base computes (LoRA's B starts at zero)
    with torch.no_grad():
        x = images(1)
        assert torch.equal(model(x)["last_feat"], tiny_vit()(x)["last_feat"])


def test_peft_config_node_equals_dict(tmp_path):
    node = L(PeftConfig)(methods=["lora"], lora=L(LoRAConfig)(r=4, targets=["blocks.*.attn.qkv"]),
                         trainable=["blocks.2.mlp.fc2.*"])
    from_node = instantiate(L(peft_model)(model=L(tiny_vit)(), peft=node))
    from_dict = instantiate(L(peft_model)(model=L(tiny_vit)(), peft=LORA))
    assert from_node.peft_config == from_dict.peft_config == peft_config_from_dict(LORA)
    # the config is plain (no omegaconf containers), so the adapter file can store it as JSON
    path = ckpt.save_adapter(from_node, str(tmp_path / "a.safetensors"))
    assert json.loads(ckpt.read_adapter(path)[1]["peft_config"])["lora"]["targets"] == ["blocks.*.attn.qkv"]


@pytest.mark.parametrize(
    "peft, message",
    [
        (dict(methods=["lora"], lora=dict(rank=4)), r"peft\.lora: unknown key\(s\) \['rank'\]"),
        (dict(methods=["lora"], lora_targets=["x"]), r"peft: unknown key\(s\) \['lora_targets'\]"),
        (dict(methods="lora"), r"peft\.methods must be a list of strings"),
        (dict(methods=["lora"], lora=4), r"peft\.lora must be a dict of LoRAConfig fields"),
        (dict(methods=["lorra"]), r"peft: MODEL\.PEFT\.METHODS: unknown method\(s\) \['lorra'\]"),
        (dict(methods=["lora"], lora=dict(r=0, targets=["blocks.*.attn.qkv"])),
         r"peft\.lora: MODEL\.PEFT\.LORA\.RANK must be a positive"),
        (dict(), r"peft\.methods is empty and so is peft\.trainable"),
        (dict(methods=["sfa"]), r"pass sfa_selection"),
        (["lora"], r"peft must be a PeftConfig or a dict"),
    ],
)
def test_bad_peft_arguments_name_the_key_and_leave_the_model_alone(peft, message):
    model = tiny_vit()
    before = _state(model)
    with pytest.raises(PeftConfigError, match=message):
        peft_model(model, peft)
    assert getattr(model, "peft_config", None) is None
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(before) == set(model.state_dict())


def test_peft_model_builds_a_model_node_and_rejects_what_is_not_a_module():
    model = peft_model(L(tiny_vit)(), LORA)  # a node passed directly (not through instantiate) is built first
    assert type(model).__name__ == "ViT" and model.peft_config == peft_config_from_dict(LORA)
    with pytest.raises(PeftConfigError, match="'model' must be an nn.Module"):
        peft_model({"backbone": "vit"}, LORA)


def test_param_groups_hold_trainable_tensors_only():
    model = peft_model(tiny_vit(), dict(LORA, trainable=["blocks.2.mlp.fc2.*", "blocks.2.norm2.*"]))
    groups = {g["name"]: g for g in peft_param_groups(model, base_lr=1e-3, weight_decay=0.05, lora_lr=1e-2)}
    assert set(groups) == {"lora", "head", "norm"}
    assert (groups["lora"]["lr"], groups["lora"]["weight_decay"]) == (1e-2, 0.0)
    assert (groups["head"]["lr"], groups["head"]["weight_decay"]) == (1e-3, 0.05)
    assert (groups["norm"]["lr"], groups["norm"]["weight_decay"]) == (1e-3, 0.0)
    named = {id(p): n for n, p in model.named_parameters()}
    grouped = {g: sorted(named[id(p)] for p in groups[g]["params"]) for g in groups}
    assert grouped["lora"] == sorted(peft_parameter_names(model))
    assert grouped["head"] == ["blocks.2.mlp.fc2.weight"]
    assert grouped["norm"] == ["blocks.2.mlp.fc2.bias", "blocks.2.norm2.bias", "blocks.2.norm2.weight"]
    torch.optim.AdamW(list(groups.values()))  # a valid optimizer argument
    with pytest.raises(ValueError, match="set optimizer.params.model"):
        peft_param_groups(None, base_lr=1e-3)
    frozen = tiny_vit().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        peft_param_groups(frozen, base_lr=1e-3)


@pytest.mark.parametrize(
    "name, method",
    [("mask_rcnn_vitdet_b_lora.py", "lora"), ("mask_rcnn_vitdet_b_adapters.py", "adapter"),
     ("mask_rcnn_R_50_FPN_100ep_LSJ_lora.py", "lora")],
)
def test_shipped_configs_build_frozen_models(name, method):
    cfg = LazyConfig.load(str(LAZY / name))
    if "vitdet" in name:
        cfg.model.model.backbone.net.depth = 2  # the sites and patterns are per block: two blocks show them
    model = instantiate(cfg.model)
    peft = peft_parameter_names(model)
    assert set(peft.values()) == {method}
    patterns = cfg.model.peft.trainable
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in peft or any(fnmatch.fnmatchcase(n, pat) for pat in patterns)), n
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_r50_fpn_lora_adapts_the_backbone_and_fpn_convolutions_and_the_box_head_linear():
    """The new-baseline R50-FPN config: LoRA on every convolution of the ResNet's residual blocks and of the FPN
    (detectron2 Conv2d with FrozenBN) and on the box head's fc1, r (c_in kh kw + c_out) parameters each; the README's
    LazyConfig table carries the counts."""
    from detectron2.layers import Conv2d

    cfg = LazyConfig.load(str(LAZY / "mask_rcnn_R_50_FPN_100ep_LSJ_lora.py"))
    model = instantiate(cfg.model)
    modules = dict(model.named_modules())
    adapted = {n.rpartition(".lora_")[0] for n in peft_parameter_names(model)}
    convs = {n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)
             and n.startswith(("backbone.bottom_up.res", "backbone.fpn_"))}
    assert len(convs) == 16 * 3 + 4 + 4 + 4  # 16 bottleneck blocks, 4 shortcuts, 4 lateral and 4 output convs
    assert all(isinstance(modules[n], Conv2d) and modules[n].norm is not None for n in convs)
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n.startswith("roi_heads.box_head")}
    assert linears == {"roi_heads.box_head.fc1"}  # its head: four convolutions, one linear
    assert adapted == convs | linears
    r = cfg.model.peft.lora.r
    lora = sum(r * (modules[n].weight[0].numel() + modules[n].weight.shape[0]) for n in adapted)
    report = model.peft_report
    assert report["by_method"]["lora"] == lora == 863_232
    assert (report["trainable"], report["total"]) == (1_294_817, 47_103_152)  # 2.75%


# ------------------------------------------------------------------------------------------ the script


def test_script_refuses_an_adapter_for_a_model_without_peft(tmp_path):
    from omegaconf import OmegaConf

    from peft_d2.engine import PeftCheckpointer

    script = load_tool("lazyconfig_train_net.py", "peft_d2_lazy_train_net")
    model = tiny_vit()
    before = _state(model)
    cfg = OmegaConf.create({"train": {"init_checkpoint": str(tmp_path / "never_read.pth"),
                                      "peft_weights": str(tmp_path / "adapter.safetensors")}})
    with pytest.raises(ValueError, match=r"train\.peft_weights=.* the model has no PEFT modules"):
        script.load_weights(cfg, PeftCheckpointer(model, str(tmp_path)), resume=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def lazy_run(tmp_path_factory):
    """The tiny ViTDet LoRA config trained 4 iterations (checkpoints at 2 and 4) from a saved random base."""
    from peft_d2.data.synthetic import generate_split

    root = tmp_path_factory.mktemp("lazy")
    generate_split(str(root / "data" / "synthetic"), "A", "train", 6, image_size=64, seed=3)
    generate_split(str(root / "data" / "synthetic"), "A", "val", 2, image_size=64, seed=4, mask_format="polygon")
    mp = pytest.MonkeyPatch()
    mp.setenv("DETECTRON2_DATASETS", str(root / "data"))
    # detectron2's setup_logger (in default_setup) stops its loggers propagating, which would hide their records
    # from later tests' caplog: put the flags back afterwards
    loggers = logging.Logger.manager.loggerDict
    propagate = {name: lg.propagate for name, lg in loggers.items() if isinstance(lg, logging.Logger)}
    try:
        torch.manual_seed(5)
        base = instantiate(LazyConfig.load(str(TINY)).model.model)
        init = str(root / "base.pth")
        torch.save({"model": base.state_dict()}, init)
        script = load_tool("lazyconfig_train_net.py", "peft_d2_lazy_train_net")
        out = root / "out"
        opts = [f"train.init_checkpoint={init}", f"train.output_dir={out}", "train.checkpointer.period=2",
                "train.seed=1"]
        args = script.default_argument_parser().parse_args(
            ["--config-file", str(TINY), "--num-gpus", "1", *opts, "train.max_iter=4"])
        trainer = script.do_train(args, script.setup(args))
        yield script, trainer.model, base.state_dict(), out, opts
    finally:
        for name, lg in list(loggers.items()):
            if isinstance(lg, logging.Logger):
                lg.propagate = propagate.get(name, True)
        mp.undo()


@pytest.mark.slow
def test_lazy_training_moves_only_peft_and_trainable_tensors(lazy_run):
    _, model, init, out, _ = lazy_run
    trained = model.state_dict()
    peft = peft_parameter_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(peft) <= trainable and not any(n.startswith("backbone.net.") for n in trainable - set(peft))
    for name, tensor in trained.items():
        if name not in trainable:
            assert torch.equal(tensor, init[name]), f"frozen tensor {name} moved"
    lora_b = [n for n in peft if n.endswith("lora_B")]
    assert lora_b and all(trained[n].abs().sum() > 0 for n in lora_b)  # B starts at zero: it learned
    assert sum(not torch.equal(trained[n], init[n]) for n in trainable - set(peft)) > 0.5 * len(trainable - set(peft))
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1, 2, 3]
    assert rows[0]["peft/trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the parameter report reaches the console and log.txt (peft_d2's logger is set up as train_net.py sets it up)
    assert f"trainable params: {int(rows[0]['peft/trainable_params']):,} ||" in (out / "log.txt").read_text()
    # training checkpoints hold the trainable tensors only
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["peft_partial"] and set(saved["model"]) == set(ckpt.adapter_state_dict(model))


@pytest.mark.slow
def test_lazy_adapter_file_rebuilds_the_trained_model(lazy_run):
    _, model, init, out, _ = lazy_run
    base = instantiate(LazyConfig.load(str(TINY)).model.model)
    base.load_state_dict(init)
    ckpt.inject_from_checkpoint(base, str(out / "adapter_final.safetensors"))
    trained = model.state_dict()
    rebuilt = base.state_dict()
    assert set(rebuilt) == set(trained)
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_lazy_eval_only_and_resume(lazy_run):
    script, model, _, out, opts = lazy_run
    adapter = out / "adapter_final.safetensors"
    args = script.default_argument_parser().parse_args(
        ["--config-file", str(TINY), "--eval-only", *opts, f"train.peft_weights={adapter}"])
    results = script.main(args)
    assert set(results) == {"bbox", "segm"} and all(0.0 <= results[t]["AP"] <= 100.0 for t in results)
    assert f"Adapter {adapter} loaded: " in (out / "log.txt").read_text()
    # --resume continues after the last checkpoint (iteration 4) to max_iter 6
    args = script.default_argument_parser().parse_args(
        ["--config-file", str(TINY), "--resume", *opts, "train.max_iter=6"])
    trainer = script.do_train(args, script.setup(args))
    assert trainer.iter == 6  # detectron2 leaves iter at max_iter after a completed run
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1, 2, 3, 4, 5]
