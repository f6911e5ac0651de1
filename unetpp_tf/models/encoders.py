"""Pretrained encoders: keras.applications backbones (or any multi-scale Keras model) under our decoders.

An encoder gives the decoder five feature maps, at strides 2, 4, 8, 16 and 32 of the input.
For a `keras.applications` backbone they are read from named layers (`ENCODERS`, one row per
model, each checked by shape in the tests) and the backbone's layers are built straight into
the segmentation model's graph, so pruning keeps only the part of the encoder a head needs and
`.keras` files hold ordinary layers. Each tap passes through an `Identity` layer named
`encoder_stage{k}` (stride 2**k), which is how `encoder_layers` finds the encoder again in a
saved model.

The backbone's own input preprocessing happens inside the model, in an `EncoderPreprocessing`
layer: our images arrive scaled to about 0..1 (the data pipeline's normalization) and leave as
the backbone was trained on (caffe: BGR 0..255 minus the ImageNet mean; torch: ImageNet mean
and deviation; tf: -1..1). Inputs with other than three channels keep RGB-pretrained weights:
the first convolution's kernel is summed over the RGB channels for one channel, and cycled over
the channels and rescaled by 3 / C otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import keras
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
STRIDES = (2, 4, 8, 16, 32)
_OUR_INPUT_LAYERS = ("image", "preprocessing", "encoder_preprocessing")  # before the backbone, not of it


def _preprocessing_stats(mode: str) -> dict:
    """Per-channel (mean, std) in the 0..1 input scale, and the channel order, for a mode."""
    if mode == "caffe":  # 255 * x[BGR] - mean
        return dict(mean=[m / 255.0 for m in CAFFE_MEAN_BGR], std=[1 / 255.0] * 3, bgr=True)
    if mode == "torch":
        return dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), bgr=False)
    if mode == "torch255":  # torch statistics, then x 255 (EfficientNet V1 rescales by 1/255 inside)
        return dict(mean=list(IMAGENET_MEAN), std=[s / 255.0 for s in IMAGENET_STD], bgr=False)
    if mode == "tf":  # 2x - 1
        return dict(mean=[0.5] * 3, std=[0.5] * 3, bgr=False)
    if mode == "tf128":  # 255 x / 128 - 1 (EfficientNetV2 S/M/L)
        return dict(mean=[128 / 255.0] * 3, std=[128 / 255.0] * 3, bgr=False)
    raise ValueError(f"unknown encoder preprocessing mode {mode!r}.")


@keras.saving.register_keras_serializable(package="unetpp_tf")
class EncoderPreprocessing(keras.layers.Layer):
    """Map images scaled to 0..1 to what a pretrained backbone expects: (x[order] - mean) / std.

    With three channels the statistics are per channel (and caffe mode reverses RGB to BGR);
    with any other number of channels every channel uses the mean of the three.

    Args:
        mode: str. "caffe", "torch", "torch255", "tf" or "tf128".

    Example:
        >>> layer = EncoderPreprocessing("torch")
        >>> layer(np.full((1, 2, 2, 3), 0.485, "float32"))[0, 0, 0, 0]   # 0.0
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        stats = _preprocessing_stats(mode)
        self.mode = mode
        self._mean, self._std, self._bgr = stats["mean"], stats["std"], stats["bgr"]

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels == 3:
            mean, std = self._mean, self._std
        else:
            mean, std = [float(np.mean(self._mean))] * channels, [float(np.mean(self._std))] * channels
        self._offset = np.asarray(mean, "float32")
        self._scale = 1.0 / np.asarray(std, "float32")
        self._flip = self._bgr and channels == 3

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self._flip:
            x = keras.ops.flip(x, axis=-1)
        return (x - keras.ops.cast(self._offset, x.dtype)) * keras.ops.cast(self._scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One keras.applications backbone: its constructor, preprocessing and feature taps.

    A tap is ("output", layer) for that layer's output, ("input", layer) for its input (where
    the map we want comes from an auto-named layer), ("final",) for the backbone's last output,
    or None where the backbone has no map at that stride (ConvNeXt's stem strides by 4).
    """

    constructor: str
    family: str
    preprocessing: str
    taps: tuple
    options: tuple = ()


def _resnet(constructor, blocks):
    return EncoderSpec(
        constructor,
        "ResNet",
        "caffe",
        (
            ("output", "conv1_relu"),
            ("output", "conv2_block3_out"),
            ("output", f"conv3_block{blocks[1]}_out"),
            ("output", f"conv4_block{blocks[2]}_out"),
            ("output", "conv5_block3_out"),
        ),
    )


def _resnet_v2(constructor, blocks):
    # Pre-activation: a stage's output is normalized by the next stage's first block, whose
    # stride-2 block is the last of the stage (so /4 is read before conv2's last block).
    return EncoderSpec(
        constructor,
        "ResNetV2",
        "tf",
        (
            ("output", "conv1_conv"),
            ("output", "conv2_block3_preact_relu"),
            ("output", f"conv3_block{blocks[1]}_preact_relu"),
            ("output", f"conv4_block{blocks[2]}_preact_relu"),
            ("output", "post_relu"),
        ),
    )


def _efficientnet(constructor):
    return EncoderSpec(
        constructor,
        "EfficientNet",
        "torch255",
        tuple(
            ("output", f"{block}_expand_activation") for block in ("block2a", "block3a", "block4a", "block6a")
        )
        + (("output", "top_activation"),),
    )


def _efficientnet_v2(constructor, preprocessing):
    # Fused MBConv blocks stride inside their expand convolution: tap its input.
    return EncoderSpec(
        constructor,
        "EfficientNetV2",
        preprocessing,
        (
            ("input", "block2a_expand_conv"),
            ("input", "block3a_expand_conv"),
            ("output", "block4a_expand_activation"),
            ("output", "block6a_expand_activation"),
            ("output", "top_activation"),
        ),
        options=(("include_preprocessing", False),),
    )


def _densenet(constructor):
    return EncoderSpec(
        constructor,
        "DenseNet",
        "torch",
        (
            ("output", "conv1_relu"),
            ("output", "pool2_conv"),
            ("output", "pool3_conv"),
            ("output", "pool4_conv"),
            ("output", "relu"),
        ),
    )


def _convnext(size: str):
    constructor, prefix = f"ConvNeXt{size}", f"convnext_{size.lower()}"  # the backbone's layer-name prefix
    return EncoderSpec(
        constructor,
        "ConvNeXt",
        "torch",
        (
            None,
            ("input", f"{prefix}_downsampling_block_0"),
            ("input", f"{prefix}_downsampling_block_1"),
            ("input", f"{prefix}_downsampling_block_2"),
            ("final",),
        ),
        options=(("include_preprocessing", False),),
    )


def _vgg(constructor, last_conv):
    return EncoderSpec(
        constructor,
        "VGG",
        "caffe",
        (
            ("output", "block2_conv2"),
            ("output", f"block3_conv{last_conv}"),
            ("output", f"block4_conv{last_conv}"),
            ("output", f"block5_conv{last_conv}"),
            ("output", "block5_pool"),
        ),
    )


ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": _resnet("ResNet50", (3, 4, 6, 3)),
    "resnet101": _resnet("ResNet101", (3, 4, 23, 3)),
    "resnet152": _resnet("ResNet152", (3, 8, 36, 3)),
    "resnet50v2": _resnet_v2("ResNet50V2", (3, 4, 6, 3)),
    "resnet101v2": _resnet_v2("ResNet101V2", (3, 4, 23, 3)),
    "resnet152v2": _resnet_v2("ResNet152V2", (3, 8, 36, 3)),
    **{f"efficientnetb{k}": _efficientnet(f"EfficientNetB{k}") for k in range(8)},
    **{f"efficientnetv2b{k}": _efficientnet_v2(f"EfficientNetV2B{k}", "torch") for k in range(4)},
    **{f"efficientnetv2{s}": _efficientnet_v2(f"EfficientNetV2{s.upper()}", "tf128") for s in ("s", "m", "l")},
    "mobilenetv2": EncoderSpec(
        "MobileNetV2",
        "MobileNetV2",
        "tf",
        tuple(("output", f"block_{k}_expand_relu") for k in (1, 3, 6, 13)) + (("output", "out_relu"),),
    ),
    # MobileNetV3's activations are auto-named: tap the expanded map entering each strided depthwise.
    "mobilenetv3small": EncoderSpec(
        "MobileNetV3Small",
        "MobileNetV3",
        "tf",
        tuple(("input", f"expanded_conv{k}_depthwise_pad") for k in ("", "_1", "_3", "_8")) + (("final",),),
        options=(("include_preprocessing", False),),
    ),
    "mobilenetv3large": EncoderSpec(
        "MobileNetV3Large",
        "MobileNetV3",
        "tf",
        tuple(("input", f"expanded_conv_{k}_depthwise_pad") for k in (1, 3, 6, 12)) + (("final",),),
        options=(("include_preprocessing", False),),
    ),
    **{f"convnext{s.lower()}": _convnext(s) for s in ("Tiny", "Small", "Base", "Large", "XLarge")},
    "densenet121": _densenet("DenseNet121"),
    "densenet169": _densenet("DenseNet169"),
    "densenet201": _densenet("DenseNet201"),
    "vgg16": _vgg("VGG16", 3),
    "vgg19": _vgg("VGG19", 4),
}


def encoder_spec(name: str) -> EncoderSpec:
    """The `ENCODERS` row for `name` (case-insensitive), or an error listing the valid names.

    Example:
        >>> encoder_spec("ResNet50").constructor
        'ResNet50'
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}.")
    return ENCODERS[key]


