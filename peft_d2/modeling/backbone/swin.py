"""Swin Transformer backbone with the parameter layout of the official Mask2Former `D2SwinTransformer`.

Image (B, 3, H, W) -> patch embedding (stride 4) -> 4 stages of shifted-window blocks, each stage but the last
ending in patch merging (stride x2) -> one LayerNorm per output stage -> res2..res5 (strides 4, 8, 16, 32,
channels C, 2C, 4C, 8C). State-dict names match the official code so its checkpoints (and checkpoints made by
tools/convert_swin_to_d2.py) load unchanged.
"""

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn


@torch.no_grad()
def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Normal(mean, std) truncated to [a, b] by inverse-CDF sampling (consumes the RNG like timm's version, so a
    seeded model starts from the same weights as the official one)."""

    def norm_cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0)).add_(mean)
    return tensor.clamp_(min=a, max=b)


def drop_path(x, drop_prob: float, training: bool):
    """Stochastic depth: zero whole samples with probability drop_prob and rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of `drop_path`."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, on (..., C)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def window_partition(x, window_size: int):
    """(B, H, W, C) -> (B * nW, ws, ws, C); H and W multiples of ws."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size: int, H: int, W: int):
    """(B * nW, ws, ws, C) -> (B, H, W, C), the inverse of `window_partition`."""
    B = windows.shape[0] // ((H // window_size) * (W // window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def relative_position_index(window_size):
    """(Wh*Ww, Wh*Ww) int64 index into the (2Wh-1)(2Ww-1) relative-bias table for every token pair."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias.

    Args:
        dim: channels C. window_size: (Wh, Ww). num_heads: heads (C divisible by it).
        qkv_bias: bias on the packed q/k/v projection. qk_scale: overrides head_dim ** -0.5.
        attn_drop, proj_drop: dropout on the attention map and on the output.
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5

        num_relative = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative, num_heads))
        # persistent buffer: the official checkpoints carry it
        self.register_buffer("relative_position_index", relative_position_index(window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self):
        """(num_heads, N, N) bias, N = Wh * Ww."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()

    def forward(self, x, mask=None):
        """x: (B * nW, N, C); mask: (nW, N, N) of 0 / -100 for shifted windows, or None. Returns (B * nW, N, C)."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B * nW, heads, N, C / heads)

        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))

        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """x + DropPath(W-MSA or SW-MSA(LN(x))), then x + DropPath(MLP(LN(x))), on tokens (B, H*W, C).

    Even blocks of a stage use regular windows (shift_size 0), odd blocks windows shifted by ws // 2.
    """

    def __init__(
        self,
        dim,
        num_heads,
        window_size=7,
        shift_size=0,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} and {window_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim,
            window_size=(window_size, window_size),
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, H: int, W: int, attn_mask):
        """x: (B, H*W, C); attn_mask: (nW, ws*ws, ws*ws) shift mask of the padded map. Returns (B, H*W, C)."""
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"input has {L} tokens, expected H*W = {H}*{W}")
        x = x + self.drop_path(self.window_attention(self.norm1(x).view(B, H, W, C), attn_mask).view(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def window_attention(self, x, attn_mask):
        """(B, H, W, C) -> (B, H, W, C): pad to whole windows, cyclic shift, attend per window, undo both."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = x.shape[1:3]

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None

        windows = window_partition(x, ws).view(-1, ws * ws, C)
        windows = self.attn(windows, mask=attn_mask)
        x = window_reverse(windows.view(-1, ws, ws, C), ws, Hp, Wp)

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood, LayerNorm(4C), Linear 4C -> 2C.

    (B, H*W, C) -> (B, ceil(H/2) * ceil(W/2), 2C).
    """

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x, H: int, W: int):
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"input has {L} tokens, expected H*W = {H}*{W}")
        x = x.view(B, H, W, C)
        if H % 2 == 1 or W % 2 == 1:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # order (even row, even col), (odd, even), (even, odd), (odd, odd) as the official checkpoints expect
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


def shifted_window_mask(H: int, W: int, window_size: int, shift_size: int, device):
    """(nW, ws*ws, ws*ws) additive mask (0 or -100) that keeps shifted windows from mixing distant regions."""
    # ceil by non-negative floor division: ONNX's integer Div truncates, so -(-H // ws) would export as a floor
    Hp = (H + window_size - 1) // window_size * window_size
    Wp = (W + window_size - 1) // window_size * window_size
    img_mask = torch.zeros((1, Hp, Wp, 1), device=device)
    regions = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for h in regions:
        for w in regions:
            img_mask[:, h, w, :] = label
            label += 1
    mask_windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


