from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "MultiScaleMaskedTransformerDecoder", "build_transformer_decoder"]
