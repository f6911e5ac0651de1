"""Pretrained encoders: every stage tap, in-model preprocessing, weights files, custom encoders, FLOPs."""

import contextlib
import re
import h5py
import keras
import numpy as np
import pytest

import unetpp_tf
from unetpp_tf.models import count_flops, encoder_layers, prune, size_divisor
from unetpp_tf.models.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderPreprocessing,
    encoder_features,
    encoder_spec,
)

SIZE = 64  # tap check input: strides 2..32 give maps of 32..2


@contextlib.contextmanager
def shapes_only():
    """Build models without initializing their weights, for checks that need shapes only.

    Variables created in the scope stay uninitialized (no random values for the 350M weights
    of ConvNeXtXLarge); clearing the session afterwards drops them, so nothing initializes
    them later. Builds cost a third of the time and a fifth of the memory.
    """
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        keras.backend.clear_session()


def _run(model, x):
    """The model's outputs on `x` in inference mode, as numpy (an eager call: no tracing)."""
    return keras.tree.map_structure(keras.ops.convert_to_numpy, model(x, training=False))


# ---------------------------------------------------------------------------------------------
# Stage taps: every row, by shape and by position in the backbone's graph


def _tensor_sources(structure) -> list[str]:
    """Names of the layers whose outputs a serialized call takes."""
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            return [structure["config"]["keras_history"][0]]
        return [name for value in structure.values() for name in _tensor_sources(value)]
    if isinstance(structure, (list, tuple)):
        return [name for value in structure for name in _tensor_sources(value)]
    return []


def _graph(model: keras.Model):
    """(layer names in topological order, {name: parent names}, {name: output height}, {name: class})."""
    config = model.get_config()
    order = [layer["name"] for layer in config["layers"]]
    parents = {layer["name"]: _tensor_sources(layer.get("inbound_nodes") or []) for layer in config["layers"]}
    height = {}
    for layer in config["layers"]:
        for call in layer.get("inbound_nodes") or []:
            for arg in call["args"]:
                for tensor in arg if isinstance(arg, list) else [arg]:
                    if isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__":
                        height[tensor["config"]["keras_history"][0]] = tensor["config"]["shape"][1]
    kinds = {layer["name"]: layer["class_name"] for layer in config["layers"]}
    return order, parents, height, kinds


