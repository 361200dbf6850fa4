"""LoRA (r=8 on q and v of every block) in the frozen ViT-B of detectron2's ViTDet Mask R-CNN, on COCO.

The model is detectron2's model zoo node `common/models/mask_rcnn_vitdet.py` (ViT-B, simple feature pyramid,
Mask R-CNN heads) wrapped in `peft_d2.lazy.peft_model`: the ViT is frozen apart from LoRA, while the feature
pyramid and the detection heads, which the MAE-pretrained backbone does not contain, train as usual. Set
`train.init_checkpoint` to a trained ViTDet model instead to adapt it to a new dataset
(`dataloader.train.dataset.names=...`) and list the heads you keep frozen out of `peft.trainable`.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_vitdet_b_lora.py --num-gpus 8
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from peft_d2.lazy import peft_model, peft_param_groups

model = L(peft_model)(
    model=model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model,
    peft=dict(
        methods=["lora"],
        lora=dict(r=8, alpha=8.0, targets=["backbone.net.blocks.*.attn.qkv"], qkv_blocks="qv"),
        # everything outside the ViT: the simple feature pyramid, RPN and ROI heads
        trainable=["backbone.simfp_*", "proposal_generator.*", "roi_heads.*"],
    ),
)

# COCO with ViTDet's large-scale jitter at 1024 px
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True
dataloader.train.total_batch_size = 16
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]

# AdamW over the trainable tensors only, one group per kind (lora, adapter, head, norm)
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params = L(peft_param_groups)(base_lr="${..lr}", weight_decay="${..weight_decay}", weight_decay_norm=0.0)
optimizer.lr = 1e-4
optimizer.weight_decay = 0.1

lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
train.peft_weights = ""  # an adapter file (safetensors) loaded after init_checkpoint
train.peft_full_checkpoints = False  # training checkpoints: trainable tensors only
train.max_iter = 90000
train.amp.enabled = True
train.ddp.fp16_compression = True
train.output_dir = "./output/lazy/mask_rcnn_vitdet_b_lora"
