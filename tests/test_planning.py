"""Planning from the data: the fingerprint's numbers, the plan's choices, the memory budget, `train --auto`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from unetpp_tf.config import TrainConfig
from unetpp_tf.data.fingerprint import MIN_IMAGES, Fingerprint, fingerprint
from unetpp_tf.data.medical_io import write_nifti
from unetpp_tf.planning import (
    estimate_memory,
    format_plan,
    measure_peak_memory,
    plan,
    planned_config,
)

SQUARES = ((2, 2, 4), (20, 10, 6))  # (row, col, side) of the two objects in every mask: 16 and 36 pixels


def _write_folder(root, *, count=MIN_IMAGES, bits=8, tall=4, classes=1, empty=False, edge=32):
    """`count` pairs: `edge` x `edge` images (the last `tall` are 48x32), background 10, two squares at 200 (8-bit)
    or 4000 (16-bit TIFF, so 12-bit data); masks 0/255 (classes=1) or the squares as ids 1 and 2."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(count):
        height, width = (48, 32) if k >= count - tall else (edge, edge)
        dtype = np.uint8 if bits == 8 else np.uint16
        image = np.full((height, width), 10, dtype)
        mask = np.zeros((height, width), np.uint8)
        for index, (row, col, side) in enumerate(SQUARES):
            image[row:row + side, col:col + side] = 200 if bits == 8 else 4000
            if not empty:
                mask[row:row + side, col:col + side] = 255 if classes == 1 else index + 1
        Image.fromarray(image).save(root / "images" / f"im{k:02d}{'.png' if bits == 8 else '.tif'}")
        Image.fromarray(mask).save(root / "masks" / f"im{k:02d}.png")
    return root


def _fp(**changes) -> Fingerprint:
    """A fingerprint of 200 gray 8-bit 64x64 images with small objects, changed by `changes`."""
    values = dict(
        source="made-up", kind="images", num_images=200,
        sizes=dict(median=[64, 64], min=[64, 64], max=[64, 64], spread=1.0), spacing=None, dtype="uint8",
        bit_depth=8, effective_max=255.0, effective_bits=8, channels=1,
        intensity={"p0.5": 5.0, "p1": 8.0, "p5": 12.0, "p50": 30.0, "p95": 150.0, "p99": 190.0, "p99.5": 210.0,
                   "min": 0.0, "max": 255.0, "mean": 40.0, "std": 30.0},
        num_classes=1,
        classes=[{"class": 1, "foreground_fraction": 0.2, "present": 1.0,
                  "object_size": {"median": 80.0, "p5": 5.0, "max": 900.0}, "objects_per_image": 5.0}],
        sampled=dict(images=200, pixels=819200),
    )
    values.update(changes)
    return Fingerprint(**values)


# ----------------------------------------------------------------------------- fingerprint


@pytest.mark.backend_independent
def test_fingerprint_of_an_8bit_folder(tmp_path):
    fp = fingerprint(_write_folder(tmp_path / "d"))
    assert fp.kind == "images" and fp.num_images == 10 and fp.channels == 1 and fp.num_classes == 1
    assert fp.sizes == dict(median=[32, 32], min=[32, 32], max=[48, 32], spread=1.5)
    assert (fp.dtype, fp.bit_depth, fp.effective_max, fp.effective_bits) == ("uint8", 8, 200.0, 8)
    pixels = 6 * 32 * 32 + 4 * 48 * 32
    assert fp.intensity["p50"] == 10.0 and fp.intensity["p99.5"] == 200.0 and fp.intensity["max"] == 200.0
    (row,) = fp.classes
    assert row["class"] == 1 and row["foreground_fraction"] == pytest.approx(10 * 52 / pixels)
    assert row["object_size"] == dict(median=26.0, p5=16.0, max=36.0)
    assert row["objects_per_image"] == 2.0 and row["present"] == 1.0
    assert fp.to_dict()["sizes"]["median"] == [32, 32] and fp.sampled["images"] == 10


@pytest.mark.backend_independent
def test_fingerprint_of_a_16bit_multiclass_folder(tmp_path):
    fp = fingerprint(_write_folder(tmp_path / "d", bits=16, tall=0, classes=3))
    assert (fp.dtype, fp.bit_depth, fp.effective_max, fp.effective_bits) == ("uint16", 16, 4000.0, 12)
    assert fp.num_classes == 3 and fp.sizes["spread"] == 1.0
    small, large = fp.classes
    assert (small["class"], large["class"]) == (1, 2)
    assert small["foreground_fraction"] == pytest.approx(16 / 1024)
    assert large["foreground_fraction"] == pytest.approx(36 / 1024)
    assert small["object_size"]["median"] == 16.0 and large["object_size"]["p5"] == 36.0


