"""The vocabulary of places where PEFT modules go, found by type or by shape (duck typing).

A *transformer block* is any module with `attn` and `mlp` children and a `norm1` LayerNorm giving its width:
detectron2's ViT and Swin blocks, the official Mask2Former Swin block, SAM's and timm's blocks all qualify.
An *MSDeformAttn* is any module with `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`
linears and `n_heads`/`n_levels`/`n_points` attributes.
"""

import difflib
import fnmatch

import torch.nn as nn

from .errors import PeftConfigError

MSDA_LINEARS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")


def is_transformer_block(module: nn.Module, path: str = "") -> bool:
    children = dict(module.named_children())
    return (
        isinstance(children.get("attn"), nn.Module)
        and isinstance(children.get("mlp"), nn.Module)
        and isinstance(children.get("norm1"), nn.LayerNorm)
    )


def is_ms_deform_attn(module: nn.Module, path: str = "") -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in MSDA_LINEARS) and all(
        hasattr(module, a) for a in ("n_heads", "n_levels", "n_points")
    )


def is_decoder_attention(name: str):
    """Predicate factory: nn.MultiheadAttention modules whose attribute name is `name` (Mask2Former's
    decoder names them `self_attn` in self-attention layers and `multihead_attn` in cross-attention ones)."""

    def predicate(module, path):
        return isinstance(module, nn.MultiheadAttention) and path.rsplit(".", 1)[-1] == name

    return predicate


def block_dim(block: nn.Module) -> int:
    return block.norm1.normalized_shape[0]


def find_modules(model: nn.Module, predicate, patterns=("*",), key: str = "") -> list:
    """(path, module) for modules satisfying `predicate` whose path matches one of `patterns`, outermost
    first; a match's own children are not searched (blocks do not nest). Raises when nothing matches."""
    found, skip = [], []
    for path, module in model.named_modules():
        if any(path.startswith(s + ".") for s in skip):
            continue
        if predicate(module, path):
            skip.append(path)
            if any(fnmatch.fnmatchcase(path, p) for p in patterns):
                found.append((path, module))
    if not found:
        kinds = [p for p in skip] or [p for p, _ in model.named_modules() if p]
        raise PeftConfigError(
            f"{key or 'target'} {list(patterns)} matches no site in {type(model).__name__}; "
            f"closest candidates: {closest(patterns, kinds)}"
        )
    return found


def match_modules(model: nn.Module, patterns, key: str) -> list:
    """(path, module) for every module whose path matches one of the glob `patterns` (fnmatch). Each pattern
    must match at least one module; otherwise the error lists the closest real module names."""
    names = [p for p, _ in model.named_modules() if p]
    modules = dict(model.named_modules())
    found = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise PeftConfigError(
                f"{key}: pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"closest module names: {closest([pattern], names)}"
            )
        for n in hits:
            found[n] = modules[n]
    return list(found.items())


def closest(patterns, names, n: int = 5) -> list:
    """The real names nearest to the patterns (wildcards removed), for error messages."""
    out = []
    for p in patterns:
        stripped = p.replace("*", "").replace("?", "").strip(".")
        out += difflib.get_close_matches(stripped, names, n=n, cutoff=0.0)
        out += [x for x in names if stripped and stripped.split(".")[-1] in x][:n]
    seen = []
    for x in out:
        if x not in seen:
            seen.append(x)
    return seen[:n]
