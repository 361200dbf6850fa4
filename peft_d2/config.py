"""`add_peft_config(cfg)`: the MODEL.PEFT node of a detectron2 config, its defaults and validation.

The node is built from the registry: the general keys below, one OPTIM learning rate and weight decay per
optimizer group of the registered methods, and one sub-node per method made from its config dataclass's
fields (key, default, doc). `python -m peft_d2.config` prints the key table the README carries.

`merge_config` is the one loader of the tools' YAML configs: detectron2's `_BASE_` inheritance, where a base may
also be a config of detectron2's model zoo (`_BASE_: "model_zoo://COCO-InstanceSegmentation/..."`), and errors
that name the key and the file.
"""

import argparse
import difflib
import json
import logging
import os

import yaml
from detectron2.config import CfgNode as CN

from .errors import PeftConfigError
from .tuners import METHODS, PeftConfig, config_keys

GENERAL_KEYS = (  # (key, default, doc)
    ("METHODS", [], "methods to inject, any of the registered ones ({methods}); empty: no PEFT"),
    ("BASE_META_ARCHITECTURE", "GeneralizedRCNN",
     "with `MODEL.META_ARCHITECTURE: \"PEFT\"`: the meta-architecture that is built and adapted"),
    ("BASE_BACKBONE", "build_resnet_backbone",
     "with `MODEL.BACKBONE.NAME: \"PEFTBackbone\"`: the backbone that is built and adapted (alone)"),
    ("WEIGHTS", "", "an adapter file (safetensors from peft_d2) loaded after `MODEL.WEIGHTS`"),
    ("TRAINABLE", [], "glob patterns over base parameter names that stay trainable (heads, `*norm*`, `*.bias`)"),
    ("FULL_CHECKPOINTS", False, "training checkpoints hold whole models instead of the trainable tensors"),
    ("CHECK_BASE", True, "an adapter file must fit the base it is loaded onto: names, shapes and a digest of a few "
     "frozen tensors' values; False skips both checks (a base you know is the right one)"),
)
HEAD_LR_DOC = "learning rate of the trainable base parameters (`TRAINABLE`); 0: `SOLVER.BASE_LR`"


def optim_groups() -> list:
    """The optimizer groups of the registered methods, in registration order (e.g. ["lora", "adapter"])."""
    return list(dict.fromkeys(m.optim_group for m in METHODS.values()))


def _yacs(value):
    return list(value) if isinstance(value, tuple) else value


def add_peft_config(cfg: CN) -> CN:
    """Add MODEL.PEFT with its defaults to `cfg` (in place; returns it). `key_table()` documents every key."""
    cfg.MODEL.PEFT = CN()
    for key, default, _ in GENERAL_KEYS:
        cfg.MODEL.PEFT[key] = _yacs(default)
    cfg.MODEL.PEFT.OPTIM = CN()
    for group in optim_groups():
        cfg.MODEL.PEFT.OPTIM[f"{group.upper()}_LR"] = 0.0
        cfg.MODEL.PEFT.OPTIM[f"{group.upper()}_WEIGHT_DECAY"] = 0.0
    cfg.MODEL.PEFT.OPTIM.HEAD_LR = 0.0
    for method in METHODS.values():
        node = cfg.MODEL.PEFT[method.node] = CN()
        for _, key, default, _ in config_keys(method):
            node[key] = _yacs(default)
    return cfg


