"""Building blocks of the nested U-Net graph: the conv block, upsampling and the heads.

Every block works on images [B, H, W, C] and volumes [B, D, H, W, C] alike: the layer family
(Conv2D or Conv3D, 2D or 3D pooling and upsampling) follows the rank of its input
(`layer_family`).
"""

from __future__ import annotations

import keras

from types import SimpleNamespace

from unetpp_tf.models.layers import (
    BilinearUpsampling,
    ConcatConv2D,
    ConcatConv3D,
    FusedBatchNormalization,
    FusedDropout,
    VolumeUpsampling,
)

UPSAMPLING_MODES = ("transpose", "bilinear", "nearest")


def spatial_rank(x) -> int:
    """The number of spatial axes of a channels-last tensor (or the first of a list): 2 or 3."""
    first = x[0] if isinstance(x, (list, tuple)) else x
    rank = len(first.shape) - 2
    if rank not in (2, 3):
        raise ValueError(
            f"expected images [batch, H, W, C] or volumes [batch, D, H, W, C], got a tensor of shape "
            f"{tuple(first.shape)}."
        )
    return rank


def layer_family(rank: int) -> SimpleNamespace:
    """The layer classes for `rank` spatial axes: `conv`, `concat_conv`, `pool`, `transpose`.

    Args:
        rank: int. 2 for images, 3 for volumes.

    Example:
        >>> layer_family(3).conv is keras.layers.Conv3D
        True
    """
    # looked up at call time, so a test (or a caller) may swap a module-level class
    if rank == 2:
        return SimpleNamespace(conv=keras.layers.Conv2D, concat_conv=ConcatConv2D, pool=keras.layers.MaxPooling2D,
                               transpose=keras.layers.Conv2DTranspose)
    if rank == 3:
        return SimpleNamespace(conv=keras.layers.Conv3D, concat_conv=ConcatConv3D, pool=keras.layers.MaxPooling3D,
                               transpose=keras.layers.Conv3DTranspose)
    raise ValueError(f"rank must be 2 (images) or 3 (volumes), got {rank!r}.")


def _regularizer(l2: float):
    return keras.regularizers.L2(l2) if l2 else None


def conv_block(
    x,
    filters: int,
    *,
    name: str,
    batch_norm: bool = True,
    bn_momentum: float = 0.9,
    dropout: float = 0.0,
    l2: float = 0.0,
    activation: str = "relu",
    kernel_initializer: str = "he_normal",
    convs: int = 2,
):
    """Apply `convs` x (3x3 (3x3x3 on volumes) conv -> [BatchNorm] -> activation -> [dropout]).

    Layers are named from the prefix: `{name}_conv1`, `{name}_bn1`, `{name}_act1`,
    `{name}_drop1`, ... With BatchNorm the convolution has no bias (BatchNorm's shift
    replaces it). BatchNorm and dropout are the fused drop-in layers of
    `unetpp_tf.models.layers`, which do the same work in fewer passes over memory. Given a
    list of tensors, the block convolves their concatenation: the first convolution is a
    `ConcatConv2D` (`ConcatConv3D` on volumes) over the parts (the weights of a Conv2D over
    the concatenation, which training never materialises).

    Args:
        x: tensor or list of tensors. The block input, channels last, [B, H, W, C] or
            [B, D, H, W, C]; a list is concatenated along the channels.
        filters: int. Output channels of each convolution.
        name: str. Prefix for the layer names.
        batch_norm: bool. Insert BatchNormalization after each convolution.
            Defaults to True.
        bn_momentum: float. Decay of BatchNorm's moving statistics (Keras convention;
            PyTorch's momentum 0.1 is 0.9 here). Keras' own 0.99 averages over ~100 steps,
            too slow for short runs on small datasets (`benchmarks/accuracy.py`).
            Defaults to 0.9.
        dropout: float. Dropout rate after each activation; 0 disables it.
            Defaults to 0.0.
        l2: float. L2 weight decay on the kernels; 0 disables it. Defaults to 0.0.
        activation: str. Keras activation name. Defaults to "relu".
        kernel_initializer: str. Keras initializer name. Defaults to "he_normal".
        convs: int. Number of convolutions. Defaults to 2.

    Example:
        >>> x = keras.Input((32, 32, 3))
        >>> y = conv_block(x, 8, name="x_0_0")
        >>> tuple(y.shape)
        (None, 32, 32, 8)
        >>> tuple(conv_block([y, keras.Input((32, 32, 4))], 8, name="x_0_1").shape)
        (None, 32, 32, 8)
    """
    family = layer_family(spatial_rank(x))
    for k in range(1, convs + 1):
        conv = family.concat_conv if isinstance(x, (list, tuple)) else family.conv
        x = conv(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer=kernel_initializer,
            kernel_regularizer=_regularizer(l2),
            name=f"{name}_conv{k}",
        )(x)
        if batch_norm:
            x = FusedBatchNormalization(momentum=bn_momentum, name=f"{name}_bn{k}")(x)
        x = keras.layers.Activation(activation, name=f"{name}_act{k}")(x)
        if dropout:
            x = FusedDropout(dropout, name=f"{name}_drop{k}")(x)
    return x


