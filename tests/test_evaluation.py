"""Evaluation: dataset-level (pooled) and per-image metrics, ensembles, pruning, writers."""

import csv
import errno
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf import evaluation
from unetpp_tf.metrics import Dice, F1Score, IoU, PixelAccuracy, Precision, Recall

KEYS = ("dice", "iou", "precision", "recall", "f1", "accuracy")


def identity_model(channels=1):
    """A "model" whose probabilities are its input: the predictions are chosen by the test."""
    inputs = keras.Input((None, None, channels))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


def dataset(images, masks, batch_size=3):
    return tf.data.Dataset.from_tensor_slices((images.astype(np.float32), masks.astype(np.int32))).batch(batch_size)


def binary_reference(probs, masks, threshold=0.5):
    pred, truth = probs[..., 0] >= threshold, masks[..., 0] == 1
    tp, fp = np.sum(pred & truth), np.sum(pred & ~truth)
    fn, tn = np.sum(~pred & truth), np.sum(~pred & ~truth)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "accuracy": (tp + tn) / pred.size,
    }


@pytest.fixture
def binary_data(rng):
    probs = rng.random((5, 32, 32, 1)).astype(np.float32)
    masks = (rng.random((5, 32, 32, 1)) < 0.4).astype(np.int32)
    return probs, masks


@pytest.mark.backend_independent
def test_binary_metrics_match_a_numpy_reference(binary_data):
    probs, masks = binary_data
    report = evaluation.evaluate(identity_model(), dataset(probs, masks), threshold=0.6)
    expected = binary_reference(probs, masks, threshold=0.6)
    assert report["metrics"]["images"] == 5 and "per_class" not in report["metrics"]
    for key in KEYS:
        assert report["metrics"][key] == pytest.approx(expected[key], rel=1e-5), key
    assert [row["name"] for row in report["per_image"]] == ["0", "1", "2", "3", "4"]
    for i, row in enumerate(report["per_image"]):
        image_expected = binary_reference(probs[i : i + 1], masks[i : i + 1], threshold=0.6)
        assert row["index"] == i
        for key in KEYS:
            assert row[key] == pytest.approx(image_expected[key], rel=1e-5), (i, key)


@pytest.mark.backend_independent
def test_dataset_dice_pools_counts_instead_of_averaging_images():
    masks = np.zeros((2, 32, 32, 1), np.int32)
    masks[0, :16] = 1  # a large object, found exactly
    masks[1, 0, 0] = 1  # a one-pixel object, missed
    probs = masks.astype(np.float32)
    probs[1, 0, 0] = 0.0
    report = evaluation.evaluate(identity_model(), dataset(probs, masks), names=["big", "tiny"])
    rows = {row["name"]: row for row in report["per_image"]}
    assert rows["big"]["dice"] == 1.0 and rows["tiny"]["dice"] == 0.0
    assert report["metrics"]["dice"] == pytest.approx(2 * 512 / (2 * 512 + 1))  # not the mean 0.5
    assert report["metrics"]["recall"] == pytest.approx(512 / 513)


@pytest.mark.backend_independent
def test_multiclass_per_class_values_and_pixel_accuracy(rng):
    classes = rng.integers(0, 3, size=(4, 32, 32))
    masks = rng.integers(0, 3, size=(4, 32, 32, 1))
    masks[1] = 0  # classes 1 and 2 absent from image 1 but predicted there: their dice is 0
    probs = np.eye(3, dtype=np.float32)[classes] * 0.8 + 0.1
    report = evaluation.evaluate(identity_model(3), dataset(probs, masks))
    metrics = report["metrics"]
    assert sorted(metrics["per_class"]) == sorted(KEYS)
    truth, pred = masks[..., 0], classes
    for k in range(3):
        tp = np.sum((pred == k) & (truth == k))
        fp, fn = np.sum((pred == k) & (truth != k)), np.sum((pred != k) & (truth == k))
        assert metrics["per_class"]["dice"][k] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-5)
        assert metrics["per_class"]["iou"][k] == pytest.approx(tp / (tp + fp + fn), rel=1e-5)
    for key in ("dice", "iou", "precision", "recall", "f1"):
        assert metrics[key] == pytest.approx(np.mean(metrics["per_class"][key]), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(np.mean(pred == truth), rel=1e-6)
    row = report["per_image"][1]
    assert row["accuracy"] == pytest.approx(np.mean(pred[1] == 0), rel=1e-6)
    found = np.mean(pred[1] == 0)
    assert row["dice"] == pytest.approx(2 * found / (1 + found) / 3, rel=1e-5)


@pytest.mark.backend_independent
def test_agrees_with_streaming_metric_classes(rng, binary_data):
    metric_classes = {"dice": Dice, "iou": IoU, "precision": Precision, "recall": Recall, "f1": F1Score,
                      "accuracy": PixelAccuracy}
    multi = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(5, 32, 32))]
    cases = [(identity_model(), *binary_data, 1), (identity_model(4), multi, rng.integers(0, 4, (5, 32, 32, 1)), 4)]
    for model, probs, masks, classes in cases:
        report = evaluation.evaluate(model, dataset(probs, masks))
        for key, cls in metric_classes.items():
            metric = cls(num_classes=classes)
            for x, y in dataset(probs, masks):
                metric.update_state(y, model(x))
            assert report["metrics"][key] == pytest.approx(float(metric.result()), rel=1e-6), (classes, key)
            if classes > 1 and key != "accuracy":
                np.testing.assert_allclose(report["metrics"]["per_class"][key], metric.per_class_result(), rtol=1e-6)


