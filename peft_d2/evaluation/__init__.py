"""Evaluators that detectron2 lacks without panopticapi, or that do not run under current NumPy
(see datasets/README.md). Importing this package needs neither torchmetrics nor lvis."""

from .lvis import LVISEvaluator, lvis_numpy_compat
from .panoptic import PanopticEvaluator, rgb_to_id

__all__ = ["LVISEvaluator", "PanopticEvaluator", "lvis_numpy_compat", "rgb_to_id"]