def _dominators(order, parents) -> dict[str, set]:
    """Layers every path from the input to a layer passes through (the layer included)."""
    dominators = {}
    for name in order:
        inherited = [dominators[p] for p in parents[name]]
        dominators[name] = (set.intersection(*inherited) if inherited else set()) | {name}
    return dominators


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_tap_is_the_last_map_of_its_stride(name):
    """Each row's taps give strides 2..32 by shape, and each is the backbone's final map at that stride.

    "Final" is checked on the graph, so a tap inside a stage (a wrong block number) fails even
    though its shape is right: the tapped layer must be the last layer at its stride that every
    path to the stride-32 output passes through. Pre-activation ResNets (V2) normalize that map
    before their strided block, so there the tap may be its BatchNorm + ReLU.
    """
    with shapes_only():
        image = keras.Input((SIZE, SIZE, 3), name="image")
        features = encoder_features(image, name)
        graph = _graph(keras.Model(image, [f for f in features if f is not None]))
    spec = encoder_spec(name)
    sizes = [None if f is None else tuple(f.shape[1:3]) for f in features]
    expected = [(SIZE // s, SIZE // s) for s in (2, 4, 8, 16, 32)]
    if spec.family == "ConvNeXt":  # stride-4 stem: no stride-2 map
        expected[0] = None
    assert sizes == expected

    order, parents, height, kinds = graph
    final = parents["encoder_stage5"][0]
    dominators = _dominators(order, parents)[final]
    for k, feature in enumerate(features, start=1):
        if feature is None:
            continue
        tap = parents[f"encoder_stage{k}"][0]
        last = [n for n in order if n in dominators and height.get(n) == SIZE // 2**k][-1]
        reached = tap
        while reached != last and kinds[reached] in ("BatchNormalization", "Activation") and spec.family == "ResNetV2":
            (reached,) = parents[reached]
        assert reached == last, f"{name} stride {2**k}: tap {tap!r}, last map at that stride {last!r}"


# ---------------------------------------------------------------------------------------------
# Preprocessing inside the model

# rows whose backbone takes preprocessed input: keras.applications' preprocess_input per family
PREPROCESS_MODULE = {
    "ResNet": "resnet",
    "ResNetV2": "resnet_v2",
    "DenseNet": "densenet",
    "VGG": None,  # vgg16 / vgg19 by row
    "MobileNetV2": "mobilenet_v2",
}


def _images(channels=3, n=2, size=8):
    return np.random.default_rng(0).random((n, size, size, channels), dtype=np.float32)


@pytest.mark.parametrize("name", sorted(n for n, s in ENCODERS.items() if s.family in PREPROCESS_MODULE))
def test_preprocessing_equals_keras_preprocess_input(name):
    """Images scaled 0..1 leave EncoderPreprocessing as keras' preprocess_input leaves them scaled 0..255."""
    spec = encoder_spec(name)
    module = getattr(keras.applications, PREPROCESS_MODULE[spec.family] or name)
    x = _images()
    expected = np.asarray(module.preprocess_input(255.0 * x))
    got = keras.ops.convert_to_numpy(EncoderPreprocessing(spec.preprocessing)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def _first_conv_input(model: keras.Model):
    """The tensor the backbone's first convolution (or its nested stem block) takes."""
    first = next(layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.Model)))
    return first.input


@pytest.mark.parametrize("name", ["efficientnetv2b0", "efficientnetv2s", "mobilenetv3small", "convnexttiny"])
def test_preprocessing_equals_the_backbones_own(name):
    """Rows built without the backbone's in-model preprocessing do the same in EncoderPreprocessing."""
    spec = encoder_spec(name)
    x = _images(size=32)
    with shapes_only():  # the layers before the first convolution have no weights
        own = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(32, 32, 3), include_preprocessing=True
        )
        expected = _run(keras.Model(own.inputs, _first_conv_input(own)), 255.0 * x)
    got = keras.ops.convert_to_numpy(EncoderPreprocessing(spec.preprocessing)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_efficientnet_first_conv_sees_imagenet_normalized_input(tmp_path):
    """EfficientNet (V1) rescales and normalizes inside: with its ImageNet file the stem sees (x - mean) / std.

    The downloaded file (legacy .h5) holds in its Normalization layer the ImageNet mean and, as
    variance, the standard deviations (tensorflow/tensorflow#49930), which keras corrects with an
    extra Rescaling(1 / sqrt(std)) when weights="imagenet". A local copy of such a file must give
    the same stem input: EncoderPreprocessing("torch255") feeds the backbone's Rescaling(1/255)
    and the Normalization stays the identity. The file's auto-named `normalization` layer has
    another number in the models built here, as in any new session: legacy files match by position.
    """
    app = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 3))
    normalization = next(layer for layer in app.layers if isinstance(layer, keras.layers.Normalization))
    normalization.set_weights([np.array(IMAGENET_MEAN), np.array(IMAGENET_STD), np.array(0)])
    path = tmp_path / "efficientnetb0_notop.h5"
    _write_legacy_h5(app, path)
    app.load_weights(path)  # set_weights alone leaves Normalization's cached statistics; loading refreshes them

    x = _images(size=32)
    keras_route = _run(keras.Model(app.inputs, normalization.output), 255.0 * x) / np.sqrt(IMAGENET_STD)
    image = keras.Input((32, 32, 3))
    features = encoder_features(image, "efficientnetb0", weights=str(path), levels=1)
    model = keras.Model(image, features)
    built = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    assert built.name != normalization.name  # so the file was matched by position
    stem_input = _run(keras.Model(image, model.get_layer("stem_conv_pad").input), x)
    normalized = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(stem_input, normalized, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stem_input, keras_route, rtol=1e-4, atol=1e-4)
    stem_kernel = app.get_layer("stem_conv").kernel.numpy()
    np.testing.assert_array_equal(model.get_layer("stem_conv").kernel.numpy(), stem_kernel)


