"""Evaluate a model (or an ensemble) over a dataset: dataset-level and per-image metrics.

Dataset-level scores come from confusion counts summed over every pixel of every image, so
they equal the streaming `unetpp_tf.metrics` classes over the same data (a mean of per-image
scores would weight small and empty images differently). Per-image rows use the same
formulas on each image's own counts.

Scans (`evaluate_volumes`) are scored volume by volume, as medical benchmarks report them:
Dice and IoU of the foreground classes plus the surface distances HD95 and ASSD in mm
(`unetpp_tf.surface_distance`), and the means of those per-volume values. With a pixel
`spacing`, `evaluate` adds the same distances to its per-image rows. A distance is infinite
when exactly one of prediction and reference is empty for a class; means leave those out and
"undefined_distances" counts them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import keras
import numpy as np

from unetpp_tf import files
from unetpp_tf.data.pipeline import SegmentationData
from unetpp_tf.inference import as_single_output, labels_from_probabilities
from unetpp_tf.metrics import confusion_counts, pixel_accuracy, ratios_from_counts
from unetpp_tf.postprocess import apply_postprocessing, check_postprocessing

METRIC_KEYS = ("dice", "iou", "precision", "recall", "f1", "accuracy")
DISTANCE_KEYS = ("hd95", "assd")


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
    spacing=None,
    postprocess=None,
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
        spacing: tuple or None. Pixel size (sy, sx) (e.g. mm): per-image rows then also hold
            "hd95" and "assd" in those units (`unetpp_tf.surface_distance`; the foreground for
            binary models, the mean over classes 1..K-1 otherwise, inf when one of prediction
            and mask is empty), and "metrics" their means over the images where they are
            finite, with "undefined_distances" counting the others. Defaults to None.
        postprocess: dict, list or None. Post-processing steps (`unetpp_tf.postprocess`, e.g.
            a run's `read_postprocessing(run)`) applied to each label map before it is scored.
            Defaults to None (the maps as predicted).

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
    if spacing is not None:
        spacing = _check_spacing(spacing, 2, "spacing")
    steps = check_postprocessing(postprocess)["steps"]
    batches, distances = [], []
    for batch in dataset:
        # numpy in and out: tf.data gives TensorFlow tensors whatever backend the models run on
        images, masks = np.asarray(batch[0]), np.asarray(batch[1])
        probs = sum(np.asarray(m.predict_on_batch(images)) for m in models) / len(models)
        if steps:
            probs = _postprocessed(probs, threshold, steps)
        counts = confusion_counts(masks, probs, num_classes, threshold, per_sample=True)
        batches.append([keras.ops.convert_to_numpy(c) for c in counts])
        if spacing is not None:
            predicted = labels_from_probabilities(probs, threshold)
            truth = _truth_labels(masks, num_classes)
            distances.extend(_distances(p, t, num_classes, spacing) for p, t in zip(predicted, truth))
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
    if spacing is not None:
        for row, (hd95, assd) in zip(rows, distances):
            row["hd95"], row["assd"] = _class_mean(hd95), _class_mean(assd)
        metrics.update(_distance_means(rows))
    return {"metrics": metrics, "per_image": rows}


def _postprocessed(probs: np.ndarray, threshold: float, steps: list) -> np.ndarray:
    """Probabilities that score as the post-processed label maps: 0/1 (binary) or one-hot (K classes)."""
    labels = apply_postprocessing(labels_from_probabilities(probs, threshold), {"steps": steps}, batched=True)
    if probs.shape[-1] == 1:
        return labels[..., None].astype("float32")
    return np.eye(probs.shape[-1], dtype="float32")[labels]


# ----------------------------------------------------------------------------- surface distances


def _check_spacing(spacing, ndim: int, label: str) -> tuple:
    values = tuple(spacing) if isinstance(spacing, (list, tuple, np.ndarray)) else ()
    if len(values) != ndim or not all(isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0
                                      for v in values):
        axes = "(sy, sx)" if ndim == 2 else "(sz, sy, sx)"
        raise ValueError(f"{label} must be {ndim} positive voxel sizes {axes}, e.g. in mm; got {spacing!r}.")
    return tuple(float(v) for v in values)


def _truth_labels(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids [N, H, W] from masks [N, H, W(, 1)] as `confusion_counts` reads them (binary: >= 0.5)."""
    if masks.ndim == 4 and masks.shape[-1] == num_classes > 1:  # one-hot; all-zero rows are void
        return np.where(masks.max(axis=-1) > 0, masks.argmax(axis=-1), num_classes)
    masks = masks[..., 0] if masks.ndim == 4 and masks.shape[-1] == 1 else masks
    if num_classes == 1:
        return (masks >= 0.5).astype(np.uint8)
    return masks


