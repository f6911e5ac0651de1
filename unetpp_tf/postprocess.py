"""Post-processing of predicted label maps, chosen on the validation split.

Three operations clean a map of integer class ids (2D [H, W] or 3D [D, H, W]; binary maps are
{0, 1}, multi-class maps 0..K-1 with 0 the background), each class on its own:

- `remove_small_components`: connected components of a class smaller than `min_size` pixels
  (voxels) become background.
- `keep_largest_component`: only the largest component of a class is kept; the others become
  background.
- `fill_holes`: background regions enclosed by a class become that class.

Connectivity: a class's components are connected through faces, edges and corners (8
neighbours in 2D, 26 in 3D), so a diagonal chain of pixels is one object. Background regions
(holes) are connected through faces only (4 in 2D, 6 in 3D), the dual choice: a background
region that meets the outside only at a corner is enclosed (as `scipy.ndimage.binary_fill_holes`
sees it). A hole is a face-connected background region that does not touch the map's border
and whose neighbours all belong to the class; a background region that also touches another
class is not a hole of either, and pixels of other classes are never changed.

A post-processing spec is a JSON-serializable dict of steps applied in order, e.g.
`{"steps": [{"op": "remove_small", "min_size": 37}, {"op": "keep_largest", "classes": [1]},
{"op": "fill_holes"}]}` ("classes" left out: every foreground class). `choose_postprocessing`
tries candidate steps greedily on predictions of the validation split and keeps a step only
if it raises the validation Dice, pooled as `unetpp_tf.evaluation.evaluate` pools it;
`write_postprocessing` / `read_postprocessing` keep the chosen spec in a run directory
(`postprocess.json`) for `predict` to apply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetpp_tf import files

POSTPROCESS_FILE = "postprocess.json"
OPS = ("keep_largest", "remove_small", "fill_holes")
POOLINGS = ("dataset", "volumes")
DEFAULT_MIN_GAIN = 1e-6
_STEP_FIELDS = {"keep_largest": {"op", "classes"}, "remove_small": {"op", "min_size", "classes"},
                "fill_holes": {"op", "classes"}}
_MAX_CLASS_ID = 65535
_SIZE_FRACTIONS = (0.1, 0.25, 0.5, 0.8)  # of the smallest true object, for remove_small candidates
_PERCENTILE = (10, 0.5)  # and half the 10th percentile of the true object sizes


# ----------------------------------------------------------------------------- checks


def _check_labels(labels, name: str = "labels") -> np.ndarray:
    """A label map as an integer array of rank 2 or 3 (bool is read as {0, 1})."""
    array = np.asarray(labels)
    if array.dtype == bool:
        array = array.view(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer class ids, got dtype {array.dtype}; turn probabilities into labels "
            "first (unetpp_tf.inference.labels_from_probabilities)."
        )
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be one label map [H, W] or [D, H, W], got shape {array.shape}; "
            "for a batch use apply_postprocessing(..., batched=True)."
        )
    return array


def _check_classes(classes, where: str = "classes"):
    """None (every foreground class) or a sorted tuple of distinct class ids >= 1."""
    if classes is None:
        return None
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, (list, tuple, np.ndarray)) or len(classes) == 0:
        raise ValueError(f"{where} must be None (every foreground class) or a non-empty list of class ids, "
                         f"got {classes!r}.")
    ids = []
    for value in classes:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= _MAX_CLASS_ID:
            raise ValueError(f"{where} holds {value!r}; class ids are integers 1..{_MAX_CLASS_ID} "
                             "(0 is the background, which is not post-processed).")
        ids.append(int(value))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where} lists a class twice: {ids}.")
    return tuple(sorted(ids))


def _check_min_size(min_size, where: str = "min_size") -> int:
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"{where} must be a positive integer (components with fewer pixels are removed), "
                         f"got {min_size!r}.")
    return int(min_size)


def _boxes(labels: np.ndarray, classes) -> list[tuple[int, tuple]]:
    """(class id, bounding box) of each class in `classes` (None: every foreground class) present in `labels`."""
    top = int(labels.max()) if labels.size else 0
    if top > _MAX_CLASS_ID:
        raise ValueError(f"labels hold class id {top}; class ids above {_MAX_CLASS_ID} are not supported.")
    if top < 1:
        return []
    boxes = ndimage.find_objects(labels, max_label=top if classes is None else min(top, max(classes)))
    wanted = range(1, len(boxes) + 1) if classes is None else [c for c in classes if c <= len(boxes)]
    return [(c, boxes[c - 1]) for c in wanted if boxes[c - 1] is not None]


def _full(ndim: int) -> np.ndarray:
    return np.ones((3,) * ndim, bool)


def _output(labels: np.ndarray, original) -> np.ndarray:
    return labels.view(bool) if np.asarray(original).dtype == bool else labels


# ----------------------------------------------------------------------------- operations


def remove_small_components(labels, min_size: int, classes=None) -> np.ndarray:
    """Turn the connected components of each class that have fewer than `min_size` pixels into background.

    Components are connected through faces, edges and corners (8 neighbours in 2D, 26 in 3D).

    Args:
        labels: array. Integer class ids, one map [H, W] or [D, H, W] (0 = background).
        min_size: int. Components with fewer pixels (voxels) than this are removed; 1 removes
            nothing.
        classes: int, list of int or None. Classes to clean; None cleans every foreground
            class present. Defaults to None.

    Returns:
        np.ndarray: a new map with the dtype and shape of `labels`.

    Example:
        >>> remove_small_components(np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1]]), 2)
        array([[0, 0, 0],
               [0, 0, 1],
               [0, 0, 1]])
    """
    min_size = _check_min_size(min_size)
    classes = _check_classes(classes)
    out = np.array(_check_labels(labels), copy=True)
    if min_size > 1:
        for c, box in _boxes(out, classes):
            crop = out[box]
            mask = crop == c
            components, count = ndimage.label(mask, structure=_full(out.ndim))
            sizes = np.bincount(components[mask], minlength=count + 1)
            small = sizes < min_size
            small[0] = False
            if small.any():
                crop[small[components]] = 0
    return _output(out, labels)


def keep_largest_component(labels, classes=None) -> np.ndarray:
    """Keep only the largest connected component of each class; the others become background.

    Components are connected through faces, edges and corners (8 neighbours in 2D, 26 in 3D);
    of components of equal size the first in raster order is kept.

    Args:
        labels: array. Integer class ids, one map [H, W] or [D, H, W] (0 = background).
        classes: int, list of int or None. Classes to clean; None cleans every foreground
            class present. Defaults to None.

    Returns:
        np.ndarray: a new map with the dtype and shape of `labels`.

    Example:
        >>> keep_largest_component(np.array([[1, 1, 0, 1]]))
        array([[1, 1, 0, 0]])
    """
    classes = _check_classes(classes)
    out = np.array(_check_labels(labels), copy=True)
    for c, box in _boxes(out, classes):
        crop = out[box]
        mask = crop == c
        components, count = ndimage.label(mask, structure=_full(out.ndim))
        if count > 1:
            sizes = np.bincount(components[mask], minlength=count + 1)
            crop[mask & (components != int(np.argmax(sizes[1:])) + 1)] = 0
    return _output(out, labels)


def _faces(array: np.ndarray):
    """The 2*ndim border faces of `array`."""
    for axis in range(array.ndim):
        yield np.take(array, 0, axis=axis)
        yield np.take(array, -1, axis=axis)


def fill_holes(labels, classes=None) -> np.ndarray:
    """Fill the holes of each class: background regions enclosed by the class become the class.

    A hole is a region of background pixels, connected through faces (4 neighbours in 2D,
    6 in 3D), that does not touch the map's border and whose neighbouring pixels all belong
    to the class. Pixels of other classes never change; background touching two classes is
    left as it is.

    Args:
        labels: array. Integer class ids, one map [H, W] or [D, H, W] (0 = background).
        classes: int, list of int or None. Classes whose holes are filled; None fills every
            foreground class present. Defaults to None.

    Returns:
        np.ndarray: a new map with the dtype and shape of `labels`.

    Example:
        >>> fill_holes(np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]]))[1, 1]
        1
    """
    classes = _check_classes(classes)
    out = np.array(_check_labels(labels), copy=True)
    for c, box in _boxes(out, classes):
        crop = out[box]  # a hole lies strictly inside its class's bounding box
        background = crop == 0
        regions, count = ndimage.label(background)
        if count == 0:
            continue
        open_ = np.zeros(count + 1, bool)
        open_[0] = True
        for face in _faces(regions):
            open_[face] = True
        other = ~background & (crop != c)
        if other.any():  # a region beside another class is not a hole of this one
            for axis in range(crop.ndim):
                lo, hi = [slice(None)] * crop.ndim, [slice(None)] * crop.ndim
                lo[axis], hi[axis] = slice(None, -1), slice(1, None)
                lo, hi = tuple(lo), tuple(hi)
                open_[regions[lo][other[hi]]] = True
                open_[regions[hi][other[lo]]] = True
        if not open_.all():
            crop[~open_[regions]] = c
    return _output(out, labels)


_APPLY = {
    "keep_largest": lambda labels, step: keep_largest_component(labels, step.get("classes")),
    "remove_small": lambda labels, step: remove_small_components(labels, step["min_size"], step.get("classes")),
    "fill_holes": lambda labels, step: fill_holes(labels, step.get("classes")),
}


# ----------------------------------------------------------------------------- specs


def _check_step(step, index: int) -> dict:
    where = f"post-processing step {index}"
    if not isinstance(step, dict):
        raise ValueError(f"{where} must be a dict like {{'op': 'keep_largest'}}, got {step!r}.")
    op = step.get("op")
    if op not in OPS:
        raise ValueError(f"{where} has unknown op {op!r}; known ops: {', '.join(OPS)}.")
    unknown = sorted(set(step) - _STEP_FIELDS[op])
    if unknown:
        raise ValueError(f"{where} ({op}) has unknown field(s) {', '.join(unknown)}; "
                         f"its fields are {', '.join(sorted(_STEP_FIELDS[op]))}.")
    checked = {"op": op}
    if op == "remove_small":
        if "min_size" not in step:
            raise ValueError(f"{where} (remove_small) needs min_size, the smallest component (pixels) to keep.")
        checked["min_size"] = _check_min_size(step["min_size"], f"{where} (remove_small) min_size")
    classes = _check_classes(step.get("classes"), f"{where} ({op}) classes")
    if classes is not None:
        checked["classes"] = list(classes)
    return checked


def check_postprocessing(spec) -> dict:
    """Validate a post-processing spec and return it normalized.

    Args:
        spec: dict, list, str or None. `{"steps": [...]}` (optionally with the "record" that
            `choose_postprocessing` adds, kept as it is), a bare list of steps, or None /
            "none" for no post-processing. Each step is `{"op": "keep_largest" | "fill_holes"
            [, "classes": [...]]}` or `{"op": "remove_small", "min_size": int [, "classes"]}`.

    Returns:
        dict: {"steps": [...]} (plus "record" when given), with classes sorted.

    Example:
        >>> check_postprocessing([{"op": "fill_holes", "classes": [2, 1]}])
        {'steps': [{'op': 'fill_holes', 'classes': [1, 2]}]}
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return {"steps": []}
    if isinstance(spec, str):
        hint = (" 'auto' is resolved after training by choose_postprocessing / select_postprocessing, which "
                "return a spec." if spec.lower() == "auto" else "")
        raise ValueError(f"post-processing spec {spec!r} is a string; pass None, 'none', a list of steps or "
                         f"{{'steps': [...]}}.{hint}")
    if isinstance(spec, (list, tuple)):
        spec = {"steps": list(spec)}
    if not isinstance(spec, dict):
        raise ValueError(f"post-processing spec must be a dict {{'steps': [...]}} or a list of steps, got {spec!r}.")
    unknown = sorted(set(spec) - {"steps", "record"})
    if unknown or "steps" not in spec:
        raise ValueError(f"post-processing spec has keys {sorted(spec)}; it needs 'steps' (a list) and may hold "
                         "'record'.")
    steps = spec["steps"]
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"post-processing spec 'steps' must be a list of steps, got {steps!r}.")
    checked = {"steps": [_check_step(step, i) for i, step in enumerate(steps)]}
    if "record" in spec:
        checked["record"] = spec["record"]
    return checked


