"""Export of encoder models: TFLite with builtin operators only and parity, int8 phone models, SavedModel."""

from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf.export import SavedModelRunner, TFLiteModel, export_model, format_report, operator_summary
from unetpp_tf.export.operators import tflite_operators
from unetpp_tf.export.rewrites import as_pointwise_convolution, tflite_friendly
from unetpp_tf.models.encoders import EncoderPreprocessing

# encoder, input channels, depth (deep enough to reach the blocks that bring the ops), ops the file
# must hold, ops it must not hold
FAMILIES = {
    "mobilenetv3large": ("mobilenetv3large", 3, 2, {"HARD_SWISH", "MEAN", "DEPTHWISE_CONV_2D"}, set()),
    "efficientnetb0-gray": ("efficientnetb0", 1, 2, {"LOGISTIC", "MUL", "MEAN", "DEPTHWISE_CONV_2D"}, set()),
    "efficientnetv2b0": ("efficientnetv2b0", 3, 3, {"LOGISTIC", "MUL", "MEAN"}, set()),
    "convnexttiny": ("convnexttiny", 3, 2, {"GELU", "MEAN", "SQUARED_DIFFERENCE", "RSQRT", "SUB"}, {"NEG"}),
    # caffe mode (RGB -> BGR, x 255, - mean) is converted as one 1x1 convolution: no REVERSE_V2
    "resnet50": ("resnet50", 3, 2, {"MAX_POOL_2D", "PAD"}, {"REVERSE_V2"}),
    "resnet50-gray": ("resnet50", 1, 2, {"MAX_POOL_2D", "PAD"}, {"REVERSE_V2"}),
}
SWISH_FAMILIES = ("efficientnetb0-gray", "efficientnetv2b0")  # swish = x * sigmoid(x): LOGISTIC beside the head's


def _images(channels):
    """Six synthetic 32 x 32 test images (with masks) of `channels` channels."""
    return unetpp_tf.data.synthetic(40, image_size=(32, 32), channels=channels, batch_size=8).test


def _array(dataset):
    return np.concatenate([x for x, _ in dataset.as_numpy_iterator()])


def _dice(reference, outputs):
    """Mean per-image Dice between the label maps (probability >= 0.5) of two outputs."""
    scores = []
    for ref, out in zip(reference >= 0.5, outputs >= 0.5):
        total = ref.sum() + out.sum()
        scores.append(1.0 if total == 0 else 2.0 * (ref & out).sum() / total)
    return float(np.mean(scores))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_tflite_has_builtin_ops_and_parity(family, tmp_path):
    encoder, channels, depth, needed, absent = FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp((32, 32, channels), depth=depth, filters=4, encoder=encoder)
    samples = _images(channels)
    report = export_model(model, tmp_path, formats="tflite", samples=samples)  # raises below the 0.99 bar
    (entry,) = report["artifacts"]
    assert entry["dice_agreement"] >= 0.99 and entry["max_abs_diff"] < 1e-4
    content = (tmp_path / "model_float32.tflite").read_bytes()
    assert entry["ops"] == operator_summary(content)["ops"]
    assert entry["custom_ops"] == [] and entry["float_ops"] is None  # float_ops is for int8 files
    assert needed <= set(entry["ops"]) and not absent & set(entry["ops"]), entry["ops"]
    logistic = Counter(o["op"] for o in tflite_operators(content))["LOGISTIC"]
    assert logistic > 1 if family in SWISH_FAMILIES else logistic == 1  # the head's sigmoid alone
    images = _array(samples)
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(TFLiteModel(tmp_path / "model_float32.tflite").predict(images), expected, atol=1e-4)


def test_deeplabv3plus_exports_with_builtin_ops(tmp_path):
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_deeplabv3plus((32, 32, 3), encoder="mobilenetv3small", aspp_filters=8,
                                          low_level_filters=4, decoder_filters=8)
    samples = _images(3)
    report = export_model(model, tmp_path, formats="tflite", samples=samples)
    (entry,) = report["artifacts"]
    assert entry["custom_ops"] == [] and {"RESIZE_BILINEAR", "HARD_SWISH", "MEAN"} <= set(entry["ops"])
    images = _array(samples)
    np.testing.assert_allclose(TFLiteModel(tmp_path / "model_float32.tflite").predict(images),
                               model.predict(images, verbose=0), atol=1e-4)