def _scored_classes(num_classes: int) -> list[int]:
    """Classes with a surface worth measuring: the foreground (binary) or 1..K-1 (background left out)."""
    return [1] if num_classes == 1 else list(range(1, num_classes))


def _distances(predicted, truth, num_classes, spacing) -> tuple[list, list]:
    """(HD95 per scored class, ASSD per scored class) for one image or volume; void voxels
    (multi-class ids >= num_classes) belong to no class, in the prediction either."""
    from unetpp_tf.surface_distance import average_surface_distance, hausdorff_distance

    valid = truth < num_classes if num_classes > 1 else True
    hd95, assd = [], []
    for c in _scored_classes(num_classes):
        pred, ref = (predicted == c) & valid, truth == c
        hd95.append(hausdorff_distance(pred, ref, spacing, percentile=95))
        assd.append(average_surface_distance(pred, ref, spacing))
    return hd95, assd


def _class_mean(values) -> float:
    """Mean over classes; inf when any class's value is (an empty prediction or reference)."""
    return float(np.mean(values)) if np.all(np.isfinite(values)) else float("inf")


def _finite_mean(values) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _distance_means(rows) -> dict:
    """Means of the rows' distances over the rows where they are finite, and how many were not."""
    means = {key: _finite_mean([row[key] for row in rows]) for key in DISTANCE_KEYS}
    means["undefined_distances"] = sum(not np.isfinite(row["hd95"]) for row in rows)
    return means


