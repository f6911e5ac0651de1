"""Recomputed training (opt-in, version-guarded) trains the same model as the plain functional
graph: equal gradients, one BatchNorm update, same fit, same files; outside the tested versions
it falls back to the plain model with one warning.

`value_and_gradients` is the backend-neutral gradient step the other model tests import.
"""

import contextlib
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf.config import TrainConfig
from unetpp_tf.models import recompute_graph
from unetpp_tf.models.recompute import RecomputedModel, recompute_unavailable, with_recompute
from unetpp_tf.training import model_from_config

VARIANTS = {"bn": dict(batch_norm=True, dropout=0.0), "paper": dict(batch_norm=False, dropout=0.5),
            "bn+dropout": dict(batch_norm=True, dropout=0.3)}
# JAX runs the variant with both kinds of stateful layer (its op-by-op calls compile every new shape)
JAX_VARIANTS = [pytest.param(name, marks=pytest.mark.backend_independent) if name == "bn+dropout" else name
                for name in VARIANTS]


def _tiny(**options):
    keras.utils.set_random_seed(1)
    return unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True, **options)


def _functional(model):
    """The plain Keras functional model over the same layers: the reference graph."""
    return keras.Model(model.input, model.output, name=model.name)


def _state(model):
    """Every variable, seed generator states included, to restore between the two runs."""
    return [v.numpy() for v in model.variables] + [
        layer.seed_generator.state.numpy() for layer in model.layers if isinstance(layer, keras.layers.Dropout)
    ]


def _restore(model, values):
    variables = list(model.variables) + [
        layer.seed_generator.state for layer in model.layers if isinstance(layer, keras.layers.Dropout)
    ]
    for variable, value in zip(variables, values):
        variable.assign(value)


def value_and_gradients(loss_fn, inputs=(), owner=None, compiled=False, outputs=False):
    """`loss_fn(*inputs)` and its gradients with respect to `inputs` and `owner`'s trainable variables.

    TensorFlow differentiates with a GradientTape, JAX with jax.value_and_grad over the
    variables' values in a keras.StatelessScope; `compiled` runs the step as one tf.function or
    jax.jit (on JAX much faster than its op-by-op mode for whole models). Either way the
    non-trainable variables of `owner` (BatchNorm statistics, dropout seeds) end with the
    values the call left them, as after a training step. With `outputs`, `loss_fn` returns
    (loss, tensor) and the tensor comes back as a fourth result, in numpy.

    Returns:
        (float loss, numpy input gradients, numpy variable gradients[, numpy output]).
    """
    variables = list(owner.trainable_variables) if owner is not None else []
    state = list(owner.non_trainable_variables) if owner is not None else []
    inputs = [keras.ops.convert_to_tensor(x) for x in inputs]

    def with_aux(*xs):
        result = loss_fn(*xs)
        return result if outputs else (result, keras.ops.zeros(()))

    if keras.backend.backend() == "jax":
        import jax

        def pure(xs, values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                loss, aux = with_aux(*xs)
            return loss, (aux, [scope.get_current_value(v) for v in state])

        step = jax.value_and_grad(pure, argnums=(0, 1), has_aux=True)
        (loss, (aux, new_state)), (input_grads, grads) = (jax.jit(step) if compiled else step)(
            inputs, [v.value for v in variables]
        )
        for variable, value in zip(state, new_state):
            variable.assign(value)
    else:
        def step(xs):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                loss, aux = with_aux(*xs)
            all_grads = tape.gradient(loss, [*xs, *variables])
            return loss, aux, all_grads[: len(xs)], all_grads[len(xs):]

        loss, aux, input_grads, grads = (tf.function(step) if compiled else step)(inputs)
    result = float(loss), [np.asarray(g) for g in input_grads], [np.asarray(g) for g in grads]
    return (*result, keras.ops.convert_to_numpy(keras.ops.cast(aux, "float32"))) if outputs else result


def _gradients(model, images):
    """The loss, weight gradients and then non-trainable values of one training-mode step of `model`."""
    def loss_fn(x):
        return sum(keras.ops.sum(keras.ops.square(out - 0.3)) for out in model(x, training=True))

    loss, _, grads = value_and_gradients(loss_fn, [images], model, compiled=True)
    return loss, grads, [v.numpy() for v in model.non_trainable_variables]


@pytest.mark.parametrize("variant", JAX_VARIANTS)
def test_gradients_and_statistics_equal_the_plain_model(variant, images):
    plain = _functional(_tiny(**VARIANTS[variant]))
    recomputed = with_recompute(plain)  # the same layers and weights
    assert type(recomputed) is RecomputedModel
    assert recomputed.layers == plain.layers
    start = _state(plain)
    before = [v.numpy() for v in plain.non_trainable_variables]
    loss, grads, moving = _gradients(plain, images)
    _restore(plain, start)
    loss_r, grads_r, moving_r = _gradients(recomputed, images)
    assert loss_r == pytest.approx(loss, rel=1e-6)
    scale = max(np.abs(g).max() for g in grads)
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g_r, g, rtol=0, atol=1e-6 * scale)
    for m, m_r in zip(moving, moving_r):  # BatchNorm statistics moved once, dropout seeds advanced once
        np.testing.assert_allclose(m_r, m, rtol=0, atol=1e-6)
    statistics = [k for k, v in enumerate(plain.non_trainable_variables) if "moving_" in v.path]
    assert len(statistics) == (2 * 2 * 6 if VARIANTS[variant]["batch_norm"] else 0)  # 2 per BN, 2 BN per node
    assert all(not np.array_equal(moving[k], before[k]) for k in statistics)


