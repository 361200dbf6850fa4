from .build import build_pixel_decoder
from .fpn import BasePixelDecoder
from .ms_deform_attn import MSDeformAttn
from .msdeformattn import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoder,
    MSDeformAttnTransformerEncoderLayer,
    MSDeformAttnTransformerEncoderOnly,
)

__all__ = [
    "BasePixelDecoder",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoderOnly",
    "build_pixel_decoder",
]
