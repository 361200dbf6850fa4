"""A deterministic synthetic instance/semantic segmentation dataset in COCO format, in two domains.

Every image is a background with objects that may overlap; later objects occlude earlier ones, and the
annotations describe only what stays visible. An object's class is its *material*: the surface pattern it is
made of (stripes, checker, dots, plain, grid, rings). Its outline (ellipse, rectangle, triangle, star, hexagon,
cross), colour, size, orientation and the pattern's scale and phase are nuisances that vary freely.

Domain "A" is the plentiful source domain (4 materials). Domain "B" is the shifted downstream domain: two
materials A never shows, dull and dark colours instead of bright ones, finer patterns, smaller objects and more
of them per image.

Why materials and not outlines: a 1.4 M-parameter Swin trained from scratch on 2 CPU cores for minutes learns
local patterns quickly but not the identity of an outline (on single-object images of the earlier outline
classes, a linear probe on its features stayed below 40% accuracy after 6,400 samples), and a pretrained base
that cannot classify its own domain makes every transfer comparison noise.

Layout written under ``root`` (``root`` is usually ``$DETECTRON2_DATASETS/synthetic``)::

    {domain}/{split}/000000.png                     images (PNG or JPG); split is train, val or test
    {domain}/{split}_sem_seg/000000.png              semantic labels: 0 = background, k = k-th class of
                                                     the domain (1-based), 255 = ignore (unused)
    {domain}/annotations/instances_{split}.json      COCO instances (RLE or polygon masks)

The output depends only on (domain, split, num_images, image_size, seed, mask_format); the image encoding
(PNG or JPG) does not change the annotations.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ..checkpoint import atomic_write_json

__all__ = [
    "CATEGORIES",
    "DOMAINS",
    "DomainStyle",
    "domain_categories",
    "generate_split",
    "generate_synthetic",
    "split_paths",
]

# Global category table (materials); each domain uses a subset (ids stay the same across domains).
CATEGORIES = [
    {"id": 1, "name": "stripes"},
    {"id": 2, "name": "checker"},
    {"id": 3, "name": "dots"},
    {"id": 4, "name": "plain"},
    {"id": 5, "name": "grid"},
    {"id": 6, "name": "rings"},
]
OUTLINES = ("ellipse", "rectangle", "triangle", "star", "hexagon", "cross")


@dataclass(frozen=True)
class DomainStyle:
    class_ids: tuple[int, ...]  # the materials of the domain
    background: tuple[str, ...]  # background patterns
    saturation: tuple[float, float]
    value: tuple[float, float]
    scale: tuple[float, float]  # object size as a fraction of the image side
    objects: tuple[int, int]  # objects per image, inclusive
    pattern_scale: tuple[float, float]  # multiplies the period of the materials' patterns


DOMAINS = {
    "A": DomainStyle(
        class_ids=(1, 2, 3, 4),
        background=("gradient", "noise"),
        saturation=(0.6, 1.0),
        value=(0.7, 1.0),
        scale=(0.2, 0.45),
        objects=(1, 4),
        pattern_scale=(1.0, 1.4),
    ),
    "B": DomainStyle(
        class_ids=(1, 2, 3, 5, 6),
        background=("noise", "gradient"),
        saturation=(0.2, 0.5),
        value=(0.35, 0.7),
        scale=(0.15, 0.35),
        objects=(2, 5),
        pattern_scale=(0.8, 1.1),
    ),
}
_SPLITS = ("train", "val", "test")  # appended only: the seed of a split is its index here
_MIN_VISIBLE_AREA = 12  # pixels: smaller remnants of occluded objects are not annotated


def domain_categories(domain: str) -> list[dict]:
    style = _style(domain)
    return [c for c in CATEGORIES if c["id"] in style.class_ids]


def split_paths(root: str, domain: str, split: str) -> dict[str, str]:
    d = os.path.join(root, domain)
    return {
        "image_root": os.path.join(d, split),
        "sem_seg_root": os.path.join(d, f"{split}_sem_seg"),
        "json_file": os.path.join(d, "annotations", f"instances_{split}.json"),
    }


def _style(domain: str) -> DomainStyle:
    if domain not in DOMAINS:
        raise ValueError(f"Unknown synthetic domain {domain!r}; expected one of {sorted(DOMAINS)}.")
    return DOMAINS[domain]


def _hsv_color(rng: np.random.Generator, style: DomainStyle) -> np.ndarray:
    h = rng.uniform(0, 180)
    s = rng.uniform(*style.saturation) * 255
    v = rng.uniform(*style.value) * 255
    hsv = np.array([[[h, s, v]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _rotated_grid(rng: np.random.Generator, h: int, w: int):
    """Pixel coordinates rotated by a random angle and shifted by a random phase: (u, v) each (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    return c * xx + s * yy + rng.uniform(0, 100), -s * xx + c * yy + rng.uniform(0, 100)


def _texture(kind: str, rng: np.random.Generator, h: int, w: int, k: float = 1.0) -> np.ndarray:
    """A (h, w) float32 pattern in [0, 1]; `k` multiplies the pattern's period."""
    if kind == "plain":
        return np.full((h, w), 0.85, np.float32) + rng.normal(0, 0.03, (h, w)).astype(np.float32)
    if kind == "stripes":
        u, _ = _rotated_grid(rng, h, w)
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / (rng.uniform(5, 8) * k))
    if kind == "checker":
        u, v = _rotated_grid(rng, h, w)
        cell = rng.uniform(3, 5) * k
        return (((u // cell) + (v // cell)) % 2).astype(np.float32) * 0.7 + 0.3
    if kind == "dots":
        u, v = _rotated_grid(rng, h, w)
        cell = rng.uniform(5, 8) * k
        r = np.hypot((u % cell) - cell / 2, (v % cell) - cell / 2)
        return (r < cell / 4).astype(np.float32) * 0.7 + 0.3
    if kind == "grid":
        u, v = _rotated_grid(rng, h, w)
        cell = rng.uniform(6, 9) * k
        line = np.minimum(u % cell, v % cell) < max(cell / 5, 1.2)
        return line.astype(np.float32) * 0.7 + 0.3
    if kind == "rings":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        return 0.5 + 0.5 * np.sin(2 * math.pi * r / (rng.uniform(5, 8) * k))
    if kind == "gradient":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        t = np.cos(theta) * xx / max(w, 1) + np.sin(theta) * yy / max(h, 1)
        return (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    if kind == "noise":
        small = rng.uniform(0, 1, (max(h // 8, 2), max(w // 8, 2))).astype(np.float32)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    raise ValueError(kind)


def _shape_polygon(outline: str, rng: np.random.Generator, cx: float, cy: float, size: float) -> np.ndarray:
    """Vertices (N, 2) of an `outline` centred at (cx, cy) with about `size` px extent."""
    rot = rng.uniform(0, 2 * math.pi)
    r = size / 2
    if outline == "ellipse":
        axes = (max(int(r), 2), max(int(r * rng.uniform(0.45, 0.9)), 2))
        return cv2.ellipse2Poly((int(cx), int(cy)), axes, int(math.degrees(rot)), 0, 360, 10).astype(np.float32)
    if outline == "rectangle":
        a, b = r, r * rng.uniform(0.4, 0.9)
        pts = [(-a, -b), (a, -b), (a, b), (-a, b)]
    elif outline == "triangle":
        pts = [(r * math.cos(t), r * math.sin(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif outline == "star":  # five-pointed
        radii = [r if k % 2 == 0 else r * 0.42 for k in range(10)]
        pts = [(rk * math.cos(k * math.pi / 5), rk * math.sin(k * math.pi / 5)) for k, rk in enumerate(radii)]
    elif outline == "hexagon":
        pts = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
    elif outline == "cross":  # plus sign
        a, b = r, r * 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b)]
        pts += [(b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(outline)
    c, s = math.cos(rot), math.sin(rot)
    return np.array([(cx + c * x - s * y, cy + s * x + c * y) for x, y in pts], dtype=np.float32)


def _render_image(rng: np.random.Generator, style: DomainStyle, h: int, w: int):
    """Returns the RGB image (h, w, 3) uint8 and a list of (cat_id, visible bool mask)."""
    bg = _texture(str(rng.choice(style.background)), rng, h, w)
    c0, c1 = _hsv_color(rng, style) * 0.6, _hsv_color(rng, style) * 0.6
    image = c0[None, None] * (1 - bg[..., None]) + c1[None, None] * bg[..., None]
    owner = np.zeros((h, w), np.int32)  # which object (1-based) owns each pixel; 0 = background
    cats = []
    n = int(rng.integers(style.objects[0], style.objects[1] + 1))
    side = min(h, w)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    for k in range(1, n + 1):
        cat_id = int(rng.choice(style.class_ids))
        size = rng.uniform(*style.scale) * side
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        poly = _shape_polygon(str(rng.choice(OUTLINES)), rng, cx, cy, size)
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
        m = m.astype(bool)
        if not m.any():
            continue
        tex = _texture(names[cat_id], rng, h, w, rng.uniform(*style.pattern_scale))
        color = _hsv_color(rng, style)
        obj = color[None, None] * (0.45 + 0.55 * tex[..., None])
        image[m] = obj[m]
        owner[m] = k
        cats.append((k, cat_id))
    image = image + rng.normal(0, 3.0, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    objects = []
    for k, cat_id in cats:
        vis = owner == k
        if int(vis.sum()) >= _MIN_VISIBLE_AREA:
            objects.append((cat_id, vis))
    return image, objects


def _polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = c.reshape(-1, 2)
        if len(c) >= 3:
            polys.append([float(v) + 0.5 for v in c.reshape(-1)])
    return polys


def generate_split(
    root: str,
    domain: str,
    split: str,
    num_images: int,
    image_size: int = 128,
    seed: int = 0,
    mask_format: str = "rle",
    image_format: str = "png",
) -> dict[str, str]:
    """Write one split of one domain under `root`; returns its paths (image_root, sem_seg_root, json_file)."""
    style = _style(domain)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if mask_format not in ("rle", "polygon"):
        raise ValueError(f"mask_format must be 'rle' or 'polygon', got {mask_format!r}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if num_images < 1 or image_size < 16:
        raise ValueError(f"need num_images >= 1 and image_size >= 16, got {num_images}, {image_size}")
    paths = split_paths(root, domain, split)
    for p in (paths["image_root"], paths["sem_seg_root"], os.path.dirname(paths["json_file"])):
        os.makedirs(p, exist_ok=True)
    rng = np.random.default_rng([seed, ord(domain), _SPLITS.index(split)])
    categories = domain_categories(domain)
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    images, annotations = [], []
    for idx in range(num_images):
        image, objects = _render_image(rng, style, image_size, image_size)
        file_name = f"{idx:06d}.{image_format}"
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if image_format == "jpg":
            cv2.imwrite(os.path.join(paths["image_root"], file_name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        else:
            cv2.imwrite(os.path.join(paths["image_root"], file_name), bgr)
        sem = np.zeros(image.shape[:2], np.uint8)
        image_id = idx + 1
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for cat_id, vis in objects:
            sem[vis] = label_of[cat_id]
            rle = mask_util.encode(np.asfortranarray(vis.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
            if mask_format == "rle":
                segm = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                segm = _polygons(vis)
                if not segm:
                    continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id,
                    "segmentation": segm,
                    "area": float(mask_util.area(rle)),
                    "bbox": [x, y, bw, bh],
                    "iscrowd": 0,
                }
            )
        cv2.imwrite(os.path.join(paths["sem_seg_root"], f"{idx:06d}.png"), sem)
    data = {
        "info": {"description": f"peft_d2 synthetic domain {domain} {split} (seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="shape") for c in categories],
    }
    atomic_write_json(paths["json_file"], data)
    return paths


def generate_synthetic(
    root: str,
    domains: tuple[str, ...] = ("A", "B"),
    num_train: dict[str, int] | None = None,
    num_val: int | dict[str, int] = 16,
    image_size: int = 128,
    seed: int = 0,
    mask_format: str = "rle",
    image_format: str = "png",
    num_test: dict[str, int] | None = None,
) -> dict[str, dict[str, str]]:
    """Write train and val (and test, where `num_test` asks for it) of each domain.

    Defaults: A 256 training images, B 32 (the few-shot domain); `num_val` images of each domain; no test split.
    `num_val` may also be a per-domain dict like `num_train`.
    """
    num_train = {"A": 256, "B": 32, **(num_train or {})}
    num_val = num_val if isinstance(num_val, dict) else {d: num_val for d in domains}
    num_test = num_test or {}
    out = {}
    for d in domains:
        for split, n in (("train", num_train[d]), ("val", num_val[d]), ("test", num_test.get(d, 0))):
            if n == 0 and split == "test":
                continue
            out[f"synthetic_{d}_{split}"] = generate_split(
                root, d, split, n, image_size=image_size, seed=seed, mask_format=mask_format, image_format=image_format
            )
    return out
