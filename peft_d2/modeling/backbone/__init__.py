from .sam import D2SAMSimpleFeaturePyramid, add_sam_config
from .swin import D2SwinTransformer, SwinTransformer
from .vit import D2ViTSimpleFeaturePyramid

__all__ = ["D2SAMSimpleFeaturePyramid", "D2SwinTransformer", "D2ViTSimpleFeaturePyramid", "SwinTransformer",
           "add_sam_config"]
