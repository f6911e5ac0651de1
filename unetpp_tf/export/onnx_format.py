"""ONNX files: the model's padded forward pass converted with tf2onnx, its settings embedded.

An `.onnx` file written here takes float32 images "images" [N, H, W, C] (channels last, as the
Keras model takes them, scaled by their dtype's range: 8-bit / 255, 16-bit / 65535) and
returns float32 "probabilities" [N, H, W, K]; a volume model's file takes [N, D, H, W, C].
The batch is dynamic, and so is every spatial axis the Keras model leaves free (None): such
inputs are reflection-padded to a multiple of the model's downsampling inside the graph and the
probabilities cropped back (`conversion.padded_forward`, as the SavedModel signatures do), so
the file takes any size, not only multiples of 2**depth. A model with a fixed input size gives
a file of that size. Channels last keeps the file a drop-in for the Keras model and the other
artifacts; tf2onnx's transpose optimizer leaves one transpose at each end of the graph, which
costs little next to the convolutions.

The settings `embedded_metadata` gathers (classes, mode, level, divisor, the `InputPreprocessing`
settings among them the training image size and resize policy) go into the file's
`metadata_props` under the key "unetpp_tf" as JSON, which `unetpp_tf.runners.OnnxModel` reads
(`onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map` in any ONNX runtime).

tf2onnx, onnx and onnxruntime are the optional extra `unetpp-tf[onnx]`; they are imported only
here and in `OnnxModel`. tf2onnx leaves a TensorFlow op it cannot convert in the graph under
its TensorFlow name instead of failing; `convert_to_onnx` finds such ops and raises an error
naming them and the Keras layers they come from. Two things tf2onnx 1.17 gets wrong are worked
around, measured on the encoders we ship:

- a grouped `Conv2D` runs, on Keras' TensorFlow backend, as an XLA-compiled function that
  tf2onnx keeps as an opaque call; ConvNeXt's depthwise convolutions are `Conv2D(groups=C)`,
  so the model is converted with each grouped convolution of one input channel per group as
  the `DepthwiseConv2D` it is (`onnx_friendly`, weights reshaped, the same function);
- exact GELU (ConvNeXt's `Activation("gelu")`) is computed by TensorFlow with `erfc`, which
  ONNX lacks; it is converted as `0.5 * x * (1 + erf(x / sqrt(2)))`, the same function with
  ONNX's `Erf`;
- constants a layer holds as tensors rather than variables (EfficientNet's `Normalization`
  mean and variance) are captured by the traced function and would become extra graph
  inputs; they are written into the file as initializers.

Example:
    >>> content = convert_to_onnx(model, embedded_metadata(model, "accurate", None))
    >>> files.atomic_write(staging / "model.onnx", lambda temp: Path(temp).write_bytes(content))
"""

from __future__ import annotations

import contextlib
import json
import logging
import re

import keras
import tensorflow as tf

from unetpp_tf._native_logs import native_stderr_silenced
from unetpp_tf.export.conversion import padded_forward
from unetpp_tf.export.rewrites import as_float32
from unetpp_tf.runners import METADATA_NAME, ONNX_INSTALL

ONNX_OPSET = 17  # ONNX 1.12 (2022): every current runtime runs it; what the graph needs exists since 13
_STANDARD_DOMAINS = ("", "ai.onnx")
_SPATIAL_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


def require_onnx() -> None:
    """Raise one-line ImportError unless tf2onnx, onnx and onnxruntime can be imported.

    Example:
        >>> require_onnx()   # before any work of an export with formats=("onnx",)
    """
    missing = []
    for module in ("tf2onnx", "onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: {ONNX_INSTALL}")


