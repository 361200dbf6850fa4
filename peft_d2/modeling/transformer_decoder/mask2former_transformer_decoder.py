"""Mask2Former's masked-attention transformer decoder (Cheng et al., 2022), official parameter names.

Learnable queries (Q, d) + query position. A prediction head (LayerNorm -> class Linear, mask MLP . mask_features)
runs on the initial queries and after every layer; each layer i
  1. masked cross-attention to level i % 3 of the pixel decoder (keys outside the previous mask, < 0.5, hidden),
  2. self-attention among the queries,
  3. FFN.
Sequences are (length, batch, d) as nn.MultiheadAttention expects by default.
"""

import logging
from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import Tensor, nn

from ..position_encoding import PositionEmbeddingSine
from .build import TRANSFORMER_DECODER_REGISTRY


def activation_fn(name: str):
    """ "relu" | "gelu" | "glu" -> the functional."""
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ValueError(f"activation should be relu/gelu/glu, not {name}.")
    return table[name]


def with_pos_embed(tensor, pos: Optional[Tensor]):
    return tensor if pos is None else tensor + pos


def xavier_init_matrices(module: nn.Module):
    """Xavier-uniform on every parameter with 2+ dims (biases and norms keep their defaults)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Query self-attention; post-norm LN(x + SA(x + pos, x + pos, x)) or pre-norm x + SA(LN(x) ...)."""

    def __init__(self, d_model, nhead, dropout=0.0, activation="relu", normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        xavier_init_matrices(self)

    def forward(self, tgt, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        """tgt, query_pos: (Q, N, d). Returns (Q, N, d)."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = with_pos_embed(x, query_pos)
        tgt2 = self.self_attn(q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout(tgt2)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to image tokens (keys carry the position); memory_mask True = not allowed to attend."""

    def __init__(self, d_model, nhead, dropout=0.0, activation="relu", normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        xavier_init_matrices(self)

    def forward(self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None):
        """tgt, query_pos: (Q, N, d); memory, pos: (HW, N, d); memory_mask: (N * heads, Q, HW) bool."""
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt2 = self.multihead_attn(
            query=with_pos_embed(x, query_pos),
            key=with_pos_embed(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        tgt = tgt + self.dropout(tgt2)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """linear1 -> activation -> dropout -> linear2 with residual and LayerNorm (post- or pre-norm)."""

    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, activation="relu", normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        xavier_init_matrices(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (the mask embedding head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """The Mask2Former decoder. forward returns {"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, H/4, W/4),
    "aux_outputs": [the same for the initial queries and every layer but the last]}."""

    _version = 2

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            renamed = False
            for k in list(state_dict.keys()):
                if k.startswith(prefix) and "static_query" in k:
                    state_dict[k.replace("static_query", "query_feat")] = state_dict.pop(k)
                    renamed = True
            if renamed:
                logging.getLogger(__name__).warning(
                    f"Weight format of {self.__class__.__name__} has changed; converting 'static_query' keys."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @configurable
    def __init__(
        self,
        in_channels,
        mask_classification=True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: channels of the multi-scale features (the pixel decoder's conv_dim).
            mask_classification: must be True (mask classification model).
            num_classes: K, without the no-object class.
            hidden_dim: d. num_queries: Q. nheads: attention heads. dim_feedforward: FFN width.
            dec_layers: number of layers (cfg DEC_LAYERS - 1: the initial queries count as one prediction).
            pre_norm: pre-LayerNorm layers. mask_dim: channels of mask_features.
            enforce_input_project: a 1x1 conv on the features even when in_channels == hidden_dim.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("Only support mask classification model")
        self.mask_classification = mask_classification

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(d_model=hidden_dim, dim_feedforward=dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query position

        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(Conv2d(in_channels, hidden_dim, kernel_size=1))
                weight_init.c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # the initial queries are supervised too, so DEC_LAYERS predictions need DEC_LAYERS - 1 layers
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }

    def forward(self, x, mask_features, mask=None):
        """x: 3 maps (N, C, H_i, W_i), coarse to fine; mask_features: (N, mask_dim, H/4, W/4); mask: unused."""
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        del mask  # padding masks are not used (no effect on accuracy in the paper)

        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            # (N, C, H, W) -> (HW, N, C)
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            level = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))

        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)  # (Q, N, d)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(output, mask_features, size_list[0])
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            # a query whose mask is empty everywhere may attend to everything
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)  # (no data-dependent indexing: exportable)
            output = self.transformer_cross_attention_layers[i](
                output,
                src[level_index],
                memory_mask=attn_mask,
                memory_key_padding_mask=None,
                pos=pos[level_index],
                query_pos=query_embed,
            )
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_embed
            )
            output = self.transformer_ffn_layers[i](output)

            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels]
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": self._set_aux_loss(predictions_class, predictions_mask),
        }

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        """output: (Q, N, d). Returns class logits (N, Q, K+1), mask logits (N, Q, H/4, W/4) and the next
        layer's attention mask (N * heads, Q, h*w) bool at attn_mask_target_size (True = masked out)."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)

        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return outputs_class, outputs_mask, attn_mask.detach()

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class, outputs_seg_masks):
        return [{"pred_logits": a, "pred_masks": b} for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1])]
