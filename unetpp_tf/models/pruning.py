"""Inference-time use of deep supervision: pruning to one head, or averaging the heads."""

from __future__ import annotations

import re

import keras

INFERENCE_MODES = ("accurate", "fast")
_HEAD = re.compile(r"output_(\d+)$")


def supervision_heads(model: keras.Model) -> dict[int, keras.layers.Layer]:
    """Return the output heads of a UNet++ model keyed by their column j.

    Args:
        model: keras.Model. A model from `build_unetpp`.

    Returns:
        dict: {j: layer} for every model output named `output_{j}`.

    Example:
        >>> model = build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True)
        >>> sorted(supervision_heads(model))
        [1, 2]
    """
    heads = {}
    for name in model.output_names:
        match = _HEAD.match(name)
        if match:
            heads[int(match.group(1))] = model.get_layer(name)
    return heads


def required_heads(model: keras.Model, action: str) -> dict[int, keras.layers.Layer]:
    """`supervision_heads`, or a ValueError saying the model cannot `action` without deep supervision.

    Example:
        >>> required_heads(build_unetpp((32, 32, 1), depth=2, filters=4), "prune")
        Traceback (most recent call last):
        ValueError: cannot prune model 'unetpp': it was not built with deep supervision ...
    """
    heads = supervision_heads(model)
    if len(heads) < 2:
        names = ", ".join(model.output_names)
        raise ValueError(
            f"cannot {action} model {model.name!r}: it was not built with deep supervision "
            f"(its only output is {names}). The columns X(0, 1..depth-1) have no trained head "
            "of their own, so a pruned output would be untrained; build it with "
            "build_unetpp(..., deep_supervision=True) and train with a loss on every head."
        )
    return heads


def prune(model: keras.Model, level: int) -> keras.Model:
    """Return the sub-network that computes head `level` (the paper's UNet++ L_level).

    Every node that head does not need is dropped. The pruned model shares the layers,
    and so the trained weights, of `model` (no copy, no retraining): its output equals
    the full model's `output_{level}` and it saves, loads and exports like any model.

    Args:
        model: keras.Model. A UNet++ built with `deep_supervision=True`.
        level: int. The head to keep, 1..depth.

    Returns:
        keras.Model: single-output model named `{model.name}_L{level}`.

    Example:
        >>> full = build_unetpp((96, 96, 1), deep_supervision=True)
        >>> fast = prune(full, 2)   # X(0,0..2), X(1,0..1), X(2,0) and head 2
    """
    heads = required_heads(model, "prune")
    if isinstance(level, bool) or not isinstance(level, int) or level not in heads:
        raise ValueError(
            f"prune level must be an integer in 1..{max(heads)} (the heads of this depth-"
            f"{max(heads)} model), got {level!r}."
        )
    return keras.Model(model.inputs, heads[level].output, name=f"{model.name}_L{level}")


def inference_model(model: keras.Model, mode: str = "accurate", level: int | None = None) -> keras.Model:
    """Turn a deep-supervision UNet++ into a single-output model for inference.

    "accurate" averages the probabilities of all heads; "fast" keeps head `level`
    (default: the deepest) and prunes the rest away, as in the paper.

    Args:
        model: keras.Model. A UNet++ built with `deep_supervision=True`.
        mode: str. "accurate" or "fast". Defaults to "accurate".
        level: int or None. The head for "fast" mode. Defaults to the deepest head.

    Returns:
        keras.Model: a model with one output, sharing `model`'s weights.

    Example:
        >>> full = build_unetpp((96, 96, 1), deep_supervision=True)
        >>> accurate = inference_model(full, "accurate")
        >>> fast = inference_model(full, "fast", level=3)
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}.")
    heads = required_heads(model, f"use {mode!r} mode on")
    if mode == "fast":
        return prune(model, max(heads) if level is None else level)
    if level is not None:
        raise ValueError("level selects a head for mode='fast'; 'accurate' averages all heads, leave level unset.")
    mean = keras.layers.Average(name="output")([heads[j].output for j in sorted(heads)])
    return keras.Model(model.inputs, mean, name=f"{model.name}_accurate")
