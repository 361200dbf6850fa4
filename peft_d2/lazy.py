"""PEFT for detectron2's LazyConfig projects (ViTDet, the new Mask R-CNN baselines, your own ``*.py`` configs).

In a LazyConfig, wrap the model node and give the optimizer peft_d2's parameter groups::

    from detectron2.config import LazyCall as L
    from peft_d2.lazy import peft_model, peft_param_groups

    model = L(peft_model)(
        model=model,                                   # the project's model node, e.g. ViTDet's Mask R-CNN
        peft=dict(methods=["lora"], lora=dict(r=8, targets=["backbone.net.blocks.*.attn.qkv"]),
                  trainable=["roi_heads.*"]),         # a dict, or a PeftConfig (L(PeftConfig)(...) or an object)
    )
    optimizer.params = L(peft_param_groups)(base_lr="${..lr}", weight_decay="${..weight_decay}")

`instantiate(cfg.model)` then builds the base, injects, freezes everything else and returns the base object
itself: parameter names are the base's own, so ``train.init_checkpoint`` loads unchanged.
`tools/lazyconfig_train_net.py` trains such a config with adapter-only checkpoints (`PeftCheckpointer`) and
exports ``adapter_final.safetensors``; ``train.peft_weights`` names an adapter file to load after
``train.init_checkpoint``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from .config import optim_groups
from .engine.optim import group_trainable_parameters
from .errors import PeftConfigError
from .inject import inject, keep_report
from .tuners import METHODS, PeftConfig

__all__ = ["peft_config_from_dict", "peft_model", "peft_param_groups"]


def _plain(value):
    """`value` with omegaconf containers (what LazyConfig hands over) turned into dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_fields(d: dict, known: list, what: str, where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise PeftConfigError(f"{where}: unknown key(s) {unknown}; {what} has {known}")


def peft_config_from_dict(peft, where: str = "peft") -> PeftConfig:
    """A PeftConfig from a PeftConfig, a dict or an omegaconf node (a LazyConfig's ``peft=`` argument).

    Keys are PeftConfig's fields (``methods``, ``trainable``, one sub-dict per method with that method's config
    fields: ``lora=dict(r=8, targets=[...])``). An unknown key or a value the method rejects raises
    PeftConfigError naming `where` and the key."""
    if isinstance(peft, PeftConfig):
        # Fields may hold omegaconf lists when the node was instantiated by LazyConfig: make them plain.
        peft = peft.to_dict()
    peft = _plain(peft)
    if not isinstance(peft, dict):
        raise PeftConfigError(
            f"{where} must be a PeftConfig or a dict of its fields (methods, trainable, lora, adapter, ...), "
            f"got {type(peft).__name__}"
        )
    _check_fields(peft, ["methods", "trainable", *METHODS], "PeftConfig", where)
    for key in ("methods", "trainable"):
        if key in peft and (isinstance(peft[key], str) or not isinstance(peft[key], (list, tuple))):
            raise PeftConfigError(f"{where}.{key} must be a list of strings, got {peft[key]!r}")
    kwargs = dict(peft)
    for key, method in METHODS.items():
        cls = method.config_class
        if key in peft:
            if not isinstance(peft[key], dict):
                raise PeftConfigError(f"{where}.{key} must be a dict of {cls.__name__} fields, got {peft[key]!r}")
            _check_fields(peft[key], [f.name for f in dataclasses.fields(cls)], cls.__name__, f"{where}.{key}")
            try:
                kwargs[key] = cls(**peft[key])
            except PeftConfigError as e:  # the method's own check names its YACS key: say where it came from
                raise PeftConfigError(f"{where}.{key}: {e}") from None
    try:
        return PeftConfig(**kwargs)
    except PeftConfigError as e:
        raise PeftConfigError(f"{where}: {e}") from None


def peft_model(model: nn.Module, peft, sfa_selection: dict | None = None) -> nn.Module:
    """Inject `peft` into `model` and return `model` itself (in place, no wrapper, no renamed parameters).

    Args:
        model: the base model, or a LazyConfig node that builds it (``L(GeneralizedRCNN)(...)``); inside a
            config, `instantiate` builds the node before calling this function.
        peft: a PeftConfig, or a dict of its fields (see `peft_config_from_dict`).
        sfa_selection: SFA's internal-weight selection (``peft_d2.tuners.sfa.select`` on the pretrained base);
            required when ``methods`` lists "sfa", whose selection must be made before injection.

    Everything except the PEFT tensors and ``trainable`` is frozen; the parameter report is logged and kept
    as ``model.peft_report``.
    """
    if isinstance(model, Mapping) and "_target_" in model:
        from detectron2.config import instantiate

        model = instantiate(model)
    if not isinstance(model, nn.Module):
        raise PeftConfigError(
            f"peft_model: 'model' must be an nn.Module (in a LazyConfig: the model node, e.g. "
            f"L(GeneralizedRCNN)(...)), got {type(model).__name__}"
        )
    config = peft_config_from_dict(peft)
    if not config.methods and not config.trainable:
        raise PeftConfigError(
            "peft.methods is empty and so is peft.trainable: name a method (e.g. ['lora']) or the parameters "
            "to keep trainable"
        )
    if "sfa" in config.methods and sfa_selection is None:
        raise PeftConfigError(
            "peft.methods lists 'sfa', whose internal weights are chosen on the pretrained base before injection: "
            "pass sfa_selection=peft_d2.tuners.sfa.select(...), or train SFA with tools/train_net.py"
        )
    keep_report(model, inject(model, config, sfa_selection=sfa_selection))
    return model


def peft_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.0,
    weight_decay_norm: float = 0.0,
    head_lr: float | None = None,
    **group_settings,
) -> list[dict]:
    """The `params` of a LazyConfig optimizer: the trainable tensors only, in one group per registered method's
    `optim_group` ("lora", "adapter", and those of methods of your own), "head" and "norm"
    (`peft_d2.engine.group_trainable_parameters`), like MODEL.PEFT.OPTIM in YACS configs.

    `group_settings` are `<group>_lr` and `<group>_weight_decay` for the methods' groups (``lora_lr=1e-3``);
    a group's lr defaults to `base_lr`, its weight decay to 0. "head" (trainable base parameters) takes
    `weight_decay`, "norm" (norm layers and biases of trainable base parameters) `weight_decay_norm`, both at
    `head_lr` (None: `base_lr`). As with detectron2's ``get_default_optimizer_params``, the training script sets
    ``optimizer.params.model``."""
    if model is None:
        raise ValueError("peft_param_groups: 'model' is None; set optimizer.params.model to the model first")
    groups = optim_groups()
    known = [f"{g}_{k}" for g in groups for k in ("lr", "weight_decay")]
    unknown = sorted(set(group_settings) - set(known))
    if unknown:
        raise PeftConfigError(f"peft_param_groups: unknown argument(s) {unknown}; the registered methods' optimizer "
                              f"groups take {known}")
    settings = {g: (base_lr if group_settings.get(f"{g}_lr") is None else group_settings[f"{g}_lr"],
                    group_settings.get(f"{g}_weight_decay", 0.0)) for g in groups}
    head = base_lr if head_lr is None else head_lr
    settings.update({"head": (head, weight_decay), "norm": (head, weight_decay_norm)})
    groups = group_trainable_parameters(model, settings)
    if not groups:
        raise ValueError("peft_param_groups: the model has no trainable parameters (check peft.methods and "
                         "peft.trainable)")
    return groups