def _application(spec: EncoderSpec, **kwargs) -> keras.Model:
    constructor = getattr(keras.applications, spec.constructor)
    return constructor(include_top=False, **dict(spec.options), **kwargs)


def _weighted_layers(layers) -> list:
    return [layer for layer in layers if layer.weights]


def _snake_case(name: str) -> str:
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _file_keys(model: keras.Model) -> dict[str, str]:
    """{layer name: its key in a Keras 3 weights file}: class name in snake case, numbered in layer order."""
    seen, keys = {}, {}
    for layer in model.layers:
        base = _snake_case(type(layer).__name__)
        count = seen.get(base, 0)
        seen[base] = count + 1
        keys[layer.name] = base if count == 0 else f"{base}_{count}"
    return keys


def _keras3_shapes(group, model: keras.Model) -> dict:
    """{layer name: weight shapes stored for it, or None} from a Keras 3 file's `layers` group.

    A layer's variables are under `<key>/vars/<k>`; a nested model's (ConvNeXt's Sequential
    blocks) under `<key>/layers/<inner key>/...`, in the order of its own layers.
    """
    keys, stored = _file_keys(model), {}
    for layer in model.layers:
        entry = group.get(keys[layer.name])
        if entry is None:
            stored[layer.name] = None
            continue
        own = entry.get("vars")
        shapes = [own[k].shape for k in sorted(own, key=int)] if own is not None else []
        if isinstance(layer, keras.Model) and "layers" in entry:
            inner = _keras3_shapes(entry["layers"], layer)
            shapes += [shape for sub in _weighted_layers(layer.layers) for shape in inner[sub.name] or []]
        stored[layer.name] = shapes
    return stored


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _legacy_entries(root) -> list[tuple]:
    """(weight shapes, layer name) of each layer with weights in a legacy `.h5` file, in layer order."""
    entries = []
    for name in map(_text, root.attrs.get("layer_names", [])):
        shapes = [root[name][_text(weight)].shape for weight in root[name].attrs.get("weight_names", [])]
        if shapes:
            entries.append((shapes, name))
    return entries


