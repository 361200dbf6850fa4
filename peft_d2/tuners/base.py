"""What a PEFT method is, the registry from method name to method, and `PeftConfig`.

A method is one `PeftMethod` subclass in one module of this package (or of user code), registered with
`@register_method`. It owns its config dataclass (whose fields, declared with `option`, are also its
`MODEL.PEFT.<NODE>` keys, defaults and docs), its layer math, where it goes, its injection (`plan`, then
`apply`), its merge behaviour and which tensors an adapter file holds (the `peft_method` class attribute of
the modules it adds, and `peft_tensor_prefixes` for base layers it converts in place). `peft_d2.inject`,
`peft_d2.config` and `peft_d2.checkpoint` only ask the registry. This mirrors Hugging Face PEFT's mapping
from PEFT type to tuner and detectron2's registries; docs/adding_a_method.md walks through a new method.
"""

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import PeftConfigError

METHODS: dict = {}  # method name -> registered PeftMethod instance, in registration order
RESERVED_NODES = ("METHODS", "BASE_META_ARCHITECTURE", "BASE_BACKBONE", "WEIGHTS", "TRAINABLE", "FULL_CHECKPOINTS",
                  "CHECK_BASE", "OPTIM")
YACS_TYPES = (bool, int, float, str, list, tuple)


def option(default, doc: str, key: str = ""):
    """A config field that is also a YACS key: `default`, a one-line `doc` (the README's key table is made
    from it) and the key under the method's node (default: the field name in upper case)."""
    meta = {"doc": doc, "key": key}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Plan:
    """What `PeftMethod.apply` will do, decided before anything changes.

    Attributes:
        converts: paths of existing modules whose class `apply` changes in place (LoRA, prefix, SFA layers).
        adds: (module path, attribute) of the children or attributes `apply` adds ("" is the model itself).
        sites: the method's own description of its sites, read by its `apply` and by methods that build on it.
    `peft_d2.inject` refuses two plans converting the same module or adding the same attribute, and an
    attribute that already exists, before any method is applied.
    """

    converts: list = field(default_factory=list)
    adds: list = field(default_factory=list)
    sites: object = None


class PeftMethod:
    """One PEFT method. Subclasses set the class attributes and implement `plan` and `apply`.

    Attributes:
        name: the value in MODEL.PEFT.METHODS and the PeftConfig attribute holding its config.
        config_class: a dataclass whose fields are declared with `option`; `__post_init__` validates them and
            raises PeftConfigError naming the MODEL.PEFT key.
        node: the YACS node under MODEL.PEFT (default: the name in upper case).
        order: methods are applied in increasing `order` (then registration order): a method planned on the bare
            base model comes first (SFA: its budget is a fraction of the base's parameters), methods that wire
            themselves to other methods' modules come last (MoPEFT, COBOT).
        optim_group: the optimizer group of its parameters; MODEL.PEFT.OPTIM.<GROUP>_LR and <GROUP>_WEIGHT_DECAY.
        mergeable: whether its update folds into base weights (`merge`, `merge_deltas`).
        inputs: extra inputs `peft_d2.inject` takes as keyword `<name>_<input>` (SFA: its data-driven selection).
    """

    name: str = ""
    config_class: type = None
    node: str = ""
    order: int = 100
    optim_group: str = "adapter"
    mergeable: bool = False
    inputs: tuple = ()

    def check(self, config: "PeftConfig") -> None:
        """Checks across methods on the whole PeftConfig (e.g. a method that needs another one listed)."""

    def plan(self, model: nn.Module, cfg, planned: dict, **inputs) -> Plan:
        """Find and validate every site on the model as it is before injection, given the plans of the
        methods applied before this one (`planned`: name -> Plan). Raises PeftConfigError; changes nothing."""
        raise NotImplementedError

    def apply(self, model: nn.Module, cfg, plan: Plan) -> None:
        """Change the model as `plan` says."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list:
        """(path, module) of the modules this method added or converted."""
        return [(p, m) for p, m in model.named_modules() if getattr(type(m), "peft_method", None) == self.name]

    def merge(self, model: nn.Module) -> None:
        """Fold the update into the base weights in place (mergeable methods)."""
        for _, m in self.layers(model):
            if hasattr(m, "merge"):
                m.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, m in self.layers(model):
            if hasattr(m, "unmerge"):
                m.unmerge()

    def merge_deltas(self, model: nn.Module) -> dict:
        """{base state-dict key: update} of the layers not merged yet (mergeable methods)."""
        return {}

    def inputs_from_adapter_file(self, tensors: dict) -> dict:
        """The `inputs` this method needs to re-inject, recovered from an adapter file's tensors."""
        return {}