class BasicLayer(nn.Module):
    """One Swin stage: `depth` blocks alternating regular / shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim,
        depth,
        num_heads,
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        norm_layer=nn.LayerNorm,
        downsample=None,
        use_checkpoint=False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None

    def forward(self, x, H: int, W: int):
        """x: (B, H*W, C). Returns (stage output (B, H*W, C), H, W, next input, next H, next W)."""
        attn_mask = shifted_window_mask(H, W, self.window_size, self.shift_size, x.device)
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = activation_checkpoint.checkpoint(blk, x, H, W, attn_mask, use_reentrant=False)
            else:
                x = blk(x, H, W, attn_mask)
        if self.downsample is None:
            return x, H, W, x, H, W
        return x, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch_size (input right/bottom zero-padded to a multiple), optional LayerNorm.

    (B, 3, H, W) -> (B, C, ceil(H / p), ceil(W / p)).
    """

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        _, _, H, W = x.shape
        ph, pw = self.patch_size
        x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        x = self.proj(x)
        if self.norm is not None:
            Wh, Ww = x.shape[2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, self.embed_dim, Wh, Ww)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer (Liu et al., 2021) returning normalised stage outputs {"res2": ..., "res5": ...}.

    Args follow the official backbone: pretrain_img_size (for the absolute position embedding when ape),
    patch_size, in_chans, embed_dim C, depths and num_heads per stage, window_size, mlp_ratio, qkv_bias,
    qk_scale, drop_rate, attn_drop_rate, drop_path_rate (linearly increasing over all blocks), norm_layer,
    ape, patch_norm, out_indices (stages with an output norm), use_checkpoint (activation checkpointing).
    """

    def __init__(
        self,
        pretrain_img_size=224,
        patch_size=4,
        in_chans=3,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        norm_layer=nn.LayerNorm,
        ape=False,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        use_checkpoint=False,
    ):
        super().__init__()
        self.pretrain_img_size = pretrain_img_size
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.out_indices = tuple(out_indices)

        self.patch_embed = PatchEmbed(
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None,
        )
        if ape:
            grid = (pretrain_img_size // patch_size, pretrain_img_size // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *grid))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(
                BasicLayer(
                    dim=int(embed_dim * 2**i),
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                    downsample=PatchMerging if i < self.num_layers - 1 else None,
                    use_checkpoint=use_checkpoint,
                )
            )
        self.num_features = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        for i in self.out_indices:
            self.add_module(f"norm{i}", norm_layer(self.num_features[i]))

    def forward(self, x):
        """x: (B, 3, H, W) -> {"res{i+2}": (B, C * 2**i, ceil(H / 2**(i+2)), ...) for i in out_indices}."""
        x = self.patch_embed(x)
        Wh, Ww = x.shape[2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(Wh, Ww), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))

        outs = {}
        for i, layer in enumerate(self.layers):
            x_out, H, W, x, Wh, Ww = layer(x, Wh, Ww)
            if i in self.out_indices:
                x_out = getattr(self, f"norm{i}")(x_out)
                outs[f"res{i + 2}"] = x_out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
        return outs


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer, Backbone):
    """`SwinTransformer` as a detectron2 backbone built from cfg.MODEL.SWIN.*; outputs MODEL.SWIN.OUT_FEATURES."""

    def __init__(self, cfg, input_shape):
        c = cfg.MODEL.SWIN
        super().__init__(
            pretrain_img_size=c.PRETRAIN_IMG_SIZE,
            patch_size=c.PATCH_SIZE,
            in_chans=3,
            embed_dim=c.EMBED_DIM,
            depths=c.DEPTHS,
            num_heads=c.NUM_HEADS,
            window_size=c.WINDOW_SIZE,
            mlp_ratio=c.MLP_RATIO,
            qkv_bias=c.QKV_BIAS,
            qk_scale=c.QK_SCALE,
            drop_rate=c.DROP_RATE,
            attn_drop_rate=c.ATTN_DROP_RATE,
            drop_path_rate=c.DROP_PATH_RATE,
            norm_layer=nn.LayerNorm,
            ape=c.APE,
            patch_norm=c.PATCH_NORM,
            use_checkpoint=c.USE_CHECKPOINT,
        )
        self._out_features = list(c.OUT_FEATURES)
        self._out_feature_strides = {f"res{i + 2}": 2 ** (i + 2) for i in range(self.num_layers)}
        self._out_feature_channels = {f"res{i + 2}": ch for i, ch in enumerate(self.num_features)}

    def forward(self, x):
        """x: (N, C, H, W), H and W multiples of `size_divisibility`. Returns {name: (N, C_i, H / s_i, W / s_i)}."""
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer takes an input of shape (N, C, H, W). Got {tuple(x.shape)} instead!")
        y = super().forward(x)
        return {k: v for k, v in y.items() if k in self._out_features}

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self):
        return 32
