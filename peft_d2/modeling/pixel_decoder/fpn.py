"""MaskFormer's FPN pixel decoder ("BasePixelDecoder", the official default PIXEL_DECODER_NAME), official names.

res5 -> 3x3 conv (layer_4); then for res4, res3, res2: 1x1 lateral conv (adapter_i) + nearest-upsampled coarser
map -> 3x3 conv (layer_i); mask_features = 3x3 conv of the finest map. No transformer encoder.
"""

import logging
from collections.abc import Callable
from typing import Optional, Union

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn


@SEM_SEG_HEADS_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """Top-down FPN over all input features. forward_features returns
    (mask_features (N, mask_dim, H/4, W/4), None, the 3 coarsest FPN maps (N, conv_dim, ...), coarse to fine)."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
    ):
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]  # fine to coarse
        feature_channels = [v.channels for _, v in shapes]

        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(feature_channels):
            coarsest = idx == len(self.in_features) - 1
            lateral_conv = None
            if not coarsest:
                lateral_conv = Conv2d(
                    in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
                )
            output_conv = Conv2d(
                in_channels if coarsest else conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            # build both, then initialise: the official RNG order, so seeded models start equal
            if lateral_conv is not None:
                weight_init.c2_xavier_fill(lateral_conv)
                self.add_module(f"adapter_{idx + 1}", lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # coarse to fine, the order of the top-down pass
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def forward_features(self, features):
        multi_scale_features = []
        y = None
        for idx, f in enumerate(self.in_features[::-1]):
            x = features[f]
            if self.lateral_convs[idx] is None:
                y = self.output_convs[idx](x)
            else:
                cur_fpn = self.lateral_convs[idx](x)
                y = self.output_convs[idx](cur_fpn + F.interpolate(y, size=cur_fpn.shape[-2:], mode="nearest"))
            if len(multi_scale_features) < self.maskformer_num_feature_levels:
                multi_scale_features.append(y)
        return self.mask_features(y), None, multi_scale_features

    def forward(self, features, targets=None):
        logging.getLogger(__name__).warning("Calling forward() of a pixel decoder; use forward_features().")
        return self.forward_features(features)
