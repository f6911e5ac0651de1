"""Parity checking: run the Keras model and each exported file on the same images and compare.

Agreement is the mean per-image Dice between the Keras label map and the artifact's
probabilities (thresholded at 0.5, or argmax for several classes), computed with
`unetpp_tf.metrics`; an artifact below its threshold fails the export.

Example:
    >>> images = collect_images(data.test, (32, 32), 1, 16, "samples")
    >>> reference, keras_ms = timed(padded_forward(model), images)
    >>> agreement(reference, timed(TFLiteModel(path), images)[0])
    (0.9987, 0.0031)
"""

from __future__ import annotations

import math
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from unetpp_tf.metrics import confusion_counts, ratios_from_counts
from unetpp_tf.runners import images_of

DEFAULT_THRESHOLDS = {
    "keras": 0.99,
    "saved_model": 0.99,
    "onnx": 0.99,
    "none": 0.99,
    "float16": 0.99,
    "dynamic": 0.97,
    "int8": 0.97,
}


def thresholds_with(overrides: dict | None) -> dict:
    """`DEFAULT_THRESHOLDS` updated with `overrides`; an unknown key is an error.

    Example:
        >>> thresholds_with({"int8": 0.9})["int8"]
        0.9
    """
    bars = dict(DEFAULT_THRESHOLDS)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown thresholds key {key!r}; use any of {sorted(DEFAULT_THRESHOLDS)}.")
        bars[key] = float(value)
    return bars


def collect_images(source, size, channels: int, limit: int, what: str, spatial_dims: int = 2) -> list:
    """Up to `limit` float32 [1, H, W, C] images (or [1, D, H, W, C] volumes) from arrays, tensors or a dataset.

    Integer images are scaled by their dtype's range (uint16 / 65535, others / 255) as the
    data pipeline scales them; images of another size are resized to `size` when given
    (volumes must come at `size`: patches are not resampled here). `spatial_dims` is 3 for
    volume models. Defaults to 2.

    Example:
        >>> len(collect_images(data.test, (32, 32), 1, 16, "samples"))
        16
    """
    if isinstance(source, tuple) and len(source) == 2 and all(hasattr(s, "shape") for s in source):
        source = [source[0]]  # an (images, masks) pair, Keras-style
    elif isinstance(source, (np.ndarray, tf.Tensor)):
        source = [source]
    images = []
    for element in source:
        array = np.asarray(images_of(element))
        if array.ndim == spatial_dims + 1:
            array = array[None]
        if array.ndim != spatial_dims + 2:
            layout = "[B, H, W, C] or [H, W, C]" if spatial_dims == 2 else "[B, D, H, W, C] or [D, H, W, C]"
            raise ValueError(f"{what} must yield {layout}, got shape {array.shape}.")
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)
        array = array.astype(np.float32, copy=False)
        if array.shape[-1] != channels:
            raise ValueError(f"{what} images have {array.shape[-1]} channels; the model takes {channels}.")
        if size is not None and tuple(array.shape[1:-1]) != tuple(size):
            if spatial_dims != 2:
                raise ValueError(
                    f"{what} volumes have the size {array.shape[1:-1]}, the export {tuple(size)}: crop or pad "
                    f"them to {tuple(size)} (or pass image_size={array.shape[1:-1]})."
                )
            array = tf.image.resize(array, size, method="bilinear").numpy()
        images.extend(array[i : i + 1] for i in range(len(array)))
        if len(images) >= limit:
            break
    if not images:
        raise ValueError(f"{what} yielded no images.")
    return images[:limit]


def timed(fn, images: list) -> tuple[list, float]:
    """Run `fn` on each batch-1 image; return (list of float32 outputs, median ms after warm-up).

    Example:
        >>> outputs, ms = timed(runner, images)
    """
    outputs, times = [], []
    for image in images:
        start = time.perf_counter()
        outputs.append(np.asarray(fn(image), dtype=np.float32))
        times.append((time.perf_counter() - start) * 1000.0)
    latency = statistics.median(times[1:] if len(times) > 1 else times)
    return outputs, latency


def agreement(reference: list, candidate: list) -> tuple[float, float]:
    """(mean per-image Dice between label maps, max absolute probability difference).

    Example:
        >>> agreement([keras_probs], [tflite_probs])
        (1.0, 2.4e-07)
    """
    scores, max_diff = [], 0.0
    for ref, out in zip(reference, candidate):
        if out.shape != ref.shape:
            raise ValueError(f"artifact output shape {out.shape} differs from the Keras model's {ref.shape}.")
        classes = ref.shape[-1]
        if classes == 1:
            labels = (ref >= 0.5).astype(np.float32)
        else:
            labels = keras.ops.one_hot(np.argmax(ref, axis=-1), classes)
        counts = confusion_counts(labels, out, num_classes=classes, per_sample=True)
        dice = keras.ops.convert_to_numpy(ratios_from_counts(*counts)["dice"])
        scores.append(float(np.mean(dice)))
        max_diff = max(max_diff, float(np.max(np.abs(out - ref))))
    return float(np.mean(scores)), max_diff


def failures(artifacts: list) -> list:
    """The artifacts whose measured agreement is below their threshold.

    Example:
        >>> failures([{"dice_agreement": 0.5, "threshold": 0.99}])
        [{'dice_agreement': 0.5, 'threshold': 0.99}]
    """
    return [a for a in artifacts if a["dice_agreement"] is not None and a["dice_agreement"] < a["threshold"]]


def failure_message(failed: list, table: str, output_dir) -> str:
    """The error of a failed parity check: what failed, the report table, and what to do.

    Example:
        >>> raise ValueError(failure_message(failures(artifacts), format_report(report), "export"))
    """
    summary = "; ".join(f"{a['name']}: Dice agreement {a['dice_agreement']:.4f} < {a['threshold']}" for a in failed)
    suggested = {}
    for a in failed:
        key = a["quantize"] if a["format"] == "tflite" else a["format"]
        value = math.floor(a["dice_agreement"] * 100) / 100
        suggested[key] = min(value, suggested.get(key, value))
    keys = sorted(suggested)
    hint = ""
    if {"int8", "dynamic"} & set(keys):
        hint = ("Quantization lost too much: give int8 more representative calibration "
                "images (calibration=data.val) or use quantize='float16'. ")
    return (
        f"export failed its parity check ({summary}); nothing was written to {output_dir}.\n\n"
        + table + "\n"
        + f"{hint}To accept the difference pass thresholds="
        + "{" + ", ".join(f"{k!r}: {suggested[k]:.2f}" for k in keys) + "}."
    )
