"""LoRA on the convolutions of detectron2's new-baseline Mask R-CNN R50-FPN (100 epochs, large-scale jitter) and
on its box head's linear, the box and mask predictors trainable, everything else frozen: a COCO-trained detector
adapted to a new dataset.

The base is the model zoo's `new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py` with its COCO weights. LoRA (r=8)
goes on every convolution of the ResNet's residual blocks (res2-res5: conv1-conv3 and the shortcuts; the stem
stays as it is), on the FPN's lateral and output convolutions (LoRA on a convolution: docs/methods.md) and on
the box head's one linear, fc1 (this head is four convolutions and one fully connected layer); the RPN and the
box and mask heads' convolutions stay frozen. A ResNet has no transformer blocks, so adapters have no site
here (see mask_rcnn_vitdet_b_adapters.py for adapters). Set the new dataset and its class count:

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_R_50_FPN_100ep_LSJ_lora.py \
        dataloader.train.dataset.names=my_train dataloader.test.dataset.names=my_val \
        model.model.roi_heads.num_classes=N
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from peft_d2.lazy import peft_model, peft_param_groups

_BASE = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
_base = model_zoo.get_config(_BASE)

# The base is frozen, so its batch norms are too: FrozenBN keeps the trained statistics (and loads the same
# keys as the SyncBN the baseline was trained with) and needs no process group.
_net = _base.model
_net.backbone.bottom_up.stem.norm = _net.backbone.bottom_up.stages.norm = _net.backbone.norm = "FrozenBN"
_net.roi_heads.box_head.conv_norm = _net.roi_heads.mask_head.conv_norm = "FrozenBN"

model = L(peft_model)(
    model=_net,
    peft=dict(
        methods=["lora"],
        lora=dict(r=8, alpha=8.0, targets=["backbone.bottom_up.res*.*.conv?", "backbone.bottom_up.res*.*.shortcut",
                                           "backbone.fpn_lateral?", "backbone.fpn_output?", "roi_heads.box_head.fc?"]),
        trainable=["roi_heads.box_predictor.*", "roi_heads.mask_head.predictor.*"],
    ),
)

dataloader = _base.dataloader
dataloader.train.total_batch_size = 16

optimizer = _base.optimizer  # SGD
optimizer.params = L(peft_param_groups)(base_lr="${..lr}", weight_decay="${..weight_decay}", weight_decay_norm=0.0)
optimizer.lr = 0.02

train = _base.train
train.init_checkpoint = model_zoo.get_checkpoint_url(_BASE)
train.peft_weights = ""
train.peft_full_checkpoints = False
train.max_iter = 20000
train.amp.enabled = True
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_100ep_LSJ_lora"

lr_multiplier = _base.lr_multiplier
lr_multiplier.scheduler.milestones = [16000, 18500]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
