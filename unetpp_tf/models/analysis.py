"""Read properties off a model's graph: FLOPs per image and the input size divisor."""

from __future__ import annotations

import math

import keras

from unetpp_tf.models.layers import VolumeUpsampling


def _spatial(shape) -> int:
    return math.prod(int(d) for d in shape[1:-1])


_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
# kernel (k..., input channels / groups, filters), depthwise (k..., channels, multiplier), dense (in, out):
# one multiply-add per kernel entry and output position
_PER_OUTPUT_POSITION = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Dense,
)


def _first(structure):
    return keras.tree.flatten(structure)[0]


def _layer_flops(layer, input_spec, output_spec) -> int:
    """FLOPs of one layer called on `input_spec` (the first input) giving `output_spec` (the first output)."""
    if isinstance(layer, keras.Model):  # nested model (ConvNeXt's Sequential stem): counted at its input size
        return count_flops(layer, tuple(input_spec.shape[1:]))
    if isinstance(layer, _TRANSPOSED):  # each input position scatters the whole kernel
        return 2 * _spatial(input_spec.shape) * math.prod(layer.kernel.shape)
    if isinstance(layer, _SEPARABLE):  # depthwise then pointwise, both at the output positions
        kernels = math.prod(layer.depthwise_kernel.shape) + math.prod(layer.pointwise_kernel.shape)
        return 2 * _spatial(output_spec.shape) * kernels
    if isinstance(layer, _PER_OUTPUT_POSITION):  # Dense on (batch, h, w, c) maps: h * w positions
        return 2 * _spatial(output_spec.shape) * math.prod(layer.kernel.shape)
    return 0


def count_flops(model: keras.Model, input_shape=None) -> int:
    """Forward-pass FLOPs per image (a multiply-add counts 2), from the layers with kernels.

    Counted: Conv1D/2D/3D (grouped ones too: their kernel holds input channels / groups), their
    transposed variants, DepthwiseConv, SeparableConv (depthwise + pointwise), and Dense layers,
    which on feature maps (ConvNeXt's pointwise MLPs) cost once per position; `ConcatConv2D`'s
    kernel covers all its parts (`ConcatConv3D`'s likewise; volume models count per volume).
    Layers of nested models (ConvNeXt's Sequential stem and downsampling blocks) are counted at
    the input size the nested model is called on. Left out,
    as they are in the published figures: pooling, activations, normalization, additions and
    concatenation (together about 1% of a U-Net), and layers inside custom layers that are not
    models.

    Shapes come from `compute_output_spec`, so no weights are created: evaluating a large
    backbone at another size costs a fraction of a second.

    Args:
        model: keras.Model. A functional or Sequential model with one input.
        input_shape: tuple or None. (H, W, C), or (D, H, W, C) for a volume model, to evaluate a
            model with None sizes at; None uses the model's own (fixed) input shape.
            Defaults to None.

    Returns:
        int: FLOPs for one image (one volume).

    Example:
        >>> count_flops(unetpp_tf.from_preset("paper"), (96, 96, 1)) / 1e9   # about 8.4
    """
    if len(model.inputs) != 1:
        raise ValueError(f"count_flops needs a model with one input; model {model.name!r} has {len(model.inputs)}.")
    shape = tuple(model.inputs[0].shape[1:]) if input_shape is None else tuple(input_shape)
    if any(d is None for d in shape):
        example = "(D, H, W, C)" if len(shape) == 4 else "(H, W, C)"
        raise ValueError(f"model input {model.input_shape} has no fixed size; pass input_shape={example}.")
    layers = [layer for layer in model.layers if layer.weights]
    try:
        ends = [(_first(layer.input), _first(layer.output)) for layer in layers]
    except (AttributeError, ValueError) as error:  # a layer called more than once has no single input
        raise ValueError(f"cannot count the FLOPs of model {model.name!r}: {error}") from error
    probe = keras.Model(model.inputs, [tensor for pair in ends for tensor in pair])
    specs = keras.tree.flatten(probe.compute_output_spec(keras.KerasTensor((1, *shape), model.inputs[0].dtype)))
    return sum(_layer_flops(layer, specs[2 * k], specs[2 * k + 1]) for k, layer in enumerate(layers))