def apply_postprocessing(labels, spec, *, batched: bool = False) -> np.ndarray:
    """Apply the steps of a post-processing spec, in order, to a label map (or a batch of them).

    Args:
        labels: array. Integer class ids: one map [H, W] or [D, H, W], or with `batched`
            a batch [B, H, W] or [B, D, H, W] whose maps are processed one by one.
        spec: dict, list or None. A spec as `check_postprocessing` takes it; None or no steps
            returns a copy of `labels`.
        batched: bool. Whether axis 0 indexes separate maps. Defaults to False.

    Returns:
        np.ndarray: a new array with the dtype and shape of `labels`.

    Example:
        >>> spec = {"steps": [{"op": "remove_small", "min_size": 20}, {"op": "fill_holes"}]}
        >>> cleaned = apply_postprocessing(labels_from_probabilities(probs), spec, batched=True)
    """
    steps = check_postprocessing(spec)["steps"]
    if batched:
        array = np.asarray(labels)
        if array.ndim not in (3, 4):
            raise ValueError(f"labels must be a batch [B, H, W] or [B, D, H, W] with batched=True, "
                             f"got shape {array.shape}.")
        out = np.empty_like(array)
        for i, item in enumerate(array):
            out[i] = apply_postprocessing(item, {"steps": steps})
        return out
    out = np.array(_check_labels(labels), copy=True)
    for step in steps:
        out = _APPLY[step["op"]](out, step)
    return _output(out, labels)