@pytest.mark.backend_independent
def test_too_small_to_fingerprint_says_how_many(tmp_path):
    with pytest.raises(ValueError, match=r"too small to fingerprint: 4 image/mask pairs, at least 10 are needed"):
        fingerprint(_write_folder(tmp_path / "few", count=4, tall=0))
    with pytest.raises(ValueError, match=r"none of the 10 mask\(s\) read has a foreground pixel"):
        fingerprint(_write_folder(tmp_path / "empty", empty=True))
    with pytest.raises(ValueError, match=r"3 samples \(--num-samples\), at least 10"):
        fingerprint("synthetic", num_samples=3)


def test_fingerprint_of_synthetic_data():
    fp = fingerprint("synthetic", task="multiclass")
    assert fp.num_images == 512 and fp.num_classes == 3 and [c["class"] for c in fp.classes] == [1, 2]
    assert fp.sizes["median"] == [96, 96] and fp.dtype == "float32" and fp.effective_bits is None
    assert all(c["objects_per_image"] > 1 and 0 < c["foreground_fraction"] < 0.5 for c in fp.classes)


def _mock_pet_dataset(self, split, *args, **kwargs):
    """12 examples, 20x30: trimap 2 (background) with a 5x10 pet (1) and a 1x10 border row (3) above it."""
    def generate():
        for k in range(12):
            mask = np.full((20, 30, 1), 2, np.uint8)
            mask[5:10, 5:15] = 1
            mask[4, 5:15] = 3
            yield {"image": np.full((20, 30, 3), 5 * k, np.uint8), "segmentation_mask": mask}

    signature = {"image": tf.TensorSpec([None, None, 3], tf.uint8),
                 "segmentation_mask": tf.TensorSpec([None, None, 1], tf.uint8)}
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def test_fingerprint_of_tfds_mock_data():
    with tfds.testing.mock_data(as_dataset_fn=_mock_pet_dataset):
        fp = fingerprint("tfds:oxford_iiit_pet")
    assert fp.num_images == 12 and fp.channels == 3 and fp.num_classes == 1  # pet and border are foreground
    assert fp.sizes["median"] == [20, 30] and fp.effective_max == 55.0 and fp.effective_bits == 6
    (row,) = fp.classes
    assert row["foreground_fraction"] == pytest.approx(60 / 600)
    assert row["object_size"]["median"] == 60.0 and row["objects_per_image"] == 1.0


def test_fingerprint_of_tfds_that_cannot_be_read():
    def unprepared(self, split, *args, **kwargs):
        raise AssertionError("dataset not found: prepare it first")

    with tfds.testing.mock_data(as_dataset_fn=unprepared):
        with pytest.raises(ValueError, match=r"^--data tfds:oxford_iiit_pet: cannot read its train split"):
            fingerprint("tfds:oxford_iiit_pet")


def test_fingerprint_of_scans_reads_the_spacing(tmp_path):
    for k in range(3):
        image = np.full((16, 16, 8), -1000, np.int16)  # file axes x, y, z
        label = np.zeros((16, 16, 8), np.uint8)
        image[4:8, 4:8, 2:4], label[4:8, 4:8, 2:4] = 40, 1
        affine = np.diag([0.8, 0.8, 4.0, 1.0])
        write_nifti(image, affine, tmp_path / "images" / f"case{k}.nii.gz")
        write_nifti(label, affine, tmp_path / "masks" / f"case{k}.nii.gz")
    fp = fingerprint(tmp_path)
    assert fp.kind == "scans" and fp.num_images == 3 and fp.sizes["median"] == [8, 16, 16]
    assert fp.spacing["median"] == pytest.approx([4.0, 0.8, 0.8]) and fp.spacing["anisotropy"] == pytest.approx(5.0)
    assert fp.classes[0]["object_size"]["median"] == 32.0 and fp.intensity["p0.5"] == -1000.0
    chosen = plan(fp, measure=False)
    assert chosen.settings["volume_mode"] == "2.5d" and "thicker" in chosen.reasons["volume_mode"]
    assert "window" not in chosen.settings  # CT: Hounsfield units keep the configured window
    mri = plan(dataclasses.replace(fp, intensity={**fp.intensity, "p0.5": 0.0}), measure=False)
    assert mri.settings["window"] == "zscore"


# ----------------------------------------------------------------------------- plan


@pytest.mark.backend_independent
def test_plan_normalization_follows_the_bit_depth():
    eight = plan(_fp(), measure=False)
    sixteen = plan(_fp(dtype="uint16", bit_depth=16, effective_max=4095.0, effective_bits=12), measure=False)
    dim = plan(_fp(intensity={**_fp().intensity, "p99.5": 40.0}), measure=False)
    assert eight.settings["normalize"] == "fixed" and "8-bit" in eight.reasons["normalize"]
    assert sixteen.settings["normalize"] == "dataset" and "12-bit" in sixteen.reasons["normalize"]
    assert dim.settings["normalize"] == "dataset"


