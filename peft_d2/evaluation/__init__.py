"""Evaluators that detectron2 does not provide without extra packages (see datasets/README.md)."""

from .panoptic import PanopticEvaluator, rgb_to_id

__all__ = ["PanopticEvaluator", "rgb_to_id"]