def test_preprocessing_of_other_channel_counts_uses_the_mean_statistics():
    """With C != 3 channels every channel gets the mean of the three means and deviations (caffe: no flip)."""
    x = _images(channels=1)
    caffe = keras.ops.convert_to_numpy(EncoderPreprocessing("caffe")(x))
    np.testing.assert_allclose(caffe, 255.0 * x - np.mean([103.939, 116.779, 123.68]), rtol=1e-5, atol=1e-3)
    x = _images(channels=2)
    torch = keras.ops.convert_to_numpy(EncoderPreprocessing("torch")(x))
    np.testing.assert_allclose(torch, (x - np.mean(IMAGENET_MEAN)) / np.mean(IMAGENET_STD), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown encoder preprocessing mode 'bgr'"):
        EncoderPreprocessing("bgr")


# ---------------------------------------------------------------------------------------------
# Weights files


def _application(name, seed=7):
    """A random-init keras.applications backbone as the row builds it (3 channels)."""
    keras.utils.set_random_seed(seed)
    spec = encoder_spec(name)
    return getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(None, None, 3), **dict(spec.options)
    )


def _pairs(reference: keras.Model, layers: list) -> list[tuple]:
    """(reference layer, built layer) for every weighted layer: by name, auto-named leftovers in order."""
    ref = [layer for layer in reference.layers if layer.weights]
    got = [layer for layer in layers if layer.weights]
    ref_names, got_names = {layer.name for layer in ref}, {layer.name for layer in got}
    pairs = [(reference.get_layer(layer.name), layer) for layer in got if layer.name in ref_names]
    pairs += zip([r for r in ref if r.name not in got_names], [g for g in got if g.name not in ref_names])
    assert len(pairs) == len(ref) == len(got)
    return pairs


def _encoder_model(name, channels, weights, size=32):
    image = keras.Input((size, size, channels))
    features = encoder_features(image, name, weights=weights)
    return keras.Model(image, [f for f in features if f is not None])


def _assert_loaded(reference: keras.Model, model: keras.Model, channels: int) -> None:
    """Every encoder tensor equals the file's; the first conv's kernel adapted to `channels`."""
    adapted = 0
    for ref_layer, layer in _pairs(reference, encoder_layers(model)):
        for stored, loaded in zip(ref_layer.get_weights(), layer.get_weights()):
            if stored.shape == loaded.shape:
                np.testing.assert_array_equal(loaded, stored, err_msg=layer.name)
                continue
            adapted += 1  # the first convolution's kernel (kh, kw, 3, filters)
            if channels == 1:
                expected = stored.sum(axis=2, keepdims=True)
            else:
                expected = np.concatenate([stored[:, :, [c % 3]] for c in range(channels)], axis=2) * 3 / channels
            np.testing.assert_allclose(loaded, expected, rtol=1e-6, err_msg=layer.name)
    assert adapted == (channels != 3)


@pytest.fixture(scope="module")
def mobilenetv2_file(tmp_path_factory):
    """A MobileNetV2 backbone and the Keras 3 weights file written from it."""
    app = _application("mobilenetv2")
    path = tmp_path_factory.mktemp("weights") / "mobilenetv2.weights.h5"
    app.save_weights(path)
    return app, str(path)


def test_weights_file_loads_identical_tensors_for_3_1_and_4_channels(mobilenetv2_file):
    app, path = mobilenetv2_file
    models = {channels: _encoder_model("mobilenetv2", channels, path) for channels in (3, 1, 4)}
    for channels, model in models.items():
        _assert_loaded(app, model, channels)
    # MobileNetV2 normalizes every channel alike ("tf" mode), so the summed kernel makes the
    # grayscale model see a gray image exactly as the RGB model sees it repeated three times
    gray = _images(channels=1, size=32)
    for one, three in zip(_run(models[1], gray), _run(models[3], np.repeat(gray, 3, -1))):
        np.testing.assert_allclose(one, three, rtol=1e-4, atol=1e-4)


