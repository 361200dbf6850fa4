"""One frozen base, many adapters: serve several adapter files from one model, routed per image.

    model = build_base_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS); model.eval()
    peft_d2.load_adapters(model, {"cells": "cells.safetensors", "roads": "roads.safetensors"})
    model([{"image": a, "adapter": "cells"}, {"image": b, "adapter": "roads"}, {"image": c}])  # c: the base
    peft_d2.set_adapter(model, "roads")          # images that name no adapter use "roads" (model-wide)
    with peft_d2.use_adapter(model, "cells"):    # ... or "cells", in this thread only
        model(batch)
    with peft_d2.disable_adapters(model):        # the base alone, in this thread only
        model(batch)

Concurrency: what one forward pass routes is decided by its inputs and by `route`, `use_adapter` and
`disable_adapters` blocks, all held in context variables: per thread (and asyncio task), so threads serving
requests at once never see each other's choices. `set_adapter` and `load_adapters` change the model itself, for
every thread: call them before serving.

Each file is checked against the base (its fingerprint) by injecting it, with `peft_d2.inject`, into a copy of
the base that shares the base's tensors; from that copy the serving model keeps only each adapter's own
modules (LoRA factors, adapter units) and the per-adapter values of trainable head linears. One forward hook
per site then adds, for the rows of each adapter present in the batch, exactly what that adapter's single
model computes there, so a mixed batch equals running each image through its own model (tested to 1e-5).
Images of one adapter are taken together (index_select / index_copy), so a batch with K adapters costs one
base pass plus each adapter's own small computations.

LoRA and DoRA on a layer add to its output, from the layer's input (DoRA: y + (f - 1)(y - b) + f s B A x, with the
factor f = m / ||W + dW|| computed once at loading: served adapters are frozen), except on a detectron2 Conv2d
with a norm or an activation, whose routed images run the convolution again with the update, then the norm and
the activation (the update must go in before them).

Which rows belong to which image: inside transformer blocks and MSDeformAttn modules tensors are batch-major
with the rows of one image contiguous (Swin windows included); nn.MultiheadAttention says so through
`batch_first`; in Mask2Former's predictor the decoder layers are (queries, batch, C) and the class and mask
heads (batch, queries, C); any other routed site must have the batch as its first dimension (checked on every
call: an ambiguous shape is an error, never a silent mix).

Mona acts on a block's residual sums, which no module outputs: a block of the serving model where some adapter has
Mona takes the Mona forward (tuners/mona.py) with identity modules at those places, and their outputs are routed
as an adapter's are (identity for the other images, so the base's computation is unchanged).

Prefix tuning changes the attention's key length, so an attention layer that holds prefixes runs once per
group of images that share a prefix (or have none: the base computation), each group with the route narrowed
to its images, and the outputs are put back in batch order (attention weights, when asked for, are returned
only when the batch was one group). MoPEFT gates and SFA's internal weights are refused when loading (the
error says why).
"""

import contextlib
import contextvars
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import sites
from .checkpoint import inject_from_checkpoint, read_adapter
from .errors import PeftCheckpointError, PeftConfigError
from .inject import peft_parameter_names
from .tuners.adapter import _parallel_adapter_hook, _sequential_adapter_hook
from .tuners.lora import LoRALayer, lora_conv_forward
from .tuners.mona import routing_slot
from .tuners.prefix import _FORWARDS, attention_kind

_ROUTE = contextvars.ContextVar("peft_d2_route", default=None)  # the _Route of the forward pass under way
ROUTABLE_METHODS = ("lora", "adapter", "cobot", "prefix", "mona")
HOOKS = {_sequential_adapter_hook: ("adapter", "adapter"), _parallel_adapter_hook: ("parallel", "parallel_adapter")}
REFUSED = {
    "mopeft": "MoPEFT gates are read by modules of every adapter at once",
    "sfa": "SFA changes base weights entry by entry (its internal adapters)",
}


class _Route:
    """Image n of the forward pass uses adapter names[slots[n]] (slot -1: the base). The images of each slot and
    their rows at each site's row count are computed once per pass, not at every site."""

    def __init__(self, slots: torch.Tensor, names: list):
        self.slots, self.names = slots, names
        self.groups = {s: torch.nonzero(slots == s).flatten() for s in torch.unique(slots).tolist()}
        self._rows = {}

    def rows(self, slot, n_rows, device):
        key = (slot, n_rows, device)
        if key not in self._rows:
            self._rows[key] = _rows(self.groups[slot], n_rows, len(self.slots), device)
        return self._rows[key]

    def narrowed(self, images):
        return _Route(self.slots[images], self.names)


