"""Attach PEFT modules to any nn.Module, freeze the rest, and report parameters.

    report = peft_d2.inject(model, PeftConfig(methods=("lora", "adapter"), lora=LoRAConfig(r=8, targets=[...])))

No base parameter is renamed (DESIGN.md principle 1): LoRA converts the target layer in place into a
subclass holding `lora_A`/`lora_B`; an adapter is a new child (`attn.adapter`, `mlp.adapter`,
`mlp.parallel_adapter`) called by a forward hook of the sub-layer it follows. The hooks are module-level
functions that look the adapter up on the module they are called with, so deep copies stay correct.
"""

import fnmatch
from collections import OrderedDict

import torch.nn as nn
from tabulate import tabulate

from . import sites
from .errors import PeftConfigError
from .tuners import AdapterConfig, PeftConfig
from .tuners.adapter import ParallelAdapter, SequentialAdapter
from .tuners.cobot import CobotOrchestrator
from .tuners.lora import LoRALayer, LoRALinear, LoRAMultiheadAttention
from .tuners.mopeft import SUBMODULES, MoPEFTGates, gates_pre_hook
from .tuners.prefix import add_prefix
from .tuners.sfa import SFALinear, plan_external


def inject(model: nn.Module, config: PeftConfig, verbose: bool = False, sfa_selection: dict | None = None) -> dict:
    """Inject the methods of `config` into `model` (in place), freeze all other parameters except
    `config.trainable`, and return the parameter report (see `parameter_report`). SFA needs the internal
    selection made on the base model (`peft_d2.tuners.sfa.select`), or the one stored in an adapter file."""
    if getattr(model, "peft_config", None) is not None:
        raise PeftConfigError(f"{type(model).__name__} already has PEFT modules injected")
    if "sfa" in config.methods:
        _inject_sfa(model, config.sfa, sfa_selection)
    if "lora" in config.methods:
        _inject_lora(model, config.lora)
    if "adapter" in config.methods:
        _inject_adapters(model, config.adapter)
    if "prefix" in config.methods:
        _inject_prefix(model, config.prefix)
    if "mopeft" in config.methods:
        _inject_mopeft(model, config.mopeft)
    if "cobot" in config.methods:
        _inject_cobot(model, config.cobot)
    model.peft_config = config
    mark_trainable(model, config.trainable)
    report = parameter_report(model)
    if verbose:
        print(format_report(report))
    return report


# ---------------------------------------------------------------------------------------------- LoRA
def _inject_lora(model, cfg):
    if not cfg.targets and not cfg.msda_layers:
        raise PeftConfigError(
            "MODEL.PEFT.LORA.TARGETS and MODEL.PEFT.LORA.MSDA_LAYERS are empty: give glob patterns over module "
            "paths, or MSDeformAttn layer names"
        )
    found = sites.match_modules(model, cfg.targets, "MODEL.PEFT.LORA.TARGETS") if cfg.targets else []
    if cfg.msda_layers:
        for path, msda in sites.find_modules(model, sites.is_ms_deform_attn, ("*",), "MODEL.PEFT.LORA.MSDA_LAYERS"):
            found += [(f"{path}.{name}", getattr(msda, name)) for name in cfg.msda_layers]
    for path, module in found:
        try:
            add_lora(module, cfg, path)
        except PeftConfigError as e:
            raise PeftConfigError(f"LoRA on module '{path}' ({type(module).__name__}): {e}") from None


def add_lora(module: nn.Module, cfg, path: str = "") -> nn.Module:
    """Give one layer LoRA in place. nn.Linear: the whole output, or the q/k/v row blocks named by
    `cfg.qkv_blocks` when the layer is a packed qkv projection (path ends with 'qkv'); nn.MultiheadAttention:
    the `cfg.qkv_blocks` row blocks of its packed in_proj_weight."""
    if isinstance(module, LoRALayer):
        raise PeftConfigError("already has LoRA (two target patterns match it)")
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        rows = None
        if path.split(".")[-1] == "qkv" and cfg.qkv_blocks:
            if module.out_features % 3:
                raise PeftConfigError(f"a qkv projection needs out_features divisible by 3, got {module.out_features}")
            d = module.out_features // 3
            rows = [("qkv".index(b) * d, ("qkv".index(b) + 1) * d) for b in cfg.qkv_blocks]
        return LoRALinear.wrap(module, cfg, rows)
    if type(module) is nn.MultiheadAttention:
        return LoRAMultiheadAttention.wrap(module, cfg, cfg.qkv_blocks or "qkv")
    raise PeftConfigError("LoRA applies to nn.Linear and nn.MultiheadAttention only")