def _stored_shapes(path: str, model: keras.Model) -> list[tuple]:
    """(weight shapes or None, name in the file) for each of `model`'s layers with weights, from its file.

    A Keras 3 file is read by key; a legacy `.h5` file (the ones keras.applications downloads)
    by position, as Keras loads it: auto-generated names such as EfficientNet's
    `normalization` get another number in each new model. Entries past the model's layers
    are kept, so a longer file shows.
    """
    import h5py

    layers = _weighted_layers(model.layers)
    try:
        with h5py.File(path, "r") as f:
            if "layers" in f:
                by_name = _keras3_shapes(f["layers"], model)
                return [(by_name[layer.name], layer.name) for layer in layers]
            return _legacy_entries(f["model_weights"] if "model_weights" in f else f)
    except OSError as error:
        raise ValueError(
            f"encoder weights file {path!r} is not a Keras weights file (HDF5: .weights.h5 or .h5) ({error}); "
            "pass the file keras.applications downloads or one written with save_weights()."
        ) from error


def _first_mismatch(model: keras.Model, path: str) -> str | None:
    """Why the weights file at `path` does not fit `model` (its first mismatching layer), or None.

    Raises:
        ValueError: the file is not an HDF5 weights file at all.
    """
    layers = _weighted_layers(model.layers)
    try:
        stored = _stored_shapes(path, model)
    except KeyError as error:
        return f"it is not laid out as Keras weights ({error})"
    for layer, (found, file_name) in zip(layers, stored + [(None, None)] * (len(layers) - len(stored))):
        expected = [tuple(w.shape) for w in layer.weights]
        if found is None:
            return f"it has no weights for layer {layer.name!r} (expected shapes {expected})"
        if [tuple(shape) for shape in found] != expected:
            where = "" if file_name == layer.name else f" (its layer {file_name!r})"
            found = [tuple(shape) for shape in found]
            return f"layer {layer.name!r} needs weights of shapes {expected}, the file has {found}{where}"
    if len(stored) > len(layers):
        extra = stored[len(layers)][1]
        return f"it has weights for {len(stored)} layers, the encoder has {len(layers)} (from {extra!r} on)"
    return None


