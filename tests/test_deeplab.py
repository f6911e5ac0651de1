"""DeepLabV3+: the Keras example's parameter count, shapes, None x None inputs, saving, export, errors, training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from unetpp_tf.models import build_deeplabv3plus, build_model, encoder_layers
from unetpp_tf.models.deeplab import KERAS_EXAMPLE_LAYERS, BroadcastToMap
from unetpp_tf.models.layers import BilinearUpsampling
from test_encoders import shapes_only

independent = pytest.mark.backend_independent

# keras.io/examples/vision/deeplabv3_plus: DeeplabV3Plus(image_size=512, num_classes=20).summary()
KERAS_EXAMPLE_PARAMS = 11_857_236


def tiny_encoder(channels: int = 3) -> keras.Model:
    """A four-conv multi-scale model (maps at strides 4, 8, 16): a user's encoder that builds in no time."""
    x = inputs = keras.Input((None, None, channels))
    maps = []
    for k in range(4):
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name=f"tiny_conv{k}")(x)
        maps.append(x)
    return keras.Model(inputs, maps[1:], name="tiny")


TINY_HEAD = dict(aspp_filters=16, low_level_filters=8, decoder_filters=16)


@pytest.fixture(scope="module")
def dynamic_model():
    keras.utils.set_random_seed(0)
    return build_deeplabv3plus((None, None, 3), 2, encoder="mobilenetv2", **TINY_HEAD)


@independent
def test_reproduces_the_keras_example_parameter_count():
    with shapes_only():
        model = build_deeplabv3plus((64, 64, 3), 20, encoder="resnet50", dropout=0.0, **KERAS_EXAMPLE_LAYERS)
    ours = model.count_params()
    assert ours == 11_856_980  # the example's pooling conv also has a bias before its BatchNorm: 256 more
    assert abs(ours - KERAS_EXAMPLE_PARAMS) / KERAS_EXAMPLE_PARAMS < 0.02
    assert KERAS_EXAMPLE_PARAMS - ours == 256
    # the example's layers: plain 3x3 atrous convs on the 256-channel map, 48-channel low-level projection
    for rate in (6, 12, 18):
        conv = model.get_layer(f"aspp_rate{rate}_conv")
        assert tuple(conv.kernel.shape) == (3, 3, 256, 256) and conv.dilation_rate == (rate, rate)
    assert tuple(model.get_layer("low_level_conv").kernel.shape) == (1, 1, 64, 48)
    assert tuple(model.get_layer("aspp_project_conv").kernel.shape) == (1, 1, 5 * 256, 256)
    assert tuple(model.get_layer("decoder_conv1").kernel.shape) == (3, 3, 256 + 48, 256)
    assert tuple(model.get_layer("output_logits").kernel.shape) == (1, 1, 256, 20)
    # the encoder stops inside conv4's last block, and `encoder_layers` still finds all of it
    names = {layer.name for layer in encoder_layers(model)}
    assert {"conv1_conv", "conv4_block6_2_conv", "conv2_block3_2_conv"} <= names
    assert not any(n.startswith(("aspp", "decoder", "low_level", "conv4_block6_3", "conv5")) for n in names)


@independent
def test_stage_taps_parameter_counts():
    with shapes_only():
        default = build_deeplabv3plus((64, 64, 3), 20, encoder="resnet50")
    assert default.count_params() == 17_835_092
    # against the example's taps: conv4_block6's last 1x1 conv + BatchNorm, a 256- instead of 64-channel
    # low-level map, and ASPP's 1x1, pooling and three 3x3 convs over 1024 instead of 256 channels
    extra = (256 * 1024 + 1024) + 4 * 1024 + (256 - 64) * 48 + (1024 - 256) * 256 * (1 + 1 + 3 * 9)
    assert default.count_params() - 11_856_980 == extra
    assert tuple(default.get_layer("aspp_rate6_conv").kernel.shape) == (3, 3, 1024, 256)


@independent
@pytest.mark.parametrize(
    "encoder, params", [("resnet50", 17_830_209), ("mobilenetv2", 6_525_953), ("efficientnetb0", 7_568_328)]
)
def test_parameter_counts_per_encoder(encoder, params):
    with shapes_only():
        model = build_deeplabv3plus((32, 32, 3), encoder=encoder)
    assert model.count_params() == params


def test_output_shape_and_activation():
    model = build_deeplabv3plus((32, 32, 1), 3, encoder="mobilenetv2", **TINY_HEAD)  # RGB encoder, 1 channel
    assert model.output_names == ["output"] and model.output.dtype == "float32"
    assert model.get_layer("output").activation.__name__ == "softmax"
    y = np.asarray(model(np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)))
    assert y.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    binary = build_deeplabv3plus((32, 32, 3), encoder=tiny_encoder(), **TINY_HEAD)
    assert binary.get_layer("output").activation.__name__ == "sigmoid" and binary.output.shape[-1] == 1
    logits = build_deeplabv3plus((32, 32, 3), encoder=tiny_encoder(), output_activation=None, **TINY_HEAD)
    assert logits.get_layer("output").activation.__name__ == "linear"
    built = build_model("deeplabv3plus", input_shape=(32, 32, 3), encoder=tiny_encoder(), **TINY_HEAD)
    assert built.name == "deeplabv3plus"