def upsample(x, filters: int, *, name: str, mode: str = "transpose", kernel_initializer="he_normal", size=2):
    """Upsample `x` by `size` (2 = double every spatial axis).

    "transpose" is the paper's 2x2 stride-2 transposed convolution to `filters` channels
    (kernel and stride `size`; with bias, no activation); "bilinear" and "nearest" resize and
    keep the channels (on volumes "bilinear" is trilinear, `layers.VolumeUpsampling`).

    Args:
        x: tensor. Channels-last input, [B, H, W, C] or [B, D, H, W, C].
        filters: int. Output channels of the transposed convolution.
        name: str. Layer name.
        mode: str. One of "transpose", "bilinear", "nearest". Defaults to "transpose".
        kernel_initializer: str. Initializer of the transposed convolution.
            Defaults to "he_normal".
        size: int or tuple. Factor per spatial axis, e.g. (1, 2, 2) to keep the depth of a
            volume. Defaults to 2.

    Example:
        >>> y = upsample(keras.Input((8, 8, 16)), 8, name="up")
        >>> tuple(y.shape)
        (None, 16, 16, 8)
        >>> tuple(upsample(keras.Input((4, 8, 8, 16)), 8, name="up3", size=(1, 2, 2)).shape)
        (None, 4, 16, 16, 8)
    """
    rank = spatial_rank(x)
    factors = (size,) * rank if isinstance(size, int) else tuple(size)
    if mode == "transpose":
        return layer_family(rank).transpose(
            filters, factors, strides=factors, padding="same", kernel_initializer=kernel_initializer, name=name
        )(x)
    if rank == 3:
        return VolumeUpsampling(factors, interpolation="trilinear" if mode == "bilinear" else "nearest", name=name)(x)
    if mode == "bilinear":  # runs at None x None sizes too (see BilinearUpsampling)
        return BilinearUpsampling(factors, name=name)(x)
    return keras.layers.UpSampling2D(factors, interpolation=mode, name=name)(x)


def segmentation_head(x, num_classes: int, *, name: str, activation, l2: float = 0.0, kernel_initializer="he_normal"):
    """A 1x1 (1x1x1 on volumes) convolution to `num_classes` channels and the output activation.

    The activation layer is named `name` and computes in float32, so mixed-precision
    models still return float32 probabilities; the convolution is `{name}_logits`.

    Args:
        x: tensor. A decoder node X(0, j).
        num_classes: int. Output channels.
        name: str. Name of the output (the activation layer).
        activation: str or None. "sigmoid", "softmax", or None for logits.
        l2: float. L2 weight decay on the kernel. Defaults to 0.0.
        kernel_initializer: str. Defaults to "he_normal".

    Example:
        >>> y = segmentation_head(keras.Input((32, 32, 8)), 1, name="head", activation="sigmoid")
        >>> tuple(y.shape)
        (None, 32, 32, 1)
    """
    x = layer_family(spatial_rank(x)).conv(
        num_classes,
        1,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=_regularizer(l2),
        name=f"{name}_logits",
    )(x)
    return keras.layers.Activation(activation or "linear", dtype="float32", name=name)(x)
