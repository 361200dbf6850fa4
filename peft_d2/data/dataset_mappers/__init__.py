"""Training dataset mappers, selected by INPUT.DATASET_MAPPER_NAME (the official Mask2Former names)."""

from __future__ import annotations

from .lsj import COCOInstanceLSJDatasetMapper, COCOPanopticLSJDatasetMapper
from .mask_former import (
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    TileInstanceDatasetMapper,
)

__all__ = [
    "MAPPERS",
    "build_train_mapper",
    "COCOInstanceLSJDatasetMapper",
    "COCOPanopticLSJDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "TileInstanceDatasetMapper",
]

MAPPERS = {
    "coco_instance_lsj": COCOInstanceLSJDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticLSJDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "tile_instance": TileInstanceDatasetMapper,
}


def build_train_mapper(cfg):
    """The training mapper named by cfg.INPUT.DATASET_MAPPER_NAME; "detectron2" selects detectron2's DatasetMapper.

    An unknown name is an error that lists the known ones.
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name == "detectron2":
        from detectron2.data import DatasetMapper

        return DatasetMapper(cfg, is_train=True)
    if name not in MAPPERS:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a known mapper; expected one of "
            f"{sorted(MAPPERS) + ['detectron2']}."
        )
    return MAPPERS[name](cfg, is_train=True)