@independent
def test_image_pooling_broadcast_is_bilinear_upsampling_of_the_pooled_map():
    pooled = np.random.default_rng(1).random((2, 1, 1, 5), dtype=np.float32)
    reference = np.zeros((2, 6, 4, 3), np.float32)
    expected = keras.layers.UpSampling2D((6, 4), interpolation="bilinear")(pooled)
    np.testing.assert_allclose(BroadcastToMap()([pooled, reference]), expected, atol=1e-6)


def test_bilinear_upsampling_at_a_size_only_known_at_run_time():
    x = np.random.default_rng(2).random((2, 3, 5, 4), dtype=np.float32)
    expected = keras.layers.UpSampling2D(4, interpolation="bilinear")(x)
    layer = BilinearUpsampling(4)
    run = tf.function(layer, input_signature=[tf.TensorSpec((None, None, None, 4), tf.float32)])
    np.testing.assert_allclose(run(x), expected, atol=1e-6)
    assert layer.get_config()["interpolation"] == "bilinear"


def test_none_by_none_model_predicts_at_two_sizes_like_fixed_size_twins(dynamic_model):
    rng = np.random.default_rng(3)
    for height, width in ((32, 32), (48, 64)):
        images = rng.random((2, height, width, 3), dtype=np.float32)
        twin = build_deeplabv3plus((height, width, 3), 2, encoder="mobilenetv2", **TINY_HEAD)
        twin.set_weights(dynamic_model.get_weights())
        got = dynamic_model.predict(images, verbose=0)  # one traced graph, retraced for the second size
        assert got.shape == (2, height, width, 2)
        np.testing.assert_allclose(got, twin(images), atol=1e-5)


def test_keras_file_round_trip(dynamic_model, tmp_path):
    path = tmp_path / "deeplab.keras"
    dynamic_model.save(path)
    loaded = keras.models.load_model(path)
    images = np.random.default_rng(4).random((1, 32, 48, 3), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), dynamic_model.predict(images, verbose=0), atol=1e-6)
    assert isinstance(loaded.get_layer("aspp_pool_broadcast"), BroadcastToMap)
    assert isinstance(loaded.get_layer("decoder_up"), BilinearUpsampling)


def test_tflite_export_with_builtin_ops(dynamic_model, tmp_path):
    from unetpp_tf.export import export_model

    samples = [np.random.default_rng(5).random((2, 32, 32, 3), dtype=np.float32)]
    report = export_model(dynamic_model, tmp_path / "out", formats="tflite", image_size=(32, 32), samples=samples)
    (artifact,) = report["artifacts"]
    assert artifact["name"] == "model_float32" and artifact["max_abs_diff"] < 1e-4


def test_frozen_encoder_trains_only_the_head():
    model = build_deeplabv3plus((32, 32, 3), encoder="mobilenetv2", encoder_trainable=False, **TINY_HEAD)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable and all(n.startswith(("aspp", "low_level", "decoder", "output")) for n in trainable)
    assert all(not layer.trainable for layer in encoder_layers(model) if layer.weights)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(100, 96, 3)), r"input height 100 is not divisible by 16 .*resize or pad to 96 or 112"),
        (dict(input_shape=(64, 40, 3)), r"input width 40 is not divisible by 16 .*32 or 48"),
        (dict(encoder="resnet51"), r"unknown encoder 'resnet51'; choose one of: resnet50, .*mobilenetv2"),
        (dict(encoder=None), r"DeepLabV3\+ needs an encoder"),
        (dict(num_classes=0), r"num_classes must be an integer >= 1"),
        (dict(num_classes=2.0), r"num_classes must be an integer >= 1"),
        (dict(num_classes=True), r"num_classes must be an integer >= 1"),
        (dict(output_stride=8), r"output_stride must be 16, got 8: keras.applications encoders cannot dilate"),
        (dict(atrous_rates=(6, 0)), r"atrous_rates must be positive integers"),
        (dict(aspp_filters=0), r"aspp_filters must be a positive integer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(encoder_weights=3), r"encoder_weights must be 'imagenet', None or a file path"),
        (dict(aspp_layer="conv9_relu"), r"aspp_layer='conv9_relu' is not a layer of encoder 'resnet50'.*ResNet50"),
        (dict(aspp_layer="conv3_block4_out"), r"aspp_layer='conv3_block4_out' gives a map at stride 8; .*stride 16"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    options = {"input_shape": (32, 32, 3), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_deeplabv3plus(**options)


def test_layer_taps_need_a_named_encoder():
    with pytest.raises(ValueError, match=r"low_level_layer names a layer of a keras.applications encoder"):
        build_deeplabv3plus((32, 32, 3), encoder=tiny_encoder(), low_level_layer="tiny_conv1")


@independent
def test_build_model_names_unknown_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for arch 'deeplabv3plus'.*aspp_filters"):
        build_model("deeplabv3plus", depth=4)


@independent
def test_a_few_steps_reduce_the_loss_on_a_trivial_mask():
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    images = rng.random((8, 32, 32, 3), dtype=np.float32)
    masks = np.zeros((8, 32, 32, 1), np.float32)
    masks[:, :, :16] = 1.0  # left half
    images[..., :1] += masks  # and visible in the image
    # a small user encoder keeps tracing the training step short; dropout 0 skips compiling its XLA kernel
    model = build_deeplabv3plus((32, 32, 3), encoder=tiny_encoder(), dropout=0.0, **TINY_HEAD)
    # (on JAX a compiled step: its op-by-op mode compiles every operation on its own)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", jit_compile=keras.backend.backend() == "jax")
    history = model.fit(images, masks, batch_size=4, epochs=6, verbose=0).history["loss"]
    assert history[-1] < 0.7 * history[0], history
