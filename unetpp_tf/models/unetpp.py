"""The UNet++ and U-Net graphs, 2D and 3D, built with the functional API from one function.

Nodes follow the paper's notation: X(i, j) is the node at encoder level i (0 = full
resolution) and column j. Column 0 is the encoder; for j > 0 UNet++ computes

    X(i, j) = conv_block(concat([X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))]))

while U-Net keeps only the nodes with i + j == depth and the skip X(i, 0). Layers are
named after their node (`x_{i}_{j}_conv1`, `x_{i}_{j}_up`, ...); the heads on X(0, j) are
named `output_{j}`, as in the paper's official code. The concatenation of a decoder node is
the input of its first convolution, a `ConcatConv2D` over the list of parts (the weights of
a Conv2D over the concatenation), so training never materialises it. An input shape of rank
4, (D, H, W, C), builds the same graph for volumes from the 3D layers (`blocks.layer_family`),
with per-level (possibly anisotropic) pooling factors.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence

import keras

from unetpp_tf.models.blocks import UPSAMPLING_MODES, conv_block, layer_family, segmentation_head, upsample
from unetpp_tf.models.encoders import encoder_features
from unetpp_tf.models.preprocessing import preprocessing_layer
from unetpp_tf.models.recompute import with_recompute


def _check_depth(depth) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (the number of poolings), got {depth!r}.")


def _resolve_widths(filters, depth: int, width_multiplier: float) -> list[int]:
    if isinstance(filters, Sequence) and not isinstance(filters, str):
        widths = list(filters)
        if len(widths) != depth + 1:
            raise ValueError(
                f"filters has {len(widths)} entries but depth {depth} needs depth + 1 = {depth + 1} "
                f"(one width per encoder level), e.g. {tuple(32 * 2**i for i in range(depth + 1))}; "
                "or pass one base width such as filters=32."
            )
    else:
        widths = [filters * 2**i if isinstance(filters, int) else filters for i in range(depth + 1)]
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}.")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"filters must be positive integers, got {filters!r}.")
    return [max(1, round(w * width_multiplier)) for w in widths]


def _nearest_valid(size: int, multiple: int) -> str:
    lower = (size // multiple) * multiple
    upper = lower + multiple
    return f"{lower} or {upper}" if lower else f"{upper}"


def _check_encoder_options(depth: int, recompute: bool) -> None:
    if depth > 4:
        raise ValueError(
            f"depth {depth} is too deep for an encoder: its feature maps stop at stride 32, which is depth 4 "
            "(levels at strides 2..32); use depth <= 4."
        )
    if recompute:
        raise ValueError(
            "recompute=True is for the built-in encoder; with a pretrained encoder train without it "
            "(or with a smaller batch, or --freeze-encoder-epochs to keep the encoder's activations out of "
            "the backward pass)."
        )


def check_model_options(num_classes, dropout: float, bn_momentum: float, encoder_weights=None) -> None:
    """The argument checks every builder shares: classes, dropout, BatchNorm decay, encoder weights.

    Example:
        >>> check_model_options(num_classes=3, dropout=0.1, bn_momentum=0.9)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1 (1 = binary sigmoid), got {num_classes!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1) (the decay of the moving statistics), got {bn_momentum}.")
    if encoder_weights not in (None, "imagenet") and not isinstance(encoder_weights, (str, bytes, os.PathLike)):
        raise ValueError(f"encoder_weights must be 'imagenet', None or a file path, got {encoder_weights!r}.")


def resolve_pool_sizes(pool_sizes, depth: int, rank: int) -> list[tuple[int, ...]]:
    """The pooling factors of each level as `depth` tuples of `rank` ints (2 everywhere for None).

    Args:
        pool_sizes: None or a sequence of `depth` entries, each an int (every axis) or a
            per-axis tuple such as (1, 2, 2).
        depth: int. Number of poolings.
        rank: int. Spatial axes: 2 for images, 3 for volumes.

    Example:
        >>> resolve_pool_sizes([(1, 2, 2), 2], 2, 3)
        [(1, 2, 2), (2, 2, 2)]
    """
    if pool_sizes is None:
        return [(2,) * rank] * depth
    if isinstance(pool_sizes, (str, bytes)) or not isinstance(pool_sizes, Sequence) or len(pool_sizes) != depth:
        raise ValueError(
            f"pool_sizes must have one entry per level (depth {depth}), each an int or a tuple of {rank} ints, "
            f"e.g. {[(1, 2, 2)] + [2] * (depth - 1) if rank == 3 else [2] * depth}; got {pool_sizes!r}."
        )
    levels = []
    for level, entry in enumerate(pool_sizes):
        factors = (entry,) * rank if isinstance(entry, int) and not isinstance(entry, bool) else entry
        if (
            not isinstance(factors, Sequence)
            or len(factors) != rank
            or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors)
        ):
            raise ValueError(
                f"pool_sizes[{level}] must be a positive int or a tuple of {rank} positive ints "
                f"(one per spatial axis), got {entry!r}."
            )
        levels.append(tuple(factors))
    return levels


