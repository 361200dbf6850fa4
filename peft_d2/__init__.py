"""peft_d2: parameter-efficient fine-tuning (LoRA, adapters, ...) for detectron2 and Mask2Former."""

__version__ = "0.1.0"

from .errors import PeftCheckpointError, PeftConfigError  # noqa: E402
from .inject import (  # noqa: E402
    format_report,
    inject,
    mark_trainable,
    merge_lora,
    parameter_report,
    print_trainable_parameters,
    unmerge_lora,
)
from .tuners import AdapterConfig, LoRAConfig, PeftConfig  # noqa: E402

__all__ = [
    "__version__", "PeftConfigError", "PeftCheckpointError", "PeftConfig", "LoRAConfig", "AdapterConfig",
    "inject", "mark_trainable", "parameter_report", "format_report", "print_trainable_parameters", "merge_lora",
    "unmerge_lora",
]
