"""The UNet++ / U-Net graph: exact parameter counts, shapes, heads, pruning, errors."""

import keras
import numpy as np
import pytest

import unetpp_tf
from unetpp_tf.models import ConcatConv2D, supervision_heads
from test_encoders import shapes_only

independent = pytest.mark.backend_independent


@pytest.fixture(scope="module")
def paper_ds():
    with shapes_only():  # counts and configuration only: no random values for 9M weights
        return unetpp_tf.from_preset("paper", input_shape=(None, None, 1), deep_supervision=True)


@independent
def test_paper_parameter_counts(paper_ds):
    with shapes_only():
        assert unetpp_tf.from_preset("paper").count_params() == 9_041_601
        assert unetpp_tf.from_preset("paper", arch="unet").count_params() == 7_759_521
    assert paper_ds.count_params() == 9_041_700


@independent
@pytest.mark.parametrize("level, params", [(1, 100_961), (2, 511_105), (3, 2_204_961), (4, 9_041_601)])
def test_paper_pruned_parameter_counts(paper_ds, level, params):
    assert unetpp_tf.prune(paper_ds, level).count_params() == params


@independent
def test_paper_layers_match_official_configuration(paper_ds):
    conv = paper_ds.get_layer("x_2_1_conv1")
    assert conv.kernel_size == (3, 3) and conv.use_bias
    assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
    assert float(conv.kernel_regularizer.l2) == pytest.approx(1e-4)
    assert paper_ds.get_layer("x_2_1_drop1").rate == 0.5
    assert paper_ds.get_layer("x_2_1_act1").activation.__name__ == "relu"
    up = paper_ds.get_layer("x_0_4_up")
    assert isinstance(up, keras.layers.Conv2DTranspose) and up.strides == (2, 2) and up.filters == 32
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in paper_ds.layers)
    assert paper_ds.get_layer("output_4").activation.__name__ == "sigmoid"


def _merging_convs(model) -> dict:
    """{name: layer} of the convolutions over a concatenation (a node's first conv, given its parts)."""
    return {layer.name: layer for layer in model.layers if isinstance(layer, ConcatConv2D)}


@independent
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_unetpp_nested_skips(depth):
    with shapes_only():
        model = unetpp_tf.build_unetpp((None, None, 1), depth=depth, filters=2)
    merges = _merging_convs(model)
    assert len(merges) == depth * (depth + 1) // 2
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in model.layers)  # never materialised
    for i in range(depth):
        for j in range(1, depth - i + 1):
            parts = merges[f"x_{i}_{j}_conv1"].input  # X(i,0..j-1) and up(X(i+1,j-1)), in that order
            expected = [model.get_layer(f"x_{i}_{k}_act2").output for k in range(j)]
            expected.append(model.get_layer(f"x_{i}_{j}_up").output)
            assert len(parts) == j + 1 and all(a is b for a, b in zip(parts, expected))
            assert merges[f"x_{i}_{j}_conv1"].kernel.shape[2] == 2 * 2**i * (j + 1)  # one kernel over all parts


@independent
def test_unet_has_only_plain_skips():
    with shapes_only():
        model = unetpp_tf.build_unet((None, None, 1), depth=3, filters=2)
    merges = _merging_convs(model)
    assert sorted(merges) == ["x_0_3_conv1", "x_1_2_conv1", "x_2_1_conv1"]
    for name, layer in merges.items():
        i = int(name[2])
        assert layer.input[0] is model.get_layer(f"x_{i}_0_act2").output and len(layer.input) == 2


@pytest.mark.parametrize(
    "depth, size, channels, classes",
    [(1, (8, 8), 1, 1), (2, (32, 48), 3, 1), (3, (16, 40), 1, 4), (4, (32, 32), 2, 3), (5, (64, 32), 1, 2)],
)
@pytest.mark.parametrize("arch", ["unetpp", "unet"])
def test_output_shapes(arch, depth, size, channels, classes):
    model = unetpp_tf.build_model(arch, input_shape=(None, None, channels), num_classes=classes, depth=depth, filters=2)
    out = keras.ops.convert_to_numpy(model(np.zeros((2, *size, channels), np.float32)))
    assert out.shape == (2, *size, classes)
    if classes > 1:
        np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
    else:
        assert np.all((out > 0) & (out < 1))


@independent
def test_fixed_input_shape_is_static():
    with shapes_only():
        model = unetpp_tf.build_unetpp((32, 64, 3), num_classes=2, depth=2, filters=4)
    assert tuple(model.output.shape) == (None, 32, 64, 2)


@independent
def test_deep_supervision_heads(tiny_ds_model, images):
    assert tiny_ds_model.output_names == ["output_1", "output_2"]
    assert all(supervision_heads(tiny_ds_model)[j].output is tiny_ds_model.outputs[j - 1] for j in (1, 2))
    assert sorted(supervision_heads(tiny_ds_model)) == [1, 2]
    outs = tiny_ds_model.predict(images, verbose=0)
    assert len(outs) == 2 and all(o.shape == (4, 32, 32, 1) for o in outs)
    assert not np.allclose(outs[0], outs[1])  # different heads, different maps


