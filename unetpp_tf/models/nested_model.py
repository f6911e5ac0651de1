"""The model class the builders return: a functional model that trains node by node.

Every UNet++ node X(i, j) convolves the concatenation of its dense skips and the upsampled
node below (at X(0, 4) five node widths). Materialising that concatenation costs a copy
forward and a slice of its gradient per input backward. `NestedModel` runs training node
by node instead: the first convolution of a node reads the parts of its concatenation
directly, as a sum of convolutions with the matching kernel slices, so neither the
concatenation nor its gradient is ever built (about 5% faster training at paper
widths, `benchmarks/training_changes.py`). The layers, weights, names and the inference
graph are those of the plain functional model, so pruning, saving and export are unchanged.

`RecomputedModel` trades compute for memory on top of that: each node is one checkpointed
segment, from its inputs (the skips X(i, 0..j-1) and the smaller X(i+1, j-1) before
upsampling) to its output, and only node outputs are kept for the backward pass, which
runs each segment's forward again, one at a time, just before it needs its internals.
That costs about one more forward pass per step and saves most of the activation memory
(`benchmarks/recompute_memory.py`). Dropout draws its seed once per step, outside the
segment, and the recomputed forward applies the same mask; BatchNorm updates its moving
statistics once per step, in the first forward pass (the recomputed forward runs in a
`keras.StatelessScope`, which drops variable updates). Gradients equal the plain model's
up to float rounding.

Layers belong to the segment of the node their name starts with (`x_{i}_{j}_...`); the
heads run as usual. This needs the TensorFlow backend (`tf.custom_gradient`) and walks the
functional graph through Keras' own node structures, as `Functional.call` does;
tests/test_nested_model.py pins both against the plain functional model.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.models.functional import operation_fn
from keras.src.random.seed_generator import SeedGenerator
from tensorflow.python.eager import record

_NODE = re.compile(r"^x_(\d+)_(\d+)_")


# ----------------------------------------------------------------------------- layers with state
# The two kinds of layer whose training call is not a pure function of its inputs. Keep
# their handling here: the rest of the module calls layers as they are.


class _ReplayedSeed(SeedGenerator):
    """A seed generator that returns one seed drawn earlier (no state of its own)."""

    def __init__(self, seed):  # noqa: D107 - deliberately skips SeedGenerator.__init__ (no variable)
        self._seed = seed

    def next(self, ordered=True):
        return self._seed


def _is_dropout(layer) -> bool:
    return isinstance(layer, keras.layers.Dropout) and layer.rate > 0


def _draw_seed(layer):
    """The seed `layer` would draw in this training step (advances its generator once)."""
    return layer.seed_generator.next()


def _dropout(layer, x, seed):
    """`layer`'s training-mode dropout of `x` with the mask of `seed`."""
    if hasattr(layer, "apply_mask") and layer.noise_shape is None:  # FusedDropout's own path
        return layer.apply_mask(x, seed)
    return keras.random.dropout(x, layer.rate, noise_shape=layer.noise_shape, seed=_ReplayedSeed(seed))


def _replay_scope():
    """Context of the recomputed forward: variable updates (BatchNorm statistics) are dropped."""
    return keras.StatelessScope()


# ----------------------------------------------------------------------------- the plan


def _segment_key(layer) -> tuple[int, int] | None:
    match = _NODE.match(layer.name)
    return (int(match[1]), int(match[2])) if match else None


def _conv_over_parts(layer, parts):
    """`layer(concatenate(parts))` for a Conv2D, as a sum of convolutions over the parts.

    The sum never materialises the concatenation (at X(0, 4) five node widths) nor,
    in the backward pass, its gradient and the slices of it: each part gets its gradient
    from its own kernel slice. Equal to the concatenated form up to float rounding.
    """
    dtype = layer.compute_dtype
    kernel = keras.ops.cast(layer.kernel, dtype)
    outputs, start = None, 0
    for part in parts:
        channels = part.shape[-1]
        term = layer.convolution_op(keras.ops.cast(part, dtype), kernel[:, :, start:start + channels, :])
        outputs = term if outputs is None else outputs + term
        start += channels
    if layer.use_bias:
        outputs = outputs + keras.ops.cast(layer.bias, dtype)
    return layer.activation(outputs) if layer.activation is not None else outputs