class LoRABranch(nn.Module, LoRALayer):
    """The LoRA factors of one layer of one adapter, computing `lora_result` exactly as the layer did in eval.
    A served adapter is frozen, so DoRA's factor m / ||W + dW|| is computed once, here."""

    def __init__(self, layer: LoRALayer):
        super().__init__()
        if layer.__dict__.get("lora_gate") is not None:
            raise PeftConfigError("a MoPEFT-gated LoRA cannot be routed per image")
        self.lora_A, self.lora_B = layer.lora_A, layer.lora_B
        self.lora_row_blocks, self.lora_r, self.lora_scaling = layer.lora_row_blocks, layer.lora_r, layer.lora_scaling
        self.lora_conv, self.lora_dora = layer.lora_conv, layer.lora_dora
        self.lora_dropout, self.lora_merged = nn.Identity(), False
        self.lora_shape = tuple(layer._lora_weight().shape)
        if layer.__dict__.get("lora_cobot") is not None:
            object.__setattr__(self, "lora_cobot", layer.lora_cobot)
            self.lora_slots = layer.lora_slots
        if layer.lora_dora:
            with torch.no_grad():
                self.register_buffer("dora_factor", layer.lora_dora_factor().detach(), persistent=False)
                bias = layer._lora_bias()
                self.register_buffer("dora_bias", None if bias is None else bias.detach().clone(), persistent=False)

    def _lora_weight(self):  # only its shape is read by lora_result
        return torch.empty(self.lora_shape, device="meta")

    def lora_dora_factor(self):
        return self.dora_factor

    def _lora_bias(self):
        return self.dora_bias


class RoutedSite(nn.Module):
    """Every adapter's computations at one module: `ops[name]` is that adapter's list, applied in order."""

    def __init__(self, batch_dim):
        super().__init__()
        self.batch_dim = batch_dim  # 0, 1, or None (the batch must be the first dimension, checked per call)
        self.ops = nn.ModuleDict()
        self.kinds = {}
        self.mha_weights = {}

    def add(self, name, kind, module):
        if name not in self.ops:
            self.ops[name] = nn.ModuleList()
            self.kinds[name] = []
        self.ops[name].append(module)
        self.kinds[name].append(kind)

    def fused_lora(self, x):
        """For an MSDeformAttn value_proj under routing: (z, stacked lora_B, scaling, adapter_index) for the fused
        operator (peft_d2.ops.ms_deform_attn_lora), entry 0 a zero LoRA for images on the base; None when an
        adapter present here is anything but one fusable LoRA, or the ranks differ (the unfused path then runs)."""
        route = _ROUTE.get()
        if route is None:
            return None
        slots, names = route.slots, route.names
        present = [s for s in route.groups if s >= 0 and names[s] in self.ops]
        branches = [self.ops[names[s]][0] for s in present]
        if not present or any(self.kinds[names[s]] != ["lora"] for s in present):
            return None
        if any(not b.lora_fusable() for b in branches) or len({b.lora_r for b in branches}) != 1:
            return None
        r = branches[0].lora_r
        z = x.new_zeros(*x.shape[:-1], r)
        index = torch.zeros(len(slots), dtype=torch.long)
        for k, (slot, branch) in enumerate(zip(present, branches), start=1):
            images = route.groups[slot]
            index[images] = k
            z[images.to(x.device)] = branch.lora_down(x[images.to(x.device)]).to(z.dtype)
        lora_B = torch.stack([torch.zeros_like(branches[0].lora_B[0])] + [b.lora_B[0] for b in branches])
        scaling = torch.tensor([0.0] + [float(b.lora_scaling) for b in branches], dtype=x.dtype, device=x.device)
        return z, lora_B.to(x.dtype), scaling, index.to(x.device)


