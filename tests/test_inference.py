"""Prediction: loading, tiling, padding, flip TTA, labels and writing mask files."""

import warnings
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

import unetpp_tf
from test_data_hostile import png_header_only  # the 60000 x 60000 header-only PNG
from unetpp_tf import inference


def pixel_model(shape=(32, 32, 1), kernel=2.0, bias=-1.0, size=1, classes=1):
    """A one-conv model with fixed weights: 1x1 is per-pixel (flip-equivariant, exact when tiled)."""
    inputs = keras.Input(shape)
    conv = keras.layers.Conv2D(classes, size, padding="same", activation="sigmoid" if classes == 1 else "softmax")
    model = keras.Model(inputs, conv(inputs))
    weights = np.broadcast_to(np.asarray(kernel, np.float32), (size, size, shape[-1], classes))
    conv.set_weights([weights, np.broadcast_to(np.asarray(bias, np.float32), (classes,))])
    return model


def sigmoid_reference(x, kernel=2.0, bias=-1.0):
    return 1.0 / (1.0 + np.exp(-(kernel * x.sum(-1, keepdims=True) + bias)))


@pytest.mark.backend_independent
def test_tiled_prediction_of_a_per_pixel_model_is_exact(rng):
    image = rng.random((2, 64, 64, 1), dtype=np.float32)
    tiled = inference.predict(pixel_model(), image, tile_size=[32], overlap=0.5)
    np.testing.assert_allclose(tiled, sigmoid_reference(image), atol=1e-5)
    # A fixed-size model meeting a larger image tiles on its own, with its own size.
    np.testing.assert_allclose(inference.predict(pixel_model(), image), sigmoid_reference(image), atol=1e-5)
    small = image[:1, :20, :50]  # smaller than the window on one axis: reflection-padded up to it
    np.testing.assert_allclose(inference.predict(pixel_model(), small), sigmoid_reference(small), atol=1e-5)


def test_tiled_unetpp_is_close_to_direct():
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4)
    yy, xx = np.mgrid[:64, :64]
    image = (((np.abs(yy - 24) < 12) & (np.abs(xx - 40) < 14)) * 0.8 + 0.1).astype(np.float32)[None, ..., None]
    direct = inference.predict(model, image)
    tiled = inference.predict(model, image, tile_size=32, overlap=0.5)
    assert np.abs(tiled - direct).mean() < 0.02
    assert np.corrcoef(tiled.ravel(), direct.ravel())[0, 1] > 0.95
    shifted = np.roll(direct, 3, axis=2)  # a misplaced window would look like this
    assert np.abs(tiled - direct).mean() < 0.5 * np.abs(shifted - direct).mean()


def test_large_image_with_fixed_size_model(rng):
    image = rng.random((1, 300, 200, 1), dtype=np.float32)
    probs = inference.predict(pixel_model(), image, overlap=0.25, batch_size=4)
    assert probs.shape == (1, 300, 200, 1)
    np.testing.assert_allclose(probs, sigmoid_reference(image), atol=1e-5)
    # A fixed-size UNet++ tiles with its own size: the same as its None x None twin tiled at 32
    # explicitly (test_tiled_unetpp_is_close_to_direct compares tiling with whole images).
    keras.utils.set_random_seed(0)
    unet = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4)
    twin = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4)
    twin.set_weights(unet.get_weights())
    out = inference.predict(unet, image)
    assert out.shape == (1, 300, 200, 1)
    np.testing.assert_allclose(out, inference.predict(twin, image, tile_size=32, overlap=0.25), atol=1e-6)
    assert np.abs(out - inference.predict(twin, image, tile_size=64, overlap=0.25)).max() > 1e-3  # size matters


@pytest.mark.backend_independent
def test_windows_go_through_the_model_in_bounded_batches(rng, monkeypatch):
    sizes = []
    forward = inference._forward

    def spy(model, batch, tta):
        sizes.append(len(batch))
        return forward(model, batch, tta)

    monkeypatch.setattr(inference, "_forward", spy)
    inference.predict(pixel_model(), rng.random((2, 100, 90, 1), dtype=np.float32), batch_size=3)
    assert max(sizes) == 3 and sum(sizes) > 2 * 3  # many windows, never more than 3 at once


