"""Export: SavedModel and TFLite artifacts, parity with Keras, padding signatures, runners."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf import inference
from unetpp_tf.export import SavedModelRunner, TFLiteModel, export_model, exporter, format_report
from tiny_models import fit_deep_supervision

ALL_QUANT = ("none", "float16", "dynamic", "int8")


def _listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


@pytest.fixture(scope="module")
def data():
    return unetpp_tf.data.synthetic(96, image_size=(32, 32), batch_size=16)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny deep-supervision UNet++ trained long enough to predict both classes."""
    return fit_deep_supervision(data, epochs=5)


@pytest.fixture(scope="module")
def test_images(data):
    return np.concatenate([x for x, _ in data.test.as_numpy_iterator()])


@pytest.fixture(scope="module")
def reference(trained, test_images):
    return unetpp_tf.inference_model(trained).predict(test_images, verbose=0)


@pytest.fixture(scope="module")
def dynamic_twin(trained):
    """The trained model's weights in a None x None model: its SavedModel takes any size."""
    dynamic = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4, deep_supervision=True)
    dynamic.set_weights(trained.get_weights())
    return inference.as_single_output(dynamic)


@pytest.fixture(scope="module")
def dynamic_export(dynamic_twin, data, tmp_path_factory):
    """SavedModel (dynamic size) and a float32 TFLite file at 30x35, not divisible by 4."""
    out = tmp_path_factory.mktemp("export") / "dynamic"
    return out, export_model(dynamic_twin, out, image_size=(30, 35), samples=data.test)


