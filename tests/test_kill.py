"""A training run killed (SIGKILL) at many instants always leaves a loadable state and resumes to the end."""

import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np

from unetpp_tf.checkpoints import read_backup, read_history_rows
from unetpp_tf.training import run_finished

EPOCHS = 20
# Seconds between a process's first finished epoch and its kill: spread over epochs, so the
# kills fall in training, in validation and in the middle of the files an epoch writes.
DELAYS = (0.0, 0.13, 0.37, 0.71, 1.1)


def _command(out, *extra):
    return [
        sys.executable, "-m", "unetpp_tf", "train", "--quiet", "--output-dir", str(out), "--name", "k",
        "--epochs", str(EPOCHS), "--num-samples", "16", "--image-size", "32", "--depth", "2", "--filters", "4",
        "--batch-size", "4", "--min-steps", "0", "--no-export-saved-model", "--no-export-tflite", *extra,
    ]


def _epochs_backed_up(run) -> int:
    state = read_backup(run / "backup")
    return state["epoch"] if state else 0


def _check_loadable(run) -> int:
    """Every file a killed run left must read: the backup's arrays, the best model, the records."""
    state = read_backup(run / "backup")
    if state:
        with np.load(run / "backup" / state["arrays"]) as arrays:
            assert int(arrays["model/count"]) > 0 and int(arrays["optimizer/count"]) > 0
            assert all(np.isfinite(arrays[key]).all() for key in arrays.files if arrays[key].dtype.kind == "f")
    if (run / "model.keras").exists():
        keras.models.load_model(run / "model.keras")
    for name in ("config.json", "best.json", "splits.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    epochs = [int(row["epoch"]) for row in read_history_rows(run / "history.csv")]
    assert epochs == list(range(len(epochs)))
    return state["epoch"] if state else 0


def test_kill_at_many_instants_then_resume_finishes(tmp_path):
    run, log = tmp_path / "k", tmp_path / "stderr.txt"
    kills, backed_up = 0, 0
    for attempt, delay in enumerate(DELAYS):
        command = _command(tmp_path, *(["--resume"] if attempt else []))
        with open(log, "w") as err:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 180
        while process.poll() is None and _epochs_backed_up(run) <= backed_up and time.time() < deadline:
            time.sleep(0.02)  # wait for this process's first epoch: it resumed (or started) correctly
        if process.poll() is not None:
            assert process.returncode == 0, log.read_text()[-3000:]
            break  # finished before its kill
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if run_finished(run):  # on a fast machine the last kill can fall after the run finished
            _check_loadable(run)
            break
        now = _check_loadable(run)
        assert now > backed_up, (attempt, now, backed_up)  # every process went further than the last
        backed_up = now
    assert kills >= 4
    resumed = not run_finished(run)
    if resumed:
        result = subprocess.run(_command(tmp_path, "--resume"), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "test: dice" in result.stdout
        # temporary files of killed writes (figures/ included) were cleaned up by the resume
        assert not [p.name for p in run.rglob(".partial-*")]
    assert run_finished(run) and not (run / "backup").exists()
    assert {"dice", "iou"} <= set(json.loads((run / "metrics.json").read_text())["test"])  # the finished record
    assert [int(row["epoch"]) for row in read_history_rows(run / "history.csv")] == list(range(EPOCHS))
