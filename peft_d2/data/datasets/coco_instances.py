"""Your own COCO-format instance datasets, named on the command line or in the config, without writing Python.

`tools/train_net.py --dataset NAME=ANNOTATIONS.json:IMAGE_ROOT` (repeatable) appends to the config key
`DATASETS.COCO_INSTANCES`, a list of such specs; `register_coco_instances` registers each one in detectron2's
catalogs (loader `load_coco_json`, evaluator type "coco", classes from the file's categories) inside the
process that trains, so every DDP worker registers them too, and `set_num_classes` makes the model's class count
that of the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from detectron2.data import DatasetCatalog
from detectron2.data.datasets.coco import load_coco_json

from ...errors import PeftConfigError
from ..checks import DatasetNotFoundError, MalformedAnnotationError, check_coco_json, checked_loader
from .catalog import replace_registration

__all__ = ["KEY", "NUM_CLASSES_KEYS", "parse_coco_spec", "register_coco_instances", "set_num_classes"]

KEY = "DATASETS.COCO_INSTANCES"
SPEC = "NAME=ANNOTATIONS.json:IMAGE_ROOT"
# the class count of the heads detectron2's and Mask2Former's configs build: Mask2Former, Mask R-CNN, RetinaNet
NUM_CLASSES_KEYS = ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")

_REGISTERED: dict[str, str] = {}  # name -> spec, registered here: registering the same name again replaces it


def parse_coco_spec(spec: str) -> tuple[str, str, str]:
    """`NAME=ANNOTATIONS.json:IMAGE_ROOT` -> (name, annotation file, image folder); the folder is what follows
    the last ':'."""
    name, eq, rest = spec.partition("=")
    json_file, colon, image_root = rest.rpartition(":")
    if not (eq and colon and name.strip() and json_file and image_root) or name != name.strip():
        raise PeftConfigError(f"{KEY} / --dataset: expected {SPEC}, got {spec!r}")
    return name, json_file, image_root


def _categories(data: dict, name: str, json_file: str) -> list[dict]:
    cats = data["categories"]
    if not cats:
        raise MalformedAnnotationError(
            f"Dataset '{name}': '{json_file}' has no categories; the model's classes are taken from them.")
    if any(not isinstance(c, dict) or "id" not in c or "name" not in c for c in cats):
        raise MalformedAnnotationError(
            f"Dataset '{name}': every entry of 'categories' in '{json_file}' must be an object with 'id' and 'name'.")
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise MalformedAnnotationError(f"Dataset '{name}': '{json_file}' repeats category ids: {sorted(ids)}.")
    return sorted(cats, key=lambda c: c["id"])


def register_coco_instances(specs: Sequence[str]) -> dict[str, list[str]]:
    """Register each `NAME=ANNOTATIONS.json:IMAGE_ROOT` as a COCO instance dataset; returns {name: class names}.

    The files are checked now (a missing file or folder, a malformed annotation file, no categories: one error
    naming it); a name that another registration holds (a detectron2 builtin, a peft_d2 dataset) or that two
    specs give is an error. Relative paths are taken from the working directory.
    """
    parsed = {spec: parse_coco_spec(spec) for spec in specs}  # the same spec twice is one dataset
    names = [name for name, _, _ in parsed.values()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PeftConfigError(f"{KEY} / --dataset: the name(s) {repeated} are given to different files: {list(specs)}")
    classes = {}
    for spec, (name, json_file, image_root) in parsed.items():
        where = f"{KEY} / --dataset {spec!r}"
        if name in DatasetCatalog.list() and name not in _REGISTERED:
            raise PeftConfigError(
                f"{where}: a dataset named '{name}' is already registered (a detectron2 or peft_d2 dataset, see "
                "datasets/README.md); choose another name")
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        if not os.path.isfile(json_file):
            raise DatasetNotFoundError(f"{where}: the annotation file '{json_file}' does not exist.")
        if not os.path.isdir(image_root):
            raise DatasetNotFoundError(f"{where}: the image folder '{image_root}' does not exist.")
        cats = _categories(check_coco_json(json_file, name), name, json_file)
        thing_classes = [c["name"] for c in cats]
        replace_registration(
            name,
            checked_loader(
                name,
                lambda j=json_file, i=image_root, n=name: load_coco_json(j, i, n),
                {image_root: ("dir", "the image folder"), json_file: ("coco_json", "the annotation file")},
            ),
            dict(
                thing_classes=thing_classes,
                thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
                json_file=json_file,
                image_root=image_root,
                evaluator_type="coco",
            ),
        )
        _REGISTERED[name] = spec
        classes[name] = thing_classes
    return classes


def set_num_classes(cfg, classes: dict[str, list[str]], explicit: Iterable[str] = ()) -> int | None:
    """Set NUM_CLASSES_KEYS of `cfg` (not frozen) to the class count of the registered datasets (`classes`)
    that DATASETS.TRAIN and DATASETS.TEST use; returns it (None when they use none).

    Those datasets must have the same classes. A key in `explicit` (set on the command line) must already hold
    that count: a different value is an error rather than a silent override.
    """
    used = list(dict.fromkeys(n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n in classes))
    if not used:
        return None
    first = used[0]
    for other in used[1:]:
        if classes[other] != classes[first]:
            raise PeftConfigError(
                f"{KEY}: '{first}' has the classes {classes[first]} but '{other}' has {classes[other]}; the "
                "training and test datasets of one model need the same categories (ids and names)")
    count = len(classes[first])
    for key in NUM_CLASSES_KEYS:
        node, leaf = cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        if key in explicit and node[leaf[-1]] != count:
            raise PeftConfigError(
                f"{key} {node[leaf[-1]]} is set on the command line, but '{first}' has {count} classes "
                f"{classes[first]} in its annotation file; leave {key} out (the count is taken from the file) or "
                "fix the file")
        node[leaf[-1]] = count
    return count