def test_weights_file_with_nested_blocks_loads(tmp_path):
    """ConvNeXt keeps its stem and downsampling layers in nested Sequential blocks; the file check walks them."""
    app = _application("convnexttiny")
    path = tmp_path / "convnexttiny.weights.h5"
    app.save_weights(path)
    _assert_loaded(app, _encoder_model("convnexttiny", 1, str(path)), channels=1)


def _write_legacy_h5(model: keras.Model, path) -> None:
    """Write `model`'s weights as the files keras.applications downloads: one group per layer name.

    Keras 3's save_weights refuses a name ending only in .h5 (it requires .weights.h5), so the
    legacy layout is written here with h5py: root attribute layer_names, each group's
    weight_names, datasets at <layer>/<weight>:0.
    """
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{weight.name}:0" for weight in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for weight_name, value in zip(names, layer.get_weights()):
                group.create_dataset(weight_name, data=value)


def test_legacy_h5_weights_file_loads_identical_tensors(mobilenetv2_file, tmp_path):
    app, _ = mobilenetv2_file
    with pytest.raises(ValueError, match=r"\.weights\.h5"):  # why the file is written with h5py
        app.save_weights(tmp_path / "refused.h5")
    path = tmp_path / "mobilenet_v2_notop.h5"
    _write_legacy_h5(app, path)
    _assert_loaded(app, _encoder_model("mobilenetv2", 3, str(path)), channels=3)


def test_weights_file_for_another_architecture_names_the_first_mismatching_layer(mobilenetv2_file, tmp_path):
    app, path = mobilenetv2_file
    # Keras 3 file (layers keyed by class and position): MobileNetV3Small's first conv has 16 filters, V2's 32
    with pytest.raises(ValueError, match=r"does not fit encoder 'mobilenetv3small'") as error:
        encoder_features(keras.Input((32, 32, 3)), "mobilenetv3small", weights=path)
    message = str(error.value)
    assert path in message and "layer 'conv'" in message and "(3, 3, 3, 32)" in message and "(3, 3, 3, 16)" in message
    assert "keras.applications.MobileNetV3Small(include_top=False)" in message
    # legacy file (layers with weights in order): the same layer, and the file's name for it
    legacy = tmp_path / "mobilenet_v2.h5"
    _write_legacy_h5(app, legacy)
    expected = "layer 'conv' needs weights of shapes [(3, 3, 3, 16)], the file has [(3, 3, 3, 32)] (its layer 'Conv1')"
    with pytest.raises(ValueError, match=re.escape(expected)):
        encoder_features(keras.Input((32, 32, 3)), "mobilenetv3small", weights=str(legacy))
    # the file of the model with its classifier: one layer with weights too many
    with_top = tmp_path / "mobilenet_v2_with_top.h5"
    _write_legacy_h5(keras.applications.MobileNetV2(weights=None), with_top)
    too_long = "it has weights for 105 layers, the encoder has 104 (from 'predictions' on)"
    with pytest.raises(ValueError, match=re.escape(too_long)):
        encoder_features(keras.Input((32, 32, 3)), "mobilenetv2", weights=str(with_top))


def test_missing_or_unreadable_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.weights\.h5' does not exist; pass 'imagenet', None"):
        unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder="mobilenetv3small", encoder_weights=missing)
    text = tmp_path / "notes.weights.h5"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=r"notes\.weights\.h5' is not a Keras weights file \(HDF5"):
        unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder="mobilenetv3small", encoder_weights=str(text))