def _layer_scale(layer) -> float:
    """How much a layer shrinks the resolution: 2 for a stride-2 pool/conv, 1/2 for an upsampling."""
    if isinstance(layer, (keras.layers.UpSampling2D, keras.layers.UpSampling3D, VolumeUpsampling)):
        return 1.0 / max(layer.size)
    strides = getattr(layer, "strides", None)
    if not strides:
        return 1.0
    factor = float(max(strides) if isinstance(strides, (tuple, list)) else strides)
    return 1.0 / factor if isinstance(layer, _TRANSPOSED) else factor


def _tensor_refs(structure) -> list[tuple]:
    """(layer name, node index, tensor index) of every tensor in a serialized call or endpoint list."""
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            return [tuple(structure["config"]["keras_history"])]
        return [ref for value in structure.values() for ref in _tensor_refs(value)]
    if isinstance(structure, (list, tuple)):
        if len(structure) == 3 and isinstance(structure[0], str):  # one endpoint [name, node, tensor]
            return [tuple(structure)]
        return [ref for value in structure for ref in _tensor_refs(value)]
    return []


def _graph_config(model: keras.Model) -> dict:
    try:
        return model.get_config()
    except (NotImplementedError, TypeError) as error:
        raise ValueError(
            f"cannot read the graph of model {model.name!r} from its configuration ({error}); "
            "give its custom layers a get_config(), as saving the model needs too."
        ) from error


def _op_scale(op) -> tuple[float, float]:
    """(downsampling from input to output, deepest downsampling inside) of one layer or nested model."""
    if isinstance(op, keras.Model) and getattr(op, "outputs", None):
        return _graph_scale(op)
    scale = _layer_scale(op)
    return scale, max(1.0, scale)


def _sequential_scale(model: keras.Sequential) -> tuple[float, float]:
    scale = deepest = 1.0
    for layer in model.layers:
        inner_scale, inner_deepest = _op_scale(layer)
        deepest = max(deepest, scale * inner_deepest)
        scale *= inner_scale
    return scale, deepest


def _graph_scale(model: keras.Model) -> tuple[float, float]:
    """(downsampling of the outputs, deepest downsampling on the way) for a functional or Sequential model.

    A functional graph is read from the model's public configuration: each layer's inbound
    nodes name the layers (and calls) their input tensors come from. Operations that are not
    layers (`x + 3.0` in MobileNetV3's hard-swish) keep the resolution.
    """
    if isinstance(model, keras.Sequential):
        return _sequential_scale(model)
    config = _graph_config(model)
    inbound = {layer["name"]: layer.get("inbound_nodes") or [] for layer in config["layers"]}
    layers = {layer.name: layer for layer in model.layers}
    memo = {}

    def walk(name, node_index):
        if (name, node_index) not in memo:
            calls = inbound[name]
            parents = [walk(n, k) for n, k, _ in _tensor_refs(calls[node_index])] if calls else []
            scale = max((p[0] for p in parents), default=1.0)
            deepest = max((p[1] for p in parents), default=1.0)
            inner_scale, inner_deepest = _op_scale(layers[name]) if calls and name in layers else (1.0, 1.0)
            memo[name, node_index] = (scale * inner_scale, max(deepest, scale * inner_deepest))
        return memo[name, node_index]

    results = [walk(name, node_index) for name, node_index, _ in _tensor_refs(config["output_layers"])]
    return max(r[0] for r in results), max(r[1] for r in results)


def size_divisor(model: keras.Model) -> int:
    """The factor a None x None model needs input height and width to be divisible by.

    It is the deepest downsampling along the graph (2**depth for a UNet++: one 2x2 pooling per
    level), found by walking the layers' strides, pool sizes and upsamplings. Each layer counts
    with its largest factor, so for anisotropic pooling (`pool_sizes`) it is the divisor of the
    most pooled axis, a multiple of every axis' own divisor (padding every axis to it is valid).

    Args:
        model: keras.Model. A functional model (nested functional and Sequential models are
            walked too).

    Returns:
        int: e.g. 4 for a depth-2 UNet++, 32 for a depth-4 one over a keras.applications encoder,
            1 for a model without downsampling.

    Example:
        >>> size_divisor(build_unetpp((None, None, 1), depth=3))
        8
    """
    return max(1, int(round(_graph_scale(model)[1])))
