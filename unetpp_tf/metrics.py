"""Streaming segmentation metrics: Dice, IoU, precision, recall, F1 and pixel accuracy.

The metrics accumulate per-class confusion counts (TP, FP, FN, TN) over every
`update_state` call, so `result()` is the score of the whole dataset, not a mean of
batch means. The counting (`confusion_counts`) and the formulas (`ratios_from_counts`)
are pure functions that the evaluation code reuses for per-image scores. Only
`keras.ops` is used, so the metrics run on the TensorFlow, JAX and PyTorch backends.

Binary models (num_classes=1) predict foreground where p >= threshold and are scored on
the foreground class. Multi-class models predict the argmax class. A ratio whose
denominator is 0 returns `zero_division`: a class absent from both the mask and the
prediction scores 1.0 by default.

Conventions, and where other implementations differ (the tests cross-check the first two):
- Pooling: counts are summed over every pixel of every image and batch, then each class's
  ratio is taken, then the mean over classes. `keras.metrics.MeanIoU` / `keras.metrics.IoU`
  pool the same way and agree with `IoU` whenever every class occurs in the mask or the
  prediction (up to the 1e-7 Keras adds to the denominator); `keras.metrics.F1Score` on the
  pixels flattened to (N, C) agrees with `Dice` and `F1Score` likewise. A mean of per-image
  scores (MONAI's `DiceMetric` default, or the per-image table of
  `unetpp_tf.evaluation`, which uses `confusion_counts(..., per_sample=True)`) differs:
  an image with one missed pixel counts as much as one with thousands.
- Absent classes: a class in neither mask nor prediction scores `zero_division` (1.0) and
  stays in the mean; Keras' IoU metrics leave such a class out of the mean instead (pass
  `zero_division=0.0` to count it as 0; no setting here drops it).
- Binary: the foreground class only, like `keras.metrics.BinaryIoU(target_class_ids=[1])`
  (whose `target_class_ids=[0, 1]` averages in the background too, as `num_classes=2` does
  here). Foreground is p >= threshold, as in BinaryIoU; `keras.metrics.F1Score` uses p > threshold.
- Void pixels: multi-class ids outside 0..num_classes-1 (e.g. 255) are ignored, like Keras'
  out-of-range ids or `ignore_class=255`.
- No smoothing: the ratios are exact. The Dice loss (`unetpp_tf.losses.dice_loss`) adds
  `smooth=1` to numerator and denominator of each image's soft Dice, so 1 - loss is not this
  metric: a 1-pixel mask predicted as 2 pixels scores Dice 2/3 here and 3/4 in the loss.
"""

from __future__ import annotations

import inspect

import keras
from keras import ops

from .losses import _document, _prepare

_ARG_DOCS = {
    "y_true": "tensor. Target, one-hot/binary (batch, H, W, C) or class ids "
    "(batch, H, W[, 1]). Multi-class pixels whose one-hot row is all zero are ignored "
    "(on TensorFlow and JAX that includes 'void' ids >= num_classes, e.g. 255). "
    "Volumes add a depth axis: (batch, D, H, W, C).",
    "y_pred": "tensor. Prediction (batch, H, W, C) or (batch, D, H, W, C): probabilities, "
    "or logits with `from_logits=True`.",
    "num_classes": "int. 1 for a binary (sigmoid) model, else the number of softmax "
    "channels.",
    "threshold": "float. Binary only: foreground where the probability is >= threshold; "
    "must lie in (0, 1).",
    "class_id": "int or None. Report only this class's value; None reports the mean over "
    "classes (the foreground value for binary).",
    "from_logits": "bool. Whether `y_pred` holds logits instead of probabilities.",
    "zero_division": "float. Value of a ratio whose denominator is 0, e.g. for a class "
    "absent from both the mask and the prediction.",
    "sample_weight": "tensor or None. Weights of shape (batch,), (batch, H, W) or "
    "(batch, H, W, 1); they weight the counts.",
    "per_sample": "bool. Keep the batch axis: counts of shape (batch, num_classes) instead "
    "of (num_classes,).",
    "tp": "tensor. True positive counts, shape (..., num_classes).",
    "fp": "tensor. False positive counts, shape (..., num_classes).",
    "fn": "tensor. False negative counts, shape (..., num_classes).",
    "tn": "tensor. True negative counts, shape (..., num_classes).",
    "name": "str. Name of the metric instance.",
    "dtype": "str. Dtype of the result; None uses `keras.backend.floatx()`.",
}


