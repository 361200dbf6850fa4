"""Trainer pieces that plain DefaultTrainer lacks: PEFT-aware checkpoints, optimizer groups, hooks."""

from .checkpoint import PeftCheckpointer
from .hooks import AdapterExportHook, JSONWriter, ParameterReportHook
from .optim import NORM_TYPES, build_optimizer, build_peft_optimizer, group_trainable_parameters, peft_param_groups

__all__ = ["NORM_TYPES", "PeftCheckpointer", "AdapterExportHook", "JSONWriter", "ParameterReportHook",
           "build_optimizer", "build_peft_optimizer", "group_trainable_parameters", "peft_param_groups"]
