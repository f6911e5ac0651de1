"""The drop-in layers: same results as Keras' layers (fused BatchNorm, ConcatConv2D against
Conv2D over the concatenation), and a sound dropout mask, the same on every backend."""

import logging

import keras
import numpy as np
import pytest

import unetpp_tf
from unetpp_tf.models.layers import (
    BilinearUpsampling,
    ConcatConv2D,
    FusedBatchNormalization,
    FusedDropout,
    hash_dropout,
)
from test_nested_model import value_and_gradients

independent = pytest.mark.backend_independent


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def _paired_batch_norms(**kwargs):
    reference, fused = keras.layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    shape = (4, 8, 8, 5) if kwargs.get("axis", -1) == -1 else (4, 5, 8, 8)
    for layer in (reference, fused):
        layer.build(shape)
    weights = [np.linspace(0.5, 2.0, w.shape[0]).astype("float32") for w in reference.get_weights()]
    reference.set_weights(weights)
    fused.set_weights(weights)
    return reference, fused, shape


@independent
@pytest.mark.parametrize("options", [{}, {"center": False, "scale": False}, {"axis": 1}])
def test_fused_batch_norm_matches_keras_in_training(rng, options):
    reference, fused, shape = _paired_batch_norms(momentum=0.8, **options)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    weight = rng.normal(size=shape).astype("float32")
    outputs, grads = [], []
    for layer in (reference, fused):
        def loss_fn(inputs, layer=layer):
            y = layer(inputs, training=True)
            return keras.ops.sum(y * weight), y

        _, input_grads, weight_grads, y = value_and_gradients(loss_fn, [x], layer, outputs=True)
        outputs.append(y)
        grads.append(input_grads + weight_grads)
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-5)
    for fused_grad, reference_grad in zip(grads[1], grads[0]):
        np.testing.assert_allclose(fused_grad, reference_grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-5)
    # The update moved the statistics towards the batch's, not left them at their start.
    assert not np.allclose(fused.moving_mean.numpy(), np.linspace(0.5, 2.0, 5)[:5])


@independent
def test_fused_batch_norm_matches_keras_in_inference(rng):
    reference, fused, shape = _paired_batch_norms()
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    np.testing.assert_allclose(fused(x, training=False), reference(x, training=False), atol=1e-5)


@independent
def test_fused_batch_norm_off_tensorflow_computes_keras_maths_and_logs_once(rng, caplog, monkeypatch):
    monkeypatch.setattr(unetpp_tf.models.layers, "_logged", set())
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    with caplog.at_level(logging.INFO, logger="unetpp_tf.models.layers"):
        for _ in range(2):
            FusedBatchNormalization()(x, training=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "unetpp_tf.models.layers"]
    if keras.backend.backend() == "tensorflow":
        assert lines == [] and FusedBatchNormalization()._fusable(x, None)
    else:
        assert len(lines) == 1 and "fused kernel is not available" in lines[0] and "same values" in lines[0]
        assert not FusedBatchNormalization()._fusable(x, None)


@independent
def test_fused_batch_norm_under_mixed_bfloat16(rng):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = FusedBatchNormalization()
        x = rng.normal(3.0, 2.0, (4, 8, 8, 3)).astype("float32")
        y = layer(x, training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16" and layer.moving_mean.dtype == "float32"
    y = _numpy(y)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=0.02)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1.0, atol=0.02)


def _mask(rate, seed, shape=(8, 64, 64, 32)):
    return _numpy(hash_dropout(np.ones(shape, "float32"), rate, np.array(seed))) != 0


def _reference_mask(rate, seed, shape):
    """The keep mask from the hash written out in numpy (uint32 arithmetic wraps as in both backends)."""
    def lowbias32(h):
        h = (h ^ (h >> np.uint32(16))) * np.uint32(0x7FEB352D)
        h = (h ^ (h >> np.uint32(15))) * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    with np.errstate(over="ignore"):
        words = np.array(seed, np.int64).astype(np.uint32)
        first = lowbias32(words[0] + np.uint32(0x9E3779B9))
        keys = lowbias32(words[1] ^ first)
        index = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
        bits = lowbias32(lowbias32(index ^ first) + keys)
    return bits >= np.uint32(round(rate * 2**32))