def _inject_prefix(model, cfg):
    targets = []
    if "attn" in cfg.placements:
        blocks = sites.find_modules(model, sites.is_transformer_block, cfg.blocks, "MODEL.PEFT.PREFIX.BLOCKS")
        targets += [(f"{path}.attn", block.attn) for path, block in blocks]
    if "decoder_self_attn" in cfg.placements:
        key = "MODEL.PEFT.PREFIX.PLACEMENTS 'decoder_self_attn'"
        targets += sites.find_modules(model, sites.is_decoder_attention("self_attn"), ("*",), key)
    for path, module in targets:
        try:
            add_prefix(module, cfg)
        except PeftConfigError as e:
            raise PeftConfigError(f"prefix on module '{path}' ({type(module).__name__}): {e}") from None


def _inject_mopeft(model, cfg):
    """Gates in every backbone block that holds LoRA, prefix or adapter modules, wired to them."""
    wired = 0
    for _, block in sites.find_modules(model, sites.is_transformer_block, ("*",), "MODEL.PEFT.METHODS 'mopeft'"):
        loras = [m for _, m in block.named_modules() if isinstance(m, LoRALayer)]
        prefixed = getattr(type(block.attn), "peft_prefix", False)
        adapters = [m for _, m in block.named_modules() if isinstance(m, (SequentialAdapter, ParallelAdapter))]
        present = [name for name, has in zip(SUBMODULES, (loras, prefixed, adapters)) if has]
        if not present:
            continue
        _check_free(block, "mopeft_gates", "block")
        block.mopeft_gates = MoPEFTGates(sites.block_dim(block), present, cfg.init_bias).to(_param_device(block))
        block.register_forward_pre_hook(gates_pre_hook)
        for m in loras:
            m.attach_gate(block.mopeft_gates)
        for m in adapters:
            object.__setattr__(m, "peft_gate", block.mopeft_gates)
        if prefixed:
            object.__setattr__(block.attn, "peft_prefix_gate", block.mopeft_gates)
        wired += 1
    if not wired:
        raise PeftConfigError("MODEL.PEFT.METHODS 'mopeft': no transformer block holds LoRA, prefix or adapters")


def _inject_sfa(model, cfg, selection):
    if selection is None:
        raise PeftConfigError(
            "MODEL.PEFT.METHODS 'sfa' needs its internal selection: run peft_d2.tuners.sfa.select(model, cfg, loss_fn) "
            "on the base model (the trainer does it from MODEL.PEFT.SFA), or load an SFA adapter file"
        )
    budget = cfg.total_budget(model)
    cfg.budget = budget  # saved with the config: a reload plans the same adapters
    blocks, adapter_params = plan_external(model, cfg, budget)
    internal = sum(int(idx.numel()) for idx in selection.values())
    if internal + adapter_params > budget:
        raise PeftConfigError(
            f"MODEL.PEFT.SFA.BUDGET: {internal} internal + {adapter_params} adapter parameters exceed the "
            f"budget {budget}"
        )
    modules = dict(model.named_modules())
    for path, idx in selection.items():
        if type(modules.get(path)) is not nn.Linear:
            raise PeftConfigError(f"SFA selection names '{path}', which is no nn.Linear of the model")
        if idx.numel():
            SFALinear.wrap(modules[path], idx)
    adapter_cfg = AdapterConfig(num_per_site=1, bottleneck=cfg.adapter_bottleneck, placements=("mlp",))
    for path, block in blocks:
        attach_sequential_adapter(block.mlp, sites.block_dim(block), adapter_cfg, f"{path}.mlp")


def _inject_cobot(model, cfg):
    """One COBOT orchestrator at `model.cobot` over the slots of `cfg.enabled_on`, in module order: every LoRA
    row block, or every parallel adapter."""
    if cfg.enabled_on == "lora":
        layers = [m for _, m in lora_layers(model)]
        widths = {m.lora_r for m in layers}
        num_slots = sum(len(m.lora_row_blocks) for m in layers)
    else:
        layers = [m for _, m in model.named_modules() if isinstance(m, ParallelAdapter)]
        if not layers:
            raise PeftConfigError("MODEL.PEFT.COBOT.BASE_METHOD 'adapter' needs parallel adapters (ADAPTER.PLACEMENTS "
                                  "'parallel_mlp')")
        widths = {m.down.out_features for m in layers}
        num_slots = len(layers)
    if len(widths) != 1:
        raise PeftConfigError(f"COBOT needs slots of one width, found {sorted(widths)}")
    _check_free(model, "cobot", "(root)")
    model.cobot = CobotOrchestrator(num_slots, widths.pop()).to(_param_device(model))
    t = 0
    for m in layers:
        if cfg.enabled_on == "lora":
            n = len(m.lora_row_blocks)
            m.attach_cobot(model.cobot, range(t, t + n))
        else:
            n = 1
            m.attach_cobot(model.cobot, t, cfg.dropout)
        t += n


