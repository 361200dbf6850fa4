"""Attach PEFT modules to any nn.Module, freeze the rest, and report parameters.

    report = peft_d2.inject(model, PeftConfig(methods=("lora", "adapter"), lora=LoRAConfig(r=8, targets=[...])))

This module only orchestrates, the same way for every registered method (`peft_d2.tuners.METHODS`):
validate, plan every method's sites on the model as it is, check that no two plans claim the same module or
attribute, apply the plans in the methods' fixed order, freeze, report. Nothing changes before every plan
holds, and an error while applying (or freezing) restores the model's modules, parameters, hooks and
requires_grad flags, so injection is all or nothing. No base parameter is renamed: where the modules go and
how they compute is each method's business (docs/adding_a_method.md).
"""

import copy
import fnmatch
import logging
from collections import OrderedDict

import torch.nn as nn
from tabulate import tabulate

from . import sites
from .errors import PeftConfigError
from .tuners import METHODS, PeftConfig, application_order


def inject(model: nn.Module, config: PeftConfig, verbose: bool = False, **inputs) -> dict:
    """Inject the methods of `config` into `model` (in place), freeze all other parameters except
    `config.trainable`, and return the parameter report (see `parameter_report`).

    `inputs` are what some methods need besides their config, as `<method>_<input>=` (`PeftMethod.inputs`),
    e.g. `sfa_selection=` (the internal weights `peft_d2.tuners.sfa.select` chose on the base model, or the
    ones stored in an adapter file). On any error the model is left exactly as it was."""
    if getattr(model, "peft_config", None) is not None:
        raise PeftConfigError(f"{type(model).__name__} already has PEFT modules injected")
    methods = application_order(config.methods)
    method_inputs = _split_inputs(inputs)
    planned = OrderedDict()
    for method in methods:
        planned[method.name] = method.plan(model, getattr(config, method.name), dict(planned),
                                           **method_inputs.get(method.name, {}))
    _check_claims(model, planned)
    module_state, flags, config_state = _snapshot(model), _requires_grad(model), config.snapshot()
    try:
        for method in methods:
            method.apply(model, getattr(config, method.name), planned[method.name])
        model.peft_config = config
        mark_trainable(model, config.trainable)
        report = parameter_report(model)
    except BaseException:
        _restore(module_state, flags)
        config.restore(config_state)
        raise
    if verbose:
        print(format_report(report))
    return report


def _split_inputs(inputs: dict) -> dict:
    """{method name: {input: value}} from `<method>_<input>` keywords; unknown keywords are an error."""
    known = {f"{m.name}_{i}": (m.name, i) for m in METHODS.values() for i in m.inputs}
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise TypeError(f"inject() got unexpected keyword(s) {unknown}; the registered methods take {sorted(known)}")
    out = {}
    for key, value in inputs.items():
        name, item = known[key]
        out.setdefault(name, {})[item] = value
    return out


def _check_claims(model: nn.Module, planned: dict) -> None:
    """No module converted by two methods, no attribute added twice or already present."""
    converted, added = {}, {}
    modules = dict(model.named_modules())
    for name, plan in planned.items():
        for path in plan.converts:
            if path in converted:
                raise PeftConfigError(f"module '{path}' would be converted by both '{converted[path]}' and '{name}'")
            converted[path] = name
        for path, attr in plan.adds:
            if (path, attr) in added:
                raise PeftConfigError(f"'{added[path, attr]}' and '{name}' would both add '{attr}' to module "
                                      f"'{path or '(root)'}'")
            added[path, attr] = name
            if hasattr(modules[path], attr):
                raise PeftConfigError(f"module '{path or '(root)'}' ({type(modules[path]).__name__}) already has an "
                                      f"attribute '{attr}'")


def _snapshot(model: nn.Module) -> list:
    """Each module's class and a copy of its attribute dict with its containers (children, parameters,
    buffers, hooks) copied one level deep: what in-place injection changes."""
    return [(m, type(m), {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in vars(m).items()})
            for m in model.modules()]


def _requires_grad(model: nn.Module) -> list:
    return [(p, p.requires_grad) for p in model.parameters()]


def _restore(module_state: list, flags: list) -> None:
    for module, cls, attributes in module_state:
        module.__class__ = cls
        vars(module).clear()
        vars(module).update(attributes)
    for p, flag in flags:
        p.requires_grad_(flag)


