"""Choosing the pruning level on the user's own data: the prune report and the automatic level.

A UNet++ trained with deep supervision has one head per level; pruning keeps one of them
(`unetpp_tf.models.prune`): UNet++ L1 is a fraction of the full network's size and time.
`prune_report` measures, on a validation split, what each level L1..Ld costs and scores:
Dice and IoU, parameters, FLOPs at the image size, batch-1 latency of the Keras model and of
the int8 TFLite file `export_model` writes, and the sizes of that file and of the float32
`.keras` model. It adds a row for the full model as `evaluate` and `export` run it by default
("accurate": the mean of every head's probabilities). This is the paper's speed/accuracy
figure (Zhou et al. 2018, Fig. 6) for the user's data.

The reference for "within the tolerance of the full model" is that "full" (accurate) row, not
L_d: it is the model a user gets without pruning (`export` and `evaluate` default to it), so
keeping the full model (`choose_prune_level` returning None) means exactly the model the
levels were compared with. L_d is one of the candidates: it computes every node of the
network but only one head, so it costs no more than the full model and is chosen when the
shallower levels fall short but L_d alone is within the tolerance.

Example:
    >>> report = prune_report(model, data.val)
    >>> print(format_prune_report(report, tolerance=0.01))
    >>> write_prune_report(report, "run/prune_report")
    >>> level, report = auto_prune_level(model, data.val, 0.01)
    >>> print(format_choice(report))   # chose L2: Dice 0.9100 vs full 0.9150 (tolerance 0.01)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from unetpp_tf import files
from unetpp_tf.data.pipeline import SegmentationData
from unetpp_tf.evaluation import evaluate
from unetpp_tf.export import export_model
from unetpp_tf.export.exporter import export_size
from unetpp_tf.export.parity import collect_images
from unetpp_tf.inference import as_single_output, load_model
from unetpp_tf.models.analysis import count_flops
from unetpp_tf.models.pruning import required_heads
from unetpp_tf.runners import TFLiteModel

REPORT_FILES = {"json": "prune_report.json", "csv": "prune_report.csv", "png": "prune_report.png"}
FULL = "full"  # the name of the reference row: the model as it runs by default (mean of the heads)
COLUMNS = (
    "name", "level", "mode", "dice", "iou", "parameters", "flops", "keras_ms", "int8_ms",
    "int8_bytes", "int8_agreement", "keras_bytes",
)
_SLACK = 1e-9  # Dice exactly at full - tolerance counts as within (no float rounding decides)


def _batches(dataset) -> list:
    """The split as a list of numpy (images, masks) batches, read once for every row."""
    if isinstance(dataset, SegmentationData):
        raise ValueError("dataset is a SegmentationData; pass one split, e.g. data.val (the validation split).")
    batches = []
    for element in dataset:
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise ValueError(
                "dataset must yield (images, masks) batches to score each level, e.g. data.val; "
                f"it yielded {type(element).__name__}."
            )
        batches.append((np.asarray(element[0]), np.asarray(element[1])))
    if not batches:
        raise ValueError("dataset is empty: no batch to score the pruning levels on.")
    return batches


def _time_interleaved(timers: list, image, runs: int, warmup: int = 2) -> None:
    """Set `row[key]` to the median ms of `fn(image)` for each (row, key, fn) in `timers`.

    Every function is warmed up `warmup` times, then timed once per round for `runs` rounds,
    all of them in each round: a load spike from another process then slows every row alike
    instead of the row that happened to be measuring.
    """
    for _, _, fn in timers:
        for _ in range(warmup):
            fn(image)
    times = [[] for _ in timers]
    for _ in range(runs):
        for (_, _, fn), spent in zip(timers, times):
            start = time.perf_counter()
            fn(image)
            spent.append((time.perf_counter() - start) * 1000.0)
    for (row, key, _), spent in zip(timers, times):
        row[key] = statistics.median(spent)


def _check_runs(latency_runs) -> int:
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, (int, np.integer)) or latency_runs < 1:
        raise ValueError(f"latency_runs must be a positive integer (timed runs per level), got {latency_runs!r}.")
    return int(latency_runs)


def _check_calibration_images(count) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"calibration_images must be a positive integer (int8 calibration images), got {count!r}.")
    return int(count)


def _file_bytes(model: keras.Model, folder: Path) -> int:
    path = folder / f"{model.name}.keras"
    model.save(path)
    return path.stat().st_size


def _int8_file(model, mode, level, folder, size, calibration, steps, num_threads) -> tuple:
    """Export the int8 TFLite file as `export_model` writes it: (its runner, {size, agreement})."""
    out = folder / (f"L{level}" if level is not None else FULL)
    report = export_model(
        model, out, formats=("tflite",), quantize=("int8",), image_size=size, mode=mode, level=level,
        calibration=calibration, samples=calibration[:2], max_samples=2, calibration_steps=steps,
        thresholds={"int8": 0.0}, num_threads=num_threads,
    )
    artifact = report["artifacts"][0]
    lite = TFLiteModel(artifact["path"], num_threads=num_threads)
    return lite, {"int8_bytes": int(artifact["size_bytes"]), "int8_agreement": artifact["dice_agreement"]}


def prune_report(
    model: keras.Model,
    dataset,
    *,
    num_classes: int | None = None,
    threshold: float = 0.5,
    calibration=None,
    image_size=None,
    latency_runs: int = 20,
    num_threads: int | None = None,
    calibration_images: int = 32,
    timing: bool = True,
) -> dict:
    """Measure every pruning level L1..Ld of a deep-supervision UNet++, and the full model.

    Each row is scored on `dataset` (the validation split: the level is chosen on it, the test
    split stays untouched) with `evaluate(model, dataset, mode="fast", level=L)`, so its Dice
    is the one `unetpp-tf evaluate --prune-level L` prints. Parameters are the pruned model's
    `count_params()`, FLOPs `count_flops` at the image size. With `timing`, each row is also
    exported once to an int8 TFLite file exactly as `export_model` writes it (calibrated on
    `calibration`), in a temporary folder removed afterwards; latencies are batch-1 medians
    over `latency_runs` runs after two warm-up runs, Keras through `predict_on_batch` (its
    compiled function) and int8 through `TFLiteModel`, on the same image. The runs are
    interleaved (each round times every row once), so a busy machine slows all rows alike. The int8 files cost
    the most time (a conversion per row, seconds for small models); `timing=False` skips them
    and the Keras timings when only the Dice is needed.

    Args:
        model: keras.Model or str. A 2D UNet++ built with `deep_supervision=True` (trained), or
            its `.keras` file.
        dataset: iterable. (images, masks) batches to score on, e.g. `data.val`.
        num_classes: int or None. 1 for binary, K for K classes; None reads the model's output
            channels. Defaults to None.
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        calibration: iterable or None. int8 calibration images or (images, masks) batches;
            None uses images of `dataset`. Defaults to None.
        image_size: tuple or None. (height, width) for FLOPs, latency and the int8 file; None
            uses the model's fixed input size, else the training size it records, else the
            size of `dataset`'s images. Defaults to None.
        latency_runs: int. Timed batch-1 runs per row. Defaults to 20.
        num_threads: int or None. TFLite interpreter threads; None lets LiteRT choose.
            Defaults to None.
        calibration_images: int. Images used for int8 calibration. Defaults to 32.
        timing: bool. Measure the latencies and the int8 file; False leaves "keras_ms",
            "int8_ms", "int8_bytes", "int8_agreement" and "keras_bytes" None. Defaults to True.

    Returns:
        dict: {"rows": [{"name": "L1".."Ld" or "full", "level": 1..d or None, "mode": "fast"
        or "accurate", "dice", "iou", "parameters", "flops" (per image), "keras_ms", "int8_ms",
        "int8_bytes", "int8_agreement" (Dice agreement of the int8 file with Keras on two
        calibration images), "keras_bytes" (float32 .keras file)}, ...] (levels in order, then
        "full"), "reference": "full", "depth", "image_size", "channels", "images" (scored),
        "num_classes", "threshold", "latency_runs", "num_threads", "cpu_count",
        "calibration_images", "backend", "model", "timing", "tolerance": None, "chosen": None}.

    Example:
        >>> report = prune_report(model, data.val, num_threads=2)
        >>> [(row["name"], round(row["dice"], 3)) for row in report["rows"]]
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"prune_report needs the Keras model with its deep-supervision heads (a .keras file), got "
            f"{type(model).__name__}: an exported file holds one head already."
        )
    heads = required_heads(model, "measure the pruning levels of")
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise ValueError(
            f"prune_report measures 2D image models; model {model.name!r} takes inputs {model.input_shape}. "
            "Score the levels of a volume model with evaluate_volumes(as_single_output(model, 'fast', L), ...)."
        )
    runs = _check_runs(latency_runs)
    steps = _check_calibration_images(calibration_images)
    batches = _batches(dataset)
    depth, channels = max(heads), int(model.input_shape[-1])
    full = as_single_output(model, "accurate")
    size = export_size(full, image_size, required=False) or tuple(int(n) for n in batches[0][0].shape[1:3])
    probe = collect_images([batches[0][0]], size, channels, 1, "dataset")[0]
    calibration_set = None
    if timing:
        source = [images for images, _ in batches] if calibration is None else calibration
        calibration_set = collect_images(source, size, channels, steps, "calibration")

    rows, timers = [], []
    with tempfile.TemporaryDirectory(prefix="prune-report-") as scratch:
        for level in [*sorted(heads), None]:
            mode = "accurate" if level is None else "fast"
            single = full if level is None else as_single_output(model, "fast", level)
            scores = evaluate(single, batches, num_classes=num_classes, threshold=threshold)["metrics"]
            row = {
                "name": FULL if level is None else f"L{level}",
                "level": level,
                "mode": mode,
                "dice": scores["dice"],
                "iou": scores["iou"],
                "parameters": int(single.count_params()),
                "flops": int(count_flops(single, (*size, channels))),
                "keras_ms": None, "int8_ms": None, "int8_bytes": None, "int8_agreement": None, "keras_bytes": None,
            }
            if timing:
                folder = Path(scratch)
                row["keras_bytes"] = _file_bytes(single, folder)
                lite, entry = _int8_file(model, mode, level, folder, size, calibration_set, steps, num_threads)
                row.update(entry)
                timers += [(row, "keras_ms", single.predict_on_batch), (row, "int8_ms", lite)]
            rows.append(row)
        _time_interleaved(timers, probe, runs)
    return {
        "rows": rows,
        "reference": FULL,
        "depth": depth,
        "image_size": list(size),
        "channels": channels,
        "images": int(scores["images"]),
        "num_classes": int(num_classes or full.output_shape[-1]),
        "threshold": float(threshold),
        "latency_runs": runs,
        "num_threads": num_threads,
        "cpu_count": os.cpu_count(),
        "calibration_images": len(calibration_set) if calibration_set is not None else 0,
        "backend": keras.backend.backend(),
        "model": model.name,
        "timing": bool(timing),
        "tolerance": None,
        "chosen": None,
    }


