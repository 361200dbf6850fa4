"""The 2018 Data Science Bowl nuclei set (BBBC038, stage 1 training set) as COCO instances, by imaging kind.

What a user downloads: `stage1_train/<id>/images/<id>.png` (RGBA; constant alpha) and
`stage1_train/<id>/masks/*.png` (one binary PNG per nucleus). `prepare_dsb2018` turns it into:

    OUT/images/<id>.png                     each image as RGB (the alpha channel dropped)
    OUT/tiles<T>/<id>_<y>_<x>.png           the evaluation tiles of the val and test splits
    OUT/annotations/<kind>_<split>.json     COCO instances (RLE masks), whole images
    OUT/annotations/<kind>_<split>_tiles<T>.json   the same split as T x T tiles (the evaluation unit)
    OUT/summary.json                        counts, and every image's kind with the statistics that chose it

**Imaging kind**, computed on the image itself (`image_kind`): its chroma is the mean absolute difference of
the R, G and B values from their mean over the pixels. Chroma >= 1 (of 255) is a colour image: *tissue*
(stained histology, bright background). A grey image (chroma < 1) is *fluorescence* when its median
intensity is below 128 (dark background) and *brightfield* otherwise. On the stage-1 set this gives 541
fluorescence images (chroma exactly 0, median intensity <= 60), 107 tissue images (chroma >= 2, median >= 100)
and, in the full public set, the 16 brightfield images (grey, bright background).

**Splits**, per kind, deterministic and independent of file order: the images are ordered by the SHA-256 of
their id; the first 15% (at least 1) are `val`; `fewshot` is the next `fewshot` images (32 by default); `test`
is the rest; `train` is everything but `val` (so it holds `fewshot` and `test`). In a transfer study a kind is
either the source (it trains on `train`, chooses on `val`) or the target (it trains on `fewshot`, chooses
learning rates on `val`, reports on `test`, which nothing is tuned on), never both.

**Evaluation tiles**: nuclei are small (2-4 cells of the mask features at stride 4) and crowded (up to 375 an
image), so the unit of evaluation is a native-scale T x T tile (T = 128 by default), as is the unit of
training (random T-crops, `TileInstanceDatasetMapper`). Tiles start at 0, T, 2T, ... and the last one in each
direction is aligned to the image's far edge (overlapping its neighbour), so every pixel is covered and every
tile is full size. A nucleus with at least half of its pixels inside a tile is a ground-truth instance of that
tile (its mask cut at the border); a nucleus with fewer (but some) pixels inside is an *ignore region*
(COCO's `iscrowd: 1`): a prediction on such a border-cut nucleus is neither a true nor a false positive.

**Mask files**: a mask must be a 2-D image of the image's size whose values are {0, 255} or {0, 1} (any
other value, or another size, is an error naming the file). An all-zero mask is skipped and counted.
Overlapping masks (a few in the stage-1 set) are kept as they are: COCO instances may overlap; the number of
pixels claimed by more than one nucleus is counted in the summary.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from ..checkpoint import atomic_write_json
from .checks import MalformedAnnotationError

__all__ = [
    "KINDS",
    "SPLITS",
    "CATEGORIES",
    "image_kind",
    "split_ids",
    "tile_origins",
    "read_sample",
    "prepare_dsb2018",
    "annotation_file",
]

KINDS = ("fluorescence", "tissue", "brightfield")
SPLITS = ("train", "val", "fewshot", "test")
TILED_SPLITS = ("val", "test")  # the splits that are evaluated (on tiles)
CATEGORIES = [{"id": 1, "name": "nucleus"}]
CHROMA_COLOUR = 1.0  # chroma at or above which an image is colour (tissue)
DARK_MEDIAN = 128  # median intensity below which a grey image is fluorescence
VAL_FRACTION = 0.15
TILE_KEEP = 0.5  # a nucleus belongs to a tile when at least this fraction of it lies inside


def image_kind(rgb: np.ndarray) -> tuple[str, dict]:
    """The imaging kind of an (H, W, 3) uint8 image and the statistics that chose it (see the module doc)."""
    a = rgb.astype(np.float32)
    chroma = float(np.abs(a - a.mean(-1, keepdims=True)).mean())
    median = float(np.median(a.mean(-1)))
    if chroma >= CHROMA_COLOUR:
        kind = "tissue"
    else:
        kind = "fluorescence" if median < DARK_MEDIAN else "brightfield"
    return kind, {"chroma": round(chroma, 3), "median": round(median, 1)}


def split_ids(ids: list[str], fewshot: int = 32, val_fraction: float = VAL_FRACTION) -> dict[str, list[str]]:
    """The splits of one kind's image ids (see the module doc); each list in the deterministic order."""
    order = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(order))) if order else 0
    rest = order[n_val:]
    return {"train": rest, "val": order[:n_val], "fewshot": rest[:fewshot], "test": rest[fewshot:]}


