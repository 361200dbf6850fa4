"""MaskFormerHead: pixel decoder + transformer decoder, registered as a detectron2 semantic-segmentation head."""

import logging

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..pixel_decoder.build import build_pixel_decoder
from ..transformer_decoder.build import build_transformer_decoder


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """features -> pixel_decoder.forward_features -> predictor (transformer decoder) -> predictions dict.

    TRANSFORMER_IN_FEATURE picks the decoder input: "multi_scale_pixel_decoder" (Mask2Former: 3 pixel-decoder
    maps), "transformer_encoder", "pixel_embedding", or a backbone feature name.
    """

    _version = 2

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # MaskFormer v1 kept pixel-decoder weights directly under the head; move them
            renamed = False
            for k in list(state_dict.keys()):
                if not k.startswith(prefix):
                    continue
                rest = k[len(prefix) :]
                if rest.startswith(("predictor.", "pixel_decoder.")):
                    continue
                state_dict[prefix + "pixel_decoder." + rest] = state_dict.pop(k)
                renamed = True
            if renamed:
                logging.getLogger(__name__).warning(
                    f"Weight format of {self.__class__.__name__} has changed; moving keys under 'pixel_decoder.'."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        """
        Args:
            input_shape: backbone features the head uses.
            num_classes: K. pixel_decoder: module with forward_features. loss_weight, ignore_value: kept for
                the sem-seg head interface. transformer_predictor: the transformer decoder.
            transformer_in_feature: see the class docstring.
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if in_feature in ("transformer_encoder", "multi_scale_pixel_decoder"):
            predictor_in_channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        elif in_feature == "pixel_embedding":
            predictor_in_channels = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
        else:
            predictor_in_channels = input_shape[in_feature].channels
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES},
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "transformer_in_feature": in_feature,
            "transformer_predictor": build_transformer_decoder(cfg, predictor_in_channels, mask_classification=True),
        }

    def forward(self, features, mask=None):
        return self.layers(features, mask)

    def layers(self, features, mask=None):
        mask_features, transformer_encoder_features, multi_scale_features = self.pixel_decoder.forward_features(
            features
        )
        if self.transformer_in_feature == "multi_scale_pixel_decoder":
            return self.predictor(multi_scale_features, mask_features, mask)
        if self.transformer_in_feature == "transformer_encoder":
            if transformer_encoder_features is None:
                raise ValueError("TRANSFORMER_IN_FEATURE 'transformer_encoder' needs a pixel decoder with an encoder")
            return self.predictor(transformer_encoder_features, mask_features, mask)
        if self.transformer_in_feature == "pixel_embedding":
            return self.predictor(mask_features, mask_features, mask)
        return self.predictor(features[self.transformer_in_feature], mask_features, mask)
