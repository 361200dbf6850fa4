"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over res3..res5 plus an FPN step to res2.

backbone features -> input_proj (1x1 conv + GroupNorm per level, coarse to fine) + sine position + level embedding
-> N MSDeformAttn encoder layers over all levels at once -> split back into maps (res5, res4, res3 order)
-> lateral conv of res2 + upsampled finest map -> 3x3 output conv -> mask_features (1x1 conv, stride 4).
Returns (mask_features, coarsest encoder map, the 3 coarsest maps for the transformer decoder).
"""

import copy
import math
from collections.abc import Callable
from typing import Optional, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ... import ops
from ..position_encoding import PositionEmbeddingSine
from .ms_deform_attn import MSDeformAttn


def activation_fn(name: str):
    """ "relu" | "gelu" | "glu" -> the functional."""
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ValueError(f"activation should be relu/gelu/glu, not {name}.")
    return table[name]


def _at_least_float32(x):
    """Half types go up to float32 (deformable attention runs in float32); float64 stays (precision tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm layer: x = LN(x + MSDeformAttn(x + pos, x)); x = LN(x + FFN(x)). Tokens (N, S, d)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor, pos):
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, src):
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """src, pos: (N, S, d); reference_points: (N, S, L, 2). Returns (N, S, d)."""
        src2 = self.self_attn(
            self.with_pos_embed(src, pos), reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of `num_layers` copies of one encoder layer; every token is its own reference point."""

    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        """Pixel centres of every level, normalised by the valid area: (N, S, L, 2) as (x, y).
        spatial_shapes: the (H_l, W_l) int pairs (or an (L, 2) tensor, as the official code passes)."""
        points = []
        for lvl, (H, W) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, H - 0.5, H, dtype=torch.float32, device=device),
                torch.linspace(0.5, W - 0.5, W, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None):
        """src: (N, S, d); valid_ratios: (N, L, 2). Returns (N, S, d)."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens L maps into one token sequence (adding a learned level embedding to the position) and encodes it."""

    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        activation="relu",
        num_feature_levels=4,
        enc_n_points=4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        encoder_layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = MSDeformAttnTransformerEncoder(encoder_layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask):
        """(N, H, W) bool padding mask -> (N, 2) valid fraction (w, h)."""
        _, H, W = mask.shape
        valid_H = torch.sum(~mask[:, :, 0], 1)
        valid_W = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    def forward(self, srcs, pos_embeds):
        """srcs, pos_embeds: L maps (N, d, H_l, W_l). Returns memory (N, S, d), the levels' [(H_l, W_l)] and their
        start offsets in S (Python ints; the official code returns them as tensors)."""
        masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs]
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append((int(src.shape[-2]), int(src.shape[-1])))  # (ints when jit.trace gives tensors)
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        # the levels travel as Python ints: no host read of a tensor per layer, and export traces them as constants
        level_start_index = ops.level_starts(shapes)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flatten, shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten)
        return memory, shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """The Mask2Former pixel decoder (used through MaskFormerHead: MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME)."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: list[str],
        common_stride: int,
    ):
        """
        Args:
            input_shape: backbone features used (channels, stride), e.g. res2..res5.
            transformer_dropout, transformer_nheads, transformer_dim_feedforward, transformer_enc_layers:
                the deformable encoder (4 sampling points per head and level, as in the official code).
            conv_dim: channels of every map inside the decoder (multiple of 32: GroupNorm(32)).
            mask_dim: channels of mask_features.
            norm: norm of the FPN convs ("" = none, with bias).
            transformer_in_features: features fed to the encoder (e.g. res3, res4, res5).
            common_stride: stride of mask_features; FPN levels are added down to it.
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]  # fine to coarse: res2 .. res5
        self.feature_strides = [v.stride for _, v in shapes]
        self.feature_channels = [v.channels for _, v in shapes]

        tr_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in tr_shapes]
        transformer_in_channels = [v.channels for _, v in tr_shapes]
        self.transformer_feature_strides = [v.stride for _, v in tr_shapes]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # one 1x1 projection per encoder level, coarse to fine (res5 first)
        proj_channels = (
            transformer_in_channels[::-1] if self.transformer_num_feature_levels > 1 else [transformer_in_channels[-1]]
        )
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim)) for c in proj_channels
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the transformer decoder always takes 3 scales
        self.common_stride = common_stride

        # FPN levels finer than the encoder's finest input, down to common_stride
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(math.log2(stride) - math.log2(self.common_stride))
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            # official state-dict names: adapter_{i} (lateral), layer_{i} (output)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # coarse to fine, the order of the top-down pass; plain lists so the parameters keep the names above
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            # the official code fixes the encoder FFN at 1024 (DIM_FEEDFORWARD is the decoder's)
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(self, features):
        """features: {name: (N, C, H, W)}. Returns
        mask_features (N, mask_dim, H/4, W/4), the coarsest encoder map (N, conv_dim, H/32, W/32) and
        the maskformer_num_feature_levels coarsest maps (coarse to fine), all float32."""
        device_type = next(iter(features.values())).device.type
        if not torch.is_autocast_enabled(device_type):  # (no autocast region in an exported graph)
            return self._forward_features(features)
        with torch.autocast(device_type=device_type, enabled=False):  # deformable attention runs in float32
            return self._forward_features(features)

    def _forward_features(self, features):
        srcs, pos = [], []
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = _at_least_float32(features[f])
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, spatial_shapes, level_start_index = self.transformer(srcs, pos)

        bs = y.shape[0]
        sizes = [h * w for h, w in spatial_shapes]
        out = [z.transpose(1, 2).view(bs, -1, h, w) for z, (h, w) in zip(torch.split(y, sizes, dim=1), spatial_shapes)]

        # top-down FPN steps to the finer backbone levels (bilinear upsampling)
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            cur_fpn = self.lateral_convs[idx](_at_least_float32(features[f]))
            up = F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](cur_fpn + up))

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features
