"""detectron2 entry points: the "PEFT" meta-architecture and the "PEFTBackbone" backbone.

    MODEL.META_ARCHITECTURE: "PEFT"                    # builds MODEL.PEFT.BASE_META_ARCHITECTURE, injects,
    MODEL.PEFT.BASE_META_ARCHITECTURE: "MaskFormer"    # freezes, reports, returns the base model object

    MODEL.BACKBONE.NAME: "PEFTBackbone"                # the same for a backbone alone: the rest of the
    MODEL.PEFT.BASE_BACKBONE: "D2SwinTransformer"      # model (e.g. Mask R-CNN heads) trains as usual

Both return the base object itself (no wrapper, no prefix on parameter names), so official checkpoints
load unchanged.
"""

import logging

import torch
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

from .config import base_config, peft_config_from_cfg
from .errors import PeftConfigError
from .inject import format_report, inject, keep_report

logger = logging.getLogger(__name__)


def _check_methods(cfg):
    # Empty METHODS with TRAINABLE patterns is a pure freezing baseline (e.g. training the heads only).
    if not cfg.MODEL.PEFT.METHODS and not cfg.MODEL.PEFT.TRAINABLE:
        raise PeftConfigError(
            "MODEL.PEFT.METHODS is empty and so is MODEL.PEFT.TRAINABLE: name a method (e.g. ['lora']) or the "
            "parameters to keep trainable"
        )


def _base_meta_architecture(cfg):
    name = cfg.MODEL.PEFT.BASE_META_ARCHITECTURE
    if name == "PEFT" or name not in META_ARCH_REGISTRY:
        raise PeftConfigError(
            f"MODEL.PEFT.BASE_META_ARCHITECTURE={name!r} is not a registered meta-architecture other than PEFT; "
            f"registered: {sorted(k for k, _ in META_ARCH_REGISTRY if k != 'PEFT')}"
        )
    return META_ARCH_REGISTRY.get(name)


def build_base_model(cfg):
    """The plain MODEL.PEFT.BASE_META_ARCHITECTURE of a PEFT config, on MODEL.DEVICE, nothing injected: for
    SFA, whose selection comes before injection, and for injecting from an adapter file."""
    model = _base_meta_architecture(cfg)(cfg)
    model.to(torch.device(cfg.MODEL.DEVICE))
    model.peft_base_config = base_config(cfg)  # recorded by adapter files: see peft_d2.checkpoint
    return model


@META_ARCH_REGISTRY.register()
def PEFT(cfg):  # noqa: N802 - registry names are the config values
    """Build MODEL.PEFT.BASE_META_ARCHITECTURE and inject MODEL.PEFT into it."""
    name = cfg.MODEL.PEFT.BASE_META_ARCHITECTURE
    meta_arch = _base_meta_architecture(cfg)
    _check_methods(cfg)  # before building: a config error should not wait for a large model
    model = meta_arch(cfg)
    keep_report(model, inject(model, peft_config_from_cfg(cfg)), name)
    model.peft_base_config = base_config(cfg)
    return model


@BACKBONE_REGISTRY.register()
def PEFTBackbone(cfg, input_shape):  # noqa: N802
    """Build MODEL.PEFT.BASE_BACKBONE and inject MODEL.PEFT into the backbone alone."""
    name = cfg.MODEL.PEFT.BASE_BACKBONE
    if name == "PEFTBackbone" or name not in BACKBONE_REGISTRY:
        raise PeftConfigError(
            f"MODEL.PEFT.BASE_BACKBONE={name!r} is not a registered backbone other than PEFTBackbone; "
            f"registered: {sorted(k for k, _ in BACKBONE_REGISTRY if k != 'PEFTBackbone')}"
        )
    _check_methods(cfg)
    backbone = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    report = inject(backbone, peft_config_from_cfg(cfg))
    logger.info("PEFT on backbone %s:\n%s", name, format_report(report))
    return backbone
