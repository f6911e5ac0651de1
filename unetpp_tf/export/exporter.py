"""`export_model`: write every requested artifact, prove each agrees with Keras, commit them together.

The artifacts are SavedModel, TFLite (float32 and quantized), ONNX and `.keras`; see
`unetpp_tf.export` for what each file takes and returns.

Example:
    >>> report = export_model(model, "export", quantize=("none", "int8"),
    ...                       calibration=data.val, samples=data.test)
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import keras

from unetpp_tf import files
from unetpp_tf.export.conversion import (
    convert_to_tflite,
    embedded_metadata,
    padded_forward,
    representative_dataset,
    with_tflite_metadata,
    write_saved_model,
    write_tflite_source,
)
from unetpp_tf.export.onnx_format import convert_to_onnx, onnx_operators, require_onnx
from unetpp_tf.export.operators import operator_summary
from unetpp_tf.export.parity import (
    agreement,
    collect_images,
    failure_message,
    failures,
    thresholds_with,
    timed,
)
from unetpp_tf.export.report import REPORT_NAME, artifact_entry, export_report, format_report
from unetpp_tf.export.tensorflow_process import export_in_tensorflow
from unetpp_tf.inference import as_single_output, load_model
from unetpp_tf.models.pruning import INFERENCE_MODES, supervision_heads
from unetpp_tf.models.preprocessing import model_preprocessing
from unetpp_tf.runners import OnnxModel, SavedModelRunner, TFLiteModel

FORMATS = ("keras", "saved_model", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
FILE_DTYPE = {"none": "float32", "float16": "float16", "dynamic": "dynamic", "int8": "int8"}


def export_model(
    model: keras.Model,
    output_dir,
    *,
    formats=("saved_model", "tflite"),
    quantize=("none",),
    image_size=None,
    mode: str = "accurate",
    level: int | None = None,
    calibration=None,
    samples=None,
    allow_flex: bool = False,
    thresholds: dict | None = None,
    max_samples: int = 16,
    calibration_steps: int = 100,
    num_threads: int | None = None,
) -> dict:
    """Export a model to SavedModel / TFLite / ONNX / `.keras` and prove each artifact agrees.

    The model becomes single-output first ("accurate": mean of the deep-supervision
    heads; "fast": the pruned head `level`). Every artifact and the Keras model then run
    on the same `samples`; an artifact whose mean Dice agreement with the Keras label
    maps is below its threshold fails the export. The new `output_dir` is built in a hidden
    folder beside it and swapped in whole only when everything passed
    (`unetpp_tf.files.staged_directory`): on any error, and at a kill at any instant, the
    folder holds the previous export or the complete new one, never a mix; files in it that
    the export does not write are kept. On a Keras backend other than TensorFlow (JAX, PyTorch)
    the export runs in a TensorFlow child process on a saved `.keras` copy of the model and
    returns the same report (`unetpp_tf.export.tensorflow_process`).

    Args:
        model: keras.Model. A UNet++ (deep supervision or not) or any single-output
            segmentation model with sigmoid (K=1) or softmax (K>1) outputs.
        output_dir: str or Path. Where the artifacts go; created if missing.
        formats: str or tuple. Any of "saved_model", "tflite", "onnx", "keras". "onnx"
            writes `{stem}.onnx` (float32 images [N, H, W, C] in, probabilities out, dynamic
            batch and free spatial axes padded inside the graph; see
            `unetpp_tf.export.onnx_format`) and runs it in onnxruntime for parity; it needs
            the extra `unetpp-tf[onnx]`. Defaults to ("saved_model", "tflite").
        quantize: str or tuple. TFLite variants: "none" (float32), "float16",
            "dynamic" (int8 weights) and "int8" (full integer, uint8 in/out; needs
            `calibration`). Defaults to ("none",).
        image_size: tuple or None. (height, width) of the TFLite input, (depth, height,
            width) for a volume model (padded inside the file when not divisible by
            2**depth); the SavedModel and the ONNX file stay dynamic when the model is (the
            parity images are resized to it all the same). Defaults to the
            model's fixed input size, else the training image size its
            `InputPreprocessing` records.
        mode: str. "accurate" or "fast". Defaults to "accurate".
        level: int or None. Head kept in "fast" mode. Defaults to the deepest head.
        calibration: iterable or None. Images [B, H, W, C] as the data pipeline gives them
            (float32 scaled by the dtype's range; uint8 and uint16 arrays are scaled here) or
            (images, masks) batches, e.g. `data.val`; resized to the fixed size. The int8
            representative dataset; a model with `InputPreprocessing` normalizes them in its
            graph. Defaults to None.
        samples: iterable or None. Images or (images, masks) batches for the parity
            check. Defaults to `calibration`.
        allow_flex: bool. Let TFLite fall back to TensorFlow (Flex) ops instead of
            failing; such files cannot be checked here (parity is reported as None).
            Defaults to False.
        thresholds: dict or None. Minimum Dice agreement per "keras", "saved_model",
            "onnx", "none", "float16", "dynamic", "int8". Defaults to `DEFAULT_THRESHOLDS`
            (0.99, and 0.97 for "dynamic"/"int8").
        max_samples: int. Images used for parity. Defaults to 16.
        calibration_steps: int. Images used for int8 calibration. Defaults to 100.
        num_threads: int or None. TFLite interpreter and onnxruntime threads for the
            parity run. Defaults to None (LiteRT and onnxruntime choose).

    Returns:
        dict: the report also written to `output_dir/export_report.json`:
        {"artifacts": [{"name", "path", "format", "quantize", "size_bytes",
        "dice_agreement", "max_abs_diff", "latency_ms", "threshold", "ops", "custom_ops",
        "float_ops"}, ...], where a TFLite entry lists its operators, the ones that are not
        TFLite builtins, and for int8 those left in float (`operators.operator_summary`), and
        an ONNX entry (format "onnx", quantize "none") its op types, those outside the standard
        ONNX domain as "custom_ops" ([] for the models we build), and its "opset",
        "image_size", "mode", "level", "num_classes", "parity_images",
        "keras_latency_ms"}.

    Example:
        >>> report = export_model(model, "export", quantize=("none", "float16", "int8"),
        ...                       calibration=data.val, samples=data.test)
        >>> [a["name"] for a in report["artifacts"]]
        ['saved_model', 'model_float32', 'model_float16', 'model_int8']
    """
    formats = _as_names(formats, FORMATS, "format")
    quantize = _as_names(quantize, QUANTIZATIONS, "quantize", {"float32": "none"})
    if "onnx" in formats:
        require_onnx()  # before any work: the one-line ImportError names the extra to install
    bars = thresholds_with(thresholds)
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be 'accurate' or 'fast', got {mode!r}.")
    single = as_single_output(model, mode, level)
    if mode == "fast" and level is None and len(model.outputs) > 1:
        level = max(supervision_heads(model))
    channels = single.input_shape[-1]
    size = export_size(single, image_size, required="tflite" in formats)
    wants_int8 = "tflite" in formats and "int8" in quantize
    if wants_int8 and calibration is None:
        raise ValueError(
            "quantize='int8' needs calibration images: pass calibration=data.val (an iterable "
            "of float32 [B, H, W, C] images or (images, masks) batches), or drop "
            "'int8' and use 'dynamic'."
        )
    samples = calibration if samples is None else samples
    if samples is None and set(formats) != {"keras"}:
        raise ValueError(
            "export_model checks every artifact against the Keras model: pass samples= (or "
            "calibration=), e.g. samples=data.test, an iterable of images or (images, masks) batches."
        )
    if keras.backend.backend() != "tensorflow":  # conversion traces TensorFlow graphs: a TensorFlow process does it
        options = dict(formats=list(formats), quantize=list(quantize), image_size=image_size, mode=mode,
                       level=level, allow_flex=allow_flex, thresholds=thresholds, max_samples=max_samples,
                       calibration_steps=calibration_steps, num_threads=num_threads)
        return export_in_tensorflow(model, output_dir, size=size, rank=len(single.input_shape) - 2, channels=channels,
                                    wants_int8=wants_int8, options=options, calibration=calibration, samples=samples)

    output_dir = Path(output_dir).absolute()
    with files.staged_directory(output_dir) as staging:
        rank = len(single.input_shape) - 2
        parity = collect_images(samples, size, channels, max_samples, "samples", rank) if samples is not None else []
        reference, keras_ms = _keras_reference(single, parity)
        stem = "model" if level is None else f"model_L{level}"
        artifacts = []

        def check(name, file_name, fmt, quant, runner, operators=None):
            """Add the report entry of staging/file_name, with its parity measured when it can run."""
            threshold = bars[quant if fmt == "tflite" else fmt]
            entry = artifact_entry(name, output_dir / file_name, staging / file_name, fmt, quant, threshold)
            if operators is not None:
                entry.update(ops=operators["ops"], custom_ops=operators["custom_ops"],
                             float_ops=operators["float_ops"] if quant == "int8" else None)
            run = runner(staging / file_name) if parity else None
            if run is not None:
                outputs, latency = timed(run, parity)
                dice, diff = agreement(reference, outputs)
                entry.update(dice_agreement=round(dice, 6), max_abs_diff=float(f"{diff:.3g}"),
                             latency_ms=round(latency, 3))
            artifacts.append(entry)

        if "keras" in formats:
            single.save(staging / f"{stem}_inference.keras")
            check(f"{stem}_inference", f"{stem}_inference.keras", "keras", "none",
                  lambda path: padded_forward(load_model(path)))
        metadata = embedded_metadata(single, mode, level)
        if "saved_model" in formats:
            name = "saved_model" if level is None else f"saved_model_L{level}"
            write_saved_model(single, staging / name, metadata)
            check(name, name, "saved_model", "none", SavedModelRunner)
        if "tflite" in formats:
            source = staging / ".tflite_source"
            write_tflite_source(single, source, size)
            representative = None
            if wants_int8:
                images = collect_images(calibration, size, channels, calibration_steps, "calibration", rank)
                representative = representative_dataset(images)
            for quant in quantize:
                name = f"{stem}_{FILE_DTYPE[quant]}"
                content = with_tflite_metadata(convert_to_tflite(source, quant, representative, allow_flex), metadata)
                write_tflite(staging / f"{name}.tflite", content)
                check(name, f"{name}.tflite", "tflite", quant, _tflite_runner(allow_flex, num_threads),
                      operator_summary(content))
            shutil.rmtree(source)
        if "onnx" in formats:
            proto = convert_to_onnx(single, metadata)
            write_onnx(staging / f"{stem}.onnx", proto)
            check(stem, f"{stem}.onnx", "onnx", "none", lambda path: OnnxModel(path, num_threads=num_threads),
                  onnx_operators(proto))
            artifacts[-1]["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

        report = export_report(artifacts, size, mode, level, int(single.output_shape[-1]), len(parity), keras_ms)
        failed = failures(artifacts)
        if failed:
            raise ValueError(failure_message(failed, format_report(report), output_dir))
        files.write_json(staging / REPORT_NAME, report)
    return report


def write_tflite(path: Path, content: bytes) -> None:
    """Write a converted TFLite file (into the staging folder of `export_model`).

    Example:
        >>> write_tflite(staging / "model_float32.tflite", content)
    """
    files.atomic_write(path, lambda temp: Path(temp).write_bytes(content))


def write_onnx(path: Path, proto) -> None:
    """Write a converted ONNX model (into the staging folder of `export_model`).

    Example:
        >>> write_onnx(staging / "model.onnx", convert_to_onnx(model, metadata))
    """
    files.atomic_write(path, lambda temp: Path(temp).write_bytes(proto.SerializeToString()))


def _keras_reference(single: keras.Model, parity: list) -> tuple[list, float | None]:
    """The Keras model's probabilities on the parity images and its median latency."""
    if not parity:
        return [], None
    try:
        return timed(padded_forward(single), parity)
    except Exception as error:
        sizes = "x".join(str(n) for n in parity[0].shape[1:-1])
        raise ValueError(
            f"model {single.name!r} cannot run on {sizes} inputs ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); pick another "
            "image_size or resize the samples."
        ) from error


def _tflite_runner(allow_flex: bool, num_threads):
    """Runner factory for the parity check; a Flex file that cannot run here is skipped."""

    def make(path):
        try:
            return TFLiteModel(path, num_threads=num_threads)
        except (RuntimeError, ValueError) as error:
            if allow_flex and "Select TensorFlow op" in str(error):
                warnings.warn(
                    f"{Path(path).name} uses Flex (TensorFlow) ops, which this Python runtime "
                    "cannot run; its parity was not checked.",
                    stacklevel=2,
                )
                return None
            raise

    return make


def _as_names(value, allowed, what, aliases=None):
    names = (value,) if isinstance(value, str) else tuple(value)
    names = tuple((aliases or {}).get(name, name) for name in names)
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or names!r}; choose from {allowed}.")
    return tuple(dict.fromkeys(names))


