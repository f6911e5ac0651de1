"""Prediction: load a model, run it on arrays or image files, tile large images, flip TTA.

`predict` takes float32 images of any size, scaled by their dtype's range (8-bit / 255, 16-bit /
65535) as the data pipeline gives them; a model built with `preprocessing=` normalizes them
itself. A model with a fixed input size (or any model when `tile_size` is given) runs on
overlapping windows that are blended with a smooth weight; a None x None model runs on the
whole image, reflection-padded up to a multiple of its downsampling factor and cropped back.
Windows go through the model `batch_size` at a time and are accumulated into one canvas per
image, so memory stays bounded for very large images.
"""

from __future__ import annotations

import itertools
import os
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unetpp_tf import files, losses as _losses, metrics as _metrics  # noqa: F401  (registers custom objects)
from unetpp_tf.data.checks import check_size
from unetpp_tf.data.inspection import inspect_image
from unetpp_tf.data.readers import IMAGE_EXTENSIONS, pil_image_array
from unetpp_tf.models.analysis import size_divisor
from unetpp_tf.models.preprocessing import model_preprocessing
from unetpp_tf.models.pruning import INFERENCE_MODES, inference_model
from unetpp_tf.postprocess import apply_postprocessing, check_postprocessing

DEFAULT_TILE = 256
_WEIGHT_FLOOR = 1e-2  # window borders still count, so every pixel has a positive weight
_FLIPS = ((), (1,), (2,), (1, 2))  # identity, vertical, horizontal, both (axes of [N, H, W, C])
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# ----------------------------------------------------------------------------- loading


class ModelFileError(ValueError):
    """A model file that cannot be loaded, with a message that names it and says what to do."""


def _check_keras_archive(path: Path) -> None:
    """Refuse, with a clear message, a `.keras` file that is empty, truncated, corrupt or not a model."""
    with open(path, "rb") as handle:
        head = handle.read(len(_HDF5_SIGNATURE))
    if not head:
        raise ModelFileError(f"{path} is empty (0 bytes); save or copy the model again.")
    if head == _HDF5_SIGNATURE:
        raise ModelFileError(
            f"{path} is an HDF5 file (weights from save_weights, or a legacy .h5 model), not a .keras model: "
            "build the model and call model.load_weights on it (named *.weights.h5), or load a .keras file."
        )
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a .keras archive (a zip written by model.save): it is truncated or not a model "
            "file; save or copy the model again."
        )
    with zipfile.ZipFile(path) as archive:
        if "config.json" not in archive.namelist():
            raise ModelFileError(f"{path} is a zip archive but not a Keras model (it has no config.json).")
        try:
            broken = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            broken = f"? ({error})"
    if broken is not None:
        raise ModelFileError(f"{path} is corrupt (its entry {broken} fails its checksum); save or copy it again.")