@independent
def test_pruned_output_equals_full_head_and_shares_weights(tiny_ds_model, images):
    full = tiny_ds_model.predict(images, verbose=0)
    for level in (1, 2):
        pruned = unetpp_tf.prune(tiny_ds_model, level)
        np.testing.assert_allclose(pruned.predict(images, verbose=0), full[level - 1], atol=1e-6)
    pruned = unetpp_tf.prune(tiny_ds_model, 1)
    assert pruned.get_layer("x_0_1_conv1") is tiny_ds_model.get_layer("x_0_1_conv1")
    assert "x_0_2_conv1" not in [layer.name for layer in pruned.layers]
    # New weights in the full model are seen by the pruned one: nothing was copied.
    conv = tiny_ds_model.get_layer("x_0_1_conv1")
    conv.kernel.assign(conv.kernel * 2.0)
    np.testing.assert_allclose(
        pruned.predict(images, verbose=0), tiny_ds_model.predict(images, verbose=0)[0], atol=1e-6
    )
    assert not np.allclose(pruned.predict(images, verbose=0), full[0], atol=1e-4)


@independent
def test_inference_modes(tiny_ds_model, images):
    heads = tiny_ds_model.predict(images, verbose=0)
    accurate = unetpp_tf.inference_model(tiny_ds_model, "accurate")
    np.testing.assert_allclose(accurate.predict(images, verbose=0), np.mean(heads, axis=0), atol=1e-6)
    fast = unetpp_tf.inference_model(tiny_ds_model, "fast", level=1)
    np.testing.assert_allclose(fast.predict(images, verbose=0), heads[0], atol=1e-6)
    deepest = unetpp_tf.inference_model(tiny_ds_model, "fast")
    np.testing.assert_allclose(deepest.predict(images, verbose=0), heads[1], atol=1e-6)


@independent
def test_pruned_model_saves_and_loads(tiny_ds_model, images, tmp_path):
    pruned = unetpp_tf.prune(tiny_ds_model, 1)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.count_params() == pruned.count_params() < tiny_ds_model.count_params()
    np.testing.assert_allclose(loaded.predict(images, verbose=0), pruned.predict(images, verbose=0), atol=1e-6)


@independent
def test_config_round_trip(images):
    keras.utils.set_random_seed(3)
    model = unetpp_tf.build_unetpp((32, 32, 1), num_classes=3, depth=2, filters=4, dropout=0.1, l2=1e-3)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


@independent
def test_logits_output_matches_activation(images):
    keras.utils.set_random_seed(4)
    probs = unetpp_tf.build_unetpp((32, 32, 1), num_classes=3, depth=2, filters=4)
    logits = unetpp_tf.build_unetpp((32, 32, 1), num_classes=3, depth=2, filters=4, output_activation=None)
    logits.set_weights(probs.get_weights())
    z = logits.predict(images, verbose=0)
    softmax = keras.ops.convert_to_numpy(keras.ops.softmax(z))
    np.testing.assert_allclose(softmax, probs.predict(images, verbose=0), atol=1e-5)
    assert z.min() < 0  # raw scores, not probabilities


@independent
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resize_upsampling(mode):
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, upsampling=mode)
    assert model.get_layer("x_0_1_up").interpolation == mode
    assert not any(isinstance(layer, keras.layers.Conv2DTranspose) for layer in model.layers)
    assert model.get_layer("x_0_1_up").output.shape[-1] == 8  # resizing keeps X(1,0)'s channels
    assert model.predict(np.zeros((1, 32, 32, 1)), verbose=0).shape == (1, 32, 32, 1)


@independent
def test_widths_batch_norm_and_multiplier():
    with shapes_only():
        model = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=(3, 5, 7), width_multiplier=2.0)
    assert [model.get_layer(f"x_{i}_0_conv1").filters for i in range(3)] == [6, 10, 14]
    assert not model.get_layer("x_0_0_conv1").use_bias
    assert isinstance(model.get_layer("x_0_0_bn1"), keras.layers.BatchNormalization)


@independent
def test_mixed_precision_outputs_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4)
        assert model.get_layer("x_0_0_conv1").compute_dtype == "bfloat16"
        out = model(np.zeros((1, 32, 32, 1), np.float32))
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@independent
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=0), "depth must be an integer >= 1"),
        (dict(depth=2, filters=(4, 8)), "needs depth + 1 = 3"),
        (dict(input_shape=(100, 96, 1)),
         "input height 100 is not divisible by 16 (depth 4); resize or pad to 96 or 112"),
        (dict(input_shape=(32, 18, 1), depth=2),
         "input width 18 is not divisible by 4 (depth 2); resize or pad to 16 or 20"),
        (dict(upsampling="cubic"), "upsampling must be one of"),
        (dict(num_classes=0), "num_classes must be an integer >= 1"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(filters=-4), "filters must be positive integers"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        unetpp_tf.build_unetpp(**kwargs)
    assert message in str(info.value)


@independent
def test_bad_prune_and_mode_arguments(tiny_ds_model):
    for level in (0, 3, 1.5):
        with pytest.raises(ValueError, match=r"prune level must be an integer in 1\.\.2"):
            unetpp_tf.prune(tiny_ds_model, level)
    plain = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4)
    with pytest.raises(ValueError, match="not built with deep supervision.*output_2"):
        unetpp_tf.prune(plain, 1)
    with pytest.raises(ValueError, match="not built with deep supervision"):
        unetpp_tf.inference_model(plain, "accurate")
    with pytest.raises(ValueError, match="mode must be one of"):
        unetpp_tf.inference_model(tiny_ds_model, "exact")
    with pytest.raises(ValueError, match="no heads to add"):
        unetpp_tf.build_unet(deep_supervision=True)
    with pytest.raises(ValueError, match="unknown option"):
        unetpp_tf.build_unet(batchnorm=False)
    with pytest.raises(ValueError, match="unknown preset"):
        unetpp_tf.from_preset("official")