@pytest.mark.backend_independent
def test_padding_path_for_sizes_not_divisible(rng):
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4)
    assert inference.size_divisor(model) == 4
    image = rng.random((1, 30, 45, 1), dtype=np.float32)
    probs = inference.predict(model, image)
    assert probs.shape == (1, 30, 45, 1)
    padded = np.pad(image, ((0, 0), (1, 1), (1, 2), (0, 0)), mode="reflect")  # 32 x 48, centred
    expected = keras.ops.convert_to_numpy(model(padded, training=False))[:, 1:31, 1:46]
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_size_divisor_follows_the_graph():
    ds = unetpp_tf.build_unetpp((None, None, 1), depth=3, filters=4, deep_supervision=True)
    assert inference.size_divisor(ds) == 8
    assert inference.size_divisor(unetpp_tf.prune(ds, 1)) == 2
    assert inference.size_divisor(pixel_model()) == 1


@pytest.mark.backend_independent
def test_tta_equals_plain_for_equivariant_model_and_averages_flips(rng):
    image = rng.random((2, 32, 32, 1), dtype=np.float32)
    model = pixel_model()
    np.testing.assert_allclose(
        inference.predict(model, image, tta=True), inference.predict(model, image), atol=1e-6
    )
    skewed = pixel_model((None, None, 1), size=3, bias=0.0, kernel=rng.normal(size=(3, 3, 1, 1)))
    plain = inference.predict(skewed, image)
    tta = inference.predict(skewed, image, tta=True)
    assert np.abs(tta - plain).max() > 1e-2
    run = lambda x: keras.ops.convert_to_numpy(skewed(np.ascontiguousarray(x)))  # noqa: E731
    expected = np.mean([np.flip(run(np.flip(image, a)), a) for a in [(), (1,), (2,), (1, 2)]], axis=0)
    np.testing.assert_allclose(tta, expected, atol=1e-6)


@pytest.mark.backend_independent
def test_predict_argument_errors(rng):
    image = rng.random((1, 32, 32, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="tile_size height 48 differs"):
        inference.predict(pixel_model(), image, tile_size=48)
    unet = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4)
    with pytest.raises(ValueError, match="not divisible by 4.*pass 32"):
        inference.predict(unet, image, tile_size=30)
    with pytest.raises(ValueError, match="3 channel"):
        inference.predict(unet, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"image\[None\]"):
        inference.predict(unet, image[0])
    with pytest.raises(ValueError, match="overlap"):
        inference.predict(unet, image, overlap=1.0)


