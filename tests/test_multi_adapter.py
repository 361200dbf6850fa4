"""Several adapter files served from one base model: a mixed batch equals each image through its own model."""

import pytest
import torch
from _models import images, tiny_swin, tiny_vit
from test_modeling import base_cfg, inputs
from test_peft_mask2former import build, peft_cfg

import peft_d2
from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig, PeftConfigError, inject, multi, ops
from peft_d2 import checkpoint as ckpt
from peft_d2.tuners.cobot import CobotConfig
from peft_d2.tuners.prefix import PrefixConfig

TOL = {"rtol": 1e-5, "atol": 1e-5}


def trained(model, seed):
    """Move every trainable tensor, as training would (fresh LoRA and adapters change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


SWIN_CONFIGS = {
    "lora": PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.attn.qkv", "*.mlp.fc1"])),
    "lora_q": PeftConfig(methods=("lora",), lora=LoRAConfig(r=8, qkv_blocks="q", targets=["*.attn.qkv"])),
    "adapters": PeftConfig(methods=("adapter",), adapter=AdapterConfig(num_per_site=2, placements=("attn", "mlp"))),
    "parallel": PeftConfig(methods=("adapter",), adapter=AdapterConfig(placements=("parallel_mlp", "mlp"))),
    "cobot": PeftConfig(methods=("lora", "cobot"), lora=LoRAConfig(r=4, targets=["*.attn.qkv"]),
                        cobot=CobotConfig("lora")),
    "prefix": PeftConfig(methods=("prefix",), prefix=PrefixConfig(length=2)),
    "prefix_mlp": PeftConfig(methods=("prefix", "adapter"), prefix=PrefixConfig(length=3, hidden=8),
                             adapter=AdapterConfig(placements=("mlp",))),
}


@pytest.fixture(scope="module")
def swin_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    models, paths = {}, {}
    for i, (name, config) in enumerate(SWIN_CONFIGS.items()):
        model = tiny_swin()
        inject(model, PeftConfig.from_dict(config.to_dict()))
        models[name] = trained(model, i)
        paths[name] = ckpt.save_adapter(model, str(folder / f"{name}.safetensors"))
    return models, paths


def test_mixed_batch_equals_each_image_through_its_own_model(swin_files):
    models, paths = swin_files
    serve = tiny_swin()
    x = images(9)
    with torch.no_grad():
        base = serve(x)
        peft_d2.load_adapters(serve, paths)
        routing = ["lora", "prefix", "adapters", None, "cobot", "parallel", "prefix_mlp", "lora_q", "lora"]
        with multi.route(serve, routing):
            mixed = serve(x)
        single = {name: m(x) for name, m in models.items()}
    for key in mixed:
        for i, name in enumerate(routing):
            expected = base[key][i] if name is None else single[name][key][i]
            torch.testing.assert_close(mixed[key][i], expected, **TOL)
            if name is not None:  # the adapters change the output: the comparison can fail
                assert not torch.allclose(expected, base[key][i], **TOL)
    with torch.no_grad():
        peft_d2.set_adapter(serve, "parallel")  # tensors inputs: the active adapter for the whole batch
        torch.testing.assert_close(serve(x)["p1"], single["parallel"]["p1"], **TOL)
        with peft_d2.disable_adapters(serve):
            torch.testing.assert_close(serve(x)["p1"], base["p1"], **TOL)
        peft_d2.set_adapter(serve, None)
        torch.testing.assert_close(serve(x)["p1"], base["p1"], **TOL)


def _mask2former_mixed(tmp_path, monkeypatch, fused, device="cpu"):
    """fused "1": LoRA in MSDeformAttn's value_proj through the fused operator, each image's B by adapter_index
    (entry 0, zero, for images whose adapter has no LoRA there)."""
    monkeypatch.setenv(ops.FUSED_ENV_VAR, fused)
    indices = []
    fused_op = ops.ms_deform_attn_lora
    monkeypatch.setattr(ops, "ms_deform_attn_lora",
                        lambda *a, **k: indices.append(k.get("adapter_index")) or fused_op(*a, **k))
    configs = {
        "lora": {"MODEL.PEFT.METHODS": ["lora"],
                 "MODEL.PEFT.LORA.TARGETS": ["backbone.layers.*.attn.qkv", "sem_seg_head.predictor.*.self_attn",
                                             "sem_seg_head.predictor.*.multihead_attn"],
                 "MODEL.PEFT.LORA.MSDA_LAYERS": ["sampling_offsets", "value_proj"]},
        "adapters": {"MODEL.PEFT.METHODS": ["adapter"],
                     "MODEL.PEFT.ADAPTER.PLACEMENTS": ["attn", "msdeform_attn", "decoder_self_attn",
                                                       "decoder_cross_attn"]},
        "prefix": {"MODEL.PEFT.METHODS": ["prefix"], "MODEL.PEFT.PREFIX.PLACEMENTS": ["attn", "decoder_self_attn"],
                   "MODEL.PEFT.PREFIX.LENGTH": "3"},
    }
    batch = inputs(False, sizes=((64, 64), (48, 64), (64, 48), (48, 48)))
    singles, paths = {}, {}
    for i, (name, opts) in enumerate(configs.items()):
        model = trained(build(peft_cfg(**opts)), 10 + i).to(device)  # heads (TRAINABLE) move too: they are routed
        paths[name] = ckpt.save_adapter(model, str(tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            singles[name] = [r["sem_seg"] for r in model(batch)]
    serve = build(base_cfg()).to(device)
    with torch.no_grad():
        base = [r["sem_seg"] for r in serve(batch)]
        peft_d2.load_adapters(serve, paths)
        routing = ["adapters", None, "lora", "prefix"]
        mixed = [r["sem_seg"] for r in serve([dict(d, adapter=a) for d, a in zip(batch, routing)])]
    for i, name in enumerate(routing):
        assert mixed[i].device.type == device
        torch.testing.assert_close(mixed[i], base[i] if name is None else singles[name][i], **TOL)
    assert not torch.allclose(singles["lora"][2], base[2], **TOL)
    assert not torch.allclose(singles["prefix"][3], base[3], **TOL)
    routed = [i for i in indices if i is not None]  # the served model's calls (single models pass None)
    if fused == "1":
        assert routed and all(i.tolist() == [0, 0, 1, 0] for i in routed)  # only image 2 has LoRA there
    else:
        assert indices == []


@pytest.mark.parametrize("fused", ["0", "1"])
def test_mask2former_mixed_batch_with_head_adapters_lora_in_msdeformattn_and_routed_heads(tmp_path, monkeypatch,
                                                                                          fused):
    _mask2former_mixed(tmp_path, monkeypatch, fused)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["0", "1"])
def test_mask2former_mixed_batch_on_cuda(tmp_path, monkeypatch, fused):
    """The same on the GPU: the CUDA kernel's adapter_index path (tools/gpu_check.py runs it)."""
    _mask2former_mixed(tmp_path, monkeypatch, fused, device="cuda")