@independent
def test_hash_dropout_mask_is_the_same_hash_on_every_backend():
    for rate, seed in ((0.5, [1, 2]), (0.3, [7, 3]), (0.1, [-5, 2**31 - 1])):
        np.testing.assert_array_equal(_mask(rate, seed, (2, 16, 16, 3)), _reference_mask(rate, seed, (2, 16, 16, 3)))


@independent
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_hash_dropout_keeps_the_expected_fraction_and_scales(rate):
    y = _numpy(hash_dropout(np.ones((8, 64, 64, 32), "float32"), rate, np.array([7, 3])))
    kept = y != 0
    n = kept.size
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)


@independent
def test_hash_dropout_masks_are_reproducible_and_independent():
    np.testing.assert_array_equal(_mask(0.5, [1, 2]), _mask(0.5, [1, 2]))
    masks = [_mask(0.5, seed).ravel().astype("float32") for seed in ([1, 2], [1, 3], [2, 2])]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert abs(np.corrcoef(masks[a], masks[b])[0, 1]) < 0.01
    # Neighbouring elements (next channel, next pixel) are not correlated either.
    mask = _mask(0.5, [5, 9]).astype("float32")
    assert abs(np.corrcoef(mask[..., :-1].ravel(), mask[..., 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(mask[:, :, :-1].ravel(), mask[:, :, 1:].ravel())[0, 1]) < 0.01


@independent
def test_hash_dropout_gradient_is_the_same_mask(rng):
    x = rng.normal(size=(2, 16, 16, 4)).astype("float32")
    upstream = rng.normal(size=(2, 16, 16, 4)).astype("float32")

    def loss_fn(inputs):
        y = hash_dropout(inputs, 0.25, np.array([4, 4]))
        return keras.ops.sum(y * upstream), y

    _, (grad,), _, y = value_and_gradients(loss_fn, [x], outputs=True)
    kept = _mask(0.25, [4, 4], shape=x.shape)
    np.testing.assert_allclose(y, np.where(kept, x / 0.75, 0.0), rtol=1e-6)
    np.testing.assert_allclose(grad, np.where(kept, upstream / 0.75, 0.0), rtol=1e-6)


@independent
def test_hash_dropout_rejects_a_rate_of_one():
    with pytest.raises(ValueError, match="rate"):
        hash_dropout(np.ones((2, 2), "float32"), 1.0, np.array([0, 0]))


@independent
def test_fused_dropout_layer_draws_new_masks_and_is_identity_in_inference():
    layer = FusedDropout(0.5, seed=3)
    x = np.ones((2, 16, 16, 8), "float32")
    first, second = (np.asarray(layer(x, training=True)) != 0 for _ in range(2))
    assert 0.4 < first.mean() < 0.6 and (first != second).mean() > 0.3
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    replayed = _numpy(layer.apply_mask(x, np.array([3, 0])))
    np.testing.assert_array_equal(replayed != 0, _reference_mask(0.5, [3, 0], x.shape))


@independent
def test_fused_layers_survive_a_keras_save_and_load(tmp_path, rng):
    inputs = keras.Input((8, 8, 2))
    x = FusedBatchNormalization(name="bn")(inputs)
    outputs = FusedDropout(0.3, name="drop")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").moving_mean.assign([0.5, -0.5])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("bn"), FusedBatchNormalization)
    assert isinstance(loaded.get_layer("drop"), FusedDropout) and loaded.get_layer("drop").rate == 0.3
    x = rng.random((2, 8, 8, 2), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def _concat_conv_pair(rng, channels, **options):
    """A ConcatConv2D over parts of `channels` and a Conv2D over their concatenation, same weights."""
    merged, reference = ConcatConv2D(5, 3, **options), keras.layers.Conv2D(5, 3, **options)
    merged.build([(None, 12, 12, c) for c in channels])
    reference.build((None, 12, 12, sum(channels)))
    weights = [rng.normal(size=w.shape).astype("float32") for w in reference.get_weights()]
    assert [w.shape for w in merged.get_weights()] == [w.shape for w in weights]  # one kernel over all parts
    merged.set_weights(weights)
    reference.set_weights(weights)
    return merged, reference


@independent
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        dict(padding="same", use_bias=True, activation="relu"),
        dict(padding="valid", use_bias=False),
        dict(padding="same", strides=2, dilation_rate=1, use_bias=True),
        dict(padding="same", dilation_rate=2, use_bias=True, activation="tanh"),
    ],
)
def test_concat_conv_equals_conv2d_over_the_concatenation(rng, training, options):
    channels = (3, 1, 4)
    merged, reference = _concat_conv_pair(rng, channels, **options)
    parts = [rng.normal(size=(2, 12, 12, c)).astype("float32") for c in channels]
    outputs, grads = [], []
    for layer, call in ((reference, lambda *xs: reference(keras.ops.concatenate(xs, -1), training=training)),
                        (merged, lambda *xs: merged(list(xs), training=training))):
        def loss_fn(*xs, call=call):
            y = call(*xs)
            return keras.ops.sum(keras.ops.sin(y)), y  # an upstream gradient that differs per element

        _, part_grads, weight_grads, y = value_and_gradients(loss_fn, parts, layer, outputs=True)
        outputs.append(y)
        grads.append(part_grads + weight_grads)
    assert outputs[1].shape == outputs[0].shape
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert len(grads[1]) == len(grads[0]) == len(channels) + (2 if options["use_bias"] else 1)
    for merged_grad, reference_grad in zip(grads[1], grads[0]):
        np.testing.assert_allclose(merged_grad, reference_grad, rtol=1e-5, atol=1e-4)


@independent
def test_concat_conv_regularizer_and_mixed_bfloat16(rng):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        l2 = keras.regularizers.L2(0.1)
        merged, reference = _concat_conv_pair(rng, (2, 6), padding="same", kernel_regularizer=l2)
        parts = [rng.normal(size=(2, 12, 12, c)).astype("float32") for c in (2, 6)]
        y = merged(parts, training=True)
        expected = reference(np.concatenate(parts, -1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16" and merged.kernel.dtype == "float32"
    np.testing.assert_allclose(_numpy(y), _numpy(expected), rtol=0.05, atol=0.1)
    np.testing.assert_allclose(float(sum(merged.losses)), float(sum(reference.losses)), rtol=1e-6)


@independent
def test_concat_conv_rejects_a_single_tensor_and_changed_parts():
    with pytest.raises(ValueError, match="ConcatConv2D takes a list of tensors"):
        ConcatConv2D(4, 3)(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="must agree in every dimension but the channels"):
        ConcatConv2D(4, 3)([np.zeros((1, 8, 8, 3), "float32"), np.zeros((1, 8, 4, 3), "float32")])
    layer = ConcatConv2D(4, 3, name="merge")
    layer([np.zeros((1, 8, 8, 2), "float32"), np.zeros((1, 8, 8, 3), "float32")])
    with pytest.raises(ValueError, match=r"'merge' was built for parts with \[2, 3\] channels, got \[3, 2\]"):
        layer([np.zeros((1, 8, 8, 3), "float32"), np.zeros((1, 8, 8, 2), "float32")], training=True)


@independent
def test_concat_conv_survives_a_keras_save_and_load(tmp_path, rng):
    parts = [keras.Input((8, 8, 2)), keras.Input((8, 8, 3))]
    model = keras.Model(parts, ConcatConv2D(4, 3, padding="same", name="merge")(parts))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = loaded.get_layer("merge")
    assert isinstance(layer, ConcatConv2D) and layer.part_channels == [2, 3]
    assert tuple(layer.kernel.shape) == (3, 3, 5, 4)
    x = [rng.random((2, 8, 8, c), dtype=np.float32) for c in (2, 3)]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_bilinear_unetpp_predicts_at_two_sizes_when_none_by_none(rng):
    # Keras' bilinear UpSampling2D cannot be retraced at a second None x None size on TensorFlow
    model = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4, upsampling="bilinear")
    assert any(isinstance(layer, BilinearUpsampling) for layer in model.layers)
    for size in (32, 48):
        image = rng.random((1, size, size, 1), dtype=np.float32)
        fixed = unetpp_tf.build_unetpp((size, size, 1), depth=2, filters=4, upsampling="bilinear")
        fixed.set_weights(model.get_weights())
        got = model.predict(image, verbose=0)
        assert got.shape == (1, size, size, 1)
        np.testing.assert_allclose(got, fixed.predict(image, verbose=0), atol=1e-5)
