"""Early, readable checks on dataset files.

detectron2's loaders fail deep inside json or PIL when a dataset is missing or malformed. The wrappers here
run before them and raise one error that names the path and says what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

__all__ = [
    "DatasetNotFoundError",
    "MalformedAnnotationError",
    "check_dir",
    "check_file",
    "check_coco_json",
    "check_panoptic_json",
    "checked_loader",
]

_ENV_HINT = "set DETECTRON2_DATASETS to the folder that holds it (see datasets/README.md)"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file or folder that a registered dataset needs does not exist."""


class MalformedAnnotationError(ValueError):
    """An annotation file exists but does not have the expected structure."""


def check_dir(path: str, dataset: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetNotFoundError(
            f"Dataset '{dataset}': expected {what} at the directory '{path}', which does not exist; {_ENV_HINT}."
        )


def check_file(path: str, dataset: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"Dataset '{dataset}': expected {what} at the file '{path}', which does not exist; {_ENV_HINT}."
        )


def _load_json(path: str, dataset: str, what: str) -> dict:
    check_file(path, dataset, what)
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedAnnotationError(f"Dataset '{dataset}': {what} '{path}' is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise MalformedAnnotationError(
            f"Dataset '{dataset}': {what} '{path}' must hold a JSON object, got {type(data).__name__}."
        )
    return data


def _require_keys(data: dict, keys: Iterable[str], path: str, dataset: str, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise MalformedAnnotationError(
            f"Dataset '{dataset}': {what} '{path}' lacks the top-level key(s) {missing}; "
            f"expected a COCO-format object with {sorted(keys)} (found {sorted(data)})."
        )
    for k in keys:
        if not isinstance(data[k], list):
            raise MalformedAnnotationError(
                f"Dataset '{dataset}': {what} '{path}': '{k}' must be a list, got {type(data[k]).__name__}."
            )


def check_coco_json(path: str, dataset: str, require_annotations: bool = True) -> dict:
    """A COCO instance file: an object with lists 'images', 'annotations', 'categories'; returns its content.

    Each image needs 'id' and 'file_name' (LVIS v1: 'coco_url', from which detectron2 takes the file name); each
    annotation 'image_id' and 'category_id'.
    """
    what = "COCO-format instance annotation file"
    data = _load_json(path, dataset, what)
    keys = ["images", "annotations", "categories"] if require_annotations else ["images", "categories"]
    _require_keys(data, keys, path, dataset, what)
    for i, img in enumerate(data["images"][:1000]):
        if not isinstance(img, dict) or "id" not in img or ("file_name" not in img and "coco_url" not in img):
            raise MalformedAnnotationError(
                f"Dataset '{dataset}': {what} '{path}': images[{i}] must be an object with 'id' and 'file_name' "
                "(or, in LVIS v1 files, 'coco_url')."
            )
    for i, ann in enumerate(data.get("annotations", [])[:1000]):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise MalformedAnnotationError(
                f"Dataset '{dataset}': {what} '{path}': annotations[{i}] must be an object with "
                "'image_id' and 'category_id'."
            )
    return data


def check_panoptic_json(path: str, dataset: str) -> None:
    """A COCO panoptic file: 'images', 'annotations' (each with 'file_name' and 'segments_info'), 'categories'."""
    what = "COCO-format panoptic annotation file"
    data = _load_json(path, dataset, what)
    _require_keys(data, ["images", "annotations", "categories"], path, dataset, what)
    for i, ann in enumerate(data["annotations"][:1000]):
        if not isinstance(ann, dict) or "file_name" not in ann or "segments_info" not in ann:
            raise MalformedAnnotationError(
                f"Dataset '{dataset}': {what} '{path}': annotations[{i}] must be an object with "
                "'file_name' and 'segments_info'."
            )


# metadata field -> (kind, description); kinds: "dir", "file", "coco_json", "panoptic_json"
_METADATA_PATHS = {
    "image_root": ("dir", "the image folder"),
    "image_dir": ("dir", "the image folder"),
    "gt_dir": ("dir", "the ground-truth folder"),
    "sem_seg_root": ("dir", "the semantic label folder"),
    "panoptic_root": ("dir", "the panoptic PNG folder"),
    "json_file": ("coco_json", "the instance annotation file"),
    "panoptic_json": ("panoptic_json", "the panoptic annotation file"),
}


def check_paths(dataset: str, paths: dict[str, tuple[str, str]]) -> None:
    """paths: {path: (kind, description)} with kind in dir | file | coco_json | panoptic_json."""
    for path, (kind, what) in paths.items():
        if not path or "://" in path:
            continue
        if kind == "dir":
            check_dir(path, dataset, what)
        elif kind == "file":
            check_file(path, dataset, what)
        elif kind == "coco_json":
            check_coco_json(path, dataset)
        elif kind == "panoptic_json":
            check_panoptic_json(path, dataset)
        else:  # pragma: no cover - programming error
            raise ValueError(kind)


def paths_from_metadata(metadata) -> dict[str, tuple[str, str]]:
    """The checkable paths that a registered dataset's metadata names."""
    out = {}
    for field, spec in _METADATA_PATHS.items():
        value = getattr(metadata, field, None) if hasattr(metadata, field) else None
        if isinstance(value, str) and value:
            out[value] = spec
    return out


def checked_loader(dataset: str, loader: Callable[[], list], paths: dict[str, tuple[str, str]]):
    """Wrap a DatasetCatalog loader so that its files are checked (with readable errors) before it runs."""

    def load():
        check_paths(dataset, paths)
        return loader()

    load.__wrapped__ = loader
    load.__name__ = f"checked_load_{dataset}"
    return load
