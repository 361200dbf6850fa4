"""Mask2Former-compatible model on detectron2 (official parameter names, so model-zoo checkpoints load).

Importing this package registers:
  BACKBONE_REGISTRY:             D2SwinTransformer, D2ViTSimpleFeaturePyramid, D2SAMSimpleFeaturePyramid
  SEM_SEG_HEADS_REGISTRY:        MaskFormerHead, MSDeformAttnPixelDecoder, BasePixelDecoder
  META_ARCH_REGISTRY:            MaskFormer
  TRANSFORMER_DECODER_REGISTRY:  MultiScaleMaskedTransformerDecoder (ours, peft_d2.modeling.transformer_decoder)
"""

from .backbone import (
    D2SAMSimpleFeaturePyramid,
    D2SwinTransformer,
    D2ViTSimpleFeaturePyramid,
    SwinTransformer,
    add_sam_config,
)
from .config import add_maskformer2_config, add_vit_config
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .meta_arch import MaskFormer, MaskFormerHead
from .pixel_decoder import BasePixelDecoder, MSDeformAttn, MSDeformAttnPixelDecoder, build_pixel_decoder
from .transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

__all__ = [
    "BasePixelDecoder",
    "D2SAMSimpleFeaturePyramid",
    "D2SwinTransformer",
    "D2ViTSimpleFeaturePyramid",
    "HungarianMatcher",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MaskFormer",
    "MaskFormerHead",
    "MultiScaleMaskedTransformerDecoder",
    "SetCriterion",
    "SwinTransformer",
    "TRANSFORMER_DECODER_REGISTRY",
    "add_maskformer2_config",
    "add_sam_config",
    "add_vit_config",
    "build_pixel_decoder",
    "build_transformer_decoder",
]
