"""Recomputed training (opt-in, version-guarded) trains the same model as the plain functional
graph: equal gradients, one BatchNorm update, same fit, same files; outside the tested versions
it falls back to the plain model with one warning."""

import contextlib
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


def _gradients(model, images):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(tf.square(out - 0.3)) for out in model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = step(images)
    moving = [v.numpy() for v in model.non_trainable_variables]
    return float(loss), [g.numpy() for g in grads], moving


@pytest.mark.parametrize("variant", VARIANTS)
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


def test_save_load_and_export(images, tmp_path):
    model = _tiny(recompute=True)
    model.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
    model.train_on_batch(images, [(images > 0.5).astype("int32")] * 2)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, RecomputedModel)
    for a, b in zip(model.predict(images, verbose=0), loaded.predict(images, verbose=0)):
        np.testing.assert_allclose(b, a, atol=1e-6)
    loaded.train_on_batch(images, [(images > 0.5).astype("int32")] * 2)  # trains on after loading
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
        with tf.GradientTape():
            loaded(images, training=True)
    assert [reason in str(w.message) for w in caught] == [True]
    assert np.all(np.isfinite(first))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inference never warns
        loaded(images, training=False)
