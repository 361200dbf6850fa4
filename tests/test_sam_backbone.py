"""SAM's image encoder as a detectron2 backbone: SAM's parameter names and outputs, and PEFT on its blocks."""

import pytest
import torch
from detectron2.config import get_cfg

from peft_d2 import AdapterConfig, LoRAConfig, PeftConfig, inject
from peft_d2.modeling.backbone.sam import D2SAMSimpleFeaturePyramid, add_sam_config, load_sam_encoder_state
from peft_d2.tuners.prefix import PrefixConfig

segment_anything = pytest.importorskip("segment_anything")


def tiny_cfg():
    cfg = add_sam_config(get_cfg())
    s = cfg.MODEL.SAM
    s.IMG_SIZE, s.PATCH_SIZE, s.EMBED_DIM, s.DEPTH, s.NUM_HEADS = 64, 16, 32, 3, 2
    s.GLOBAL_ATTN_INDEXES, s.WINDOW_SIZE, s.NECK_CHANS, s.OUT_CHANNELS = [2], 2, 16, 24
    return cfg


def official_encoder():
    from functools import partial

    from segment_anything.modeling.image_encoder import ImageEncoderViT

    torch.manual_seed(5)
    return ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                           qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                           window_size=2, global_attn_indexes=(2,)).eval()


def test_official_state_dict_loads_and_outputs_match():
    backbone = D2SAMSimpleFeaturePyramid(tiny_cfg(), None).eval()
    official = official_encoder()
    missing, unexpected = load_sam_encoder_state(backbone, {f"image_encoder.{k}": v
                                                            for k, v in official.state_dict().items()})
    assert missing == [] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.net(x)["sam_feat"], official(x), rtol=1e-5, atol=1e-5)
        out = backbone(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 24, 16, 16), "res3": (2, 24, 8, 8), "res4": (2, 24, 4, 4), "res5": (2, 24, 2, 2)}
    assert backbone.output_shape()["res3"].stride == 8 and backbone.size_divisibility == 32


def test_other_input_sizes_resize_position_embeddings():
    backbone = D2SAMSimpleFeaturePyramid(tiny_cfg(), None).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 128))
    assert out["res4"].shape == (1, 24, 6, 8)  # stride 16


def test_peft_on_sam_blocks_is_exact_when_fresh():
    backbone = D2SAMSimpleFeaturePyramid(tiny_cfg(), None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
    cfg = PeftConfig(methods=("lora", "adapter"), lora=LoRAConfig(r=4, targets=["net.blocks.*.attn.qkv",
                                                                               "net.blocks.*.mlp.lin1"]),
                     adapter=AdapterConfig(num_per_site=2, placements=("attn", "mlp")))
    report = inject(backbone, cfg)
    assert report["by_method"]["lora"] == 3 * (2 * 4 * (32 + 32) + 4 * (32 + 128))
    with torch.no_grad():
        after = backbone(x)
    for k in before:
        assert torch.equal(before[k], after[k])
    prefixed = D2SAMSimpleFeaturePyramid(tiny_cfg(), None)
    inject(prefixed, PeftConfig(methods=("prefix",), prefix=PrefixConfig(length=2)))
    assert type(prefixed.net.blocks[0].attn).__name__ == "PrefixAttention"
    sum(v.sum() for v in prefixed(x).values()).backward()
    assert prefixed.net.blocks[2].attn.prefix.keys.grad.abs().sum() > 0
