"""peft_d2: parameter-efficient fine-tuning (LoRA, adapters, ...) for detectron2 and Mask2Former."""

__version__ = "0.1.0"

from .errors import PeftCheckpointError, PeftConfigError  # noqa: E402
from .inject import (  # noqa: E402
    format_report,
    inject,
    mark_trainable,
    merge,
    parameter_report,
    print_trainable_parameters,
    unmerge,
)
from .tuners import AdapterConfig, LoRAConfig, PeftConfig, PeftMethod, register_method  # noqa: E402

merge_lora, unmerge_lora = merge, unmerge  # earlier names; they merge every mergeable method (LoRA, COBOT, SFA)

__all__ = [
    "__version__", "PeftConfigError", "PeftCheckpointError", "PeftConfig", "PeftMethod", "register_method",
    "LoRAConfig", "AdapterConfig", "inject", "mark_trainable", "parameter_report", "format_report",
    "print_trainable_parameters", "merge", "unmerge", "merge_lora", "unmerge_lora",
]
from .multi import disable_adapters, load_adapters, set_adapter, use_adapter  # noqa: E402

__all__ += ["load_adapters", "set_adapter", "use_adapter", "disable_adapters"]