def _load_reference(spec: EncoderSpec, name: str, weights) -> keras.Model:
    """The standalone RGB backbone with `weights` ("imagenet" or a file path) loaded."""
    if weights == "imagenet":
        try:
            return _application(spec, weights="imagenet", input_shape=(None, None, 3))
        except Exception as error:
            raise ConnectionError(
                f"could not get the ImageNet weights of encoder {name!r} ({type(error).__name__}: {error}); "
                "with no network, pass encoder_weights=PATH (--encoder-weights PATH) to a local copy: the file "
                f"keras.applications.{spec.constructor}(include_top=False) downloads into ~/.keras/models, or "
                "one written with save_weights()."
            ) from error
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"encoder weights file {path!r} does not exist; pass 'imagenet', None (random initialization) "
            "or the path of a Keras weights file (.weights.h5 or .h5) for this encoder."
        )
    reference = _application(spec, weights=None, input_shape=(None, None, 3))
    # checked first: Keras skips some mismatches with a warning and leaves fresh weights there
    problem = _first_mismatch(reference, path)
    if problem is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                reference.load_weights(path)
        except Exception as error:
            problem = f"loading failed ({type(error).__name__}: {error})"
    if problem is not None:
        raise ValueError(
            f"encoder weights file {path!r} does not fit encoder {name!r}: {problem}. Is it a file for another "
            f"architecture? It must hold keras.applications.{spec.constructor}(include_top=False) weights."
        )
    return reference


def _adapt_input_weight(value: np.ndarray, channels: int) -> np.ndarray:
    """A first-layer weight stored for 3 input channels, adapted to `channels`."""
    if value.ndim == 4:  # conv kernel (kh, kw, 3, filters)
        if channels == 1:
            return value.sum(axis=2, keepdims=True)
        return np.concatenate([value[:, :, [c % 3]] for c in range(channels)], axis=2) * (3.0 / channels)
    return value