def _trained_model(encoder, channels, data):
    """An encoder UNet++ trained briefly, so its label maps mean something (parity on them is strict)."""
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp((64, 64, channels), depth=2, filters=4, encoder=encoder)
    model.compile(keras.optimizers.Adam(3e-3), unetpp_tf.losses.BCEDiceLoss(), jit_compile=False)
    model.fit(data.train, epochs=6, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("encoder,channels,quantize,ops", [
    ("mobilenetv3large", 3, ("none", "float16", "dynamic", "int8"), {"HARD_SWISH", "MEAN", "DEPTHWISE_CONV_2D"}),
    ("mobilenetv3small", 1, ("int8",), {"HARD_SWISH", "MEAN", "DEPTHWISE_CONV_2D"}),
    ("resnet50", 3, ("int8",), {"PAD", "MAX_POOL_2D"}),  # without the 1x1 rewrite: Dice agreement 0.60
])
def test_int8_is_integer_only_and_agrees(encoder, channels, quantize, ops, tmp_path):
    data = unetpp_tf.data.synthetic(96, image_size=(64, 64), channels=channels, batch_size=8)
    model = _trained_model(encoder, channels, data)
    images = _array(data.test)
    expected = model.predict(images, verbose=0)
    assert 0.05 < (expected >= 0.5).mean() < 0.6  # both classes: agreement on label maps is a real test
    report = export_model(model, tmp_path, formats="tflite", quantize=quantize, calibration=data.val,
                          samples=data.test)  # default bars: 0.99 float, 0.97 dynamic / int8
    by_name = {a["name"]: a for a in report["artifacts"]}
    assert all(a["dice_agreement"] >= a["threshold"] for a in report["artifacts"]), format_report(report)
    int8 = by_name["model_int8"]
    assert int8["custom_ops"] == [] and int8["float_ops"] == []  # builtins only, every op in int8
    assert ops | {"CONV_2D"} <= set(int8["ops"]) and "REVERSE_V2" not in int8["ops"]
    assert "float between int8 ops" not in format_report(report)
    operators = tflite_operators((tmp_path / "model_int8.tflite").read_bytes())
    assert operators[0] == {"op": "QUANTIZE", "custom": False, "inputs": ["UINT8"], "outputs": ["INT8"]}
    assert operators[-1] == {"op": "QUANTIZE", "custom": False, "inputs": ["INT8"], "outputs": ["UINT8"]}
    assert {t for o in operators[1:-1] for t in o["inputs"] + o["outputs"]} == {"INT8"}
    lite = TFLiteModel(tmp_path / "model_int8.tflite")
    assert tuple(lite.input_shape) == (None, 64, 64, channels)
    outputs = lite.predict(images)
    assert _dice(expected, outputs) >= 0.97
    assert _dice(expected, outputs) == pytest.approx(int8["dice_agreement"], abs=1e-6)  # what the report says
    if "none" in quantize:
        sizes = {name: a["size_bytes"] for name, a in by_name.items()}
        assert sizes["model_int8"] < sizes["model_float16"] < sizes["model_float32"]
        assert by_name["model_float32"]["float_ops"] is None and by_name["model_dynamic"]["custom_ops"] == []


def test_report_names_ops_left_in_float_and_non_builtin_ops(tmp_path, rng):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: -t)(keras.layers.Conv2D(4, 3, padding="same")(inputs))  # no int8 NEG
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))
    images = [rng.random((4, 8, 8, 1), dtype=np.float32)]
    report = export_model(model, tmp_path / "neg", formats="tflite", quantize="int8", calibration=images,
                          thresholds={"int8": 0.0})
    assert report["artifacts"][0]["float_ops"] == ["NEG"] and report["artifacts"][0]["custom_ops"] == []
    assert "model_int8: NEG run(s) in float between int8 ops" in format_report(report)

    flex = keras.Model(inputs, keras.layers.Lambda(lambda t: tf.math.cumprod(t, axis=1))(inputs))
    with pytest.warns(UserWarning, match="parity was not checked"):
        report = export_model(flex, tmp_path / "flex", formats="tflite", samples=images, allow_flex=True)
    assert report["artifacts"][0]["custom_ops"] == ["FlexCumprod"]
    assert "model_float32: needs non-builtin op(s) FlexCumprod" in format_report(report)