def test_imagenet_download_failure_says_to_pass_a_local_file(monkeypatch):
    original = keras.applications.MobileNetV3Small
    attempts = []

    def offline(*args, weights=None, **kwargs):
        if weights == "imagenet":
            attempts.append(kwargs)
            raise Exception(
                "URL fetch failure on https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
                "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5: None -- [Errno -3] Temporary failure in "
                "name resolution"
            )
        return original(*args, weights=weights, **kwargs)

    monkeypatch.setattr(keras.applications, "MobileNetV3Small", offline)
    with pytest.raises(ConnectionError) as error:  # an OSError: the CLI prints it as one line
        unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, encoder="mobilenetv3small", encoder_weights="imagenet")
    assert error.type is ConnectionError and len(attempts) == 1
    message = str(error.value)
    assert "could not get the ImageNet weights of encoder 'mobilenetv3small'" in message
    assert "encoder_weights=PATH (--encoder-weights PATH)" in message and "URL fetch failure" in message


# ---------------------------------------------------------------------------------------------
# Bad configurations


@pytest.mark.backend_independent
def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown encoder 'resnet51'; choose one of: ") as error:
        unetpp_tf.build_unetpp((64, 64, 3), encoder="resnet51")
    assert all(name in str(error.value) for name in ENCODERS)
    assert encoder_spec("EfficientNet-B0") is ENCODERS["efficientnetb0"]


def test_input_size_and_depth_an_encoder_cannot_take():
    with pytest.raises(ValueError, match=r"input height 100 is not divisible by 32 .*pad to 96 or 128"):
        unetpp_tf.build_unetpp((100, 96, 3), depth=4, encoder="vgg16")
    with pytest.raises(ValueError, match=r"input width 20 is not divisible by 8 .*pad to 16 or 24"):
        unetpp_tf.build_unet((16, 20, 3), depth=2, encoder="vgg16")  # depth 2 taps strides 2..8
    with pytest.raises(ValueError, match="depth 5 is too deep for an encoder.*use depth <= 4"):
        unetpp_tf.build_unetpp((64, 64, 3), depth=5, encoder="vgg16")


# ---------------------------------------------------------------------------------------------
# Custom encoder models


def _pyramid(channels=3, strides=(2, 4, 8, 16, 32)):
    """A tiny functional encoder: stride-2 convs, the map at stride 2**k has 2k channels."""
    image = keras.Input((None, None, channels))
    x, maps = image, {}
    for k in range(1, 6):
        x = keras.layers.Conv2D(2 * k, 3, strides=2, padding="same")(x)
        if 2**k in strides:
            maps[2**k] = x
    return image, maps


def _channels(features):
    return [None if f is None else f.shape[-1] for f in features]


def test_custom_encoder_as_list_dict_or_pyramid_outputs():
    image, maps = _pyramid()
    as_list = keras.Model(image, [maps[8], maps[2], maps[32], maps[4], maps[16]])  # any order: sorted by stride
    as_dict = keras.Model(image, {"a": maps[32], "b": maps[16], "c": maps[8], "d": maps[4], "e": maps[2]})
    hub_like = keras.Model(image, maps[32])  # a keras-hub backbone exposes its levels this way
    hub_like.pyramid_outputs = {f"P{k}": maps[2**k] for k in range(1, 6)}
    x = _images(size=32)
    reference = _run(keras.Model(image, [maps[2**k] for k in range(1, 6)]), x)
    for encoder in (as_list, as_dict, hub_like):
        inputs = keras.Input((32, 32, 3))
        features = encoder_features(inputs, encoder)
        assert _channels(features) == [2, 4, 6, 8, 10]
        for got, expected in zip(_run(keras.Model(inputs, features), x), reference):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    model = unetpp_tf.build_unetpp((32, 32, 3), depth=4, filters=4, encoder=hub_like)
    assert model.output_shape == (None, 32, 32, 1) and "x_0_0_pool" not in [layer.name for layer in model.layers]


