"""Scan-by-scan evaluation (Dice, IoU, HD95, ASSD in mm) and surface distances in `evaluate` with a pixel spacing."""

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from unetpp_tf import evaluation
from unetpp_tf.data.volumes import Volume
from unetpp_tf.surface_distance import average_surface_distance, hausdorff_distance

SPACING = (2.5, 0.8, 0.6)


def identity(spatial, channels):
    """A "model" whose probabilities are its input, so each test chooses the predictions."""
    inputs = keras.Input((None,) * spatial + (channels,))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


def box(shape, start, stop):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


def volume(name, probs, label, spacing=SPACING):
    return Volume(probs.astype(np.float32), label, spacing, np.eye(4), name)


@pytest.fixture
def binary_volumes():
    shape = (6, 10, 9)
    ref = box(shape, (1, 2, 2), (4, 5, 5))
    pred = box(shape, (2, 2, 2), (5, 5, 5))  # the same cube one slice deeper: 18 of 27 voxels shared
    missed = box(shape, (1, 1, 1), (3, 3, 3))
    return [
        volume("overlap", pred[..., None] * 0.9, ref.astype(np.uint8)),
        volume("missed", np.zeros((*shape, 1)), missed.astype(np.uint8) * 2),  # label 2 is foreground too
    ], pred, ref


@pytest.mark.backend_independent
@pytest.mark.parametrize("spatial", [3, 2])  # a 3D model in sliding windows, a 2D one slice by slice
def test_binary_volumes_by_hand(binary_volumes, spatial):
    volumes, pred, ref = binary_volumes
    patch = (4, 8, 8) if spatial == 3 else None
    report = evaluation.evaluate_volumes(identity(spatial, 1), volumes, num_classes=1, patch_size=patch)
    first, second = report["per_image"]
    assert first["name"] == "overlap" and first["index"] == 0
    assert first["dice"] == pytest.approx(36 / 54) and first["iou"] == pytest.approx(18 / 36)
    assert first["hd95"] == pytest.approx(hausdorff_distance(pred, ref, SPACING))
    assert first["assd"] == pytest.approx(average_surface_distance(pred, ref, SPACING))
    assert first["hd95"] == pytest.approx(2.5)  # the top and bottom faces sit one 2.5 mm slice apart
    assert second["dice"] == 0.0 and second["hd95"] == np.inf and second["assd"] == np.inf
    metrics = report["metrics"]
    assert metrics["volumes"] == 2 and metrics["undefined_distances"] == 1
    assert metrics["dice"] == pytest.approx((36 / 54 + 0.0) / 2)
    assert metrics["hd95"] == pytest.approx(first["hd95"])  # the missed scan is counted, not averaged in
    assert "per_class" not in metrics


@pytest.mark.backend_independent
def test_multi_class_rows_name_the_foreground_classes(tmp_path):
    shape = (5, 8, 8)
    lung, nodule = box(shape, (0, 1, 1), (5, 7, 4)), box(shape, (2, 5, 5), (3, 6, 6))
    label = np.where(lung, 1, np.where(nodule, 2, 0)).astype(np.uint8)
    label[0, 0, 0] = 255  # void: scored for nothing
    predicted = label.copy()
    predicted[predicted == 255] = 2  # predicting anything on a void voxel costs nothing
    predicted[2, 1, 1] = 0  # one lung voxel missed
    one_hot = np.eye(3)[predicted]
    no_nodule = np.where(lung, 1, 0).astype(np.uint8)
    volumes = [volume("a", one_hot, label), volume("b", np.eye(3)[no_nodule], no_nodule)]
    report = evaluation.evaluate_volumes(identity(3, 3), volumes, patch_size=(4, 4, 4),
                                         class_names=["background", "lung", "nodule"])
    a, b = report["per_image"]
    lung_voxels = lung.sum()
    assert a["dice_lung"] == pytest.approx(2 * (lung_voxels - 1) / (2 * lung_voxels - 1))
    assert a["dice_nodule"] == 1.0 and a["iou_nodule"] == 1.0 and a["hd95_nodule"] == 0.0
    assert a["dice"] == pytest.approx((a["dice_lung"] + 1.0) / 2)
    assert b["dice_nodule"] == 1.0 and b["hd95_nodule"] == 0.0  # absent from both: agreement
    metrics = report["metrics"]
    assert metrics["classes"] == ["lung", "nodule"]
    assert metrics["per_class"]["dice"] == pytest.approx([(a["dice_lung"] + 1.0) / 2, 1.0])
    assert metrics["per_class"]["hd95"][1] == 0.0 and metrics["undefined_distances"] == 0
    csv_path = evaluation.write_per_image_csv(report["per_image"], tmp_path / "scans.csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["name"] == "a" and float(rows[0]["hd95_lung"]) == pytest.approx(a["hd95_lung"])
    written = json.loads(evaluation.write_metrics_json(metrics, tmp_path / "metrics.json").read_text())
    assert written["per_class"]["dice"] == pytest.approx(metrics["per_class"]["dice"])


@pytest.mark.backend_independent
def test_evaluate_volumes_refuses_bad_input(binary_volumes):
    volumes, _, _ = binary_volumes
    model = identity(3, 1)
    with pytest.raises(ValueError, match=r'data.volumes\["test"\]'):
        evaluation.evaluate_volumes(model, {"test": volumes})
    unlabelled = Volume(volumes[0].image, None, SPACING, np.eye(4), "raw")
    with pytest.raises(ValueError, match="raw have no label"):
        evaluation.evaluate_volumes(model, [unlabelled], patch_size=4)
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        evaluation.evaluate_volumes(identity(3, 4), volumes, patch_size=4, class_names=["a", "b"])


@pytest.mark.backend_independent
def test_evaluate_adds_surface_distances_with_a_pixel_spacing():
    shape = (10, 6)
    ref = box(shape, (2, 1), (5, 4))
    pred = box(shape, (5, 1), (8, 4))  # three rows lower (worked out in test_surface_distance)
    images = np.stack([pred, np.zeros(shape, bool)])[..., None].astype(np.float32)
    masks = np.stack([ref, ref])[..., None].astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(2)
    plain = evaluation.evaluate(identity(2, 1), dataset)
    report = evaluation.evaluate(identity(2, 1), dataset, spacing=(2.0, 1.0))
    first, second = report["per_image"]
    assert first["hd95"] == pytest.approx(6.0) and first["assd"] == pytest.approx(4.0)
    assert second["hd95"] == np.inf
    assert report["metrics"]["hd95"] == pytest.approx(6.0) and report["metrics"]["undefined_distances"] == 1
    for key in evaluation.METRIC_KEYS:  # the rest is what evaluate gives without a spacing
        assert report["metrics"][key] == plain["metrics"][key]
        assert first[key] == plain["per_image"][0][key]
    assert "hd95" not in plain["per_image"][0] and "hd95" not in plain["metrics"]
    with pytest.raises(ValueError, match=r"spacing must be 2 positive voxel sizes \(sy, sx\)"):
        evaluation.evaluate(identity(2, 1), dataset, spacing=(1.0, 1.0, 1.0))