def test_layer_normalization_is_rewritten_so_int8_stays_integer(tmp_path, rng):
    inputs = keras.Input((8, 8, 1))
    block = keras.Sequential([keras.layers.LayerNormalization(), keras.layers.Conv2D(4, 1)], name="block")
    x = keras.layers.LayerNormalization(epsilon=1e-6)(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(block(x)))
    for layer in (model.layers[2], block.layers[0]):  # non-trivial gamma and beta
        layer.set_weights([rng.uniform(0.5, 2.0, 4).astype("float32"), rng.normal(size=4).astype("float32")])
    assert tflite_friendly(unetpp_tf.build_unetpp((8, 8, 1), depth=1, filters=2)).name == "unetpp"  # unchanged
    friendly = tflite_friendly(model)
    names = [type(layer).__name__ for layer in friendly.layers + friendly.get_layer("block").layers]
    assert names.count("SubtractMeanLayerNormalization") == 2 and "LayerNormalization" not in names
    images = [rng.random((8, 8, 8, 1), dtype=np.float32)]
    report = export_model(model, tmp_path, formats="tflite", quantize=("none", "int8"), calibration=images,
                          thresholds={"int8": 0.0})
    float32, int8 = report["artifacts"]
    assert float32["max_abs_diff"] < 1e-5 and "NEG" not in float32["ops"] and "SUB" in float32["ops"]
    assert int8["float_ops"] == [] and "NEG" not in int8["ops"]
    np.testing.assert_allclose(TFLiteModel(tmp_path / "model_float32.tflite").predict(images[0]),
                               model.predict(images[0], verbose=0), atol=1e-5)


def test_encoder_preprocessing_becomes_one_pointwise_convolution(rng):
    conv = as_pointwise_convolution(EncoderPreprocessing("caffe"), 3)  # BGR order, x 255, minus the mean
    kernel, bias = conv.get_weights()
    np.testing.assert_allclose(kernel[0, 0], 255.0 * np.eye(3)[::-1], atol=1e-3)  # R -> channel 2, B -> 0
    np.testing.assert_allclose(bias, [-103.939, -116.779, -123.68], atol=1e-3)
    gray = as_pointwise_convolution(EncoderPreprocessing("torch"), 1)
    np.testing.assert_allclose(gray.get_weights()[0].ravel(), [1 / np.mean([0.229, 0.224, 0.225])], rtol=1e-5)
    assert as_pointwise_convolution(keras.layers.Activation("relu"), 3) is None  # not affine

    model = unetpp_tf.build_unetpp((32, 32, 3), depth=1, filters=2, encoder="vgg16")
    friendly = tflite_friendly(model)
    assert "encoder_preprocessing_pointwise" in [layer.name for layer in friendly.layers]
    assert not any(isinstance(layer, EncoderPreprocessing) for layer in friendly.layers)
    images = rng.random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(friendly(images), model(images), rtol=1e-4, atol=1e-5)


def test_saved_model_round_trip_of_an_encoder_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp((None, None, 3), depth=2, filters=4, encoder="efficientnetb0")
    samples = _images(3)
    report = export_model(model, tmp_path, formats=("saved_model", "keras"), samples=samples)
    assert [a["name"] for a in report["artifacts"]] == ["model_inference", "saved_model"]
    images = _array(samples)[:2]
    odd = np.concatenate([images, images[:, ::-1]], axis=1)[:, 5:41, 3:31]  # 36 x 28: padded to 40 x 32
    dh, dw = 40 - 36, 32 - 28
    padded = np.pad(odd, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)), mode="reflect")
    expected = model.predict(padded, verbose=0)[:, dh // 2: dh // 2 + 36, dw // 2: dw // 2 + 28]

    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serve_float"]
    np.testing.assert_allclose(serve(images=tf.constant(odd))["probabilities"].numpy(), expected, atol=1e-5)
    runner = SavedModelRunner(tmp_path / "saved_model")
    assert runner.metadata["size_divisor"] == 8  # depth 2 over an encoder: decoder from stride 8
    reloaded = unetpp_tf.load_model(tmp_path / "model_inference.keras")
    assert [type(layer).__name__ for layer in reloaded.layers] == [type(layer).__name__ for layer in model.layers]
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
