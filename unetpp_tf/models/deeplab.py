"""DeepLabV3+ (Chen et al., ECCV 2018) over the pretrained encoders, for comparison with UNet++.

The encoder's map at stride 16 goes through atrous spatial pyramid pooling (ASPP): a 1x1
convolution, one 3x3 atrous convolution per rate, and image pooling (global average -> 1x1
convolution -> spread back over the map), concatenated and projected by a 1x1 convolution.
The decoder upsamples that by 4, joins a 1x1 projection of the encoder's stride-4 map, refines
with two 3x3 convolutions and upsamples by 4 to the input size for the classifier. Layers are
named `aspp_*`, `low_level_*`, `decoder_*` and `output` (the single head).

keras.applications backbones cannot dilate their last stage, so output stride 16 reads the map
the encoder computes at stride 16 and the stride-32 stage is not built (the Keras DeepLabV3+
example does the same with ResNet50's fourth stage). The ASPP and decoder convolutions are plain
(not depthwise-separable) convolutions, as in that example and in keras-hub's DeepLabV3+; the
image-pooling branch is a broadcast (bilinear upsampling of a 1x1 map is a copy), so None x None
models and TFLite files need no fixed size.
"""

from __future__ import annotations


import keras
from keras import ops

from unetpp_tf.models.blocks import conv_block, segmentation_head
from unetpp_tf.models.encoders import encoder_features, encoder_spec
from unetpp_tf.models.layers import BilinearUpsampling, ConcatConv2D, FusedBatchNormalization, FusedDropout
from unetpp_tf.models.preprocessing import preprocessing_layer
from unetpp_tf.models.unetpp import check_input_shape, check_model_options, resolve_output_activation

ATROUS_RATES = {16: (6, 12, 18)}  # the paper's rates for output stride 16
OUTPUT_STRIDES = tuple(ATROUS_RATES)
_ENCODER_LEVEL = {4: 2, 16: 4}  # stride -> encoder_stage{k}, the names `encoder_layers` looks for

# The backbone layers the Keras DeepLabV3+ example feeds its head (inside ResNet50's last block of
# each stage, 64 and 256 channels): with them the builder reproduces the example's parameter count.
KERAS_EXAMPLE_LAYERS = {"low_level_layer": "conv2_block3_2_relu", "aspp_layer": "conv4_block6_2_relu"}


@keras.saving.register_keras_serializable(package="unetpp_tf")
class BroadcastToMap(keras.layers.Layer):
    """Spread a (B, 1, 1, C) map over the height and width of a reference map (B, H, W, *).

    This is ASPP's "upsample the pooled features back": bilinear upsampling of a 1x1 map copies
    it, and a broadcast does so at whatever size the reference has at run time.

    Example:
        >>> pooled, reference = np.ones((2, 1, 1, 8), "float32"), np.zeros((2, 4, 6, 3), "float32")
        >>> tuple(BroadcastToMap()([pooled, reference]).shape)
        (2, 4, 6, 8)
    """

    def call(self, inputs):
        pooled, reference = inputs
        shape = ops.shape(reference)
        return ops.broadcast_to(pooled, (shape[0], shape[1], shape[2], pooled.shape[-1]))

    def compute_output_shape(self, input_shape):
        pooled, reference = input_shape
        return (*tuple(reference)[:3], pooled[-1])


