"""The CLI's pruning choice and ONNX export: evaluate --prune-report, export --prune-level auto, export --onnx."""

import json

import pytest

from unetpp_tf import build_unetpp
from unetpp_tf.cli import main
from unetpp_tf.evaluation import evaluate
from unetpp_tf.inference import load_model

TRAIN = ["--num-samples", "40", "--image-size", "32", "--depth", "2", "--filters", "4", "--epochs", "2",
         "--batch-size", "8", "--min-steps", "0", "--quiet", "--no-export-saved-model", "--no-export-tflite",
         "--deep-supervision"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    assert main(["train", *TRAIN, "--output-dir", str(output), "--name", "ds", "--export-onnx"]) == 0
    return output / "ds"


def test_a_run_exports_onnx_when_asked(run):
    record = json.loads((run / "metrics.json").read_text())["export"]
    assert (run / "export" / "model.onnx").is_file()
    assert record["model"]["dice_agreement"] >= 0.99


@pytest.mark.slow
def test_prune_report_prints_saves_and_marks_the_level(run, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--prune-report", "--tolerance", "0.5"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "prune_report" / "prune_report.json").read_text())
    assert report["split"] == "val"
    assert [row["name"] for row in report["rows"]] == ["L1", "L2", "full"]
    assert all(row["keras_ms"] > 0 and row["int8_ms"] > 0 and row["int8_bytes"] > 0 for row in report["rows"])
    assert report["rows"][0]["parameters"] < report["rows"][1]["parameters"]
    assert f"chose L{report['chosen']}" in out and "L1" in out and "full" in out
    assert (run / "prune_report" / "prune_report.png").stat().st_size > 0
    # the report's Dice is the one evaluate prints for that level on the same split
    assert main(["evaluate", "--model", str(run), "--split", "val", "--ds-mode", "fast", "--prune-level", "1",
                 "--json"]) == 0
    dice = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dice"]
    assert dice == pytest.approx(report["rows"][0]["dice"], abs=1e-6)


@pytest.mark.slow
def test_export_auto_level_exports_the_chosen_level_with_the_reported_dice(run, tmp_path, capsys):
    capsys.readouterr()
    out_dir = tmp_path / "export"
    assert main(["export", "--model", str(run), "--tflite", "--onnx", "--prune-level", "auto", "--tolerance", "0.5",
                 "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "--prune-level auto on the validation split: chose L" in out
    level = int(out.split("chose L")[1].split(":")[0])
    exported = load_model(out_dir / f"model_L{level}_float32.tflite")
    assert (out_dir / f"model_L{level}.onnx").is_file() and "onnx" in out
    from unetpp_tf.cli import _data_for, build_parser

    data = _data_for(build_parser().parse_args(["evaluate", "--model", str(run)]), str(run))
    file_dice = evaluate(exported, data.val)["metrics"]["dice"]
    keras_dice = evaluate(load_model(run / "model.keras"), data.val, mode="fast", level=level)["metrics"]["dice"]
    assert file_dice == pytest.approx(keras_dice, abs=0.01)


def test_bad_pruning_requests_are_one_line(run, tmp_path, capsys):
    plain = tmp_path / "plain.keras"
    build_unetpp((32, 32, 1), depth=2, filters=4).save(plain)
    data = ["--data", "synthetic", "--num-samples", "20", "--image-size", "32"]
    cases = [
        (["evaluate", "--model", str(plain), "--prune-report", *data], "deep supervision"),
        (["evaluate", "--model", str(run), "--prune-report", "--tolerance", "1.5"], "tolerance"),
        (["export", "--model", str(run), "--prune-level", "auto", "--tolerance", "0", "--output",
          str(tmp_path / "x")], "tolerance"),
        (["evaluate", "--model", str(run), "--prune-level", "auto"], "only export chooses a level"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "x").exists()