@pytest.mark.backend_independent
def test_as_single_output(tiny_ds_model, images):
    single = pixel_model()
    assert inference.as_single_output(single) is single
    with pytest.raises(ValueError, match="no deep-supervision heads"):
        inference.as_single_output(single, "fast", level=1)
    fast = inference.as_single_output(tiny_ds_model, "fast", 1)
    assert len(fast.outputs) == 1 and fast.count_params() == unetpp_tf.prune(tiny_ds_model, 1).count_params()
    accurate = inference.as_single_output(tiny_ds_model)
    heads = [keras.ops.convert_to_numpy(h) for h in tiny_ds_model(images, training=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # called with a tensor, without a structure warning
        np.testing.assert_allclose(keras.ops.convert_to_numpy(accurate(images)), np.mean(heads, axis=0), atol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(fast(images)), heads[0], atol=1e-6)


@pytest.mark.backend_independent
def test_labels_from_probabilities():
    binary = np.array([[[[0.2], [0.5]], [[0.7], [0.49]]]], np.float32)
    labels = inference.labels_from_probabilities(binary)
    assert labels.dtype == np.uint8 and labels.tolist() == [[[0, 1], [1, 0]]]
    assert inference.labels_from_probabilities(binary, threshold=0.6).tolist() == [[[0, 0], [1, 0]]]
    multi = np.array([[[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], [[0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]]])
    assert inference.labels_from_probabilities(multi).tolist() == [[[1, 0], [2, 1]]]


@pytest.mark.backend_independent
def test_load_model_round_trip_and_errors(tmp_path, rng):
    model = pixel_model((None, None, 1))
    model.save(tmp_path / "m.keras")
    image = rng.random((1, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(inference.predict(str(tmp_path / "m.keras"), image), inference.predict(model, image))
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        inference.load_model(tmp_path / "missing.keras")
    (tmp_path / "notes.txt").write_text("hello")
    message = "notes.txt is not a model: pass a .keras file, a .tflite file or a SavedModel"
    with pytest.raises(ValueError, match=message):
        inference.load_model(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="is not a model"):
        inference.load_model(tmp_path)  # a folder without saved_model.pb
    (tmp_path / "bad.tflite").write_bytes(rng.bytes(3000))
    with pytest.raises(ValueError, match=r"bad.tflite is not a readable model \(.*\); check the file"):
        inference.load_model(tmp_path / "bad.tflite")


def _keras_file_cases(folder, rng):
    """Broken .keras files, each with the words its error must contain."""
    good = (folder / "good.keras").read_bytes()
    (folder / "empty.keras").write_bytes(b"")
    (folder / "truncated.keras").write_bytes(good[: len(good) // 2])
    (folder / "random.keras").write_bytes(rng.bytes(5000))
    pixel_model().save_weights(folder / "w.weights.h5")
    (folder / "weights.keras").write_bytes((folder / "w.weights.h5").read_bytes())  # a renamed weights file
    with zipfile.ZipFile(folder / "notes.keras", "w") as archive:
        archive.writestr("notes.txt", "a zip, but no model")
    corrupt = bytearray(good)
    with zipfile.ZipFile(folder / "good.keras") as archive:
        info = archive.getinfo("model.weights.h5")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    corrupt[start + info.compress_size // 2] ^= 0xFF  # one flipped byte inside the stored weights
    (folder / "corrupt.keras").write_bytes(bytes(corrupt))
    return {
        "empty.keras": "is empty",
        "truncated.keras": "is not a .keras archive",
        "random.keras": "is not a .keras archive",
        "weights.keras": "is an HDF5 file .*load_weights",
        "notes.keras": "is a zip archive but not a Keras model",
        "corrupt.keras": "is corrupt .*model.weights.h5",
    }


@pytest.mark.backend_independent
def test_broken_keras_files_get_one_clear_error(tmp_path, rng, tiny_ds_model):
    tiny_ds_model.save(tmp_path / "good.keras")
    for name, words in _keras_file_cases(tmp_path, rng).items():
        with pytest.raises(ValueError, match=f"{tmp_path / name} {words}") as info:
            inference.load_model(tmp_path / name)
        assert "\n" not in str(info.value), name


@pytest.mark.backend_independent
def test_safe_mode_loads_our_models_and_refuses_code(tmp_path, images):
    keras.utils.set_random_seed(3)
    ours = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4, deep_supervision=True, batch_norm=True,
                                  preprocessing={"normalize": "minmax"})
    ours.save(tmp_path / "ours.keras")
    loaded = inference.load_model(tmp_path / "ours.keras")  # safe mode on: every custom object is registered
    np.testing.assert_allclose(inference.predict(loaded, images), inference.predict(ours, images), atol=1e-6)
    inputs = keras.Input((8, 8, 1))
    keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs)).save(tmp_path / "code.keras")
    with pytest.raises(ValueError, match=r"code.keras holds Python code .*safe_mode=False"):
        inference.load_model(tmp_path / "code.keras")


# ----------------------------------------------------------------------------- files


def half_image(height, width, mode="L"):
    """Left half bright (200), right half dark (30)."""
    array = np.full((height, width), 30, np.uint8)
    array[:, : width // 2] = 200
    return Image.fromarray(array).convert(mode)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    half_image(32, 40).save(folder / "b.png")
    half_image(50, 30).save(folder / "a.png")
    (folder / "notes.txt").write_text("ignored")
    single = tmp_path / "c.jpg"
    half_image(24, 24, "RGB").save(single, quality=95)
    return folder, single


def rgb_threshold_model(channels=3):
    """Foreground where the channel mean is above ~0.5."""
    return pixel_model((None, None, channels), kernel=20.0 / channels, bias=-10.0)


@pytest.mark.backend_independent
def test_predict_files_writes_masks_and_overlays(tmp_path, inputs):
    folder, single = inputs
    out = tmp_path / "out"
    written = inference.predict_files(rgb_threshold_model(3), [folder, single], out, overlay=True)
    assert [p.name for p in written] == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png", "c_overlay.png"
    ]
    for name, (height, width) in {"a": (50, 30), "b": (32, 40), "c": (24, 24)}.items():
        mask = np.asarray(Image.open(out / f"{name}.png"))
        assert mask.shape == (height, width) and set(np.unique(mask)) == {0, 255}
        assert np.all(mask[:, : width // 2] == 255) and np.all(mask[:, width // 2 :] == 0)
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
        assert overlay.shape == (height, width, 3) and overlay.dtype == np.uint8


@pytest.mark.backend_independent
def test_predict_files_multiclass_and_resize(tmp_path, inputs):
    folder, _ = inputs
    model = pixel_model((None, None, 1), classes=3, kernel=[0.0, 10.0, -10.0], bias=[0.0, -4.0, 4.0])
    written = inference.predict_files(model, [folder / "a.png"], tmp_path / "out", image_size=(16, 16))
    mask = np.asarray(Image.open(written[0]))
    assert mask.shape == (50, 30) and mask.dtype == np.uint8
    image = np.asarray(Image.open(folder / "a.png"), np.float32)[None, ..., None] / 255.0
    expected = inference.labels_from_probabilities(inference.predict(model, image))[0]
    # A per-pixel model gives the same labels after the round trip, away from the edge it blurs.
    np.testing.assert_array_equal(mask[:, :10], expected[:, :10])
    np.testing.assert_array_equal(mask[:, 20:], expected[:, 20:])
    assert np.all(mask[:, :10] == 1) and np.all(mask[:, 20:] == 2)  # bright -> 1, dark -> 2


@pytest.mark.backend_independent
def test_predict_files_channel_errors_and_missing_inputs_write_nothing(tmp_path, inputs):
    folder, single = inputs
    out = tmp_path / "out"
    inference.predict_files(rgb_threshold_model(1), [single], out)  # RGB read as gray works
    assert (out / "c.png").exists()
    out = tmp_path / "out2"
    with pytest.raises(ValueError, match=r"c.jpg has 3 channel\(s\) but the model expects 2"):
        inference.predict_files(rgb_threshold_model(2), [single], out)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        inference.predict_files(rgb_threshold_model(3), [folder, tmp_path / "missing.png"], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        inference.predict_files(rgb_threshold_model(3), [tmp_path / "empty"], out)
    assert not out.exists()


@pytest.mark.backend_independent
def test_predict_files_failure_midway_leaves_no_output(tmp_path, inputs, monkeypatch):
    folder, single = inputs
    calls = []
    predict = inference.predict

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return predict(*args, **kwargs)

    monkeypatch.setattr(inference, "predict", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        inference.predict_files(rgb_threshold_model(3), [folder, single], out, overlay=True)
    assert list(out.iterdir()) == []


@pytest.mark.backend_independent
def test_predict_files_rejects_colliding_names(tmp_path, inputs):
    folder, _ = inputs
    half_image(8, 8).save(tmp_path / "a.bmp")
    with pytest.raises(ValueError, match="would both be written"):
        inference.predict_files(rgb_threshold_model(1), [folder, tmp_path / "a.bmp"], tmp_path / "out")


@pytest.mark.backend_independent
def test_predict_files_refuses_a_damaged_or_bomb_image_before_writing(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "damaged.png").write_bytes((tmp_path / "good.png").read_bytes()[:-30])
    (tmp_path / "bomb.png").write_bytes(png_header_only(60000, 60000))
    for name, reason in (("damaged.png", "truncated or damaged"), ("bomb.png", "refused before decoding")):
        out = tmp_path / f"out-{name}"
        with pytest.raises(ValueError, match=f"{name}: .*{reason}"):
            inference.predict_files(rgb_threshold_model(1), [tmp_path / "good.png", tmp_path / name], out)
        assert not out.exists()


@pytest.mark.backend_independent
def test_predict_files_reads_a_png_that_only_pil_decodes(tmp_path):
    # Prediction reads with PIL, so the tf.io check of the training pipeline does not apply.
    from PIL import Image

    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:-1])  # no IEND checksum
    out = tmp_path / "out"
    inference.predict_files(rgb_threshold_model(1), [tmp_path / "full.png"], out / "a")
    inference.predict_files(rgb_threshold_model(1), [tmp_path / "cut.png"], out / "b")
    assert (out / "b" / "cut.png").read_bytes() and np.array_equal(
        np.asarray(Image.open(out / "a" / "full.png")), np.asarray(Image.open(out / "b" / "cut.png"))
    )