def _coerce(value, default, key: str):
    """`value` as the type of `default`, or a PeftConfigError naming `key`."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise PeftConfigError(f"{key} must be True or False, got {value!r}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise PeftConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PeftConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise PeftConfigError(f"{key} must be a string, got {value!r}")
        return value
    if not isinstance(value, (list, tuple)):
        raise PeftConfigError(f"{key} must be a list, got {value!r}")
    return type(default)(value)


def peft_config_from_cfg(cfg: CN) -> PeftConfig:
    """The PeftConfig that MODEL.PEFT describes; raises PeftConfigError naming the key at fault."""
    p = cfg.MODEL.PEFT
    if not isinstance(p.METHODS, (list, tuple)):
        raise PeftConfigError(f"MODEL.PEFT.METHODS must be a list of method names, got {p.METHODS!r}")
    configs = {}
    for name, method in METHODS.items():
        node = p.get(method.node)
        if node is None:
            raise PeftConfigError(f"MODEL.PEFT.{method.node} is missing: build the config with add_peft_config "
                                  f"after registering method {name!r}")
        values = {field: _coerce(node[key], default, f"MODEL.PEFT.{method.node}.{key}")
                  for field, key, default, _ in config_keys(method)}
        configs[name] = method.config_class(**values)
    return PeftConfig(methods=tuple(p.METHODS), trainable=tuple(p.TRAINABLE), **configs)


def key_table() -> str:
    """The markdown table of every MODEL.PEFT key: key, default, meaning (the README carries it)."""

    def fmt(value):
        if isinstance(value, str):
            return f'`"{value}"`'
        return f"`{json.dumps(list(value)) if isinstance(value, (list, tuple)) else value}`"

    rows = [(k, fmt(d), doc.format(methods=", ".join(f"`{m}`" for m in METHODS))) for k, d, doc in GENERAL_KEYS]
    for group in optim_groups():
        rows.append((f"OPTIM.{group.upper()}_LR", "`0.0`",
                     f"learning rate of the {group!r} optimizer group; 0: `SOLVER.BASE_LR`"))
        rows.append((f"OPTIM.{group.upper()}_WEIGHT_DECAY", "`0.0`", f"weight decay of the {group!r} group"))
    rows.append(("OPTIM.HEAD_LR", "`0.0`", HEAD_LR_DOC))
    for method in METHODS.values():
        rows += [(f"{method.node}.{key}", fmt(default), doc) for _, key, default, doc in config_keys(method)]
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | {d} | {m} |" for k, d, m in rows]
    return "\n".join(lines)


def add_datasets_config(cfg: CN) -> CN:
    """Add DATASETS.COCO_INSTANCES: COCO-format instance datasets that tools/train_net.py registers before
    training, as "NAME=ANNOTATIONS.json:IMAGE_ROOT" (its --dataset option appends here)."""
    cfg.DATASETS.COCO_INSTANCES = []
    return cfg


def config_functions() -> list:
    """The functions that add DeepLab's (poly LR schedule), Mask2Former's, ViT's (MODEL.VIT), SAM's
    (MODEL.SAM) and peft_d2's (MODEL.PEFT, DATASETS.COCO_INSTANCES) keys to detectron2's default config, in
    order."""
    from detectron2.projects.deeplab import add_deeplab_config

    from .modeling.backbone.sam import add_sam_config
    from .modeling.config import add_maskformer2_config, add_vit_config

    return [add_deeplab_config, add_maskformer2_config, add_vit_config, add_sam_config, add_peft_config,
            add_datasets_config]


def get_cfg() -> CN:
    """detectron2's default config with every key of `config_functions()`: the config peft_d2's tools read."""
    from detectron2.config import get_cfg as d2_get_cfg

    cfg = d2_get_cfg()
    for fn in config_functions():
        fn(cfg)
    return cfg


def _items(node: CN, prefix: str = ""):
    """(dotted key, value) of every key of `node`, sub-nodes included (MODEL, MODEL.PEFT, MODEL.PEFT.LORA.RANK...)."""
    for key, value in node.items():
        yield prefix + key, value
        if isinstance(value, CN):
            yield from _items(value, f"{prefix}{key}.")


def unknown_key_message(cfg: CN, key: str, where: str) -> str:
    """What to say about `key`, which `cfg` lacks: the closest valid keys (difflib over the keys of the same
    depth), or, when none is close, the keys of its deepest existing node."""
    depth = key.count(".")
    close = difflib.get_close_matches(key, [k for k, _ in _items(cfg) if k.count(".") == depth], n=3)
    if close:
        return f"Non-existent config key {key} {where}; closest valid keys: {', '.join(close)}"
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), CN):
            parts = parts[:i]
            break
        node = node[part]
    else:
        parts = parts[:-1]
    owner = f"{'.'.join(parts)} has" if parts else "the config's top-level keys are"
    return f"Non-existent config key {key} {where}; {owner}: {', '.join(node)}"


def base_config(cfg: CN) -> dict:
    """{dotted key: value} of every MODEL key but MODEL.PEFT and MODEL.DEVICE: the settings that build the base
    model and load its weights. The "PEFT" meta-architecture keeps them on the model it builds
    (`peft_base_config`) and adapter files record them, so that loading a file onto another base can name the
    settings that differ (peft_d2.checkpoint)."""
    return {f"MODEL.{k}": _json_value(v) for k, v in _items(cfg.MODEL)
            if not isinstance(v, CN) and k != "DEVICE" and not k.startswith("PEFT.")}


def _json_value(value):
    return [_json_value(v) for v in value] if isinstance(value, (list, tuple)) else value


MODEL_ZOO = "model_zoo://"


def model_zoo_config_file(name: str, named_in: str) -> str:
    """The file of detectron2's model-zoo config `name` ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    a path under detectron2/model_zoo/configs), which the _BASE_ key of the file `named_in` names; an unknown
    name is a PeftConfigError naming both and the zoo's closest names."""
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:  # "... not available in Model Zoo!"
        root = os.path.join(os.path.dirname(model_zoo.__file__), "configs")
        names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                       if f.endswith(".yaml"))
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"closest: {', '.join(MODEL_ZOO + c for c in close)}" if close else \
            f"e.g. {MODEL_ZOO}COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
        raise PeftConfigError(
            f"_BASE_ {MODEL_ZOO}{name} in {named_in}: detectron2's model zoo has no config {name!r} (the names are "
            f"paths under {root}); {hint}") from None


