"""Graph rewrites for TFLite: the same function, in a form the int8 converter quantizes well.

Two converter behaviours (TensorFlow 2.21) are worked around on the copy of the model that TFLite
converts; the parity check then compares the file with the original model:

- `keras.layers.LayerNormalization` computes `x * s + (beta - mean * s)` with `s = gamma /
  sqrt(var + eps)`; the converter turns `-mean` into a NEG it cannot quantize, so every
  LayerNormalization of an int8 file (ConvNeXt has one per block) runs a NEG in float between
  DEQUANTIZE and QUANTIZE, and integer-only accelerators refuse the file. Written as
  `(x - mean) * s + beta` (`SubtractMeanLayerNormalization`) it is a SUB, which quantizes.
- `EncoderPreprocessing` is a per-pixel affine map, `(x[order] - mean) / std`, computed as a
  REVERSE_V2 (caffe's RGB -> BGR), a SUB and a MUL. The int8 converter merges such chains of
  constant arithmetic with their neighbours and quantizes the intermediate `x - mean` (about
  -0.5..0.5) on the range of a later tensor (ResNet's zero padding, EfficientNet's rescaling):
  measured on TensorFlow 2.21, the first convolution of an int8 RGB ResNet50, VGG16 or
  EfficientNetB0 comes out 60-100% off and the label maps agree with Keras at Dice 0.06-0.65.
  The same map as one 1x1 convolution (kernel and bias read off the layer by calling it on the
  zero image and the unit images) quantizes like any convolution: 1% off, Dice >= 0.98.
- TFLite has no 3D max-pooling builtin (TensorFlow 2.21 converts `tf.MaxPool3D` only as a Flex
  op), so a volume model's `keras.layers.MaxPooling3D` becomes `SlicewiseMaxPooling3D`: a 2D max
  pooling of every slice over height and width, then one over (depth, 1) windows of the slices
  flattened to rows, with reshapes of rank <= 5 between them: MAX_POOL_2D and RESHAPE builtins,
  the same values.

Only public Keras is used (`keras.models.clone_model`, nested models included).

Example:
    >>> lite_model = tflite_friendly(model)      # model itself when there is nothing to rewrite
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from unetpp_tf.models.encoders import EncoderPreprocessing


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


class SlicewiseMaxPooling3D(keras.layers.MaxPooling3D):
    """`keras.layers.MaxPooling3D` (channels last, "valid", strides = pool size) from 2D max pooling.

    Each slice is pooled over (height, width) as a batch of images; the pooled slices, each
    flattened to one row of height x width positions, are then pooled over (depth, 1) windows.
    Max is associative, so the values are those of the 3D pooling; every op is a TFLite
    builtin (MAX_POOL_2D, RESHAPE) of rank <= 5. Only for conversion: `tflite_friendly`
    builds it from a MaxPooling3D of that form.

    Example:
        >>> tuple(SlicewiseMaxPooling3D((1, 2, 2))(np.ones((1, 4, 8, 8, 3), "float32")).shape)
        (1, 4, 4, 4, 3)
    """

    def call(self, inputs):
        (pd, ph, pw), x = self.pool_size, inputs
        shape = ops.shape(x)
        batch, depth, channels = shape[0], shape[1], shape[4]
        if (ph, pw) != (1, 1):
            slices = ops.reshape(x, (batch * depth, shape[2], shape[3], channels))
            pooled = ops.max_pool(slices, (ph, pw), strides=(ph, pw), padding="valid")
            size = ops.shape(pooled)
            x = ops.reshape(pooled, (batch, depth, size[1], size[2], channels))
        if pd != 1:
            shape = ops.shape(x)
            rows = ops.reshape(x, (batch, shape[1], shape[2] * shape[3], channels))
            pooled = ops.max_pool(rows, (pd, 1), strides=(pd, 1), padding="valid")
            x = ops.reshape(pooled, (batch, ops.shape(pooled)[1], shape[2], shape[3], channels))
        return x


def _slicewise(layer) -> bool:
    return (
        type(layer) is keras.layers.MaxPooling3D
        and layer.data_format == "channels_last"
        and layer.padding == "valid"
        and tuple(layer.strides) == tuple(layer.pool_size)
    )


def _rewritable(layer) -> bool:
    return type(layer) is keras.layers.LayerNormalization and not getattr(layer, "rms_scaling", False)


def _needs_rewrite(model: keras.Model) -> bool:
    return any(
        _needs_rewrite(layer) if isinstance(layer, keras.Model)
        else _rewritable(layer) or _slicewise(layer) or isinstance(layer, EncoderPreprocessing)
        for layer in model.layers
    )


def _replacement(layer):
    """`layer` itself, or its conversion twin (configuration and weights copied)."""
    if _slicewise(layer):
        return SlicewiseMaxPooling3D.from_config(layer.get_config())
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


def as_pointwise_convolution(layer, channels: int):
    """A 1x1 `Conv2D` computing what the per-pixel affine `layer` computes on `channels` channels.

    Kernel and bias are read off the layer: its output on the zero image is the bias, on the unit
    image of channel c the bias plus row c of the kernel. A layer that is not such a map (checked
    on a random image) gives None.

    Example:
        >>> conv = as_pointwise_convolution(EncoderPreprocessing("caffe"), 3)   # RGB -> BGR, x 255, - mean
    """
    probes = np.concatenate([np.zeros((1, channels)), np.eye(channels)]).astype("float32")[:, None, None, :]
    values = ops.convert_to_numpy(layer(probes)).astype("float64")[:, 0, 0, :]
    if values.shape != (channels + 1, channels):
        return None
    bias, kernel = values[0], values[1:] - values[0]
    conv = keras.layers.Conv2D(channels, 1, name=f"{layer.name}_pointwise")
    conv.build((None, None, None, channels))
    conv.set_weights([kernel.reshape(1, 1, channels, channels).astype("float32"), bias.astype("float32")])
    check = np.random.default_rng(0).uniform(-1.0, 2.0, (1, 4, 4, channels)).astype("float32")
    expected = ops.convert_to_numpy(layer(check))
    if not np.allclose(ops.convert_to_numpy(conv(check)), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()):
        return None
    return conv


def _call(layer, *args, **kwargs):
    """Call `layer`, an EncoderPreprocessing as its 1x1 convolution."""
    if isinstance(layer, EncoderPreprocessing) and len(args) == 1 and not kwargs:
        conv = as_pointwise_convolution(layer, int(args[0].shape[-1]))
        if conv is not None:
            return conv(args[0])
    return layer(*args, **kwargs)


def _float32_config(value):
    """A model configuration with every mixed-precision dtype policy replaced by float32."""
    if isinstance(value, dict):
        if value.get("class_name") == "DTypePolicy" and value.get("config", {}).get("name", "").startswith("mixed_"):
            return "float32"
        return {key: _float32_config(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_float32_config(item) for item in value]
    return value


def _mixed_precision(model: keras.Model) -> bool:
    return any(
        layer.dtype_policy.compute_dtype != "float32" or isinstance(layer, keras.Model) and _mixed_precision(layer)
        for layer in model.layers
    )


def as_float32(model: keras.Model) -> keras.Model:
    """`model` computing in float32: a copy of a mixed-precision (bf16/fp16) model, else `model` itself.

    TFLite's builtin kernels take no bfloat16, so a model trained with `--mixed-precision bf16`
    would need TensorFlow ops; its variables are float32 already, so the float32 copy (rebuilt
    from its configuration, the weights copied) computes the same function at full precision.

    Example:
        >>> lite_source = as_float32(model)   # model trained under mixed_bfloat16
    """
    if not _mixed_precision(model):
        return model
    copy = model.__class__.from_config(_float32_config(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def tflite_friendly(model: keras.Model) -> keras.Model:
    """`model` as TFLite should convert it: LayerNormalization, preprocessing and 3D pooling rewritten.

    LayerNormalization layers become `SubtractMeanLayerNormalization` (weights copied), each
    `EncoderPreprocessing` its 1x1 convolution (`as_pointwise_convolution`) and each
    `MaxPooling3D` a `SlicewiseMaxPooling3D` (builtin 2D pooling); every other layer is
    shared with `model` (no copy of its weights). A mixed-precision model is first copied to
    float32 (`as_float32`). A model with none of these comes back as it is.

    Args:
        model: keras.Model. A functional or Sequential model.

    Returns:
        keras.Model: the model to convert to TFLite (same outputs, up to float rounding).

    Example:
        >>> lite_model = tflite_friendly(build_unetpp((64, 64, 3), encoder="convnexttiny", depth=2))
    """
    model = as_float32(model)
    if not _needs_rewrite(model):
        return model
    call = None if isinstance(model, keras.Sequential) else _call  # Sequential models take no call_function
    return keras.models.clone_model(model, clone_function=_replacement, call_function=call, recursive=True)