def _route_hook(module, args, kwargs, output):
    route = _ROUTE.get()
    if route is None:
        return output
    site = module.peft_routes
    first = output[0] if isinstance(output, tuple) else output
    dim = _batch_dim(site, first, len(route.slots), module)
    new = None
    for slot, images in route.groups.items():
        if slot < 0 or route.names[slot] not in site.ops:
            continue
        name = route.names[slot]
        rows = route.rows(slot, first.shape[dim], first.device)
        whole = len(images) == len(route.slots)  # one adapter for the whole batch: no gathering
        pick = (lambda t: t) if whole else (lambda t: t.index_select(dim, rows))  # noqa: B023
        out = pick(first)
        for kind, op in zip(site.kinds[name], site.ops[name]):
            if kind == "lora":
                out = op.lora_result(out, pick(args[0]))
            elif kind == "lora_conv":  # detectron2 Conv2d: the update joins the convolution before norm, activation
                out = lora_conv_forward(module, pick(args[0]), op)
            elif kind == "lora_mha":
                out = _mha_rows(module, args, kwargs, rows, site.mha_weights[name])
            elif kind == "head":
                out = F.linear(pick(args[0]), op.weight, op.bias)
            elif kind == "adapter":
                out = op(out)
            else:  # parallel adapter
                out = out + op(pick(args[0]))
        if whole:
            return (out, *output[1:]) if isinstance(output, tuple) else out
        new = first.clone() if new is None else new
        new.index_copy_(dim, rows, out)
    if new is None:
        return output
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _batch_dim(site, tensor, n_images, module):
    if site.batch_dim is not None:
        return site.batch_dim
    if tensor.shape[0] != n_images or (tensor.dim() > 1 and tensor.shape[1] == n_images):
        raise RuntimeError(
            f"peft_d2 routing: cannot tell which rows of {type(module).__name__} output {tuple(tensor.shape)} "
            f"belong to which of the {n_images} images; serve this batch with one adapter (set_adapter)"
        )
    return 0


def _rows(images, n_rows, n_images, device):
    """Rows of the given images when each image owns n_rows / n_images contiguous rows."""
    if n_rows % n_images:
        raise RuntimeError(f"peft_d2 routing: {n_rows} rows are not a multiple of the {n_images} images")
    per = n_rows // n_images
    return (images[:, None] * per + torch.arange(per, device=images.device)).flatten().to(device)


def _mha_rows(mha, args, kwargs, rows, in_proj_weight):
    """nn.MultiheadAttention's output for some images, with a given in_proj_weight (LoRA folded in)."""
    picked = _select_mha_inputs(mha, _bind_mha(args, kwargs), rows)
    q, k, v = (picked[n] for n in ("query", "key", "value"))
    if mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, _ = F.multi_head_attention_forward(
        q, k, v, mha.embed_dim, mha.num_heads, in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
        mha.add_zero_attn, mha.dropout, mha.out_proj.weight, mha.out_proj.bias, training=mha.training,
        key_padding_mask=picked.get("key_padding_mask"), need_weights=False, attn_mask=picked.get("attn_mask"),
    )
    return out.transpose(0, 1) if mha.batch_first else out


def _bind_mha(args, kwargs):
    """nn.MultiheadAttention.forward's arguments by name."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    return {**dict(zip(names, args)), **kwargs}


def _select_mha_inputs(mha, bound, rows):
    """The arguments of nn.MultiheadAttention (bound by name) restricted to some images' rows."""
    dim = 0 if mha.batch_first else 1
    picked = {**bound, **{n: bound[n].index_select(dim, rows) for n in ("query", "key", "value")}}
    if bound.get("key_padding_mask") is not None:
        picked["key_padding_mask"] = bound["key_padding_mask"].index_select(0, rows)
    mask = bound.get("attn_mask")
    if mask is not None and mask.dim() == 3:  # (N * heads, L, S): the heads of image n are rows n*h .. n*h+h-1
        h = mha.num_heads
        picked["attn_mask"] = mask.index_select(0, (rows[:, None] * h + torch.arange(h, device=rows.device)).flatten())
    return picked


