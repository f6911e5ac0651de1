"""UNet++ and U-Net builders, presets and inference-time pruning."""

from unetpp_tf.models.blocks import conv_block, segmentation_head, upsample
from unetpp_tf.models.presets import ARCHITECTURES, PRESETS, build_model, from_preset
from unetpp_tf.models.pruning import INFERENCE_MODES, inference_model, prune, supervision_heads
from unetpp_tf.models.unetpp import build_unet, build_unetpp

__all__ = [
    "ARCHITECTURES",
    "INFERENCE_MODES",
    "PRESETS",
    "build_model",
    "build_unet",
    "build_unetpp",
    "conv_block",
    "from_preset",
    "inference_model",
    "prune",
    "segmentation_head",
    "supervision_heads",
    "upsample",
]