def _merge(steps: list[dict]) -> list[dict]:
    """Join neighbouring steps whose effect one step has (the per-class operations are independent)."""
    merged = []
    for step in steps:
        last = merged[-1] if merged else None
        if last is not None and last["op"] == step["op"]:
            a, b = last.get("classes"), step.get("classes")
            union = None if a is None or b is None else sorted(set(a) | set(b))
            if step["op"] != "remove_small" or last["min_size"] == step["min_size"]:
                merged[-1] = {**last, **({"classes": union} if union is not None else {})}
                if union is None:
                    merged[-1].pop("classes", None)
                continue
            if a == b:  # removing below m1, then below m2, removes below the larger
                merged[-1] = {**last, "min_size": max(last["min_size"], step["min_size"])}
                continue
        merged.append(dict(step))
    return merged


# ----------------------------------------------------------------------------- scoring


def _as_maps(values, name: str) -> list[np.ndarray]:
    if isinstance(values, np.ndarray) or not isinstance(values, (list, tuple)):
        values = np.asarray(values)
        if values.ndim < 3:
            raise ValueError(f"{name} must be a batch [N, H, W] / [N, D, H, W] or a list of maps, "
                             f"got shape {values.shape}.")
        values = list(values)
    return [np.asarray(v) for v in values]


