"""Trainer pieces that plain DefaultTrainer lacks: PEFT-aware checkpoints, optimizer groups, hooks."""

from .checkpoint import PeftCheckpointer
from .hooks import AdapterExportHook, ParameterReportHook
from .optim import build_optimizer, build_peft_optimizer, peft_param_groups

__all__ = ["PeftCheckpointer", "AdapterExportHook", "ParameterReportHook", "build_optimizer", "build_peft_optimizer",
           "peft_param_groups"]
