"""Optimizer over trainable tensors only, one parameter group per kind with its own lr and weight decay."""

import torch
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.solver.build import maybe_add_gradient_clipping

from ..config import optim_groups
from ..inject import peft_parameter_names
from ..tuners import get_method

# norm layers, whose parameters get SOLVER.WEIGHT_DECAY_NORM (detectron2's own ones included)
NORM_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm, torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm, FrozenBatchNorm2d, NaiveSyncBatchNorm,
)


def peft_param_groups(cfg, model) -> list:
    """Groups of the methods' `optim_group`s ("lora", "adapter"), "head" (trainable base parameters) and "norm"
    (norm layers and biases of trainable base parameters), each with lr and weight decay from MODEL.PEFT.OPTIM
    (<GROUP>_LR, <GROUP>_WEIGHT_DECAY, HEAD_LR; 0 lr = SOLVER.BASE_LR)."""
    o = cfg.MODEL.PEFT.OPTIM
    base_lr = cfg.SOLVER.BASE_LR
    settings = {g: (o[f"{g.upper()}_LR"] or base_lr, o[f"{g.upper()}_WEIGHT_DECAY"]) for g in optim_groups()}
    settings.update({
        "head": (o.HEAD_LR or base_lr, cfg.SOLVER.WEIGHT_DECAY),
        "norm": (o.HEAD_LR or base_lr, cfg.SOLVER.WEIGHT_DECAY_NORM),
    })
    return group_trainable_parameters(model, settings)


def group_trainable_parameters(model, settings: dict) -> list:
    """The trainable parameters of `model` in groups: each registered method's `optim_group` ("lora",
    "adapter"), "head" (trainable base parameters) and "norm" (norm layers and biases of trainable base
    parameters).

    `settings` maps each group name to (lr, weight_decay); empty groups are left out. Frozen parameters never
    enter a group, so the optimizer holds no state for the base."""
    missing = {*optim_groups(), "head", "norm"} - set(settings)
    if missing:
        raise ValueError(f"group_trainable_parameters: settings lacks (lr, weight_decay) for {sorted(missing)}")
    peft = peft_parameter_names(model)
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    groups = {k: [] for k in settings}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in peft:
            kind = get_method(peft[name]).optim_group
        elif id(p) in norm_params or name.endswith(".bias"):
            kind = "norm"
        else:
            kind = "head"
        groups[kind].append(p)
    return [
        {"name": k, "params": ps, "lr": settings[k][0], "weight_decay": settings[k][1]}
        for k, ps in groups.items() if ps
    ]


def build_peft_optimizer(cfg, model) -> torch.optim.Optimizer:
    """`build_optimizer` over `peft_param_groups`."""
    groups = peft_param_groups(cfg, model)
    if not groups:
        raise ValueError("no trainable parameters: check MODEL.PEFT.METHODS and MODEL.PEFT.TRAINABLE")
    return build_optimizer(cfg, groups)


def build_optimizer(cfg, groups: list) -> torch.optim.Optimizer:
    """AdamW or SGD (SOLVER.OPTIMIZER, default ADAMW) over parameter groups, with SOLVER.CLIP_GRADIENTS:
    CLIP_TYPE "full_model" clips the global norm of all parameters at once (Mask2Former's recipe); "value"
    and "norm" are detectron2's per-parameter clipping."""
    name = cfg.SOLVER.get("OPTIMIZER", "ADAMW").upper()
    if name == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = _with_full_model_clipping(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)


def _with_full_model_clipping(optim_cls, clip_value: float, norm_type: float):
    """A subclass of `optim_cls` whose step() first clips the gradient norm of all its parameters together."""

    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optim_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping
