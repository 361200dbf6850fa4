"""Tiny detectron2 backbones, inputs and helpers shared by the tests."""

import importlib.util
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling.backbone import SwinTransformer, ViT

from peft_d2.config import add_peft_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_swin():
    torch.manual_seed(1)
    return SwinTransformer(
        pretrain_img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
        out_indices=(0, 1),
    ).eval()


def tiny_vit():
    torch.manual_seed(2)
    return ViT(img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=4, window_size=4,
               window_block_indexes=(0, 1), use_rel_pos=True, out_feature="last_feat").eval()


def images(n=2, size=64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g)


def small_rcnn_cfg(**opts):
    cfg = add_peft_config(get_cfg())  # the two-line adoption: import peft_d2 + add_peft_config
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_HEADS.NUM_CLASSES", 3,
        "MODEL.MASK_ON", True,
    ])
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


PEFT_OPTS = {
    "MODEL.META_ARCHITECTURE": "PEFT", "MODEL.PEFT.BASE_META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.PEFT.METHODS": ["lora"], "MODEL.PEFT.LORA.TARGETS": ["roi_heads.box_head.fc[12]"],
    "MODEL.PEFT.TRAINABLE": ["roi_heads.box_predictor.*", "backbone.fpn_output*.bias"],
}


def register_oracle(name: str, predictions):
    """Register a meta-architecture `name` that returns predictions()[basename of file_name] for each image,
    whatever its pixels: evaluators tested through train_net --eval-only against hand-computed values."""
    from detectron2.modeling import META_ARCH_REGISTRY

    class Oracle(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))
            self.outputs = predictions()

        def forward(self, batched_inputs):
            assert not self.training
            return [self.outputs[Path(x["file_name"]).name] for x in batched_inputs]

    Oracle.__name__ = name
    if name not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(Oracle)
    return Oracle


def load_tool(script: str = "train_net.py", module_name: str = "peft_d2_train_net"):
    """A script of tools/ imported as a module (a fresh module each call)."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def detection_batch(size: int, box: tuple):
    """One (3, size, size) random image with one instance of class 1: `box` (x0, y0, x1, y1) and its filled mask."""
    from detectron2.structures import BitMasks, Boxes, Instances

    x0, y0, x1, y1 = box
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[float(x0), float(y0), float(x1), float(y1)]]))
    inst.gt_classes = torch.tensor([1])
    masks = torch.zeros(1, size, size, dtype=torch.bool)
    masks[0, y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    return [{"image": torch.rand(3, size, size) * 255, "instances": inst}]


def write_coco_dataset(json_file, image_root, num_images: int, categories: list[dict], size: int = 64,
                       seed: int = 0) -> None:
    """A small COCO-format instance dataset of one's own: `num_images` noisy images of `size` px at
    `image_root`, each with 1-3 rectangles (polygon masks) of the given categories, each painted its category's
    grey level; the annotation file at `json_file`."""
    import json

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    Path(image_root).mkdir(parents=True, exist_ok=True)
    Path(json_file).parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        file_name = f"img{i:03d}.png"
        images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(len(categories)))
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            pixels[y0:y0 + h, x0:x0 + w] = 100 + 150 * k // max(len(categories) - 1, 1)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": categories[k]["id"], "iscrowd": 0,
                "bbox": [x0, y0, w, h], "area": w * h,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
            })
        cv2.imwrite(str(Path(image_root) / file_name), pixels)
    Path(json_file).write_text(json.dumps({"images": images, "annotations": annotations,
                                           "categories": categories}))
