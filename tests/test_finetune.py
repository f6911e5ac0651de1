"""Pretrained encoders in training: the CLI, the frozen first phase, resume across it, bad flags."""

import csv
import json

import keras
import numpy as np
import pytest
from PIL import Image

import unetpp_tf
from unetpp_tf.checkpoints import read_backup, read_history_rows
from unetpp_tf.cli import main
from unetpp_tf.config import TrainConfig
from unetpp_tf.models import encoder_layers, size_divisor
from unetpp_tf.training import model_from_config, run_finished, train, training_phases
from run_control import FinalState, Interrupted, StopAfter, assert_same_state

ENCODER = "mobilenetv3small"
TINY = dict(
    encoder=ENCODER, num_samples=24, image_size=(32, 32), depth=2, filters=4, batch_size=8, min_steps=0,
    export_saved_model=False, export_tflite=False,
)
QUIET = ["--quiet", "--no-export-saved-model", "--no-export-tflite"]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A weights file of the encoder, as `save_weights` writes it (random, but not the model's own draw)."""
    path = tmp_path_factory.mktemp("weights") / f"{ENCODER}.weights.h5"
    keras.utils.set_random_seed(5)
    backbone = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(None, None, 3), include_preprocessing=False
    )
    backbone.save_weights(path)
    return str(path)


def _plain(trainer):
    """The segmentation model inside `fit`'s model (the device-augmentation wrapper holds it as `.model`)."""
    return getattr(trainer, "model", trainer)


def _values(layers):
    return [np.array(w) for layer in layers for w in layer.get_weights()]


def _changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(before, after))


class _EpochWeights(keras.callbacks.Callback):
    """Keep the encoder's and the decoder's weights before training and after each epoch."""

    def on_train_begin(self, logs=None):
        if hasattr(self, "encoder"):  # the second phase's fit: same layers
            return
        model = _plain(self.model)
        self.encoder = encoder_layers(model)
        names = {layer.name for layer in self.encoder}
        self.decoder = [layer for layer in model.layers if layer.weights and layer.name not in names]
        self.snapshots = [(_values(self.encoder), _values(self.decoder))]
        self.trainable = []

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append((_values(self.encoder), _values(self.decoder)))
        self.trainable.append([layer.trainable for layer in self.encoder])


def test_training_phases_freeze_then_fine_tune_at_a_lower_rate():
    config = TrainConfig(encoder=ENCODER, epochs=10, freeze_encoder_epochs=3, learning_rate=2e-3)
    frozen, tune = training_phases(config)
    assert (frozen.name, frozen.first_epoch, frozen.end_epoch, frozen.encoder_frozen) == ("frozen_encoder", 0, 3, True)
    assert (tune.name, tune.first_epoch, tune.end_epoch, tune.encoder_frozen) == ("fine_tune", 3, 10, False)
    assert frozen.learning_rate == 2e-3 and tune.learning_rate == pytest.approx(2e-4)
    assert [p.name for p in training_phases(TrainConfig(encoder=ENCODER, epochs=3, freeze_encoder_epochs=3))] == [
        "frozen_encoder"]
    assert [(p.name, p.end_epoch) for p in training_phases(TrainConfig(epochs=4))] == [("train", 4)]


def test_frozen_phase_keeps_the_encoder_and_trains_the_decoder(tmp_path, weights_file):
    watch = _EpochWeights()
    config = dict(TINY, output_dir=str(tmp_path), name="f", epochs=2, freeze_encoder_epochs=1,
                  encoder_weights=weights_file)
    run, history = train(config, callbacks=[watch], verbose=0)
    (encoder_0, decoder_0), (encoder_1, decoder_1), (encoder_2, _) = watch.snapshots
    assert len(encoder_0) > 50 and len(decoder_0) > 10
    # epoch 1: every encoder weight (kernels and BatchNorm statistics alike) as loaded; the decoder trained
    assert all(np.array_equal(a, b) for a, b in zip(encoder_0, encoder_1))
    assert _changed(decoder_0, decoder_1)
    # epoch 2: the encoder trains too
    assert _changed(encoder_1, encoder_2)
    assert watch.trainable == [[False] * len(watch.encoder), [True] * len(watch.encoder)]
    assert history["encoder_frozen"] == [1.0, 0.0]
    record = json.loads((run / "metrics.json").read_text())
    assert [(p["name"], p["epochs"], p["encoder_frozen"]) for p in record["phases"]] == [
        ("frozen_encoder", [1, 1], True), ("fine_tune", [2, 2], False)]
    assert record["phases"][1]["learning_rate"] == pytest.approx(TrainConfig().learning_rate * 0.1)