def check_tolerance(tolerance) -> float:
    """Return `tolerance` as a float if it is in (0, 1), else raise one clear ValueError.

    Args:
        tolerance: float. The Dice a pruned level may lose against the full model.

    Returns:
        float: the tolerance.

    Example:
        >>> check_tolerance(0.01)
        0.01
    """
    ok = (isinstance(tolerance, (int, float, np.integer, np.floating)) and not isinstance(tolerance, bool)
          and math.isfinite(tolerance) and 0.0 < tolerance < 1.0)
    if not ok:
        raise ValueError(
            f"tolerance must be a Dice difference in (0, 1), e.g. 0.01 (one Dice point); got {tolerance!r}."
        )
    return float(tolerance)


def _rows(report: dict) -> tuple[list, dict]:
    """(level rows in level order, the reference row) of a prune report."""
    try:
        rows = list(report["rows"])
        reference = next(row for row in rows if row["name"] == report.get("reference", FULL))
        levels = sorted((row for row in rows if row["level"] is not None), key=lambda row: row["level"])
    except (KeyError, TypeError, StopIteration) as error:
        raise ValueError(
            "report is not a prune report (it needs 'rows' with a 'full' row and level rows, as "
            f"prune_report returns): {type(error).__name__} {error}."
        ) from error
    return levels, reference