def _validate(num_classes, threshold, class_id=None):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes={num_classes!r} is invalid; pass 1 for a binary (sigmoid) model "
            "or the number of softmax channels (>= 2)."
        )
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold} must lie strictly between 0 and 1, e.g. 0.5.")
    if class_id is not None and not 0 <= class_id < num_classes:
        raise ValueError(
            f"class_id={class_id} is out of range for num_classes={num_classes}; "
            f"pass an id in [0, {num_classes - 1}] or None for the mean over classes."
        )


def _pixel_weights(sample_weight, rank):
    """Reshape sample weights so they broadcast against (batch, H, W, C)."""
    weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    if len(weights.shape) == 1:
        return ops.reshape(weights, (-1,) + (1,) * (rank - 1))
    if len(weights.shape) == rank - 1:
        return ops.expand_dims(weights, -1)
    if len(weights.shape) in (0, rank):
        return weights
    raise ValueError(
        f"sample_weight of shape {tuple(weights.shape)} cannot weight a prediction of "
        f"rank {rank}; pass shape (batch,), the prediction's shape without its channel axis "
        "((batch, H, W), or (batch, D, H, W) for volumes) or with one channel."
    )


@_document(_ARG_DOCS)
def confusion_counts(y_true, y_pred, num_classes=1, threshold=0.5, from_logits=False,
                     sample_weight=None, per_sample=False):
    """Count (weighted) TP, FP, FN and TN pixels per class.

    Args:
        {args}

    Returns:
        Tuple (tp, fp, fn, tn) of float32 tensors, shape (num_classes,) or
        (batch, num_classes) with `per_sample=True`. Binary counts are for the foreground.

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> tp, fp, fn, tn = confusion_counts(y, 0.9 * y)
        >>> keras.ops.convert_to_numpy(tp)
        array([32.], dtype=float32)
    """
    _validate(num_classes, threshold)
    y_true, probs = _prepare(y_true, y_pred, from_logits)
    channels = probs.shape[-1]
    if channels != num_classes:
        hint = (f"pass num_classes={channels}" if channels > 1
                else "use num_classes=1 for a single sigmoid channel")
        raise ValueError(
            f"y_pred has {channels} channels but num_classes={num_classes}; {hint}."
        )
    rank = len(probs.shape)
    if num_classes == 1:
        truth = ops.cast(y_true >= 0.5, "float32")
        pred = ops.cast(probs >= threshold, "float32")
        weights = None
    else:
        truth = ops.one_hot(ops.argmax(y_true, axis=-1), num_classes, dtype="float32")
        pred = ops.one_hot(ops.argmax(probs, axis=-1), num_classes, dtype="float32")
        weights = ops.cast(ops.max(y_true, axis=-1, keepdims=True) > 0, "float32")
    if sample_weight is not None:
        scaled = _pixel_weights(sample_weight, rank)
        weights = scaled if weights is None else weights * scaled
    if weights is not None:
        truth_w, miss_w = truth * weights, (1.0 - truth) * weights
    else:
        truth_w, miss_w = truth, 1.0 - truth
    axes = tuple(range(1 if per_sample else 0, rank - 1))
    return (
        ops.sum(truth_w * pred, axis=axes),
        ops.sum(miss_w * pred, axis=axes),
        ops.sum(truth_w * (1.0 - pred), axis=axes),
        ops.sum(miss_w * (1.0 - pred), axis=axes),
    )


def _ratio(numerator, denominator, zero_division):
    positive = denominator > 0
    return ops.where(positive, numerator / ops.where(positive, denominator, 1.0), zero_division)


