"""Training runs: config round trip, run directory, NaN stop, scoped seeds, strategies."""

import csv
import json
import random
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf.config import TrainConfig, load_config
from unetpp_tf.training import TrainingDiverged, load_data, replica_batches, train

TINY = dict(
    num_samples=40, image_size=(32, 32), depth=2, filters=4, batch_size=8, min_steps=0,
    export_saved_model=False, export_tflite=False,
)


def _history_epochs(run):
    with open(run / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_config_round_trip_json_and_yaml(tmp_path):
    config = TrainConfig(name="x", filters=(4, 8, 16), image_size=(64, 48), augmentation={"rotation": 0.1})
    assert TrainConfig.from_dict(config.to_dict()) == config
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(load_config(tmp_path / "c.json")) == config
    (tmp_path / "c.yaml").write_text("epochs: 3\nfilters: [4, 8, 16]\nloss: dice\n")
    loaded = TrainConfig.from_dict(load_config(tmp_path / "c.yaml"))
    assert loaded.epochs == 3 and loaded.filters == (4, 8, 16) and loaded.loss == "dice"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optimiser": "adam"}, r"^config: unknown setting\(s\) 'optimiser' \(did you mean 'optimizer'\?\); valid "
                                r"settings are arch, augment, augmentation, batch_norm,"),
        ({"zzz": 1, "epoch": 3}, r"unknown setting\(s\) 'epoch' \(did you mean 'epochs'\?\), 'zzz'; valid"),
        ({"loss": "l1"}, "loss must be one of auto, dice, bce_dice"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"strategy": "multiworker"}, "strategy must be one of"),
    ],
)
def test_bad_config(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_unknown_augmentation_setting(tmp_path):
    with pytest.raises(ValueError, match=r"augmentation: unknown setting\(s\) \['spin'\]; valid settings are \['flip'"):
        train(dict(TINY, output_dir=str(tmp_path), augmentation={"spin": 1}), verbose=0)
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{epochs: 3")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_train_writes_a_complete_run(tmp_path):
    run, history = train(dict(TINY, output_dir=str(tmp_path), name="run", epochs=2, deep_supervision=True), verbose=0)
    assert run == tmp_path / "run"
    for name in ("config.json", "model.keras", "history.csv", "metrics.json",
                 "figures/curves.png", "figures/predictions.png"):
        assert (run / name).is_file(), name
    assert not (run / "backup").exists()  # removed once the run finished
    assert len(history["loss"]) == 2 and {"val_output_2_dice", "val_dice"} <= set(history)
    record = json.loads((run / "metrics.json").read_text())
    assert set(record["test"]) >= {"dice", "iou", "precision", "recall", "f1", "accuracy"}
    assert record["counts"] == {"train": 28, "val": 6, "test": 6}
    # The saved model is the best epoch's by the Dice of the mean of the heads (what evaluation,
    # prediction and export use), not the last head's.
    assert record["best_val_dice"] == pytest.approx(max(history["val_dice"]), abs=1e-6)
    best = keras.models.load_model(run / "model.keras")
    data = load_data(TrainConfig(**TINY))
    assert unetpp_tf.evaluate(best, data.val)["metrics"]["dice"] == pytest.approx(record["best_val_dice"], abs=1e-5)
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())).epochs == 2
    # An existing run is never silently overwritten.
    with pytest.raises(FileExistsError, match="already exists; pass --resume"):
        train(dict(TINY, output_dir=str(tmp_path), name="run", epochs=1), verbose=0)
    with pytest.raises(ValueError, match="already finished"):
        train(dict(TINY, output_dir=str(tmp_path), name="run", epochs=2), resume=True, verbose=0)


def test_unnamed_runs_get_fresh_directories(tmp_path):
    first, _ = train(dict(TINY, output_dir=str(tmp_path), epochs=1), verbose=0)
    second, _ = train(dict(TINY, output_dir=str(tmp_path), epochs=1), verbose=0)
    assert (first.name, second.name) == ("unetpp-synthetic", "unetpp-synthetic-2")