def _conv_unit(x, filters: int, kernel_size: int, *, name: str, batch_norm: bool, bn_momentum: float,
               dilation_rate: int = 1, conv=keras.layers.Conv2D):
    """conv (`kernel_size`, `dilation_rate`) -> [BatchNorm] -> ReLU, named `{name}_conv|bn|act`."""
    x = conv(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=not batch_norm,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    if batch_norm:
        x = FusedBatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_act")(x)


def aspp(x, filters: int, rates, *, batch_norm: bool = True, bn_momentum: float = 0.9, dropout: float = 0.0,
         name: str = "aspp"):
    """Atrous spatial pyramid pooling: 1x1, one 3x3 atrous conv per rate, image pooling; 1x1 projection.

    Args:
        x: tensor. The encoder's map, channels last (any height and width).
        filters: int. Channels of every branch and of the projection.
        rates: tuple of int. Dilation rates of the 3x3 branches.
        batch_norm: bool. BatchNormalization after each convolution. Defaults to True.
        bn_momentum: float. Decay of BatchNorm's moving statistics. Defaults to 0.9.
        dropout: float. Dropout after the projection; 0 disables it. Defaults to 0.0.
        name: str. Prefix of the layer names. Defaults to "aspp".

    Returns:
        tensor: the projected map, `filters` channels, the size of `x`.

    Example:
        >>> y = aspp(keras.Input((None, None, 64)), 32, (6, 12, 18))
        >>> tuple(y.shape)
        (None, None, None, 32)
    """
    unit = dict(batch_norm=batch_norm, bn_momentum=bn_momentum)
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = _conv_unit(pooled, filters, 1, name=f"{name}_pool", **unit)
    branches = [BroadcastToMap(name=f"{name}_pool_broadcast")([pooled, x])]
    branches.append(_conv_unit(x, filters, 1, name=f"{name}_1x1", **unit))
    for rate in rates:
        branches.append(_conv_unit(x, filters, 3, dilation_rate=rate, name=f"{name}_rate{rate}", **unit))
    # The projection is a 1x1 conv over the concatenated branches, which training never materialises.
    x = _conv_unit(branches, filters, 1, name=f"{name}_project", conv=ConcatConv2D, **unit)
    if dropout:
        x = FusedDropout(dropout, name=f"{name}_dropout")(x)
    return x


def _positive_int(value, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}.")
    return value


def _check_options(num_classes, output_stride, atrous_rates, filters: dict, dropout, bn_momentum, encoder,
                   encoder_weights) -> tuple:
    if encoder is None:
        raise ValueError(
            "DeepLabV3+ needs an encoder: pass encoder='resnet50' (or another name of "
            "unetpp_tf.models.ENCODERS, or a multi-scale Keras model)."
        )
    check_model_options(num_classes, dropout, bn_momentum, encoder_weights)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be 16, got {output_stride!r}: keras.applications encoders cannot dilate their "
            "later stages, so the encoder's stride-16 map is the one ASPP can read at full depth."
        )
    rates = ATROUS_RATES[output_stride] if atrous_rates is None else atrous_rates
    try:
        rates = tuple(rates)
    except TypeError:
        rates = (rates,)
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
        raise ValueError(f"atrous_rates must be positive integers such as (6, 12, 18), got {atrous_rates!r}.")
    for label, value in filters.items():
        _positive_int(value, label)
    return rates


def _stride(inputs, tensor) -> int:
    """The stride of `tensor` relative to the model input (probed at 256 where the size is None)."""
    height = inputs.shape[1] or 256
    if tensor.shape[1] is None:
        probe = keras.KerasTensor((1, height, inputs.shape[2] or 256, inputs.shape[3]))
        tensor = keras.Model(inputs, tensor).compute_output_spec(probe)
    return height // tensor.shape[1]


def _encoder_map(inputs, feature, layer, stride: int, encoder, label: str):
    """The encoder's map at `stride`: the stage tap `feature`, or the output of the backbone layer `layer`."""
    if layer is None:
        return feature
    if not isinstance(encoder, str):
        raise ValueError(
            f"{label} names a layer of a keras.applications encoder; pass encoder='resnet50' or another name."
        )
    try:
        tensor = keras.Model(inputs, feature).get_layer(layer).output
    except ValueError:
        raise ValueError(
            f"{label}={layer!r} is not a layer of encoder {encoder!r} before its stride-{stride} map; use a layer "
            f"name of keras.applications.{encoder_spec(encoder).constructor} (its summary() lists them), e.g. "
            f"the Keras example's {KERAS_EXAMPLE_LAYERS[label]!r} in ResNet50."
        ) from None
    found = _stride(inputs, tensor)
    if found != stride:
        raise ValueError(
            f"{label}={layer!r} gives a map at stride {found}; it must be at stride {stride} of the input."
        )
    # named like the stage taps, so `encoder_layers` finds the encoder up to this map
    return keras.layers.Identity(name=f"encoder_stage{_ENCODER_LEVEL[stride]}")(tensor)