def pool_sizes_for_spacing(spacing, depth: int) -> list[tuple[int, ...]]:
    """Per-level pooling factors for voxels of `spacing`, so that thick axes are pooled later.

    The nnU-Net rule: an axis whose current spacing is more than twice the finest current
    spacing is not pooled (factor 1) until the other axes, pooled by 2 at each level, have
    caught up; every other axis is pooled by 2. Isotropic spacing gives 2 everywhere.

    Args:
        spacing: sequence of floats. Voxel size per spatial axis, e.g. (z, y, x) in mm.
        depth: int. Number of poolings.

    Returns:
        list: `depth` tuples of factors, for `build_unetpp(..., pool_sizes=...)`.

    Example:
        >>> pool_sizes_for_spacing((5.0, 1.0, 1.0), 4)
        [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    """
    _check_depth(depth)
    current = [float(s) for s in spacing]
    if len(current) not in (2, 3) or any(not s > 0 for s in current):
        raise ValueError(f"spacing must be 2 or 3 positive sizes (one per spatial axis), got {spacing!r}.")
    levels = []
    for _ in range(depth):
        finest = min(current)
        factors = tuple(1 if s > 2.0 * finest else 2 for s in current)
        current = [s * f for s, f in zip(current, factors)]
        levels.append(factors)
    return levels


def check_input_shape(input_shape, depth: int, encoder=None, pool_sizes=None, volumes: bool = False) -> tuple:
    """Check `input_shape` against the downsampling of `depth` levels; return it as a tuple.

    Args:
        input_shape: tuple. (H, W, C), or (D, H, W, C) with `volumes=True`; sizes may be None.
        depth: int. Number of poolings.
        encoder: the encoder, if any (only changes the message).
        pool_sizes: None or per-level factors (`resolve_pool_sizes`). Defaults to None (2).
        volumes: bool. Accept (D, H, W, C). Defaults to False.

    Example:
        >>> check_input_shape((16, 64, 64, 1), 2, pool_sizes=[(1, 2, 2), 2], volumes=True)
        (16, 64, 64, 1)
    """
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) and not isinstance(input_shape, str) else None
    if shape is None or len(shape) not in ((3, 4) if volumes else (3,)):
        expected = "(height, width, channels) or (depth, height, width, channels)" if volumes else (
            "(height, width, channels)"
        )
        raise ValueError(
            f"input_shape must be {expected}, got {input_shape!r}; use None for a variable spatial size."
        )
    *spatial, channels = shape
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"input channels must be a positive integer, got {channels!r}.")
    labels = ("height", "width") if len(spatial) == 2 else ("depth", "height", "width")
    levels = resolve_pool_sizes(pool_sizes, depth, len(spatial))
    for axis, (label, size) in enumerate(zip(labels, spatial)):
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"input {label} must be a positive integer or None, got {size!r}.")
        multiple = math.prod(level[axis] for level in levels)
        if size % multiple:
            if encoder is not None:
                why = f"the encoder and decoder downsample {multiple}x"
            elif pool_sizes is None:
                why = f"depth {depth}"
            else:
                why = f"the {label} pool sizes {[level[axis] for level in levels]} multiply to {multiple}"
            raise ValueError(
                f"input {label} {size} is not divisible by {multiple} ({why}); "
                f"resize or pad to {_nearest_valid(size, multiple)}."
            )
    return shape


def resolve_output_activation(output_activation, num_classes: int):
    if output_activation == "auto":
        return "sigmoid" if num_classes == 1 else "softmax"
    return output_activation


