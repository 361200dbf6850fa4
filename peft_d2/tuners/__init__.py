"""PEFT methods. Each module holds one method (config, layer math, placement, injection, merging) and
registers it; importing this package registers the built-in ones, in this order (the order of their
MODEL.PEFT nodes and of the optimizer groups)."""

from .base import (
    METHODS,
    PeftConfig,
    PeftMethod,
    Plan,
    application_order,
    config_keys,
    get_method,
    option,
    register_method,
    unregister_method,
)

# isort: off
# (the registration order)
from .lora import (
    LoRAConfig,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    LoRAMultiheadAttention,
    add_lora,
    lora_parameter_count,
)
from .adapter import AdapterConfig, Bottleneck, ParallelAdapter, SequentialAdapter, adapter_parameter_count
from .prefix import PrefixConfig, PrefixKV, add_prefix, prefix_parameter_count
from .mopeft import MoPEFTConfig, MoPEFTGates
from .cobot import CobotConfig, CobotOrchestrator, cobot_parameter_count
from .sfa import SFAConfig, SFALinear
from .mona import Mona, MonaConfig, mona_parameter_count
# isort: on

__all__ = [
    "METHODS", "PeftConfig", "PeftMethod", "Plan", "application_order", "config_keys", "get_method", "option",
    "register_method", "unregister_method", "CobotConfig", "CobotOrchestrator", "cobot_parameter_count",
    "LoRAConfig", "LoRALayer", "LoRALinear", "LoRAConv2d", "LoRAMultiheadAttention", "add_lora",
    "AdapterConfig", "Bottleneck",
    "SequentialAdapter", "ParallelAdapter", "lora_parameter_count", "adapter_parameter_count", "PrefixConfig",
    "PrefixKV", "add_prefix", "prefix_parameter_count", "MoPEFTConfig", "MoPEFTGates", "SFAConfig", "SFALinear",
    "Mona", "MonaConfig", "mona_parameter_count",
]
