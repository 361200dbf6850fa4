"""tools/merge_adapter.py: the merged plain checkpoint reproduces the adapted model."""

import os
import sys

import pytest
import torch
from _models import PEFT_OPTS, small_rcnn_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import peft_d2.build  # noqa: F401
from peft_d2 import PeftConfigError
from peft_d2 import checkpoint as ckpt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import merge_adapter  # noqa: E402


def test_merged_checkpoint_reproduces_adapted_outputs(tmp_path):
    cfg = small_rcnn_cfg(**PEFT_OPTS, **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    torch.manual_seed(0)
    base = build_model(small_rcnn_cfg())
    torch.save({"model": base.state_dict()}, tmp_path / "base.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "base.pth")
    (tmp_path / "peft.yaml").write_text(cfg.dump())

    adapted = build_model(cfg)
    DetectionCheckpointer(adapted).load(cfg.MODEL.WEIGHTS)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ckpt.save_adapter(adapted, str(tmp_path / "adapter.safetensors"))

    out = str(tmp_path / "merged.pth")
    adapter = str(tmp_path / "adapter.safetensors")
    merge_adapter.main(["--config-file", str(tmp_path / "peft.yaml"), "--adapter", adapter, "--output", out])
    plain_cfg = get_cfg()
    plain_cfg.set_new_allowed(True)
    plain_cfg.merge_from_file(out + ".yaml")
    assert plain_cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    plain = build_model(plain_cfg)
    DetectionCheckpointer(plain).load(plain_cfg.MODEL.WEIGHTS)
    assert not any("lora" in n for n in plain.state_dict())

    image = {"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}
    adapted.eval()
    plain.eval()
    with torch.no_grad():
        a = adapted([image])[0]["instances"]
        b = plain([image])[0]["instances"]
        x = torch.randn(4, 32, 7, 7)
        torch.testing.assert_close(plain.roi_heads.box_head(x), adapted.roi_heads.box_head(x), rtol=1e-5, atol=1e-5)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-5, atol=1e-4)


def test_an_adapter_of_another_base_is_refused_unless_the_command_line_says_so(tmp_path):
    cfg = small_rcnn_cfg(**PEFT_OPTS)
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save({"model": build_model(small_rcnn_cfg()).state_dict()}, tmp_path / f"base{seed}.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "base0.pth")
    (tmp_path / "peft.yaml").write_text(cfg.dump())
    adapted = build_model(cfg)
    DetectionCheckpointer(adapted).load(cfg.MODEL.WEIGHTS)
    adapter = ckpt.save_adapter(adapted, str(tmp_path / "adapter.safetensors"))
    argv = ["--config-file", str(tmp_path / "peft.yaml"), "--adapter", adapter, "--output", str(tmp_path / "m.pth"),
            "MODEL.WEIGHTS", str(tmp_path / "base1.pth")]
    with pytest.raises(ckpt.PeftCheckpointError, match="(?s)values of base tensors .*MODEL.PEFT.CHECK_BASE False") as e:
        merge_adapter.main(argv)
    base0, base1 = tmp_path / "base0.pth", tmp_path / "base1.pth"  # the file recorded the base it was made on
    assert f"MODEL.WEIGHTS '{base0}' there, '{base1}' here" in str(e.value)
    assert f"add these KEY VALUE overrides to the command line: MODEL.WEIGHTS {base0}" in str(e.value)
    assert not (tmp_path / "m.pth").exists()
    umask = os.umask(0o022)
    try:
        merge_adapter.main([*argv, "MODEL.PEFT.CHECK_BASE", "False"])
    finally:
        os.umask(umask)
    assert (tmp_path / "m.pth").stat().st_mode & 0o777 == 0o644  # as detectron2 writes checkpoints, not 0600


def test_sfa_adapter_merges_and_the_merged_config_needs_no_peft_keys(tmp_path):
    """SFA files carry their internal selection: merged through their own path (inject_from_checkpoint). The
    merged config has no MODEL.PEFT and no empty DATASETS.COCO_INSTANCES: a config without peft_d2's keys
    (Mask2Former's, no add_peft_config, no add_datasets_config) reads it."""
    from peft_d2.build import build_base_model
    from peft_d2.config import add_datasets_config, add_peft_config, config_functions, peft_config_from_cfg
    from peft_d2.inject import inject

    sfa = {"MODEL.PEFT.METHODS": ["sfa"], "MODEL.PEFT.SFA.TARGETS": ["roi_heads.box_head.fc1"],
           "MODEL.PEFT.SFA.BUDGET": 300, "MODEL.PEFT.SFA.ADAPTER_FRACTION": 0.0}
    cfg = small_rcnn_cfg(**{**PEFT_OPTS, **sfa})
    torch.manual_seed(0)
    torch.save({"model": build_model(small_rcnn_cfg()).state_dict()}, tmp_path / "base.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "base.pth")
    (tmp_path / "sfa.yaml").write_text(cfg.dump())
    adapted = build_base_model(cfg)
    DetectionCheckpointer(adapted).load(cfg.MODEL.WEIGHTS)
    fc1 = adapted.roi_heads.box_head.fc1
    selection = {"roi_heads.box_head.fc1": torch.randperm(fc1.weight.numel())[:300]}
    inject(adapted, peft_config_from_cfg(cfg), sfa_selection=selection)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    adapter = ckpt.save_adapter(adapted, str(tmp_path / "adapter.safetensors"))
    out = str(tmp_path / "merged.pth")
    merge_adapter.main(["--config-file", str(tmp_path / "sfa.yaml"), "--adapter", adapter, "--output", out])

    plain_cfg = get_cfg()
    for fn in config_functions():
        if fn not in (add_peft_config, add_datasets_config):
            fn(plain_cfg)
    plain_cfg.merge_from_file(out + ".yaml")
    assert "PEFT" not in plain_cfg.MODEL and plain_cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    plain = build_model(plain_cfg)
    DetectionCheckpointer(plain).load(plain_cfg.MODEL.WEIGHTS)
    x = torch.randn(4, 32, 7, 7)
    with torch.no_grad():
        want = adapted.roi_heads.box_head(x)
        assert not torch.allclose(want, build_model(small_rcnn_cfg()).roi_heads.box_head(x))
        torch.testing.assert_close(plain.roi_heads.box_head(x), want, rtol=1e-5, atol=1e-5)


def test_command_line_mistakes_are_named(tmp_path, capsys):
    """A misspelt key gets the closest valid ones; --adapter after the KEY VALUE overrides is a usage error."""
    (tmp_path / "peft.yaml").write_text(small_rcnn_cfg(**PEFT_OPTS).dump())
    argv = ["--config-file", str(tmp_path / "peft.yaml"), "--output", str(tmp_path / "m.pth")]
    with pytest.raises(PeftConfigError, match=r"Non-existent config key MODEL.PEFT.LORA.RANKK on the command line "
                       r"\(KEY VALUE overrides\); closest valid keys: MODEL.PEFT.LORA.RANK, "):
        merge_adapter.main([*argv, "MODEL.PEFT.LORA.RANKK", "4"])
    with pytest.raises(SystemExit) as e:
        merge_adapter.main([*argv, "MODEL.WEIGHTS", "", "--adapter", "a.safetensors"])
    assert e.value.code == 2
    assert ("error: option --adapter after the KEY VALUE config overrides (they start at 'MODEL.WEIGHTS'), where it "
            "would be read as a config key: options go before the KEY VALUE overrides") in capsys.readouterr().err
