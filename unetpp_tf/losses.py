"""Segmentation losses: Dice, BCE + Dice, CE + Dice, Tversky and focal.

Every loss is a pure function `fn(y_true, y_pred, ...)` returning one value per sample,
shape (batch,), plus a `keras.losses.Loss` class that reduces it over the batch and
serializes with the model. Only `keras.ops` is used, so the losses run on the TensorFlow,
JAX and PyTorch backends.

Shapes: `y_pred` is (batch, H, W, C). C == 1 is binary (a sigmoid probability, or a logit
with `from_logits=True`); C > 1 is multi-class (softmax probabilities, or logits). `y_true`
is either one-hot/binary with the shape of `y_pred`, or class ids of shape (batch, H, W) or
(batch, H, W, 1); any integer or float dtype.

Compared with Keras' own losses (the tests cross-check each): the cross-entropies and the
focal losses equal `keras.losses.binary_crossentropy`, `categorical_crossentropy`,
`binary_focal_crossentropy(apply_class_balancing=True)` and `categorical_focal_crossentropy`
averaged over each image's pixels. The Dice and Tversky losses add `smooth` (1.0) to the
numerator and the denominator, where `keras.losses.dice` / `tversky` add a 1e-7 epsilon to the
denominator only, and take the mean of per-class values, where Keras' `axis=(1, 2, 3)` pools
the classes: with `smooth=0` they equal Keras' per-class values (`axis=(1, 2)`) averaged.
`unetpp_tf.metrics.Dice` has no smoothing and pools over the whole dataset.
"""

from __future__ import annotations

import inspect

import keras
from keras import ops

EPSILON = 1e-7

# --------------------------------------------------------------------------------------
# Shared helpers (also used by unetpp_tf.metrics)
# --------------------------------------------------------------------------------------


def _document(arg_docs, **default_overrides):
    """Return a decorator that replaces the `{args}` line of a docstring by Args entries.

    Each entry is `name: type. Meaning.` taken from `arg_docs`, followed by
    `Defaults to X.` read from the signature (or `default_overrides`), so the text and the
    signature cannot drift apart.
    """

    def decorate(obj):
        if obj.__doc__ is None:  # docstrings stripped (python -OO)
            return obj
        target = obj.__init__ if inspect.isclass(obj) else obj
        params = list(inspect.signature(target).parameters.values())
        lines = obj.__doc__.splitlines()
        row = next(i for i, line in enumerate(lines) if line.strip() == "{args}")
        indent = lines[row][: len(lines[row]) - len(lines[row].lstrip())]
        entries = []
        for p in params:
            if p.name == "self" or p.kind is p.VAR_KEYWORD:
                continue
            text = f"{indent}{p.name}: {arg_docs[p.name]}"
            default = default_overrides.get(p.name, p.default)
            if default is not p.empty:
                shown = f'"{default}"' if isinstance(default, str) else default
                text += f" Defaults to {shown}."
            entries.append(text)
        obj.__doc__ = "\n".join(lines[:row] + entries + lines[row + 1 :])
        return obj

    return decorate


def _compatible(shape_a, shape_b):
    return len(shape_a) == len(shape_b) and all(
        a is None or b is None or a == b for a, b in zip(shape_a, shape_b)
    )