def _volume_counts(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """(tp, fp, fn, tn) per scored class of one volume, counted as `confusion_counts` does
    (binary: label >= 1 is foreground; multi-class: voxels labelled >= num_classes are void)."""
    if num_classes == 1:
        valid, truth = np.ones(truth.shape, bool), (truth >= 1).astype(np.uint8)
    else:
        valid = (truth >= 0) & (truth < num_classes)
    counts = []
    for c in _scored_classes(num_classes):
        pred, ref = (predicted == c) & valid, truth == c
        tp = np.count_nonzero(pred & ref)
        fp, fn = np.count_nonzero(pred) - tp, np.count_nonzero(ref) - tp
        counts.append((tp, fp, fn, np.count_nonzero(valid) - tp - fp - fn))
    return [np.array(column, np.float64) for column in zip(*counts)]


def _class_labels(num_classes: int, class_names) -> list[str]:
    """Names of the scored classes (1..K-1) from names of all K classes or of the K-1 foreground ones."""
    scored = _scored_classes(num_classes)
    if class_names is None:
        return [f"class{c}" for c in scored]
    names = [str(n) for n in class_names]
    if len(names) == num_classes and num_classes > 1:
        return names[1:]
    if len(names) == len(scored):
        return names
    raise ValueError(
        f"class_names has {len(names)} entries; give {num_classes} (every class, background first) "
        f"or {len(scored)} (the foreground classes)."
    )


def evaluate_volumes(
    model,
    volumes,
    *,
    num_classes: int | None = None,
    threshold: float = 0.5,
    patch_size=None,
    overlap: float = 0.5,
    batch_size: int | None = None,
    class_names=None,
    window=None,
    postprocess=None,
) -> dict:
    """Score a model scan by scan: Dice, IoU, HD95 and ASSD (mm) of each foreground class.

    Each volume is predicted whole with `unetpp_tf.volume_inference.predict_volume`
    (Gaussian-weighted sliding windows for a 3D model, slice by slice for a 2D/2.5D one),
    and compared with its label on its own grid, distances using its voxel spacing. Scored
    classes are the foreground of a binary model and classes 1..K-1 of a softmax one (the
    background is left out, as medical benchmarks do). Dice and IoU are 1.0 for a class absent
    from both label and prediction (as in `unetpp_tf.metrics`); HD95 and ASSD are 0.0 then,
    and inf when exactly one of them is empty.

    Args:
        model: keras.Model or str. A 3D or 2D/2.5D model (deep-supervision models run in
            "accurate" mode), or a path.
        volumes: list of Volume. Scans with labels, e.g. `data.volumes["test"]`, their images
            as the model takes them (already windowed).
        num_classes: int or None. 1 for binary, K for K classes; None reads the model's output
            channels. Defaults to None.
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        patch_size: int, tuple or None. Sliding windows (3D) or in-plane tiles (2D); None
            uses the model's fixed input size. Defaults to None.
        overlap: float. Window overlap. Defaults to 0.5.
        batch_size: int or None. Patches or slices per pass (None: 2 for 3D, 8 for 2D).
            Defaults to None.
        class_names: list of str or None. Names for the per-class columns: all K classes
            (background first) or the K-1 foreground ones; None gives "class1".. Defaults to None.
        window: str, tuple or None. Window the images first with
            `unetpp_tf.data.volumes.apply_window` (for raw HU volumes); None feeds them as they
            are. Defaults to None.
        postprocess: dict, list or None. Post-processing steps applied to each predicted label
            volume before it is scored (`unetpp_tf.postprocess`). Defaults to None.

    Returns:
        dict: {"metrics": {"dice", "iou", "hd95", "assd", "volumes", "undefined_distances"
        [, "classes", "per_class": {metric: [one value per scored class]}]}, "per_image":
        [{"index", "name", "dice", "iou", "hd95", "assd"[, "dice_<class>", ...]}]}. A row's
        values are the mean over its scored classes (its distances inf if any class's is);
        "metrics" holds the means over volumes, distances over the finite values only, with
        "undefined_distances" counting the rows left out. Written by `write_per_image_csv` and
        `write_metrics_json` like `evaluate`'s.

    Example:
        >>> report = evaluate_volumes(model, data.volumes["test"], num_classes=3, patch_size=(32, 64, 64))
        >>> report["metrics"]["per_class"]["dice"], report["per_image"][0]["hd95"]
    """
    from unetpp_tf.volume_inference import predict_volume

    if isinstance(volumes, SegmentationData):
        raise ValueError('volumes is a SegmentationData; pass the scans of one split, e.g. data.volumes["test"].')
    if isinstance(volumes, dict):
        raise ValueError(
            f'volumes is a dict (keys {sorted(volumes)}); pass the scans of one split, e.g. data.volumes["test"].'
        )
    volumes = list(volumes)
    if not volumes:
        raise ValueError("volumes is empty: no scan to evaluate.")
    unlabelled = [getattr(v, "name", str(i)) for i, v in enumerate(volumes) if getattr(v, "label", None) is None]
    if unlabelled:
        raise ValueError(f"volume(s) {', '.join(map(str, unlabelled))} have no label to score against.")
    model = as_single_output(model)
    num_classes = num_classes or int(model.outputs[0].shape[-1])
    labels = _class_labels(num_classes, class_names)
    postprocess = check_postprocessing(postprocess)
    rows, per_class = [], {key: [] for key in ("dice", "iou", *DISTANCE_KEYS)}
    for index, volume in enumerate(volumes):
        image = volume.image
        if window is not None:
            from unetpp_tf.data.volumes import apply_window

            image = apply_window(image, window)
        probs = predict_volume(model, image, patch_size=patch_size, overlap=overlap, batch_size=batch_size)
        if probs.shape[:3] != volume.label.shape[:3]:
            raise ValueError(
                f"volume {volume.name}: label shape {volume.label.shape} differs from its image {probs.shape[:3]}."
            )
        predicted = apply_postprocessing(labels_from_probabilities(probs, threshold), postprocess)
        del probs
        truth = np.asarray(volume.label)
        truth = truth[..., 0] if truth.ndim == 4 else truth
        ratios = {k: keras.ops.convert_to_numpy(v) for k, v in
                  ratios_from_counts(*_volume_counts(predicted, truth, num_classes)).items()}
        ref = (truth >= 1).astype(np.uint8) if num_classes == 1 else truth
        spacing = _check_spacing(volume.spacing, 3, f"volume {volume.name} spacing")
        hd95, assd = _distances(predicted, ref, num_classes, spacing)
        values = {"dice": ratios["dice"], "iou": ratios["iou"], "hd95": hd95, "assd": assd}
        row = {"index": index, "name": str(volume.name),
               "dice": float(np.mean(ratios["dice"])), "iou": float(np.mean(ratios["iou"])),
               "hd95": _class_mean(hd95), "assd": _class_mean(assd)}
        if num_classes > 1:
            for key, per in values.items():
                row.update({f"{key}_{name}": float(v) for name, v in zip(labels, per)})
        for key, per in values.items():
            per_class[key].append([float(v) for v in per])
        rows.append(row)
    metrics = {"dice": float(np.mean([r["dice"] for r in rows])), "iou": float(np.mean([r["iou"] for r in rows]))}
    metrics.update(_distance_means(rows))
    metrics["volumes"] = len(rows)
    if num_classes > 1:
        metrics["classes"] = labels
        metrics["per_class"] = {
            key: [(_finite_mean if key in DISTANCE_KEYS else np.mean)(column) for column in zip(*table)]
            for key, table in per_class.items()
        }
        metrics["per_class"] = {key: [None if v is None else float(v) for v in column]
                                for key, column in metrics["per_class"].items()}
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