@pytest.mark.backend_independent
def test_plan_size_and_depth_for_small_large_and_varied_images():
    tiles = plan(_fp(), measure=False).settings
    assert tiles["image_size"] == (64, 64) and tiles["depth"] == 3 and "crop_size" not in tiles
    big = _fp(sizes=dict(median=[1024, 1024], min=[1024, 1024], max=[1024, 1024], spread=1.0))
    large = plan(big, measure=False).settings
    assert large["crop_size"] == (256, 256) and large["image_size"] == (1024, 1024) and large["depth"] == 4
    varied = _fp(sizes=dict(median=[375, 500], min=[200, 300], max=[500, 500], spread=4.1), channels=3)
    pets = plan(varied, measure=False)
    assert pets.settings["image_size"] == (128, 128) and "vary" in pets.reasons["image_size"]
    odd = plan(_fp(sizes=dict(median=[40, 72], min=[40, 72], max=[40, 72], spread=1.0)), measure=False)
    assert odd.settings["image_size"] == (40, 72) and odd.settings["depth"] == 2
    assert odd.settings["augmentation"]["rotate90"] is False  # rotations need square images


@pytest.mark.backend_independent
def test_plan_gives_small_datasets_more_steps_and_caps_the_batch():
    tiny, small, large = (plan(_fp(num_images=n), measure=False).settings for n in (30, 200, 5000))
    assert tiny["min_steps"] > small["min_steps"] > large["min_steps"] == TrainConfig.min_steps
    assert tiny["batch_size"] == 8 and large["batch_size"] == 16
    assert plan(_fp(num_images=12), measure=False).settings["batch_size"] == 4  # 8 training images


@pytest.mark.backend_independent
def test_memory_budget_steps_down_then_refuses():
    fp = _fp(sizes=dict(median=[256, 256], min=[256, 256], max=[256, 256], spread=1.0))
    roomy = plan(fp, memory_budget_gb=64, measure=False)
    assert roomy.settings["batch_size"] == 8 and roomy.settings["recompute"] is False
    data = 200 * 256 * 256 * 8  # the cached dataset: float32 images and int32 masks
    need = (estimate_memory(dict(depth=4, filters=16, batch_size=2), 1, 1, (256, 256)) * 1.1 + data) / 2**30
    tight = plan(fp, memory_budget_gb=round(need + 0.01, 2), measure=False)
    assert tight.settings["batch_size"] == 2 and tight.memory["peak_gb"] <= tight.memory["budget_gb"]
    assert "largest power of two" in tight.reasons["batch_size"]
    with pytest.raises(ValueError, match=r"^--memory-budget 0.5 GB is too small: the smallest configuration "
                                         r"\(batch 1, 8 filters, depth 4, 256x256, recompute\) needs \d+\.\d GB"):
        plan(fp, memory_budget_gb=0.5, measure=False)


@pytest.mark.backend_independent
def test_format_plan_is_a_table_with_reasons():
    chosen = plan(_fp(), memory_budget_gb=4, measure=False)
    text = format_plan(chosen)
    lines = text.splitlines()
    assert lines[1].split() == ["setting", "value", "reason"]
    assert any(line.split()[:3] == ["image_size", "64", "64"] for line in lines)
    for name in chosen.settings:
        assert any(line.startswith(name) and chosen.reasons[name] in line for line in lines), name
    assert "budget 4 GB" in lines[-1] and chosen.to_dict()["settings"]["image_size"] == [64, 64]


def test_planned_config_keeps_the_given_fields(tmp_path):
    folder = _write_folder(tmp_path / "d")
    config, chosen = planned_config(
        TrainConfig(data=str(folder), epochs=3, batch_size=2), given={"data", "epochs", "batch_size"}, measure=False
    )
    assert config.epochs == 3 and config.batch_size == 2
    assert config.image_size == (32, 32) == chosen.settings["image_size"] and config.depth == 2
    assert config.normalize == "fixed" and config.min_steps == chosen.settings["min_steps"] == 600
    config.check_training_size()  # the planned size fits the planned depth
    wide = _write_folder(tmp_path / "forty", tall=0, edge=40)
    config, chosen = planned_config(TrainConfig(data=str(wide)), given={"data"}, measure=False)
    assert config.image_size == (40, 40) and config.depth == 2  # native size, depth for it
    config, chosen = planned_config(TrainConfig(data=str(wide), depth=4), given={"data", "depth"}, measure=False)
    assert config.depth == 4 and config.image_size == (32, 32) == chosen.settings["image_size"]  # 16x downsampling
    config.check_training_size()
    with pytest.raises(ValueError, match="too small to fingerprint: 4 image/mask pairs"):
        planned_config(TrainConfig(data=str(_write_folder(tmp_path / "few", count=4))), given={"data"})


@pytest.mark.slow  # a child process that imports TensorFlow and trains: 5-40 s as the machine is loaded
def test_measured_memory_of_a_tiny_model():
    spec = dict(depth=2, filters=4, batch_size=2)
    found = measure_peak_memory(spec, channels=1, num_classes=1, input_shape=(32, 32), steps=2)
    assert found["device"] in ("cpu", "gpu") and 100 * 2**20 < found["rss_bytes"] < 8 * 2**30
    assert found["peak_bytes"] == (found["gpu_bytes"] if found["device"] == "gpu" else found["rss_bytes"])
