"""Dataset registrations: ADE20K panoptic/instance, COCO panoptic with semantic labels, the synthetic domains,
the 2018 Data Science Bowl nuclei.

COCO, LVIS, Cityscapes and ADE20K semantic splits are detectron2 builtins; `register_all_datasets` also wraps
their loaders with early path checks (peft_d2.data.checks) so that a missing folder reads as one clear error.
"""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog

from .ade20k import register_all_ade20k
from .catalog import guard_registered, replace_registration
from .coco_panoptic_semseg import register_all_coco_panoptic_semseg
from .dsb2018 import register_all_dsb2018
from .synthetic import register_all_synthetic

__all__ = ["datasets_root", "register_all_datasets", "replace_registration", "REGISTERED"]

REGISTERED: list[str] = []  # names registered by peft_d2 (filled by register_all_datasets)
_BUILTIN_PREFIXES = ("coco_", "lvis_", "cityscapes_")


def datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_all_datasets(root: str | None = None) -> list[str]:
    """(Re-)register peft_d2's datasets under `root` (default: $DETECTRON2_DATASETS, else "datasets").

    Idempotent: calling it again with another root re-points every peft_d2 dataset there. Loading stays lazy:
    nothing is read until DatasetCatalog.get(name).
    """
    root = datasets_root() if root is None else root
    names = register_all_ade20k(root) + register_all_coco_panoptic_semseg(root) + register_all_synthetic(root)
    names += register_all_dsb2018(root)
    guard_registered([n for n in DatasetCatalog.list() if n.startswith(_BUILTIN_PREFIXES)])
    REGISTERED[:] = names
    return names
