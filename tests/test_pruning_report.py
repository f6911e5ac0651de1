"""Prune report: every level measured on a split, the level a tolerance chooses, files, export agreement."""

import csv
import json

import numpy as np
import pytest

import unetpp_tf
from unetpp_tf import pruning_report as pr
from unetpp_tf.evaluation import evaluate
from unetpp_tf.export import export_model
from unetpp_tf.inference import load_model
from unetpp_tf.models import count_flops, prune
from unetpp_tf.viz import plot_prune_report
from tiny_models import fit_deep_supervision


def _row(name, level, dice):
    return {"name": name, "level": level, "mode": "accurate" if level is None else "fast", "dice": dice,
            "iou": dice - 0.05, "parameters": 1000 * (level or 5), "flops": 10**8 * (level or 5),
            "keras_ms": float(level or 5), "int8_ms": 0.5 * (level or 5), "int8_bytes": 2048 * (level or 5),
            "int8_agreement": 0.99, "keras_bytes": 8192 * (level or 5)}


def _hand_made(full_dice=0.915):
    rows = [_row("L1", 1, 0.80), _row("L2", 2, 0.905), _row("L3", 3, 0.91), _row("L4", 4, 0.92),
            _row("full", None, full_dice)]
    return {"rows": rows, "reference": "full", "depth": 4, "image_size": [96, 96], "images": 77,
            "latency_runs": 20, "num_threads": 2, "cpu_count": 2, "tolerance": None, "chosen": None}


@pytest.mark.backend_independent
def test_choose_prune_level_picks_the_smallest_level_within_the_tolerance():
    report = _hand_made()
    assert pr.choose_prune_level(report, 0.01) == 2  # 0.905 = 0.915 - 0.01 exactly: within
    assert pr.choose_prune_level(report, 0.005) == 3
    assert pr.choose_prune_level(report, 0.0001) == 4  # L4 beats the mean of the heads
    assert pr.choose_prune_level(report, 0.2) == 1
    assert pr.choose_prune_level(_hand_made(full_dice=0.95), 0.01) is None  # no level close enough: keep full


@pytest.mark.backend_independent
@pytest.mark.parametrize("tolerance", [0, 1, -0.1, 1.5, float("nan"), True, "0.01", None])
def test_a_tolerance_outside_0_1_is_one_clear_error(tolerance):
    with pytest.raises(ValueError, match=r"tolerance must be a Dice difference in \(0, 1\).*got") as caught:
        pr.choose_prune_level(_hand_made(), tolerance)
    assert repr(tolerance) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="tolerance"):  # checked before any model or data is touched
        pr.auto_prune_level(None, None, tolerance)


@pytest.mark.backend_independent
def test_table_marks_the_chosen_level_or_the_kept_full_model():
    table = pr.format_prune_report(_hand_made(), tolerance=0.01)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:7]] == ["L1", "L2", "L3", "L4", "full"]
    assert lines[3].endswith("<- chosen") and "chosen" not in "".join(lines[2:3] + lines[4:7])
    assert "0.9050" in lines[3] and "2,000" in lines[3] and "0.200" in lines[3]  # Dice, params, GFLOPs
    assert lines[-1] == "chose L2: Dice 0.9050 vs full 0.9150 (tolerance 0.01)"
    kept = pr.format_prune_report(_hand_made(full_dice=0.95), tolerance=0.01).splitlines()
    assert kept[6].endswith("<- kept")
    assert kept[-1] == "kept the full model: no level within 0.01 of its Dice 0.9500 (best: L4 0.9200)"
    assert "chosen" not in pr.format_prune_report(_hand_made())  # no tolerance: nothing marked


@pytest.mark.backend_independent
def test_a_model_without_deep_supervision_is_one_clear_error():
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4)
    with pytest.raises(ValueError, match="not built with deep supervision.*deep_supervision=True") as caught:
        pr.prune_report(model, [(np.zeros((1, 32, 32, 1), np.float32), np.zeros((1, 32, 32, 1), np.float32))])
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def data():
    return unetpp_tf.data.synthetic(48, image_size=(32, 32), batch_size=8, split=(0.7, 0.3, 0.0))


@pytest.fixture(scope="module")
def trained(data):
    """A tiny deep-supervision UNet++ trained a little, so its two heads score differently."""
    return fit_deep_supervision(data, epochs=3, check_both_classes=False)  # its split has no test images