def _load_keras(path: Path) -> keras.Model:
    _check_keras_archive(path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError as error:
        if "safe_mode" not in str(error):
            raise
        raise ModelFileError(
            f"{path} holds Python code (a Lambda layer), which safe mode refuses to load. If you trust "
            f"the file, load it with keras.models.load_model({str(path)!r}, safe_mode=False) and pass "
            "the model itself."
        ) from None


def _load_tflite(path: Path):
    from unetpp_tf.runners import TFLiteModel  # deferred: pulls in LiteRT

    return TFLiteModel(path)


def _load_saved_model(path: Path):
    from unetpp_tf.runners import SavedModelRunner

    return SavedModelRunner(path)


def _load_onnx(path: Path):
    from unetpp_tf.runners import OnnxModel  # onnxruntime is imported there (ImportError: the extra to install)

    try:
        return OnnxModel(path)
    except ValueError as error:  # an unreadable or unsuitable file: the runner's message names it
        raise ModelFileError(str(error)) from error


# One loader per model format, keyed by file suffix (or "saved_model" for such a directory).
_LOADERS = {".keras": _load_keras, ".tflite": _load_tflite, ".onnx": _load_onnx, "saved_model": _load_saved_model}


def load_model(path: str | os.PathLike):
    """Load a saved model for inference (unetpp_tf losses, metrics and layers are registered).

    `.keras` files load with Keras' safe mode on (no Python code from the file runs); a file
    that is empty, truncated, corrupt, a weights file or holds a `Lambda` layer gets a
    message naming it and what to do.

    Args:
        path: str or Path. A `.keras` file, a `.tflite` or `.onnx` file or a SavedModel
            directory (as written by `unetpp_tf.export.export_model`; `.onnx` needs onnxruntime).

    Returns:
        keras.Model, or a `TFLiteModel` / `OnnxModel` / `SavedModelRunner` with the same
        `predict` interface.

    Example:
        >>> model = load_model("saved_models/run1/model.keras")
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist; check the path.")
    kind = "saved_model" if (path / "saved_model.pb").is_file() else path.suffix.lower() if path.is_file() else None
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ValueError(
            f"{path} is not a model: pass a .keras file, a .tflite file or a SavedModel directory (or an .onnx file)."
        )
    try:
        return loader(path)
    except (ModelFileError, ImportError):  # ImportError: a runtime to install (onnxruntime), said in one line
        raise
    except Exception as error:  # noqa: BLE001  (each format raises its own types for a bad file)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable model ({reason}); check the file or export it again.") from error


def as_single_output(model: keras.Model, mode: str = "accurate", level: int | None = None) -> keras.Model:
    """Return a one-output model: deep-supervision models go through `inference_model`.

    This is the one place that turns any model (or path) into the single-output model that
    prediction, evaluation, scoring during training and export run.

    Args:
        model: keras.Model or str. Any segmentation model (several outputs mean deep
            supervision), or a path for `load_model`.
        mode: str. "accurate" (mean of the heads) or "fast" (one pruned head) for
            deep-supervision models. Defaults to "accurate".
        level: int or None. Head kept in "fast" mode; None is the deepest. Defaults to None.

    Returns:
        keras.Model: `model` itself when it has one output, else the inference model (taking
        one image tensor, so calling it with a tensor raises no structure warning).

    Example:
        >>> fast = as_single_output(build_unetpp((32, 32, 1), depth=2, deep_supervision=True), "fast", 1)
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}.")
    if len(model.outputs) > 1:
        single = inference_model(model, mode, level)
        return keras.Model(single.inputs[0], single.outputs[0], name=single.name)
    if level is not None:
        raise ValueError(
            f"level={level} selects a deep-supervision head, but model {model.name!r} has a single "
            "output and no deep-supervision heads to prune; leave level unset."
        )
    return model


# ----------------------------------------------------------------------------- model geometry


