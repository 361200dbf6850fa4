"""Bottleneck adapters (width 64, after the attention and after the MLP of every block) in the frozen ViT-B of
detectron2's ViTDet Mask R-CNN, on COCO. Everything else as in mask_rcnn_vitdet_b_lora.py.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_vitdet_b_adapters.py --num-gpus 8
"""

from .mask_rcnn_vitdet_b_lora import dataloader, lr_multiplier, model, optimizer, train

model.peft = dict(
    methods=["adapter"],
    adapter=dict(num_per_site=1, bottleneck=64, placements=["attn", "mlp"]),
    trainable=["backbone.simfp_*", "proposal_generator.*", "roi_heads.*"],
)
train.output_dir = "./output/lazy/mask_rcnn_vitdet_b_adapters"
