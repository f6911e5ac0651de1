"""Training on scans end to end: the recipes, `unetpp-tf train/evaluate/predict` on NIfTI folders, resume."""

import json

import nibabel as nib
import numpy as np
import pytest

from unetpp_tf.cli import main
from unetpp_tf.config import IMAGE_RECIPE, VOLUME_RECIPES, TrainConfig
from unetpp_tf.data.synthetic_ct import write_synthetic_ct
from unetpp_tf.training import run_finished, train
from run_control import FinalState, Interrupted, StopAfter, assert_same_state

SCAN = dict(shape=(16, 32, 32), spacing=(6.0, 8.0, 8.0))  # a small chest: 96 x 256 x 256 mm
TINY_3D = ["--depth", "2", "--filters", "4", "--patch-size", "8", "16", "16", "--batch-size", "2", "--epochs", "2",
           "--min-steps", "0", "--patches-per-volume", "4", "--split", "0.6", "0.2", "0.2"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Five small synthetic chest CT scans as NIfTI files in images/ and masks/."""
    return write_synthetic_ct(tmp_path_factory.mktemp("scans") / "chest", 5, seed=3, **SCAN)


def test_scans_take_the_volume_recipe_and_flags_override_it(scans):
    assert TrainConfig().batch_size == IMAGE_RECIPE["batch_size"]
    assert TrainConfig().patch_size is None
    config = TrainConfig(data=str(scans))
    assert config.on_scans and config.volumetric
    assert (config.batch_size, config.depth, config.patch_size) == tuple(
        VOLUME_RECIPES["3d"][k] for k in ("batch_size", "depth", "patch_size"))
    assert config.image_size is None
    explicit = TrainConfig(images=str(scans / "images"), masks=str(scans / "masks"))
    assert explicit.on_scans and explicit.patch_size == VOLUME_RECIPES["3d"]["patch_size"]
    flat = TrainConfig(data="synthetic-ct", volume_mode="2.5d", batch_size=4)
    assert flat.on_scans and not flat.volumetric
    assert (flat.batch_size, flat.patch_size) == (4, VOLUME_RECIPES["2.5d"]["patch_size"])
    # a recorded configuration (every value filled in) reads back unchanged
    assert TrainConfig.from_dict(flat.to_dict()) == flat


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(patch_size=(32, 32)), "--patch-size is for scans"),
        (dict(spacing=(1, 1, 1)), "--spacing is for scans"),
        (dict(data="synthetic-ct", image_size=(64, 64)), "--image-size is for images; scans train on patches"),
        (dict(data="synthetic-ct", patch_size=(32, 32)), "--volume-mode 3d takes 3 positive sizes"),
        (dict(data="synthetic-ct", volume_mode="2.5d", patch_size=(8, 32, 32)), "--volume-mode 2.5d takes 2"),
        (dict(data="synthetic-ct", slices=4), "--slices 4 must be odd"),
        (dict(data="synthetic-ct", spacing=(1, 1)), "give 3 positive voxel sizes"),
        (dict(data="synthetic-ct", encoder="mobilenetv2"), "use --volume-mode 2.5d with them"),
        (dict(data="synthetic-ct", folds=3), "--folds is for image folders"),
    ],
)
def test_contradicting_scan_settings_are_refused_by_flag(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_a_patch_the_pooling_cannot_divide_names_the_flag_and_a_size_that_fits(scans, tmp_path, capsys):
    flags = [*TINY_3D, "--patch-size", "8", "18", "16", "--output-dir", str(tmp_path)]
    assert main(["train", "--data", str(scans), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--patch-size 8 18 16 does not fit the model" in err and "--patch-size 8 16 16" in err
    assert not (tmp_path / "unetpp-chest").exists()


def test_cli_trains_a_3d_unetpp_on_a_folder_of_scans_then_scores_and_segments_a_scan(scans, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(scans), *TINY_3D, "--output-dir", str(runs), "--name", "ct3d",
                 "--no-export-tflite", "--quiet"]) == 0
    out = capsys.readouterr().out
    run = runs / "ct3d"
    record = json.loads((run / "metrics.json").read_text())
    assert record["test"]["volumes"] == 1 and "hd95" in record["test"] and "assd" in record["test"]
    assert len(record["test"]["per_class"]["dice"]) == 2  # lung and nodule, background left out
    assert "class1: dice" in out and " mm" in out
    rows = (run / "test_scans.csv").read_text().splitlines()
    assert len(rows) == 2 and "hd95_class1" in rows[0]
    splits = json.loads((run / "splits.json").read_text())
    names = {split: {p[0] for p in splits[split]} for split in ("train", "val", "test")}
    assert sum(len(v) for v in names.values()) == 5 and not names["train"] & (names["val"] | names["test"])

    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["dice"] == pytest.approx(record["test"]["dice"], abs=1e-6)

    assert main(["export", "--model", str(run), "--output", str(tmp_path / "export"), "--tflite"]) == 0
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    tflite = next(a for a in report["artifacts"] if a["name"] == "model_float32")
    assert tflite["dice_agreement"] > 0.99 and not tflite["custom_ops"]
    assert "image size 8x16x16" in capsys.readouterr().out  # the training patch

    source = scans / "images" / "ct_000.nii.gz"
    assert main(["predict", "--model", str(run), str(source), "--output", str(tmp_path / "masks")]) == 0
    written = nib.load(tmp_path / "masks" / "ct_000_mask.nii.gz")
    original = nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


def test_cli_trains_a_2_5d_unetpp_on_slices_and_segments_a_scan(scans, tmp_path, capsys):
    runs = tmp_path / "runs"
    flags = ["--volume-mode", "2.5d", "--slices", "3", "--patch-size", "32", "32", "--depth", "2", "--filters", "4",
             "--epochs", "1", "--min-steps", "0", "--batch-size", "4", "--split", "0.6", "0.2", "0.2",
             "--no-export-saved-model", "--no-export-tflite", "--quiet"]
    assert main(["train", "--data", str(scans), *flags, "--output-dir", str(runs), "--name", "flat"]) == 0
    config = json.loads((runs / "flat" / "config.json").read_text())
    assert config["volume_mode"] == "2.5d" and config["slices"] == 3
    capsys.readouterr()
    source = scans / "images" / "ct_001.nii.gz"
    assert main(["predict", "--model", str(runs / "flat"), str(source), "--output", str(tmp_path / "out")]) == 0
    written = nib.load(tmp_path / "out" / "ct_001_mask.nii.gz")
    assert written.shape == nib.load(source).shape


def test_a_resumed_3d_run_ends_with_the_weights_of_an_uninterrupted_one(scans, tmp_path):
    config = dict(data=str(scans), output_dir=str(tmp_path), depth=2, filters=4, patch_size=(8, 16, 16),
                  batch_size=2, epochs=2, min_steps=0, patches_per_volume=2, split=(0.6, 0.2, 0.2),
                  augmentation=dict(flip=True, rotate90=True, rotation=0.1, noise=0.02),
                  export_saved_model=False, export_tflite=False)
    whole = FinalState()
    train(dict(config, name="whole"), callbacks=[whole], verbose=0)
    with pytest.raises(Interrupted):
        train(dict(config, name="cut"), callbacks=[StopAfter(0)], verbose=0)
    resumed = FinalState()
    train(dict(config, name="cut"), resume=True, callbacks=[resumed], verbose=0)
    assert run_finished(tmp_path / "cut")
    assert_same_state(whole.values, resumed.values)


def test_scans_without_the_medical_extra_are_one_line_naming_the_install(scans, tmp_path, capsys, monkeypatch):
    from unetpp_tf.data import medical_io

    def missing():
        raise ImportError(f"NIfTI files need the nibabel package: {medical_io.INSTALL_HINT}")

    monkeypatch.setattr(medical_io, "_nibabel", missing)
    assert main(["train", "--data", str(scans), *TINY_3D, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert 'pip install "unetpp-tf[medical]"' in err


def test_train_prints_a_class_missed_in_every_test_scan_without_failing(tmp_path, capsys, monkeypatch):
    import unetpp_tf.training

    run = tmp_path / "run"
    run.mkdir()
    missed = {"dice": 0.5, "iou": 0.49, "hd95": None, "assd": None, "classes": ["lung", "nodule"],
              "per_class": {"dice": [0.99, 0.0], "iou": [0.98, 0.0], "hd95": [1.25, None], "assd": [0.2, None]}}
    (run / "metrics.json").write_text(json.dumps({"test": missed}))
    monkeypatch.setattr(unetpp_tf.training, "train", lambda config, **options: (run, {}))
    assert main(["train", "--data", "synthetic-ct"]) == 0
    out = capsys.readouterr().out
    assert "lung: dice 0.9900, iou 0.9800, hd95 1.25 mm, assd 0.20 mm" in out
    assert "nodule: dice 0.0000, iou 0.0000, hd95 undefined (missed or spurious in every scan)" in out


def test_scan_augmenter_fits_the_route_the_patch_and_the_window():
    from unetpp_tf.data import SegmentationAugmenter, VolumeAugmenter
    from unetpp_tf.volume_training import scan_augmenter

    cube = scan_augmenter(TrainConfig(data="synthetic-ct"))
    assert isinstance(cube, VolumeAugmenter) and cube.settings["rotate90"]
    assert cube.settings["value_range"] == (0.0, 1.0)  # windowed CT lies in 0..1
    assert not scan_augmenter(TrainConfig(data="synthetic-ct", patch_size=(16, 32, 48))).settings["rotate90"]
    slabs = scan_augmenter(TrainConfig(data="synthetic-ct", volume_mode="2.5d", window="zscore"))
    assert isinstance(slabs, SegmentationAugmenter) and slabs.settings["value_range"] is None  # z-scores: no clip
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['elastic'\] for VolumeAugmenter"):
        scan_augmenter(TrainConfig(data="synthetic-ct", augmentation={"elastic": 1.0}))
