"""Panoptic quality (PQ, SQ, RQ for all classes, things and stuff) without panopticapi.

`PanopticEvaluator` reads the ground truth the way detectron2's COCOPanopticEvaluator hands it to panopticapi
(the dataset's `panoptic_json` and the PNGs under `panoptic_root`, segment id = R + 256 G + 256^2 B, 0 = void)
and leaves segment matching and the PQ statistics to torchmetrics' `PanopticQuality`. Where its conventions
differ from panopticapi's (crowd regions, void), see datasets/README.md, "Panoptic quality".
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image
from tabulate import tabulate

__all__ = ["PanopticEvaluator", "rgb_to_id"]

logger = logging.getLogger(__name__)

_STATES = ("iou_sum", "true_positives", "false_positives", "false_negatives")  # PanopticQuality's, per class
VOID = -1  # category of unlabelled pixels handed to torchmetrics (not a category of any dataset: mapped to void)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours (H, W, 3) to segment ids: R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _segment_map(seg_ids: np.ndarray, segments: dict[int, int], unknown: str) -> torch.Tensor:
    """(H, W, 2) tensor of (dataset category id, segment id) per pixel; pixels of no listed segment are VOID."""
    out = np.full((*seg_ids.shape, 2), VOID, dtype=np.int64)
    out[..., 1] = 0
    present = set(np.unique(seg_ids).tolist()) - {0}
    missing = present - set(segments)
    if missing:
        raise ValueError(f"{unknown}: segment ids {sorted(missing)} appear in the image but not in segments_info")
    for sid, cat in segments.items():
        m = seg_ids == sid
        out[m, 0], out[m, 1] = cat, sid
    return torch.from_numpy(out)


class PanopticEvaluator(DatasetEvaluator):
    """PQ / SQ / RQ (all, things, stuff) of a model's `panoptic_seg` output, computed by torchmetrics.

    The dataset's metadata gives `panoptic_json`, `panoptic_root`, `thing_dataset_id_to_contiguous_id` and
    `stuff_dataset_id_to_contiguous_id` (things are the former's categories; stuff the latter's others, as in
    Mask2Former where the stuff map covers every class). Outputs follow detectron2: `(panoptic_img, segments_info)`
    with contiguous category ids and `isthing`, or `segments_info=None` with ids category * label_divisor +
    instance and -1 for void. Results are in percent, named as COCOPanopticEvaluator names them.
    """

    def __init__(self, dataset_name: str, output_dir: str | None = None):
        from torchmetrics.detection import PanopticQuality

        meta = MetadataCatalog.get(dataset_name)
        for key in ("panoptic_json", "panoptic_root", "thing_dataset_id_to_contiguous_id"):
            if not hasattr(meta, key):
                raise ValueError(f"PanopticEvaluator: the metadata of dataset '{dataset_name}' has no '{key}'.")
        self._dataset = dataset_name
        self._meta = meta
        self._thing_to_dataset = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        stuff_map = getattr(meta, "stuff_dataset_id_to_contiguous_id", {})
        self._stuff_to_dataset = {v: k for k, v in stuff_map.items()}
        self.things = sorted(meta.thing_dataset_id_to_contiguous_id)
        self.stuffs = sorted(set(stuff_map) - set(self.things))
        self._known = set(self.things) | set(self.stuffs)
        self._metric = PanopticQuality(
            things=set(self.things), stuffs=set(self.stuffs), allow_unknown_preds_category=True,
            return_sq_and_rq=True, return_per_class=True, sync_on_compute=False,
        )
        self._output_dir = output_dir
        self._gt: dict[str, dict] | None = None

    # ------------------------------------------------------------------------------------------ ground truth

    def _annotations(self) -> dict[str, dict]:
        if self._gt is None:
            with PathManager.open(self._meta.panoptic_json) as f:
                data = json.load(f)
            self._gt = {str(a["image_id"]): a for a in data["annotations"]}
        return self._gt

    def ground_truth(self, image_id) -> torch.Tensor:
        """(H, W, 2) ground truth of one image; crowd segments become void (torchmetrics has no crowd)."""
        ann = self._annotations().get(str(image_id))
        if ann is None:
            raise KeyError(
                f"PanopticEvaluator: image_id {image_id!r} of dataset '{self._dataset}' has no annotation in "
                f"{self._meta.panoptic_json}"
            )
        path = os.path.join(self._meta.panoptic_root, ann["file_name"])
        with PathManager.open(path, "rb") as f:
            seg_ids = rgb_to_id(np.asarray(Image.open(f).convert("RGB")))
        segments = {s["id"]: (VOID if s.get("iscrowd", 0) else s["category_id"]) for s in ann["segments_info"]}
        return _segment_map(seg_ids, segments, path)

    # ------------------------------------------------------------------------------------------ predictions

    def prediction(self, panoptic_seg) -> torch.Tensor:
        """(H, W, 2) prediction in dataset category ids from a model's `panoptic_seg` output."""
        panoptic_img, segments_info = panoptic_seg
        seg_ids = panoptic_img.cpu().numpy().astype(np.int64)
        segments = {}
        if segments_info is None:  # category * label_divisor + instance, -1 = void
            divisor = self._meta.label_divisor
            for label in np.unique(seg_ids).tolist():
                if label != -1:
                    cls = label // divisor
                    table = self._thing_to_dataset if cls in self._thing_to_dataset else self._stuff_to_dataset
                    segments[label + 1] = table.get(cls, f"contiguous id {cls}")
            seg_ids = seg_ids + 1  # void -1 -> 0
        else:
            for s in segments_info:
                if "isthing" not in s:  # the model gives dataset category ids already
                    segments[s["id"]] = s["category_id"]
                else:
                    table = self._thing_to_dataset if s["isthing"] else self._stuff_to_dataset
                    segments[s["id"]] = table.get(s["category_id"], f"contiguous id {s['category_id']}")
        unknown = sorted({str(c) for c in segments.values() if c not in self._known})
        if unknown:
            raise ValueError(
                f"PanopticEvaluator: a prediction has categories {unknown}, which are not categories of dataset "
                f"'{self._dataset}' (things {self.things}, stuff {self.stuffs})"
            )
        return _segment_map(seg_ids, segments, f"a panoptic prediction of dataset '{self._dataset}'")

    # ------------------------------------------------------------------------------------------ evaluator

    def reset(self):
        self._metric.reset()

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            pred, gt = self.prediction(out["panoptic_seg"]), self.ground_truth(inp["image_id"])
            if pred.shape != gt.shape:
                raise ValueError(
                    f"PanopticEvaluator: prediction {tuple(pred.shape[:2])} and ground truth {tuple(gt.shape[:2])} "
                    f"of image {inp['image_id']!r} differ in size (dataset '{self._dataset}')"
                )
            self._metric.update(pred[None], gt[None])

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self._metric, k) for k in _STATES}

    def evaluate(self):
        states = comm.gather(self._state())
        if not comm.is_main_process():
            return None
        for k in states[0]:
            setattr(self._metric, k, sum(s[k] for s in states))
        per_class = self._metric.compute()  # (classes, 3): pq, sq, rq in torchmetrics' order (things, then stuff)
        st = self._state()
        counted = (st["true_positives"] + st["false_positives"] + st["false_negatives"]) > 0
        n_th = len(self.things)
        res, table = {}, []
        for name, suffix, rows in (("All", "", slice(None)), ("Things", "_th", slice(0, n_th)),
                                   ("Stuff", "_st", slice(n_th, None))):
            valid = per_class[rows][counted[rows]]
            mean = valid.mean(0).tolist() if len(valid) else [0.0, 0.0, 0.0]
            for metric, value in zip(("PQ", "SQ", "RQ"), mean):
                res[metric + suffix] = 100 * value
            table.append([name, *(100 * v for v in mean), len(valid)])
        logger.info(
            "Panoptic Evaluation Results (torchmetrics PanopticQuality):\n"
            + tabulate(table, headers=["", "PQ", "SQ", "RQ", "#categories"], tablefmt="pipe", floatfmt=".3f")
        )
        if self._output_dir:
            with PathManager.open(os.path.join(self._output_dir, "panoptic_per_class.json"), "w") as f:
                json.dump(
                    {str(c): dict(zip(("PQ", "SQ", "RQ"), (100 * per_class[i]).tolist()))
                     for i, c in enumerate([*self.things, *self.stuffs]) if counted[i]}, f,
                )
        return OrderedDict({"panoptic_seg": res})
