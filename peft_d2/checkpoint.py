"""Adapter-only checkpoints (the base stays where it is; see docs/design.md) and merged base exports.

An adapter file is safetensors: the PEFT tensors plus every other trainable tensor (heads, norms), and
string metadata: format, peft_d2 version, the PeftConfig as JSON, a fingerprint of the base model (a hash of
its base parameter names and shapes) and a digest of its values (hashes of a few frozen base tensors), so that
an adapter never loads silently onto another base of the same shapes. Loading checks the fingerprint, the
digest, the names and the shapes before it touches the model (`check_base=False`, or MODEL.PEFT.CHECK_BASE
False on the command line, skips the two base checks). Writes go to a temporary file in the same folder, then
an atomic rename.
"""

import hashlib
import json
import os
import shlex
import uuid

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


DIGESTED = 4  # frozen base tensors whose values an adapter file records
SKIP_CHECK = ("check_base=False in Python, MODEL.PEFT.CHECK_BASE False on the command line (tools/train_net.py, "
              "tools/merge_adapter.py), train.peft_check_base=False for tools/lazyconfig_train_net.py")


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def base_digest(model: nn.Module, exclude=()) -> dict:
    """{name: sha256 of its values as float32} of DIGESTED frozen base parameters, evenly spaced in name order,
    matrices rather than vectors (biases and norms often keep their initial constants). Left out: `exclude` (the
    tensors an adapter file holds, which training changes), PEFT tensors, and the parameters of layers a method
    converts in place (merging changes them)."""
    peft = peft_parameter_names(model)
    converted = {p for p, m in model.named_modules() if getattr(type(m), "peft_tensor_prefixes", None)}
    params = dict(model.named_parameters())
    names = sorted(n for n in params if n not in peft and n not in exclude and n.rpartition(".")[0] not in converted)
    names = [n for n in names if params[n].dim() > 1] or names
    picked = sorted({names[round(i * (len(names) - 1) / (DIGESTED - 1))] for i in range(DIGESTED)}) if names else []
    return {n: _tensor_digest(params[n]) for n in picked}


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
        "base_digest": json.dumps(base_digest(model, exclude=tensors)),
        **({"base_config": json.dumps(model.peft_base_config)} if hasattr(model, "peft_base_config") else {}),
        **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()},
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str, write) -> str:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`: a kill never leaves half a file,
    and a failed write keeps the old one. `write` creates the file with open()'s mode, 0666 less the umask (0644
    as a rule), as detectron2's PathManager does, so that another user's serving process can read it (mkstemp's
    files are 0600). Returns `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_json(path: str, data) -> str:
    """json.dump(data) into `path` through `atomic_write` (a reader never sees half a file)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f)

    return atomic_write(path, write)


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


def _shape_differences(model: nn.Module, tensors: dict) -> str:
    """A sentence naming the file's tensors whose shapes differ from the model's ("" when none does)."""
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    shapes = [f"{k} {tuple(t.shape)} in the file, {tuple(params[k].shape)} here"
              for k, t in tensors.items() if k in params and t.shape != params[k].shape]
    more = f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else ""
    return f"Tensor shapes differ: {'; '.join(shapes[:3])}{more}.\n" if shapes else ""


def _config_differences(model: nn.Module, metadata: dict, most: int = 8) -> str:
    """Sentences naming the config values (MODEL.*) of the run that made the file that differ from those
    `model` was built with, and the KEY VALUE overrides that build the file's base ("" when unknown or none
    differ). peft_d2's builders keep these values on the model (`peft_base_config`); save_adapter records them."""
    theirs, ours = json.loads(metadata.get("base_config", "{}")), getattr(model, "peft_base_config", {})
    keys = [k for k in theirs if k in ours and theirs[k] != ours[k]]
    if not keys:
        return ""
    more = ""
    if len(keys) > most:
        more = f" (and {len(keys) - most} more: see the config.yaml of the run that made the file)"
    values = "; ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in keys[:most])
    overrides = " ".join(f"{k} {shlex.quote(str(theirs[k]))}" for k in keys[:most])
    return (f"The run that made the file had other config values: {values}{more}.\nTo build and load that base, add "
            f"these KEY VALUE overrides to the command line: {overrides}\n")


def _check_base(model: nn.Module, path: str, metadata: dict, tensors: dict) -> None:
    """The base fingerprint (names and shapes) and digest (values) of the file against `model`'s (plain or
    injected: the base tensors are the same). The error says what differs, as far as the file tells: the shapes
    of its own tensors, the config values of the run that made it."""
    if metadata.get("base_fingerprint") != base_fingerprint(model):
        raise PeftCheckpointError(
            f"adapter checkpoint {path!r} was made for another base model: the names or shapes of its base "
            f"parameters differ from this model's.\n{_shape_differences(model, tensors)}"
            f"{_config_differences(model, metadata)}Only if you know the bases are compatible, skip the check: "
            f"{SKIP_CHECK}"
        )
    params = dict(model.named_parameters())
    digest = json.loads(metadata.get("base_digest", "{}"))  # files written before the digest existed have none
    differ = [n for n, h in digest.items() if n not in params or _tensor_digest(params[n]) != h]
    if differ:
        found = _config_differences(model, metadata) or "Load that base's weights (MODEL.WEIGHTS) before the adapter.\n"
        raise PeftCheckpointError(
            f"adapter checkpoint {path!r} was made for another base model: names and shapes match, but the values "
            f"of base tensors {differ} differ from those of the base it was trained on.\n{found}Only if this base "
            f"is the right one (e.g. the same weights converted), skip the check: {SKIP_CHECK}"
        )


def load_adapter(model: nn.Module, path: str, check_base: bool = True) -> dict:
    """Load an adapter file into an injected `model`. Every check happens before any tensor is copied, so a
    mismatching file leaves the model untouched. Returns the file's metadata."""
    tensors, metadata, _ = read_adapter(path)
    if check_base:
        _check_base(model, path, metadata, tensors)
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


def inject_from_checkpoint(model: nn.Module, path: str, check_base: bool = True) -> dict:
    """Inject the PeftConfig stored in an adapter file into a plain base model (its weights loaded), then load
    its tensors. The base is checked before the model changes."""
    tensors, metadata, config = read_adapter(path)
    if check_base:
        _check_base(model, path, metadata, tensors)  # before the model changes
    inputs = {f"{name}_{key}": value for name in config.methods
              for key, value in get_method(name).inputs_from_adapter_file(tensors).items()}
    report = inject(model, config, **inputs)
    load_adapter(model, path, check_base=False)
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
