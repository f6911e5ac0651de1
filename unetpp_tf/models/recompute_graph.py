"""The training call of `RecomputedModel`: each node of the graph is one checkpointed segment.

Opt-in and version-guarded: `unetpp_tf.models.recompute` imports this module only for a
training call of a `RecomputedModel` under a Keras (and, on that backend, TensorFlow)
version it was tested with (`recompute.TESTED_KERAS`, `recompute.TESTED_TENSORFLOW`). It
walks the functional graph through Keras' own node structures (`_nodes_by_depth`,
`Node.arguments`, as `Functional.call` does): that is not public API, which is why nothing
on the default path imports it. Keras, TensorFlow and JAX themselves are used through public
APIs only (`keras.StatelessScope`, `tf.custom_gradient`, `jax.checkpoint`), each backend's
imported only on that backend.

On JAX each segment is a pure function of its inputs, the values of its layers' variables
and its dropout seeds, run under `jax.checkpoint` (which keeps only those arguments for the
backward pass and traces the forward once); the new values of the non-trainable variables
(BatchNorm's moving statistics) are among its outputs and are assigned after it, so the
statistics move once per step, as without recomputation. Everything below about
`tf.function`, relays and `StatelessScope` replays is the TensorFlow path.

Keras trains in a `tf.function`, where the gradient reaches a segment only through its
custom gradient, so the forward's internals are not kept for the backward pass. Under
`run_eagerly=True` the outer tape also records the forward's operations and holds their
tensors until the step ends: the results are the same, the memory saving is not.

Each node X(i, j) is one segment, from its inputs (the skips X(i, 0..j-1) and the smaller
X(i+1, j-1) before upsampling) to its output, and only node outputs are kept for the
backward pass, which runs each segment's forward again, one at a time, just before it needs
its internals. That costs about one more forward pass per step and saves most of the
activation memory (`benchmarks/recompute_memory.py`). Dropout draws its seed once per step,
outside the segment, and the recomputed forward applies the same mask; BatchNorm updates its
moving statistics once per step, in the first forward pass (the recomputed forward runs in a
`keras.StatelessScope`, which drops variable updates). Gradients equal the plain model's up
to float rounding. Layers belong to the segment of the node their name starts with
(`x_{i}_{j}_...`); the heads run as usual. tests/test_nested_model.py pins all of this
against the plain functional model.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import keras

_NODE = re.compile(r"^x_(\d+)_(\d+)_")


# ----------------------------------------------------------------------------- layers with state
# The two kinds of layer whose training call is not a pure function of its inputs. Keep
# their handling here: the rest of the module calls layers as they are.


class _ReplayedSeed(keras.random.SeedGenerator):
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


class _Segment:
    """Graph nodes of one X(i, j), with the tensors that enter and leave it."""

    def __init__(self, key, nodes, inputs, outputs):
        self.key, self.nodes, self.inputs, self.outputs = key, nodes, inputs, outputs
        self.dropouts = [node.operation for node in nodes if _is_dropout(node.operation)]


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
        ready.update(id(t) for t in step.outputs)
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


def _run_nodes(nodes, tensors: dict, seeds: dict) -> None:
    """Run graph `nodes` in training mode, reading and writing `tensors` (id -> value)."""
    for node in nodes:
        layer = node.operation
        args, kwargs = node.arguments.fill_in(tensors)
        if id(layer) in seeds:
            outputs = _dropout(layer, args[0], seeds[id(layer)])
        elif isinstance(layer, keras.layers.Layer):
            outputs = layer(*args, **{**kwargs, "training": True})
        else:  # a keras.ops operation recorded in the graph
            outputs = layer(*args, **kwargs)
        for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
            tensors[id(x)] = y


def _checkpointed_tf(segment: _Segment, seeds: dict, relay: list):
    """A function of the segment's inputs whose backward pass recomputes its forward (TensorFlow).

    The inputs at the positions in `relay` are also returned unchanged, and later steps read
    those copies. Their gradients then come back through this segment, which adds them to
    its own: each skip's gradient is summed along the row as it goes, instead of every
    consumer's contribution waiting at the skip until the last one arrives.
    """
    import tensorflow as tf

    calls = []
    count = len(segment.outputs)

    def forward(*inputs):
        tensors = {id(t): v for t, v in zip(segment.inputs, inputs)}
        with _replay_scope() if calls else nullcontext():
            calls.append(None)
            _run_nodes(segment.nodes, tensors, seeds)
        return [tensors[id(t)] for t in segment.outputs]

    @tf.custom_gradient
    def run(*inputs):
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


def _segment_variables(segment: _Segment) -> list:
    """The variables of the segment's layers, each once, in graph order."""
    found, seen = [], set()
    for node in segment.nodes:
        for variable in getattr(node.operation, "variables", []):
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def _checkpointed_jax(segment: _Segment, seeds: dict):
    """A function of the segment's inputs whose backward pass recomputes its forward (JAX).

    The segment runs as a pure function under `jax.checkpoint`: variable values come in as
    arguments (through a `keras.StatelessScope`), updated non-trainable values go out as
    results and are assigned here, outside the checkpoint, so no traced value escapes it.
    """
    import jax

    variables = _segment_variables(segment)
    updated = [v for v in variables if not v.trainable]
    seed_keys = list(seeds)

    def pure(values, seed_values, inputs):
        tensors = {id(t): v for t, v in zip(segment.inputs, inputs)}
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            _run_nodes(segment.nodes, tensors, dict(zip(seed_keys, seed_values)))
        return [tensors[id(t)] for t in segment.outputs], [scope.get_current_value(v) for v in updated]

    def run(*inputs):
        # Under a mixed-precision policy these reads are cast to the compute dtype and the scope
        # casts them back: the layers cast them down again, so they compute with the same values.
        values = [v.value for v in variables]
        outputs, new_values = jax.checkpoint(pure)(values, [seeds[k] for k in seed_keys], list(inputs))
        for variable, value in zip(updated, new_values):
            variable.assign(value)
        return outputs

    return run


# ----------------------------------------------------------------------------- the call


def recomputed_call(model: keras.Model, inputs):
    """The training-mode output of functional `model` on `inputs`, node by node with recomputation.

    Args:
        model: keras.Model. A functional model whose layers are named after their node.
        inputs: the model's inputs, as for `model(inputs, training=True)`.

    Returns:
        The model's outputs, in the structure of `model.output`.

    Example:
        >>> outputs = recomputed_call(model, images)   # inside a GradientTape
    """
    plan = getattr(model, "_recompute_plan", None)
    if plan is None:
        steps = _plan(model)
        plan = model._recompute_plan = (steps, _relays(steps))
    steps, relays = plan
    on_jax = keras.backend.backend() == "jax"
    flat = keras.tree.flatten(model._standardize_inputs(inputs))
    tensors = {id(t): v for t, v in zip(model.inputs, flat)}
    for step in steps:
        if not isinstance(step, _Segment):
            _run_nodes([step], tensors, {})
            continue
        seeds = {id(layer): _draw_seed(layer) for layer in step.dropouts}
        relay = [] if on_jax else relays[id(step)]
        run = _checkpointed_jax(step, seeds) if on_jax else _checkpointed_tf(step, seeds, relay)
        outputs = run(*[tensors[id(t)] for t in step.inputs])
        for t, value in zip(step.outputs + [step.inputs[k] for k in relay], outputs):
            tensors[id(t)] = value
    result = keras.tree.pack_sequence_as(model.output, [tensors[id(t)] for t in model.outputs])
    return result[0] if isinstance(result, (list, tuple)) and len(result) == 1 else result
