"""The `unetpp-tf` command line: output, exit codes, whole error messages without tracebacks."""

import json
import subprocess
import sys

import unetpp_tf
from unetpp_tf.cli import main
from unetpp_tf.config import TrainConfig


def test_summary_prints_parameter_count(capsys):
    assert main(["summary", "--depth", "2", "--filters", "4", "--input-size", "32", "--deep-supervision"]) == 0
    out = capsys.readouterr().out
    expected = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True).count_params()
    assert f"unetpp: {expected:,} parameters, 2 output(s)" in out
    assert "x_1_1_conv1 (ConcatConv2D)" in out  # the nested node over its skip parts


def test_summary_preset_unet(capsys):
    assert main(["summary", "--preset", "paper", "--arch", "unet"]) == 0
    assert "unet: 7,759,521 parameters, 1 output(s)" in capsys.readouterr().out


def test_library_error_is_one_line(capsys):
    assert main(["summary", "--depth", "2", "--input-size", "30"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "input height 30 is not divisible by 4 (depth 2); resize or pad to 28 or 32" in err


def test_console_entry_rejects_unknown_flag_value():
    result = subprocess.run(
        [sys.executable, "-m", "unetpp_tf", "summary", "--arch", "resnet"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "invalid choice: 'resnet'" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_folder_writes_per_image_csv_with_file_names(tmp_path, capsys):
    import csv

    import numpy as np
    from PIL import Image

    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(10):
        image, mask = (t.numpy()[..., 0] for t in unetpp_tf.data.synthetic_sample(i, image_size=(32, 32)))
        Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "data" / "images" / f"cell{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "data" / "masks" / f"cell{i}.png")
    model_path = tmp_path / "m.keras"
    unetpp_tf.build_unetpp((None, None, 1), depth=2, filters=4).save(model_path)
    table = tmp_path / "per_image.csv"
    args = ["evaluate", "--model", str(model_path), "--data", str(tmp_path / "data"), "--image-size", "32",
            "--csv", str(table), "--json"]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["images"] == 2  # 15% of 10 files, rounded
    assert all(row["name"].startswith("cell") and row["name"].endswith(".png") for row in rows)


def _folder_with_two_bad_pairs(root):
    from PIL import Image

    import numpy as np

    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(12):
        image, mask = (t.numpy()[..., 0] for t in unetpp_tf.data.synthetic_sample(i, image_size=(32, 32)))
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "images" / f"cell{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"cell{i}.png")
    (root / "images" / "cell3.png").write_bytes(b"")  # empty
    (root / "masks" / "cell5.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # truncated
    return [str(root / "images" / "cell3.png"), str(root / "masks" / "cell5.png")]


def test_whole_error_message_then_skip_invalid(tmp_path, capsys):
    bad = _folder_with_two_bad_pairs(tmp_path / "data")
    args = ["train", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path), "--name", "r", "--image-size",
            "32", "--depth", "2", "--filters", "4", "--epochs", "1", "--min-steps", "0", "--quiet",
            "--no-export-saved-model", "--no-export-tflite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "unetpp-tf: error: 2 invalid image/mask pair(s):"
    assert bad[0] in lines[1] and bad[1] in lines[2]  # the file list the first line announces
    assert "skip_invalid" in lines[-1] and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    assert main(args + ["--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "test: dice" in captured.out
    assert "unetpp-tf: skipped 2 invalid image/mask pair(s), listed in" in captured.err
    recorded = json.loads((tmp_path / "r" / "splits.json").read_text())
    assert sorted(path for path, _ in recorded["skipped"]) == sorted(bad)
    assert TrainConfig.from_dict(json.loads((tmp_path / "r" / "config.json").read_text())).skip_invalid
    # evaluate on the folder with a model from elsewhere (no run settings to inherit): the same choice
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.keras").write_bytes((tmp_path / "r" / "model.keras").read_bytes())
    evaluate = ["evaluate", "--model", str(tmp_path / "elsewhere" / "m.keras"), "--data", str(tmp_path / "data"),
                "--image-size", "32"]
    assert main(evaluate) == 2
    assert "2 invalid image/mask pair(s):" in capsys.readouterr().err
    assert main(evaluate + ["--skip-invalid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] >= 1


def test_unknown_setting_in_a_config_file_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 2\noptimiser: adam\n")
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unetpp-tf: error: {config}: unknown setting(s) 'optimiser' (did you mean 'optimizer'?); ")
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_resume_takes_the_runs_recorded_settings(tmp_path, capsys):
    flags = ["--output-dir", str(tmp_path), "--name", "r", "--quiet", "--no-export-saved-model", "--no-export-tflite"]
    settings = ["--num-samples", "16", "--image-size", "32", "--depth", "2", "--filters", "4", "--epochs", "2",
                "--batch-size", "4", "--min-steps", "0"]
    assert main(["train", *settings, *flags]) == 0
    (tmp_path / "r" / "metrics.json").unlink()  # as if killed before the end
    assert main(["train", "--resume", *flags]) == 0  # no need to repeat the settings
    assert "test: dice" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["filters"] == 4
    (tmp_path / "r" / "metrics.json").unlink()
    assert main(["train", "--resume", "--epochs", "3", *flags]) == 2
    assert "(epochs: 2 -> 3)" in capsys.readouterr().err


def test_summary_of_encoder_models(capsys):
    assert main(["summary", "--encoder", "mobilenetv3small", "--depth", "2", "--filters", "4", "--input-size",
                 "32"]) == 0
    expected = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, encoder="mobilenetv3small").count_params()
    assert f"unetpp: {expected:,} parameters, 1 output(s)" in capsys.readouterr().out
    assert main(["summary", "--arch", "deeplabv3plus", "--encoder", "mobilenetv3small", "--input-size", "32"]) == 0
    expected = unetpp_tf.build_deeplabv3plus((32, 32, 1), encoder="mobilenetv3small").count_params()
    assert f"deeplabv3plus: {expected:,} parameters, 1 output(s)" in capsys.readouterr().out


def test_backend_flag_starts_the_command_again_on_that_backend():
    result = subprocess.run(
        [sys.executable, "-m", "unetpp_tf", "summary", "--backend", "jax", "--depth", "1", "--filters", "2",
         "--input-size", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters, 1 output(s) (Keras backend: jax)" in result.stdout


def test_backend_flag_errors_are_one_line(capsys):
    # in a Python process Keras' backend is fixed: main() cannot switch it and says how to
    assert main(["summary", "--backend", "jax", "--depth", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend jax: Keras already runs on tensorflow" in err
    assert "KERAS_BACKEND=jax" in err
    result = subprocess.run([sys.executable, "-m", "unetpp_tf", "summary", "--backend", "torch"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "argument --backend: invalid choice: 'torch'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_multi_worker_settings_that_cannot_work_are_one_line(capsys, tmp_path):
    base = ["train", "--output-dir", str(tmp_path), "--epochs", "1"]
    assert main([*base, "--strategy", "multi-worker", "--name", "x"]) == 2
    assert "--strategy multi-worker runs on the JAX backend" in capsys.readouterr().err
    assert main([*base, "--strategy", "multi-worker"]) == 2
    assert "--strategy multi-worker needs --name" in capsys.readouterr().err
    assert main([*base, "--strategy", "multi-worker", "--name", "x", "--folds", "3"]) == 2
    assert "--folds with --strategy multi-worker is not supported" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
