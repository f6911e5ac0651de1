"""Evaluate a model (or an ensemble) over a dataset: dataset-level and per-image metrics.

Dataset-level scores come from confusion counts summed over every pixel of every image, so
they equal the streaming `unetpp_tf.metrics` classes over the same data (a mean of per-image
scores would weight small and empty images differently). Per-image rows use the same
formulas on each image's own counts.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import keras
import numpy as np

from unetpp_tf import files
from unetpp_tf.data.pipeline import SegmentationData
from unetpp_tf.inference import as_single_output
from unetpp_tf.metrics import confusion_counts, pixel_accuracy, ratios_from_counts

METRIC_KEYS = ("dice", "iou", "precision", "recall", "f1", "accuracy")


def _scores(counts) -> tuple[dict, dict]:
    """(per-class ratios [..., K], scores averaged over classes with pixel accuracy [...])."""
    per_class = {k: keras.ops.convert_to_numpy(v) for k, v in ratios_from_counts(*counts).items()}
    overall = {k: per_class[k].mean(axis=-1) for k in METRIC_KEYS}
    overall["accuracy"] = keras.ops.convert_to_numpy(pixel_accuracy(*counts))
    return per_class, overall


def evaluate(
    model_or_models,
    dataset,
    *,
    num_classes: int | None = None,
    threshold: float = 0.5,
    mode: str = "accurate",
    level: int | None = None,
    names=None,
) -> dict:
    """Score a model, or the mean probabilities of several (an ensemble), over a dataset.

    Args:
        model_or_models: keras.Model, str or list of them. One model, or several whose
            probability outputs are averaged; paths are loaded with `load_model`.
        dataset: iterable of (images, masks) batches, e.g. `data.test`; masks are int class
            ids [B, H, W, 1].
        num_classes: int or None. 1 for binary, K for K classes; None reads it from the
            model's output channels. Defaults to None.
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        mode: str. "accurate" or "fast" for deep-supervision models. Defaults to "accurate".
        level: int or None. Head for "fast" mode (None: the deepest). Defaults to None.
        names: list of str or None. One name per image for the per-image rows; None uses
            the image index. Defaults to None.

    Returns:
        dict: {"metrics": {"dice", "iou", "precision", "recall", "f1", "accuracy", "images"
        [, "per_class": {metric: [K values]}]}, "per_image": [{"index", "name", "dice", ...}]}.
        Dataset values pool the confusion counts of all images; multi-class values are the
        mean over classes, except "accuracy", the fraction of correctly labelled pixels.

    Example:
        >>> report = evaluate(model, data.test)
        >>> report["metrics"]["dice"], report["per_image"][0]["iou"]
    """
    if isinstance(dataset, SegmentationData):
        raise ValueError("dataset is a SegmentationData; pass one split, e.g. data.test or data.val.")
    many = isinstance(model_or_models, (list, tuple))
    models = [as_single_output(m, mode, level) for m in (model_or_models if many else [model_or_models])]
    if not models:
        raise ValueError("model_or_models is an empty list; pass a model or a list of models.")
    channels = {m.outputs[0].shape[-1] for m in models}
    if len(channels) > 1:
        raise ValueError(f"the models of an ensemble must have the same output channels, got {sorted(channels)}.")
    num_classes = num_classes or channels.pop()
    batches = []
    for batch in dataset:
        images, masks = batch[0], batch[1]
        probs = sum(np.asarray(m.predict_on_batch(images)) for m in models) / len(models)
        counts = confusion_counts(masks, probs, num_classes, threshold, per_sample=True)
        batches.append([keras.ops.convert_to_numpy(c) for c in counts])
    if not batches:
        raise ValueError("the dataset is empty: no batch to evaluate.")
    counts = [np.concatenate(parts) for parts in zip(*batches)]
    count = len(counts[0])
    if names is not None and len(names) != count:
        raise ValueError(f"names has {len(names)} entries but the dataset has {count} images; give one name per image.")

    per_class, overall = _scores([c.sum(axis=0) for c in counts])
    metrics = {k: float(overall[k]) for k in METRIC_KEYS}
    if num_classes > 1:
        metrics["per_class"] = {k: [float(v) for v in per_class[k]] for k in METRIC_KEYS}
    metrics["images"] = count
    _, image_scores = _scores(counts)
    rows = [
        {"index": i, "name": str(names[i]) if names is not None else str(i),
         **{k: float(image_scores[k][i]) for k in METRIC_KEYS}}
        for i in range(count)
    ]
    return {"metrics": metrics, "per_image": rows}


def write_per_image_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write the per-image rows of `evaluate` as CSV (atomically; parent folders created).

    Args:
        rows: list of dict. `evaluate(...)["per_image"]`.
        path: str or Path. The CSV file.

    Returns:
        Path: the file written.

    Example:
        >>> write_per_image_csv(report["per_image"], "run/per_image.csv")
    """
    if not rows:
        raise ValueError("rows is empty; nothing to write to the per-image CSV.")

    def write(temp):
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return files.atomic_write(_with_parent(path), write)


def write_metrics_json(metrics: dict, path: str | os.PathLike) -> Path:
    """Write a metrics dict (e.g. `evaluate(...)["metrics"]`) as indented JSON, atomically.

    Args:
        metrics: dict. JSON-serializable values.
        path: str or Path. The JSON file.

    Returns:
        Path: the file written.

    Example:
        >>> write_metrics_json(report["metrics"], "run/metrics.json")
    """
    return files.write_json(_with_parent(path), metrics)


def _with_parent(path) -> Path:
    """`path` with its parent folders created (a failure names them)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise files.write_error(path.parent, error) from error
    return path
