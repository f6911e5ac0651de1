"""Ensembles: one model whose output is the mean of several models' probabilities."""

from __future__ import annotations

import keras

from unetpp_tf.models.pruning import INFERENCE_MODES, inference_model


def ensemble_model(models, mode: str = "accurate", name: str = "ensemble") -> keras.Model:
    """Average the probabilities of several segmentation models in one functional model.

    Each member is first made single-output (deep-supervision models through
    `inference_model(model, mode)`, the mean of their heads by default) and wrapped as a
    sub-model named `member_1`, `member_2`, ...; the output is their mean. The result saves
    to one `.keras` file, loads, predicts, evaluates and exports like any model, which is how
    a cross-validation run (`unetpp_tf.crossval`) serves its folds.

    Args:
        models: list of keras.Model. Two or more models with the same input channels and
            output classes (e.g. the folds of a cross-validation run).
        mode: str. "accurate" or "fast" for deep-supervision members. Defaults to "accurate".
        name: str. Model name. Defaults to "ensemble".

    Returns:
        keras.Model: a single-output model sharing the members' weights.

    Example:
        >>> folds = [keras.models.load_model(f"run/fold_{k}/model.keras") for k in (1, 2, 3)]
        >>> model = ensemble_model(folds)
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}.")
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}.")
    singles = [inference_model(m, mode) if len(m.outputs) > 1 else m for m in models]
    channels = {tuple(m.inputs[0].shape[1:]) for m in singles}
    classes = {m.outputs[0].shape[-1] for m in singles}
    if len(channels) > 1 or len(classes) > 1:
        raise ValueError(
            f"ensemble members differ in input shape {sorted(map(str, channels))} or output classes "
            f"{sorted(classes)}; combine models trained on the same task."
        )
    inputs = keras.Input(singles[0].inputs[0].shape[1:], name="image")
    members = [
        keras.Model(m.inputs, m.outputs[0], name=f"member_{k}")(inputs) for k, m in enumerate(singles, 1)
    ]
    return keras.Model(inputs, keras.layers.Average(name="ensemble_mean", dtype="float32")(members), name=name)
