"""Preprocessing that travels with the model: each normalization against NumPy, settings in saved
files, the paper graph unchanged, 8/16/32-bit image reading, relative photometric augmentation, and
one 16-bit TIFF giving the same mask through Keras, SavedModel and TFLite."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import unetpp_tf
from unetpp_tf import inference
from unetpp_tf.data import SegmentationAugmenter
from unetpp_tf.data.readers import pil_image_array
from unetpp_tf.data.synthetic import synthetic_sample
from unetpp_tf.export import export_model
from unetpp_tf.models import InputPreprocessing, model_preprocessing, with_recompute
from unetpp_tf.models.preprocessing import _percentile
from test_encoders import shapes_only

independent = pytest.mark.backend_independent

TINY = dict(depth=2, filters=4)
DIM = 3000  # brightest 16-bit value of the "dim" images: under 5% of the range


def _images(rng):
    """Dim 16-bit-like images [4, 17, 13, 2]: random, with ties, constant, and 8-bit-range."""
    images = rng.random((4, 17, 13, 2)) * DIM / 65535
    images[1] = np.round(images[1] * 400) / 400  # a handful of levels: many ties
    images[2] = 0.02  # constant
    images[3] = rng.random((17, 13, 2))
    return images.astype(np.float32)


def _reference(image, normalize, low=None, high=None, percentiles=(1.0, 99.8), eps=1e-6):
    """NumPy float64 normalization of one image [H, W, C]."""
    x = image.astype(np.float64)
    if normalize == "fixed":
        return x
    if normalize == "dataset":
        return (x - np.asarray(low)) / (np.asarray(high) - np.asarray(low))
    if normalize == "zscore":
        return (x - x.mean()) / max(x.std(), eps)
    if normalize == "minmax":
        lo, hi = x.min(), x.max()
    else:
        lo, hi = np.percentile(x, percentiles, method="linear")
    return (x - lo) / max(hi - lo, eps)


@independent
@pytest.mark.parametrize(
    "settings",
    [
        dict(normalize="fixed"),
        dict(normalize="dataset", low=[0.01, 0.0], high=[0.04, 0.05]),
        dict(normalize="dataset", low=0.0, high=0.05),
        dict(normalize="minmax"),
        dict(normalize="percentile"),
        dict(normalize="percentile", percentiles=(0.0, 100.0)),
        dict(normalize="percentile", percentiles=(12.5, 50.0)),
        dict(normalize="zscore"),
    ],
)
def test_each_mode_matches_numpy(settings, rng):
    images = _images(rng)
    layer = InputPreprocessing(**settings)
    expected = np.stack([_reference(image, **settings) for image in images])
    got = np.asarray(layer(images))
    assert got.dtype == np.float32 and not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if settings["normalize"] in ("minmax", "percentile", "zscore"):
        assert np.all(got[2] == 0.0)  # a constant image gives zeros, never NaN
    if keras.backend.backend() == "tensorflow":  # None x None graphs take the dynamic-size path: same numbers
        dynamic = tf.function(layer.call, input_signature=[tf.TensorSpec([None, None, None, 2])])
        np.testing.assert_allclose(dynamic(images).numpy(), expected, rtol=1e-4, atol=1e-4)


@independent
@pytest.mark.parametrize("q", [0.0, 1.0, 12.5, 49.0, 50.0, 73.3, 99.8, 100.0])
@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_percentile_equals_numpy_linear(q, size, rng):
    flat = np.round(rng.random((3, size)) * 50).astype(np.float32)  # ties
    expected = np.percentile(flat.astype(np.float64), q, axis=1, method="linear")
    np.testing.assert_allclose(np.asarray(_percentile(keras.ops.convert_to_tensor(flat), q)), expected, rtol=1e-6)
    if keras.backend.backend() == "tensorflow":  # and at sizes known only at run time
        dynamic = tf.function(lambda x: _percentile(x, q), input_signature=[tf.TensorSpec([None, None])])
        np.testing.assert_allclose(dynamic(flat).numpy(), expected, rtol=1e-6)


@independent
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(normalize="robust"), "normalize must be one of"),
        (dict(normalize="dataset"), "needs low= and high="),
        (dict(normalize="dataset", low=0.5, high=0.1), "needs high > low"),
        (dict(normalize="minmax", low=0.0), "low and high apply to normalize='dataset' only"),
        (dict(normalize="percentile", percentiles=(99.0, 1.0)), "percentiles must be"),
        (dict(epsilon=0.0), "epsilon must be a positive float"),
        (dict(resize="stretch"), "resize must be one of"),
        (dict(resize="resize"), "needs the training image_size"),
        (dict(image_size=(0, 32)), "image_size must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InputPreprocessing(**kwargs)


@independent
def test_per_channel_constants_must_match_the_channels():
    with pytest.raises(ValueError, match="low has 2 values but the images have 3 channel"):
        unetpp_tf.build_unetpp((32, 32, 3), **TINY, preprocessing=dict(normalize="dataset", low=[0, 0], high=[1, 1]))
    with pytest.raises(ValueError, match="preprocessing must be None, a dict"):
        unetpp_tf.build_unetpp((32, 32, 1), **TINY, preprocessing="percentile")


@independent
def test_config_round_trip_and_saved_model_keep_the_settings(tmp_path, rng):
    settings = dict(normalize="percentile", percentiles=(2.0, 98.0), image_size=(32, 32), resize="resize")
    layer = InputPreprocessing(**settings)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert clone.get_config() == layer.get_config()
    assert clone.settings()["image_size"] == [32, 32] and clone.settings()["percentiles"] == [2.0, 98.0]
    model = unetpp_tf.build_unet((None, None, 1), **TINY, preprocessing=dict(normalize="dataset", low=0.1, high=0.4))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert model_preprocessing(loaded) == model_preprocessing(model)
    assert model_preprocessing(loaded)["low"] == [0.1] and loaded.get_layer("preprocessing").built
    images = rng.random((2, 32, 32, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    assert model_preprocessing(unetpp_tf.build_unetpp((32, 32, 1), **TINY)) is None


@independent
def test_paper_graph_and_parameter_count_unchanged():
    with shapes_only():
        plain = unetpp_tf.from_preset("paper", input_shape=(96, 96, 1))
        with_layer = unetpp_tf.from_preset("paper", input_shape=(96, 96, 1), preprocessing={"normalize": "percentile"})
    assert plain.count_params() == 9_041_601
    assert "preprocessing" not in [layer.name for layer in plain.layers]
    assert with_layer.count_params() == 9_041_601 and not with_layer.get_layer("preprocessing").weights
    assert with_layer.layers[1].name == "preprocessing"  # right after the input


def test_nested_and_recomputed_training_prune_and_save(tmp_path, rng):
    keras.utils.set_random_seed(2)
    model = unetpp_tf.build_unetpp((32, 32, 1), **TINY, deep_supervision=True, preprocessing={"normalize": "zscore"})
    images = (rng.random((4, 32, 32, 1)) * 0.05).astype(np.float32)
    masks = (images > 0.025).astype(np.float32)
    for trainer in (model, with_recompute(model)):  # the default model and RecomputedModel, shared weights
        trainer.compile("adam", loss=[unetpp_tf.losses.BCEDiceLoss()] * 2)
        loss = trainer.train_on_batch(images, (masks, masks))
        assert np.all(np.isfinite(loss))
    pruned = unetpp_tf.prune(model, 1)
    assert model_preprocessing(pruned) == model_preprocessing(model)
    assert model_preprocessing(unetpp_tf.inference_model(model))["normalize"] == "zscore"
    np.testing.assert_allclose(pruned.predict(images, verbose=0), model.predict(images, verbose=0)[0], atol=1e-6)
    pruned.save(tmp_path / "pruned.keras")
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert model_preprocessing(loaded)["normalize"] == "zscore"
    np.testing.assert_allclose(loaded.predict(images, verbose=0), pruned.predict(images, verbose=0), atol=1e-6)


# ----------------------------------------------------------------------------- reading images


def test_pil_reads_8_16_and_32_bit_images(tmp_path):
    values = (np.arange(12 * 10).reshape(12, 10) * 25).astype(np.uint16)  # 0..2975
    files = {
        "8bit.png": Image.fromarray((values // 12).astype(np.uint8)),
        "16bit.png": Image.fromarray(values),  # I;16
        "16bit.tif": Image.fromarray(values),
        "16bit_big_endian.tif": Image.frombytes("I;16B", (10, 12), values.astype(">u2").tobytes()),
        "32bit_int.tif": Image.fromarray(values.astype(np.int32)),  # I
        "float.tif": Image.fromarray((values / 65535).astype(np.float32)),  # F
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    expected = values / 65535.0
    modes = {}
    for name in files:
        with Image.open(tmp_path / name) as image:
            modes[name] = image.mode
            gray, rgb = pil_image_array(image, 1), pil_image_array(image, 3)
        assert gray.shape == (12, 10, 1) and rgb.shape == (12, 10, 3) and gray.dtype == np.float32
        want = (values // 12) / 255.0 if name == "8bit.png" else expected
        np.testing.assert_allclose(gray[..., 0], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))
    assert modes == {
        "8bit.png": "L", "16bit.png": "I;16", "16bit.tif": "I;16", "16bit_big_endian.tif": "I;16B",
        "32bit_int.tif": "I", "float.tif": "F",
    }


# ----------------------------------------------------------------------------- augmentation


def test_photometric_augmentation_is_relative_to_each_image(rng):
    full = rng.random((4, 24, 24, 1)).astype(np.float32)
    full[:, 0, 0], full[:, 0, 1] = 0.0, 1.0
    dim = full * np.float32(DIM / 65535)
    settings = dict(flip=False, rotate90=False, brightness=0.2, contrast=0.3, gamma=0.3, noise=0.1, value_range=None)
    out_full, _ = SegmentationAugmenter(**settings, seed=4)(full, np.zeros((4, 24, 24, 1)), training=True)
    out_dim, _ = SegmentationAugmenter(**settings, seed=4)(dim, np.zeros((4, 24, 24, 1)), training=True)
    # The same draws change a dim image exactly as they change the full-range one, scaled.
    np.testing.assert_allclose(np.asarray(out_dim), np.asarray(out_full) * DIM / 65535, atol=1e-5)
    assert np.abs(np.asarray(out_full) - full).mean() > 0.02


# ----------------------------------------------------------------------------- the round trip


@pytest.fixture(scope="module")
def percentile_model():
    """A None x None UNet++ with per-image percentile normalization, trained on full-range images at 32x32."""
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp(
        (None, None, 1), **TINY, preprocessing={"normalize": "percentile", "image_size": (32, 32), "resize": "resize"}
    )
    data = unetpp_tf.data.synthetic(64, image_size=(32, 32), batch_size=16)
    model.compile(keras.optimizers.Adam(1e-2), loss=unetpp_tf.losses.BCEDiceLoss())
    model.fit(data.train, epochs=6, shuffle=False, verbose=0)
    return model


@pytest.fixture(scope="module")
def dim_tiff(tmp_path_factory):
    """A 48x40 16-bit TIFF whose values lie in 0..3000 (of 65535), and its true mask."""
    image, mask = synthetic_sample(3, seed=5, image_size=(48, 40))
    pixels = np.round(image.numpy()[..., 0] * DIM).astype(np.uint16)
    path = tmp_path_factory.mktemp("tiff") / "dim.tif"
    Image.fromarray(pixels).save(path)
    return path, pixels, mask.numpy()[..., 0]


def test_predict_files_resizes_to_the_recorded_size(percentile_model, dim_tiff, tmp_path, monkeypatch):
    path, pixels, _ = dim_tiff
    seen = []
    predict = inference.predict
    monkeypatch.setattr(inference, "predict", lambda model, x, **kw: seen.append(x.shape) or predict(model, x, **kw))
    (written,) = inference.predict_files(percentile_model, [path], tmp_path / "a")
    assert seen == [(1, 32, 32, 1)] and np.asarray(Image.open(written)).shape == pixels.shape
    inference.predict_files(percentile_model, [path], tmp_path / "b", image_size=(16, 24))  # explicit size wins
    assert seen[-1] == (1, 16, 24, 1)
    keras.utils.set_random_seed(0)
    cropped = unetpp_tf.build_unetpp((None, None, 1), **TINY, preprocessing={"image_size": (32, 32), "resize": "crop"})
    inference.predict_files(cropped, [path], tmp_path / "c")  # trained on crops: native resolution
    assert seen[-1] == (1, 48, 40, 1)


def test_16_bit_tiff_gives_the_same_mask_through_keras_saved_model_and_tflite(percentile_model, dim_tiff, tmp_path):
    path, pixels, truth = dim_tiff
    # What the model should give: the TIFF scaled by 65535, resized to the training size and back.
    image = pixels[None, ..., None].astype(np.float32) / 65535.0
    small = tf.image.resize(image, (32, 32), antialias=True)
    probs = tf.image.resize(percentile_model.predict(small, verbose=0), pixels.shape).numpy()
    expected = (probs[0, ..., 0] >= 0.5).astype(np.uint8) * 255
    assert 0.1 < (expected > 0).mean() < 0.9  # a real mask, not all background
    assert np.mean((expected > 0) == (truth > 0)) > 0.85  # normalization made the dim image readable

    report = export_model(percentile_model, tmp_path / "export", samples=pixels[None, ..., None])
    assert report["image_size"] == [32, 32]  # the TFLite size defaults to the recorded training size
    models = {
        "keras": percentile_model,
        "saved_model": inference.load_model(tmp_path / "export" / "saved_model"),
        "tflite": inference.load_model(tmp_path / "export" / "model_float32.tflite"),
    }
    for name, model in models.items():
        assert model_preprocessing(model) == model_preprocessing(percentile_model), name
        (written,) = inference.predict_files(model, [path], tmp_path / name)
        np.testing.assert_array_equal(np.asarray(Image.open(written)), expected, err_msg=name)


def test_quantized_tflite_with_preprocessing_passes_parity(percentile_model, tmp_path):
    data = unetpp_tf.data.synthetic(48, image_size=(32, 32), batch_size=16, seed=1)
    report = export_model(
        percentile_model, tmp_path, formats="tflite", quantize=("float16", "dynamic", "int8"),
        calibration=data.val, samples=data.test,
    )
    assert [a["quantize"] for a in report["artifacts"]] == ["float16", "dynamic", "int8"]
    assert all(a["dice_agreement"] >= a["threshold"] for a in report["artifacts"])