@pytest.fixture(scope="module")
def report(trained, data):
    return pr.prune_report(trained, data.val, latency_runs=3, num_threads=1, calibration_images=4)


def test_every_level_and_the_full_model_are_measured(report, data):
    assert [(row["name"], row["level"], row["mode"]) for row in report["rows"]] == [
        ("L1", 1, "fast"), ("L2", 2, "fast"), ("full", None, "accurate")]
    for row in report["rows"]:
        assert row["keras_ms"] > 0 and row["int8_ms"] > 0, row
        assert row["int8_bytes"] > 1000 and row["keras_bytes"] > row["int8_bytes"], row
        assert 0.0 <= row["int8_agreement"] <= 1.0
    sizes = [row["int8_bytes"] for row in report["rows"]]
    assert sizes[0] < sizes[1]  # L1 is a fraction of the network
    images = sum(len(x) for x, _ in data.val)
    assert report["images"] == images and report["image_size"] == [32, 32] and report["depth"] == 2
    assert report["latency_runs"] == 3 and report["num_threads"] == 1 and report["calibration_images"] == 4


def test_parameters_flops_and_dice_are_those_of_the_pruned_models(report, trained, data):
    for row in report["rows"][:-1]:
        pruned = prune(trained, row["level"])
        assert row["parameters"] == pruned.count_params()
        assert row["flops"] == count_flops(pruned, (32, 32, 1))
        scores = evaluate(trained, data.val, mode="fast", level=row["level"])["metrics"]
        assert row["dice"] == pytest.approx(scores["dice"], abs=1e-6)
        assert row["iou"] == pytest.approx(scores["iou"], abs=1e-6)
    full = report["rows"][-1]
    assert full["parameters"] == trained.count_params()
    assert full["dice"] == pytest.approx(evaluate(trained, data.val)["metrics"]["dice"], abs=1e-6)
    assert report["rows"][0]["flops"] < report["rows"][1]["flops"] < full["flops"]
    assert len({round(row["dice"], 6) for row in report["rows"]}) == 3  # the heads differ


def test_written_report_round_trips_and_draws_one_point_per_row(report, tmp_path):
    paths = pr.write_prune_report(report, tmp_path / "prune")
    assert {kind: path.name for kind, path in paths.items()} == pr.REPORT_FILES
    assert json.loads(paths["json"].read_text()) == report
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["L1", "L2", "full"]
    assert float(rows[1]["dice"]) == pytest.approx(report["rows"][1]["dice"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "prune").iterdir()) == sorted(pr.REPORT_FILES.values())
    figure = plot_prune_report({**report, "chosen": 1})
    labels = sorted(text.get_text() for text in figure.axes[1].texts)
    assert len(figure.axes) == 2 and labels == ["L1", "L1", "L2", "L2", "full", "full"]  # Keras and int8
    assert pr.format_prune_report(json.loads(paths["json"].read_text())).splitlines()[2].startswith("L1")


def test_exported_auto_level_scores_what_the_report_says(trained, data, tmp_path):
    level, report = pr.auto_prune_level(trained, data.val, 0.05)
    assert report["tolerance"] == 0.05 and report["chosen"] == level == pr.choose_prune_level(report, 0.05)
    assert report["rows"][0]["keras_ms"] is None  # the choice needs no timing
    full = report["rows"][-1]["dice"]
    assert level is not None and report["rows"][level - 1]["dice"] >= full - 0.05
    assert all(row["dice"] < full - 0.05 for row in report["rows"][: level - 1])  # none smaller within it
    export_model(trained, tmp_path / "export", formats=("tflite",), quantize=("none",), mode="fast",
                 level=level, samples=data.val)
    exported = load_model(tmp_path / "export" / f"model_L{level}_float32.tflite")
    dice = evaluate(exported, data.val)["metrics"]["dice"]
    assert dice == pytest.approx(report["rows"][level - 1]["dice"], abs=0.005)


def test_an_exported_file_is_refused_with_what_to_pass(trained, data, tmp_path):
    export_model(trained, tmp_path / "export", formats=("tflite",), quantize=("none",), samples=data.val)
    with pytest.raises(ValueError, match="needs the Keras model with its deep-supervision heads.*TFLiteModel"):
        pr.prune_report(tmp_path / "export" / "model_float32.tflite", data.val)
