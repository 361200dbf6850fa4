"""The README's main job (foundation version): PEFT on a detectron2 Mask R-CNN with a ViT backbone.

Builds a small ViTDet Mask R-CNN from detectron2's model zoo config, injects LoRA (q and v of every
attention) and two sequential adapters per attention, keeps the box and mask predictors trainable, trains a
few steps on generated images, prints the parameter report, then saves the adapter checkpoint, reloads it
into a fresh model and checks that the outputs are identical.

    python tools/demo.py [--steps 12] [--output output/demo]
"""

import argparse
import copy
import os
import time
import warnings

import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import peft_d2
from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig
from peft_d2 import checkpoint as ckpt


def build_model(num_classes=3, size=128):
    """A ViTDet Mask R-CNN scaled down to train on a CPU in seconds."""
    cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    net = cfg.backbone.net
    net.img_size, net.embed_dim, net.depth, net.num_heads = size, 96, 4, 4
    net.window_size, net.window_block_indexes, net.drop_path_rate = 4, [0, 2], 0.0
    cfg.backbone.square_pad = size
    cfg.roi_heads.num_classes = num_classes
    cfg.roi_heads.box_head.conv_dims = [64]
    cfg.roi_heads.box_head.fc_dims = [128]
    cfg.roi_heads.box_predictor.input_shape = ShapeSpec(channels=128)
    cfg.roi_heads.mask_head.conv_dims = [64, 64]
    cfg.roi_heads.batch_size_per_image = 64
    cfg.proposal_generator.post_nms_topk = (100, 50)
    return instantiate(cfg)


def generated_batch(rng, n=2, size=128, num_classes=3):
    """Images with coloured rectangles and ellipses; the class is the shape/colour family."""
    batch = []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        img = rng.integers(0, 60, (size, size, 3)).astype(np.float32)
        masks, boxes, classes = [], [], []
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(num_classes))
            w, h = rng.integers(20, 50, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            if c == 1:  # ellipse
                m = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
            else:
                m = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            img[m] = [(200, 60, 60), (60, 200, 60), (60, 60, 200)][c] + rng.normal(0, 10, 3)
            ys, xs = np.nonzero(m)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(c)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
        image = torch.from_numpy(img.clip(0, 255)).permute(2, 0, 1)
        batch.append({"image": image, "height": size, "width": size, "instances": inst})
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output", default="output/demo")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    base = build_model()
    model = copy.deepcopy(base)
    config = PeftConfig(
        methods=("lora", "adapter"),
        lora=LoRAConfig(r=8, alpha=8.0, targets=["backbone.net.blocks.*.attn.qkv"], qkv_blocks="qv"),
        adapter=AdapterConfig(num_per_site=2, placements=("attn",)),
        trainable=("roi_heads.box_predictor.*", "roi_heads.mask_head.predictor.*"),
    )
    report = peft_d2.inject(model, config)
    print(peft_d2.format_report(report), "\n")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        with EventStorage(step):  # detectron2's losses log into an event storage
            losses = model(generated_batch(rng))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}/{args.steps}  loss {loss.item():.3f}  ({time.perf_counter() - start:.1f}s)")

    os.makedirs(args.output, exist_ok=True)
    adapter_path = ckpt.save_adapter(model, os.path.join(args.output, "adapter.safetensors"))
    full_path = os.path.join(args.output, "full_model.pth")
    torch.save(model.state_dict(), full_path)
    reloaded = copy.deepcopy(base)
    ckpt.inject_from_checkpoint(reloaded, adapter_path)
    model.eval()
    reloaded.eval()
    test = generated_batch(np.random.default_rng(1), n=1)
    with torch.no_grad():
        a = model.backbone(model.preprocess_image(test).tensor)
        b = reloaded.backbone(reloaded.preprocess_image(test).tensor)
    same = all(torch.equal(a[k], b[k]) for k in a)
    kib = os.path.getsize(adapter_path) / 1024
    full_kib = os.path.getsize(full_path) / 1024
    print(f"\nadapter checkpoint: {adapter_path} ({kib:.0f} KiB, {100 * kib / full_kib:.1f}% of the full "
          f"{full_kib:.0f} KiB state dict)")
    print(f"reloaded into a fresh base model: backbone features identical = {same}")
    if not same:
        raise SystemExit("adapter round trip changed the outputs")


if __name__ == "__main__":
    main()
