"""Resuming runs: exact continuation, refused setting changes, a full disk, a read-only folder."""

import ctypes
import errno
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from unetpp_tf import checkpoints
from unetpp_tf.checkpoints import RunBackup, read_backup, read_history_rows
from unetpp_tf.cli import error_message
from unetpp_tf.training import run_finished, train
from run_control import FinalState, Interrupted, StopAfter, assert_same_state

TINY = dict(
    num_samples=40, image_size=(32, 32), depth=2, filters=4, batch_size=8, min_steps=0,
    export_saved_model=False, export_tflite=False,
)


def _history(run):
    return [{k: float(v) for k, v in row.items() if v != ""} for row in read_history_rows(run / "history.csv")]


@pytest.mark.parametrize(
    "settings",
    [
        # device augmentation and dropout (seed-generator states), cosine schedule position, early stopping
        dict(dropout=0.1, early_stopping=3),
        # host augmentation (in tf.data); the plateau schedule; epochs of 6 steps running over the ends
        # of the 4-batch training split
        dict(augment="host", schedule="plateau", min_steps=24, learning_rate=1e-2),
    ],
    ids=["device-augment-cosine", "host-augment-plateau-stretched"],
)
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, settings):
    config = dict(TINY, output_dir=str(tmp_path), epochs=4, **settings)
    whole = FinalState()
    train(dict(config, name="whole"), callbacks=[whole], verbose=0)
    with pytest.raises(Interrupted):
        train(dict(config, name="cut"), callbacks=[StopAfter(1)], verbose=0)
    assert read_backup(tmp_path / "cut" / "backup")["epoch"] == 2
    assert len(_history(tmp_path / "cut")) == 2
    resumed = FinalState()
    train(dict(config, name="cut"), resume=True, callbacks=[resumed], verbose=0)
    assert run_finished(tmp_path / "cut")
    assert_same_state(whole.values, resumed.values)
    first, second = _history(tmp_path / "whole"), _history(tmp_path / "cut")
    assert [row["epoch"] for row in second] == [row["epoch"] for row in first]
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "cut" / "best.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "whole" / "best.json").read_text()))


def test_callback_counters_survive_a_backup(tmp_path):
    trainer = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    trainer.compile(optimizer="adam", loss="mse")
    trainer.optimizer.build(trainer.trainable_variables)
    stopper = keras.callbacks.EarlyStopping("val_dice", mode="max", patience=5)
    plateau = keras.callbacks.ReduceLROnPlateau("val_loss", patience=3)
    for callback in (stopper, plateau):
        callback.set_model(trainer)
        callback.on_train_begin()
    stopper.wait, stopper.best, stopper.best_epoch = 2, 0.75, 4
    plateau.wait, plateau.best, plateau.cooldown_counter = 1, 0.31, 0
    backup = RunBackup(tmp_path / "backup", {"stop": stopper, "plateau": plateau}, best=lambda: 0.75)
    backup.set_model(trainer)
    backup.on_epoch_end(6)
    state = read_backup(tmp_path / "backup")
    assert state["epoch"] == 7 and state["best"] == 0.75 and state["arrays"] == "epoch-0007.npz"
    fresh_stopper = keras.callbacks.EarlyStopping("val_dice", mode="max", patience=5)
    fresh_plateau = keras.callbacks.ReduceLROnPlateau("val_loss", patience=3)
    restore = RunBackup(tmp_path / "backup", {"stop": fresh_stopper, "plateau": fresh_plateau}, restored=state)
    for callback in (fresh_stopper, fresh_plateau, restore):  # the order of the run's callback list
        callback.set_model(trainer)
        callback.on_train_begin()
    assert (fresh_stopper.wait, fresh_stopper.best, fresh_stopper.best_epoch) == (2, 0.75, 4)
    assert (fresh_plateau.wait, fresh_plateau.best) == (1, 0.31)
    backup.on_epoch_end(7)  # the next generation replaces the previous arrays file
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["epoch-0008.npz", "state.json"]


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    config = dict(TINY, output_dir=str(tmp_path), name="r", epochs=2)
    with pytest.raises(Interrupted):
        train(config, callbacks=[StopAfter(0)], verbose=0)
    recorded = (tmp_path / "r" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"cannot resume .*r with other settings .*\(epochs: 2 -> 4; filters: 4 -> 8\)"
                                         r".*pass --overwrite"):
        train(dict(config, epochs=4, filters=8), resume=True, verbose=0)
    assert (tmp_path / "r" / "config.json").read_text() == recorded  # nothing rewritten
    # Export settings may change on resume, and a setting added since the run started is its default.
    older = json.loads(recorded)
    del older["skip_invalid"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(older))
    train(dict(config, export_saved_model=False), resume=True, verbose=0)
    assert len(_history(tmp_path / "r")) == 2