def _padded_reference(model, images):
    """What the model gives on images reflection-padded (centred) to a multiple of 4, cropped back."""
    height, width = images.shape[1:3]
    dh, dw = -height % 4, -width % 4
    padded = np.pad(images, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)), mode="reflect")
    probabilities = keras.ops.convert_to_numpy(model(padded, training=False))
    return probabilities[:, dh // 2 : dh // 2 + height, dw // 2 : dw // 2 + width]


def _odd_size(images):
    """30 x 35 crops (height and width not divisible by 4) of images widened with their mirror image."""
    return np.concatenate([images, images[:, :, ::-1]], axis=2)[:, 1:31, :35]


@pytest.fixture(scope="module")
def full_export(trained, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "full"
    report = export_model(
        trained, out, formats=("saved_model", "tflite", "keras"), quantize=ALL_QUANT,
        calibration=data.val, samples=data.test,
    )
    return out, report


def _label_agreement(a, b):
    return float(((a >= 0.5) == (b >= 0.5)).mean())


def _dice_agreement(reference, outputs):
    """Mean per-image Dice of the thresholded maps, written out in NumPy (1.0 when both are empty)."""
    scores = []
    for ref, out in zip(reference, outputs):
        a, b = ref >= 0.5, out >= 0.5
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2.0 * (a & b).sum() / total)
    return float(np.mean(scores))


def _runner(artifact):
    if artifact["format"] == "keras":
        model = inference.load_model(artifact["path"])
        return lambda x: model.predict(x, verbose=0)
    return inference.load_model(artifact["path"])


def test_report_agrees_with_an_independent_parity_run(full_export, reference, test_images):
    out, report = full_export
    by_name = {a["name"]: a for a in report["artifacts"]}
    assert set(by_name) == {
        "saved_model", "model_float32", "model_float16", "model_dynamic", "model_int8", "model_inference"
    }
    assert report["image_size"] == [32, 32] and report["mode"] == "accurate" and report["level"] is None
    assert report["parity_images"] == len(test_images) == 14  # every test image (fewer than max_samples)
    for artifact in report["artifacts"]:
        outputs = _runner(artifact)(test_images)
        assert artifact["dice_agreement"] == pytest.approx(_dice_agreement(reference, outputs), abs=2e-6)
        diff = float(np.abs(outputs - reference).max())
        assert artifact["max_abs_diff"] == pytest.approx(diff, rel=6e-3, abs=1e-6), artifact["name"]  # 3 digits
        assert artifact["size_bytes"] == sum(f.stat().st_size for f in _files(artifact["path"]))
    assert by_name["model_float32"]["max_abs_diff"] < 1e-4
    assert by_name["saved_model"]["max_abs_diff"] < 1e-4
    assert by_name["model_int8"]["max_abs_diff"] > 1e-3  # quantized: the numbers did move
    assert by_name["model_int8"]["size_bytes"] < by_name["model_float32"]["size_bytes"]
    assert by_name["model_float16"]["size_bytes"] < by_name["model_float32"]["size_bytes"]
    assert json.loads((out / "export_report.json").read_text()) == report
    assert sorted(os.listdir(out)) == sorted(
        ["export_report.json", "saved_model", "model_inference.keras"]
        + [f"model_{q}.tflite" for q in ("float32", "float16", "dynamic", "int8")]
    )
    table = format_report(report)
    row = next(line for line in table.splitlines() if line.startswith("model_int8"))
    assert f"{by_name['model_int8']['dice_agreement']:.4f}" in row and "0.97" in row and row.endswith("yes")


def _files(path):
    path = Path(path)
    return [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]


def test_saved_model_runs_without_unetpp_tf(full_export, dynamic_export, dynamic_twin, test_images, tmp_path):
    pixels = np.round(test_images[:4] * 255).astype(np.uint8)
    odd = _odd_size(pixels[:2])  # 30 x 35: the signature pads to 32 x 36 and crops back
    np.savez(tmp_path / "pixels.npz", pixels=pixels, odd=odd)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        given = np.load({str(tmp_path / "pixels.npz")!r})
        serve = tf.saved_model.load({str(full_export[0] / "saved_model")!r}).signatures["serving_default"]
        result = serve(images=tf.constant(given["pixels"]))
        dynamic = tf.saved_model.load({str(dynamic_export[0] / "saved_model")!r}).signatures["serving_default"]
        odd = dynamic(images=tf.constant(given["odd"]))["probabilities"].numpy()
        assert "unetpp_tf" not in sys.modules
        np.savez({str(tmp_path / "result.npz")!r}, keys=sorted(result), odd=odd,
                 probabilities=result["probabilities"].numpy(), labels=result["labels"].numpy())
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = np.load(tmp_path / "result.npz")
    assert list(result["keys"]) == ["labels", "probabilities"]
    assert result["probabilities"].shape == (4, 32, 32, 1) and result["probabilities"].dtype == np.float32
    assert result["labels"].shape == (4, 32, 32) and result["labels"].dtype == np.uint8
    model = keras.saving.load_model(full_export[0] / "model_inference.keras")
    expected = model.predict(pixels.astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(result["probabilities"], expected, atol=1e-4)
    np.testing.assert_array_equal(result["labels"], (result["probabilities"][..., 0] >= 0.5).astype(np.uint8))
    assert result["odd"].shape == (2, 30, 35, 1)
    np.testing.assert_allclose(result["odd"], _padded_reference(dynamic_twin, odd / np.float32(255)), atol=1e-5)


def test_saved_model_runner_matches_keras(full_export, reference, test_images):
    runner = SavedModelRunner(full_export[0] / "saved_model")
    assert runner.input_shape == (None, 32, 32, 1) and runner.num_classes == 1
    assert runner.metadata["size_divisor"] == 4 and runner.metadata["mode"] == "accurate"  # depth 2
    assert tuple(runner.inputs[0].shape) == (None, 32, 32, 1) and len(runner.outputs) == 1
    np.testing.assert_allclose(runner(test_images), reference, atol=1e-4)
    np.testing.assert_allclose(runner.predict(test_images[:3], batch_size=2), reference[:3], atol=1e-4)
    with pytest.raises(ValueError, match=r"saved_model takes images of height 32.*unetpp_tf.predict"):
        runner(np.zeros((1, 30, 32, 1), np.float32))


def test_odd_sizes_are_padded_in_the_signature_and_the_tflite_file(dynamic_export, dynamic_twin, test_images):
    out, report = dynamic_export
    assert report["image_size"] == [30, 35]
    odd = _odd_size(test_images[:3])
    expected = _padded_reference(dynamic_twin, odd)
    runner = SavedModelRunner(out / "saved_model")
    assert runner.input_shape == (None, None, None, 1) and runner.metadata["pads_to_divisor"]
    assert runner.size_divisor == 1 and runner.metadata["size_divisor"] == 4
    np.testing.assert_allclose(runner(odd), expected, atol=1e-5)
    lite = TFLiteModel(out / "model_float32.tflite")
    assert lite.input_shape == (None, 30, 35, 1)
    np.testing.assert_allclose(lite(odd), expected, atol=1e-4)
    np.testing.assert_allclose(inference.predict(dynamic_twin, odd), expected, atol=1e-5)
    np.testing.assert_allclose(inference.predict(runner, odd), expected, atol=1e-5)
    assert runner(np.zeros((2, 64, 48, 1), np.float32)).shape == (2, 64, 48, 1)


@pytest.mark.parametrize("name, agreement", [("model_float32", 0.999), ("model_int8", 0.97)])
def test_tflite_model_matches_keras(full_export, reference, test_images, data, name, agreement):
    lite = TFLiteModel(full_export[0] / f"{name}.tflite")
    probabilities = lite(test_images)
    assert probabilities.shape == reference.shape and probabilities.dtype == np.float32
    assert lite.input_shape == (None, 32, 32, 1) and lite.num_classes == 1
    assert tuple(lite.outputs[0].shape) == (None, 32, 32, 1) and lite.name == name
    np.testing.assert_array_equal(lite.predict_on_batch(test_images[:2]), probabilities[:2])
    assert _label_agreement(probabilities, reference) >= agreement
    np.testing.assert_allclose(lite.predict(data.test), probabilities, atol=1e-6)  # a dataset works too
    if name == "model_int8":
        assert lite.input_dtype == np.uint8
        scale, zero_point = lite.input_quantization
        assert scale == pytest.approx(1 / 255) and zero_point == 0  # raw 8-bit pixels go in
    else:
        assert lite.input_dtype == np.float32 and lite.input_quantization is None
        np.testing.assert_allclose(probabilities, reference, atol=1e-4)
    message = (rf"{name}.tflite takes 32x32 images \(a fixed size\), got 16x24\. Resize .*image_size=\(32, 32\).*"
               r"unetpp_tf.predict.*--image-size 16 24")
    with pytest.raises(ValueError, match=message):
        lite(np.zeros((1, 16, 24, 1), np.float32))


def test_pruned_export(trained, data, full_export, test_images, tmp_path):
    report = export_model(trained, tmp_path, mode="fast", level=1, quantize=("none", "int8"),
                          calibration=data.val, samples=data.test)
    by_name = {a["name"]: a for a in report["artifacts"]}
    assert set(by_name) == {"saved_model_L1", "model_L1_float32", "model_L1_int8"}
    assert report["level"] == 1 and report["mode"] == "fast"
    full = {a["name"]: a for a in full_export[1]["artifacts"]}
    assert by_name["model_L1_float32"]["size_bytes"] < full["model_float32"]["size_bytes"]
    expected = unetpp_tf.prune(trained, 1).predict(test_images, verbose=0)
    np.testing.assert_allclose(TFLiteModel(tmp_path / "model_L1_float32.tflite")(test_images), expected, atol=1e-4)
    runner = SavedModelRunner(tmp_path / "saved_model_L1")
    np.testing.assert_allclose(runner(test_images), expected, atol=1e-4)
    assert runner.metadata["level"] == 1 and runner.metadata["size_divisor"] == 2  # L1 pools once


def _inverted(write):
    """Wrap an artifact writer so it writes the model 1 - p instead: a broken conversion."""

    def broken(model, *args, **kwargs):
        flipped = keras.layers.Rescaling(-1.0, offset=1.0)(model.outputs[0])
        return write(keras.Model(model.inputs[0], flipped), *args, **kwargs)

    return broken


def test_a_broken_artifact_fails_parity_and_leaves_nothing_behind(trained, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model_float32.tflite").write_bytes(b"an older export")
    before, parent_before = _listing(out), _listing(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(exporter, "write_tflite_source", _inverted(exporter.write_tflite_source))
        with pytest.raises(ValueError, match="parity") as info:
            export_model(trained, out, formats="tflite", samples=data.test)
    message = str(info.value)
    assert "model_float32: Dice agreement 0.0" in message
    assert f"nothing was written to {out}" in message and "thresholds={'none': 0.0" in message
    assert _listing(out) == before and _listing(tmp_path) == parent_before
    assert (out / "model_float32.tflite").read_bytes() == b"an older export"
    assert (out / "notes.txt").read_text() == "keep me"
    with monkeypatch.context() as patch:
        patch.setattr(exporter, "write_saved_model", _inverted(exporter.write_saved_model))
        with pytest.raises(ValueError, match=r"saved_model: Dice agreement 0\.0"):
            export_model(trained, tmp_path / "new" / "export", formats="saved_model", samples=data.test)
    assert _listing(tmp_path) == parent_before  # not even the parent folder is created


def test_unwritable_output_is_a_clear_error(trained, data, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    before = _listing(tmp_path)
    with pytest.raises(NotADirectoryError, match="file.txt is a file, not a folder"):
        export_model(trained, blocker / "export", samples=data.test)
    with pytest.raises(NotADirectoryError, match="file.txt exists and is not a folder"):
        export_model(trained, blocker, samples=data.test)
    assert _listing(tmp_path) == before and blocker.read_text() == "x"


def test_argument_errors(trained, data, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        export_model(trained, tmp_path / "a", quantize="int8", samples=data.test)
    with pytest.raises(ValueError, match="samples="):
        export_model(trained, tmp_path / "b")
    with pytest.raises(ValueError, match="unknown quantize"):
        export_model(trained, tmp_path / "c", quantize="int4", samples=data.test)
    with pytest.raises(ValueError, match="does not match the model's fixed input"):
        export_model(trained, tmp_path / "d", image_size=(64, 64), samples=data.test)
    dynamic = unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4, deep_supervision=True)
    with pytest.raises(ValueError, match="image_size=\\(height, width\\)"):
        export_model(dynamic, tmp_path / "e", samples=data.test)
    assert _listing(tmp_path) == []


def test_multiclass_labels_are_argmax(tmp_path, rng):
    keras.utils.set_random_seed(2)
    model = unetpp_tf.build_unetpp((16, 16, 3), num_classes=3, depth=2, filters=4)
    images = rng.random((3, 16, 16, 3), dtype=np.float32)
    report = export_model(model, tmp_path, formats="saved_model", samples=[images])
    assert report["num_classes"] == 3
    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    result = serve(images=tf.constant((images * 255).astype(np.uint8)))
    assert result["probabilities"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(result["labels"].numpy(), np.argmax(result["probabilities"].numpy(), -1))


def test_mixed_precision_model_converts_to_builtin_tflite_in_float32(tmp_path, rng):
    # TFLite has no bfloat16 kernels: the file is converted from a float32 copy of the model
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = unetpp_tf.build_unetpp((16, 16, 1), depth=2, filters=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("x_0_0_conv1").compute_dtype == "bfloat16"
    images = rng.random((3, 16, 16, 1), dtype=np.float32)
    report = export_model(model, tmp_path, formats="tflite", samples=[images])
    (entry,) = [a for a in report["artifacts"] if a["format"] == "tflite"]
    assert entry["custom_ops"] == [] and entry["dice_agreement"] >= 0.99
    assert entry["max_abs_diff"] < 0.02  # bfloat16 Keras against the float32 file


def test_flex_op_is_refused_with_its_name(tmp_path, rng):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: tf.math.cumprod(0.5 + 0.5 * t, axis=1))(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))
    with pytest.raises(ValueError, match="Cumprod.*allow_flex"):
        export_model(model, tmp_path / "out", formats="tflite", samples=[rng.random((2, 8, 8, 1), dtype=np.float32)])
    assert _listing(tmp_path) == []


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_model_falls_back_to_tf_lite_with_a_warning(full_export, reference, test_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # as if not installed
    with pytest.warns(UserWarning, match="pip install ai-edge-litert"):
        lite = TFLiteModel(full_export[0] / "model_float32.tflite")
    np.testing.assert_allclose(lite(test_images[:2]), reference[:2], atol=1e-4)
