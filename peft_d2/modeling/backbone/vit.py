"""Plain ViT backbone for Mask2Former: detectron2's `ViT` (ViTDet) + `SimpleFeaturePyramid`, built from MODEL.VIT.*.

image -> ViT (patch 16, windowed + a few global blocks) -> one stride-16 map -> SimpleFeaturePyramid
(deconv x4, deconv x2, identity, max-pool) -> res2..res5 at strides 4..32 with OUT_CHANNELS channels each.
Parameter names are detectron2's (`net.*`, `simfp_<stage>.*`), so ViTDet checkpoints load.
"""

import torch.nn as nn
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT


@BACKBONE_REGISTRY.register()
class D2ViTSimpleFeaturePyramid(SimpleFeaturePyramid):
    """detectron2's SimpleFeaturePyramid over ViT, with outputs renamed p<k> -> res<k> (stride 2**k).

    cfg keys (peft_d2.modeling.add_vit_config): MODEL.VIT.IMG_SIZE, PATCH_SIZE, EMBED_DIM, DEPTH, NUM_HEADS,
    MLP_RATIO, QKV_BIAS, DROP_PATH_RATE, WINDOW_SIZE, WINDOW_BLOCK_INDEXES, USE_ABS_POS, USE_REL_POS,
    PRETRAIN_IMG_SIZE, USE_ACT_CHECKPOINT, OUT_CHANNELS, SCALE_FACTORS, NORM, OUT_FEATURES.
    """

    def __init__(self, cfg, input_shape):
        c = cfg.MODEL.VIT
        net = ViT(
            img_size=c.IMG_SIZE,
            patch_size=c.PATCH_SIZE,
            in_chans=3,
            embed_dim=c.EMBED_DIM,
            depth=c.DEPTH,
            num_heads=c.NUM_HEADS,
            mlp_ratio=c.MLP_RATIO,
            qkv_bias=c.QKV_BIAS,
            drop_path_rate=c.DROP_PATH_RATE,
            norm_layer=nn.LayerNorm,
            use_abs_pos=c.USE_ABS_POS,
            use_rel_pos=c.USE_REL_POS,
            window_size=c.WINDOW_SIZE,
            window_block_indexes=list(c.WINDOW_BLOCK_INDEXES),
            use_act_checkpoint=c.USE_ACT_CHECKPOINT,
            pretrain_img_size=c.PRETRAIN_IMG_SIZE,
            out_feature="last_feat",
        )
        super().__init__(
            net=net,
            in_feature="last_feat",
            out_channels=c.OUT_CHANNELS,
            scale_factors=tuple(c.SCALE_FACTORS),
            top_block=None,
            norm=c.NORM,
        )
        self._rename = {name: "res" + name[1:] for name in self._out_features}  # "p2" -> "res2"
        strides = {self._rename[k]: v for k, v in self._out_feature_strides.items()}
        unknown = [f for f in c.OUT_FEATURES if f not in strides]
        if unknown:
            raise ValueError(f"MODEL.VIT.OUT_FEATURES {unknown} not produced; SCALE_FACTORS give {sorted(strides)}")
        self._out_features = list(c.OUT_FEATURES)
        self._out_feature_strides = {k: strides[k] for k in self._out_features}
        self._out_feature_channels = {k: c.OUT_CHANNELS for k in self._out_features}

    def forward(self, x):
        """x: (N, 3, H, W), H and W multiples of `size_divisibility`. Returns {"res<k>": (N, C, H / 2**k, W / 2**k)}."""
        features = self.net(x)[self.in_feature]
        out = {}
        for pname, stage in zip(self._rename, self.stages):
            name = self._rename[pname]
            if name in self._out_features:
                out[name] = stage(features)
        return out

    @property
    def size_divisibility(self):
        return self._size_divisibility