def tile_origins(size: int, tile: int) -> list[int]:
    """Start offsets along one side: 0, tile, 2 tile, ..., the last aligned to the far edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    try:
        m = np.asarray(Image.open(path))
    except OSError as e:
        raise MalformedAnnotationError(f"Mask file '{path}' cannot be read as an image ({e}).") from e
    if m.ndim != 2:
        raise MalformedAnnotationError(
            f"Mask file '{path}' has shape {m.shape}; expected a 2-D (single-channel) mask of {shape[0]}x{shape[1]}."
        )
    if m.shape != shape:
        raise MalformedAnnotationError(
            f"Mask file '{path}' is {m.shape[0]}x{m.shape[1]} (HxW) but its image is {shape[0]}x{shape[1]}."
        )
    values = set(np.unique(m).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        shown = sorted(values)[:8]
        raise MalformedAnnotationError(
            f"Mask file '{path}' is not binary: values {shown}{' ...' if len(values) > 8 else ''}; "
            "expected 0 for background and 255 (or 1) for the nucleus."
        )
    return m > 0


def read_sample(folder: str) -> tuple[np.ndarray, list[np.ndarray], int]:
    """One sample folder `<id>/` of the official layout: its RGB image, its non-empty masks (bool, in file-name
    order) and the number of all-zero masks skipped."""
    sid = os.path.basename(os.path.normpath(folder))
    img_dir, mask_dir = os.path.join(folder, "images"), os.path.join(folder, "masks")
    for d, what in ((img_dir, "the image"), (mask_dir, "one PNG per nucleus")):
        if not os.path.isdir(d):
            raise MalformedAnnotationError(
                f"Sample '{sid}': the folder '{d}' is missing; the official layout has "
                f"stage1_train/<id>/images/<id>.png and stage1_train/<id>/masks/*.png ({what})."
            )
    img_path = os.path.join(img_dir, f"{sid}.png")
    if not os.path.isfile(img_path):
        raise MalformedAnnotationError(f"Sample '{sid}': expected the image file '{img_path}'.")
    try:
        rgb = np.asarray(Image.open(img_path).convert("RGB"))
    except OSError as e:
        raise MalformedAnnotationError(f"Image file '{img_path}' cannot be read ({e}).") from e
    names = sorted(f for f in os.listdir(mask_dir) if f.lower().endswith(".png"))
    if not names:
        raise MalformedAnnotationError(f"Sample '{sid}': the folder '{mask_dir}' holds no mask PNG.")
    masks, empty = [], 0
    for name in names:
        m = _read_mask(os.path.join(mask_dir, name), rgb.shape[:2])
        if m.any():
            masks.append(m)
        else:
            empty += 1
    return rgb, masks, empty


def _rle(mask: np.ndarray) -> dict:
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def _annotation(rle: dict, ann_id: int, image_id: int, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_util.area(rle)),
        "bbox": mask_util.toBbox(rle).tolist(),
        "iscrowd": iscrowd,
    }


def annotation_file(out: str, kind: str, split: str, tile: int | None = None) -> str:
    suffix = f"_tiles{tile}" if tile else ""
    return os.path.join(out, "annotations", f"{kind}_{split}{suffix}.json")


def _sample_dir(root: str) -> str:
    train_dir = os.path.join(root, "stage1_train")
    if os.path.isdir(train_dir):
        return train_dir
    if os.path.isdir(root) and any(os.path.isdir(os.path.join(root, d, "masks")) for d in os.listdir(root)):
        return root
    raise MalformedAnnotationError(
        f"'{root}' holds neither the folder 'stage1_train/' of the 2018 Data Science Bowl nor <id>/masks/ sample "
        "folders (see datasets/README.md for where to download stage1_train.zip)."
    )


def prepare_dsb2018(root: str, out: str, fewshot: int = 32, tile: int = 128, log=print) -> dict:
    """Convert the official layout under `root` (which holds `stage1_train/`, or is it) into `out` (see the
    module doc). Returns the summary that is also written to `out/summary.json`. Every mask is checked before
    anything is written."""
    train_dir = _sample_dir(root)
    ids = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not ids:
        raise MalformedAnnotationError(f"'{train_dir}' holds no sample folder <id>/.")
    # pass 1: every sample read and checked, its kind and its nuclei (as RLE; whole masks would not fit memory)
    records, skipped_empty, overlap_pixels = {}, 0, 0
    for n, sid in enumerate(ids):
        rgb, masks, empty = read_sample(os.path.join(train_dir, sid))
        kind, stats = image_kind(rgb)
        skipped_empty += empty
        if len(masks) > 1:
            overlap_pixels += int((np.sum(masks, axis=0) > 1).sum())
        rles = [_rle(m) for m in masks]
        records[sid] = {"kind": kind, "stats": stats, "shape": rgb.shape[:2], "rles": rles}
        if (n + 1) % 100 == 0:
            log(f"  read {n + 1}/{len(ids)} samples")
    # pass 2: images, splits, tiles
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for sid in ids:
        img = Image.open(os.path.join(train_dir, sid, "images", f"{sid}.png")).convert("RGB")
        img.save(os.path.join(out, "images", f"{sid}.png"))
    summary = {
        "root": os.path.abspath(root),
        "fewshot": fewshot,
        "tile": tile,
        "skipped_empty_masks": skipped_empty,
        "overlap_pixels": overlap_pixels,
        "kinds": {},
        "images": {s: {"kind": r["kind"], **r["stats"]} for s, r in records.items()},
    }
    for kind in KINDS:
        kind_ids = [s for s in ids if records[s]["kind"] == kind]
        if not kind_ids:
            continue
        summary["kinds"][kind] = {}
        for split, members in split_ids(kind_ids, fewshot).items():
            whole = _coco_whole(members, records)
            atomic_write_json(annotation_file(out, kind, split), whole)
            entry = {"images": len(members), "nuclei": len(whole["annotations"])}
            if split in TILED_SPLITS:
                tiles = _coco_tiles(members, records, out, tile)
                atomic_write_json(annotation_file(out, kind, split, tile), tiles)
                entry.update(
                    tiles=len(tiles["images"]),
                    tile_nuclei=sum(1 - a["iscrowd"] for a in tiles["annotations"]),
                    tile_ignored=sum(a["iscrowd"] for a in tiles["annotations"]),
                )
            summary["kinds"][kind][split] = entry
            log(f"  {kind} {split}: {entry}")
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _coco_whole(members: list[str], records: dict) -> dict:
    images, annos = [], []
    for image_id, sid in enumerate(members, 1):
        h, w = records[sid]["shape"]
        images.append({"id": image_id, "file_name": f"{sid}.png", "height": h, "width": w, "dsb_id": sid})
        for rle in records[sid]["rles"]:
            annos.append(_annotation(rle, len(annos) + 1, image_id))
    return {"images": images, "annotations": annos, "categories": CATEGORIES}


def _coco_tiles(members: list[str], records: dict, out: str, tile: int) -> dict:
    tile_dir = os.path.join(out, f"tiles{tile}")
    os.makedirs(tile_dir, exist_ok=True)
    images, annos = [], []
    for sid in members:
        h, w = records[sid]["shape"]
        rgb = np.asarray(Image.open(os.path.join(out, "images", f"{sid}.png")))
        masks = [mask_util.decode(r).astype(bool) for r in records[sid]["rles"]]
        areas = [int(m.sum()) for m in masks]
        for y in tile_origins(h, tile):
            for x in tile_origins(w, tile):
                th, tw = min(tile, h), min(tile, w)
                name = f"{sid}_{y}_{x}.png"
                Image.fromarray(rgb[y : y + th, x : x + tw]).save(os.path.join(tile_dir, name))
                image_id = len(images) + 1
                images.append(
                    {"id": image_id, "file_name": name, "height": th, "width": tw, "dsb_id": sid, "y": y, "x": x}
                )
                for m, area in zip(masks, areas, strict=True):
                    cut = m[y : y + th, x : x + tw]
                    inside = int(cut.sum())
                    if inside:
                        crowd = int(inside < TILE_KEEP * area)
                        annos.append(_annotation(_rle(cut), len(annos) + 1, image_id, iscrowd=crowd))
    return {"images": images, "annotations": annos, "categories": CATEGORIES}