def _targets(y_true, y_pred):
    """Return (y_true one-hot float, y_pred float) with reconciled shapes."""
    y_pred = ops.convert_to_tensor(y_pred)
    dtype = "float64" if keras.backend.standardize_dtype(y_pred.dtype) == "float64" else "float32"
    y_pred = ops.cast(y_pred, dtype)
    y_true = ops.convert_to_tensor(y_true)
    pred_shape, true_shape = tuple(y_pred.shape), tuple(y_true.shape)
    channels = pred_shape[-1] if len(pred_shape) >= 2 else None
    if channels is None:
        raise ValueError(
            f"y_pred of shape {pred_shape} needs a batch axis and a known channel axis, "
            "e.g. (batch, H, W, C); reshape it or set the model's output channels."
        )
    if len(true_shape) == len(pred_shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    if channels > 1 and y_true.shape[-1] == 1:
        y_true = ops.one_hot(ops.cast(ops.squeeze(y_true, -1), "int32"), channels)
    if not _compatible(tuple(y_true.shape), pred_shape):
        raise ValueError(
            f"y_true of shape {true_shape} does not match y_pred of shape {pred_shape}: "
            f"give y_true the same shape (one-hot/binary) or class ids of shape "
            f"{pred_shape[:-1]} or {pred_shape[:-1] + (1,)}."
        )
    return ops.cast(y_true, dtype), y_pred


def _activate(y_pred, from_logits):
    """Turn logits into probabilities (sigmoid for one channel, softmax otherwise)."""
    if not from_logits:
        return y_pred
    return ops.sigmoid(y_pred) if y_pred.shape[-1] == 1 else ops.softmax(y_pred, axis=-1)


def _prepare(y_true, y_pred, from_logits=False):
    """Return (y_true one-hot float, y_pred probabilities float) for any accepted input."""
    y_true, y_pred = _targets(y_true, y_pred)
    return y_true, _activate(y_pred, from_logits)


def _sample_mean(x):
    """Mean over every axis but the batch axis."""
    return ops.mean(x, axis=tuple(range(1, len(x.shape))))


def _soft_counts(y_true, probs):
    """Soft TP, FP, FN per sample and class, each of shape (batch, C)."""
    axes = tuple(range(1, len(probs.shape) - 1))
    tp = ops.sum(y_true * probs, axis=axes)
    return tp, ops.sum(probs, axis=axes) - tp, ops.sum(y_true, axis=axes) - tp


def _binary_ce(y_true, y_pred, probs, from_logits):
    """Element-wise binary cross-entropy; the stable logits form for one sigmoid channel."""
    if from_logits and y_pred.shape[-1] == 1:
        return ops.maximum(y_pred, 0.0) - y_pred * y_true + ops.log1p(ops.exp(-ops.abs(y_pred)))
    probs = ops.clip(probs, EPSILON, 1.0 - EPSILON)
    return -(y_true * ops.log(probs) + (1.0 - y_true) * ops.log(1.0 - probs))


def _log_probs(y_pred, probs, from_logits):
    """Log of the softmax probabilities, computed from logits when available."""
    if from_logits:
        return ops.log_softmax(y_pred, axis=-1)
    return ops.log(ops.clip(probs, EPSILON, 1.0))


def _tversky(y_true, probs, alpha, beta, smooth):
    tp, fp, fn = _soft_counts(y_true, probs)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return 1.0 - ops.mean(index, axis=-1)


def _dice(y_true, probs, smooth):
    tp, fp, fn = _soft_counts(y_true, probs)
    index = (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)
    return 1.0 - ops.mean(index, axis=-1)


_ARG_DOCS = {
    "y_true": "tensor. Target, one-hot/binary (batch, H, W, C) or class ids "
    "(batch, H, W[, 1]); any integer or float dtype. Volumes add a depth axis: "
    "(batch, D, H, W, C).",
    "y_pred": "tensor. Prediction (batch, H, W, C) or (batch, D, H, W, C): sigmoid (C == 1) "
    "or softmax (C > 1) probabilities, or logits with `from_logits=True`.",
    "smooth": "float. Added to the numerator and the denominator of the overlap ratio, "
    "so an empty target with an empty prediction scores a perfect 1.",
    "from_logits": "bool. Whether `y_pred` holds logits instead of probabilities.",
    "bce_weight": "float. Weight of the binary cross-entropy term.",
    "ce_weight": "float. Weight of the cross-entropy term.",
    "dice_weight": "float. Weight of the Dice loss term.",
    "alpha": "float. Weight of the false positives (Tversky) or of the positive class "
    "(focal; the negative class gets 1 - alpha, multi-class uses it as a scalar).",
    "beta": "float. Weight of the false negatives.",
    "gamma": "float. Focusing exponent; 0 turns focal loss into weighted cross-entropy.",
    "fn": "callable. A loss function `fn(y_true, y_pred, **kwargs)`.",
    "name": "str. Name of the loss instance.",
    "reduction": 'str. How the per-sample losses are reduced, as in `keras.losses.Loss` '
    '("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none").',
    "dtype": "str. Dtype of the loss computations; None uses `keras.backend.floatx()`.",
}

# --------------------------------------------------------------------------------------
# Loss functions
# --------------------------------------------------------------------------------------


@_document(_ARG_DOCS)
def dice_loss(y_true, y_pred, smooth=1.0, from_logits=False):
    """Soft Dice loss per sample: 1 - mean over classes of the soft Dice coefficient.

    For each sample and class, over the spatial axes:
    dice_c = (2 * sum(t * p) + smooth) / (sum(t) + sum(p) + smooth).
    A binary model (C == 1) scores its single foreground channel. The smoothing makes an
    empty mask with an empty prediction a perfect score and keeps small masks from dominating;
    it also means 1 - loss is not the Dice metric (a 1-pixel mask predicted as 2 pixels: loss
    Dice 3/4, metric 2/3).

    Args:
        {args}

    Returns:
        Tensor of shape (batch,).

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> keras.ops.convert_to_numpy(dice_loss(y, y)).round(4)
        array([0., 0.], dtype=float32)
    """
    y_true, probs = _prepare(y_true, y_pred, from_logits)
    return _dice(y_true, probs, smooth)


@_document(_ARG_DOCS)
def bce_dice_loss(y_true, y_pred, bce_weight=0.5, dice_weight=1.0, smooth=1.0, from_logits=False):
    """Binary cross-entropy plus Dice loss, the UNet++ paper's training loss.

    loss = bce_weight * BCE + dice_weight * dice_loss, with BCE averaged over the pixels
    (and channels) of each sample. With a single channel and `from_logits=True` the BCE
    uses the numerically stable logits form; probabilities are clipped to
    [1e-7, 1 - 1e-7]. For C > 1 the BCE is taken per channel (multi-label style); use
    `ce_dice_loss` for mutually exclusive classes.

    Args:
        {args}

    Returns:
        Tensor of shape (batch,).

    Example:
        >>> y_true = keras.ops.ones((1, 4, 4, 1))
        >>> tuple(bce_dice_loss(y_true, keras.ops.full((1, 4, 4, 1), 10.0), from_logits=True).shape)
        (1,)
    """
    y_true, y_pred = _targets(y_true, y_pred)
    probs = _activate(y_pred, from_logits)
    bce = _sample_mean(_binary_ce(y_true, y_pred, probs, from_logits))
    return bce_weight * bce + dice_weight * _dice(y_true, probs, smooth)


@_document(_ARG_DOCS)
def ce_dice_loss(y_true, y_pred, ce_weight=1.0, dice_weight=1.0, smooth=1.0, from_logits=False):
    """Cross-entropy plus Dice loss for multi-class (and binary) segmentation.

    loss = ce_weight * CE + dice_weight * dice_loss. CE is categorical cross-entropy for
    C > 1 (sparse or one-hot targets) and binary cross-entropy for C == 1, averaged over
    the pixels of each sample.

    Args:
        {args}

    Returns:
        Tensor of shape (batch,).

    Example:
        >>> ids = keras.ops.zeros((2, 4, 4), dtype="int32")
        >>> tuple(ce_dice_loss(ids, keras.ops.zeros((2, 4, 4, 3)), from_logits=True).shape)
        (2,)
    """
    y_true, y_pred = _targets(y_true, y_pred)
    probs = _activate(y_pred, from_logits)
    if y_pred.shape[-1] == 1:
        ce = _sample_mean(_binary_ce(y_true, y_pred, probs, from_logits))
    else:
        ce = _sample_mean(-ops.sum(y_true * _log_probs(y_pred, probs, from_logits), axis=-1))
    return ce_weight * ce + dice_weight * _dice(y_true, probs, smooth)


@_document(_ARG_DOCS)
def tversky_loss(y_true, y_pred, alpha=0.5, beta=0.5, smooth=1.0, from_logits=False):
    """Tversky loss per sample: 1 - mean over classes of the soft Tversky index.

    index_c = (TP + smooth) / (TP + alpha * FP + beta * FN + smooth) with soft counts
    TP = sum(t * p), FP = sum((1 - t) * p), FN = sum(t * (1 - p)). A beta above alpha
    penalizes missed foreground more. With alpha = beta = 0.5 it equals `dice_loss` with
    twice the `smooth` (exactly `dice_loss` when smooth = 0). This is Salehi et al.'s
    convention (alpha on false positives); `keras.losses.tversky` in Keras 3.15 and earlier
    applies alpha to the false negatives instead, so the two agree only when alpha = beta.

    Args:
        {args}

    Returns:
        Tensor of shape (batch,).

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> tuple(tversky_loss(y, 0.5 * y, alpha=0.3, beta=0.7).shape)
        (2,)
    """
    y_true, probs = _prepare(y_true, y_pred, from_logits)
    return _tversky(y_true, probs, alpha, beta, smooth)


@_document(_ARG_DOCS)
def focal_loss(y_true, y_pred, gamma=2.0, alpha=0.25, from_logits=False):
    """Focal loss per sample, averaged over pixels (Lin et al., 2017).

    Binary (C == 1): alpha_t * (1 - p_t) ** gamma * BCE, alpha_t = alpha for foreground
    and 1 - alpha for background. Multi-class: sum over classes of
    -alpha * t_c * (1 - p_c) ** gamma * log(p_c). gamma = 0 and alpha = 0.5 give half the
    binary cross-entropy.

    Args:
        {args}

    Returns:
        Tensor of shape (batch,).

    Example:
        >>> y_true = keras.ops.ones((2, 4, 4, 1))
        >>> tuple(focal_loss(y_true, keras.ops.zeros((2, 4, 4, 1)), from_logits=True).shape)
        (2,)
    """
    y_true, y_pred = _targets(y_true, y_pred)
    probs = _activate(y_pred, from_logits)
    if y_pred.shape[-1] == 1:
        ce = _binary_ce(y_true, y_pred, probs, from_logits)
        p_t = ops.exp(-ce)
        weight = y_true * alpha + (1.0 - y_true) * (1.0 - alpha)
    else:
        log_p = _log_probs(y_pred, probs, from_logits)
        ce, p_t, weight = -y_true * log_p, ops.exp(log_p), alpha
    # The floor keeps the gradient of (1 - p_t) ** gamma finite when p_t rounds to 1.
    focal = weight * ops.power(ops.maximum(1.0 - p_t, EPSILON), gamma) * ce
    return _sample_mean(ops.sum(focal, axis=-1))


# --------------------------------------------------------------------------------------
# Loss classes
# --------------------------------------------------------------------------------------
# Each public class spells out its function's arguments in its own signature, on purpose (so
# `help()`, IDEs and `get_config` show them); the bodies are one `super().__init__` call.


class _FunctionLoss(keras.losses.Loss):
    """Loss object that calls `fn(y_true, y_pred, **kwargs)` and serializes the kwargs.

    Args:
        fn: callable. Per-sample loss function.
        name: str. Name of the loss instance.
        reduction: str. As in `keras.losses.Loss`.
        dtype: str. Dtype of the loss computations.
        **kwargs: Keyword arguments passed to `fn`; they form the config.
    """

    def __init__(self, fn, name=None, reduction="sum_over_batch_size", dtype=None, **kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        for key, value in kwargs.items():
            if not isinstance(value, bool) and value < 0:
                raise ValueError(f"{key}={value} is negative; pass a value >= 0.")
        self._fn = fn
        self._fn_kwargs = kwargs

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred, **self._fn_kwargs)

    def get_config(self):
        return {**super().get_config(), "dtype": self.dtype, **self._fn_kwargs}


@keras.saving.register_keras_serializable(package="unetpp_tf")
@_document(_ARG_DOCS)
class DiceLoss(_FunctionLoss):
    """Soft Dice loss; the `keras.losses.Loss` form of `dice_loss`.

    Args:
        {args}

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> round(float(DiceLoss()(y, y)), 4)
        0.0
    """

    def __init__(self, smooth=1.0, from_logits=False, name="dice_loss",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(dice_loss, name, reduction, dtype, smooth=smooth, from_logits=from_logits)


@keras.saving.register_keras_serializable(package="unetpp_tf")
@_document(_ARG_DOCS)
class BCEDiceLoss(_FunctionLoss):
    """Binary cross-entropy plus Dice loss; the `keras.losses.Loss` form of `bce_dice_loss`.

    Args:
        {args}

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> round(float(BCEDiceLoss(from_logits=True)(y, 20.0 * y)), 4)
        0.0
    """

    def __init__(self, bce_weight=0.5, dice_weight=1.0, smooth=1.0, from_logits=False,
                 name="bce_dice_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(bce_dice_loss, name, reduction, dtype, bce_weight=bce_weight,
                         dice_weight=dice_weight, smooth=smooth, from_logits=from_logits)


@keras.saving.register_keras_serializable(package="unetpp_tf")
@_document(_ARG_DOCS)
class CEDiceLoss(_FunctionLoss):
    """Cross-entropy plus Dice loss; the `keras.losses.Loss` form of `ce_dice_loss`.

    Args:
        {args}

    Example:
        >>> ids = keras.ops.zeros((2, 4, 4), dtype="int32")
        >>> round(float(CEDiceLoss()(ids, keras.ops.one_hot(ids, 3))), 4)
        0.0
    """

    def __init__(self, ce_weight=1.0, dice_weight=1.0, smooth=1.0, from_logits=False,
                 name="ce_dice_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(ce_dice_loss, name, reduction, dtype, ce_weight=ce_weight,
                         dice_weight=dice_weight, smooth=smooth, from_logits=from_logits)


@keras.saving.register_keras_serializable(package="unetpp_tf")
@_document(_ARG_DOCS)
class TverskyLoss(_FunctionLoss):
    """Tversky loss; the `keras.losses.Loss` form of `tversky_loss`.

    Args:
        {args}

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> round(float(TverskyLoss(alpha=0.3, beta=0.7)(y, 0.0 * y)), 4)
        0.918
    """

    def __init__(self, alpha=0.5, beta=0.5, smooth=1.0, from_logits=False,
                 name="tversky_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(tversky_loss, name, reduction, dtype, alpha=alpha, beta=beta,
                         smooth=smooth, from_logits=from_logits)


@keras.saving.register_keras_serializable(package="unetpp_tf")
@_document(_ARG_DOCS)
class FocalLoss(_FunctionLoss):
    """Focal loss; the `keras.losses.Loss` form of `focal_loss`.

    Args:
        {args}

    Example:
        >>> y = keras.ops.ones((2, 4, 4, 1))
        >>> round(float(FocalLoss(gamma=0.0, alpha=0.5)(y, 0.5 * y)), 4)
        0.3466
    """

    def __init__(self, gamma=2.0, alpha=0.25, from_logits=False, name="focal_loss",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(focal_loss, name, reduction, dtype, gamma=gamma, alpha=alpha,
                         from_logits=from_logits)


_LOSSES = {
    "dice": DiceLoss,
    "bce_dice": BCEDiceLoss,
    "ce_dice": CEDiceLoss,
    "tversky": TverskyLoss,
    "focal": FocalLoss,
}


def get(identifier):
    """Return a `keras.losses.Loss` from a name, a Loss instance or class, or a callable.

    Args:
        identifier: str, keras.losses.Loss or callable. One of "dice", "bce_dice",
            "ce_dice", "tversky", "focal" (a "_loss" suffix is accepted), a Loss instance
            (returned as is), a Loss subclass (instantiated with its defaults) or a
            function `fn(y_true, y_pred)` returning per-sample losses.

    Returns:
        A `keras.losses.Loss`.

    Example:
        >>> get("bce_dice").name
        'bce_dice_loss'
    """
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower().removesuffix("_loss")
        if key not in _LOSSES:
            raise ValueError(
                f"Unknown loss {identifier!r}; use one of {sorted(_LOSSES)}, "
                "a keras.losses.Loss instance or a callable."
            )
        return _LOSSES[key]()
    if inspect.isclass(identifier) and issubclass(identifier, keras.losses.Loss):
        return identifier()
    if callable(identifier):
        return _FunctionLoss(identifier, name=getattr(identifier, "__name__", None))
    raise ValueError(
        f"Cannot build a loss from {identifier!r}; pass a name from {sorted(_LOSSES)}, "
        "a keras.losses.Loss instance or a callable."
    )