def _build(
    nested: bool,
    input_shape,
    num_classes: int,
    depth: int,
    filters,
    deep_supervision: bool,
    *,
    batch_norm: bool,
    bn_momentum: float,
    dropout: float,
    l2: float,
    upsampling: str,
    activation: str,
    kernel_initializer: str,
    output_activation,
    width_multiplier: float,
    name: str,
    recompute: bool = False,
    preprocessing=None,
    encoder=None,
    encoder_weights=None,
    encoder_trainable: bool = True,
    pool_sizes=None,
) -> keras.Model:
    _check_depth(depth)
    widths = _resolve_widths(filters, depth, width_multiplier)
    volumes = isinstance(input_shape, Sequence) and len(input_shape) == 4
    if volumes and (encoder is not None or encoder_weights is not None):
        raise ValueError(
            f"input_shape {tuple(input_shape)} builds a 3D model, and the pretrained encoders are 2D "
            "(keras.applications image backbones): leave encoder and encoder_weights unset for volumes, "
            "or train a 2D/2.5D model on slices with input_shape=(height, width, channels)."
        )
    if encoder is not None:
        _check_encoder_options(depth, recompute)
        if pool_sizes is not None:
            raise ValueError("pool_sizes is for the built-in encoder; a pretrained encoder fixes its own strides.")
    elif encoder_weights is not None:
        raise ValueError("encoder_weights needs an encoder: pass encoder='resnet50' (or another name) as well.")
    # with an encoder, level i of the decoder sits at stride 2**(i + 1) and a head upsamples to full size
    input_shape = check_input_shape(input_shape, depth + (encoder is not None), encoder, pool_sizes, volumes=True)
    rank = len(input_shape) - 1
    pools = resolve_pool_sizes(pool_sizes, depth, rank)
    check_model_options(num_classes, dropout, bn_momentum, encoder_weights)
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}.")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}.")
    head_activation = resolve_output_activation(output_activation, num_classes)
    block = dict(
        batch_norm=batch_norm,
        bn_momentum=bn_momentum,
        dropout=dropout,
        l2=l2,
        activation=activation,
        kernel_initializer=kernel_initializer,
    )

    inputs = keras.Input(input_shape, name="image")
    preprocess = preprocessing_layer(preprocessing)
    image = inputs if preprocess is None else preprocess(inputs)
    x = {}
    if encoder is not None:
        features = encoder_features(
            image, encoder, encoder_weights, encoder_trainable, levels=depth + 1, bn_momentum=bn_momentum
        )
        x.update({(i, 0): feature for i, feature in enumerate(features)})
        if x[0, 0] is None:  # no stride-2 map in the encoder (ConvNeXt): a small block makes one
            pooled = keras.layers.AveragePooling2D(2, name="x_0_0_pool")(image)
            x[0, 0] = conv_block(pooled, widths[0], name="x_0_0", **block)
    else:
        for i in range(depth + 1):
            pool = layer_family(rank).pool
            source = image if i == 0 else pool(pools[i - 1], name=f"x_{i}_0_pool")(x[i - 1, 0])
            x[i, 0] = conv_block(source, widths[i], name=f"x_{i}_0", **block)
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            if not nested and i + j != depth:
                continue
            up = upsample(
                x[i + 1, j - 1],
                widths[i],
                name=f"x_{i}_{j}_up",
                mode=upsampling,
                kernel_initializer=kernel_initializer,
                size=pools[i],
            )
            skips = [x[i, k] for k in range(j)] if nested else [x[i, 0]]
            x[i, j] = conv_block([*skips, up], widths[i], name=f"x_{i}_{j}", **block)

    def head(j):
        top = x[0, j]
        if encoder is not None:  # X(0, j) is at stride 2: upsample and refine at full resolution
            width = max(1, widths[0] // 2)
            up = upsample(top, width, name=f"x_full_{j}_up", mode=upsampling, kernel_initializer=kernel_initializer)
            top = conv_block(up, width, name=f"x_full_{j}", **block)
        return segmentation_head(
            top,
            num_classes,
            name=f"output_{j}",
            activation=head_activation,
            l2=l2,
            kernel_initializer=kernel_initializer,
        )

    outputs = [head(j) for j in range(1, depth + 1)] if deep_supervision else head(depth)
    model = keras.Model(inputs, outputs, name=name)
    return with_recompute(model) if recompute else model


def build_unetpp(
    input_shape=(None, None, 1),
    num_classes: int = 1,
    depth: int = 4,
    filters=32,
    deep_supervision: bool = False,
    *,
    # The node options below have the same names and defaults as blocks.conv_block's, on purpose.
    batch_norm: bool = True,
    bn_momentum: float = 0.9,
    dropout: float = 0.0,
    l2: float = 0.0,
    upsampling: str = "transpose",
    activation: str = "relu",
    kernel_initializer: str = "he_normal",
    output_activation="auto",
    width_multiplier: float = 1.0,
    recompute: bool = False,
    preprocessing=None,
    encoder=None,
    encoder_weights=None,
    encoder_trainable: bool = True,
    pool_sizes=None,
    name: str = "unetpp",
) -> keras.Model:
    """Build a UNet++ (nested U-Net) as a functional `keras.Model`, 2D or 3D.

    `input_shape=(H, W, C)` builds the image network (Conv2D, 2D pooling and upsampling);
    `input_shape=(D, H, W, C)` builds the volume network from the same code (Conv3D,
    MaxPooling3D, Conv3DTranspose or trilinear/nearest upsampling), with the same layer names.
    With `deep_supervision=True` the model has one output per decoder column,
    `output_1` ... `output_{depth}` (heads on X(0, 1..depth)), for a loss on each;
    `unetpp_tf.inference_model` turns it into the paper's "accurate" (mean of heads) or
    "fast" (one pruned head) model. Without it the single output is `output_{depth}`.
    `unetpp_tf.from_preset("paper")` gives the paper's exact configuration.

    Args:
        input_shape: tuple. (height, width, channels) for images or (depth, height, width,
            channels) for volumes; spatial sizes may be None and otherwise must be divisible
            by 2**depth (by the product of `pool_sizes` along that axis). Defaults to
            (None, None, 1).
        num_classes: int. 1 for binary segmentation (sigmoid), K > 1 for K classes
            (softmax). Defaults to 1.
        depth: int. Number of poolings (the paper uses 4). Defaults to 4.
        filters: int or tuple. Base width doubled at each level, or depth + 1 explicit
            widths. Defaults to 32.
        deep_supervision: bool. One head per column X(0, j). Defaults to False.
        batch_norm: bool. BatchNormalization after each convolution. Defaults to True.
        bn_momentum: float. Decay of BatchNorm's moving statistics; Keras' own default
            0.99 lags the weights for most of a short run on a small dataset, so
            inference-mode outputs go wrong (measured in `benchmarks/accuracy.py`).
            Defaults to 0.9 (PyTorch's default).
        dropout: float. Dropout after each convolution. Defaults to 0.0.
        l2: float. L2 weight decay on convolution kernels. Defaults to 0.0.
        upsampling: str. "transpose" (2x2 stride-2 transposed conv), "bilinear" (trilinear
            on volumes) or "nearest". Defaults to "transpose".
        activation: str. Activation of the hidden convolutions. Defaults to "relu".
        kernel_initializer: str. Defaults to "he_normal".
        output_activation: str or None. "auto" is sigmoid for one class and softmax
            otherwise; None returns logits (use `from_logits=True` in the losses).
            Defaults to "auto".
        width_multiplier: float. Scales every width (e.g. 0.5 for half width).
            Defaults to 1.0.
        recompute: bool. Train with recomputation: keep only the node outputs for the
            backward pass and run each node's forward again there, for much less
            training memory at about 0.8x the speed (`unetpp_tf.models.recompute`; on JAX
            each node runs under `jax.checkpoint`). It relies on Keras internals, so outside
            the tested versions, and on backends other than TensorFlow and JAX, the plain
            model comes back with a warning. Inference and saved models are unaffected.
            Defaults to False.
        preprocessing: dict, InputPreprocessing or None. Intensity normalization inside
            the model, right after the input (a layer named "preprocessing", no weights),
            so every saved format applies it: a dict of `InputPreprocessing` arguments such
            as {"normalize": "percentile", "image_size": (64, 64), "resize": "resize"}, or
            the layer itself. None adds no layer (images go in as the pipeline scales them).
            Defaults to None.
        encoder: str, keras.Model or None. A pretrained backbone for column 0: a name from
            `unetpp_tf.models.ENCODERS` ("resnet50", "efficientnetb0", "mobilenetv3large",
            "convnexttiny", ...), or a Keras model returning feature maps at strides 2..32 (a
            list, a dict, or a keras-hub backbone with `pyramid_outputs`). The decoder level i
            then sits at stride 2**(i + 1) and each head upsamples to full resolution; inputs
            must be divisible by 2**(depth + 1) (32 at depth 4). None builds the paper's own
            encoder. Encoders are 2D: a volume model takes none. Defaults to None.
        encoder_weights: "imagenet", a weights file path or None. Weights of a named encoder:
            ImageNet (downloaded by Keras), a local copy of that file or one written with
            `save_weights`, or None for random initialization. Defaults to None.
        encoder_trainable: bool. False freezes the encoder (BatchNorm in inference mode).
            Defaults to True. The encoder's BatchNorm layers take `bn_momentum` too (the
            keras.applications values, 0.99-0.999, are far too slow for short runs).
        pool_sizes: None or sequence. The pooling factors of each level: `depth` entries,
            each an int (every axis) or a per-axis tuple such as (1, 2, 2) (keep the slice
            axis of a thick-slice CT); the upsampling back to that level uses the same
            factors. `pool_sizes_for_spacing(spacing, depth)` derives them from the voxel
            spacing. None pools by 2 on every axis at every level. Defaults to None.
        name: str. Model name. Defaults to "unetpp".

    Returns:
        keras.Model: the uncompiled functional model (a `RecomputedModel` with
        `recompute=True`), which trains without materialising the concatenations.

    Example:
        >>> model = build_unetpp((96, 96, 1), depth=4, filters=32, deep_supervision=True)
        >>> [o.name for o in model.outputs][:1], len(model.outputs)
        >>> tuned = build_unetpp((256, 256, 3), encoder="resnet50", encoder_weights="imagenet")
        >>> ct = build_unetpp((32, 128, 128, 1), depth=3, pool_sizes=[(1, 2, 2), 2, 2])
    """
    return _build(
        True,
        input_shape,
        num_classes,
        depth,
        filters,
        deep_supervision,
        batch_norm=batch_norm,
        bn_momentum=bn_momentum,
        dropout=dropout,
        l2=l2,
        upsampling=upsampling,
        activation=activation,
        kernel_initializer=kernel_initializer,
        output_activation=output_activation,
        width_multiplier=width_multiplier,
        name=name,
        recompute=recompute,
        preprocessing=preprocessing,
        encoder=encoder,
        encoder_weights=encoder_weights,
        encoder_trainable=encoder_trainable,
        pool_sizes=pool_sizes,
    )


def build_unet(
    input_shape=(None, None, 1),
    num_classes: int = 1,
    depth: int = 4,
    filters=32,
    *,
    name: str = "unet",
    **options,
) -> keras.Model:
    """Build the plain U-Net baseline from the same code as UNet++.

    Only the nodes X(depth - j, j) of the decoder are built, each joined to the encoder
    node of its level by one skip; a wide U-Net is the same with wider `filters`.

    Args:
        input_shape: tuple. As in `build_unetpp`. Defaults to (None, None, 1).
        num_classes: int. As in `build_unetpp`. Defaults to 1.
        depth: int. Number of poolings. Defaults to 4.
        filters: int or tuple. As in `build_unetpp`. Defaults to 32.
        name: str. Model name. Defaults to "unet".
        **options: the keyword options of `build_unetpp` (batch_norm, bn_momentum, dropout, l2,
            upsampling, activation, kernel_initializer, output_activation,
            width_multiplier, recompute, preprocessing, encoder, encoder_weights,
            encoder_trainable, pool_sizes).

    Example:
        >>> wide = build_unet((96, 96, 1), filters=(35, 70, 140, 280, 560))
        >>> volume = build_unet((64, 64, 64, 1), depth=3, filters=16)
    """
    if options.pop("deep_supervision", False):
        raise ValueError(
            "U-Net has a single decoder column, so deep supervision has no heads to add; "
            "use build_unetpp(deep_supervision=True) instead."
        )
    params = inspect.signature(build_unetpp).parameters
    valid = [key for key, p in params.items() if p.kind is p.KEYWORD_ONLY and key != "name"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for build_unet; valid options are {valid}.")
    settings = {key: options.get(key, params[key].default) for key in valid}
    return _build(False, input_shape, num_classes, depth, filters, False, name=name, **settings)
