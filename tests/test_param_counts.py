"""The parameter counts of every committed PEFT config (configs/*/peft, configs/synthetic/demo, and the Mask R-CNN
configs of configs/coco/mask_rcnn) are pinned.

`param_counts.json` was recorded from the code before methods moved behind the registry (issue 15); the
counts (all, trainable, per method) and the names and shapes of the model's and the adapter file's tensors
must not change with refactors. Each base model is built once per
dataset folder and deep-copied for each of its configs, so the Swin-B folders take seconds, not minutes.
"""

import copy
import glob
import hashlib
import json
import os

import pytest
import torch

import peft_d2.build  # noqa: F401 - registers the PEFT meta-architecture
import peft_d2.modeling  # noqa: F401 - registers Mask2Former's parts
from peft_d2.build import build_base_model
from peft_d2.checkpoint import adapter_state_dict
from peft_d2.config import get_cfg, merge_config, peft_config_from_cfg
from peft_d2.inject import inject, parameter_report
from peft_d2.tuners import sfa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "param_counts.json")
FOLDERS = sorted({os.path.relpath(os.path.dirname(p), ROOT) for p in glob.glob(f"{ROOT}/configs/*/peft/*.yaml")}
                 | {"configs/synthetic/demo", "configs/coco/mask_rcnn"})


def folder_configs(folder):
    return sorted(p for p in glob.glob(os.path.join(ROOT, folder, "*.yaml")) if not p.endswith("Base-PEFT.yaml"))


def load(path):
    cfg = merge_config(get_cfg(), path)  # the tools' loader: a _BASE_ may be a model-zoo config
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    return cfg


def base_key(cfg):
    model = cfg.MODEL.clone()
    model.META_ARCHITECTURE = model.PEFT.BASE_META_ARCHITECTURE if model.META_ARCHITECTURE == "PEFT" else \
        model.META_ARCHITECTURE
    del model["PEFT"]
    return model.dump()


def keys_digest(state: dict) -> str:
    """sha256 of the sorted names and shapes of a state dict: pins an adapter file's layout in 64 characters."""
    return hashlib.sha256("\n".join(sorted(f"{k}:{tuple(v.shape)}" for k, v in state.items())).encode()).hexdigest()


def shallow_copy(model):
    """A copy of the module tree whose parameters share storage with `model`'s (injection changes no base
    value, only modules and requires_grad flags), so copying a Swin-B costs no memcpy."""
    memo = {id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def sized_sfa_selection(model, cfg):
    """An SFA selection of the budgeted size (what the counts depend on) without the random scores of
    `sfa.random_selection`, which take seconds on a Swin-B: the first entries of each candidate in turn."""
    budget = cfg.total_budget(model)
    left = budget - sfa.plan_external(model, cfg, budget)[1]
    selection = {}
    for path, layer in sfa.candidate_layers(model, cfg):
        k = min(left, layer.weight.numel())
        selection[path], left = torch.arange(k), left - k
    return selection


def count_folder(folder) -> dict:
    """{config path relative to the repository: {"total", "trainable", "by_method"}} for one folder."""
    bases, out = {}, {}
    for path in folder_configs(folder):
        cfg = load(path)
        key = base_key(cfg)
        if key not in bases:
            torch.manual_seed(0)
            base_cfg = cfg.clone()
            base_cfg.MODEL.PEFT.BASE_META_ARCHITECTURE = (
                cfg.MODEL.PEFT.BASE_META_ARCHITECTURE if cfg.MODEL.META_ARCHITECTURE == "PEFT"
                else cfg.MODEL.META_ARCHITECTURE)
            bases[key] = build_base_model(base_cfg)
        model = shallow_copy(bases[key])
        if cfg.MODEL.META_ARCHITECTURE == "PEFT":
            config = peft_config_from_cfg(cfg)
            selection = sized_sfa_selection(model, config.sfa) if "sfa" in config.methods else None
            report = inject(model, config, sfa_selection=selection)
        else:
            report = parameter_report(model)
        out[os.path.relpath(path, ROOT)] = {k: report[k] for k in ("total", "trainable")} | {
            "by_method": dict(report["by_method"]), "adapter_keys": keys_digest(adapter_state_dict(model)),
            "state_keys": keys_digest(model.state_dict())}
    return out


@pytest.mark.parametrize("folder", FOLDERS)
def test_parameter_counts_of_committed_configs_are_unchanged(folder):
    with open(EXPECTED) as f:
        expected = {k: v for k, v in json.load(f).items() if os.path.dirname(k) == folder}
    assert expected, f"{EXPECTED} has no counts for {folder}"
    assert count_folder(folder) == expected


if __name__ == "__main__":  # re-record (only when a count is meant to change): python tests/test_param_counts.py
    counts = {}
    for folder in FOLDERS:
        counts.update(count_folder(folder))
    with open(EXPECTED, "w") as f:
        json.dump(counts, f, indent=1, sort_keys=True)
        f.write("\n")