def test_custom_encoder_without_stride_2_gets_one_from_the_decoder():
    image, maps = _pyramid(strides=(4, 8, 16, 32))
    encoder = keras.Model(image, list(maps.values()))
    assert _channels(encoder_features(keras.Input((32, 32, 3)), encoder)) == [None, 4, 6, 8, 10]
    model = unetpp_tf.build_unetpp((32, 32, 3), depth=4, filters=4, encoder=encoder)
    assert model.get_layer("x_0_0_conv1").input.shape[1:3] == (16, 16)  # a block on the 2x pooled image
    assert _run(model, _images(size=32)).shape == (2, 32, 32, 1)


def test_custom_encoder_trainability():
    image, maps = _pyramid()
    encoder = keras.Model(image, list(maps.values()), name="custom")
    encoder.layers[1].trainable = False  # frozen by its owner: building on it keeps that
    unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder=encoder)
    assert [layer.trainable for layer in encoder.layers[1:]] == [False, True, True, True, True]
    frozen = unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder=encoder, encoder_trainable=False)
    assert [layer.name for layer in encoder_layers(frozen)] == ["custom"] and not encoder.trainable_weights
    assert frozen.trainable_weights  # the decoder


def test_custom_encoder_errors():
    image, maps = _pyramid(strides=(2, 4, 16, 32))
    with pytest.raises(ValueError, match=r"strides \[2, 4, 16, 32\], but a decoder of depth 4 needs .*; \[8\] missing"):
        unetpp_tf.build_unetpp((32, 32, 3), depth=4, encoder=keras.Model(image, list(maps.values())))
    # depth 1 needs strides 2 and 4 only: the same model serves
    assert unetpp_tf.build_unetpp((32, 32, 3), depth=1, encoder=keras.Model(image, list(maps.values())))
    image, maps = _pyramid(channels=3)
    rgb = keras.Model(image, list(maps.values()), name="rgb_encoder")
    with pytest.raises(ValueError, match="encoder model 'rgb_encoder' takes 3 input channels, the images have 1"):
        unetpp_tf.build_unetpp((32, 32, 1), depth=4, encoder=rgb)
    pooled = keras.Model(image, [maps[2], keras.layers.GlobalAveragePooling2D()(maps[32])], name="pooled")
    with pytest.raises(ValueError, match=r"encoder model 'pooled' must return feature maps"):
        unetpp_tf.build_unetpp((32, 32, 3), depth=4, encoder=pooled)
    with pytest.raises(TypeError, match="encoder must be a name from ENCODERS or a keras.Model"):
        unetpp_tf.build_unetpp((32, 32, 3), depth=4, encoder=42)
    with pytest.raises(ValueError, match="encoder_weights is for the named keras.applications encoders"):
        encoder_features(keras.Input((32, 32, 3)), rgb, weights="imagenet")


# ---------------------------------------------------------------------------------------------
# Parameter counts


def _decoder_params(channels, widths, nested: bool, depth: int = 4) -> int:
    """Hand count of the decoder over encoder maps with `channels` (strides 2..32), one class, BatchNorm.

    Node X(i, j): a 2x2 transposed conv from the node below (weights + bias) and two 3x3 convs
    without bias, each with BatchNorm (4 numbers per channel: gamma, beta, moving mean and
    variance). The head upsamples X(0, depth) to full size with widths[0] // 2 channels, refines
    with a block of that width and ends in a 1x1 conv to one class.
    """
    total = 0
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            if not nested and i + j != depth:
                continue
            below = channels[i + 1] if j == 1 else widths[i + 1]
            total += 4 * below * widths[i] + widths[i]
            skips = channels[i] + (j - 1) * widths[i] if nested else channels[i]
            total += 9 * (skips + widths[i]) * widths[i] + 9 * widths[i] ** 2 + 8 * widths[i]
    half = widths[0] // 2
    return total + 4 * widths[0] * half + half + 2 * (9 * half**2 + 4 * half) + half + 1