@_document(_ARG_DOCS)
def ratios_from_counts(tp, fp, fn, tn, zero_division=1.0):
    """Per-class scores from confusion counts.

    dice = 2TP / (2TP + FP + FN), iou = TP / (TP + FP + FN), precision = TP / (TP + FP),
    recall = TP / (TP + FN), f1 = 2PR / (P + R) (0 when P + R = 0; equal to dice unless a
    class has no pixel in mask and prediction), accuracy = (TP + TN) / all pixels.

    Args:
        {args}

    Returns:
        Dict with keys "dice", "iou", "precision", "recall", "f1", "accuracy", each a
        float32 tensor shaped like the counts.

    Example:
        >>> ratios = ratios_from_counts([3.0], [1.0], [0.0], [4.0])
        >>> float(ratios["iou"][0])
        0.75
    """
    tp, fp, fn, tn = (ops.cast(ops.convert_to_tensor(c), "float32") for c in (tp, fp, fn, tn))
    precision = _ratio(tp, tp + fp, zero_division)
    recall = _ratio(tp, tp + fn, zero_division)
    return {
        "dice": _ratio(2.0 * tp, 2.0 * tp + fp + fn, zero_division),
        "iou": _ratio(tp, tp + fp + fn, zero_division),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2.0 * precision * recall, precision + recall, 0.0),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn, zero_division),
    }


@_document(_ARG_DOCS)
def pixel_accuracy(tp, fp, fn, tn, zero_division=1.0):
    """Fraction of correctly classified pixels from confusion counts.

    Binary: (TP + TN) / pixels of the foreground class. Multi-class: sum(TP) / pixels,
    since each pixel is a true positive of exactly one class when predicted correctly.

    Args:
        {args}

    Returns:
        Float32 tensor with the class axis reduced away.

    Example:
        >>> float(pixel_accuracy([3.0, 4.0], [1.0, 0.0], [0.0, 1.0], [4.0, 3.0]))
        0.875
    """
    tp, fp, fn, tn = (ops.cast(ops.convert_to_tensor(c), "float32") for c in (tp, fp, fn, tn))
    if tp.shape[-1] == 1:
        return _ratio(tp + tn, tp + tn + fp + fn, zero_division)[..., 0]
    return _ratio(ops.sum(tp, axis=-1), ops.mean(tp + fp + fn + tn, axis=-1), zero_division)


