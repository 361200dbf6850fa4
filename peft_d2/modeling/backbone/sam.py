"""SAM's image encoder (the official `segment-anything` code) as a detectron2 backbone for Mask2Former.

image -> SAM ViT (windowed blocks + a few global ones, neck to OUT_CHANS at stride 16) ->
SimpleFeaturePyramid (deconv x4, deconv x2, identity, max-pool) -> res2..res5 at strides 4..32.
The encoder's parameter names are SAM's own under `net.` (`net.patch_embed.*`, `net.blocks.*`, `net.neck.*`):
`load_sam_encoder_state` takes a SAM checkpoint (keys `image_encoder.*`) or an encoder state dict.
PEFT finds SAM's blocks like ViT's (attn.qkv, attn.proj, mlp.lin1, mlp.lin2).
"""

from functools import partial

import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid


def add_sam_config(cfg):
    """MODEL.SAM.*: the image encoder's shape (defaults: SAM ViT-B) and the feature pyramid."""
    cfg.MODEL.SAM = CN()
    cfg.MODEL.SAM.IMG_SIZE = 1024
    cfg.MODEL.SAM.PATCH_SIZE = 16
    cfg.MODEL.SAM.EMBED_DIM = 768
    cfg.MODEL.SAM.DEPTH = 12
    cfg.MODEL.SAM.NUM_HEADS = 12
    cfg.MODEL.SAM.GLOBAL_ATTN_INDEXES = [2, 5, 8, 11]
    cfg.MODEL.SAM.WINDOW_SIZE = 14
    cfg.MODEL.SAM.NECK_CHANS = 256  # SAM's neck output (its `out_chans`)
    cfg.MODEL.SAM.OUT_CHANNELS = 256
    cfg.MODEL.SAM.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    cfg.MODEL.SAM.NORM = "LN"
    cfg.MODEL.SAM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


class SAMImageEncoder(Backbone):
    """SAM's ImageEncoderViT with its children adopted as this module's own (so names match SAM's), absolute
    position embeddings resized to the input, and a detectron2 output dict {"sam_feat": (N, C, H/16, W/16)}."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, global_attn_indexes, window_size,
                 neck_chans):
        from segment_anything.modeling.image_encoder import ImageEncoderViT

        super().__init__()
        encoder = ImageEncoderViT(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=4.0, out_chans=neck_chans, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_abs_pos=True, use_rel_pos=True, window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        self.img_size, self.patch_size = img_size, patch_size
        self.patch_embed, self.pos_embed, self.blocks, self.neck = (
            encoder.patch_embed, encoder.pos_embed, encoder.blocks, encoder.neck
        )
        self._out_features = ["sam_feat"]
        self._out_feature_channels = {"sam_feat": neck_chans}
        self._out_feature_strides = {"sam_feat": patch_size}

    def forward(self, x):
        """x (N, 3, H, W), H and W multiples of the patch size."""
        x = self.patch_embed(x)  # (N, H/16, W/16, C)
        pos = self.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:  # SAM fixes 1024x1024; other sizes get resized embeddings
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return {"sam_feat": self.neck(x.permute(0, 3, 1, 2))}

    def output_shape(self):
        return {"sam_feat": ShapeSpec(channels=self._out_feature_channels["sam_feat"], stride=self.patch_size)}


@BACKBONE_REGISTRY.register()
class D2SAMSimpleFeaturePyramid(SimpleFeaturePyramid):
    """SAM's image encoder + detectron2's SimpleFeaturePyramid, outputs named res2..res5 (cfg MODEL.SAM.*)."""

    def __init__(self, cfg, input_shape):
        c = cfg.MODEL.SAM
        net = SAMImageEncoder(c.IMG_SIZE, c.PATCH_SIZE, c.EMBED_DIM, c.DEPTH, c.NUM_HEADS, c.GLOBAL_ATTN_INDEXES,
                              c.WINDOW_SIZE, c.NECK_CHANS)
        super().__init__(net=net, in_feature="sam_feat", out_channels=c.OUT_CHANNELS,
                         scale_factors=tuple(c.SCALE_FACTORS), top_block=None, norm=c.NORM,
                         square_pad=0)
        rename = {name: "res" + name[1:] for name in self._out_features}
        unknown = [f for f in c.OUT_FEATURES if f not in rename.values()]
        if unknown:
            raise ValueError(
                f"MODEL.SAM.OUT_FEATURES {unknown} not produced; MODEL.SAM.SCALE_FACTORS give {sorted(rename.values())}"
            )
        self._rename = rename
        strides = {rename[k]: v for k, v in self._out_feature_strides.items()}
        self._out_features = list(c.OUT_FEATURES)
        self._out_feature_strides = {k: strides[k] for k in self._out_features}
        self._out_feature_channels = {k: c.OUT_CHANNELS for k in self._out_features}

    @property
    def size_divisibility(self):
        return self._size_divisibility  # the coarsest stride: every pyramid level has whole pixels

    def forward(self, x):
        """x (N, 3, H, W) -> {"res<k>": (N, OUT_CHANNELS, H / 2**k, W / 2**k)}."""
        features = self.net(x)[self.in_feature]
        out = {}
        for pname, stage in zip(self._rename, self.stages):
            if self._rename[pname] in self._out_features:
                out[self._rename[pname]] = stage(features)
        return out


def load_sam_encoder_state(backbone: D2SAMSimpleFeaturePyramid, state: dict):
    """Load a SAM checkpoint's image encoder (keys "image_encoder.*", or an encoder's own keys) into
    `backbone.net`. Returns torch's (missing, unexpected) keys of that load."""
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    return backbone.net.load_state_dict(state, strict=False)