# encoder parameters: keras.applications.X(include_top=False, weights=None).count_params(), the
# whole backbone (the stride-32 tap is its last layer); EfficientNetB0's include its input
# Normalization's 7 numbers
PINNED = [
    # (builder, encoder, total, encoder part, channels of the taps at strides 2..32)
    ("unetpp", "mobilenetv2", 4_814_257, 2_257_984, (96, 144, 192, 576, 1280)),
    ("unetpp", "resnet50", 27_663_089, 23_587_712, (64, 256, 512, 1024, 2048)),
    ("unetpp", "efficientnetb0", 6_802_452, 4_049_571, (96, 144, 240, 672, 1280)),
    ("unet", "mobilenetv2", 4_181_377, 2_257_984, (96, 144, 192, 576, 1280)),
]


@pytest.mark.backend_independent
@pytest.mark.parametrize("builder, encoder, total, encoder_part, channels", PINNED)
def test_parameter_counts(builder, encoder, total, encoder_part, channels):
    """Depth 4, filters 16 (widths 16..256), 1 class, (None, None, 3): total = encoder + hand-counted decoder."""
    build = unetpp_tf.build_unetpp if builder == "unetpp" else unetpp_tf.build_unet
    with shapes_only():
        model = build((None, None, 3), 1, depth=4, filters=16, encoder=encoder)
    assert model.count_params() == total
    assert sum(layer.count_params() for layer in encoder_layers(model)) == encoder_part
    assert [model.get_layer(f"encoder_stage{k}").output.shape[-1] for k in range(1, 6)] == list(channels)
    assert total - encoder_part == _decoder_params(channels, (16, 32, 64, 128, 256), nested=builder == "unetpp")


# ---------------------------------------------------------------------------------------------
# Pruning, saving, freezing


@pytest.fixture(scope="module")
def ds_encoder_model():
    """A depth-2 UNet++ with deep supervision over MobileNetV3Small (its hard-swish has non-layer ops)."""
    keras.utils.set_random_seed(2)
    return unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, encoder="mobilenetv3small", deep_supervision=True)


def test_pruned_encoder_model_keeps_the_encoder_part_it_needs(ds_encoder_model, tmp_path):
    full = ds_encoder_model
    pruned = prune(full, 1)
    full_layers, pruned_layers = encoder_layers(full), encoder_layers(pruned)
    assert 0 < len(pruned_layers) < len(full_layers)
    assert {layer.name for layer in pruned_layers} < {layer.name for layer in full_layers}
    assert "encoder_stage3" not in [layer.name for layer in pruned.layers]  # head 1 reads strides 2 and 4 only
    x = _images(channels=1, size=32)
    np.testing.assert_allclose(_run(pruned, x), _run(full, x)[0], rtol=1e-6, atol=1e-6)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    np.testing.assert_allclose(_run(keras.models.load_model(path), x), _run(pruned, x))


def test_keras_round_trip_of_an_encoder_model(ds_encoder_model, tmp_path):
    path = tmp_path / "model.keras"
    ds_encoder_model.save(path)
    loaded = keras.models.load_model(path)
    x = _images(channels=1, size=32)
    for got, expected in zip(loaded.predict(x, verbose=0), ds_encoder_model.predict(x, verbose=0)):
        np.testing.assert_array_equal(got, expected)
    names = [layer.name for layer in encoder_layers(ds_encoder_model)]
    assert names and [layer.name for layer in encoder_layers(loaded)] == names
    assert isinstance(loaded.get_layer("encoder_preprocessing"), EncoderPreprocessing)
    assert size_divisor(loaded) == 8  # depth 2 over an encoder: strides up to 8


