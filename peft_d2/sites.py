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
        paths = skip or [p for p, _ in model.named_modules() if p]
        raise PeftConfigError(
            f"{key or 'target'} {list(patterns)} matches no site in {type(model).__name__}; "
            f"{suggest(patterns, paths, 'site' if skip else 'module')}"
        )
    return found


def match_modules(model: nn.Module, patterns, key: str) -> list:
    """(path, module) for every module whose path matches one of the glob `patterns` (fnmatch). Each pattern
    must match at least one module; otherwise the error suggests a near pattern that does (`suggest`)."""
    names = [p for p, _ in model.named_modules() if p]
    modules = dict(model.named_modules())
    found = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise PeftConfigError(
                f"{key}: pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"{suggest([pattern], names)}"
            )
        for n in hits:
            found[n] = modules[n]
    return list(found.items())


def suggest(patterns, names, noun: str = "module") -> str:
    """What to suggest for glob `patterns` that match none of `names` (dotted paths), for error messages.

    First the patterns one dotted part away that do match: each literal part in turn replaced by the nearest
    real parts (difflib over the parts of `names`), the pattern's wildcards kept, so that
    'backbone.layers.*.blocks.*.attn.qvk' gets 'backbone.layers.*.blocks.*.attn.qkv'. Otherwise the names
    nearest to the whole pattern (wildcards removed), or, when none is near, the top-level names."""
    repairs = {}
    for pattern in patterns:
        for ratio, fixed, hits in _repairs(pattern, names):
            repairs.setdefault(fixed, (ratio, hits))
    if repairs:
        best = sorted(repairs.items(), key=lambda kv: (-kv[1][0], -len(kv[1][1])))[:3]
        plural = noun + "s"
        options = [f"{fixed!r} ({len(hits)} {noun if len(hits) == 1 else plural}, e.g. {hits[0]})"
                   for fixed, (_, hits) in best]
        return f"did you mean {' or '.join(options)}?"
    near = []
    for pattern in patterns:
        stripped = pattern.replace("*", "").replace("?", "").strip(".")
        near += [x for x in difflib.get_close_matches(stripped, names, n=5) if x not in near]
    if near:
        return f"closest {noun} names: {near[:5]}"
    top = sorted({name.split(".")[0] for name in names})
    return f"no {noun} name is close; the top-level names are {top}"


def _repairs(pattern: str, names) -> list:
    """(similarity, repaired pattern, names it matches) for each pattern made from `pattern` by replacing one
    literal dotted part (wildcards around it kept) with a near real part, that matches some of `names`."""
    parts = pattern.split(".")
    vocabulary = sorted({part for name in names for part in name.split(".")})
    out = []
    for i, part in enumerate(parts):
        word = part.strip("*?")
        if not word or any(c in word for c in "*?[]"):
            continue
        head, tail = part[: part.index(word)], part[part.index(word) + len(word):]
        for real in difflib.get_close_matches(word, vocabulary, n=3):
            fixed = ".".join([*parts[:i], head + real + tail, *parts[i + 1:]])
            hits = [name for name in names if fnmatch.fnmatchcase(name, fixed)]
            if real != word and hits:
                out.append((difflib.SequenceMatcher(None, word, real).ratio(), fixed, hits))
    return out