def test_vit_prefix_and_lora_mixed(tmp_path):
    """ViT's windowed and global attention with prefixes of two lengths beside LoRA on the same blocks' qkv:
    each prefix group runs with the route narrowed to its images, so the LoRA rows inside stay right."""
    configs = {
        "p2": PeftConfig(methods=("prefix",), prefix=PrefixConfig(length=2)),
        "p5": PeftConfig(methods=("prefix",), prefix=PrefixConfig(length=5, blocks=("blocks.2",))),
        "lora": PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.attn.qkv"])),
    }
    models, paths = {}, {}
    for i, (name, config) in enumerate(configs.items()):
        model = tiny_vit()
        inject(model, config)
        models[name] = trained(model, 30 + i)
        paths[name] = ckpt.save_adapter(model, str(tmp_path / f"{name}.safetensors"))
    serve = tiny_vit()
    x = images(5)
    routing = ["p5", "lora", None, "p2", "lora"]
    with torch.no_grad():
        base = serve(x)["last_feat"]
        peft_d2.load_adapters(serve, paths)
        with multi.route(serve, routing):
            mixed = serve(x)["last_feat"]
        with multi.route(serve, ["p2"] * 5):  # one group: the whole batch through the prefix forward
            whole = serve(x)["last_feat"]
        single = {name: m(x)["last_feat"] for name, m in models.items()}
    for i, name in enumerate(routing):
        torch.testing.assert_close(mixed[i], base[i] if name is None else single[name][i], **TOL)
        if name is not None:
            assert not torch.allclose(single[name][i], base[i], **TOL)
    torch.testing.assert_close(whole, single["p2"], **TOL)


