"""Kill-safe training state: the best model, the history file, and the backup a resumed run continues from.

A run directory's `backup/` holds, while the run is unfinished:

    state.json        the commit record: epochs finished, the arrays file below, the best score,
                      the counters of EarlyStopping and ReduceLROnPlateau, whether training stopped,
                      the training phase whose optimizer the arrays hold (`training.training_phases`)
    epoch-0007.npz    every variable of the training model (weights, BatchNorm statistics, the
                      states of its random-seed generators) and of its optimizer (moments, step
                      count, learning rate)

Every file goes through `unetpp_tf.files` (temporary name, then rename). The arrays of each
epoch get a new name and `state.json`, written last, names them: a kill at any instant leaves
either the previous epoch's pair or the new one, never a mix, and a resumed run restores the
exact state of the last finished epoch. Public Keras APIs only (`Model.variables`,
`Optimizer.variables`, `Variable.assign`).

Example:
    >>> backup = RunBackup("run/backup", callbacks={"early_stopping": stopper})
    >>> state = read_backup("run/backup")   # None before the first epoch finished
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import keras
import numpy as np

from unetpp_tf.files import atomic_write, write_json, write_text

STATE_FILE = "state.json"

# The counters of Keras callbacks that a resumed run must continue from (public attributes).
CALLBACK_STATE = {
    keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
}


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save `model` as a `.keras` file through a temporary name, so `path` is always loadable.

    Example:
        >>> save_model(model, "run/model.keras")
    """
    return atomic_write(path, model.save)


def training_variables(trainer: keras.Model) -> dict:
    """The variables a resumed run needs: {"model": [...], "optimizer": [...]}, in a stable order.

    `Model.variables` includes the states of the seed generators (dropout, device
    augmentation); the optimizer's hold its moments, step count and learning rate.
    """
    return {"model": list(trainer.variables), "optimizer": list(trainer.optimizer.variables)}