@contextlib.contextmanager
def _quiet_tf2onnx():
    """tf2onnx logs every conversion step (and an unsupported op as an error we raise ourselves)."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with native_stderr_silenced():
            yield
    finally:
        logger.setLevel(level)


def _layer_names(model: keras.Model) -> set:
    names = set()
    for layer in model.layers:
        names.add(layer.name)
        if isinstance(layer, keras.Model):
            names |= _layer_names(layer)
    return names


def _layer_of(node_name: str, names: set) -> str | None:
    """The innermost Keras layer named in a TensorFlow node name such as "functional_1/my_layer_1/Igamma".

    TensorFlow makes name scopes unique with a "_1", "_2" suffix, which is tried stripped too.
    """
    for part in reversed(node_name.split("/")[:-1]):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in names:
                return candidate
    return None


def unconverted_ops(proto, model: keras.Model) -> dict:
    """The ops of an ONNX graph that are not ONNX operators, {op type: [Keras layers using it]}.

    tf2onnx keeps a TensorFlow op it has no conversion for as a node of that type in the standard
    domain (no runtime can run it); ops of another domain (e.g. "com.microsoft", which
    onnxruntime has) are not counted.

    Args:
        proto: onnx.ModelProto. What tf2onnx returned.
        model: keras.Model. The converted model (for the layer names).

    Returns:
        dict: op type -> sorted layer names ("?" where the node name names no layer); {} when all convert.

    Example:
        >>> unconverted_ops(proto, model)
        {'Igamma': ['my_lambda']}
    """
    import onnx

    names = _layer_names(model)
    found: dict = {}
    for node in proto.graph.node:
        if node.domain in _STANDARD_DOMAINS and not onnx.defs.has(node.op_type):
            layers = found.setdefault(node.op_type, set())
            layers.add(_layer_of(node.name, names) or "?")
    return {op: sorted(layers) for op, layers in found.items()}


def onnx_operators(proto) -> dict:
    """{"ops": sorted op types, "custom_ops": those outside the standard ONNX domain (as "domain:op")}.

    Example:
        >>> onnx_operators(onnx.load("export/model.onnx"))["custom_ops"]
        []
    """
    ops = sorted({node.op_type for node in proto.graph.node})
    custom = sorted({f"{node.domain}:{node.op_type}" for node in proto.graph.node
                     if node.domain not in _STANDARD_DOMAINS})
    return {"ops": ops, "custom_ops": custom}


def _depthwise(layer) -> bool:
    """A grouped Conv2D with one input channel per group: a depthwise convolution."""
    return (
        type(layer) is keras.layers.Conv2D
        and layer.groups > 1
        and layer.data_format == "channels_last"
        and layer.built
        and int(layer.kernel.shape[2]) == 1
    )


def _as_depthwise(layer):
    """`layer` itself, or the DepthwiseConv2D computing what a grouped Conv2D of one channel per group computes."""
    if not _depthwise(layer):
        return layer
    config = layer.get_config()
    channels, multiplier = layer.groups, layer.filters // layer.groups
    twin = keras.layers.DepthwiseConv2D(
        kernel_size=layer.kernel_size, strides=layer.strides, padding=layer.padding, depth_multiplier=multiplier,
        data_format="channels_last", dilation_rate=layer.dilation_rate, activation=config["activation"],
        use_bias=layer.use_bias, dtype=layer.dtype_policy, name=layer.name,
    )
    twin.build((None, None, None, channels))
    kernel = keras.ops.convert_to_numpy(layer.kernel)  # [kh, kw, 1, C * m]: output c * m + k is group c's k-th
    weights = [kernel.reshape(*kernel.shape[:2], channels, multiplier)]
    if layer.use_bias:
        weights.append(keras.ops.convert_to_numpy(layer.bias))
    twin.set_weights(weights)
    return twin


def _exact_gelu(layer) -> bool:
    return type(layer) is keras.layers.Activation and layer.get_config().get("activation") == "gelu"


def _erf_gelu(x):
    """Exact GELU written with erf (an ONNX operator) instead of erfc (which TensorFlow uses)."""
    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


def _replacement(layer):
    """`layer` itself, or its ONNX-friendly twin (same function, weights copied)."""
    if _exact_gelu(layer):
        return keras.layers.Activation(_erf_gelu, name=layer.name, dtype=layer.dtype_policy)
    return _as_depthwise(layer)


def _needs_rewrite(model: keras.Model) -> bool:
    return any(
        _needs_rewrite(layer) if isinstance(layer, keras.Model) else _depthwise(layer) or _exact_gelu(layer)
        for layer in model.layers
    )


def onnx_friendly(model: keras.Model) -> keras.Model:
    """`model` as tf2onnx should convert it: float32, depthwise convolutions and exact GELU rewritten.

    A mixed-precision model becomes its float32 copy (`rewrites.as_float32`); grouped
    convolutions of one channel per group become `DepthwiseConv2D` and `Activation("gelu")` the
    erf form; every other layer is shared with `model`. A model with none of these comes back
    as it is.

    Args:
        model: keras.Model. A functional or Sequential model.

    Returns:
        keras.Model: the same function, in layers tf2onnx converts.

    Example:
        >>> friendly = onnx_friendly(build_unetpp((64, 64, 3), encoder="convnexttiny", depth=2))
    """
    model = as_float32(model)
    if not _needs_rewrite(model):
        return model
    return keras.models.clone_model(model, clone_function=_replacement, recursive=True)


def _captured_constants(concrete) -> dict:
    """{placeholder name: value} of the eager tensors (not variables) a traced function captured."""
    constants = {}
    for external, internal in concrete.graph.captures:
        if external.dtype != tf.resource and hasattr(external, "numpy"):
            constants[internal.name] = external.numpy()
    return constants


def _inline_inputs(proto, constants: dict) -> None:
    """Turn graph inputs that are captured constants into initializers holding their values."""
    from onnx import numpy_helper

    for value in list(proto.graph.input):
        if value.name in constants:
            proto.graph.input.remove(value)
            proto.graph.initializer.append(numpy_helper.from_array(constants[value.name], value.name))


def _name_dynamic_axes(values, names: tuple) -> None:
    """Name the dynamic axes of graph inputs/outputs "batch", "height", "width" (tf2onnx writes "unk__12")."""
    for value in values:
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, names):
            if not dim.HasField("dim_value"):
                dim.dim_param = name


def convert_to_onnx(model: keras.Model, metadata: dict, opset: int = ONNX_OPSET):
    """Convert a single-output model to an ONNX ModelProto that pads to its divisor and carries `metadata`.

    A mixed-precision model is converted from its float32 copy (`rewrites.as_float32`): CPU
    runtimes have no bfloat16 convolutions.

    Args:
        model: keras.Model. Single-output, float32 images [N, H, W, C] or [N, D, H, W, C].
        metadata: dict. What `conversion.embedded_metadata` returns; stored with the input shape.
        opset: int. ONNX opset of the file. Defaults to `ONNX_OPSET` (17).

    Returns:
        onnx.ModelProto: input "images", output "probabilities".

    Raises:
        ValueError: naming the TensorFlow ops tf2onnx cannot convert and the layers using them.

    Example:
        >>> proto = convert_to_onnx(model, embedded_metadata(model, "accurate", None))
        >>> proto.SerializeToString()
    """
    import tf2onnx

    _, *spatial, channels = model.input_shape
    source = onnx_friendly(model)
    forward = padded_forward(source)
    shape = [None, *spatial, channels]
    spec = [tf.TensorSpec(shape, tf.float32, name="images")]

    @tf.function(input_signature=spec, autograph=False)
    def serve(images):
        return {"probabilities": forward(images)}

    try:
        with _quiet_tf2onnx():
            constants = _captured_constants(serve.get_concrete_function())
            proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    except Exception as error:  # tf2onnx raises what its handlers raise
        text = str(error).strip()
        reason = text.splitlines()[-1] if text else type(error).__name__
        raise ValueError(
            f"ONNX conversion (tf2onnx {tf2onnx.__version__}, opset {opset}) of model {model.name!r} failed: "
            f"{reason}. Export SavedModel or TFLite instead, or replace the layer it names."
        ) from error
    _inline_inputs(proto, constants)
    missing = unconverted_ops(proto, source)
    if missing:
        listed = "; ".join(f"{op} (in layer {', '.join(repr(n) for n in layers)})" for op, layers in missing.items())
        raise ValueError(
            f"ONNX conversion of model {model.name!r} failed: tf2onnx {tf2onnx.__version__} has no ONNX "
            f"(opset {opset}) equivalent of the TensorFlow op(s) {listed}. Replace the layer(s) with ones built "
            "from standard ops, or export SavedModel/TFLite (formats=('saved_model', 'tflite')) instead."
        )
    extra = [value.name for value in proto.graph.input if value.name != "images"]
    if extra:
        raise ValueError(
            f"ONNX conversion of model {model.name!r} left graph inputs {extra} besides 'images' (values the "
            "traced model reads from outside its weights); export SavedModel/TFLite instead."
        )
    axes = ("batch", *_SPATIAL_NAMES.get(len(spatial), ()))
    _name_dynamic_axes(proto.graph.input, axes)
    _name_dynamic_axes(proto.graph.output, axes)  # padded and cropped back: the input's size
    described = {**metadata, "input_shape": shape, "pads_to_divisor": True, "opset": opset,
                 "input": "float32 images 'images', channels last, scaled by their dtype's range "
                          "(8-bit / 255, 16-bit / 65535)"}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(described)
    proto.doc_string = (
        f"unetpp_tf segmentation model: 'images' float32 {shape} -> 'probabilities' float32, "
        f"{metadata.get('num_classes')} channel(s); settings as JSON in metadata_props['{METADATA_NAME}']."
    )
    return proto