def _copy_weights(reference: keras.Model, layers: list, channels: int, name: str) -> None:
    """Copy the reference backbone's weights into the same layers built on `channels` channels."""
    source, target = _weighted_layers(reference.layers), _weighted_layers(layers)
    if len(source) != len(target):
        raise RuntimeError(f"encoder {name!r}: {len(source)} weighted layers in the reference, {len(target)} built.")
    for ref_layer, layer in zip(source, target):
        if isinstance(layer, keras.layers.Normalization):
            continue  # EfficientNet's input normalization: EncoderPreprocessing does it, this stays identity
        values = []
        for ref_weight, weight in zip(ref_layer.get_weights(), layer.weights):
            if ref_weight.shape != tuple(weight.shape):
                ref_weight = _adapt_input_weight(ref_weight, channels)
            if ref_weight.shape != tuple(weight.shape):
                raise RuntimeError(
                    f"encoder {name!r}: layer {layer.name!r} has weights of shape {tuple(weight.shape)}, "
                    f"the pretrained ones are {ref_weight.shape}."
                )
            values.append(ref_weight)
        layer.set_weights(values)


def _tap(backbone: keras.Model, tap):
    if tap[0] == "final":
        return backbone.output
    layer = backbone.get_layer(tap[1])
    return layer.output if tap[0] == "output" else layer.input


def _stage(tensor, stride: int):
    return keras.layers.Identity(name=f"encoder_stage{STRIDES.index(stride) + 1}")(tensor)


def _application_features(image, name: str, weights, trainable: bool, levels: int, bn_momentum) -> list:
    spec = encoder_spec(name)
    reference = None if weights is None else _load_reference(spec, name, weights)  # bad files fail before the build
    x = EncoderPreprocessing(spec.preprocessing, name="encoder_preprocessing")(image)
    backbone = _application(spec, weights=None, input_tensor=x)
    layers = [layer for layer in backbone.layers if layer.name not in _OUR_INPUT_LAYERS]
    if reference is not None:
        _copy_weights(reference, layers, image.shape[-1], name)
    for layer in layers:
        layer.trainable = trainable
        if bn_momentum is not None and isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(bn_momentum)
    return [None if tap is None else _tap(backbone, tap) for tap in spec.taps[:levels]]


def _as_multiscale_model(encoder) -> keras.Model:
    """The user's encoder as a model returning its maps (for a keras-hub backbone, its `pyramid_outputs`)."""
    pyramid = getattr(encoder, "pyramid_outputs", None)
    if pyramid:
        return keras.Model(encoder.inputs, dict(pyramid), name=f"{encoder.name}_pyramid")
    if not isinstance(encoder, keras.Model):
        raise TypeError(
            "encoder must be a name from ENCODERS or a keras.Model returning feature maps, "
            f"got {type(encoder).__name__}."
        )
    return encoder


