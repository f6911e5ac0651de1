"""The CLI's planning: unetpp-tf plan and train --auto."""

import json

import pytest

from unetpp_tf.cli import main
from unetpp_tf.config import TrainConfig, load_config

TINY = ["--num-samples", "40", "--image-size", "32", "--depth", "2", "--filters", "4", "--epochs", "1",
        "--batch-size", "8", "--min-steps", "0", "--quiet", "--no-export-saved-model", "--no-export-tflite"]


def test_plan_prints_a_reason_for_every_setting_and_writes_a_config(tmp_path, capsys):
    config_file = tmp_path / "plan.json"
    assert main(["plan", "--num-samples", "64", "--no-measure", "--json", "--output", str(config_file)]) == 0
    chosen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert chosen["fingerprint"]["num_images"] == 64
    assert set(chosen["settings"]) == set(chosen["reasons"]) >= {"image_size", "depth", "batch_size", "normalize"}
    assert all(chosen["reasons"].values())
    written = load_config(config_file)
    config = TrainConfig.from_dict(written)  # a config train --config takes
    assert config.data == "synthetic" and config.depth == chosen["settings"]["depth"]
    assert list(config.image_size) == chosen["settings"]["image_size"]
    assert main(["plan", "--num-samples", "64", "--no-measure"]) == 0
    table = capsys.readouterr().out
    assert "setting" in table and "reason" in table and "memory:" in table


def test_train_auto_keeps_the_given_flags_and_records_the_plan(tmp_path, capsys):
    assert main(["train", "--auto", *TINY, "--output-dir", str(tmp_path), "--name", "auto"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "auto"
    chosen = json.loads((run / "plan.json").read_text())
    recorded = json.loads((run / "config.json").read_text())
    assert "setting" in out and "reason" in out and "test: dice" in out
    assert (recorded["image_size"], recorded["depth"], recorded["filters"]) == ([32, 32], 2, 4)  # given: kept
    planned = set(chosen["settings"]) - {"image_size", "depth", "filters", "batch_size", "epochs", "min_steps"}
    assert {"normalize", "recompute"} <= planned
    for name in planned:
        assert recorded[name] == chosen["settings"][name], name  # planned: applied


@pytest.mark.parametrize("argv, words", [
    (["plan", "--memory-budget", "0.01", "--no-measure"], "too small: the smallest configuration"),
    (["train", "--auto", "--num-samples", "5", "--image-size", "32"], "5"),
    (["train", "--memory-budget", "2"], "add --auto"),
])
def test_planning_errors_are_one_line(tmp_path, capsys, argv, words):
    assert main([*argv, *(["--output-dir", str(tmp_path), "--name", "x"] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "x").exists()