def _fusible(concat_node, members, outputs) -> bool:
    """Whether a concatenation only feeds one plain channels-last Conv2D of its segment."""
    layer = concat_node.operation
    if not isinstance(layer, keras.layers.Concatenate) or layer.axis not in (-1, 3):
        return False
    (out,) = concat_node.outputs
    users = [node for node in members if any(t is out for t in node.input_tensors)]
    return (
        len(users) == 1
        and all(t is not out for t in outputs)
        and type(users[0].operation) is keras.layers.Conv2D
        and users[0].operation.data_format == "channels_last"
        and users[0].operation.groups == 1
        and len(users[0].input_tensors) == 1
    )


class _Segment:
    """Graph nodes of one X(i, j), with the tensors that enter and leave it."""

    def __init__(self, key, nodes, inputs, outputs):
        self.key, self.nodes, self.inputs, self.outputs = key, nodes, inputs, outputs
        self.dropouts = [node.operation for node in nodes if _is_dropout(node.operation)]
        # concatenations computed inside the next convolution: {id(concat output): its inputs}
        self.fused = {
            id(node.outputs[0]): list(node.input_tensors) for node in nodes if _fusible(node, nodes, outputs)
        }


def _plan(model) -> list:
    """Split the model's graph into segments (one per node X(i, j)) and plain steps.

    Returns a list of `_Segment` and Keras graph nodes in an order that computes every
    tensor before it is used.
    """
    nodes = [
        node
        for depth in sorted(model._nodes_by_depth, reverse=True)
        for node in model._nodes_by_depth[depth]
        if node.operation is not None and not node.is_input
    ]
    groups, order = {}, []
    for node in nodes:
        key = _segment_key(node.operation)
        if key is None:
            order.append(node)
        elif key not in groups:
            groups[key] = [node]
            order.append(key)
        else:
            groups[key].append(node)
    produced_by = {id(t): key for key, members in groups.items() for node in members for t in node.outputs}
    consumers = {}
    for node in nodes:
        for t in node.input_tensors:
            consumers.setdefault(id(t), set()).add(_segment_key(node.operation))
    model_outputs = {id(t) for t in model.outputs}
    segments = {}
    for key, members in groups.items():
        inputs, seen = [], set()
        for node in members:
            for t in node.input_tensors:
                if produced_by.get(id(t)) != key and id(t) not in seen:
                    seen.add(id(t))
                    inputs.append(t)
        outputs = [
            t
            for node in members
            for t in node.outputs
            if id(t) in model_outputs or consumers.get(id(t), set()) - {key}
        ]
        segments[key] = _Segment(key, members, inputs, outputs)
    # Run each step once all its inputs exist (segments may interleave in depth order).
    steps, ready = [], {id(t) for t in model.inputs}
    pending = [segments[s] if isinstance(s, tuple) else s for s in order]
    while pending:
        for k, step in enumerate(pending):
            needs = step.inputs if isinstance(step, _Segment) else step.input_tensors
            if all(id(t) in ready for t in needs):
                break
        else:
            raise ValueError(f"model {model.name!r}: cannot order the recomputed segments (a cycle between nodes).")
        step = pending.pop(k)
        steps.append(step)
        ready.update(id(t) for t in (step.outputs if isinstance(step, _Segment) else step.outputs))
    return steps


def _relays(steps: list) -> dict:
    """For each segment, the positions of its inputs that a later step reads too."""
    relays, read_later = {}, set()
    for step in reversed(steps):
        inputs = step.inputs if isinstance(step, _Segment) else step.input_tensors
        if isinstance(step, _Segment):
            relays[id(step)] = [k for k, t in enumerate(inputs) if id(t) in read_later]
        read_later.update(id(t) for t in inputs)
    return relays


def _run_nodes(nodes, tensors: dict, seeds: dict, fused: dict | None = None) -> None:
    """Run graph `nodes` in training mode, reading and writing `tensors` (id -> value).

    `fused` maps concatenations to their inputs: those are skipped and the convolution
    reading them runs over the parts.
    """
    fused = fused or {}
    for node in nodes:
        layer = node.operation
        if id(node.outputs[0]) in fused:
            continue
        if node.input_tensors and id(node.input_tensors[0]) in fused:
            parts = [tensors[id(t)] for t in fused[id(node.input_tensors[0])]]
            tensors[id(node.outputs[0])] = _conv_over_parts(layer, parts)
            continue
        args, kwargs = node.arguments.fill_in(tensors)
        if id(layer) in seeds:
            outputs = _dropout(layer, args[0], seeds[id(layer)])
        else:
            outputs = operation_fn(layer, training=True)(*args, **kwargs)
        for x, y in zip(node.outputs, tree.flatten(outputs)):
            tensors[id(x)] = y


