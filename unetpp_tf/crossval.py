"""Cross-validation, nnU-Net style: K models on K disjoint validation folds, served as one ensemble.

`train_folds(config)` (what `unetpp-tf train --folds K` calls) opens the folder data once,
keeps its test split aside, divides the rest into K folds (whole groups per fold with
`group_by`), and trains one ordinary run per fold, each validating on its own fold. The run
directory then holds:

    fold_1/ ... fold_K/  a complete run each (config, model.keras, history, splits.json, ...)
    model.keras          the ensemble: the mean of the K models (`unetpp_tf.models.ensemble`)
    folds.json           per-fold validation Dice, mean and standard deviation
    metrics.json         the ensemble's test metrics, the fold summary, parameters, timings
    splits.json          the test files and the pool the folds were cut from
    export/              the ensemble's SavedModel / TFLite, as for a single run

so `predict`, `evaluate` and `export` on the run directory use the ensemble without flags.
"""

from __future__ import annotations

import dataclasses
import json
import time

import keras
import numpy as np

from unetpp_tf.checkpoints import save_model
from unetpp_tf.config import TrainConfig
from unetpp_tf.data import fold_indices
from unetpp_tf.files import write_json
from unetpp_tf.models.ensemble import ensemble_model
from unetpp_tf.training import (
    CONFIG_FILE,
    SPLITS_FILE,
    as_config,
    check_encoder_weights,
    finish_run,
    load_data,
    prepare_run_dir,
    read_splits,
    run_finished,
    train,
    training_policy,
)

FOLDS_FILE = "folds.json"


def fold_splits(files: dict, folds: int, seed: int = 0) -> list[dict]:
    """Cut a folder dataset's train and val files into `folds` train/val splits sharing its test split.

    Args:
        files: dict. `SegmentationData.files` (or a run's splits.json): "train", "val",
            "test" lists of (image, mask) and, with `group_by`, "groups" per split.
        folds: int. Number of folds, >= 2.
        seed: int. Seed of the fold assignment. Defaults to 0.

    Returns:
        list of dict: K {"train", "val", "test"} file lists; the val parts are disjoint and
        together hold every train and val file once.

    Example:
        >>> parts = fold_splits(data.files, 5)
        >>> len(parts), len(parts[0]["test"]) == len(data.files["test"])
    """
    pool = [list(pair) for pair in files["train"]] + [list(pair) for pair in files["val"]]
    groups = files.get("groups") or {}
    keys = list(groups.get("train", [])) + list(groups.get("val", [])) if groups else None
    parts = fold_indices(len(pool), folds, seed=seed, groups=keys)
    test = [list(pair) for pair in files["test"]]
    return [{"train": [pool[i] for i in p["train"]], "val": [pool[i] for i in p["val"]], "test": test} for p in parts]


def train_folds(
    config: TrainConfig | dict,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    verbose="auto",
):
    """Train `config.folds` models on disjoint validation folds and write their ensemble as the run's model.

    Each fold is a complete run in `RUN/fold_k` (no exports of its own); `resume=True`
    skips finished folds and resumes the interrupted one, on the recorded files.

    Args:
        config: TrainConfig or dict. Settings with `folds` >= 2 and folder data.
        resume: bool. Continue an interrupted cross-validation run. Defaults to False.
        overwrite: bool. Replace an existing run of the same name. Defaults to False.
        callbacks: list or None. Extra Keras callbacks for every fold's `fit`. Defaults to None.
        verbose: "auto", 0, 1 or 2. Keras' progress output. Defaults to "auto".

    Returns:
        tuple: (run directory Path, {"fold_k": history dict, ...}).

    Example:
        >>> run, histories = train_folds({"data": "my_folder", "folds": 5, "group_by": r"^(slide\\d+)_"})
    """
    config = as_config(config)
    if config.folds < 2:
        raise ValueError(f"train_folds needs folds >= 2, got {config.folds}.")
    run = prepare_run_dir(config, resume, overwrite)
    config.check_training_size()
    check_encoder_weights(config)
    started = time.time()
    data = load_data(config, splits=read_splits(run) if resume and (run / SPLITS_FILE).exists() else None)
    if not data.files:
        raise ValueError(f"--folds needs a folder dataset (files to divide into folds), not {config.data!r}.")
    parts = fold_splits(data.files, config.folds, config.seed)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / CONFIG_FILE, config.to_dict())
    write_json(run / SPLITS_FILE, {k: data.files[k] for k in ("train", "val", "test")})
    single = dataclasses.replace(config, folds=0, output_dir=str(run), export_saved_model=False, export_tflite=False)
    histories, summary = {}, []
    for k, splits in enumerate(parts, 1):
        name = f"fold_{k}"
        if not (resume and run_finished(run / name)):
            fold_resume = resume and (run / name / "backup").exists()
            _, histories[name] = train(
                dataclasses.replace(single, name=name), resume=fold_resume, overwrite=not fold_resume,
                splits=splits, callbacks=callbacks, verbose=verbose,
            )
        record = json.loads((run / name / "metrics.json").read_text())
        summary.append({"fold": k, "val_images": len(splits["val"]), "best_val_dice": record["best_val_dice"],
                        "test_dice": record["test"]["dice"]})
    scores = np.array([row["best_val_dice"] for row in summary])
    folds = {"folds": summary, "val_dice_mean": float(scores.mean()), "val_dice_std": float(scores.std())}
    write_json(run / FOLDS_FILE, folds)
    with training_policy(config):
        models = [keras.models.load_model(run / f"fold_{k}" / "model.keras", compile=False)
                  for k in range(1, len(parts) + 1)]
        save_model(ensemble_model(models), run / "model.keras")
        finish_run(config, data, run, {"cross_validation": folds, "train_seconds": round(time.time() - started, 1)},
                   None)
    return run, histories
