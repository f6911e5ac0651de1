"""The export report: one entry per artifact, written as `export_report.json`, shown as a table.

Example:
    >>> report = json.loads(Path("export/export_report.json").read_text())
    >>> print(format_report(report))
"""

from __future__ import annotations

from pathlib import Path

REPORT_NAME = "export_report.json"


def size_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder (a SavedModel).

    Example:
        >>> size_bytes(Path("export/saved_model"))
        104857
    """
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def artifact_entry(name: str, path: Path, staged: Path, fmt: str, quantize: str, threshold: float) -> dict:
    """A report entry for one artifact, before its parity run (agreement, diff, latency None).

    A TFLite entry gets its operators afterwards (`unetpp_tf.export.operators.operator_summary`):
    "ops", "custom_ops" (not TFLite builtins) and "float_ops" (for an int8 file, the operators the
    converter left in float); an ONNX entry gets "ops", "custom_ops" (outside the standard ONNX
    domain) and its "opset" (`unetpp_tf.export.onnx_format.onnx_operators`); they stay None for
    the other formats.

    Args:
        name: str. The artifact's name, e.g. "model_int8".
        path: Path. Where it will live in the output folder.
        staged: Path. Where it is now (its size is read there).
        fmt: str. "keras", "saved_model", "tflite" or "onnx".
        quantize: str. "none", "float16", "dynamic" or "int8" ("none" for all but TFLite).
        threshold: float. Its minimum Dice agreement.

    Example:
        >>> artifact_entry("model_float32", out / "model_float32.tflite", staged, "tflite", "none", 0.99)["size_bytes"]
    """
    return {
        "name": name,
        "path": str(path),
        "format": fmt,
        "quantize": quantize,
        "size_bytes": size_bytes(staged),
        "dice_agreement": None,
        "max_abs_diff": None,
        "latency_ms": None,
        "threshold": threshold,
        "ops": None,
        "custom_ops": None,
        "float_ops": None,
        "opset": None,
    }


def export_report(artifacts: list, image_size, mode: str, level, num_classes: int, parity_images: int,
                  keras_ms: float | None) -> dict:
    """The report `export_model` returns and writes as `export_report.json`.

    Example:
        >>> export_report([entry], (32, 32), "accurate", None, 1, 16, 2.5)["image_size"]
        [32, 32]
    """
    return {
        "artifacts": artifacts,
        "image_size": list(image_size) if image_size is not None else None,
        "mode": mode,
        "level": level,
        "num_classes": num_classes,
        "parity_images": parity_images,
        "keras_latency_ms": round(keras_ms, 3) if keras_ms is not None else None,
    }


def format_report(report: dict) -> str:
    """Render an export report as a fixed-width text table.

    Args:
        report: dict. What `export_model` returns (or `export_report.json` holds).

    Returns:
        str: a header line, one row per artifact, and a line under the table for each TFLite file
        that needs more than the builtin TFLite runtime or is int8 with operators left in float,
        and for each ONNX file (its opset, input and, if any, ops outside the standard domain).

    Example:
        >>> print(format_report(export_model(model, "export", samples=data.test)))
    """
    size = report.get("image_size")
    header = (
        f"mode {report.get('mode')}"
        + (f", level {report['level']}" if report.get("level") is not None else "")
        + (f", image size {'x'.join(str(s) for s in size)}" if size else ", dynamic image size")
        + f", {report.get('parity_images', 0)} parity images"
        + (f", Keras {report['keras_latency_ms']:.1f} ms/image" if report.get("keras_latency_ms") is not None else "")
    )
    columns = ("artifact", "format", "quantize", "size", "dice agr.", "min", "max|dp|", "ms/image", "ok")
    rows = []
    for a in report["artifacts"]:
        agreement = a.get("dice_agreement")
        rows.append((
            a["name"],
            a["format"],
            a["quantize"],
            _human_bytes(a["size_bytes"]),
            "n/a" if agreement is None else f"{agreement:.4f}",
            f"{a.get('threshold', float('nan')):.2f}",
            "n/a" if a.get("max_abs_diff") is None else f"{a['max_abs_diff']:.2e}",
            "n/a" if a.get("latency_ms") is None else f"{a['latency_ms']:.2f}",
            "?" if agreement is None else ("yes" if agreement >= a.get("threshold", 0.0) else "NO"),
        ))
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    lines = [header, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = (str(v).ljust(w) if i < 3 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines + _operator_notes(report["artifacts"]))


def _operator_notes(artifacts: list) -> list[str]:
    """Lines about TFLite files that are not builtin-only, int8 files not integer-only, and ONNX files."""
    notes = []
    for a in artifacts:
        if a.get("format") == "onnx":
            extra = f"; needs op(s) {', '.join(a['custom_ops'])} beyond standard ONNX" if a.get("custom_ops") else ""
            notes.append(f"{a['name']}.onnx: opset {a.get('opset')}, input 'images' float32 channels last "
                         f"(dynamic batch){extra}.")
            continue
        if a.get("custom_ops"):
            notes.append(f"{a['name']}: needs non-builtin op(s) {', '.join(a['custom_ops'])} "
                         "(the app must link the Flex delegate or those custom kernels).")
        if a.get("quantize") == "int8" and a.get("float_ops"):
            notes.append(f"{a['name']}: {', '.join(a['float_ops'])} run(s) in float between int8 ops "
                         "(DEQUANTIZE/QUANTIZE around them): fine on CPU, not for integer-only accelerators.")
    return notes


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.1f} MiB"