def export_size(model: keras.Model, image_size, required: bool):
    """The spatial size TFLite needs ((H, W), or (D, H, W) for volumes): image_size, else the
    model's fixed size, else the recorded training size; None when there is none and not `required`.

    Example:
        >>> export_size(build_unetpp((96, 96, 1)), None, required=True)
        (96, 96)
    """
    _, *spatial, channels = model.input_shape
    names = ("height", "width") if len(spatial) == 2 else ("depth", "height", "width")
    wanted = "(" + ", ".join(names) + ")"
    if channels is None:
        raise ValueError(f"model {model.name!r} has an unknown number of input channels; rebuild it with a fixed C.")
    if image_size is None:
        if all(n is not None for n in spatial):
            return tuple(int(n) for n in spatial)
        recorded = (model_preprocessing(model) or {}).get("image_size")
        if recorded is not None and len(spatial) == 2:
            return export_size(model, recorded, required)
        if required:
            example = "(256, 256)" if len(spatial) == 2 else "(64, 128, 128)"
            raise ValueError(
                f"model {model.name!r} takes inputs of any size ({' x '.join(map(str, spatial))}); TFLite "
                f"needs a fixed size: pass image_size={wanted}, e.g. image_size={example}."
            )
        return None
    size = tuple(int(s) for s in image_size)
    if len(size) != len(spatial) or min(size) < 1:
        raise ValueError(f"image_size must be {wanted} for this model, got {image_size!r}.")
    for given, fixed, axis in zip(size, spatial, names):
        if fixed is not None and given != fixed:
            raise ValueError(
                f"image_size {size} does not match the model's fixed input {axis} {fixed}; "
                f"pass image_size=None or {tuple(spatial)}, or rebuild the model with "
                f"input_shape={(None,) * len(spatial) + (channels,)} to export another size."
            )
    return size
