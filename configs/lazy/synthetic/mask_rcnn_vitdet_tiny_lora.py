"""mask_rcnn_vitdet_b_lora.py shrunk to run on a CPU in seconds: a 2-block, 32-wide ViTDet Mask R-CNN with the
same LoRA and trainable patterns, on the synthetic domain A at 64 px (datasets/prepare_synthetic.py), from
random weights. For trying the LazyConfig path and for the tests, not for results.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/synthetic/mask_rcnn_vitdet_tiny_lora.py
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from ..mask_rcnn_vitdet_b_lora import dataloader, lr_multiplier, model, optimizer, train

_size, _dim = 64, 32
_vitdet = model.model
_vitdet.backbone.net.update(img_size=_size, embed_dim=_dim, depth=2, num_heads=2, window_size=2, drop_path_rate=0.0,
                            window_block_indexes=[0])
_vitdet.backbone.update(out_channels=_dim, square_pad=_size)
_vitdet.proposal_generator.head.in_channels = _dim
_vitdet.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
_vitdet.proposal_generator.update(batch_size_per_image=64, pre_nms_topk=(200, 100), post_nms_topk=(100, 50))
_heads = _vitdet.roi_heads
_heads.update(num_classes=4, batch_size_per_image=64)
_heads.box_head.update(input_shape=ShapeSpec(channels=_dim, height=7, width=7), conv_dims=[_dim], fc_dims=[64])
_heads.box_predictor.input_shape = ShapeSpec(channels=64)
_heads.mask_head.update(input_shape=ShapeSpec(channels=_dim, width=14, height=14), conv_dims=[_dim])

dataloader.train.dataset.names = "synthetic_A_train"
dataloader.test.dataset.names = "synthetic_A_val"
dataloader.train.mapper.update(
    augmentations=[L(T.RandomFlip)(horizontal=True), L(T.ResizeShortestEdge)(short_edge_length=_size, max_size=_size)],
    recompute_boxes=False,
    instance_mask_format="bitmask",  # the synthetic annotations are RLE
)
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=_size, max_size=_size)]
dataloader.train.update(total_batch_size=2, num_workers=0)
dataloader.test.num_workers = 0

optimizer.lr = 1e-3
optimizer.weight_decay = 0.0

train.init_checkpoint = ""
train.max_iter = 100
train.checkpointer.period = 50
train.eval_period = 0  # evaluate once, at the end
train.log_period = 1
train.output_dir = "./output/lazy/synthetic_vitdet_tiny_lora"
lr_multiplier.warmup_length = 0.0