def test_train_leaves_the_callers_random_streams_alone(tmp_path):
    random.seed(11)
    np.random.seed(11)
    tf.random.set_seed(11)
    before = (random.random(), np.random.random())
    train(dict(TINY, output_dir=str(tmp_path), num_samples=16, epochs=1, seed=5), verbose=0)
    after = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    assert (random.random(), np.random.random()) == before
    assert (random.random(), np.random.random()) == after  # the streams went on where they were
    assert tf.compat.v1.random.get_seed(1)[0] == 11  # TensorFlow's global seed is the caller's again
    tf.random.set_seed(None)


class _Diverge(keras.callbacks.Callback):
    """Make the weights blow up at the start of epoch 2, as a diverging run does."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            kernel = self.model.get_layer("x_0_0_conv1").kernel
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def test_nan_loss_stops_and_keeps_last_good_model(tmp_path):
    config = dict(TINY, output_dir=str(tmp_path), name="nan", epochs=4, augment="none")
    with pytest.raises(TrainingDiverged, match=r"loss became NaN at epoch 2, batch \d+.*last good model is"):
        train(config, callbacks=[_Diverge()], verbose=0)
    model = keras.models.load_model(tmp_path / "nan" / "model.keras")
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert _history_epochs(tmp_path / "nan")[0] == 0


def test_mirrored_step_on_two_logical_cpus_equals_the_one_device_step(tmp_path):
    """One SGD step on the same global batch of 8: two replicas of 4 give the one-device weights."""
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import json, keras, numpy as np, unetpp_tf
        from unetpp_tf.training import make_strategy

        class Weights(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.first = [np.array(w) for w in self.model.get_weights()]

            def on_train_end(self, logs=None):
                self.last = [np.array(w) for w in self.model.get_weights()]

        assert make_strategy("mirrored").num_replicas_in_sync == 2
        # 12 images: a training split of 8, one batch, one step per epoch. SGD: the step is
        # proportional to the gradient (Adam's first step would hide a wrongly scaled one).
        # No BatchNorm (per-replica statistics) and no augmentation (per-replica draws).
        config = dict({TINY!r}, output_dir={str(tmp_path)!r}, epochs=1, num_samples=12, augment="none",
                      batch_norm=False, optimizer="sgd", schedule="constant", learning_rate=0.5)
        runs = {{}}
        for strategy in ("mirrored", "one-device"):
            runs[strategy] = Weights()
            unetpp_tf.train(dict(config, name=strategy, strategy=strategy), callbacks=[runs[strategy]], verbose=0)
        for strategy, weights in runs.items():
            np.savez({str(tmp_path)!r} + f"/{{strategy}}-first.npz", *weights.first)
            np.savez({str(tmp_path)!r} + f"/{{strategy}}-last.npz", *weights.last)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = {name: np.load(tmp_path / f"{name}.npz") for name in
              ("mirrored-first", "mirrored-last", "one-device-first", "one-device-last")}
    names = loaded["one-device-last"].files
    assert len(names) > 10 and loaded["mirrored-last"].files == names
    moved = 0.0
    for name in names:
        np.testing.assert_array_equal(loaded["mirrored-first"][name], loaded["one-device-first"][name])  # same start
        np.testing.assert_allclose(loaded["mirrored-last"][name], loaded["one-device-last"][name], rtol=1e-4, atol=1e-6)
        moved = max(moved, float(np.abs(loaded["one-device-last"][name] - loaded["one-device-first"][name]).max()))
    assert moved > 1e-3  # the step changed the weights far more than the tolerance
    assert (tmp_path / "mirrored" / "metrics.json").exists()


def test_replica_batches_split_evenly_or_fail_clearly():
    data = unetpp_tf.data.synthetic(48, image_size=(16, 16), batch_size=8)
    assert data.counts["val"] == 7 and data.counts["train"] == 34
    with pytest.warns(UserWarning, match=r"the val split's 7 images do not split evenly over 2 replicas: 1 of them"):
        train_set, val_set = replica_batches(data, 8, replicas=2)
    assert [int(m.shape[0]) for _, m in val_set] == [6]
    assert train_set is data.train  # 34 images: every batch splits
    with pytest.warns(UserWarning, match="the train split's 34 images do not split evenly over 4 replicas"):
        train_set, _ = replica_batches(data, 8, replicas=4)
    assert [int(m.shape[0]) for _, m in train_set] == [8, 8, 8, 8]
    assert replica_batches(data, 8, replicas=1) == (data.train, data.val)
    with pytest.raises(ValueError, match="batch_size 8 does not split over 3 replicas; use a multiple of 3"):
        replica_batches(data, 8, replicas=3)
    with pytest.raises(ValueError, match="the val split has 7 image"):
        replica_batches(data, 16, replicas=8)


def test_plain_keras_fit_with_our_data_losses_and_metrics():
    data = unetpp_tf.data.synthetic(32, image_size=(32, 32), batch_size=8)
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True)
    model.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss(), metrics={"output_2": [unetpp_tf.metrics.Dice()]})
    history = model.fit(
        unetpp_tf.data.targets_per_head(data.train, model),
        validation_data=unetpp_tf.data.targets_per_head(data.val, model),
        epochs=1,
        verbose=0,
    ).history
    assert {"output_1_loss", "output_2_loss", "output_2_dice", "val_output_2_dice"} <= set(history)


def test_cli_end_to_end(tmp_path, capsys):
    from unetpp_tf.cli import main

    args = ["--output-dir", str(tmp_path), "--name", "e2e", "--num-samples", "40", "--image-size", "32", "--depth", "2",
            "--filters", "4", "--epochs", "1", "--batch-size", "8", "--min-steps", "0", "--quiet",
            "--no-export-saved-model", "--no-export-tflite"]
    assert main(["train", *args]) == 0
    assert "test: dice" in capsys.readouterr().out
    run = tmp_path / "e2e"
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recorded = json.loads((run / "metrics.json").read_text())["test"]
    assert set(metrics) >= {"dice", "iou", "precision", "recall", "f1", "accuracy"}
    assert metrics["dice"] == pytest.approx(recorded["dice"], abs=1e-5)  # same split, same model
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    image = (unetpp_tf.data.synthetic_sample(0, image_size=(48, 40))[0].numpy()[..., 0] * 255).astype(np.uint8)
    Image.fromarray(image).save(images / "cell.png")
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(run / "model.keras"), str(images), "--output", str(out), "--overlay"]) == 0
    mask = np.asarray(Image.open(out / "cell.png"))
    assert mask.shape == (48, 40) and set(np.unique(mask)) <= {0, 255}
    assert (out / "cell_overlay.png").exists()
    exported = tmp_path / "exported"
    assert main(["export", "--model", str(run), "--tflite", "--saved-model", "--output", str(exported)]) == 0
    table = capsys.readouterr().out
    assert "model_float32" in table and "saved_model" in table
    tflite_out = tmp_path / "tflite_masks"
    tflite = exported / "model_float32.tflite"
    assert main(["predict", "--model", str(tflite), str(images), "--output", str(tflite_out)]) == 0
    keras_tiled = tmp_path / "keras_tiled"  # the 32x32 TFLite file tiles; so must Keras to compare
    assert main(["predict", "--model", str(run), str(images), "--output", str(keras_tiled), "--tile-size", "32"]) == 0
    tiled = np.asarray(Image.open(keras_tiled / "cell.png"))
    assert np.mean(np.asarray(Image.open(tflite_out / "cell.png")) == tiled) > 0.99
    # Bad input: one line on stderr, non-zero exit, nothing written.
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "nope.keras"), str(images), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.keras does not exist" in err
    assert not (tmp_path / "x").exists()
    assert main(["train", *args]) == 2
    assert "already exists" in capsys.readouterr().err


SHORT_RUN = dict(TINY, num_samples=160, filters=8, epochs=12, learning_rate=3e-3)


@pytest.fixture(scope="module")
def baseline_dice(tmp_path_factory):
    run, _ = train(dict(SHORT_RUN, output_dir=str(tmp_path_factory.mktemp("baseline"))), verbose=0)
    return json.loads((run / "metrics.json").read_text())["test"]["dice"]


@pytest.mark.parametrize("option", [{"xla": "on"}, {"mixed_precision": "bf16"}])
def test_speed_options_reach_the_same_dice(tmp_path, baseline_dice, option):
    """Same seed, data and schedule: a speed option changes only the arithmetic."""
    assert baseline_dice > 0.7  # the short run learns the task
    run, _ = train(dict(SHORT_RUN, output_dir=str(tmp_path), **option), verbose=0)
    dice = json.loads((run / "metrics.json").read_text())["test"]["dice"]
    assert dice == pytest.approx(baseline_dice, abs=0.04)