def choose_prune_level(report: dict, tolerance: float) -> int | None:
    """The smallest level whose Dice is within `tolerance` of the full model's.

    The full model is the report's "full" row, the model as `evaluate` and `export` run it by
    default (mean of the heads): see the module docstring for why it, not L_d, is the
    reference. A level qualifies when its Dice >= full Dice - tolerance (equality counts).

    Args:
        report: dict. From `prune_report` (or read back from prune_report.json).
        tolerance: float. Dice the pruned model may lose, in (0, 1) exclusive, e.g. 0.01.

    Returns:
        int or None: the level 1..d to export with mode="fast", or None when no level is
        within the tolerance (keep the full model).

    Example:
        >>> choose_prune_level(report, 0.01)
        2
    """
    tolerance = check_tolerance(tolerance)
    levels, reference = _rows(report)
    bar = reference["dice"] - tolerance - _SLACK
    return next((row["level"] for row in levels if row["dice"] >= bar), None)


def auto_prune_level(model: keras.Model, dataset, tolerance: float, **kwargs) -> tuple[int | None, dict]:
    """Measure the levels on `dataset` and choose the smallest within `tolerance` of the full model.

    The tolerance is checked before anything is measured. The choice needs only the Dice, so
    the latencies and int8 files are skipped unless `timing=True` is passed.

    Args:
        model: keras.Model. A 2D UNet++ built with `deep_supervision=True`.
        dataset: iterable. (images, masks) batches, e.g. `data.val`.
        tolerance: float. Dice the pruned model may lose, in (0, 1), e.g. 0.01.
        **kwargs: passed to `prune_report` (num_classes, threshold, image_size, timing, ...).

    Returns:
        tuple: (level or None, report), the report with "tolerance" and "chosen" set. Export
        the level with `export_model(model, out, mode="fast", level=level)`, or with
        mode="accurate" when it is None.

    Example:
        >>> level, report = auto_prune_level(model, data.val, 0.01)
        >>> export_model(model, "export", mode="fast" if level else "accurate", level=level, samples=data.val)
        >>> print(format_choice(report))
    """
    tolerance = check_tolerance(tolerance)
    kwargs.setdefault("timing", False)
    report = prune_report(model, dataset, **kwargs)
    level = choose_prune_level(report, tolerance)
    report["tolerance"], report["chosen"] = tolerance, level
    return level, report