def _checkpointed(segment: _Segment, seeds: dict, relay: list):
    """A function of the segment's inputs whose backward pass recomputes its forward.

    The inputs at the positions in `relay` are also returned unchanged, and later steps read
    those copies. Their gradients then come back through this segment, which adds them to
    its own: each skip's gradient is summed along the row as it goes, instead of every
    consumer's contribution waiting at the skip until the last one arrives.
    """
    calls = []
    count = len(segment.outputs)

    def forward(*inputs):
        tensors = {id(t): v for t, v in zip(segment.inputs, inputs)}
        with _replay_scope() if calls else nullcontext():
            calls.append(None)
            _run_nodes(segment.nodes, tensors, seeds, segment.fused)
        return [tensors[id(t)] for t in segment.outputs]

    @tf.custom_gradient
    def run(*inputs):
        with record.stop_recording():
            outputs = forward(*inputs) + [tf.identity(inputs[k]) for k in relay]

        def grad(*upstream, variables=None):
            # The recomputation waits for the gradient arriving at the segment, so only one
            # segment's internals are alive at a time.
            with tf.control_dependencies([u for u in upstream if u is not None]):
                again = [tf.identity(x) for x in inputs]
            variables = list(variables or [])
            with tf.GradientTape() as tape:
                tape.watch(again)
                tape.watch(variables)
                recomputed = forward(*again)
            own = [tf.zeros_like(y) if u is None else u for y, u in zip(recomputed, upstream[:count])]
            grads = tape.gradient(
                recomputed, again + variables, output_gradients=own,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            inputs_grads = list(grads[: len(again)])
            for k, relayed in zip(relay, upstream[count:]):
                if relayed is not None:
                    inputs_grads[k] = inputs_grads[k] + relayed
            return inputs_grads, grads[len(again):]

        return outputs, grad

    return run


# ----------------------------------------------------------------------------- the model


@keras.saving.register_keras_serializable(package="unetpp_tf")
class NestedModel(keras.Model):
    """A functional model whose training call skips materialising concatenations.

    Inference (`training=False`) runs the graph exactly as a plain functional model; a
    saved model loads back as this class once `unetpp_tf` is imported. The builders
    return one; `with_recompute(model, False)` makes one from any functional UNet++.
    """

    recompute = False

    def call(self, inputs, training=None, mask=None, **kwargs):
        if not training or mask is not None or kwargs:
            return super().call(inputs, training=training, mask=mask, **kwargs)
        if not hasattr(self, "_training_plan"):
            self._training_plan = _plan(self)
            self._relays = _relays(self._training_plan)
        flat = tree.flatten(self._standardize_inputs(inputs))
        tensors = {id(t): v for t, v in zip(self.inputs, flat)}
        for step in self._training_plan:
            if not isinstance(step, _Segment):
                _run_nodes([step], tensors, {})
            elif not self.recompute:
                _run_nodes(step.nodes, tensors, {}, step.fused)
            else:
                seeds = {id(layer): _draw_seed(layer) for layer in step.dropouts}
                relay = self._relays[id(step)]
                outputs = _checkpointed(step, seeds, relay)(*[tensors[id(t)] for t in step.inputs])
                for t, value in zip(step.outputs + [step.inputs[k] for k in relay], outputs):
                    tensors[id(t)] = value
        outputs = [tensors[id(t)] for t in self.outputs]
        result = tree.pack_sequence_as(self._outputs_struct, outputs)
        return result[0] if isinstance(result, (list, tuple)) and len(result) == 1 else result


@keras.saving.register_keras_serializable(package="unetpp_tf")
class RecomputedModel(NestedModel):
    """A `NestedModel` that trains with recomputation (see the module docstring).

    Build one with `build_unetpp(..., recompute=True)` or from an existing model with
    `with_recompute`.
    """

    recompute = True


def with_recompute(model: keras.Model, enabled: bool = True) -> keras.Model:
    """The same functional model (shared layers and weights) training with or without recomputation.

    Args:
        model: keras.Model. A functional model, e.g. from `build_unetpp`.
        enabled: bool. True returns a `RecomputedModel`, False a `NestedModel`.
            Defaults to True.

    Returns:
        keras.Model: `model` itself when it already trains that way, otherwise a new
        model over the same graph.

    Example:
        >>> model = with_recompute(unetpp_tf.from_preset("paper", input_shape=(256, 256, 1)))
    """
    cls = RecomputedModel if enabled else NestedModel
    if type(model) is cls:
        return model
    return cls(model._inputs_struct, model._outputs_struct, name=model.name)