# --------------------------------------------------------------------------- freezing and reporting
def peft_parameter_names(model: nn.Module, buffers: bool = False) -> "OrderedDict[str, str]":
    """Parameter name -> PEFT method, for every parameter that a PEFT module added (with `buffers`: the
    buffers PEFT modules added instead, e.g. SFA's selected indices). A module whose class names its
    `peft_method` contributes all its tensors, or only its own ones starting with `peft_tensor_prefixes` when
    it is a base layer converted in place."""
    out = OrderedDict()
    for path, module in model.named_modules():
        method = getattr(type(module), "peft_method", None)
        if method is None:
            continue
        prefix = f"{path}." if path else ""
        tensors = module.named_buffers if buffers else module.named_parameters
        own = getattr(type(module), "peft_tensor_prefixes", None)
        if own is not None:
            names = [n for n, _ in tensors(recurse=False) if n.startswith(tuple(own))]
        else:
            names = [n for n, _ in tensors()]
        for n in names:
            out.setdefault(prefix + n, method)
    return out


def mark_trainable(model: nn.Module, patterns=()) -> None:
    """requires_grad = True for PEFT parameters and base parameters matching a glob in `patterns`, False
    for the rest. Each pattern must match a parameter (the error suggests a near pattern that does)."""
    peft = peft_parameter_names(model)
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise PeftConfigError(
                f"MODEL.PEFT.TRAINABLE: pattern {pattern!r} matches no parameter; "
                f"{sites.suggest([pattern], names, 'parameter')}"
            )
    for name, p in model.named_parameters():
        p.requires_grad_(name in peft or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))


def parameter_report(model: nn.Module) -> dict:
    """Counts of all and trainable parameters, per PEFT method and per top-level module.

    Returns {"total", "trainable", "percent", "by_method": {method: count},
             "by_module": {top-level name: {"total", "trainable"}}}; trainable base parameters (heads, norms)
    are counted under by_method["base"]."""
    peft = peft_parameter_names(model)
    report = {"total": 0, "trainable": 0, "by_method": OrderedDict(), "by_module": OrderedDict()}
    for name, p in model.named_parameters():
        n = p.numel()
        top = name.split(".")[0] if "." in name else "(root)"
        row = report["by_module"].setdefault(top, {"total": 0, "trainable": 0})
        report["total"] += n
        row["total"] += n
        if name in peft:
            report["by_method"][peft[name]] = report["by_method"].get(peft[name], 0) + n
        if p.requires_grad:
            report["trainable"] += n
            row["trainable"] += n
            if name not in peft:
                report["by_method"]["base"] = report["by_method"].get("base", 0) + n
    report["percent"] = 100.0 * report["trainable"] / max(report["total"], 1)
    return report


def format_report(report: dict) -> str:
    """A human-readable table of `parameter_report`'s dict."""
    total = max(report["total"], 1)
    lines = [
        f"trainable params: {report['trainable']:,} || all params: {report['total']:,} || "
        f"trainable%: {report['percent']:.4f}",
        tabulate(
            [(m, f"{n:,}", f"{100 * n / total:.4f}") for m, n in report["by_method"].items()],
            headers=["method", "trainable", "% of all"],
        ),
        tabulate(
            [(m, f"{r['total']:,}", f"{r['trainable']:,}", f"{100 * r['trainable'] / max(r['total'], 1):.2f}")
             for m, r in report["by_module"].items()],
            headers=["module", "params", "trainable", "% trainable"],
        ),
    ]
    return "\n\n".join(lines)


def keep_report(model: nn.Module, report: dict, name: str = "") -> dict:
    """Keep `inject`'s report on the model (`model.peft_report`: the tools' parameter report reads it) and log it
    ("PEFT on <name, default the model's class>:" and the table); returns the report."""
    model.peft_report = report
    logging.getLogger(__name__).info("PEFT on %s:\n%s", name or type(model).__name__, format_report(report))
    return report


def print_trainable_parameters(model: nn.Module) -> None:
    print(format_report(parameter_report(model)))


def merge(model: nn.Module) -> None:
    """Fold the update of every mergeable method present (LoRA, with COBOT; SFA) into its base weights,
    in place (outputs unchanged up to float rounding)."""
    for method in METHODS.values():
        if method.mergeable:
            method.merge(model)


def unmerge(model: nn.Module) -> None:
    """Undo `merge`."""
    for method in METHODS.values():
        if method.mergeable:
            method.unmerge(model)
