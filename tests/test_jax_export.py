"""Export from any backend: a model trained on the backend Keras runs on exports to SavedModel, TFLite and ONNX.

On TensorFlow `export_model` converts in this process; on JAX it runs the export in a TensorFlow
child process (`unetpp_tf.export.tensorflow_process`). The same test checks whichever route
the backend takes.
"""

import json

import keras
import numpy as np
import pytest

import unetpp_tf
from unetpp_tf.export import OnnxModel, SavedModelRunner, TFLiteModel, export_model, tensorflow_process


@pytest.mark.backend_independent
def test_a_keras_file_trained_on_this_backend_exports_with_parity(tmp_path, rng):
    keras.utils.set_random_seed(3)
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4)
    model.compile(keras.optimizers.Adam(1e-2), loss=unetpp_tf.losses.BCEDiceLoss())
    images = rng.random((8, 32, 32, 1), dtype=np.float32)
    model.train_on_batch(images, (images > 0.5).astype(np.float32))
    model.save(tmp_path / "trained.keras")
    trained = keras.models.load_model(tmp_path / "trained.keras", compile=False)

    report = export_model(trained, tmp_path / "export", formats=("saved_model", "tflite", "onnx"), samples=images[:4])
    assert [(a["name"], a["format"]) for a in report["artifacts"]] == [
        ("saved_model", "saved_model"), ("model_float32", "tflite"), ("model", "onnx")]
    assert all(a["dice_agreement"] >= a["threshold"] == 0.99 for a in report["artifacts"])
    assert report["parity_images"] == 4 and report["image_size"] == [32, 32]
    assert json.loads((tmp_path / "export" / "export_report.json").read_text()) == report
    # The files agree with the model as this backend runs it, not only with the exporting process.
    expected = keras.ops.convert_to_numpy(trained(images[:2], training=False))
    tflite = TFLiteModel(tmp_path / "export" / "model_float32.tflite")
    np.testing.assert_allclose(tflite(images[:2]), expected, atol=1e-4)
    np.testing.assert_allclose(SavedModelRunner(tmp_path / "export" / "saved_model")(images[:2]), expected, atol=1e-4)
    np.testing.assert_allclose(OnnxModel(tmp_path / "export" / "model.onnx")(images[:2]), expected, atol=1e-4)
    with pytest.raises(ValueError, match="does not match the model's fixed input"):  # checked before any process
        export_model(trained, tmp_path / "other", image_size=(64, 64), samples=images)


def test_the_export_process_reports_its_errors_as_they_were(tmp_path, rng):
    model = unetpp_tf.build_unetpp((16, 16, 1), depth=2, filters=4)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "images.npz", samples_000000=rng.random((1, 16, 16, 1), dtype=np.float32))
    (tmp_path / "file.txt").write_text("x")
    request = {"model": str(tmp_path / "model.keras"), "images": str(tmp_path / "images.npz"),
               "output_dir": str(tmp_path / "file.txt"), "options": {"formats": ["saved_model"]},
               "result": str(tmp_path / "result.json")}
    (tmp_path / "request.json").write_text(json.dumps(request))
    assert tensorflow_process.main([str(tmp_path / "request.json")]) == 0
    error = json.loads((tmp_path / "result.json").read_text())["error"]
    assert error["type"] == "NotADirectoryError" and "file.txt exists and is not a folder" in error["message"]
    raised = tensorflow_process._exception(error["type"], error["message"])
    assert type(raised) is NotADirectoryError and str(raised) == error["message"]
    assert type(tensorflow_process._exception("ConverterError", "no")) is RuntimeError
