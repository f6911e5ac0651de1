"""Intensity normalization inside the model, so every saved format applies it.

Images reach a model as the data pipeline gives them: scaled by their dtype's range (uint8 /
255, uint16 / 65535, floats kept). `InputPreprocessing` is the model's first layer and turns
them into what the network was trained on, so a `.keras` file, a SavedModel and a TFLite file
all normalize in their own graph and the same file gives the same mask through every path:

- "fixed": identity (the dtype-range scaling is the normalization);
- "dataset": `(x - low) / (high - low)` with constants (per channel or scalar) fixed at
  training time, e.g. percentiles of the training set;
- "minmax": per image `(x - min) / max(max - min, epsilon)`;
- "percentile": per image `(x - p_low) / max(p_high - p_low, epsilon)`, the percentiles as
  `np.percentile(..., method="linear")` computes them (`keras.ops.top_k` on the flattened
  image, only as many elements as each percentile needs: TFLite's builtin TOPK_V2);
- "zscore": per image `(x - mean) / max(std, epsilon)`.

Per-image statistics run over height, width and channels jointly. The layer also records how
the model was trained geometrically (`image_size`, `resize`), which it does not apply itself:
`unetpp_tf.predict_files` and the exporters read it with `model_preprocessing`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

NORMALIZE_MODES = ("fixed", "dataset", "minmax", "percentile", "zscore")
RESIZE_POLICIES = ("resize", "crop", "none")
LAYER_NAME = "preprocessing"


def _float_list(value, name: str) -> list[float]:
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be a finite float or a per-channel list of them, got {value!r}.")
    return [float(v) for v in values]


def _check_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        size = tuple(int(s) for s in image_size)
        ok = len(size) == 2 and all(s > 0 and s == v for s, v in zip(size, image_size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image_size must be (height, width) positive integers or None, got {image_size!r}.")
    return size


def _percentile(flat, q: float):
    """`np.percentile(flat, q, axis=1, method="linear")` for `flat` [B, N], via `top_k`.

    The order statistics around position q/100 * (N - 1) are read from the side of the sorted
    values nearer to them: the k largest values for q >= 50, the k smallest (top_k of -x) below.
    """
    n = flat.shape[1]
    if n is not None:  # static size: the position in float64, as NumPy computes it
        position = q / 100.0 * (n - 1)
        lower = math.floor(position)
        upper = min(lower + 1, n - 1)
        frac = position - lower
    else:  # None x None inputs (TensorFlow graphs): the same with the size as a tensor
        n = ops.shape(flat)[1]
        position = ops.cast(n - 1, "float64") * (q / 100.0)
        lower = ops.cast(ops.floor(position), "int32")
        upper = ops.minimum(lower + 1, n - 1)
        frac = ops.cast(position - ops.floor(position), flat.dtype)
    if q >= 50:
        values, _ = ops.top_k(flat, n - lower)  # descending: sorted[i] = values[n - 1 - i]
        below, above = ops.take(values, n - 1 - lower, axis=1), ops.take(values, n - 1 - upper, axis=1)
    else:
        values, _ = ops.top_k(-flat, upper + 1)  # ascending, negated: sorted[i] = -values[i]
        below, above = -ops.take(values, lower, axis=1), -ops.take(values, upper, axis=1)
    return below + (above - below) * frac


@keras.saving.register_keras_serializable(package="unetpp_tf")
class InputPreprocessing(keras.layers.Layer):
    """Normalize image intensities inside the model (first layer after the input).

    Inputs are float images [B, H, W, C] as the data pipeline gives them (scaled by their
    dtype's range: uint8 / 255, uint16 / 65535, floats kept). The layer has no weights; it
    computes in float32 whatever the global dtype policy. `image_size` and `resize` are not
    applied here: they record the training geometry for `predict_files` and the exporters.

    Args:
        normalize: str. "fixed" (identity), "dataset" (`(x - low) / (high - low)` with the
            constants `low`, `high`), "minmax", "percentile" or "zscore" (per image, over
            height, width and channels). Defaults to "fixed".
        low: float, list or None. "dataset" only: the value mapped to 0 (one per channel or
            a scalar). Defaults to None.
        high: float, list or None. "dataset" only: the value mapped to 1, above `low`.
            Defaults to None.
        percentiles: tuple. "percentile" only: (low, high) percentiles in [0, 100] mapped to
            0 and 1, computed as `np.percentile(..., method="linear")`. Defaults to (1.0, 99.8).
        epsilon: float. Floor of the per-image range or standard deviation, so a constant
            image gives zeros, never NaN. Defaults to 1e-6.
        image_size: tuple or None. The (height, width) the model was trained at, or None.
            Defaults to None.
        resize: str. How training images met `image_size`: "resize" (resized to it, so
            prediction resizes to it and the probabilities back), "crop" (crops at native
            scale; predict at native resolution) or "none". Defaults to "none".
        **kwargs: `keras.layers.Layer` arguments (name, ...).

    Example:
        >>> layer = InputPreprocessing("percentile", image_size=(64, 64), resize="resize")
        >>> tuple(layer(np.random.rand(2, 64, 64, 1).astype("float32")).shape)
        (2, 64, 64, 1)
    """

    def __init__(
        self,
        normalize: str = "fixed",
        *,
        low=None,
        high=None,
        percentiles=(1.0, 99.8),
        epsilon: float = 1e-6,
        image_size=None,
        resize: str = "none",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")  # statistics of 16-bit images need float32
        super().__init__(**kwargs)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}.")
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}.")
        if normalize == "dataset":
            if low is None or high is None:
                raise ValueError(
                    "normalize='dataset' needs low= and high= (e.g. the 1st and 99.8th percentiles of the "
                    "training images, scalars or one per channel); or choose 'percentile' for per-image values."
                )
            low, high = _float_list(low, "low"), _float_list(high, "high")
            if len(low) != len(high) and 1 not in (len(low), len(high)):
                raise ValueError(f"low has {len(low)} values and high {len(high)}; give one or one per channel each.")
            if not np.all(np.asarray(high) > np.asarray(low)):
                raise ValueError(f"normalize='dataset' needs high > low, got low={low}, high={high}.")
        elif low is not None or high is not None:
            raise ValueError(f"low and high apply to normalize='dataset' only; drop them for normalize={normalize!r}.")
        try:
            bounds = tuple(float(p) for p in percentiles)
        except (TypeError, ValueError):
            bounds = ()
        if len(bounds) != 2 or not 0.0 <= bounds[0] < bounds[1] <= 100.0:
            raise ValueError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100, e.g. (1.0, 99.8); got {percentiles!r}."
            )
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)) or not epsilon > 0:
            raise ValueError(f"epsilon must be a positive float, got {epsilon!r}.")
        image_size = _check_size(image_size)
        if resize == "resize" and image_size is None:
            raise ValueError("resize='resize' needs the training image_size=(height, width); or use resize='none'.")
        self.normalize = normalize
        self.low, self.high = low, high
        self.percentiles = bounds
        self.epsilon = float(epsilon)
        self.image_size = image_size
        self.resize = resize

    def build(self, input_shape):
        channels = input_shape[-1]
        if self.normalize == "dataset" and channels is not None:
            for label, values in (("low", self.low), ("high", self.high)):
                if len(values) not in (1, channels):
                    raise ValueError(
                        f"{label} has {len(values)} values but the images have {channels} channel(s); "
                        f"give one value or {channels}."
                    )
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.normalize == "fixed":
            return x
        if self.normalize == "dataset":
            low = ops.convert_to_tensor(np.asarray(self.low, np.float32), self.compute_dtype)
            high = ops.convert_to_tensor(np.asarray(self.high, np.float32), self.compute_dtype)
            return (x - low) / (high - low)
        axes = tuple(range(1, len(x.shape)))
        if self.normalize == "zscore":  # shifted by the minimum: exact zeros for a constant image
            x = x - ops.min(x, axis=axes, keepdims=True)
            mean = ops.mean(x, axis=axes, keepdims=True)
            std = ops.sqrt(ops.mean(ops.square(x - mean), axis=axes, keepdims=True))
            return (x - mean) / ops.maximum(std, self.epsilon)
        if self.normalize == "minmax":
            low = ops.min(x, axis=axes, keepdims=True)
            high = ops.max(x, axis=axes, keepdims=True)
        else:
            size = x.shape[1:]
            static = all(d is not None for d in size)
            flat = ops.reshape(x, (-1, math.prod(size)) if static else (ops.shape(x)[0], -1))
            keep = (-1,) + (1,) * len(size)
            low, high = (ops.reshape(_percentile(flat, q), keep) for q in self.percentiles)
        return (x - low) / ops.maximum(high - low, self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def settings(self) -> dict:
        """The preprocessing settings: normalize, low, high, percentiles, epsilon, image_size, resize."""
        return {
            "normalize": self.normalize,
            "low": self.low,
            "high": self.high,
            "percentiles": list(self.percentiles),
            "epsilon": self.epsilon,
            "image_size": None if self.image_size is None else list(self.image_size),
            "resize": self.resize,
        }

    def get_config(self):
        return {**super().get_config(), **self.settings()}


def preprocessing_layer(preprocessing) -> InputPreprocessing | None:
    """Turn a builder's `preprocessing` argument into the layer (named "preprocessing"), or None.

    Args:
        preprocessing: None, dict or InputPreprocessing. None adds no layer; a dict holds
            `InputPreprocessing` keyword arguments.

    Returns:
        InputPreprocessing or None.

    Example:
        >>> preprocessing_layer({"normalize": "zscore"}).name
        'preprocessing'
    """
    if preprocessing is None or isinstance(preprocessing, InputPreprocessing):
        return preprocessing
    if isinstance(preprocessing, dict):
        return InputPreprocessing(**{"name": LAYER_NAME, **preprocessing})
    raise ValueError(
        f"preprocessing must be None, a dict of InputPreprocessing arguments such as "
        f"{{'normalize': 'percentile'}}, or an InputPreprocessing layer; got {preprocessing!r}."
    )


def model_preprocessing(model) -> dict | None:
    """The `InputPreprocessing` settings of a model, or None when it has no such layer.

    Works on the models the builders return and on the single-output models made from them
    (`inference_model`, `prune`), which share its layers; nested models are searched too.
    Other objects give their `preprocessing` attribute: the exported-model runners
    (`unetpp_tf.export.TFLiteModel`, `SavedModelRunner`) read it from the file.

    Args:
        model: keras.Model or runner. A model, e.g. from `build_unetpp(..., preprocessing=...)`.

    Returns:
        dict or None: {"normalize", "low", "high", "percentiles", "epsilon", "image_size",
        "resize"} (image_size as a [height, width] list or None).

    Example:
        >>> model = build_unetpp((None, None, 1), depth=2, preprocessing={"normalize": "minmax"})
        >>> model_preprocessing(model)["normalize"]
        'minmax'
    """
    if not isinstance(model, keras.Model):
        return getattr(model, "preprocessing", None)
    for layer in model.layers:
        if isinstance(layer, InputPreprocessing):
            return layer.settings()
        if isinstance(layer, keras.Model):
            found = model_preprocessing(layer)
            if found is not None:
                return found
    return None