def sigmoid_conv(kernel, bias):
    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), kernel, np.float32), np.full((1,), bias, np.float32)])
    return model


@pytest.mark.backend_independent
def test_ensemble_averages_probabilities(binary_data):
    images, masks = binary_data
    first, second = sigmoid_conv(6.0, -3.0), sigmoid_conv(-4.0, 1.5)
    ensemble = evaluation.evaluate([first, second], dataset(images, masks))
    averaged = (first.predict(images, verbose=0) + second.predict(images, verbose=0)) / 2
    reference = evaluation.evaluate(identity_model(), dataset(averaged, masks))
    assert ensemble == reference
    alone = evaluation.evaluate(first, dataset(images, masks))
    assert alone["metrics"]["dice"] != pytest.approx(ensemble["metrics"]["dice"])


def test_deep_supervision_fast_mode_equals_pruned_model(tiny_ds_model, rng):
    images = rng.random((4, 32, 32, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.int32)
    data = dataset(images, masks, batch_size=2)
    fast = evaluation.evaluate(tiny_ds_model, data, mode="fast", level=1, threshold=0.45)
    pruned = evaluation.evaluate(unetpp_tf.prune(tiny_ds_model, 1), data, threshold=0.45)
    assert fast == pruned
    deepest = evaluation.evaluate(tiny_ds_model, data, mode="fast", threshold=0.45)
    assert deepest == evaluation.evaluate(unetpp_tf.prune(tiny_ds_model, 2), data, threshold=0.45)
    assert deepest["per_image"] != fast["per_image"]


@pytest.mark.backend_independent
def test_argument_errors(binary_data):
    probs, masks = binary_data
    with pytest.raises(ValueError, match="names has 2 entries but the dataset has 5 images"):
        evaluation.evaluate(identity_model(), dataset(probs, masks), names=["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        evaluation.evaluate(identity_model(), [])
    with pytest.raises(ValueError, match="same output channels"):
        evaluation.evaluate([identity_model(1), identity_model(3)], dataset(probs, masks))
    with pytest.raises(ValueError, match="no deep-supervision heads"):
        evaluation.evaluate(identity_model(), dataset(probs, masks), mode="fast", level=1)


@pytest.mark.backend_independent
def test_writers_round_trip(tmp_path, binary_data):
    report = evaluation.evaluate(identity_model(), dataset(*binary_data), names=list("abcde"))
    csv_path = evaluation.write_per_image_csv(report["per_image"], tmp_path / "run" / "per_image.csv")
    json_path = evaluation.write_metrics_json(report["metrics"], tmp_path / "run" / "metrics.json")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == list("abcde") and list(rows[0]) == ["index", "name", *KEYS]
    assert float(rows[2]["dice"]) == pytest.approx(report["per_image"][2]["dice"])
    assert json.loads(json_path.read_text()) == report["metrics"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json", "per_image.csv"]


@pytest.mark.backend_independent
def test_writers_replace_files_whole_or_not_at_all(tmp_path, binary_data, monkeypatch):
    report = evaluation.evaluate(identity_model(), dataset(*binary_data))
    path = evaluation.write_per_image_csv(report["per_image"], tmp_path / "per_image.csv")
    before = path.read_bytes()

    def full_disk(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)  # the header is written, then the disk is full
    with pytest.raises(OSError, match=f"no space left on the device while writing {path}"):
        evaluation.write_per_image_csv(report["per_image"][::-1], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["per_image.csv"]