def read_backup(directory: str | Path) -> dict | None:
    """The state of a run's last finished epoch, or None when no epoch finished yet.

    Args:
        directory: str or Path. The run's `backup/` folder.

    Returns:
        dict or None: `epoch` (epochs finished), `arrays` (file name), `best`, `callbacks`,
        `stopped`.

    Raises:
        ValueError: the state is unreadable or its arrays file is missing.

    Example:
        >>> read_backup("saved_models/run1/backup")["epoch"]
        7
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        arrays = Path(directory) / state["arrays"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a training backup ({error}); start the run again with --overwrite.") from None
    if not arrays.is_file():
        raise ValueError(f"{arrays} named by {path} is missing; start the run again with --overwrite.")
    return state


def restore_variables(trainer: keras.Model, directory: str | Path, state: dict, optimizer: bool = True) -> None:
    """Assign the arrays a backup recorded to `trainer`'s variables and its (built) optimizer's.

    Args:
        trainer: keras.Model. The compiled model `fit` runs, its optimizer built.
        directory: str or Path. The backup folder.
        state: dict. `read_backup(directory)`.
        optimizer: bool. Restore the optimizer's variables too; False keeps a fresh optimizer
            (a run that resumes where a new training phase starts). Defaults to True.

    Raises:
        ValueError: the backup holds other variables than this model (its settings changed).

    Example:
        >>> restore_variables(trainer, "run/backup", read_backup("run/backup"))
    """
    path = Path(directory) / state["arrays"]
    with np.load(path) as stored:
        for group, variables in training_variables(trainer).items():
            if group == "optimizer" and not optimizer:
                continue
            arrays = [stored[f"{group}/{k:04d}"] for k in range(int(stored[f"{group}/count"]))]
            shapes = [tuple(v.shape) for v in variables]
            if len(arrays) != len(variables) or any(a.shape != s for a, s in zip(arrays, shapes)):
                raise ValueError(
                    f"{path} holds {len(arrays)} {group} variables that do not match this run's {len(variables)}: "
                    "the model or optimizer settings changed. Resume with the run's settings, or pass --overwrite "
                    "to start again."
                )
            for variable, value in zip(variables, arrays):
                variable.assign(value)


def _save_arrays(trainer: keras.Model, path: Path) -> None:
    arrays = {}
    for group, variables in training_variables(trainer).items():
        arrays[f"{group}/count"] = np.asarray(len(variables))
        arrays.update({f"{group}/{k:04d}": np.asarray(v.numpy()) for k, v in enumerate(variables)})
    with open(path, "wb") as handle:  # a file object: savez would add ".npz" to a name
        np.savez(handle, **arrays)


class RunBackup(keras.callbacks.Callback):
    """Back up the whole training state after every epoch; restore the callbacks' counters on resume.

    Place it after the callbacks whose state it saves, so an epoch counts once their updates
    (and the history and best model) are written.

    The variables saved are those of the model `fit` runs (a wrapper such as `AugmentedModel`
    included) and of its optimizer.

    Args:
        directory: str or Path. The backup folder (created on the first save).
        callbacks: dict. {name: callback} whose counters (`CALLBACK_STATE`) are saved.
        best: callable or None. Returns the best score so far, recorded with each epoch.
        skip: callable or None. Returns True when an epoch must not be backed up (a diverged run).
        restored: dict or None. The state read on resume; its callback counters are put back
            at the start of training. Defaults to None.
        phase: str. The training phase, recorded with each epoch: a resumed run restores the
            optimizer only into the phase that saved it. Defaults to "train".

    Example:
        >>> backup = RunBackup(run / "backup", {"plateau": plateau}, best=lambda: checkpoint.best)
    """

    def __init__(self, directory, callbacks=None, best=None, skip=None, restored=None, phase: str = "train"):
        super().__init__()
        self.directory = Path(directory)
        self.stateful = dict(callbacks or {})
        self.best, self.skip, self.restored, self.phase = best, skip, restored, phase

    def on_train_begin(self, logs=None):
        saved = (self.restored or {}).get("callbacks", {})
        for name, callback in self.stateful.items():
            for key, value in saved.get(name, {}).items():
                setattr(callback, key, value)

    def on_epoch_end(self, epoch, logs=None):
        if self.skip is not None and self.skip():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = f"epoch-{epoch + 1:04d}.npz"
        atomic_write(self.directory / arrays, lambda temp: _save_arrays(self.model, temp))
        state = {
            "epoch": epoch + 1,
            "arrays": arrays,
            "best": None if self.best is None else self.best(),
            "callbacks": {name: _counters(callback) for name, callback in self.stateful.items()},
            "stopped": bool(self.model.stop_training),
            "phase": self.phase,
        }
        write_json(self.directory / STATE_FILE, state)
        for old in self.directory.glob("epoch-*.npz"):  # older generations: no longer named by the state
            if old.name != arrays:
                old.unlink(missing_ok=True)


def _counters(callback) -> dict:
    names = next((names for kind, names in CALLBACK_STATE.items() if isinstance(callback, kind)), ())
    return {name: _plain(getattr(callback, name)) for name in names if hasattr(callback, name)}


def _plain(value):
    """A JSON-ready counter: None, an int or a float (infinities are written as JSON's Infinity)."""
    if value is None:
        return None
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the plain model whenever `monitor` improves (higher is better); record the score in `state`.

    The model is written before its score, each through a temporary name.

    Args:
        model_to_save: keras.Model. The model to write (not a training wrapper).
        path: Path. The `.keras` file.
        monitor: str. A log key, higher is better (e.g. "val_dice").
        state: Path. JSON file of the best score and its epoch.
        best: float. The best score so far (a resumed run's). Defaults to -inf.
        saving: callable or None. Returns a context manager the model is written in (e.g. one
            that makes frozen layers trainable, so the file does not record the training phase).
            Defaults to None.

    Example:
        >>> BestModelCheckpoint(model, run / "model.keras", "val_dice", run / "best.json")
    """

    def __init__(
        self, model_to_save: keras.Model, path: Path, monitor: str, state: Path, best: float = -math.inf, saving=None
    ):
        super().__init__()
        self.model_to_save, self.path, self.monitor, self.state = model_to_save, Path(path), monitor, Path(state)
        self.best = best
        self.saving = saving or contextlib.nullcontext

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"monitor {self.monitor!r} not in the logs {sorted(logs or {})}.")
        if math.isfinite(value) and value > self.best and not self.model.stop_training:
            with self.saving():
                save_model(self.model_to_save, self.path)
            self.best = float(value)
            write_json(self.state, {"best": self.best, "epoch": epoch + 1, "monitor": self.monitor})


class HistoryFile(keras.callbacks.Callback):
    """Write `history.csv` (one row per epoch: "epoch" then the log keys) whole, after every epoch.

    A resumed run keeps the rows of the epochs before `start_epoch` and drops any later row
    (an epoch logged but not backed up before a kill is trained again).

    Args:
        path: Path. The CSV file.
        start_epoch: int. The first epoch this `fit` trains. Defaults to 0.

    Example:
        >>> HistoryFile(run / "history.csv", start_epoch=state["epoch"])
    """

    def __init__(self, path, start_epoch: int = 0):
        super().__init__()
        self.path, self.start_epoch = Path(path), start_epoch
        self.rows = [row for row in read_history_rows(self.path) if int(row["epoch"]) < start_epoch]

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})
        keys = sorted({k for row in self.rows for k in row} - {"epoch"})
        text = io.StringIO()
        writer = csv.DictWriter(text, ["epoch", *keys], restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, text.getvalue())


def read_history_rows(path: str | Path) -> list[dict]:
    """The rows of a history.csv as dicts of strings; [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