def _residual_bytes(model, images) -> int:
    """Bytes of the values JAX keeps from a training-mode forward pass for the backward pass (weights aside)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(values):
        outputs, _ = model.stateless_call(values, fixed, images, training=True)
        return sum(keras.ops.sum(out) for out in outputs)

    _, backward = jax.vjp(loss, trainable)
    weights = {id(v) for v in trainable + fixed}
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(backward)
               if hasattr(leaf, "nbytes") and id(leaf) not in weights)


@pytest.mark.backend_independent
def test_each_node_is_one_checkpointed_segment(images):
    model = with_recompute(_tiny(dropout=0.2))
    segments = [step for step in recompute_graph._plan(model) if isinstance(step, recompute_graph._Segment)]
    assert sorted(s.key for s in segments) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    assert [len(s.outputs) for s in segments] == [1] * len(segments)
    if keras.backend.backend() == "jax":  # TensorFlow's replays are counted in the next test
        import jax

        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]
        call = jax.make_jaxpr(lambda values: model.stateless_call(values, fixed, images, training=True))
        graph = str(call(trainable))
        assert len(re.findall(r"\b(?:checkpoint|remat\d*)\[", graph)) == len(segments)
        # Only node outputs (and the inputs of the segments) are kept for the backward pass.
        plain = keras.Model(model.input, model.output)
        assert _residual_bytes(model, images) < 0.4 * _residual_bytes(plain, images)


def test_each_node_is_recomputed_in_the_backward_pass(images, monkeypatch):
    model = with_recompute(_tiny(dropout=0.2))
    plan = recompute_graph._plan(model)
    segments = [step for step in plan if isinstance(step, recompute_graph._Segment)]
    assert sorted(s.key for s in segments) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    # a node keeps only its own output; the up-sampling and the convolution over its parts run inside it
    assert [len(s.outputs) for s in segments] == [1] * len(segments)
    x_0_2 = next(s for s in segments if s.key == (0, 2))
    assert {t.name for t in x_0_2.inputs} == {
        model.get_layer(name).output.name for name in ("x_0_0_drop2", "x_0_1_drop2", "x_1_1_drop2")
    }
    # a skip that a later node reads again comes back out of the segment, so its gradient is
    # summed along the row: X(0, 1) relays X(0, 0) on to X(0, 2)
    relays = recompute_graph._relays(plan)
    x_0_1 = next(s for s in segments if s.key == (0, 1))
    assert model.get_layer("x_0_0_drop2").output.name in {x_0_1.inputs[k].name for k in relays[id(x_0_1)]}
    calls, replaying = {"forward": 0, "replay": 0}, []
    run_nodes, replay_scope = recompute_graph._run_nodes, recompute_graph._replay_scope

    @contextlib.contextmanager
    def marked_replay_scope():
        with replay_scope():
            replaying.append(True)
            try:
                yield
            finally:
                replaying.pop()

    def counting(nodes, tensors, seeds):
        calls["replay" if replaying else "forward"] += 1
        return run_nodes(nodes, tensors, seeds)

    monkeypatch.setattr(recompute_graph, "_replay_scope", marked_replay_scope)
    monkeypatch.setattr(recompute_graph, "_run_nodes", counting)
    with tf.GradientTape() as tape:
        loss = sum(tf.reduce_sum(out) for out in model(images, training=True))
    assert calls == {"forward": len(segments) + 4, "replay": 0}  # 4 = two heads, two layers each
    tape.gradient(loss, model.trainable_variables)
    assert calls["replay"] == len(segments)


@pytest.mark.backend_independent
def test_inference_is_the_plain_graph(images):
    plain = _tiny(dropout=0.5)
    recomputed = with_recompute(plain)
    for a, b in zip(plain(images, training=False), recomputed(images, training=False)):
        np.testing.assert_array_equal(a, b)
    back = with_recompute(recomputed, enabled=False)
    assert not isinstance(back, RecomputedModel) and back.layers == recomputed.layers
    assert with_recompute(recomputed) is recomputed and with_recompute(plain, enabled=False) is plain


def test_short_fit_reaches_the_same_loss_and_dice():
    results = []
    for flag in (False, True):
        keras.utils.set_random_seed(1)  # the global seed also orders the shuffled batches
        data = unetpp_tf.data.synthetic(64, image_size=(32, 32), batch_size=8, seed=3)
        model = _tiny(batch_norm=True, dropout=0.2, recompute=flag)
        model = model if flag else _functional(model)  # recomputed against the plain graph
        final = model.output_names[-1]
        model.compile(keras.optimizers.Adam(1e-2), loss=unetpp_tf.losses.BCEDiceLoss(),
                      metrics={final: [unetpp_tf.metrics.Dice()]})
        history = model.fit(unetpp_tf.data.targets_per_head(data.train, model), epochs=6, verbose=0, shuffle=False)
        results.append((history.history["loss"], history.history[f"{final}_dice"]))
    (loss, dice), (loss_r, dice_r) = results
    assert dice[-1] > 0.4  # it learned something
    np.testing.assert_allclose(loss_r, loss, atol=0.01)
    np.testing.assert_allclose(dice_r, dice, atol=0.01)


@pytest.mark.backend_independent
def test_save_load_train_on_and_export(images, tmp_path):
    model = _tiny(recompute=True)
    model.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
    masks = [(images > 0.5).astype("int32")] * 2
    model.train_on_batch(images, masks)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, RecomputedModel)
    for a, b in zip(model.predict(images, verbose=0), loaded.predict(images, verbose=0)):
        np.testing.assert_allclose(b, a, atol=1e-6)
    before = [v.numpy() for v in loaded.trainable_variables]
    losses = [loaded.train_on_batch(images, masks)[0] for _ in range(3)]  # trains on after loading
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(before, loaded.trainable_variables))
    if keras.backend.backend() == "tensorflow":  # SavedModel export is TensorFlow's
        from unetpp_tf.export import export_model

        report = export_model(loaded, tmp_path / "export", formats=("saved_model",), samples=images)
        assert [a["name"] for a in report["artifacts"]] == ["saved_model"]


def test_options_reach_the_model():
    assert isinstance(model_from_config(TrainConfig(depth=2, filters=4, recompute=True), 1, 1), RecomputedModel)
    assert isinstance(model_from_config(TrainConfig(preset="paper", recompute=True), 1, 1), RecomputedModel)
    assert not isinstance(model_from_config(TrainConfig(depth=2, filters=4), 1, 1), RecomputedModel)
    assert isinstance(unetpp_tf.build_unet((32, 32, 1), depth=2, filters=4, recompute=True), RecomputedModel)
    from unetpp_tf.cli import build_parser

    args = build_parser().parse_args(["train", "--recompute"])
    assert args.recompute is True


@pytest.mark.backend_independent
def test_installed_versions_are_in_the_tested_range():
    assert recompute_unavailable() is None  # CI runs the recomputed path above, not the fallback


@pytest.mark.parametrize(
    "module, version, reason",
    [(keras, "3.16.0", "Keras 3.16.0 is outside the tested range >=3.14,<3.16"),
     (keras, "3.13.2", "Keras 3.13.2 is outside the tested range >=3.14,<3.16"),
     (tf, "2.22.0", "TensorFlow 2.22.0 is outside the tested range >=2.20,<2.22")],
    ids=["keras-3.16", "keras-3.13", "tensorflow-2.22"],
)
def test_untested_versions_fall_back_to_the_plain_model_with_one_warning(module, version, reason, images, monkeypatch):
    if module is keras:
        monkeypatch.setattr(keras, "version", lambda: version)
    else:
        monkeypatch.setattr(tf, "__version__", version)

    def internals_must_not_run(*args, **kwargs):
        raise AssertionError("the recomputed training call ran outside the tested versions")

    monkeypatch.setattr(recompute_graph, "recomputed_call", internals_must_not_run)
    assert recompute_unavailable() == reason
    with pytest.warns(UserWarning) as caught:
        model = _tiny(recompute=True)
    assert len(caught) == 1 and reason in str(caught[0].message) and "without recomputation" in str(caught[0].message)
    assert not isinstance(model, RecomputedModel)
    # A RecomputedModel (e.g. loaded from a file) trains as the plain graph, warning once per model.
    loaded = RecomputedModel(model.input, model.output, name="loaded")
    loaded.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
    masks = [(images > 0.5).astype("int32")] * 2
    with pytest.warns(UserWarning) as caught:
        first = loaded.train_on_batch(images, masks)
        loaded.train_on_batch(images, masks)
        loaded(images, training=True)
    assert [reason in str(w.message) for w in caught] == [True]
    assert np.all(np.isfinite(first))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inference never warns
        loaded(images, training=False)