def build_deeplabv3plus(
    input_shape=(None, None, 3),
    num_classes: int = 1,
    *,
    encoder="resnet50",
    encoder_weights=None,
    encoder_trainable: bool = True,
    output_stride: int = 16,
    atrous_rates=None,
    aspp_filters: int = 256,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    batch_norm: bool = True,
    bn_momentum: float = 0.9,
    dropout: float = 0.1,
    output_activation="auto",
    preprocessing=None,
    aspp_layer: str | None = None,
    low_level_layer: str | None = None,
    name: str = "deeplabv3plus",
) -> keras.Model:
    """Build DeepLabV3+ (ASPP on the encoder's stride-16 map, low-level skip decoder) as a `keras.Model`.

    keras.applications backbones cannot dilate their last stage, so ASPP reads the map the encoder
    computes at stride 16 and the stride-32 stage is dropped, as in the Keras DeepLabV3+ example
    (keras.io/examples/vision/deeplabv3_plus, ResNet50 cut in its fourth stage). Its ASPP and decoder
    use plain 3x3 convolutions, not the paper's depthwise-separable ones, and so do these; the image
    pooling branch works at any input size. Parameters: the example's model (ResNet50, 20 classes)
    prints 11,857,236; `build_deeplabv3plus(num_classes=20, **KERAS_EXAMPLE_LAYERS)`, which reads the
    same two layers, has 11,856,980 (its pooling convolution has no bias before BatchNorm: 256
    fewer). By default the head reads the stage outputs instead (for ResNet50 `conv4_block6_out`,
    1024 channels, where the example reads a 256-channel map inside that block): 17,835,092 with
    20 classes, 17,830,209 with one.

    Args:
        input_shape: tuple. (height, width, channels); height and width may be None and otherwise
            must be divisible by 16. Defaults to (None, None, 3).
        num_classes: int. 1 for binary segmentation (sigmoid), K > 1 for K classes (softmax).
            Defaults to 1.
        encoder: str or keras.Model. A name from `unetpp_tf.models.ENCODERS`, or a Keras model
            returning feature maps at strides 4, 8 and 16 (list, dict, or keras-hub `pyramid_outputs`).
            Defaults to "resnet50".
        encoder_weights: "imagenet", a weights file path or None (random initialization).
            Defaults to None.
        encoder_trainable: bool. False freezes the encoder (BatchNorm in inference mode).
            Defaults to True.
        output_stride: int. Input size / ASPP map size; 16 (the only one an undilated backbone
            gives at full depth). Defaults to 16.
        atrous_rates: tuple of int or None. Dilation rates of ASPP's 3x3 branches; None is the
            paper's (6, 12, 18) for output stride 16. Defaults to None.
        aspp_filters: int. Channels of every ASPP branch and its projection. Defaults to 256.
        low_level_filters: int. Channels of the stride-4 map's 1x1 projection. Defaults to 48.
        decoder_filters: int. Channels of the decoder's two 3x3 convolutions. Defaults to 256.
        batch_norm: bool. BatchNormalization after each convolution. Defaults to True.
        bn_momentum: float. Decay of BatchNorm's moving statistics (PyTorch's default, as in
            `build_unetpp`). Defaults to 0.9.
        dropout: float. Dropout after the ASPP projection. Defaults to 0.1.
        output_activation: str or None. "auto" is sigmoid for one class and softmax otherwise;
            None returns logits. Defaults to "auto".
        preprocessing: dict, InputPreprocessing or None. Intensity normalization inside the model,
            as in `build_unetpp`. Defaults to None.
        aspp_layer: str or None. A layer of the named encoder whose output (at stride 16) ASPP
            reads instead of the stage tap, e.g. "conv4_block6_2_relu". Defaults to None.
        low_level_layer: str or None. Likewise for the decoder's stride-4 map, e.g.
            "conv2_block3_2_relu". Defaults to None.
        name: str. Model name. Defaults to "deeplabv3plus".

    Returns:
        keras.Model: the uncompiled model, with one output named "output" (float32).

    Example:
        >>> model = build_deeplabv3plus((256, 256, 3), num_classes=1, encoder="mobilenetv2")
        >>> model.output_names
        ['output']
        >>> example = build_deeplabv3plus((512, 512, 3), 20, dropout=0.0, **KERAS_EXAMPLE_LAYERS)
        >>> example.count_params()
        11856980
    """
    rates = _check_options(
        num_classes,
        output_stride,
        atrous_rates,
        {"aspp_filters": aspp_filters, "low_level_filters": low_level_filters, "decoder_filters": decoder_filters},
        dropout,
        bn_momentum,
        encoder,
        encoder_weights,
    )
    input_shape = check_input_shape(input_shape, 4, encoder)  # 2**4 = 16
    unit = dict(batch_norm=batch_norm, bn_momentum=bn_momentum)

    inputs = keras.Input(input_shape, name="image")
    preprocess = preprocessing_layer(preprocessing)
    image = inputs if preprocess is None else preprocess(inputs)
    features = encoder_features(image, encoder, encoder_weights, encoder_trainable, levels=4, bn_momentum=bn_momentum)
    low = _encoder_map(inputs, features[1], low_level_layer, 4, encoder, "low_level_layer")
    high = _encoder_map(inputs, features[3], aspp_layer, 16, encoder, "aspp_layer")

    x = aspp(high, aspp_filters, rates, dropout=dropout, **unit)
    x = BilinearUpsampling(4, name="aspp_up")(x)
    low = _conv_unit(low, low_level_filters, 1, name="low_level", **unit)
    x = conv_block([x, low], decoder_filters, name="decoder", convs=2, **unit)
    x = BilinearUpsampling(4, name="decoder_up")(x)
    activation = resolve_output_activation(output_activation, num_classes)
    outputs = segmentation_head(x, num_classes, name="output", activation=activation)
    return keras.Model(inputs, outputs, name=name)