def test_a_model_saved_while_the_encoder_is_frozen_loads_trainable(tmp_path):
    class _SavedNow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.live = [layer.trainable for layer in encoder_layers(_plain(self.model))]
            self.saved = keras.models.load_model(tmp_path / "s" / "model.keras")

    saved = _SavedNow()
    with pytest.warns(UserWarning, match="randomly initialized encoder"):
        train(dict(TINY, output_dir=str(tmp_path), name="s", epochs=1, freeze_encoder_epochs=1), callbacks=[saved],
              verbose=0)
    assert not any(saved.live)  # frozen while it was written
    layers = encoder_layers(saved.saved)
    assert layers and all(layer.trainable for layer in layers)
    assert saved.saved.count_params() == sum(int(np.prod(w.shape)) for w in saved.saved.trainable_weights) + sum(
        int(np.prod(w.shape)) for w in saved.saved.non_trainable_weights)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A freeze run of 4 epochs (2 frozen) that nothing interrupts, and its final state."""
    root = tmp_path_factory.mktemp("whole")
    final = FinalState()
    with pytest.warns(UserWarning, match="randomly initialized"):
        train(dict(TINY, output_dir=str(root), name="whole", epochs=4, freeze_encoder_epochs=2, dropout=0.1),
              callbacks=[final], verbose=0)
    return root / "whole", final.values


@pytest.mark.parametrize("cut", [1, 2], ids=["at-the-unfreezing", "inside-fine-tuning"])
def test_a_run_resumed_across_the_phase_boundary_ends_as_an_uninterrupted_one(tmp_path, uninterrupted, cut):
    whole, expected = uninterrupted
    config = dict(TINY, output_dir=str(tmp_path), name="cut", epochs=4, freeze_encoder_epochs=2, dropout=0.1)
    with pytest.warns(UserWarning), pytest.raises(Interrupted):
        train(config, callbacks=[StopAfter(cut)], verbose=0)
    state = read_backup(tmp_path / "cut" / "backup")
    assert state["epoch"] == cut + 1 and state["phase"] == ("frozen_encoder" if cut < 2 else "fine_tune")
    resumed = FinalState()
    with pytest.warns(UserWarning):
        train(config, resume=True, callbacks=[resumed], verbose=0)
    assert run_finished(tmp_path / "cut")
    assert_same_state(expected, resumed.values)
    rows = [{k: float(v) for k, v in row.items()} for row in read_history_rows(tmp_path / "cut" / "history.csv")]
    first = [{k: float(v) for k, v in row.items()} for row in read_history_rows(whole / "history.csv")]
    assert [row["encoder_frozen"] for row in rows] == [1.0, 1.0, 0.0, 0.0]
    for a, b in zip(first, rows):
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-5, atol=1e-6)


def _kinds(layers):
    """Class and weight shapes of each layer (auto-generated names differ between builds)."""
    return [(type(layer).__name__, [tuple(w.shape) for w in layer.weights]) for layer in layers]


def _image_files(folder, count=3):
    folder.mkdir()
    for k in range(count):
        image, _ = unetpp_tf.data.synthetic_sample(k, seed=7, image_size=(32, 32))
        Image.fromarray((image.numpy()[..., 0] * 255).astype(np.uint8)).save(folder / f"cell{k}.png")
    return folder


def test_cli_trains_evaluates_prunes_and_predicts_an_encoder_model(tmp_path, capsys, weights_file):
    flags = ["--output-dir", str(tmp_path), "--name", "e", *QUIET]
    settings = ["--encoder", ENCODER, "--encoder-weights", weights_file, "--num-samples", "24", "--image-size", "32",
                "--depth", "2", "--filters", "4", "--epochs", "2", "--min-steps", "0", "--freeze-encoder-epochs", "1",
                "--deep-supervision"]
    assert main(["train", *settings, *flags]) == 0
    captured = capsys.readouterr()
    assert "test: dice" in captured.out
    assert "unetpp-tf: epoch 1: encoder frozen" in captured.err
    assert "unetpp-tf: epoch 2: encoder unfrozen, fine-tuning every layer at learning rate 0.0003 (0.1 x" in (
        captured.err)
    run = tmp_path / "e"
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["encoder"], recorded["encoder_weights"], recorded["freeze_encoder_epochs"]) == (
        ENCODER, weights_file, 1)
    with open(run / "history.csv", newline="") as handle:
        assert [row["encoder_frozen"] for row in csv.DictReader(handle)] == ["1.0", "0.0"]
    model = unetpp_tf.load_model(run / "model.keras")
    built = model_from_config(TrainConfig.from_dict(recorded), channels=1, num_classes=1)
    assert "expanded_conv_depthwise" in [layer.name for layer in encoder_layers(model)]
    assert _kinds(encoder_layers(model)) == _kinds(encoder_layers(built))  # the whole encoder, as built
    assert len(model.outputs) == 2
    images = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    assert [o.shape for o in model.predict(images, verbose=0)] == [(2, 32, 32, 1)] * 2
    pruned = unetpp_tf.prune(model, 1)
    assert pruned.count_params() < model.count_params()
    np.testing.assert_allclose(pruned.predict(images, verbose=0), model.predict(images, verbose=0)[0], atol=1e-5)
    assert main(["evaluate", "--model", str(run), "--json", "--ds-mode", "fast", "--prune-level", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4
    inputs = _image_files(tmp_path / "inputs")
    assert main(["predict", "--model", str(run), str(inputs), "--output", str(tmp_path / "masks")]) == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["cell0.png", "cell1.png", "cell2.png"]


def _folder(root, count):
    """Image/mask PNG pairs under root/images and root/masks."""
    for part in ("images", "masks"):
        (root / part).mkdir(parents=True)
    for k in range(count):
        image, mask = (t.numpy()[..., 0] for t in unetpp_tf.data.synthetic_sample(k, seed=3, image_size=(32, 32)))
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "images" / f"tile{k}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"tile{k}.png")
    return root


def test_cross_validation_fine_tunes_each_fold_and_serves_their_ensemble(tmp_path):
    data = _folder(tmp_path / "data", 20)
    config = dict(TINY, data=str(data), output_dir=str(tmp_path), name="cv", folds=2, epochs=2,
                  freeze_encoder_epochs=1, batch_size=4)
    with pytest.warns(UserWarning, match="randomly initialized"):
        run, histories = train(config, verbose=0)
    assert {name: history["encoder_frozen"] for name, history in histories.items()} == {
        "fold_1": [1.0, 0.0], "fold_2": [1.0, 0.0]}
    folds = [keras.models.load_model(run / f"fold_{k}" / "model.keras") for k in (1, 2)]
    assert all(layer.trainable for model in folds for layer in encoder_layers(model))
    images = np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32)
    expected = np.mean([model.predict(images, verbose=0) for model in folds], axis=0)
    ensemble = unetpp_tf.load_model(run / "model.keras")
    np.testing.assert_allclose(ensemble.predict(images, verbose=0), expected, atol=1e-5)
    assert json.loads((run / "metrics.json").read_text())["cross_validation"]["folds"][1]["fold"] == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--encoder", "resnet5"], "--encoder: unknown encoder 'resnet5'; choose one of: resnet50, resnet101, "),
        (["--encoder", ENCODER, "--encoder-weights", "{tmp}/missing.weights.h5"],
         "--encoder-weights {tmp}/missing.weights.h5: no such file; pass 'imagenet', "),
        (["--freeze-encoder-epochs", "2"], "--freeze-encoder-epochs needs an --encoder (e.g. --encoder resnet50)"),
        (["--encoder", ENCODER, "--freeze-encoder-epochs", "11"],
         "--freeze-encoder-epochs 11 is more than the 10 --epochs; freeze for at most 10 epochs"),
        (["--encoder", ENCODER, "--image-size", "100"],
         "--image-size 100 100 does not fit the model: --encoder mobilenetv3small under a depth-4 decoder downsamples "
         "32x, so height and width must be multiples of 32; use e.g. --image-size 96 96."),
        (["--encoder", ENCODER, "--depth", "5"], "--depth 5 is too deep for --encoder mobilenetv3small"),
        (["--encoder", ENCODER, "--preset", "paper"], "--preset paper is a configuration of the built-in encoder"),
        (["--encoder", ENCODER, "--recompute"], "--recompute is for the built-in encoder; with --encoder train"),
        (["--arch", "deeplabv3plus", "--deep-supervision"], "--deep-supervision needs UNet++"),
        (["--arch", "deeplabv3plus", "--filters", "8"], "--arch deeplabv3plus does not use --filters 8"),
        (["--arch", "deeplabv3plus", "--image-size", "72"],
         "--image-size 72 72 does not fit the model: DeepLabV3+ (output stride 16) downsamples 16x"),
    ],
    ids=["unknown-encoder", "missing-weights", "freeze-without-encoder", "freeze-too-long", "size", "depth",
         "preset", "recompute", "deeplab-deep-supervision", "deeplab-filters", "deeplab-size"],
)
def test_bad_encoder_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert main(["train", *flags, "--output-dir", str(tmp_path / "runs"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unetpp-tf: error: " + message.replace("{tmp}", str(tmp_path)))
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "settings",
    [dict(depth=2, filters=4), dict(encoder=ENCODER, depth=2, filters=4),
     dict(encoder=ENCODER, arch="unet", depth=3, filters=4), dict(arch="deeplabv3plus", encoder=ENCODER)],
    ids=["own-encoder", "encoder", "unet-encoder", "deeplab"],
)
def test_the_size_check_agrees_with_the_built_model(settings):
    config = TrainConfig(image_size=(64, 64), **settings)
    assert config.size_multiple() == size_divisor(model_from_config(config, channels=1, num_classes=1))


def test_the_size_check_is_made_for_training_and_names_the_crop_size_of_folder_data():
    config = TrainConfig(image_size=(36, 36))  # how `evaluate` describes data for a depth-2 model from elsewhere
    with pytest.raises(ValueError, match=r"^--image-size 36 36 does not fit the model: --depth 4 downsamples 16x"):
        config.check_training_size()
    folder = TrainConfig(data="some/folder", crop_size=(40, 40), encoder=ENCODER)
    with pytest.raises(ValueError, match=r"^--crop-size 40 40 .* multiples of 32; use e\.g\. --crop-size 32 32\.$"):
        folder.check_training_size()
    TrainConfig(crop_size=(40, 40), encoder=ENCODER).check_training_size()  # synthetic data does not crop


def _dropout_rates(model):
    return [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]


def test_deeplab_from_a_config_keeps_its_own_dropout_and_takes_the_runs_batch_norm_momentum():
    model = model_from_config(TrainConfig(arch="deeplabv3plus", encoder=ENCODER), channels=1, num_classes=1)
    assert model.output_names == ["output"] and _dropout_rates(model) == [0.1]  # the builder's default
    momenta = {layer.momentum for layer in encoder_layers(model) if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}  # MobileNetV3 keeps its statistics with 0.999; the run's bn_momentum replaces it
    model = model_from_config(TrainConfig(arch="deeplabv3plus", encoder=ENCODER, dropout=0.3), 1, 1)
    assert _dropout_rates(model) == [0.3]


def test_cli_trains_deeplab(tmp_path, capsys):
    assert main(["train", "--arch", "deeplabv3plus", "--encoder", ENCODER, "--num-samples", "16", "--image-size",
                 "32", "--epochs", "1", "--min-steps", "0", "--output-dir", str(tmp_path), "--name", "d", *QUIET]) == 0
    assert "test: dice" in capsys.readouterr().out
    model = unetpp_tf.load_model(tmp_path / "d" / "model.keras")
    assert model.output_names == ["output"] and encoder_layers(model)
    assert model.predict(np.zeros((1, 32, 32, 1), np.float32), verbose=0).shape == (1, 32, 32, 1)
