"""The training recipe: BatchNorm statistics in short runs, step-counted schedules, intensity checks."""

import math
import warnings

import keras
import numpy as np
import pytest

import unetpp_tf
from unetpp_tf.config import TrainConfig
from unetpp_tf.training import intensity_percentiles, load_data, preprocessing_for, training_schedule


def _inference_gap(bn_momentum: float) -> float:
    """Mean |inference-mode - training-mode| probability after 30 steps on a 28-image set."""
    keras.utils.set_random_seed(3)
    data = unetpp_tf.data.synthetic(40, image_size=(32, 32), batch_size=8, seed=3)
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, bn_momentum=bn_momentum)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=unetpp_tf.losses.BCEDiceLoss())
    model.fit(data.train.repeat(), steps_per_epoch=30, epochs=1, verbose=0)
    images, _ = next(iter(data.val))
    frozen = [v.numpy() for v in model.non_trainable_weights]
    inference = model(images, training=False).numpy()
    batch_stats = model(images, training=True).numpy()  # normalizes with the batch's own statistics
    for variable, value in zip(model.non_trainable_weights, frozen):
        variable.assign(value)
    return float(np.abs(inference - batch_stats).mean())


def test_moving_statistics_track_the_batch_after_a_short_run():
    """The collapse of issue 11: with Keras' 0.99 the moving statistics lag a short run."""
    new, old = _inference_gap(0.9), _inference_gap(0.99)
    assert new < 0.06, new
    assert old > 3 * new, (old, new)  # the old default fails this test


def test_builders_and_config_take_bn_momentum():
    model = unetpp_tf.build_unet((32, 32, 1), depth=2, filters=4, bn_momentum=0.8)
    assert {layer.momentum for layer in model.layers if layer.name.endswith(("_bn1", "_bn2"))} == {0.8}
    assert TrainConfig().bn_momentum == 0.9
    with pytest.raises(ValueError, match=r"bn_momentum must be in \[0, 1\)"):
        TrainConfig(bn_momentum=1.0)
    paper = unetpp_tf.from_preset("paper", input_shape=(96, 96, 1))
    assert paper.count_params() == 9_041_601  # the preset (no BatchNorm) is unchanged


@pytest.mark.parametrize(
    "count, batch_size, epochs, min_steps, per_epoch",
    [
        (96, 16, 40, 1000, 25),  # 6 steps per epoch would give 240 steps: stretched
        (94, 16, 40, 200, 6),  # 6 x 40 = 240 >= 200: as it is
        (10_000, 16, 40, 1000, 625),  # a large set is never stretched
        (28, 8, 2, 0, 4),  # min_steps 0 turns it off
    ],
)
def test_schedule_counts_optimizer_steps(count, batch_size, epochs, min_steps, per_epoch):
    config = TrainConfig(epochs=epochs, batch_size=batch_size, min_steps=min_steps)
    schedule = training_schedule(config, count)
    assert schedule["steps_per_epoch"] == per_epoch
    assert schedule["total_steps"] == per_epoch * epochs >= min_steps
    full = math.ceil(count / batch_size)
    assert schedule["passes_per_epoch"] == pytest.approx(per_epoch / full)
    if per_epoch > full:
        assert f"--min-steps {min_steps}" in schedule["note"] and f"{count} images" in schedule["note"]
    else:
        assert schedule["note"] is None


def test_dataset_normalization_and_dim_image_warning():
    dim = unetpp_tf.data.from_arrays(
        (np.random.default_rng(0).random((20, 16, 16, 1)) * 600).astype(np.uint16),
        np.zeros((20, 16, 16, 1), np.uint8), batch_size=4,
    )
    levels = intensity_percentiles(dim.train)
    assert levels[99.0] < 600 / 65535 < 0.01
    config = TrainConfig(data="my_folder", normalize="dataset")
    settings = preprocessing_for(config, dim)
    assert settings["normalize"] == "dataset" and settings["resize"] == "resize"
    assert settings["low"] == pytest.approx(levels[1.0]) and settings["high"] == pytest.approx(levels[99.8])
    with pytest.warns(UserWarning, match="almost black.*--normalize dataset"):
        preprocessing_for(TrainConfig(data="my_folder", normalize="fixed"), dim)
    bright = unetpp_tf.data.synthetic(20, image_size=(16, 16), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full-range images: no warning
        settings = preprocessing_for(TrainConfig(normalize="fixed", image_size=(16, 16)), bright)
    assert settings == {"normalize": "fixed", "image_size": (16, 16), "resize": "none"}


def test_cli_says_when_the_schedule_is_stretched_and_warns_on_dim_images(tmp_path, capfd):
    from PIL import Image

    from unetpp_tf.cli import main

    data = tmp_path / "tiles"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    for k in range(12):  # 16-bit TIFFs holding values up to 500 of 65535
        image, mask = unetpp_tf.data.synthetic_sample(k, image_size=(32, 32))
        Image.fromarray((image.numpy()[..., 0] * 500).astype(np.uint16)).save(data / "images" / f"t{k}.tif")
        Image.fromarray((mask.numpy()[..., 0] * 255).astype(np.uint8)).save(data / "masks" / f"t{k}.png")
    args = ["train", "--data", str(data), "--output-dir", str(tmp_path), "--name", "dim", "--image-size", "32",
            "--depth", "2", "--filters", "4", "--batch-size", "4", "--epochs", "2", "--min-steps", "10",
            "--normalize", "fixed", "--no-export-saved-model", "--no-export-tflite", "--quiet"]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "unetpp-tf: small training split: 8 images give 2 step(s) per epoch, 4 in 2 epochs; each epoch runs 5" in err
    warning = [line for line in err.splitlines() if line.startswith("unetpp-tf: warning: with --normalize fixed")]
    assert len(warning) == 1 and "almost black" in warning[0] and "--normalize dataset" in warning[0]
    history = (tmp_path / "dim" / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header + the 2 epochs asked for, each of 5 steps
    # Tiles already at --image-size: predict keeps new images at their native scale.
    settings = unetpp_tf.model_preprocessing(keras.models.load_model(tmp_path / "dim" / "model.keras"))
    assert settings["resize"] == "none" and settings["normalize"] == "fixed" and settings["image_size"] == [32, 32]
    smaller = TrainConfig(data=str(data), image_size=(16, 16), batch_size=4)
    assert preprocessing_for(smaller, load_data(smaller))["resize"] == "resize"