def _fail_on_second_call(write, calls):
    """`write`, except that its second call writes part of the file and finds the disk full."""

    def failing(owner, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(owner, path, *args, **kwargs)

    return failing


@pytest.mark.parametrize("writer", ["backup", "best model"])
def test_a_full_disk_names_the_file_and_keeps_the_last_good_state(tmp_path, monkeypatch, writer):
    calls = []
    if writer == "backup":
        monkeypatch.setattr(checkpoints, "_save_arrays", _fail_on_second_call(checkpoints._save_arrays, calls))
        failed_file = "backup/epoch-0002.npz"
    else:
        monkeypatch.setattr(keras.Model, "save", _fail_on_second_call(keras.Model.save, calls))
        failed_file = "model.keras"
    config = dict(TINY, output_dir=str(tmp_path), name="full", epochs=4, augment="none", learning_rate=1e-2)
    with pytest.raises(OSError) as failure:
        train(config, verbose=0)
    message = error_message(failure.value)  # what the command line prints
    assert re.match(f"no space left on the device while writing {tmp_path}/full/{failed_file}; the previous", message)
    run = tmp_path / "full"
    assert not [p for p in run.rglob("*") if p.name.startswith(".partial-")]  # no temporary file left
    state = read_backup(run / "backup")
    best = json.loads((run / "best.json").read_text())
    if writer == "backup":  # epoch 2's best model was written before its backup failed; it is trained again
        assert state["epoch"] == 1 and best["epoch"] in (1, 2)
    else:  # the first improvement was saved; the run failed saving the second one
        assert best["epoch"] <= state["epoch"] < 4
    model = keras.models.load_model(run / "model.keras")  # the last good model loads
    assert all(np.isfinite(w).all() for w in model.get_weights())
    monkeypatch.undo()
    train(config, resume=True, verbose=0)
    assert run_finished(run) and len(_history(run)) == 4


def _drop_root_override():
    """Child process set-up: without root's permission override, a read-only folder is read-only."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_output_directory_is_one_clear_line_and_nothing_written(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "unetpp_tf", "train", "--output-dir", str(locked / "runs"), "--name", "r",
             "--num-samples", "16", "--image-size", "32", "--depth", "2", "--filters", "4", "--epochs", "1"],
            capture_output=True, text=True, preexec_fn=_drop_root_override, timeout=300,
        )
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2
    assert result.stderr == (
        f"unetpp-tf: error: cannot write the run directory {locked / 'runs' / 'r'}: {locked} is not writable "
        "(read-only); choose a writable --output-dir.\n"
    )


def test_output_dir_that_is_a_file_and_damaged_backups_are_clear_errors(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(FileExistsError, match=r"cannot create the run directory .*taken/r: .*taken is a file, not a "
                                              r"folder; choose another --output-dir"):
        train(dict(TINY, output_dir=str(tmp_path / "taken"), name="r"), verbose=0)
    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    (backup / "state.json").write_text('{"epoch": 3, "arrays": "epoch-0003.npz"}')
    with pytest.raises(ValueError, match=r"backup/epoch-0003.npz named by .*state.json is missing; start the run "
                                         r"again with --overwrite"):
        read_backup(backup)
    (backup / "state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"state.json is not a training backup .*; start the run again with "
                                         r"--overwrite"):
        read_backup(backup)


def test_resume_removes_temporary_files_of_killed_writes_everywhere_in_the_run(tmp_path):
    from unetpp_tf.training import _clean_run_dir

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / ".partial-0a1b2c3d-predictions.png").write_bytes(b"half a figure")
    (tmp_path / ".partial-4e5f6a7b-backup").mkdir()
    (tmp_path / ".partial-4e5f6a7b-backup" / "epoch-0001.npz").write_bytes(b"half a backup")
    (tmp_path / "figures" / "curves.png").write_bytes(b"a finished figure")
    _clean_run_dir(tmp_path, resume=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["figures", "figures/curves.png"]