def _truth_ids(truth: np.ndarray, shape: tuple, num_classes: int, index: int) -> np.ndarray:
    """Class ids of a true mask shaped like its prediction (a trailing 1 or one-hot K channel removed)."""
    if truth.shape == shape + (1,):
        truth = truth[..., 0]
    elif truth.shape == shape + (num_classes,) and num_classes > 1:  # one-hot; all-zero rows are void
        truth = np.where(truth.max(axis=-1) > 0, truth.argmax(axis=-1), num_classes)
    if truth.shape != shape:
        raise ValueError(f"truths[{index}] has shape {truth.shape} but predictions[{index}] has shape {shape}; "
                         "give each prediction its own true mask.")
    if num_classes == 1:
        return (truth >= 0.5).astype(np.uint8)
    return truth


def _counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(tp, fp, fn, tn) x scored-by-evaluate classes, as `unetpp_tf.metrics.confusion_counts` counts them."""
    if num_classes == 1:
        p, t = pred != 0, truth != 0
        tp = np.count_nonzero(p & t)
        fp, fn = np.count_nonzero(p) - tp, np.count_nonzero(t) - tp
        return np.array([[tp], [fp], [fn], [p.size - tp - fp - fn]], np.float64)
    valid = (truth >= 0) & (truth < num_classes)
    matrix = np.bincount(truth[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64),
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(matrix).astype(np.float64)
    fp, fn = matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp
    return np.stack([tp, fp, fn, np.count_nonzero(valid) - tp - fp - fn])


def _dice(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = counts[0], counts[1], counts[2]
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 1.0)


def _score(per_item: list[np.ndarray], num_classes: int, pooling: str) -> float:
    """Dice as `evaluate` pools it ("dataset") or as `evaluate_volumes` averages it ("volumes")."""
    if pooling == "dataset":
        return float(_dice(np.sum(per_item, axis=0)).mean())
    scored = slice(None) if num_classes == 1 else slice(1, None)
    return float(np.mean([_dice(c)[scored].mean() for c in per_item]))


def dice_score(predictions, truths, num_classes: int, *, pooling: str = "dataset") -> float:
    """Dice of label maps against true masks, pooled as evaluation pools it.

    Args:
        predictions: array or list. Predicted class ids, a batch [N, H, W] / [N, D, H, W] or
            a list of maps (their shapes may differ).
        truths: array or list. True class ids, one per prediction ([..., 1] or one-hot
            accepted); multi-class ids outside 0..K-1 are void, binary masks are >= 0.5.
        num_classes: int. 1 for binary, K for K classes.
        pooling: str. "dataset": confusion counts summed over all maps, per-class Dice, mean
            over classes (the background included for multi-class): `evaluate`'s "dice".
            "volumes": per map the mean Dice of the foreground classes, then the mean over
            maps: `evaluate_volumes`'s "dice". Defaults to "dataset".

    Returns:
        float: the Dice.

    Example:
        >>> dice_score(np.array([[[1, 0]]]), np.array([[[1, 1]]]), 1)
        0.6666666666666666
    """
    predictions, truths = _pairs(predictions, truths, num_classes, pooling)
    return _score([_counts(p, t, num_classes) for p, t in zip(predictions, truths)], num_classes, pooling)


def _pairs(predictions, truths, num_classes, pooling):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be 1 (binary) or the number of classes K >= 2, got {num_classes!r}.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    predictions, truths = _as_maps(predictions, "predictions"), _as_maps(truths, "truths")
    if not predictions:
        raise ValueError("predictions is empty: there is no validation map to choose post-processing on.")
    if len(predictions) != len(truths):
        raise ValueError(f"predictions has {len(predictions)} maps but truths has {len(truths)}; "
                         "give one true mask per prediction.")
    predictions = [_check_labels(p, f"predictions[{i}]") for i, p in enumerate(predictions)]
    truths = [_truth_ids(t, p.shape, num_classes, i) for i, (p, t) in enumerate(zip(predictions, truths))]
    top = max(int(p.max()) if p.size else 0 for p in predictions)
    if min(int(p.min()) if p.size else 0 for p in predictions) < 0:
        raise ValueError("predictions hold negative class ids; predicted labels are 0 (background) .. K-1.")
    if top > max(num_classes - 1, 1):
        raise ValueError(f"predictions hold class id {top} but num_classes={num_classes} allows ids "
                         f"0..{max(num_classes - 1, 1)}; pass the model's number of classes.")
    return predictions, truths


# ----------------------------------------------------------------------------- choosing


def candidate_steps(truths, num_classes: int) -> list[dict]:
    """The steps `choose_postprocessing` tries by default, in the order it tries them.

    For each foreground class: keep_largest; then remove_small with min_size at 0.1, 0.25,
    0.5 and 0.8 of the smallest true component of that class and half the 10th percentile of
    the true component sizes (values below 2, which remove nothing, and repeats left out;
    none for a class absent from the truths); then fill_holes.

    Args:
        truths: array or list. True class ids of the validation maps (as `dice_score` takes them).
        num_classes: int. 1 for binary, K for K classes.

    Returns:
        list of dict: the steps.

    Example:
        >>> [s["op"] for s in candidate_steps(np.array([[[1, 1, 0, 1]]]), 1)]
        ['keep_largest', 'fill_holes']
    """
    truths = _as_maps(truths, "truths")
    classes = [1] if num_classes == 1 else list(range(1, num_classes))
    steps = [{"op": "keep_largest", "classes": [c]} for c in classes]
    for c in classes:
        sizes = []
        for truth in truths:
            truth = truth[..., 0] if truth.ndim > 2 and truth.shape[-1] == 1 else truth
            mask = truth >= 0.5 if num_classes == 1 else truth == c
            components, count = ndimage.label(mask, structure=_full(mask.ndim))
            if count:
                sizes.extend(np.bincount(components[mask])[1:].tolist())
        if not sizes:
            continue
        smallest = min(sizes)
        values = {int(round(f * smallest)) for f in _SIZE_FRACTIONS}
        values.add(int(round(_PERCENTILE[1] * np.percentile(sizes, _PERCENTILE[0]))))
        steps += [{"op": "remove_small", "min_size": m, "classes": [c]} for m in sorted(values) if m >= 2]
    steps += [{"op": "fill_holes", "classes": [c]} for c in classes]
    return steps


def choose_postprocessing(predictions, truths, num_classes: int, *, candidates=None,
                          pooling: str = "dataset", min_gain: float = DEFAULT_MIN_GAIN) -> dict:
    """Choose post-processing on validation predictions: keep each candidate step that raises Dice.

    Candidates are tried greedily in order, each on top of the steps kept so far; a step is
    kept when the Dice with it exceeds the current Dice by more than `min_gain` (so a step
    that changes nothing, or ties, is dropped). Kept neighbouring steps of one kind are then
    merged (e.g. keep_largest of class 1 and of class 2 become one step with classes [1, 2]),
    which changes no pixel.

    Args:
        predictions: array or list. Predicted class ids on the validation split, a batch
            [N, H, W] / [N, D, H, W] or a list of maps.
        truths: array or list. The true class ids, one per prediction ([..., 1] accepted).
        num_classes: int. 1 for binary, K for K classes (the model's output channels).
        candidates: list of dict or None. Steps to try, in order; None uses
            `candidate_steps(truths, num_classes)`. Defaults to None.
        pooling: str. "dataset" (as `evaluate`) or "volumes" (as `evaluate_volumes`); see
            `dice_score`. Defaults to "dataset".
        min_gain: float. Smallest Dice gain that keeps a step. Defaults to 1e-6.

    Returns:
        dict: a spec {"steps": [...], "record": {"metric": "dice", "pooling", "num_classes",
        "maps", "min_gain", "dice_before", "dice_after", "trials": [{"step", "dice",
        "changed_pixels", "kept"}, ...]}}. A trial's "dice" is the Dice with the steps kept
        before it plus its own step; "changed_pixels" counts the pixels its step changed.
        `apply_postprocessing` and `write_postprocessing` take the dict as it is.

    Example:
        >>> spec = choose_postprocessing(val_labels, val_masks, num_classes=1)
        >>> spec["record"]["dice_before"], spec["record"]["dice_after"], spec["steps"]
    """
    predictions, truths = _pairs(predictions, truths, num_classes, pooling)
    if not isinstance(min_gain, (int, float)) or isinstance(min_gain, bool) or not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be a number in [0, 1), got {min_gain!r}; 1e-6 ignores float noise.")
    if candidates is None:
        candidates = candidate_steps(truths, num_classes)
    candidates = check_postprocessing(list(candidates))["steps"]
    counts = [_counts(p, t, num_classes) for p, t in zip(predictions, truths)]
    current = _score(counts, num_classes, pooling)
    record = {"metric": "dice", "pooling": pooling, "num_classes": int(num_classes), "maps": len(predictions),
              "min_gain": float(min_gain), "dice_before": current}
    kept, trials = [], []
    for step in candidates:
        trial = [_APPLY[step["op"]](p, step) for p in predictions]
        changed = [int(np.count_nonzero(a != b)) for a, b in zip(trial, predictions)]
        trial_counts = [_counts(p, t, num_classes) if n else c
                        for p, t, n, c in zip(trial, truths, changed, counts)]
        score = _score(trial_counts, num_classes, pooling)
        keep = sum(changed) > 0 and score > current + min_gain
        trials.append({"step": step, "dice": score, "changed_pixels": sum(changed), "kept": keep})
        if keep:
            kept.append(step)
            predictions, counts, current = trial, trial_counts, score
    record.update(dice_after=current, trials=trials)
    return {"steps": _merge(kept), "record": record}


def select_postprocessing(model, dataset, *, num_classes: int | None = None, threshold: float = 0.5,
                          mode: str = "accurate", level: int | None = None, candidates=None,
                          min_gain: float = DEFAULT_MIN_GAIN) -> dict:
    """Predict a dataset split (the validation split) and choose post-processing on it.

    Every batch runs through the model whole, as `unetpp_tf.evaluation.evaluate` runs it, and
    the Dice is pooled as `evaluate` pools it.

    Args:
        model: keras.Model or str. A model (deep-supervision models are made single-output with
            `mode`/`level`) or a path for `load_model`; 2D or 3D.
        dataset: iterable of (images, masks) batches, e.g. `data.val`.
        num_classes: int or None. 1 for binary, K for K classes; None reads the model's output
            channels. Defaults to None.
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        mode: str. "accurate" or "fast" for deep-supervision models. Defaults to "accurate".
        level: int or None. Head for "fast" mode. Defaults to None.
        candidates: list of dict or None. Steps to try; see `choose_postprocessing`.
            Defaults to None.
        min_gain: float. See `choose_postprocessing`. Defaults to 1e-6.

    Returns:
        dict: the spec with its record, as `choose_postprocessing` returns it.

    Example:
        >>> spec = select_postprocessing(model, data.val)
        >>> write_postprocessing("runs/run1", spec)
    """
    from unetpp_tf.data.pipeline import SegmentationData
    from unetpp_tf.inference import as_single_output, labels_from_probabilities

    if isinstance(dataset, SegmentationData):
        raise ValueError("dataset is a SegmentationData; pass one split, e.g. data.val.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    model = as_single_output(model, mode, level)
    num_classes = num_classes or int(model.outputs[0].shape[-1])
    predictions, truths = [], []
    for batch in dataset:
        images, masks = np.asarray(batch[0]), np.asarray(batch[1])
        predictions.extend(labels_from_probabilities(np.asarray(model.predict_on_batch(images)), threshold))
        truths.extend(masks)
    if not predictions:
        raise ValueError("the dataset is empty: no validation batch to choose post-processing on.")
    return choose_postprocessing(predictions, truths, num_classes, candidates=candidates, min_gain=min_gain)


def select_postprocessing_volumes(model, volumes, *, num_classes: int | None = None, threshold: float = 0.5,
                                  patch_size=None, overlap: float = 0.5, batch_size: int | None = None,
                                  window=None, candidates=None, min_gain: float = DEFAULT_MIN_GAIN) -> dict:
    """Predict validation scans whole and choose post-processing on them, scored as `evaluate_volumes` scores.

    Each scan is predicted with `unetpp_tf.volume_inference.predict_volume` (sliding windows
    for a 3D model, slice by slice for a 2D/2.5D one), and the Dice is the mean over scans of
    the mean Dice of the foreground classes (pooling "volumes").

    Args:
        model: keras.Model or str. A 3D or 2D/2.5D model, or a path.
        volumes: list of Volume. Labelled scans, e.g. `data.volumes["val"]`, their images as
            the model takes them (or raw, with `window`).
        num_classes: int or None. 1 for binary, K for K classes; None reads the model's output
            channels. Defaults to None.
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        patch_size: int, tuple or None. Windows for `predict_volume`. Defaults to None.
        overlap: float. Window overlap. Defaults to 0.5.
        batch_size: int or None. Patches or slices per pass. Defaults to None.
        window: str, tuple or None. Window the images first with
            `unetpp_tf.data.volumes.apply_window`; None feeds them as they are. Defaults to None.
        candidates: list of dict or None. Steps to try; see `choose_postprocessing`.
            Defaults to None.
        min_gain: float. See `choose_postprocessing`. Defaults to 1e-6.

    Returns:
        dict: the spec with its record, as `choose_postprocessing` returns it.

    Example:
        >>> spec = select_postprocessing_volumes(model, data.volumes["val"], patch_size=(32, 64, 64))
    """
    from unetpp_tf.inference import as_single_output, labels_from_probabilities
    from unetpp_tf.volume_inference import predict_volume

    if isinstance(volumes, dict):
        raise ValueError(f'volumes is a dict (keys {sorted(volumes)}); pass the scans of one split, '
                         'e.g. data.volumes["val"].')
    volumes = list(volumes)
    if not volumes:
        raise ValueError("volumes is empty: no validation scan to choose post-processing on.")
    unlabelled = [str(getattr(v, "name", i)) for i, v in enumerate(volumes) if getattr(v, "label", None) is None]
    if unlabelled:
        raise ValueError(f"volume(s) {', '.join(unlabelled)} have no label to choose post-processing on.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    model = as_single_output(model)
    num_classes = num_classes or int(model.outputs[0].shape[-1])
    predictions, truths = [], []
    for volume in volumes:
        image = volume.image
        if window is not None:
            from unetpp_tf.data.volumes import apply_window

            image = apply_window(image, window)
        probs = predict_volume(model, image, patch_size=patch_size, overlap=overlap, batch_size=batch_size)
        predictions.append(labels_from_probabilities(probs, threshold))
        truths.append(np.asarray(volume.label))
    return choose_postprocessing(predictions, truths, num_classes, candidates=candidates, pooling="volumes",
                                 min_gain=min_gain)


# ----------------------------------------------------------------------------- files


def write_postprocessing(run_dir: str | os.PathLike, spec) -> Path:
    """Write a spec (with its record, if any) as `postprocess.json` in a run directory, atomically.

    Args:
        run_dir: str or Path. The run directory (created if needed).
        spec: dict or list. A spec as `check_postprocessing` takes it, e.g. the result of
            `choose_postprocessing`.

    Returns:
        Path: the file written.

    Example:
        >>> write_postprocessing("runs/run1", {"steps": [{"op": "fill_holes"}]})
    """
    spec = check_postprocessing(spec)
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise files.write_error(run_dir, error) from error
    return files.write_json(run_dir / POSTPROCESS_FILE, spec)


def postprocessing_path(run_dir_or_model_path: str | os.PathLike) -> Path | None:
    """The `postprocess.json` that belongs to a run directory or model, or None when there is none.

    A run directory is looked in; a model file or SavedModel folder is looked in (a SavedModel
    folder), then beside, then, for a model in a run's `export/` folder, in the run directory.

    Args:
        run_dir_or_model_path: str or Path. A run directory, a model file or a SavedModel folder.

    Returns:
        Path or None.

    Example:
        >>> postprocessing_path("runs/run1/export/model.tflite")   # runs/run1/postprocess.json
    """
    path = Path(run_dir_or_model_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory or a model file.")
    model_file = path.is_file() or (path / "saved_model.pb").is_file()
    places = [path] if path.is_dir() else []
    if model_file:
        places.append(path.parent)
        if path.parent.name == "export":
            places.append(path.parent.parent)
    for place in places:
        if (place / POSTPROCESS_FILE).is_file():
            return place / POSTPROCESS_FILE
    return None


def read_postprocessing(run_dir_or_model_path: str | os.PathLike) -> dict | None:
    """Read the post-processing spec recorded for a run (or a model in it); None when none was recorded.

    Args:
        run_dir_or_model_path: str or Path. A run directory, a model file or a SavedModel
            folder (see `postprocessing_path`).

    Returns:
        dict or None: the checked spec {"steps": [...] (, "record")}.

    Example:
        >>> spec = read_postprocessing("runs/run1/model.keras")
        >>> labels = apply_postprocessing(labels, spec) if spec else labels
    """
    path = postprocessing_path(run_dir_or_model_path)
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); write it again with write_postprocessing.") from None
    try:
        return check_postprocessing(value)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