class _ConfusionMetric(keras.metrics.Metric):
    """Base class: accumulates per-class confusion counts; subclasses pick a formula.

    Subclasses set `_key` (a key of `ratios_from_counts`) and `_default_name`.
    """

    _key = None
    _default_name = None

    def __init__(self, num_classes=1, threshold=0.5, class_id=None, from_logits=False,
                 zero_division=1.0, name=None, dtype=None):
        super().__init__(name=name or self._default_name, dtype=dtype)
        _validate(num_classes, threshold, class_id)
        self.num_classes = num_classes
        self.threshold = threshold
        self.class_id = class_id
        self.from_logits = from_logits
        self.zero_division = zero_division
        self._counts = [
            self.add_variable(shape=(num_classes,), initializer="zeros", dtype="float32",
                              name=count)
            for count in ("tp", "fp", "fn", "tn")
        ]

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Add the confusion counts of one batch.

        Args:
            y_true: tensor. Target, one-hot/binary or class ids.
            y_pred: tensor. Prediction (batch, H, W, num_classes).
            sample_weight: tensor or None. Weights of shape (batch,), (batch, H, W) or
                (batch, H, W, 1). Defaults to None.
        """
        counts = confusion_counts(y_true, y_pred, self.num_classes, self.threshold,
                                  self.from_logits, sample_weight)
        for variable, value in zip(self._counts, counts):
            variable.assign_add(value)

    def per_class_result(self):
        """Return the per-class values, shape (num_classes,) (length 1 for binary)."""
        values = ratios_from_counts(*self._counts, zero_division=self.zero_division)
        return ops.cast(values[self._key], self.dtype)

    def _overall(self):
        return ops.mean(self.per_class_result())

    def result(self):
        if self.class_id is not None:
            return self.per_class_result()[self.class_id]
        return ops.cast(self._overall(), self.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "threshold": self.threshold,
            "class_id": self.class_id,
            "from_logits": self.from_logits,
            "zero_division": self.zero_division,
        }


def _public(cls):
    """Register a metric class for saving and fill in its Args section."""
    cls = _document(_ARG_DOCS, name=cls._default_name)(cls)
    return keras.saving.register_keras_serializable(package="unetpp_tf")(cls)


@_public
class Dice(_ConfusionMetric):
    """Dice coefficient 2TP / (2TP + FP + FN) over all data seen.

    The counts are pooled over every pixel seen, then averaged over classes (see the module
    docstring for how that compares with per-image means and with the smoothed Dice loss).

    Args:
        {args}

    Example:
        >>> metric = Dice()
        >>> metric.update_state(keras.ops.ones((1, 2, 2, 1)), [[[[0.9], [0.2]], [[0.8], [0.7]]]])
        >>> round(float(metric.result()), 4)
        0.8571
    """

    _key, _default_name = "dice", "dice"


@_public
class IoU(_ConfusionMetric):
    """Intersection over union (Jaccard index) TP / (TP + FP + FN) over all data seen.

    Equal to `keras.metrics.MeanIoU(num_classes)` when every class occurs in the mask or the
    prediction; a class in neither scores `zero_division` here and is left out of the mean by
    Keras (module docstring).

    Args:
        {args}

    Example:
        >>> metric = IoU(num_classes=3)
        >>> metric.update_state([[[0, 1]]], keras.ops.one_hot([[[0, 2]]], 3))
        >>> round(float(metric.result()), 4)
        0.3333
    """

    _key, _default_name = "iou", "iou"


@_public
class Precision(_ConfusionMetric):
    """Precision TP / (TP + FP) over all data seen.

    Args:
        {args}

    Example:
        >>> metric = Precision()
        >>> metric.update_state([[[[1], [0]]]], [[[[0.9], [0.8]]]])
        >>> float(metric.result())
        0.5
    """

    _key, _default_name = "precision", "precision"


@_public
class Recall(_ConfusionMetric):
    """Recall (sensitivity) TP / (TP + FN) over all data seen.

    Args:
        {args}

    Example:
        >>> metric = Recall()
        >>> metric.update_state([[[[1], [1]]]], [[[[0.9], [0.1]]]])
        >>> float(metric.result())
        0.5
    """

    _key, _default_name = "recall", "recall"


@_public
class F1Score(_ConfusionMetric):
    """F1 score 2PR / (P + R) from per-class precision and recall over all data seen.

    Args:
        {args}

    Example:
        >>> metric = F1Score()
        >>> metric.update_state([[[[1], [1]]]], [[[[0.9], [0.1]]]])
        >>> round(float(metric.result()), 4)
        0.6667
    """

    _key, _default_name = "f1", "f1"


@_public
class PixelAccuracy(_ConfusionMetric):
    """Fraction of correctly classified pixels over all data seen.

    `per_class_result()` gives (TP + TN) / pixels for each class; `class_id` selects one.

    Args:
        {args}

    Example:
        >>> metric = PixelAccuracy(num_classes=3)
        >>> metric.update_state([[[0, 1]]], keras.ops.one_hot([[[0, 2]]], 3))
        >>> float(metric.result())
        0.5
    """

    _key, _default_name = "accuracy", "pixel_accuracy"

    def _overall(self):
        return pixel_accuracy(*self._counts, zero_division=self.zero_division)


_METRICS = {
    "dice": Dice,
    "iou": IoU,
    "precision": Precision,
    "recall": Recall,
    "f1": F1Score,
    "pixel_accuracy": PixelAccuracy,
}


def get(identifier, num_classes=1):
    """Return a metric from a name, a Metric instance or a Metric class.

    Args:
        identifier: str or keras.metrics.Metric. One of "dice", "iou", "precision",
            "recall", "f1", "pixel_accuracy" (built with `num_classes`), a Metric instance
            (returned as is) or a Metric subclass (built with `num_classes`).
        num_classes: int. Classes for metrics built from a name or class. Defaults to 1.

    Returns:
        A `keras.metrics.Metric`.

    Example:
        >>> get("iou", num_classes=3).num_classes
        3
    """
    if isinstance(identifier, keras.metrics.Metric):
        return identifier
    if isinstance(identifier, str):
        if identifier.lower() not in _METRICS:
            raise ValueError(
                f"Unknown metric {identifier!r}; use one of {sorted(_METRICS)} or a "
                "keras.metrics.Metric instance."
            )
        return _METRICS[identifier.lower()](num_classes=num_classes)
    if inspect.isclass(identifier) and issubclass(identifier, _ConfusionMetric):
        return identifier(num_classes=num_classes)
    raise ValueError(
        f"Cannot build a metric from {identifier!r}; pass a name from {sorted(_METRICS)} "
        "or a keras.metrics.Metric instance."
    )
