"""What the tools log: what was loaded from where (PeftCheckpointer.load_weights), warnings when a PEFT model runs on
a random base or evaluates untrained tensors, no warning for what is expected (a class head of another class count,
PEFT buffers, criterion weights), and the third-party notices the tools silence (peft_d2.quiet), narrowly."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

import peft_d2.build  # noqa: F401 - registers "PEFT"
import peft_d2.modeling  # noqa: F401 - registers MaskFormer
from peft_d2.checkpoint import save_adapter
from peft_d2.config import get_cfg
from peft_d2.engine import PeftCheckpointer
from peft_d2.inject import inject
from peft_d2.tuners import PeftConfig
from peft_d2.tuners.sfa import SFAConfig, random_selection

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "configs" / "synthetic"
CLASS_HEAD = "sem_seg_head.predictor.class_embed.{bias, weight}"


def micro_cfg(config: str, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(SYNTHETIC / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture
def records():
    """The records of peft_d2's and fvcore's loggers (a handler of its own: the tools' setup_logger stops these
    loggers from propagating to caplog)."""
    got = []
    handler = logging.Handler(logging.INFO)
    handler.emit = got.append
    loggers = [logging.getLogger(n) for n in ("peft_d2", "fvcore", "detectron2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield got
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def messages(records, level=logging.INFO):
    return [r.getMessage() for r in records if r.levelno == level]


@pytest.fixture(scope="module")
def base_a(tmp_path_factory):
    """A domain-A base checkpoint (4 classes) for the domain-B PEFT model (5 classes)."""
    torch.manual_seed(0)
    model = build_model(micro_cfg("maskformer2_swin_micro_bs4_A.yaml"))
    path = tmp_path_factory.mktemp("base") / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def peft_b():
    torch.manual_seed(1)
    return build_model(micro_cfg("peft/lora_backbone.yaml"))


def test_training_from_a_base_of_another_class_count_says_it_once(base_a, records):
    PeftCheckpointer(peft_b()).load_weights(base_a)
    assert messages(records, logging.WARNING) == []
    info = messages(records)
    assert f"{CLASS_HEAD}: shape (5, 32) in MODEL.WEIGHTS, (6, 32) here: initialised afresh, trained in this run" \
        in info
    assert "8 PEFT tensors are not in this base checkpoint (expected: they are new)" in info
    assert not any("criterion.empty_weight" in m or "You might want to double check" in m for m in info)


def test_a_frozen_tensor_of_another_shape_still_warns(base_a, tmp_path, records):
    state = torch.load(base_a, weights_only=False)["model"]
    state["backbone.patch_embed.proj.weight"] = torch.zeros(8, 3, 4, 4)
    torch.save({"model": state}, tmp_path / "other.pth")
    PeftCheckpointer(peft_b()).load_weights(str(tmp_path / "other.pth"))
    warnings = messages(records, logging.WARNING)
    assert any("Skip loading parameter 'backbone.patch_embed.proj.weight'" in m for m in warnings)
    assert any("backbone.patch_embed.proj.weight" in m and "not found in the checkpoint" in m for m in warnings)
    assert not any("class_embed" in m or "empty_weight" in m for m in warnings)


def test_eval_from_the_adapter_says_what_it_loaded(base_a, tmp_path, records):
    trained = peft_b()
    PeftCheckpointer(trained).load_weights(base_a)
    adapter = save_adapter(trained, str(tmp_path / "adapter_final.safetensors"))
    records.clear()
    PeftCheckpointer(peft_b()).load_weights(base_a, adapter, eval_only=True)
    assert messages(records, logging.WARNING) == []
    assert (f"Adapter {adapter} loaded: 16 tensors (lora: 8, trainable base tensors: 8); {CLASS_HEAD} from it "
            "(shape (5, 32) in MODEL.WEIGHTS, (6, 32) here)") in messages(records)


def test_eval_without_an_adapter_warns(base_a, records):
    PeftCheckpointer(peft_b()).load_weights(base_a, "", eval_only=True)
    (warning,) = messages(records, logging.WARNING)
    assert warning.startswith("MODEL.PEFT.WEIGHTS is empty and there is no training checkpoint to resume: this "
                              f"evaluates untrained PEFT tensors and a randomly initialised {CLASS_HEAD}")


def test_no_base_weights_warn(records):
    PeftCheckpointer(peft_b()).load_weights("")
    (warning,) = messages(records, logging.WARNING)
    assert warning.startswith("MODEL.WEIGHTS is empty: the frozen base of this PEFT model keeps its random init")


def test_resume_says_the_checkpoint_wins_over_the_adapter(base_a, tmp_path, records):
    model = peft_b()
    ckp = PeftCheckpointer(model, str(tmp_path))
    ckp.load_weights(base_a)
    ckp.save("model_0000003", iteration=3)
    adapter = save_adapter(model, str(tmp_path / "adapter.safetensors"))
    records.clear()
    PeftCheckpointer(peft_b(), str(tmp_path)).load_weights(base_a, adapter, resume=True)
    assert messages(records, logging.WARNING) == []
    assert (f"Resumed from {tmp_path / 'model_0000003.pth'}: 16 tensors (lora: 8, trainable base tensors: 8); "
            f"{CLASS_HEAD} from it (shape (5, 32) in MODEL.WEIGHTS, (6, 32) here); MODEL.PEFT.WEIGHTS {adapter} is "
            "not loaded: this checkpoint holds the trained tensors") in messages(records)


def test_an_adapter_without_the_new_class_head_warns(base_a, tmp_path, records):
    cfg = micro_cfg("peft/lora_backbone.yaml", "MODEL.PEFT.TRAINABLE", "['sem_seg_head.predictor.mask_embed.*']")
    torch.manual_seed(1)
    headless = build_model(cfg)
    PeftCheckpointer(headless).load_weights(base_a)
    adapter = save_adapter(headless, str(tmp_path / "headless.safetensors"))
    records.clear()
    PeftCheckpointer(peft_b()).load_weights(base_a, adapter, check_base=False, eval_only=True)
    (warning,) = messages(records, logging.WARNING)
    assert warning == (f"{CLASS_HEAD} keep their random initialisation: shape (5, 32) in MODEL.WEIGHTS, (6, 32) "
                       f"here, and {adapter} does not hold them")


def test_sfa_buffers_are_expected_in_a_base_load(base_a, records):
    torch.manual_seed(1)
    model = build_model(micro_cfg("maskformer2_swin_micro_bs4_B.yaml", "MODEL.WEIGHTS", ""))
    config = PeftConfig(methods=("sfa",), sfa=SFAConfig(budget_ratio=0.01),
                        trainable=("sem_seg_head.predictor.class_embed.*",))
    inject(model, config, sfa_selection=random_selection(model, config.sfa))
    PeftCheckpointer(model).load(base_a)
    assert messages(records, logging.WARNING) == []
    n_index = sum(name.endswith("sfa_index") for name, _ in model.named_buffers())
    assert n_index > 0
    assert f"{n_index * 2} PEFT tensors are not in this base checkpoint (expected: they are new)" in messages(records)


def test_a_plain_model_keeps_detectron2s_warnings(base_a, records):
    """Without PEFT every tensor trains, so a class head of another shape is no evidence of an adapter: fvcore's
    warning stays (but not for the criterion's weights, which follow the config)."""
    model = build_model(micro_cfg("maskformer2_swin_micro_bs4_B.yaml", "MODEL.WEIGHTS", ""))
    PeftCheckpointer(model).load_weights(base_a)
    warnings = " ".join(messages(records, logging.WARNING))
    assert "Skip loading parameter 'sem_seg_head.predictor.class_embed.weight'" in warnings
    assert "empty_weight" not in warnings


def test_merging_a_b_adapter_onto_an_a_base_is_quiet(base_a, tmp_path, records):
    """tools/merge_adapter.py on a plain base: the adapter file fills the class head of another shape."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import merge_adapter
    finally:
        sys.path.remove(str(ROOT / "tools"))
    trained = peft_b()
    PeftCheckpointer(trained).load_weights(base_a)
    adapter = save_adapter(trained, str(tmp_path / "adapter_final.safetensors"))
    cfg = micro_cfg("peft/lora_backbone.yaml", "MODEL.WEIGHTS", base_a)
    merge_adapter.merge(cfg, adapter, str(tmp_path / "merged.pth"))
    assert messages(records, logging.WARNING) == []
    merged = torch.load(tmp_path / "merged.pth", weights_only=False)["model"]
    head = "sem_seg_head.predictor.class_embed.weight"
    assert torch.equal(merged[head], trained.state_dict()[head])


QUIET = """
import logging, sys, warnings
sys.path.insert(0, {tools!r})
import lazyconfig_train_net  # installs the filters before detectron2's imports
import torch
import timm.models.layers
from detectron2 import model_zoo
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
DefaultAnchorGenerator(sizes=[[8]], aspect_ratios=[[1.0]], strides=[4])([torch.zeros(1, 1, 4, 4)])
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
# the same notices from elsewhere still show
logging.getLogger("torch.utils.cpp_extension").warning("another notice of torch.utils.cpp_extension")
warnings.warn_explicit("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
                       FutureWarning, "mine.py", 1, module="mine")
"""


@pytest.mark.slow
def test_the_tools_silence_third_party_notices_narrowly(tmp_path):
    script = tmp_path / "quiet.py"
    script.write_text(textwrap.dedent(QUIET.format(tools=str(ROOT / "tools"))))
    proc = subprocess.run([sys.executable, "-W", "default", str(script)], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for notice in ("jit/_script.py", "torch.jit.interface", "timm.models.layers is deprecated", "pkg_resources",
                   "No CUDA runtime", "torch.meshgrid"):
        assert notice not in err, notice
    assert "mine.py:1: FutureWarning: `torch.jit.script` is deprecated" in err
    assert "another notice of torch.utils.cpp_extension" in err