def _routed_prefix_forward(self, *args, **kwargs):
    """The attention of a serving model whose adapters hold prefixes here: each group of images (one adapter's
    prefix, or none) runs its own computation (prefix.py's forward, or the module's own) with the route
    narrowed to its images."""
    own = type(self).__mro__[1].forward
    route = _ROUTE.get()
    if route is None:
        return own(self, *args, **kwargs)
    slots, names = route.slots, route.names
    keys = [names[s] if s >= 0 and names[s] in self.peft_prefixes else None for s in slots.tolist()]
    groups = {k: torch.tensor([i for i, x in enumerate(keys) if x == k], dtype=torch.long) for k in dict.fromkeys(keys)}

    def run(key, a, kw):
        if key is None:
            return own(self, *a, **kw)
        object.__setattr__(self, "prefix", self.peft_prefixes[key])
        try:
            return _FORWARDS[self.peft_prefix_kind](self, *a, **kw)
        finally:
            del self.__dict__["prefix"]

    if len(groups) == 1:
        return run(keys[0], args, kwargs)
    if self.peft_prefix_kind == "mha":
        bound = _bind_mha(args, kwargs)
        first, dim = bound["query"], 0 if self.batch_first else 1
    else:  # x: (B, H, W, C) or (B * windows, N, C), the rows of each image contiguous; a window mask is per window
        bound = {**dict(zip(("x", "mask"), args)), **kwargs}
        first, dim = bound["x"], 0
    out = None
    for key, images in groups.items():
        rows = _rows(images, first.shape[dim], len(slots), first.device)
        token = _ROUTE.set(route.narrowed(images))
        try:
            if self.peft_prefix_kind == "mha":
                picked = _select_mha_inputs(self, bound, rows)
            else:
                picked = {**bound, "x": bound["x"].index_select(0, rows)}
            part = run(key, (), picked)
        finally:
            _ROUTE.reset(token)
        if isinstance(part, tuple):  # nn.MultiheadAttention: (output, weights); weights differ in key length
            part = part[0]
        out = part.new_empty(first.shape[: dim + 1] + part.shape[dim + 1 :]) if out is None else out
        out.index_copy_(dim, rows.to(out.device), part)
    return (out, None) if self.peft_prefix_kind == "mha" else out  # no attention weights across groups