def _check_method(method: PeftMethod) -> None:
    name = method.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise PeftConfigError(f"PEFT method name {name!r} must be a lower-case identifier")
    if name in ("methods", "trainable") or hasattr(PeftConfig, name):
        raise PeftConfigError(f"PEFT method name {name!r} is reserved (a PeftConfig attribute)")
    if not dataclasses.is_dataclass(method.config_class):
        raise PeftConfigError(f"PEFT method {name!r}: config_class must be a dataclass, got {method.config_class!r}")
    node = method.node or name.upper()
    others = {m.node or m.name.upper(): m.name for m in METHODS.values() if m.name != name}
    if node in RESERVED_NODES or node in others:
        raise PeftConfigError(f"PEFT method {name!r}: MODEL.PEFT.{node} is already taken")
    for f in dataclasses.fields(method.config_class):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if not isinstance(default, YACS_TYPES) or "doc" not in f.metadata:
            raise PeftConfigError(
                f"PEFT method {name!r}: field {f.name!r} of {method.config_class.__name__} must be declared with "
                f"peft_d2.tuners.option(default, doc) and a bool, int, float, str, list or tuple default"
            )


def register_method(method):
    """Register a PeftMethod (an instance, or a subclass, which is instantiated); usable as a class decorator.
    Returns what it was given."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, PeftMethod):
        raise PeftConfigError(f"register_method expects a PeftMethod, got {method!r}")
    if instance.name in METHODS:
        raise PeftConfigError(f"PEFT method {instance.name!r} is already registered")
    _check_method(instance)
    instance.node = instance.node or instance.name.upper()
    METHODS[instance.name] = instance
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests and experiments)."""
    get_method(name)
    del METHODS[name]


def get_method(name: str) -> PeftMethod:
    if name not in METHODS:
        raise PeftConfigError(f"MODEL.PEFT.METHODS: unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def application_order(names) -> list:
    """The registered methods named in `names`, in the order they are planned and applied."""
    position = {n: i for i, n in enumerate(METHODS)}
    return sorted((get_method(n) for n in names), key=lambda m: (m.order, position[m.name]))


def config_keys(method: PeftMethod) -> list:
    """(field name, YACS key, default, doc) of a method's config, in field order."""
    out = []
    for f in dataclasses.fields(method.config_class):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((f.name, f.metadata.get("key") or f.name.upper(), default, f.metadata["doc"]))
    return out


class PeftConfig:
    """What to inject: the methods, each registered method's config, and which base parameters stay trainable.

        PeftConfig(methods=("lora", "adapter"), lora=LoRAConfig(r=8, targets=[...]), trainable=["*norm*"])

    Attributes:
        methods: names of registered methods (`peft_d2.tuners.METHODS`), e.g. ("lora", "adapter").
        <method name>: that method's config (its default when not given; used only when the method is listed).
        trainable: glob patterns over base parameter names that stay trainable (heads, norms, biases),
            e.g. "sem_seg_head.predictor.class_embed.*", "*norm*", "*.bias".
    """

    def __init__(self, methods=(), trainable=(), **configs):
        unknown = [k for k in configs if k not in METHODS]
        if unknown:
            raise PeftConfigError(f"PeftConfig: no registered method {unknown}; registered: {sorted(METHODS)}")
        self.methods = tuple(methods)
        self.trainable = tuple(trainable)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise PeftConfigError(f"MODEL.PEFT.METHODS: unknown method(s) {bad}; known: {sorted(METHODS)}")
        for name, method in METHODS.items():
            value = configs.get(name)
            if value is None:
                value = method.config_class()
            elif isinstance(value, dict):
                value = method.config_class(**value)
            elif not isinstance(value, method.config_class):
                raise PeftConfigError(f"PeftConfig.{name} must be a {method.config_class.__name__}, got {value!r}")
            setattr(self, name, value)
        for name in self.methods:
            METHODS[name].check(self)

    def method_config(self, name: str):
        return getattr(self, name)

    def to_dict(self) -> dict:
        """JSON-ready: {"methods", one entry per listed method, "trainable"} (the adapter file's metadata). The
        configs of methods not listed are left out, so a file depends only on the methods it uses."""
        return {"methods": self.methods, **{n: dataclasses.asdict(getattr(self, n)) for n in self.methods},
                "trainable": self.trainable}

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        """Inverse of `to_dict`; methods not in `d` get defaults, and the configs of methods `d` does not list
        are ignored when no such method is registered (files written when every registered method was saved)."""
        d = dict(d)
        methods, trainable = d.pop("methods", ()), d.pop("trainable", ())
        d = {n: c for n, c in d.items() if n in METHODS or n in methods}
        return cls(methods=methods, trainable=trainable, **d)

    def __eq__(self, other):
        return isinstance(other, PeftConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        listed = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.methods)
        return f"PeftConfig(methods={self.methods!r}, {listed + ', ' if listed else ''}trainable={self.trainable!r})"

    def snapshot(self) -> dict:
        """A copy of every method config's fields, for `restore` (injection resolves some, e.g. SFA's budget)."""
        return {n: copy.deepcopy(vars(getattr(self, n))) for n in METHODS if n in self.__dict__}

    def restore(self, snapshot: dict) -> None:
        for n, values in snapshot.items():
            vars(getattr(self, n)).update(values)


# ------------------------------------------------------------------------- helpers shared by methods
def param_device(module: nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else "cpu"


def gate_per_row(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-image (B,) factor over x (B * nW, ..., d): windows of one image are contiguous in the
    batch (MoPEFT's gates scale LoRA, adapters and prefixes this way)."""
    g = gate.repeat_interleave(x.shape[0] // gate.shape[0]).to(x.dtype)
    return g.view(-1, *([1] * (x.dim() - 1)))
