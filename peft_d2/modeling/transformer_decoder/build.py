"""Registry of Mask2Former transformer decoders (ours; the official code keeps a separate registry object)."""

from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for the transformer decoder of MaskFormer / Mask2Former, called as
``obj(cfg, in_channels, mask_classification)``.
"""


def build_transformer_decoder(cfg, in_channels, mask_classification=True):
    """Build cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME from TRANSFORMER_DECODER_REGISTRY."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