def _input_geometry(model: keras.Model) -> tuple[tuple, int | None]:
    if len(model.inputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs; predict needs one image input.")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"model {model.name!r} takes inputs of shape {shape}; predict needs (batch, H, W, C).")
    return shape[1:3], shape[3]


# ----------------------------------------------------------------------------- prediction


def _forward(model: keras.Model, batch: np.ndarray, tta: bool) -> np.ndarray:
    """Probabilities for a batch (compiled predict step); with `tta` the mean of the four flips, each flipped back."""
    total = 0.0
    for axes in _FLIPS if tta else ((),):
        flipped = np.ascontiguousarray(np.flip(batch, axes))
        total = total + np.flip(np.asarray(model.predict_on_batch(flipped)), axes)
    return np.asarray(total / (len(_FLIPS) if tta else 1), np.float32)


def _pad_to(images: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Reflection-pad [N, h, w, C] to [N, height, width, C], centred; return it and the offsets."""
    dh, dw = height - images.shape[1], width - images.shape[2]
    top, left = dh // 2, dw // 2
    padded = np.pad(images, ((0, 0), (top, dh - top), (left, dw - left), (0, 0)), mode="reflect")
    return padded, top, left


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _predict_direct(model, images, divisor, tta):
    height, width = images.shape[1:3]
    padded, top, left = _pad_to(images, _round_up(height, divisor), _round_up(width, divisor))
    return _forward(model, padded, tta)[:, top : top + height, left : left + width]


def _window_weight(height: int, width: int) -> np.ndarray:
    """2-D Hann weight (peak 1 in the centre) with a floor, shape [height, width, 1]."""
    rows, cols = (np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2 for n in (height, width))
    return np.maximum(np.outer(rows, cols), _WEIGHT_FLOOR)[..., None].astype(np.float32)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _predict_tiled(model, image, tile, overlap, batch_size, tta, classes):
    """Blend overlapping windows of one image [H, W, C] into probabilities [H, W, K]."""
    height, width = image.shape[:2]
    strides = [max(1, int(round(t * (1.0 - overlap)))) for t in tile]
    margins = [(t - s) // 2 for t, s in zip(tile, strides)]
    size = [max(n + 2 * m, t) for n, m, t in zip((height, width), margins, tile)]
    padded, top, left = _pad_to(image[None], *size)
    canvas = np.zeros((*size, classes), np.float32)
    norm = np.zeros((*size, 1), np.float32)
    weight = _window_weight(*tile)
    corners = list(itertools.product(*(_starts(n, t, s) for n, t, s in zip(size, tile, strides))))
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        windows = np.stack([padded[0, y : y + tile[0], x : x + tile[1]] for y, x in chunk])
        for (y, x), probs in zip(chunk, _forward(model, windows, tta)):
            canvas[y : y + tile[0], x : x + tile[1]] += probs * weight
            norm[y : y + tile[0], x : x + tile[1]] += weight
    return (canvas / norm)[top : top + height, left : left + width]


def _describe(model) -> str:
    """How an error names a model: its file for an exported model, else its name."""
    return f"{model.path}" if hasattr(model, "path") else f"model {model.name!r}"


def _tile_shape(tile_size, fixed, divisor, image_hw, model) -> tuple[int, int] | None:
    """Window (height, width) for tiled prediction, or None to run on whole images."""
    if isinstance(tile_size, (list, tuple)) and len(tile_size) == 1:  # e.g. a CLI "--tile-size 96"
        tile_size = tile_size[0]
    tile = check_size(tile_size, "tile_size")
    if tile is None:
        if all(f is None or f == n for f, n in zip(fixed, image_hw)):
            return None
        return tuple(_round_up(DEFAULT_TILE, divisor) if f is None else f for f in fixed)
    for label, t, f in zip(("height", "width"), tile, fixed):
        if f is not None and t != f:
            raise ValueError(
                f"tile_size {label} {t} differs from the fixed input {label} {f} of {_describe(model)}; "
                f"pass tile_size={tuple(n if n is not None else t for n, t in zip(fixed, tile))} or leave it unset."
            )
        if f is None and t % divisor:
            raise ValueError(
                f"tile_size {label} {t} is not divisible by {divisor} (the model's downsampling); "
                f"pass {_round_up(t, divisor)}."
            )
    return tile


def predict(
    model: keras.Model,
    images,
    *,
    batch_size: int = 8,
    tile_size=None,
    overlap: float = 0.25,
    tta: bool = False,
    mode: str = "accurate",
    level: int | None = None,
) -> np.ndarray:
    """Predict per-pixel probabilities for images of any size.

    Images that match a fixed model input, or any size for a None x None model, run whole
    (None x None: reflection-padded to a multiple of `size_divisor(model)`, cropped back).
    With `tile_size`, or when a fixed-size model meets a different image size, the image is
    reflection-padded and cut into overlapping windows whose predictions are blended with a
    2-D Hann weight and normalized by the summed weights.

    Args:
        model: keras.Model or str. A model (deep-supervision models are made single-output
            with `mode`/`level`) or a path for `load_model`.
        images: array or tensor. float32 [N, H, W, C], scaled by the dtype's range as the
            data pipeline gives them (8-bit / 255, 16-bit / 65535, floats kept).
        batch_size: int. Images (or windows) per forward pass. Defaults to 8.
        tile_size: int, tuple or None. (height, width) of the windows; None tiles only when
            the model has a fixed input size that differs from the images, using that size
            (256 on free axes). Defaults to None.
        overlap: float. Fraction of a window shared with its neighbour, in [0, 1).
            Defaults to 0.25.
        tta: bool. Average over identity, horizontal, vertical and both flips (4 passes).
            Defaults to False.
        mode: str. "accurate" or "fast" for deep-supervision models. Defaults to "accurate".
        level: int or None. Head for "fast" mode. Defaults to None.

    Returns:
        np.ndarray: float32 probabilities [N, H, W, K], K = the model's output channels.

    Example:
        >>> probs = predict(model, images, tile_size=96, overlap=0.5, tta=True)
    """
    model = as_single_output(model, mode, level)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap!r}; 0.25 is a good default.")
    images = np.asarray(keras.ops.convert_to_numpy(images), np.float32)
    fixed, channels = _input_geometry(model)
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape [N, H, W, C], got {images.shape}; for one image pass image[None]."
        )
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(f"images have {images.shape[-1]} channel(s) but {_describe(model)} expects {channels}.")
    divisor = size_divisor(model) if isinstance(model, keras.Model) else (model.size_divisor or 1)
    classes = model.outputs[0].shape[-1]
    tile = _tile_shape(tile_size, fixed, divisor, images.shape[1:3], model)
    out = np.empty((*images.shape[:3], classes), np.float32)
    for start in range(0, len(images), 1 if tile else batch_size):
        if tile:
            out[start] = _predict_tiled(model, images[start], tile, overlap, batch_size, tta, classes)
        else:
            out[start : start + batch_size] = _predict_direct(model, images[start : start + batch_size], divisor, tta)
    return out


def labels_from_probabilities(probs, threshold: float = 0.5) -> np.ndarray:
    """Turn probabilities into class ids: threshold one sigmoid channel, argmax for softmax.

    Args:
        probs: array. [N, H, W, K] probabilities.
        threshold: float. Binary only: foreground where p >= threshold. Defaults to 0.5.

    Returns:
        np.ndarray: uint8 [N, H, W] class ids ({0, 1} for binary).

    Example:
        >>> labels_from_probabilities(np.array([[[[0.2], [0.7]]]]))
        array([[[0, 1]]], dtype=uint8)
    """
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape [N, H, W, K], got {probs.shape}.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    if probs.shape[-1] == 1:
        return (probs[..., 0] >= threshold).astype(np.uint8)
    if probs.shape[-1] > 256:
        raise ValueError(f"{probs.shape[-1]} classes do not fit in uint8 class ids (at most 256).")
    return np.argmax(probs, axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------- files


def _image_files(inputs) -> list[Path]:
    """Expand files and folders into image files; every problem raises before anything is read."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"input {item} does not exist; check the path.")
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            paths.extend(found)
        elif item.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(item)
        else:
            raise ValueError(f"input {item} is not an image file; use one of {', '.join(IMAGE_EXTENSIONS)}.")
    if not paths:
        raise ValueError("inputs is empty; pass image files or folders.")
    return paths


def _check_image(path: Path, channels: int) -> None:
    """Refuse an unusable input image (damaged, a decompression bomb, transparent) or channel count."""
    # raises UnusableFile (a ValueError) naming the file and what to do; prediction reads with PIL only
    mode = inspect_image(path, tf_check=False).mode
    if channels not in (1, 3):
        found = 1 if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;") else 3
        raise ValueError(
            f"image {path} has {found} channel(s) but the model expects {channels}; image files are "
            f"read as 1 (gray) or 3 (RGB) channels, so pass arrays [N, H, W, {channels}] to predict()."
        )


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return pil_image_array(image, channels)


def _write_png(array: np.ndarray):
    from PIL import Image

    return lambda temp: Image.fromarray(array).save(temp, format="PNG")


def prediction_size(model, image_size=None) -> tuple[int, int] | None:
    """The (height, width) `predict_files` resizes images to, or None for their own size.

    An explicit `image_size` wins; otherwise a model trained on resized images (its
    `InputPreprocessing` has resize="resize", also recorded in exported files) gives its
    training size, and a model trained on crops or at native size ("crop", "none") gives None.

    Args:
        model: keras.Model or exported model. The model `predict_files` runs.
        image_size: int, tuple or None. An explicit size. Defaults to None.

    Returns:
        tuple or None: (height, width).

    Example:
        >>> prediction_size(build_unetpp(preprocessing={"image_size": (64, 64), "resize": "resize"}))
        (64, 64)
    """
    if image_size is not None:
        return check_size(image_size, "image_size")
    settings = model_preprocessing(model) or {}
    return tuple(settings["image_size"]) if settings.get("resize") == "resize" else None


def predict_files(
    model: keras.Model,
    inputs,
    output_dir: str | os.PathLike,
    *,
    overlay: bool = False,
    image_size=None,
    channels: int | None = None,
    threshold: float = 0.5,
    postprocess=None,
    **predict_kwargs,
) -> list[Path]:
    """Segment image files and write one mask PNG per image, named after it.

    Each image (PNG, JPEG, BMP, TIFF; 8-bit, 16-bit or float; gray or RGB, converted to the
    model's channels) is scaled by its dtype's range (8-bit / 255, 16-bit / 65535, floats kept)
    and predicted with `predict` (tiled when larger than a fixed model input): at its own size,
    or resized to the model's training size when it was trained on resized images. Masks are
    written as `<stem>.png`: 0/255 for binary models, class ids for multi-class ones. Every
    input is checked before anything is written, and the files are staged under temporary
    names and moved into place only when all images succeeded (`unetpp_tf.files.staged_writes`:
    a kill leaves each mask the old file or the new one, never a truncated one). A read-only
    `output_dir` is refused before any image is predicted.

    Args:
        model: keras.Model or str. The model or a path for `load_model`.
        inputs: list of str or Path. Image files and/or folders (their images, sorted).
        output_dir: str or Path. Where the masks go; created if needed.
        overlay: bool. Also write `<stem>_overlay.png` (mask drawn over the image).
            Defaults to False.
        image_size: int, tuple or None. Resize each image to (height, width) for the model and
            the probabilities back to the image size; None uses `prediction_size(model)`: the
            training size a model trained on resized images records, else the image's own
            size. Defaults to None.
        channels: int or None. Channels to read the images with; None uses the model's input
            channels, which it must match when given. Defaults to None.
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        postprocess: dict, list or None. Post-processing steps (`unetpp_tf.postprocess`, e.g. the
            run's `read_postprocessing(run)`) applied to each label map before it is written.
            Defaults to None (the labels as predicted).
        **predict_kwargs: passed to `predict` (batch_size, tile_size, overlap, tta, mode, level).

    Returns:
        list of Path: the mask files written, in input order.

    Example:
        >>> predict_files("model.keras", ["scans/"], "masks/", overlay=True, tta=True)
    """
    model = as_single_output(model, predict_kwargs.pop("mode", "accurate"), predict_kwargs.pop("level", None))
    _, model_channels = _input_geometry(model)
    if channels is not None and model_channels is not None and channels != model_channels:
        raise ValueError(f"channels={channels} but model {model.name!r} expects {model_channels} input channels.")
    channels = channels or model_channels
    if channels is None:
        raise ValueError(f"model {model.name!r} does not fix its input channels; pass channels=1 or 3.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    postprocess = check_postprocessing(postprocess)
    image_size = prediction_size(model, image_size)
    image_paths = _image_files(inputs)
    output_dir = Path(output_dir)
    names = {}
    for path in image_paths:
        for name in [f"{path.stem}.png"] + ([f"{path.stem}_overlay.png"] if overlay else []):
            if name in names:
                raise ValueError(f"{path} and {names[name]} would both be written as {output_dir / name}; rename one.")
            names[name] = path
        _check_image(path, channels)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise files.write_error(output_dir, error) from error
    files.require_writable(output_dir)
    if overlay:
        from unetpp_tf.viz import overlay as draw_overlay
    written = []
    with files.staged_writes(output_dir) as stage:
        for path in image_paths:
            image = _read_image(path, channels)
            resized = image if image_size is None else tf.image.resize(image, image_size, antialias=True).numpy()
            probs = predict(model, resized[None], **predict_kwargs)
            if image_size is not None:
                probs = tf.image.resize(probs, image.shape[:2]).numpy()
            labels = apply_postprocessing(labels_from_probabilities(probs, threshold)[0], postprocess)
            mask_path = output_dir / f"{path.stem}.png"
            stage(mask_path, _write_png(labels * np.uint8(255) if probs.shape[-1] == 1 else labels))
            if overlay:
                rgb = np.clip(np.round(draw_overlay(image, labels) * 255.0), 0, 255).astype(np.uint8)
                stage(output_dir / f"{path.stem}_overlay.png", _write_png(rgb))
            written.append(mask_path)
    return written