def format_choice(report: dict) -> str:
    """One line saying which level the tolerance chose and why (after `auto_prune_level`).

    Args:
        report: dict. A prune report with "tolerance" set.

    Returns:
        str: e.g. "chose L2: Dice 0.9100 vs full 0.9150 (tolerance 0.01)", or "kept the full
        model: no level within 0.01 of its Dice 0.9150 (best: L4 0.9000)".

    Example:
        >>> print(format_choice(auto_prune_level(model, data.val, 0.01)[1]))
    """
    tolerance = check_tolerance(report.get("tolerance"))
    levels, reference = _rows(report)
    level = choose_prune_level(report, tolerance)
    if level is not None:
        row = next(row for row in levels if row["level"] == level)
        return (f"chose L{level}: Dice {row['dice']:.4f} vs full {reference['dice']:.4f} "
                f"(tolerance {tolerance:g})")
    best = max(levels, key=lambda row: row["dice"])
    return (f"kept the full model: no level within {tolerance:g} of its Dice {reference['dice']:.4f} "
            f"(best: {best['name']} {best['dice']:.4f})")


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bytes(count) -> str:
    if count is None:
        return "-"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.2f} MiB"


def format_prune_report(report: dict, tolerance: float | None = None) -> str:
    """The prune report as a text table, one row per level and one for the full model.

    Args:
        report: dict. From `prune_report` or `auto_prune_level`.
        tolerance: float or None. Mark the level `choose_prune_level` picks at this tolerance
            ("<- chosen", or a line saying the full model is kept); None uses the report's own
            "tolerance" (set by `auto_prune_level`), and marks nothing if it has none.
            Defaults to None.

    Returns:
        str: the table and a line with what was measured.

    Example:
        >>> print(format_prune_report(report, tolerance=0.01))
    """
    tolerance = report.get("tolerance") if tolerance is None else tolerance
    levels, reference = _rows(report)
    chosen = choose_prune_level(report, tolerance) if tolerance is not None else None
    header = (f"{'level':<6} {'Dice':>7} {'IoU':>7} {'params':>10} {'GFLOPs':>8} {'Keras ms':>9} "
              f"{'int8 ms':>8} {'int8 size':>10}")
    lines = [header, "-" * len(header)]
    for row in [*levels, reference]:
        mark = ""
        if tolerance is not None and row["level"] is not None and row["level"] == chosen:
            mark = "  <- chosen"
        elif tolerance is not None and chosen is None and row is reference:
            mark = "  <- kept"
        lines.append(
            f"{row['name']:<6} {row['dice']:>7.4f} {row['iou']:>7.4f} {row['parameters']:>10,} "
            f"{row['flops'] / 1e9:>8.3f} {_number(row.get('keras_ms'), '.2f'):>9} "
            f"{_number(row.get('int8_ms'), '.2f'):>8} {_bytes(row.get('int8_bytes')):>10}{mark}"
        )
    size = "x".join(str(n) for n in report.get("image_size", []))
    threads = report.get("num_threads")
    lines.append(
        f"{report.get('images')} validation images; FLOPs and latency at {size}, batch 1, median of "
        f"{report.get('latency_runs')} runs; TFLite threads {threads if threads is not None else 'auto'} "
        f"of {report.get('cpu_count')} CPUs; full = mean of the heads (the default model)"
    )
    if tolerance is not None:
        lines.append(format_choice({**report, "tolerance": tolerance}))
    return "\n".join(lines)


