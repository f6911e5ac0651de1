"""The `unetpp-tf` command line: output, exit codes, one-line errors."""

import json
import subprocess
import sys

import unetpp_tf
from unetpp_tf.cli import main


def test_summary_prints_parameter_count(capsys):
    assert main(["summary", "--depth", "2", "--filters", "4", "--input-size", "32", "--deep-supervision"]) == 0
    out = capsys.readouterr().out
    expected = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True).count_params()
    assert f"unetpp: {expected:,} parameters, 2 output(s)" in out
    assert "x_1_1_concat" in out


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


def test_import_silences_native_logs_but_keeps_python_logging():
    code = (
        "import unetpp_tf, tensorflow as tf, sys\n"
        "tf.get_logger().warning('python warning after import')\n"
        "print('python stderr line', file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "python warning after import" in result.stderr and "python stderr line" in result.stderr
    assert "Logging error" not in result.stderr  # the handler made during import still writes
    assert "oneDNN custom operations" not in result.stderr and "cuda drivers" not in result.stderr
