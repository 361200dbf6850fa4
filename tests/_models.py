"""Tiny detectron2 backbones shared by the tests."""

import torch
from detectron2.modeling.backbone import SwinTransformer, ViT


def tiny_swin():
    torch.manual_seed(1)
    return SwinTransformer(
        pretrain_img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
        out_indices=(0, 1),
    ).eval()


def tiny_vit():
    torch.manual_seed(2)
    return ViT(img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=4, window_size=4,
               window_block_indexes=(0, 1), use_rel_pos=True, out_feature="last_feat").eval()


def images(n=2, size=64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g)