def test_frozen_encoder_uses_moving_statistics_in_training_mode():
    model = unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder="mobilenetv2", encoder_trainable=False)
    layers = encoder_layers(model)
    assert layers and not any(layer.trainable or layer.trainable_weights for layer in layers)
    assert model.trainable_weights  # the decoder trains
    tap = keras.Model(model.inputs, model.get_layer("encoder_stage3").output)
    x = _images(size=32, n=4) * 3.0  # far from the initial moving statistics (mean 0, variance 1)
    frozen_train, inference = tap(x, training=True), tap(x, training=False)
    np.testing.assert_allclose(frozen_train, inference, rtol=1e-6, atol=1e-6)
    for layer in layers:  # unfreezing (as fine-tuning does) brings batch statistics back
        layer.trainable = True
    batch_statistics = keras.ops.convert_to_numpy(tap(x, training=True))
    assert np.abs(batch_statistics - keras.ops.convert_to_numpy(inference)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# FLOPs and size divisor


@pytest.mark.backend_independent
def test_count_flops_by_hand_for_every_counted_layer_kind():
    """Multiply-adds of each layer kind on a 16x16x3 input, counted by hand (FLOPs = 2 x MACs)."""

    def build(size):
        image = keras.Input((size, size, 3))
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(image)  # 8x8: 64 * 3*3*3*4 = 6912
        x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)  # 64 * 3*3*4*2 = 4608
        x = keras.layers.SeparableConv2D(6, 3, padding="same")(x)  # 64 * (3*3*8 + 8*6) = 7680
        x = keras.layers.Conv2D(6, 3, padding="same", groups=3)(x)  # 64 * 3*3*(6/3)*6 = 6912
        x = keras.layers.Dense(5)(x)  # per position: 64 * 6*5 = 1920
        block = keras.Sequential([keras.layers.Conv2D(4, 2, strides=2), keras.layers.Conv2D(3, 1)])
        x = block(x)  # 4x4: 16 * 2*2*5*4 = 1280, then 16 * 4*3 = 192
        x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)  # each of 16 inputs scatters 2*2*3*2: 384
        return keras.Model(image, keras.layers.MaxPooling2D()(x))

    macs = 6912 + 4608 + 7680 + 6912 + 1920 + 1280 + 192 + 384
    with shapes_only():
        fixed, flexible = build(16), build(None)
    assert count_flops(fixed) == 2 * macs
    assert count_flops(flexible, (16, 16, 3)) == 2 * macs
    assert count_flops(flexible, (32, 32, 3)) == 4 * 2 * macs  # every layer scales with the pixels
    with pytest.raises(ValueError, match=r"has no fixed size; pass input_shape=\(H, W, C\)"):
        count_flops(flexible)
    assert size_divisor(flexible) == 4  # stride 2, then the nested block's stride 2


@pytest.mark.parametrize(
    "constructor, published_macs, tolerance",
    [
        # MobileNetV2 1.0 at 224: 300M multiply-adds (Sandler et al. 2018, Table 3)
        ("MobileNetV2", 300e6, 0.01),
        # ConvNeXt-T at 224: 4.5G FLOPs counted as multiply-adds (Liu et al. 2022, Table 1); most of it
        # in Dense layers on feature maps, 4% in the nested stem and downsampling blocks
        ("ConvNeXtTiny", 4.5e9, 0.02),
    ],
)
def test_count_flops_matches_published_figures(constructor, published_macs, tolerance):
    with shapes_only():
        model = getattr(keras.applications, constructor)(weights=None, input_shape=(224, 224, 3))  # with classifier
    assert count_flops(model) == pytest.approx(2 * published_macs, rel=tolerance)


@pytest.mark.backend_independent
def test_size_divisor_of_encoder_models():
    """32 at depth 4 (strides up to 32), through ConvNeXt's nested stride-4 stem and downsampling blocks."""
    with shapes_only():
        model = unetpp_tf.build_unetpp((None, None, 3), depth=4, filters=4, encoder="convnexttiny")
    assert size_divisor(model) == 32
    flops = count_flops(model, (64, 64, 3))
    assert flops > 0 and flops == 4 * count_flops(model, (32, 32, 3))  # every map scales with the pixels


def test_builders_give_a_named_encoders_batch_norm_their_own_momentum():
    # keras.applications keeps MobileNet's statistics with 0.999: far too slow for short runs
    model = unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder="mobilenetv3small", bn_momentum=0.8)
    momenta = {layer.momentum for layer in encoder_layers(model) if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.8}
