"""Adapter checkpoints: round trip, base fingerprint, bad files, atomic writes, merged export."""

import json
import os

import pytest
import torch
from _models import PEFT_OPTS, images, small_rcnn_cfg, tiny_swin, tiny_vit

from peft_d2 import AdapterConfig, LoRAConfig, PeftCheckpointError, PeftConfig, inject, load_adapters, merge
from peft_d2 import checkpoint as ckpt


def lora_config(**adapter):
    methods = ("lora", "adapter") if adapter else ("lora",)
    return PeftConfig(
        methods=methods, lora=LoRAConfig(r=4, alpha=8.0, targets=["*.attn.qkv", "*.mlp.fc2"]),
        adapter=AdapterConfig(**adapter) if adapter else AdapterConfig(), trainable=("*.norm1.*",),
    )


def trained(model_fn, config):
    model = model_fn()
    inject(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def run(model):
    return [v.detach() for v in model(images()).values()]


def test_round_trip_reproduces_outputs(tmp_path):
    model = trained(tiny_vit, lora_config(num_per_site=2, placements=("attn", "mlp")))
    path = ckpt.save_adapter(model, str(tmp_path / "a.safetensors"))
    fresh = tiny_vit()
    ckpt.inject_from_checkpoint(fresh, path)
    for a, b in zip(run(model), run(fresh)):
        assert torch.equal(a, b)
    # only trainable tensors are stored: a few % of the model
    n_stored = sum(t.numel() for t in ckpt.read_adapter(path)[0].values())
    assert n_stored == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_stored < 0.5 * sum(p.numel() for p in model.parameters())


def test_other_base_is_refused_and_model_untouched(tmp_path):
    path = ckpt.save_adapter(trained(tiny_vit, lora_config()), str(tmp_path / "a.safetensors"))
    other = tiny_swin()
    inject(other, PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.attn.qkv"])))
    before = {n: p.detach().clone() for n, p in other.state_dict().items()}
    with pytest.raises(PeftCheckpointError, match="another base model"):
        ckpt.load_adapter(other, path)
    with pytest.raises(PeftCheckpointError, match="a.safetensors"):
        ckpt.load_adapter(other, path, check_base=False)
    for n, t in other.state_dict().items():
        assert torch.equal(t, before[n])


def test_shape_mismatch_is_refused(tmp_path):
    path = ckpt.save_adapter(trained(tiny_vit, lora_config()), str(tmp_path / "a.safetensors"))
    other = tiny_vit()
    inject(other, PeftConfig(methods=("lora",), lora=LoRAConfig(r=2, targets=["*.attn.qkv", "*.mlp.fc2"]),
                             trainable=("*.norm1.*",)))
    with pytest.raises(PeftCheckpointError, match="shape mismatch"):
        ckpt.load_adapter(other, path)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    path = ckpt.save_adapter(trained(tiny_vit, lora_config()), str(tmp_path / "a.safetensors"))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    model = tiny_vit()
    with pytest.raises(PeftCheckpointError, match="cut.safetensors.*not a readable safetensors"):
        ckpt.inject_from_checkpoint(model, str(cut))
    pth = tmp_path / "model.pth"
    torch.save({"model": {}}, pth)
    with pytest.raises(PeftCheckpointError, match="model.pth"):
        ckpt.load_adapter(model, str(pth))
    with pytest.raises(PeftCheckpointError, match="does not exist"):
        ckpt.load_adapter(model, str(tmp_path / "missing.safetensors"))


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = trained(tiny_vit, lora_config())
    path = str(tmp_path / "a.safetensors")
    ckpt.save_adapter(model, path)
    old = open(path, "rb").read()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_adapter(model, path)
    assert open(path, "rb").read() == old
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_merged_state_dict_is_a_plain_base_checkpoint():
    model = trained(tiny_swin, PeftConfig(methods=("lora",), lora=LoRAConfig(r=4, targets=["*.qkv", "*.attn.proj"])))
    merged = ckpt.merged_state_dict(model)
    plain = tiny_swin()
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged, strict=True)
    for a, b in zip(run(model), run(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merge_with_adapters_is_refused():
    model = trained(tiny_vit, lora_config(num_per_site=1))
    with pytest.raises(PeftCheckpointError, match=r"cannot merge: modules \['blocks.0.attn.adapter.0 \(adapter\)"):
        ckpt.merged_state_dict(model)


def test_a_base_of_the_same_shapes_with_other_values_is_refused_and_left_alone(tmp_path):
    """Names and shapes match, values differ: the digest of a few frozen base tensors tells, before the model
    changes; the message says how to skip the check, which then loads."""
    model = trained(tiny_vit, lora_config())
    path = ckpt.save_adapter(model, str(tmp_path / "a.safetensors"))
    digest = json.loads(ckpt.read_adapter(path)[1]["base_digest"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(digest) == ckpt.DIGESTED and not set(digest) & trainable  # frozen tensors only
    assert not any(".attn.qkv." in n or ".mlp.fc2." in n for n in digest)  # LoRA's layers: merging changes them
    torch.manual_seed(5)
    other = tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)  # the same base, a little changed: every digested tensor differs
    before = {k: v.clone() for k, v in other.state_dict().items()}
    message = r"(?s)another base model: names and shapes match, but the values.*check_base=False.*MODEL.PEFT.CHECK_BASE"
    with pytest.raises(PeftCheckpointError, match=message):
        ckpt.inject_from_checkpoint(other, path)
    assert getattr(other, "peft_config", None) is None and other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(PeftCheckpointError, match="values of base tensors"):
        load_adapters(other, {"a": path})
    assert not hasattr(other, "peft_adapters")
    ckpt.inject_from_checkpoint(other, path, check_base=False)  # the override
    assert getattr(other, "peft_config", None) is not None
    fresh = tiny_vit()
    ckpt.inject_from_checkpoint(fresh, path)
    merge(fresh)  # merged LoRA weights are not digested: the merged model's file still loads onto the base
    again = ckpt.save_adapter(fresh, str(tmp_path / "merged.safetensors"))
    ckpt.inject_from_checkpoint(tiny_vit(), again)


def test_another_base_says_what_differs_and_which_overrides_build_it(tmp_path):
    """A file made by a model that peft_d2 built from a config records that config's MODEL values: loading it onto
    another base names the tensors whose shapes differ, the config values and the KEY VALUE overrides."""
    from detectron2.modeling import build_model

    from peft_d2.build import build_base_model  # and registers the PEFT meta-architecture

    wide = build_model(small_rcnn_cfg(**PEFT_OPTS, **{"MODEL.FPN.OUT_CHANNELS": 48}))
    path = ckpt.save_adapter(wide, str(tmp_path / "wide.safetensors"))
    narrow = small_rcnn_cfg(**PEFT_OPTS)  # FPN 32 wide
    config = "MODEL.FPN.OUT_CHANNELS 48 there, 32 here.\nTo build and load that base, add these KEY VALUE " \
             "overrides to the command line: MODEL.FPN.OUT_CHANNELS 48\n"
    with pytest.raises(PeftCheckpointError) as injected:
        ckpt.load_adapter(build_model(narrow), path)
    message = str(injected.value)
    assert "the names or shapes of its base parameters differ" in message
    assert "Tensor shapes differ: backbone.fpn_output2.bias (48,) in the file, (32,) here;" in message
    assert "(and 2 more)" in message  # fpn_output5.bias, and fc1's LoRA factor, which reads 48 * 7 * 7 features
    assert config in message and "MODEL.PEFT.CHECK_BASE False" in message
    with pytest.raises(PeftCheckpointError) as plain:  # the plain base, before injection (tools/merge_adapter.py)
        ckpt.inject_from_checkpoint(build_base_model(narrow), path)
    assert config in str(plain.value)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_have_detectron2s_mode(tmp_path, umask):
    """Adapter files and PEFT training checkpoints: 0666 less the umask, as detectron2's own checkpoints (not
    mkstemp's 0600, which another user's serving process cannot read)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from peft_d2.engine import PeftCheckpointer

    model = trained(tiny_vit, lora_config())
    old = os.umask(umask)
    try:
        ckpt.save_adapter(model, str(tmp_path / "a.safetensors"))
        PeftCheckpointer(model, str(tmp_path)).save("model_peft")
        DetectionCheckpointer(model, str(tmp_path)).save("model_d2")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.name != "last_checkpoint"}
    assert modes == {"a.safetensors": 0o666 & ~umask, "model_peft.pth": 0o666 & ~umask,
                     "model_d2.pth": 0o666 & ~umask}


def test_periodic_adapter_files_match_detectron2s_periodic_checkpoints(tmp_path):
    """adapter_<iter> wherever detectron2's PeriodicCheckpointer writes model_<iter>, the last period included."""
    from types import SimpleNamespace

    from detectron2.engine.hooks import PeriodicCheckpointer

    from peft_d2.engine import AdapterExportHook, PeftCheckpointer

    model = trained(tiny_vit, lora_config())
    trainer = SimpleNamespace(iter=0, max_iter=4)
    out = str(tmp_path)
    hooks = [PeriodicCheckpointer(PeftCheckpointer(model, out), 2), AdapterExportHook(model, out, 2)]
    for h in hooks:
        h.trainer = trainer
        h.before_train()
    for it in range(trainer.max_iter):
        trainer.iter = it
        for h in hooks:
            h.after_step()
    for h in hooks:
        h.after_train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("model_")] == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    assert [n for n in names if n.startswith("adapter_")] == [
        "adapter_0000001.safetensors", "adapter_0000003.safetensors", "adapter_final.safetensors"]


def test_metrics_json_is_created_by_the_first_metrics(tmp_path):
    """A run that fails before any metrics leaves no empty metrics.json; the writer is detectron2's otherwise."""
    from detectron2.utils.events import EventStorage

    from peft_d2.engine import JSONWriter

    path = tmp_path / "metrics.json"
    with EventStorage(0):
        writer = JSONWriter(str(path))
        writer.write()  # nothing to write yet (e.g. after_train of a run that failed at once)
        writer.close()
    assert not path.exists()
    with EventStorage(0) as storage:
        writer = JSONWriter(str(path))
        storage.put_scalar("loss", 1.5)
        writer.write()
        writer.close()
    assert json.loads(path.read_text()) == {"iteration": 0, "loss": 1.5}
