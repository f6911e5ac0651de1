"""Read properties off a model's graph: FLOPs per image and the input size divisor."""

from __future__ import annotations

import math

import keras


def _spatial(shape) -> int:
    return math.prod(int(d) for d in shape[1:-1])


def count_flops(model: keras.Model, input_shape=None) -> int:
    """Forward-pass FLOPs per image (a multiply-add counts 2), from the convolutions.

    Convolutions dominate a U-Net so much that pooling, activations, normalization and
    concatenation are left out (together well under 1% here).

    Args:
        model: keras.Model. A functional model.
        input_shape: tuple or None. (H, W, C) to evaluate a None x None model at; None uses
            the model's own (fixed) input shape. Defaults to None.

    Returns:
        int: FLOPs for one image.

    Example:
        >>> count_flops(unetpp_tf.from_preset("paper"), (96, 96, 1)) / 1e9   # about 8.4
    """
    if input_shape is not None:  # rebuild a copy of the graph at that size
        config = model.get_config()
        for layer in config["layers"]:
            if layer["class_name"] == "InputLayer":
                layer["config"]["batch_shape"] = (None, *input_shape)
        model = keras.Model.from_config(config)
    if any(d is None for d in model.input_shape[1:]):
        raise ValueError(f"model input {model.input_shape} has no fixed size; pass input_shape=(H, W, C).")
    total = 0
    for layer in model.layers:
        # kernel: (kh, kw, input channels / groups, filters), transposed (kh, kw, filters, input channels);
        # a ConcatConv2D's kernel covers all its parts
        if isinstance(layer, keras.layers.Conv2DTranspose):
            pixels = _spatial(layer.input.shape)
        elif isinstance(layer, keras.layers.Conv2D):
            pixels = _spatial(layer.output.shape)
        else:
            continue
        total += 2 * pixels * math.prod(layer.kernel.shape)
    return total


def _layer_scale(layer) -> float:
    """How much a layer shrinks the resolution: 2 for a stride-2 pool/conv, 1/2 for an upsampling."""
    if isinstance(layer, keras.layers.UpSampling2D):
        return 1.0 / max(layer.size)
    strides = getattr(layer, "strides", None)
    if not strides:
        return 1.0
    factor = float(max(strides) if isinstance(strides, (tuple, list)) else strides)
    return 1.0 / factor if isinstance(layer, keras.layers.Conv2DTranspose) else factor


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


def _graph_scale(model: keras.Model) -> tuple[float, float]:
    """(downsampling of the outputs, deepest downsampling on the way) for a functional model.

    The graph is read from the model's public configuration: each layer's inbound nodes name
    the layers (and calls) their input tensors come from.
    """
    config = _graph_config(model)
    inbound = {layer["name"]: layer.get("inbound_nodes") or [] for layer in config["layers"]}
    memo = {}

    def walk(name, node_index):
        if (name, node_index) not in memo:
            calls = inbound[name]
            parents = [walk(n, k) for n, k, _ in _tensor_refs(calls[node_index])] if calls else []
            scale = max((p[0] for p in parents), default=1.0)
            deepest = max((p[1] for p in parents), default=1.0)
            op = model.get_layer(name)
            if isinstance(op, keras.Model) and calls and getattr(op, "outputs", None):
                inner_scale, inner_deepest = _graph_scale(op)
                deepest = max(deepest, scale * inner_deepest)
                scale *= inner_scale
            else:
                scale *= _layer_scale(op)
            memo[name, node_index] = (scale, max(deepest, scale))
        return memo[name, node_index]

    results = [walk(name, node_index) for name, node_index, _ in _tensor_refs(config["output_layers"])]
    return max(r[0] for r in results), max(r[1] for r in results)


def size_divisor(model: keras.Model) -> int:
    """The factor a None x None model needs input height and width to be divisible by.

    It is the deepest downsampling along the graph (2**depth for a UNet++: one 2x2 pooling per
    level), found by walking the layers' strides, pool sizes and upsamplings.

    Args:
        model: keras.Model. A functional model.

    Returns:
        int: e.g. 4 for a depth-2 UNet++, 1 for a model without downsampling.

    Example:
        >>> size_divisor(build_unetpp((None, None, 1), depth=3))
        8
    """
    return max(1, int(round(_graph_scale(model)[1])))
