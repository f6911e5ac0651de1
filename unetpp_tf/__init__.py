"""unetpp_tf: UNet++ (nested U-Net) image segmentation for Keras and TensorFlow.

Example:
    >>> import unetpp_tf
    >>> model = unetpp_tf.build_unetpp((96, 96, 1), deep_supervision=True)
    >>> model.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss(), metrics=[unetpp_tf.metrics.Dice()])
"""

from unetpp_tf import losses, metrics
from unetpp_tf.models import (
    PRESETS,
    build_model,
    build_unet,
    build_unetpp,
    from_preset,
    inference_model,
    prune,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "__version__",
    "build_model",
    "build_unet",
    "build_unetpp",
    "from_preset",
    "inference_model",
    "losses",
    "metrics",
    "prune",
]
