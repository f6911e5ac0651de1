"""Graph rewrites for TFLite: the same function, in operations the int8 converter keeps in integers.

`keras.layers.LayerNormalization` computes `x * s + (beta - mean * s)` with `s = gamma /
sqrt(var + eps)`; the converter turns `-mean` into a NEG operator it cannot quantize, so every
LayerNormalization of an int8 file (ConvNeXt has one per block) runs a NEG in float between
DEQUANTIZE and QUANTIZE, and integer-only accelerators refuse the file. Written as
`(x - mean) * s + beta` (`SubtractMeanLayerNormalization`) it is a SUB, which quantizes. The
rewrite uses public Keras only (`keras.models.clone_model`, nested models included) and is applied
to the copy that TFLite converts; the parity check then compares the file with the original model.

Example:
    >>> lite_model = tflite_friendly(model)      # model itself when it has no LayerNormalization
"""

from __future__ import annotations

import keras
from keras import ops


class SubtractMeanLayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` computed as `(x - mean) * gamma / sqrt(var + eps) + beta`.

    The same function (up to float rounding) in operations TFLite's int8 converter quantizes.
    Only for conversion: `tflite_friendly` builds it from a LayerNormalization and copies its weights.

    Example:
        >>> layer = SubtractMeanLayerNormalization(epsilon=1e-6)
        >>> layer(np.ones((1, 2, 2, 3), "float32")).shape
    """

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        mean, variance = ops.moments(x, axes=self.axis, keepdims=True)
        scale = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, x.dtype)
        outputs = (x - mean) * scale
        if self.center:
            outputs = outputs + ops.cast(self.beta, x.dtype)
        return outputs


def _rewritable(layer) -> bool:
    return type(layer) is keras.layers.LayerNormalization and not getattr(layer, "rms_scaling", False)


def _has_rewritable(model: keras.Model) -> bool:
    return any(
        _has_rewritable(layer) if isinstance(layer, keras.Model) else _rewritable(layer) for layer in model.layers
    )


def _replacement(layer):
    """`layer` itself, or a SubtractMeanLayerNormalization with its configuration and weights."""
    if not _rewritable(layer):
        return layer
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):  # called more than once: several input shapes, keep it as it is
        return layer
    twin = SubtractMeanLayerNormalization.from_config(layer.get_config())
    twin.build(shape)
    twin.set_weights(layer.get_weights())
    return twin


def tflite_friendly(model: keras.Model) -> keras.Model:
    """`model` with its LayerNormalization layers computed as `SubtractMeanLayerNormalization`.

    Every other layer is shared with `model` (no copy of its weights); a model without
    LayerNormalization comes back as it is.

    Args:
        model: keras.Model. A functional or Sequential model.

    Returns:
        keras.Model: the model to convert to TFLite.

    Example:
        >>> lite_model = tflite_friendly(build_unetpp((64, 64, 3), encoder="convnexttiny", depth=2))
    """
    if not _has_rewritable(model):
        return model
    return keras.models.clone_model(model, clone_function=_replacement, recursive=True)
