"""ONNX export: parity in onnxruntime, the report entry, OnnxModel in load_model / evaluate / predict_files,
pruned heads, volumes, free sizes padded in the graph, all-or-nothing writes and clear errors."""

import json
import os
import sys

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from PIL import Image

import unetpp_tf
from unetpp_tf import inference
from unetpp_tf.export import export_model, exporter, format_report
from unetpp_tf.export.conversion import padded_forward
from unetpp_tf.export.onnx_format import onnx_friendly
from unetpp_tf.runners import OnnxModel
from unetpp_tf.volume_inference import predict_volume
from tiny_models import fit_deep_supervision

PREPROCESSING = {"normalize": "minmax", "image_size": (32, 32), "resize": "resize"}


def _listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


@pytest.fixture(scope="module")
def data():
    return unetpp_tf.data.synthetic(48, image_size=(32, 32), batch_size=8)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny deep-supervision UNet++ (per-image min-max normalization in its graph) that predicts both classes."""
    return fit_deep_supervision(data, epochs=4, preprocessing=PREPROCESSING)


def _images(data):
    return np.concatenate([x for x, _ in data.test.as_numpy_iterator()])


@pytest.fixture(scope="module")
def exported(trained, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    return out, export_model(trained, out, formats=("onnx",), samples=data.test)


def _dice(reference, outputs):
    """Mean per-image Dice of the thresholded maps in NumPy (1.0 when both are empty)."""
    scores = []
    for ref, out in zip(reference, outputs):
        a, b = ref >= 0.5, out >= 0.5
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2.0 * (a & b).sum() / total)
    return float(np.mean(scores))


def test_onnx_file_agrees_with_keras_and_reports_it(exported, trained, data):
    out, report = exported
    assert _listing(out) == ["export_report.json", "model.onnx"]
    (entry,) = report["artifacts"]
    assert (entry["name"], entry["format"], entry["quantize"], entry["threshold"]) == ("model", "onnx", "none", 0.99)
    assert entry["path"] == str(out / "model.onnx") and entry["size_bytes"] == (out / "model.onnx").stat().st_size
    assert entry["dice_agreement"] >= 0.99 and entry["max_abs_diff"] < 1e-4 and entry["latency_ms"] > 0
    assert entry["opset"] == 17 and entry["custom_ops"] == [] and entry["float_ops"] is None
    assert {"Conv", "ConvTranspose", "MaxPool", "Sigmoid"} <= set(entry["ops"])
    assert report["parity_images"] == len(_images(data)) and report["image_size"] == [32, 32]
    assert json.loads((out / "export_report.json").read_text()) == report

    # An independent run in a plain onnxruntime session, without unetpp_tf's runner.
    images = _images(data)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.type, given.shape[1:]) == ("images", "tensor(float)", [32, 32, 1])
    assert returned.name == "probabilities" and isinstance(given.shape[0], str)  # dynamic batch
    probabilities = session.run(None, {"images": images})[0]
    reference = unetpp_tf.inference_model(trained).predict(images, verbose=0)
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)
    assert 0.1 < (reference >= 0.5).mean() < 0.9 and _dice(reference, probabilities) >= 0.99
    assert abs(_dice(reference, probabilities) - entry["dice_agreement"]) < 1e-3

    stored = json.loads({p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}["unetpp_tf"])
    assert (stored["mode"], stored["level"], stored["num_classes"], stored["size_divisor"]) == ("accurate", None, 1, 4)
    assert stored["preprocessing"]["normalize"] == "minmax" and stored["preprocessing"]["image_size"] == [32, 32]

    table = format_report(report)
    row = next(line for line in table.splitlines() if line.startswith("model "))
    assert row.split()[:3] == ["model", "onnx", "none"] and row.split()[-1] == "yes"
    assert "model.onnx: opset 17, input 'images' float32 channels last" in table


def test_load_model_evaluate_and_predict_files_run_the_onnx_file(exported, trained, data, tmp_path):
    out, _ = exported
    runner = inference.load_model(out / "model.onnx")
    assert isinstance(runner, OnnxModel) and runner.input_shape == (None, 32, 32, 1)
    assert runner.output_shape == (None, 32, 32, 1) and runner.num_classes == 1 and runner.size_divisor == 1
    assert runner.preprocessing["resize"] == "resize" and runner.metadata["mode"] == "accurate"
    keras_scores = unetpp_tf.evaluate(trained, data.test)["metrics"]
    onnx_scores = unetpp_tf.evaluate(out / "model.onnx", data.test)["metrics"]
    assert onnx_scores["images"] == keras_scores["images"] == len(_images(data))
    for key in ("dice", "iou", "accuracy"):
        assert abs(onnx_scores[key] - keras_scores[key]) < 1e-3, key
    np.testing.assert_allclose(runner.predict(data.test, batch_size=3), runner(_images(data)), atol=1e-6)

    # predict_files follows the training size recorded in the file: 48x40 images are resized to 32x32.
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray((rng.random((48, 40)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    by_keras = inference.predict_files(trained, [folder], tmp_path / "keras")
    by_onnx = inference.predict_files(str(out / "model.onnx"), [folder], tmp_path / "onnx")
    for a, b in zip(by_keras, by_onnx):
        mask = np.asarray(Image.open(b))
        assert a.name == b.name and mask.shape == (48, 40)
        assert (np.asarray(Image.open(a)) == mask).mean() > 0.999


def test_fast_mode_head_and_mixed_formats(trained, data, exported, tmp_path):
    report = export_model(trained, tmp_path, formats=("saved_model", "tflite", "onnx"), mode="fast", level=1,
                          samples=data.test)
    by_name = {a["name"]: a for a in report["artifacts"]}
    assert [a["name"] for a in report["artifacts"]] == ["saved_model_L1", "model_L1_float32", "model_L1"]
    assert by_name["model_L1"]["format"] == "onnx" and (tmp_path / "model_L1.onnx").is_file()
    assert all(a["dice_agreement"] >= a["threshold"] for a in report["artifacts"])
    assert by_name["model_L1"]["size_bytes"] < exported[1]["artifacts"][0]["size_bytes"]  # the pruned head is smaller
    runner = OnnxModel(tmp_path / "model_L1.onnx")
    assert (runner.metadata["mode"], runner.metadata["level"], runner.metadata["size_divisor"]) == ("fast", 1, 2)
    images = _images(data)
    expected = unetpp_tf.prune(trained, 1).predict(images, verbose=0)
    np.testing.assert_allclose(runner(images), expected, atol=1e-4)
    np.testing.assert_allclose(runner(images), inference.load_model(tmp_path / "saved_model_L1")(images), atol=1e-5)


def test_free_sizes_are_padded_in_the_graph(trained, data, tmp_path):
    dynamic = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4, deep_supervision=True,
                                     preprocessing=PREPROCESSING)
    dynamic.set_weights(trained.get_weights())
    single = inference.as_single_output(dynamic)
    report = export_model(dynamic, tmp_path, formats="onnx", samples=data.test)
    assert report["image_size"] == [32, 32]  # the recorded training size: the parity images' size
    runner = OnnxModel(tmp_path / "model.onnx", num_threads=1)
    assert runner.input_shape == (None, None, None, 1)
    odd = np.concatenate([_images(data), _images(data)[:, :, ::-1]], axis=2)[:3, 1:31, :35]  # 30 x 35
    expected = np.asarray(padded_forward(single)(odd))
    assert expected.shape == (3, 30, 35, 1)
    np.testing.assert_allclose(runner(odd), expected, atol=1e-4)
    np.testing.assert_allclose(unetpp_tf.predict(runner, odd), expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"model.onnx takes 1-channel inputs, got 3 channel\(s\)"):
        runner(np.zeros((1, 30, 35, 3), np.float32))


def test_volume_model_exports(tmp_path):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(1)
    model = unetpp_tf.build_unetpp((8, 16, 16, 1), depth=2, filters=4, deep_supervision=True,
                                   pool_sizes=[(1, 2, 2), 2])
    volumes = rng.random((3, 8, 16, 16, 1), dtype=np.float32)
    report = export_model(model, tmp_path, formats=("onnx",), samples=volumes)
    (entry,) = report["artifacts"]
    assert entry["dice_agreement"] >= 0.99 and report["image_size"] == [8, 16, 16]
    assert {"Conv", "ConvTranspose", "MaxPool"} <= set(entry["ops"])
    runner = inference.load_model(tmp_path / "model.onnx")
    assert runner.input_shape == (None, 8, 16, 16, 1) and runner.output_shape == (None, 8, 16, 16, 1)
    expected = unetpp_tf.inference_model(model).predict(volumes, verbose=0)
    np.testing.assert_allclose(runner(volumes), expected, atol=1e-5)
    np.testing.assert_allclose(runner(volumes[0]), expected[:1], atol=1e-5)  # one volume [D, H, W, C]
    with pytest.raises(ValueError, match="model.onnx takes inputs of width 16"):
        runner(np.zeros((1, 8, 16, 8, 1), np.float32))
    scan = rng.random((10, 24, 20, 1), dtype=np.float32)  # larger than the file's input: sliding windows
    np.testing.assert_allclose(predict_volume(runner, scan), predict_volume(model, scan), atol=1e-4)


def _inverted(convert):
    """Wrap the ONNX conversion so it converts the model 1 - p instead: a broken conversion."""

    def broken(model, *args, **kwargs):
        flipped = keras.layers.Rescaling(-1.0, offset=1.0)(model.outputs[0])
        return convert(keras.Model(model.inputs[0], flipped), *args, **kwargs)

    return broken


def test_failed_parity_or_conversion_leaves_the_folder_as_it_was(trained, data, tmp_path, monkeypatch, rng):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model.onnx").write_bytes(b"an older export")
    before, parent_before = _listing(out), _listing(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(exporter, "convert_to_onnx", _inverted(exporter.convert_to_onnx))
        with pytest.raises(ValueError, match="parity") as info:
            export_model(trained, out, formats=("saved_model", "onnx"), samples=data.test)
    message = str(info.value)
    assert "model: Dice agreement 0.0" in message and "saved_model:" not in message.split("\n")[0]
    assert f"nothing was written to {out}" in message and "thresholds={'onnx': 0.0" in message
    assert _listing(out) == before and _listing(tmp_path) == parent_before
    assert (out / "model.onnx").read_bytes() == b"an older export" and (out / "notes.txt").read_text() == "keep me"

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: tf.math.igamma(1.5 + t, 0.5 + t), name="special_function")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))
    with pytest.raises(ValueError, match=r"Igamma \(in layer 'special_function'\).*formats=\('saved_model'"):
        export_model(model, tmp_path / "new", formats="onnx", samples=[rng.random((2, 8, 8, 1), dtype=np.float32)])
    assert _listing(tmp_path) == parent_before


def test_unreadable_files_and_a_missing_runtime_are_one_line_errors(exported, trained, data, tmp_path, monkeypatch):
    for name, content in (("text.onnx", b"not an onnx model"), ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(inference.ModelFileError, match=rf"{name} is not a readable ONNX model") as info:
            inference.load_model(tmp_path / name)
        assert "\n" not in str(info.value) and "export it again" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        OnnxModel(tmp_path / "missing.onnx")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r'^running model.onnx needs onnxruntime: pip install "unetpp-tf\[onnx\]"$'):
        inference.load_model(exported[0] / "model.onnx")
    with pytest.raises(ImportError, match=r'^ONNX export needs onnxruntime: pip install "unetpp-tf\[onnx\]"$'):
        export_model(trained, tmp_path / "export", formats=("tflite", "onnx"), samples=data.test)
    assert not (tmp_path / "export").exists()


@pytest.mark.slow  # builds ConvNeXt-Tiny and EfficientNet-B0 encoders
@pytest.mark.parametrize("encoder", ["convnexttiny", "efficientnetb0"])
def test_encoders_that_need_rewrites_convert_exactly(encoder, tmp_path, rng):
    # ConvNeXt: depthwise Conv2D(groups=C) runs as an XLA function and exact GELU uses erfc;
    # EfficientNet: Normalization holds its mean and variance as captured constants.
    model = unetpp_tf.build_unetpp((32, 32, 3), depth=2, filters=4, encoder=encoder)
    if encoder == "convnexttiny":
        friendly = onnx_friendly(model)
        depthwise = [layer for layer in friendly.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
        assert len(depthwise) == sum(isinstance(layer, keras.layers.Conv2D) and layer.groups > 1
                                     for layer in model.layers) > 0
    images = rng.random((3, 32, 32, 3), dtype=np.float32)
    report = export_model(model, tmp_path, formats="onnx", samples=images)
    (entry,) = report["artifacts"]
    assert entry["custom_ops"] == [] and entry["max_abs_diff"] < 1e-4
    runner = OnnxModel(tmp_path / "model.onnx")
    assert [i.name for i in runner._session.get_inputs()] == ["images"]
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(runner(images), expected, atol=1e-4)
