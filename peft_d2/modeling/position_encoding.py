"""Sine positional encoding of a feature map (DETR), shared by the pixel decoder and the transformer decoder."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine encoding: `num_pos_feats` channels for y, then as many for x.

    Args:
        num_pos_feats: channels per axis (output has 2 * num_pos_feats channels).
        temperature: base of the geometric frequency progression.
        normalize: scale cumulative coordinates to [0, scale] before encoding.
        scale: the normalised range (default 2 * pi); only with normalize=True.
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask=None):
        """x: (N, C, H, W) (only its shape and device are used); mask: (N, H, W) bool, True = padding.
        Returns (N, 2 * num_pos_feats, H, W) float32."""
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = self._interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = self._interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    @staticmethod
    def _interleave_sin_cos(t):
        """(N, H, W, F) -> (N, H, W, F): sin of even channels and cos of odd channels, interleaved."""
        return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=4).flatten(3)
