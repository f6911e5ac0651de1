"""unetpp_tf: UNet++ (nested U-Net) image segmentation for Keras and TensorFlow.

Example:
    >>> import unetpp_tf
    >>> model = unetpp_tf.build_unetpp((96, 96, 1), deep_supervision=True)
    >>> model.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss(), metrics=[unetpp_tf.metrics.Dice()])
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from unetpp_tf._native_logs import native_stderr_silenced  # noqa: E402

with native_stderr_silenced():
    import tensorflow  # noqa: F401  (its native start-up notices stay off the terminal)

from unetpp_tf import data, export, losses, metrics, surface_distance, viz  # noqa: E402
from unetpp_tf import planning, postprocess, pruning_report  # noqa: E402
from unetpp_tf.config import TrainConfig  # noqa: E402
from unetpp_tf.evaluation import evaluate, evaluate_volumes  # noqa: E402
from unetpp_tf.inference import load_model, predict, predict_files  # noqa: E402
from unetpp_tf.models import (  # noqa: E402
    PRESETS,
    InputPreprocessing,
    build_deeplabv3plus,
    build_model,
    build_unet,
    build_unetpp,
    from_preset,
    inference_model,
    model_preprocessing,
    prune,
)
from unetpp_tf.training import train  # noqa: E402
from unetpp_tf.volume_inference import predict_scans, predict_volume, sliding_window_predict  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "InputPreprocessing",
    "TrainConfig",
    "__version__",
    "build_deeplabv3plus",
    "build_model",
    "build_unet",
    "build_unetpp",
    "data",
    "evaluate",
    "evaluate_volumes",
    "export",
    "from_preset",
    "inference_model",
    "load_model",
    "losses",
    "metrics",
    "model_preprocessing",
    "planning",
    "postprocess",
    "predict",
    "predict_files",
    "predict_scans",
    "predict_volume",
    "prune",
    "pruning_report",
    "sliding_window_predict",
    "surface_distance",
    "train",
    "viz",
]
