"""UNet++ and U-Net (2D and 3D), DeepLabV3+, pretrained encoders, presets, preprocessing, pruning, recomputation."""

from unetpp_tf.models.analysis import count_flops, size_divisor
from unetpp_tf.models.blocks import conv_block, segmentation_head, upsample
from unetpp_tf.models.deeplab import build_deeplabv3plus
from unetpp_tf.models.encoders import ENCODERS, EncoderPreprocessing, encoder_features, encoder_layers, encoder_spec
from unetpp_tf.models.ensemble import ensemble_model
from unetpp_tf.models.layers import ConcatConv2D, ConcatConv3D, VolumeUpsampling
from unetpp_tf.models.preprocessing import NORMALIZE_MODES, RESIZE_POLICIES, InputPreprocessing, model_preprocessing
from unetpp_tf.models.presets import ARCHITECTURES, PRESETS, build_model, from_preset
from unetpp_tf.models.pruning import INFERENCE_MODES, inference_model, prune, supervision_heads
from unetpp_tf.models.recompute import NestedModel, RecomputedModel, recompute_unavailable, with_recompute
from unetpp_tf.models.unetpp import build_unet, build_unetpp, pool_sizes_for_spacing

__all__ = [
    "ARCHITECTURES",
    "ConcatConv2D",
    "ConcatConv3D",
    "ENCODERS",
    "EncoderPreprocessing",
    "INFERENCE_MODES",
    "NORMALIZE_MODES",
    "PRESETS",
    "RESIZE_POLICIES",
    "InputPreprocessing",
    "NestedModel",
    "RecomputedModel",
    "build_deeplabv3plus",
    "build_model",
    "build_unet",
    "build_unetpp",
    "conv_block",
    "count_flops",
    "encoder_features",
    "encoder_layers",
    "encoder_spec",
    "ensemble_model",
    "from_preset",
    "inference_model",
    "model_preprocessing",
    "pool_sizes_for_spacing",
    "prune",
    "recompute_unavailable",
    "segmentation_head",
    "size_divisor",
    "supervision_heads",
    "upsample",
    "VolumeUpsampling",
    "with_recompute",
]
