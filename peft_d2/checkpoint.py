"""Adapter-only checkpoints (the base stays where it is; see docs/design.md) and merged base exports.

An adapter file is safetensors: the PEFT tensors plus every other trainable tensor (heads, norms), and
string metadata: format, peft_d2 version, the PeftConfig as JSON, and a fingerprint of the base model (a
hash of its base parameter names and shapes). Loading checks the fingerprint, the names and the shapes
before it touches the model. Writes go to a temporary file in the same folder, then an atomic rename.
"""

import hashlib
import json
import os
import tempfile

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import PeftCheckpointError, PeftConfigError
from .inject import inject, peft_parameter_names
from .tuners import METHODS, PeftConfig, get_method

FORMAT = "peft_d2.adapter.v1"


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the sorted (name, shape) of the base parameters (PEFT parameters excluded)."""
    peft = peft_parameter_names(model)
    items = sorted(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if n not in peft)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def adapter_state_dict(model: nn.Module) -> dict:
    """The tensors an adapter checkpoint holds: PEFT parameters and buffers, trainable base parameters."""
    peft = peft_parameter_names(model)
    out = {n: p.detach() for n, p in model.named_parameters() if n in peft or p.requires_grad}
    peft_buffers = peft_parameter_names(model, buffers=True)
    out.update({n: b.detach() for n, b in model.named_buffers() if n in peft_buffers})
    return out


def save_adapter(model: nn.Module, path: str, extra_metadata: dict | None = None) -> str:
    """Write `model`'s adapter checkpoint to `path` atomically; returns the path."""
    config = getattr(model, "peft_config", None)
    if config is None:
        raise PeftCheckpointError(f"cannot save {path}: the model has no PEFT modules (call peft_d2.inject first)")
    tensors = {n: t.cpu().contiguous() for n, t in adapter_state_dict(model).items()}
    metadata = {
        "format": FORMAT,
        "peft_d2_version": __version__,
        "peft_config": json.dumps(config.to_dict()),
        "base_fingerprint": base_fingerprint(model),
        **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()},
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_adapter(path: str):
    """(tensors, metadata, config) of an adapter file, or a PeftCheckpointError naming the file."""
    if not os.path.isfile(path):
        raise PeftCheckpointError(f"adapter checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftCheckpointError(
            f"adapter checkpoint {path!r} is not a readable safetensors file (truncated or another format?): {e}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise PeftCheckpointError(
            f"adapter checkpoint {path!r} has format {metadata.get('format')!r}, expected {FORMAT!r} "
            "(write it with peft_d2.checkpoint.save_adapter)"
        )
    try:
        config = PeftConfig.from_dict(json.loads(metadata["peft_config"]))
    except PeftConfigError as e:  # e.g. a method of the user's own, not registered in this process
        raise PeftCheckpointError(f"adapter checkpoint {path!r}: {e}") from None
    return tensors, metadata, config


def load_adapter(model: nn.Module, path: str, check_base: bool = True) -> dict:
    """Load an adapter file into an injected `model`. Every check happens before any tensor is copied, so a
    mismatching file leaves the model untouched. Returns the file's metadata."""
    tensors, metadata, _ = read_adapter(path)
    if check_base and metadata.get("base_fingerprint") != base_fingerprint(model):
        raise PeftCheckpointError(
            f"adapter checkpoint {path!r} was made for another base model (fingerprint of base parameter "
            "names and shapes differs); pass check_base=False only if you know the bases are compatible"
        )
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = [k for k in tensors if k not in params]
    if unknown:
        raise PeftCheckpointError(f"adapter checkpoint {path!r} has tensors the model lacks: {unknown[:5]}")
    bad = [(k, tuple(t.shape), tuple(params[k].shape)) for k, t in tensors.items() if t.shape != params[k].shape]
    if bad:
        raise PeftCheckpointError(f"adapter checkpoint {path!r}: shape mismatch (name, file, model): {bad[:5]}")
    expected = [*peft_parameter_names(model), *peft_parameter_names(model, buffers=True)]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise PeftCheckpointError(f"adapter checkpoint {path!r} lacks PEFT tensors of the model: {missing[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    return metadata


def inject_from_checkpoint(model: nn.Module, path: str) -> dict:
    """Inject the PeftConfig stored in an adapter file into a plain base model, then load its tensors."""
    tensors, _, config = read_adapter(path)
    inputs = {f"{name}_{key}": value for name in config.methods
              for key, value in get_method(name).inputs_from_adapter_file(tensors).items()}
    report = inject(model, config, **inputs)
    load_adapter(model, path)
    return report


def merged_state_dict(model: nn.Module) -> dict:
    """A plain base state dict with the update of every mergeable method (`PeftMethod.mergeable`: LoRA, COBOT
    through LoRA, SFA) folded into its weight and PEFT tensors dropped; the model itself is not modified.
    Modules that add computation no base weight can absorb (adapters, prefixes, gates) are an error."""
    peft = peft_parameter_names(model)
    unmergeable = sorted({f"{n.rsplit('.', 2)[0]} ({m})" for n, m in peft.items() if not get_method(m).mergeable})
    if unmergeable:
        raise PeftCheckpointError(
            f"cannot merge: modules {unmergeable[:5]} add computation that no base weight can absorb "
            f"(mergeable methods: {sorted(n for n, m in METHODS.items() if m.mergeable)})"
        )
    peft_buffers = peft_parameter_names(model, buffers=True)
    state = {k: v for k, v in model.state_dict().items() if k not in peft and k not in peft_buffers}
    with torch.no_grad():
        for method in METHODS.values():
            if method.mergeable:
                for key, delta in method.merge_deltas(model).items():
                    state[key] = state[key] + delta.to(state[key].dtype)
    return state