def _csv_text(rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in COLUMNS})
    return buffer.getvalue()


def write_prune_report(report: dict, directory) -> dict:
    """Write prune_report.json, prune_report.csv and prune_report.png (Dice vs cost) into `directory`.

    The three files are staged and moved into place together (`unetpp_tf.files.staged_writes`):
    a failure or a kill leaves the previous set.

    Args:
        report: dict. From `prune_report` or `auto_prune_level`.
        directory: str or Path. The folder; created if missing.

    Returns:
        dict: {"json": Path, "csv": Path, "png": Path}.

    Example:
        >>> paths = write_prune_report(report, "saved_models/run1/prune_report")
    """
    from unetpp_tf.viz import plot_prune_report

    _rows(report)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise files.write_error(directory, error) from error
    paths = {kind: directory / name for kind, name in REPORT_FILES.items()}
    figure = plot_prune_report(report)
    text = json.dumps(report, indent=2) + "\n"
    with files.staged_writes(directory) as stage:
        stage(paths["json"], lambda temp: Path(temp).write_text(text, encoding="utf-8"))
        stage(paths["csv"], lambda temp: Path(temp).write_text(_csv_text(report["rows"]), encoding="utf-8"))
        stage(paths["png"], lambda temp: figure.savefig(temp, dpi=100, format="png"))
    return paths
