"""Data for peft_d2: dataset mappers (selected by INPUT.DATASET_MAPPER_NAME), dataset registrations and the
synthetic dataset generator. Importing this package registers the datasets under $DETECTRON2_DATASETS."""

from .checks import DatasetNotFoundError, MalformedAnnotationError
from .dataset_mappers import MAPPERS, build_train_mapper
from .datasets import REGISTERED, datasets_root, register_all_datasets

__all__ = [
    "MAPPERS",
    "REGISTERED",
    "DatasetNotFoundError",
    "MalformedAnnotationError",
    "build_train_mapper",
    "datasets_root",
    "register_all_datasets",
]

register_all_datasets()
