"""Idempotent registration into detectron2's catalogs (so a new DETECTRON2_DATASETS root can be applied)."""

from __future__ import annotations

from collections.abc import Callable

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..checks import checked_loader, paths_from_metadata

__all__ = ["replace_registration", "guard_registered"]


def replace_registration(name: str, loader: Callable[[], list], metadata: dict) -> None:
    """Register `name`, dropping any earlier registration and metadata under that name first."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def guard_registered(names) -> None:
    """Wrap already-registered loaders (detectron2 builtins) with path checks taken from their metadata."""
    for name in names:
        if name not in DatasetCatalog.list():
            continue
        loader = DatasetCatalog[name]
        if getattr(loader, "__wrapped__", None) is not None:
            continue
        paths = paths_from_metadata(MetadataCatalog.get(name))
        if not paths:
            continue
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, checked_loader(name, loader, paths))
