"""PEFT methods: each module holds one method's config and layer math; `peft_d2.inject` places them."""

from dataclasses import asdict, dataclass, field

from ..errors import PeftConfigError
from .adapter import AdapterConfig, Bottleneck, ParallelAdapter, SequentialAdapter, adapter_parameter_count
from .cobot import CobotConfig, CobotOrchestrator, cobot_parameter_count
from .lora import LoRAConfig, LoRALayer, LoRALinear, LoRAMultiheadAttention, lora_parameter_count
from .mopeft import MoPEFTConfig, MoPEFTGates
from .prefix import PrefixConfig, PrefixKV, add_prefix, prefix_parameter_count
from .sfa import SFAConfig, SFALinear

METHODS = {
    "lora": LoRAConfig, "adapter": AdapterConfig, "prefix": PrefixConfig, "mopeft": MoPEFTConfig, "cobot": CobotConfig,
    "sfa": SFAConfig,
}


@dataclass
class PeftConfig:
    """What to inject: the methods, each method's config, and which base parameters stay trainable.

    Attributes:
        methods: names from `METHODS`, e.g. ("lora", "adapter").
        lora, adapter: per-method configs (used only when the method is listed).
        trainable: glob patterns over base parameter names that stay trainable (heads, norms, biases),
            e.g. "sem_seg_head.predictor.class_embed.*", "*norm*", "*.bias".
    """

    methods: tuple = ()
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    mopeft: MoPEFTConfig = field(default_factory=MoPEFTConfig)
    cobot: CobotConfig = field(default_factory=CobotConfig)
    sfa: SFAConfig = field(default_factory=SFAConfig)
    trainable: tuple = ()

    def __post_init__(self):
        self.methods = tuple(self.methods)
        self.trainable = tuple(self.trainable)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise PeftConfigError(f"MODEL.PEFT.METHODS: unknown method(s) {unknown}; known: {sorted(METHODS)}")
        if "mopeft" in self.methods and not {"lora", "prefix", "adapter"} & set(self.methods):
            raise PeftConfigError(
                "MODEL.PEFT.METHODS: 'mopeft' gates 'lora', 'prefix' and 'adapter'; list some of them"
            )
        if "cobot" in self.methods and self.cobot.enabled_on not in self.methods:
            raise PeftConfigError(
                f"MODEL.PEFT.METHODS: 'cobot' orchestrates '{self.cobot.enabled_on}', which must be listed too"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        d = dict(d)
        for name, cfg_cls in METHODS.items():
            if isinstance(d.get(name), dict):
                d[name] = cfg_cls(**d[name])
        return cls(**d)


__all__ = [
    "METHODS", "PeftConfig", "CobotConfig", "CobotOrchestrator", "cobot_parameter_count", "LoRAConfig", "LoRALayer",
    "LoRALinear", "LoRAMultiheadAttention", "AdapterConfig", "Bottleneck", "SequentialAdapter", "ParallelAdapter",
    "lora_parameter_count", "adapter_parameter_count", "PrefixConfig", "PrefixKV", "add_prefix",
    "prefix_parameter_count", "MoPEFTConfig", "MoPEFTGates", "SFAConfig", "SFALinear",
]