def test_mask2former_batch_as_large_as_the_queries_and_lora_on_decoder_ffn(tmp_path):
    """N images = Q queries: the shapes alone cannot tell batch from queries, the predictor's layouts do
    ((Q, N, C) decoder layers, (N, Q, C) class and mask heads)."""
    queries = {"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": "4"}
    configs = {
        "ffn": {**queries, "MODEL.PEFT.METHODS": ["lora"],
                "MODEL.PEFT.LORA.TARGETS": ["sem_seg_head.predictor.transformer_ffn_layers.*.linear1"]},
        "qkv": {**queries, "MODEL.PEFT.METHODS": ["lora"], "MODEL.PEFT.LORA.TARGETS": ["backbone.layers.*.attn.qkv"]},
    }
    batch = inputs(False, sizes=((64, 64), (48, 64), (64, 48), (48, 48)))
    singles, paths = {}, {}
    for i, (name, opts) in enumerate(configs.items()):
        model = trained(build(peft_cfg(**opts)), 20 + i)
        paths[name] = ckpt.save_adapter(model, str(tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            singles[name] = [r["sem_seg"] for r in model(batch)]
    base_cfg_4 = base_cfg()
    base_cfg_4.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 4
    serve = build(base_cfg_4)
    with torch.no_grad():
        base = [r["sem_seg"] for r in serve(batch)]
        peft_d2.load_adapters(serve, paths)
        routing = ["ffn", "qkv", None, "ffn"]
        mixed = [r["sem_seg"] for r in serve([dict(d, adapter=a) for d, a in zip(batch, routing)])]
    for i, name in enumerate(routing):
        want = base[i] if name is None else singles[name][i]
        torch.testing.assert_close(mixed[i], want, **TOL)
    assert not torch.allclose(singles["ffn"][0], base[0], **TOL)


def test_refusals_leave_the_model_unchanged(swin_files, tmp_path):
    _, paths = swin_files
    mopeft = tiny_swin()
    inject(mopeft, PeftConfig(methods=("lora", "prefix", "mopeft"), lora=LoRAConfig(targets=["*.attn.qkv"]),
                              prefix=PrefixConfig(length=2)))
    mopeft_path = ckpt.save_adapter(mopeft, str(tmp_path / "mopeft.safetensors"))
    serve = tiny_swin()
    state = {k: v.clone() for k, v in serve.state_dict().items()}
    with pytest.raises(ckpt.PeftCheckpointError, match=r"'m' .*\['mopeft'\].*gates"):
        peft_d2.load_adapters(serve, {"ok": paths["lora"], "m": mopeft_path})
    other = tiny_swin()
    other.layers[0].blocks[0].mlp.fc1 = torch.nn.Linear(32, 64)  # another base: fingerprint differs
    with pytest.raises(ckpt.PeftCheckpointError, match="another base model"):
        peft_d2.load_adapters(other, {"lora": paths["lora"]})
    assert not hasattr(serve, "peft_adapters") and serve.state_dict().keys() == state.keys()
    assert not any("Prefix" in type(m).__name__ for m in serve.modules())  # no attention class was swapped
    peft_d2.load_adapters(serve, {"lora": paths["lora"]})
    with pytest.raises(PeftConfigError, match=r"\['lora'\] are already loaded"):
        peft_d2.load_adapters(serve, {"lora": paths["lora"]})
    with pytest.raises(KeyError, match="'roads'"):
        peft_d2.set_adapter(serve, "roads")
    with pytest.raises(KeyError, match="'roads'"), multi.route(serve, ["roads"]):
        pass


def test_nested_disable_adapters_restores_the_outer_block(swin_files):
    _, paths = swin_files
    serve = tiny_swin()
    x = images(2)
    with torch.no_grad():
        base = serve(x)["p1"]
        peft_d2.load_adapters(serve, {"lora": paths["lora"]})
        peft_d2.set_adapter(serve, "lora")
        adapted = serve(x)["p1"]
        assert not torch.allclose(adapted, base, **TOL)
        with peft_d2.disable_adapters(serve):
            with peft_d2.disable_adapters(serve):
                torch.testing.assert_close(serve(x)["p1"], base, **TOL)
            torch.testing.assert_close(serve(x)["p1"], base, **TOL)  # still the outer block: the base
        torch.testing.assert_close(serve(x)["p1"], adapted, **TOL)


class DictSwin(torch.nn.Module):
    """tiny_swin behind detectron2-style inputs (a list of dicts with "image", optionally "adapter")."""

    def __init__(self):
        super().__init__()
        self.backbone = tiny_swin()

    def forward(self, batch):
        return self.backbone(torch.stack([d["image"] for d in batch]))["p1"]


def test_threads_serving_at_once_keep_their_own_routing(tmp_path):
    """One thread inside disable_adapters, others making mixed requests (per-image names, use_adapter) and one
    relying on the model-wide default: each gets what it asked for, whatever the others do meanwhile."""
    import threading

    paths = {}
    for i, (name, config) in enumerate((("a", SWIN_CONFIGS["lora"]), ("c", SWIN_CONFIGS["adapters"]))):
        model = DictSwin()
        inject(model, PeftConfig.from_dict(config.to_dict()))
        paths[name] = ckpt.save_adapter(trained(model, 40 + i), str(tmp_path / f"{name}.safetensors"))
    serve = DictSwin().eval()
    x = images(3)
    with torch.no_grad():
        base = serve([{"image": t} for t in x])
        peft_d2.load_adapters(serve, paths)
        want = {n: serve([{"image": t, "adapter": n} for t in x]) for n in ("a", "c")}
    want[None] = base
    assert not torch.allclose(want["a"], base, **TOL) and not torch.allclose(want["c"], base, **TOL)
    peft_d2.set_adapter(serve, "a")  # the model-wide default, set before serving
    inside, stop, errors = threading.Event(), threading.Event(), []

    def check(out, names):
        for i, n in enumerate(names):
            torch.testing.assert_close(out[i], want[n][i], **TOL)

    def disabled():
        with torch.no_grad(), peft_d2.disable_adapters(serve):
            inside.set()
            while not stop.is_set():
                check(serve([{"image": x[0], "adapter": "c"}, {"image": x[1]}, {"image": x[2], "adapter": "a"}]),
                      [None, None, None])

    def mixed(k):
        inside.wait(10)
        for j in range(6):
            names = [("c", "a", None)[(i + j + k) % 3] for i in range(3)]
            with torch.no_grad():
                check(serve([{"image": t, "adapter": n} for t, n in zip(x, names)]), names)
                with peft_d2.use_adapter(serve, "c"):
                    check(serve([{"image": x[0]}, {"image": x[1], "adapter": None}, {"image": x[2]}]), ["c", None, "c"])
                check(serve([{"image": t} for t in x]), ["a", "a", "a"])  # the default again after the block

    def run(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            if fn is not disabled:
                done.append(1)
                if len(done) == 3:
                    stop.set()

    done = []
    threads = [threading.Thread(target=run, args=(disabled,))]
    threads += [threading.Thread(target=run, args=(mixed, k)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    with torch.no_grad():
        check(serve([{"image": t} for t in x]), ["a", "a", "a"])


def test_readme_serving_snippet_runs_as_written(tmp_path, monkeypatch):
    """README "Serving several adapters from one base": its first code block, run as it stands, serves the
    adapters on the base weights they were trained on, in eval mode."""
    import re
    from pathlib import Path

    from detectron2.checkpoint import DetectionCheckpointer

    from peft_d2.build import build_base_model

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Serving several adapters from one base", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(123)  # base weights that a freshly built model does not have
    base = build_base_model(peft_cfg(**{"MODEL.PEFT.METHODS": ["lora"]})).eval()
    torch.save({"model": base.state_dict()}, tmp_path / "base.pth")
    cfg = peft_cfg(**{"MODEL.WEIGHTS": str(tmp_path / "base.pth")})
    monkeypatch.chdir(tmp_path)
    batch = inputs(False, sizes=((64, 64), (48, 64), (64, 48)))
    singles = {}
    for i, (name, opts) in enumerate({
        "cells": {"MODEL.PEFT.METHODS": ["lora"], "MODEL.PEFT.LORA.TARGETS": ["backbone.layers.*.attn.qkv"]},
        "roads": {"MODEL.PEFT.METHODS": ["adapter"], "MODEL.PEFT.ADAPTER.PLACEMENTS": ["attn", "msdeform_attn"]},
    }.items()):
        model = build(peft_cfg(**opts))
        DetectionCheckpointer(model).load(str(tmp_path / "base.pth"))
        ckpt.save_adapter(trained(model, 50 + i), f"{name}.safetensors")
        with torch.no_grad():
            singles[name] = [r["sem_seg"] for r in model(batch)]
    a, b, c = (d["image"] for d in batch)
    namespace = {"peft_d2": peft_d2, "build_base_model": build_base_model, "cfg": cfg, "a": a, "b": b, "c": c,
                 "batch": batch, "DetectionCheckpointer": DetectionCheckpointer}
    with torch.no_grad():
        exec(snippet, namespace)  # noqa: S102 - the README's own code
        served = namespace["model"]
        assert not served.training
        mixed = served([dict(batch[0], adapter="cells"), dict(batch[1], adapter="roads"), dict(batch[2], adapter=None)])
        default = served([batch[0]])[0]["sem_seg"]  # the snippet's set_adapter: "roads"
        plain = base([batch[2]])[0]["sem_seg"]
    torch.testing.assert_close(mixed[0]["sem_seg"], singles["cells"][0], **TOL)
    torch.testing.assert_close(mixed[1]["sem_seg"], singles["roads"][1], **TOL)
    torch.testing.assert_close(mixed[2]["sem_seg"], plain, **TOL)
    torch.testing.assert_close(default, singles["roads"][0], **TOL)
