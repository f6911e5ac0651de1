"""The `unetpp-tf` command line: output, exit codes, one-line errors."""

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