def _custom_features(image, encoder, trainable: bool, levels: int) -> list:
    """Feature maps of a user's multi-scale model, sorted by stride (a missing /2 is allowed)."""
    encoder = _as_multiscale_model(encoder)
    if len(encoder.inputs) != 1:
        raise ValueError(f"encoder model {encoder.name!r} must take one image input, it takes {len(encoder.inputs)}.")
    expected = encoder.inputs[0].shape
    if expected[-1] is not None and expected[-1] != image.shape[-1]:
        raise ValueError(
            f"encoder model {encoder.name!r} takes {expected[-1]} input channels, the images have "
            f"{image.shape[-1]}; build the encoder for {image.shape[-1]} channels or change the data."
        )
    probe = expected[1] or 256  # the encoder's own size where it has one
    probe_input = keras.KerasTensor((1, probe, expected[2] or probe, image.shape[-1]))
    specs = keras.tree.flatten(encoder.compute_output_spec(probe_input))
    if any(len(spec.shape) != 4 for spec in specs):
        raise ValueError(
            f"encoder model {encoder.name!r} must return feature maps (batch, height, width, channels) at strides "
            f"among {STRIDES}; it returns {[tuple(spec.shape) for spec in specs]}."
        )
    strides = [probe // spec.shape[1] if spec.shape[1] and probe % spec.shape[1] == 0 else None for spec in specs]
    missing = [s for s in STRIDES[1:levels] if s not in strides]
    if missing:
        raise ValueError(
            f"encoder model {encoder.name!r} gives feature maps at strides {sorted(s for s in strides if s)}, "
            f"but a decoder of depth {levels - 1} needs strides {list(STRIDES[1:levels])} (and 2, which it can "
            f"make itself); {missing} missing: return a map at each of them, or use a smaller depth."
        )
    if not trainable:  # a trainable model keeps whatever its owner froze inside it
        encoder.trainable = False
    by_stride = dict(zip(strides, keras.tree.flatten(encoder(image))))
    return [by_stride.get(s) for s in STRIDES[:levels]]


def encoder_features(
    image, encoder, weights=None, trainable: bool = True, levels: int = 5, bn_momentum: float | None = None
) -> list:
    """Build an encoder on `image` and return its maps at strides 2, 4, ... 2**levels.

    Each map is wrapped in an `encoder_stage{k}` Identity layer. A missing stride-2 map (ConvNeXt's
    stem strides by 4; a user's model may not have one) comes back as None: the decoder makes it.

    Args:
        image: KerasTensor. The (preprocessed) model input, channels last, scaled to about 0..1.
        encoder: str or keras.Model. A name from `ENCODERS`, or a model returning feature maps
            at strides among 2..32 (a list, a dict, or a keras-hub backbone's `pyramid_outputs`),
            which gets `image` as it is (its own preprocessing is up to the model).
        weights: "imagenet", a weights file path or None (random initialization). Only for names.
        trainable: bool. Whether the encoder's layers train. Defaults to True.
        levels: int. How many maps (strides 2..2**levels). Defaults to 5.
        bn_momentum: float or None. Decay of the named backbone's BatchNorm statistics. The
            keras.applications backbones keep 0.99 (ResNet, EfficientNet, DenseNet) or 0.999
            (MobileNet), which average over 100-1000 steps: after a few hundred steps of training
            their inference-mode outputs are still far from the training-mode ones (a MobileNetV2
            UNet++ scored validation Dice 0 on the synthetic set while its training Dice was 0.95).
            The builders pass their own `bn_momentum` (0.9). None keeps the backbone's.
            Defaults to None.

    Returns:
        list: `levels` tensors, fine to coarse; entry 0 may be None (no stride-2 map).

    Example:
        >>> image = keras.Input((64, 64, 1))
        >>> [f.shape[1] for f in encoder_features(image, "resnet50")]
        [32, 16, 8, 4, 2]
    """
    if isinstance(encoder, str):
        features = _application_features(image, encoder, weights, trainable, levels, bn_momentum)
    else:
        if weights is not None:
            raise ValueError(
                "encoder_weights is for the named keras.applications encoders; load a custom encoder "
                "model's weights before passing it as encoder=."
            )
        features = _custom_features(image, encoder, trainable, levels)
    return [None if f is None else _stage(f, stride) for f, stride in zip(features, STRIDES)]


def encoder_layers(model: keras.Model) -> list:
    """The layers of `model` that belong to its encoder (up to the `encoder_stage*` taps).

    Works on a freshly built model and on one loaded from a `.keras` file.

    Example:
        >>> model = build_unetpp((64, 64, 3), encoder="mobilenetv2", filters=8)
        >>> for layer in encoder_layers(model):
        ...     layer.trainable = False
    """
    taps = [layer.output for layer in model.layers if layer.name.startswith("encoder_stage")]
    if not taps:
        return []
    reached = keras.Model(model.inputs, taps).layers
    return [
        layer
        for layer in reached
        if not isinstance(layer, keras.layers.InputLayer)
        and layer.name not in _OUR_INPUT_LAYERS
        and not layer.name.startswith(("encoder_stage", "x_"))
    ]