# ------------------------------------------------------------------------------------------ adapters
def _sequential_adapter_hook(module, args, output):
    if isinstance(output, tuple):  # e.g. nn.MultiheadAttention returns (output, weights)
        return (module.adapter(output[0]),) + tuple(output[1:])
    return module.adapter(output)


def _parallel_adapter_hook(module, args, output):
    return output + module.parallel_adapter(args[0])


def attach_sequential_adapter(sublayer: nn.Module, dim: int, cfg, path: str = "") -> SequentialAdapter:
    """Chain `cfg.num_per_site` adapters after `sublayer`'s output (its child `adapter`)."""
    _check_free(sublayer, "adapter", path)
    sublayer.adapter = SequentialAdapter(dim, cfg).to(_param_device(sublayer))
    sublayer.register_forward_hook(_sequential_adapter_hook)
    return sublayer.adapter


def attach_parallel_adapter(sublayer: nn.Module, dim: int, cfg, path: str = "") -> ParallelAdapter:
    """Add s * up(act(down(z))) of `sublayer`'s input z to its output (its child `parallel_adapter`)."""
    _check_free(sublayer, "parallel_adapter", path)
    sublayer.parallel_adapter = ParallelAdapter(dim, cfg).to(_param_device(sublayer))
    sublayer.register_forward_hook(_parallel_adapter_hook)
    return sublayer.parallel_adapter


HEAD_SITES = {  # placement -> (predicate, width of the site's output)
    "msdeform_attn": (sites.is_ms_deform_attn, lambda m: m.output_proj.out_features),
    "decoder_self_attn": (sites.is_decoder_attention("self_attn"), lambda m: m.embed_dim),
    "decoder_cross_attn": (sites.is_decoder_attention("multihead_attn"), lambda m: m.embed_dim),
}


def _inject_adapters(model, cfg):
    block_placements = [p for p in cfg.placements if p not in HEAD_SITES]
    if block_placements:
        blocks = sites.find_modules(model, sites.is_transformer_block, cfg.blocks, "MODEL.PEFT.ADAPTER.BLOCKS")
        for path, block in blocks:
            dim = sites.block_dim(block)
            for placement in block_placements:
                if placement == "attn":
                    attach_sequential_adapter(block.attn, dim, cfg, f"{path}.attn")
                elif placement == "mlp":
                    attach_sequential_adapter(block.mlp, dim, cfg, f"{path}.mlp")
                else:
                    attach_parallel_adapter(block.mlp, dim, cfg, f"{path}.mlp")
    for placement in cfg.placements:
        if placement in HEAD_SITES:
            predicate, width = HEAD_SITES[placement]
            key = f"MODEL.PEFT.ADAPTER.PLACEMENTS '{placement}'"
            for path, module in sites.find_modules(model, predicate, ("*",), key):
                attach_sequential_adapter(module, width(module), cfg, path)


def _check_free(module, name, path):
    if hasattr(module, name):
        raise PeftConfigError(f"module '{path}' ({type(module).__name__}) already has an attribute '{name}'")


def _param_device(module):
    p = next(module.parameters(), None)
    return p.device if p is not None else "cpu"


# --------------------------------------------------------------------------- freezing and reporting
def peft_parameter_names(model: nn.Module, buffers: bool = False) -> "OrderedDict[str, str]":
    """Parameter name -> PEFT method, for every parameter that a PEFT module added (with `buffers`: the
    buffers PEFT modules added instead, e.g. SFA's selected indices)."""
    out = OrderedDict()
    for path, module in model.named_modules():
        method = getattr(type(module), "peft_method", None)
        if method is None:
            continue
        prefix = f"{path}." if path else ""
        tensors = module.named_buffers if buffers else module.named_parameters
        if isinstance(module, (LoRALayer, SFALinear)):  # base layers with PEFT tensors of their own
            names = [n for n, _ in tensors(recurse=False) if n.startswith(("lora_", "sfa_"))]
        else:
            names = [n for n, _ in tensors()]
        for n in names:
            out.setdefault(prefix + n, method)
    return out


def mark_trainable(model: nn.Module, patterns=()) -> None:
    """requires_grad = True for PEFT parameters and base parameters matching a glob in `patterns`, False
    for the rest. Each pattern must match a parameter (the error lists the closest names)."""
    peft = peft_parameter_names(model)
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise PeftConfigError(
                f"MODEL.PEFT.TRAINABLE: pattern {pattern!r} matches no parameter; closest names: "
                f"{sites.closest([pattern], names)}"
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


def print_trainable_parameters(model: nn.Module) -> None:
    print(format_report(parameter_report(model)))


def lora_layers(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALayer)]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA (and SFA) update into its base weight (outputs unchanged up to float rounding)."""
    for _, m in lora_layers(model) + sfa_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model) + sfa_layers(model):
        m.unmerge()


def sfa_layers(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, SFALinear)]
