"""Post-processing in runs: chosen after training, recorded, applied by evaluate and predict (CLI)."""

import json

import keras
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from unetpp_tf.cli import main
from unetpp_tf.evaluation import evaluate
from unetpp_tf.postprocess import POSTPROCESS_FILE, read_postprocessing, write_postprocessing
from unetpp_tf.config import TrainConfig
from unetpp_tf.training import load_data, postprocessing_for_run

TRAIN = ["--num-samples", "40", "--image-size", "32", "--depth", "2", "--filters", "4", "--epochs", "1",
         "--batch-size", "8", "--min-steps", "0", "--quiet", "--no-export-saved-model", "--no-export-tflite"]


def test_train_chooses_records_and_evaluate_applies_the_steps(tmp_path, capsys):
    assert main(["train", *TRAIN, "--output-dir", str(tmp_path), "--name", "pp", "--postprocess", "auto"]) == 0
    assert "post-processing:" in capsys.readouterr().out
    run = tmp_path / "pp"
    spec = read_postprocessing(run)
    record = json.loads((run / "metrics.json").read_text())
    assert record["postprocess"]["steps"] == spec["steps"]
    assert record["postprocess"]["val_dice_after"] >= record["postprocess"]["val_dice_before"]
    # evaluate applies the run's steps by default, and scores as the run did
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    dice = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dice"]
    assert dice == pytest.approx(record["test"]["dice"], abs=1e-5)
    # steps that change the maps change the score by exactly what the library computes
    write_postprocessing(run, {"steps": [{"op": "keep_largest"}]})
    config = TrainConfig.from_dict({**json.loads((run / "config.json").read_text()), "augment": "none"})
    data = load_data(config)  # the built-in set: the same split from the run's seed
    model = keras.models.load_model(run / "model.keras", compile=False)
    expected = evaluate(model, data.test, postprocess=read_postprocessing(run))["metrics"]["dice"]
    raw = evaluate(model, data.test)["metrics"]["dice"]
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dice"] == pytest.approx(expected, abs=1e-5)
    assert main(["evaluate", "--model", str(run), "--json", "--postprocess", "none"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dice"] == pytest.approx(raw, abs=1e-5)


def test_a_run_without_postprocess_removes_a_stale_choice(tmp_path):
    write_postprocessing(tmp_path, {"steps": [{"op": "fill_holes"}]})  # left by an earlier finish of the run
    assert postprocessing_for_run(TrainConfig(postprocess="none"), data=None, model=None, run=tmp_path) is None
    assert not (tmp_path / POSTPROCESS_FILE).exists()


def _threshold_model(path):
    """A model whose mask is `image > 0.5`: a 1x1 convolution with a steep sigmoid."""
    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="output")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 50.0, "float32"), np.full((1,), -25.0, "float32")])
    model.save(path)
    return path


def test_predict_applies_the_recorded_steps_unless_told_not_to(tmp_path):
    model = _threshold_model(tmp_path / "model.keras")
    image = np.zeros((32, 32), np.uint8)
    image[2:12, 2:12] = 255  # a 100-pixel object
    image[20:23, 20:23] = 255  # a 9-pixel speck
    Image.fromarray(image).save(tmp_path / "cell.png")
    write_postprocessing(tmp_path, {"steps": [{"op": "keep_largest"}]})  # beside the model file
    assert main(["predict", "--model", str(model), str(tmp_path / "cell.png"), "--output", str(tmp_path / "a")]) == 0
    assert main(["predict", "--model", str(model), str(tmp_path / "cell.png"), "--output", str(tmp_path / "b"),
                 "--postprocess", "none"]) == 0
    kept = np.asarray(Image.open(tmp_path / "a" / "cell.png")) > 0
    raw = np.asarray(Image.open(tmp_path / "b" / "cell.png")) > 0
    assert ndimage.label(raw)[1] == 2 and raw.sum() == 109
    assert ndimage.label(kept)[1] == 1 and kept.sum() == 100 and kept[2:12, 2:12].all()


def test_a_broken_postprocess_file_is_one_line(tmp_path, capsys):
    model = _threshold_model(tmp_path / "model.keras")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "cell.png")
    (tmp_path / POSTPROCESS_FILE).write_text(json.dumps({"steps": [{"op": "smooth"}]}))
    assert main(["predict", "--model", str(model), str(tmp_path / "cell.png"), "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and POSTPROCESS_FILE in err and "smooth" in err
    assert not (tmp_path / "a").exists()