# ------------------------------------------------------------------------------------------ loading
def _shared_copy(model, own: set):
    """A copy of the module tree whose parameters and buffers share storage with `model`'s, except the
    parameters named in `own` (those an adapter file overwrites), which are copied."""
    memo = {id(p): nn.Parameter(p.data.clone() if n in own else p.data, requires_grad=False)
            for n, p in model.named_parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _batch_dims(model):
    """Module path -> batch dimension, for modules whose layout is known (see the module docstring)."""
    dims = {}
    batch_first = [p for p, m in model.named_modules() if sites.is_transformer_block(m) or sites.is_ms_deform_attn(m)]
    sequence_first = []
    for path, m in model.named_modules():  # Mask2Former's predictor: (Q, N, C) layers, (N, Q, C) prediction heads
        if all(hasattr(m, a) for a in ("class_embed", "mask_embed", "transformer_ffn_layers")):
            prefix = f"{path}." if path else ""
            batch_first += [prefix + "class_embed", prefix + "mask_embed"]
            sequence_first += [prefix + a for a in ("transformer_self_attention_layers",
                                                    "transformer_cross_attention_layers", "transformer_ffn_layers")]

    def under(path, roots):
        return any(path == r or path.startswith(r + ".") for r in roots)

    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            dims[path] = 0 if m.batch_first else 1
        elif under(path, batch_first):
            dims[path] = 0
        elif under(path, sequence_first):
            dims[path] = 1
    return dims


def load_adapters(model: nn.Module, paths: dict, check_base: bool = True) -> dict:
    """Load adapter files {name: path}, all made for `model`'s base (a plain, un-injected model with its base
    weights), for routing per image. Returns {name: PeftConfig}. Nothing changes in `model` when a file is
    refused (wrong base, a method that cannot be routed, heads of another shape). `check_base=False` skips the
    base checks (peft_d2.checkpoint.load_adapter)."""
    if getattr(model, "peft_config", None) is not None:
        raise PeftConfigError("load_adapters expects the plain base model (it has PEFT modules injected)")
    existing = getattr(model, "peft_adapters", {})
    clash = sorted(set(paths) & set(existing))
    if clash:
        raise PeftConfigError(f"adapters {clash} are already loaded")
    base_params = dict(model.named_parameters())
    dims = _batch_dims(model)
    modules = dict(model.named_modules())
    plans, configs = [], {}
    for name, path in paths.items():
        tensors, _, config = read_adapter(path)
        refused = [m for m in config.methods if m not in ROUTABLE_METHODS]
        if refused:
            raise PeftCheckpointError(f"adapter {name!r} ({path}) uses {refused}, which cannot be routed per image: "
                                      + "; ".join(REFUSED.get(m, "not supported") for m in refused))
        view = _shared_copy(model, set(tensors))
        inject_from_checkpoint(view, path, check_base)  # checks the base (fingerprint, digest), names and shapes
        view.eval()
        peft = peft_parameter_names(view)
        ops = []
        for p, m in view.named_modules():
            if getattr(type(m), "peft_prefix", False):
                if isinstance(m, LoRALayer):
                    raise PeftCheckpointError(f"adapter {name!r} ({path}) has a prefix and LoRA on the attention "
                                              f"'{p}': they cannot be routed together")
                ops.append((p, "prefix", m.prefix))
            if getattr(type(m), "peft_mona", False):
                ops += [(f"{p}.{attr}", "mona", m._modules[attr]) for attr in ("mona_attn", "mona_mlp")
                        if attr in m._modules]
            if isinstance(m, LoRALayer):
                if isinstance(m, nn.MultiheadAttention):
                    ops.append((p, "lora_mha", m.lora_adapted_weight().detach()))
                elif getattr(m, "norm", None) is not None or getattr(m, "activation", None) is not None:
                    ops.append((p, "lora_conv", LoRABranch(m)))
                else:
                    ops.append((p, "lora", LoRABranch(m)))
        for p, m in view.named_modules():  # in the order of the module's hooks, which is the order they run in
            for hook in m._forward_hooks.values():
                if hook in HOOKS:
                    kind, attr = HOOKS[hook]
                    ops.append((p, kind, m._modules[attr]))
        heads = {}
        for pname, p in view.named_parameters():
            if pname in peft or not p.requires_grad:
                continue
            if torch.equal(p.detach(), base_params[pname].detach()):
                continue
            owner, _, leaf = pname.rpartition(".")
            if type(modules[owner]) is not nn.Linear or leaf not in ("weight", "bias"):
                raise PeftCheckpointError(
                    f"adapter {name!r} ({path}) changes the base parameter '{pname}' of a "
                    f"{type(modules[owner]).__name__}; only trainable nn.Linear heads can be routed per image"
                )
            heads[owner] = view.get_submodule(owner)
        ops += [(p, "head", m) for p, m in heads.items()]
        if getattr(view, "cobot", None) is not None:
            ops.append(("", "keep", view.cobot))  # referenced by the adapter's LoRA branches or parallel adapters
        plans.append((name, ops))
        configs[name] = config
    for name, ops in plans:
        for path, kind, op in ops:
            _add_op(model, modules, dims, name, path, kind, op)
    model.peft_adapters = {**existing, **{n: c for n, c in configs.items()}}
    if not hasattr(model, "peft_active_adapter"):
        model.peft_active_adapter = None
        model.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
        model.register_forward_hook(_root_hook, always_call=True)
    return configs


def _add_op(model, modules, dims, name, path, kind, op):
    if kind == "keep":
        if not hasattr(model, "peft_kept"):
            model.peft_kept = nn.ModuleDict()
        model.peft_kept[name] = op
        return
    if kind == "mona":  # an identity in the base's block, its output replaced per image by each adapter's Mona
        block, _, attr = path.rpartition(".")
        modules[path], dims[path], kind = routing_slot(modules[block], attr), 0, "adapter"  # (B, H, W, C)
    module = modules[path]
    if kind == "prefix":
        if not hasattr(module, "peft_prefixes"):
            module.peft_prefix_kind = attention_kind(module)
            module.__class__ = _routed_prefix_class(type(module))
            module.peft_prefixes = nn.ModuleDict()
        module.peft_prefixes[name] = op
        return
    if not hasattr(module, "peft_routes"):
        module.peft_routes = RoutedSite(dims.get(path))
        module.register_forward_hook(_route_hook, with_kwargs=True)
    site = module.peft_routes
    if kind == "lora_mha":
        site.mha_weights[name] = op
        op = nn.Identity()
    site.add(name, kind, op)


_ROUTED_PREFIX_CLASSES = {}


def _routed_prefix_class(base: type) -> type:
    """RoutedPrefix<Base>: the module's own class with the grouping forward (_routed_prefix_forward)."""
    if base not in _ROUTED_PREFIX_CLASSES:
        forward = {"forward": _routed_prefix_forward}
        _ROUTED_PREFIX_CLASSES[base] = type(f"RoutedPrefix{base.__name__}", (base,), forward)
    return _ROUTED_PREFIX_CLASSES[base]


# ------------------------------------------------------------------------------------------ routing
# Everything a forward pass reads to route its images lives in context variables: per thread and per asyncio task,
# like the route itself, so requests served in threads never see each other's choices. Models are keyed by id().
_DISABLED = contextvars.ContextVar("peft_d2_disabled", default=frozenset())  # models inside disable_adapters
_DEFAULTS = contextvars.ContextVar("peft_d2_defaults", default=())  # (model, adapter) of use_adapter blocks
_PASSES = contextvars.ContextVar("peft_d2_passes", default=())  # per root forward under way: its _ROUTE token
_KEEP = object()  # the pre-hook leaves the route as it is (e.g. tensors under `route`)


def _root_pre_hook(model, args, kwargs):
    _PASSES.set((*_PASSES.get(), None))  # popped by _root_hook, which runs even when this hook raises
    route = _request_route(model, args[0] if args else next(iter(kwargs.values()), None))
    if route is not _KEEP:
        _PASSES.set((*_PASSES.get()[:-1], _ROUTE.set(route)))
    return None


def _request_route(model, inputs):
    """The _Route of a forward pass on `inputs` (None: the base alone; _KEEP: the route already set)."""
    if id(model) in _DISABLED.get():
        return None
    defaults = dict(_DEFAULTS.get())  # the innermost block last
    default = defaults[id(model)] if id(model) in defaults else model.peft_active_adapter
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, dict) for x in inputs):
        wanted = [x.get("adapter", default) for x in inputs]
    elif default is not None and torch.is_tensor(inputs):
        wanted = [default] * inputs.shape[0]
    else:
        return _KEEP
    return _route_of(model, wanted)