def load_yaml_with_base(filename: str) -> dict:
    """The YAML file `filename` over its _BASE_ chain, as a dict: what detectron2's (fvcore's)
    `CfgNode.load_yaml_with_base` returns (a base path is relative to the file naming it unless it starts with
    /, ~, http:// or https://; a list of bases merges in order; the file's keys override its bases'; YAML that
    needs the unsafe loader is read with it, as `CfgNode.merge_from_file` allows), except that a base may also
    be `model_zoo://<name>`: the config of detectron2's model zoo at <name> (`model_zoo.get_config_file`),
    read with its own _BASE_ chain."""
    from detectron2.utils.file_io import PathManager

    with PathManager.open(filename, "r") as f:
        text = f.read()
    try:
        tree = yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        logging.getLogger(__name__).warning(f"Loading config {filename} with yaml.unsafe_load")
        tree = yaml.unsafe_load(text)
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise PeftConfigError(f"{filename}: a config file holds a mapping of keys, got {type(tree).__name__}")
    bases = tree.pop("_BASE_", [])
    merged = {}
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str) or not base:
            raise PeftConfigError(f"_BASE_ in {filename}: a base is a file name, got {base!r}")
        if base.startswith(MODEL_ZOO):
            path = model_zoo_config_file(base[len(MODEL_ZOO):], filename)
        else:
            path = os.path.expanduser(base) if base.startswith("~") else base
            if not path.startswith(("/", "https://", "http://")):
                path = os.path.join(os.path.dirname(filename), path)
            if "://" not in path and not os.path.isfile(path):
                raise PeftConfigError(f"_BASE_ {base} in {filename}: {path} does not exist")
        _merge_tree(load_yaml_with_base(path), merged, path)
    _merge_tree(tree, merged, filename)
    return merged


def _merge_tree(a: dict, b: dict, filename: str) -> None:
    """Merge the dict `a` into `b` (in place): `a`'s values win; nested mappings merge key by key."""
    for key, value in a.items():
        if isinstance(value, dict) and key in b:
            if not isinstance(b[key], dict):
                raise PeftConfigError(f"{filename}: key {key} is a mapping, but its _BASE_ chain has a value there")
            _merge_tree(value, b[key], filename)
        else:
            b[key] = value


def merge_file(cfg: CN, filename: str) -> CN:
    """`cfg.merge_from_file(filename)` with `load_yaml_with_base` reading the file and its _BASE_ chain (so a base
    may be a model-zoo config); returns `cfg`. A file of an older detectron2 config VERSION is an error (detectron2
    would convert it); a file without VERSION is taken as the latest, as detectron2 does."""
    if not os.path.isfile(filename) and "://" not in filename:
        raise PeftConfigError(f"Config file {filename} does not exist")
    loaded = type(cfg)(load_yaml_with_base(filename))
    version = loaded.get("VERSION", cfg.VERSION)
    if version != cfg.VERSION:
        raise PeftConfigError(f"VERSION {version} in {filename} (or a file of its _BASE_ chain): this detectron2 "
                              f"reads VERSION {cfg.VERSION} configs; convert it with detectron2.config.compat")
    cfg.merge_from_other_cfg(loaded)
    return cfg


def merge_config(cfg: CN, config_file: str | None = None, opts=()) -> CN:
    """`merge_file(cfg, config_file)` (detectron2's `merge_from_file`, with model-zoo bases), then
    `cfg.merge_from_list(opts)` (the command line's KEY VALUE overrides), in place; returns `cfg`. A key `cfg`
    lacks is a PeftConfigError naming the key, where it came from and the closest valid keys, instead of yacs'
    bare "Non-existent key"."""
    steps = [(lambda f: merge_file(cfg, f), config_file, f"in {config_file} (or a file of its _BASE_ chain)")]
    steps = steps if config_file else []
    steps.append((cfg.merge_from_list, list(opts), "on the command line (KEY VALUE overrides)"))
    for merge, arg, where in steps:
        try:
            merge(arg)
        except (KeyError, AssertionError) as e:  # yacs: KeyError for files, an assertion for lists
            message = str(e.args[0]) if e.args else ""
            key = message.partition("Non-existent key: ")[2] or message.partition("Non-existent config key: ")[2]
            if not key:
                raise
            raise PeftConfigError(unknown_key_message(cfg, key, where)) from None
    return cfg


def parse_command_line(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parser.parse_args(argv)` for a tool whose KEY VALUE config overrides come last (`opts`, argparse's
    REMAINDER, as detectron2's default_argument_parser has it). argparse hands everything after the first
    override to `opts`, options included; an option there (`--adapter` after the overrides) would reach the
    config as a key: it is a usage error instead."""
    args = parser.parse_args(argv)
    opts = args.opts
    misplaced = [o for i, o in enumerate(opts) if o.startswith("--") or (i % 2 == 0 and o.startswith("-"))]
    if misplaced:
        parser.error(
            f"option {misplaced[0]} after the KEY VALUE config overrides (they start at {opts[0]!r}), where it "
            "would be read as a config key: options go before the KEY VALUE overrides"
        )
    return args


if __name__ == "__main__":
    print(key_table())