def _root_hook(model, args, output):
    passes = _PASSES.get()
    if passes:
        _PASSES.set(passes[:-1])
        if passes[-1] is not None:
            _ROUTE.reset(passes[-1])
    return output


def _route_of(model, wanted) -> "_Route":
    """The _Route of images that want these adapters (None: the base); an adapter not loaded is a KeyError."""
    _check_loaded(model, wanted)
    names = list(model.peft_adapters)
    return _Route(torch.tensor([-1 if w is None else names.index(w) for w in wanted], dtype=torch.long), names)


def _check_loaded(model, names):
    loaded = list(getattr(model, "peft_adapters", {}))
    unknown = sorted({n for n in names if n is not None and n not in loaded})
    if unknown:
        raise KeyError(f"adapter(s) {unknown} are not loaded; loaded: {loaded}")


@contextlib.contextmanager
def route(model: nn.Module, adapters: list):
    """Route a forward pass whose inputs are not detectron2 dicts (e.g. a backbone on an (N, C, H, W)
    tensor): image n uses adapters[n] (None: the base). In this thread (or asyncio task) only."""
    token = _ROUTE.set(_route_of(model, adapters))
    try:
        yield
    finally:
        _ROUTE.reset(token)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """The model's default adapter, for images that name none (None: the base), in every thread: a setting of
    the served model, made before serving. To choose per request while other threads serve, name the adapter in
    the inputs, or use `use_adapter` / `route`."""
    _check_loaded(model, [name])
    model.peft_active_adapter = name


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """Inside the block, and in this thread (or asyncio task) only, images that name no adapter use `name`
    (None: the base) instead of the model's default (`set_adapter`). Blocks nest."""
    _check_loaded(model, [name])
    token = _DEFAULTS.set((*_DEFAULTS.get(), (id(model), name)))
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base alone inside the block, whatever the inputs name, in this thread (or asyncio task) only:
    other threads keep their routing. Blocks nest (the state before the block comes back when it exits)."""
    disabled = _DISABLED.set(_DISABLED.get() | {id(model)})
    token = _ROUTE.set(None)
    try:
        yield
    finally:
        _ROUTE.reset(token)
        _DISABLED.reset(disabled)
