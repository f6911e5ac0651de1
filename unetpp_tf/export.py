"""Export a trained UNet++ to `.keras`, SavedModel and TFLite, with measured parity.

`export_model` is the one entry point (the CLI and the training run call it). It turns a
deep-supervision model into one output ("accurate" = mean of the heads, "fast" = the
pruned head L_level), writes every requested artifact into a temporary directory, runs
the Keras model and every artifact on the same images, and only when every artifact
agrees with Keras does it move the files into `output_dir` (one `os.replace` each) and
write `export_report.json`. Any failure leaves `output_dir` as it was.

Artifacts (`stem` is "model", or "model_L{level}" for a pruned head):

    saved_model/ (saved_model_L{level}/)   signatures "serving_default" (uint8 images)
                                            and "serve_float" (float32 images, see below)
    {stem}_float32.tflite                   quantize "none": float32 in, float32 out
    {stem}_float16.tflite                   float16 weights; float32 in/out
    {stem}_dynamic.tflite                   int8 weights, float activations; float32 in/out
    {stem}_int8.tflite                      full integer; uint8 in, uint8 out (see below)
    {stem}_inference.keras                  format "keras": the single-output Keras model

Float inputs are images as the data pipeline gives them, scaled by their dtype's range
(8-bit / 255, 16-bit / 65535, float images as they are); a model built with
`preprocessing=` normalizes them in its own graph (`InputPreprocessing`), so every artifact
applies the same normalization. The uint8 "serving_default" signature divides by 255: it is
for 8-bit images; give 16-bit images to "serve_float" as x / 65535.

TFLite files take one image: float32 [1, H, W, C] and return float32 probabilities
[1, H, W, K]. The int8 file takes uint8 [1, H, W, C] and returns uint8 probabilities: the
input is quantized with scale 1/255 and zero point 0 (the calibration pins the input range to
[0, 1]), so raw 8-bit pixels go in unchanged (it is for 8-bit images too); read the output as
`scale * (q - zero_point)` with the output tensor's quantization parameters.
`TFLiteModel` does all of this for you. Every file carries the model's settings (number of
classes, mode, level and the `InputPreprocessing` settings, among them the training image
size and resize policy that `predict_files` follows): a SavedModel in
`assets.extra/unetpp_tf.json`, a TFLite file as flatbuffer metadata named "unetpp_tf"; the
runners expose them as `.metadata` and `.preprocessing`.

Example:
    >>> report = export_model(model, "export", quantize=("none", "int8"),
    ...                       calibration=data.val, samples=data.test)
    >>> print(format_report(report))
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unetpp_tf._native_logs import native_stderr_silenced
from unetpp_tf.metrics import confusion_counts, ratios_from_counts
from unetpp_tf.models.analysis import size_divisor
from unetpp_tf.models.preprocessing import model_preprocessing
from unetpp_tf.models.pruning import inference_model, supervision_heads

FORMATS = ("keras", "saved_model", "tflite")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
DEFAULT_THRESHOLDS = {
    "keras": 0.99,
    "saved_model": 0.99,
    "none": 0.99,
    "float16": 0.99,
    "dynamic": 0.97,
    "int8": 0.97,
}
REPORT_NAME = "export_report.json"
METADATA_PATH = "assets.extra/unetpp_tf.json"  # inside a SavedModel; TF ignores assets.extra
METADATA_NAME = "unetpp_tf"  # the flatbuffer metadata entry of a TFLite file
_FILE_DTYPE = {"none": "float32", "float16": "float16", "dynamic": "dynamic", "int8": "int8"}


# --------------------------------------------------------------------------- runners


def _interpreter_class():
    """Return the LiteRT interpreter class, or tf.lite.Interpreter with a warning."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        warnings.warn(
            "ai_edge_litert is not installed; falling back to the deprecated "
            "tf.lite.Interpreter. Run `pip install ai-edge-litert` to use LiteRT.",
            stacklevel=3,
        )
        return tf.lite.Interpreter
    return Interpreter


def _as_image_batch(images) -> np.ndarray:
    """Return float32 [N, H, W, C] from an array-like of one image or a batch."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(
            f"images must be [N, H, W, C] or [H, W, C], got shape {array.shape}."
        )
    if np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"images must be float32, got dtype {array.dtype}; scale them by their dtype's range "
            "first (8-bit / 255, 16-bit / 65535)."
        )
    return array.astype(np.float32, copy=False)


def _predict_input(x) -> np.ndarray:
    """Gather the images of an array, a tensor or an iterable of batches for `.predict`."""
    if isinstance(x, (np.ndarray, tf.Tensor)) or hasattr(x, "__array__"):
        return _as_image_batch(x)
    batches = [_as_image_batch(_first(element)) for element in x]
    if not batches:
        raise ValueError("predict received no images.")
    return np.concatenate(batches, axis=0)


def _first(element):
    """The images of a dataset element: `x` of `(x, y)`, `x["images"]`, or `x` itself."""
    if isinstance(element, tuple):
        return element[0]
    if isinstance(element, dict):
        for key in ("images", "image"):
            if key in element:
                return element[key]
        raise ValueError(f"cannot find images in a dict with keys {sorted(element)}; use key 'images'.")
    return element


class _ExportedModel:
    """What TFLiteModel and SavedModelRunner share: the Keras-like surface that lets
    `unetpp_tf.predict`, `evaluate` and the CLI use them in place of a Keras model.
    Subclasses define `__call__`, `input_shape` and `output_shape`."""

    @property
    def inputs(self) -> list:
        """[tf.TensorSpec (None, H, W, C)], standing in for Keras `model.inputs`."""
        return [tf.TensorSpec(self.input_shape, tf.float32, name="images")]

    @property
    def outputs(self) -> list:
        """[tf.TensorSpec (None, H, W, K)], standing in for Keras `model.outputs`."""
        return [tf.TensorSpec(self.output_shape, tf.float32, name="probabilities")]

    @property
    def num_classes(self) -> int:
        """Output channels K (1 for a binary sigmoid model)."""
        return int(self.output_shape[-1])

    @property
    def preprocessing(self) -> dict | None:
        """The exported model's `InputPreprocessing` settings (see `model_preprocessing`), or None."""
        return self.metadata.get("preprocessing")

    def predict(self, x, batch_size: int | None = None, verbose=0, **kwargs) -> np.ndarray:
        """Keras-style alias of `__call__`; also accepts an iterable of batches.

        Args:
            x: array, tensor or iterable. Images [N, H, W, C] (float32, scaled by their
                dtype's range), or a dataset of images or (images, masks) batches.
            batch_size: int or None. Ignored (kept for Keras compatibility). Defaults to None.
            verbose: int. Ignored, for Keras compatibility. Defaults to 0.

        Returns:
            np.ndarray: float32 probabilities [N, H, W, K].

        Example:
            >>> probabilities = TFLiteModel("export/model_float32.tflite").predict(data.test)
        """
        return self(_predict_input(x))

    def predict_on_batch(self, x) -> np.ndarray:
        """Keras-style alias of `__call__` for one batch of images."""
        return self(x)


class TFLiteModel(_ExportedModel):
    """Run a `.tflite` segmentation model like a Keras model (LiteRT interpreter).

    Images go in as float32 [N, H, W, C], scaled by their dtype's range (8-bit / 255,
    16-bit / 65535), whatever the file's input type: int8/uint8 inputs are quantized with
    the file's scale and zero point (1/255 for `export_model`'s int8 files, so those are
    for 8-bit images) and quantized outputs are dequantized, so `__call__` always returns
    float32 probabilities [N, H, W, K]. The file holds a batch-1 graph; batches run one
    image at a time. `metadata` holds the settings `export_model` embedded ({} otherwise).

    Args:
        path: str or Path. The `.tflite` file.
        num_threads: int or None. Interpreter threads; None lets LiteRT choose.
            Defaults to None.

    Example:
        >>> lite = TFLiteModel("export/model_int8.tflite")
        >>> probabilities = lite(images)          # float32 [N, H, W, K]
        >>> probabilities = lite.predict(images)  # same, Keras-style
    """

    def __init__(self, path, num_threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no TFLite file at {self.path}.")
        interpreter_class = _interpreter_class()
        with native_stderr_silenced():
            self._interpreter = interpreter_class(model_path=str(self.path), num_threads=num_threads)
            self._interpreter.allocate_tensors()
        inputs = self._interpreter.get_input_details()
        if len(inputs) != 1:
            raise ValueError(f"{self.path} has {len(inputs)} inputs; expected one image input.")
        self._input = inputs[0]
        self._output = self._probabilities_output()
        shape = tuple(int(s) for s in self._input["shape"])
        if len(shape) != 4:
            raise ValueError(f"{self.path} takes inputs of shape {shape}; expected [1, H, W, C].")
        self._image_shape = shape[1:]
        self.metadata = _read_tflite_metadata(self.path.read_bytes())

    def _probabilities_output(self):
        outputs = self._interpreter.get_output_details()
        if len(outputs) == 1:
            return outputs[0]
        for signature in self._interpreter.get_signature_list():
            details = self._interpreter.get_signature_runner(signature).get_output_details()
            if "probabilities" in details:
                index = details["probabilities"]["index"]
                return next(o for o in outputs if o["index"] == index)
        return next(o for o in outputs if len(o["shape"]) == 4)

    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return self.path.stem

    @property
    def input_shape(self) -> tuple:
        """Keras-style input shape (None, H, W, C)."""
        return (None, *self._image_shape)

    @property
    def size_divisor(self) -> int:
        """1: the file has a fixed input size, so inputs are never padded to a multiple."""
        return 1

    @property
    def output_shape(self) -> tuple:
        """Keras-style output shape (None, H, W, K)."""
        return (None, *(int(s) for s in self._output["shape"][1:]))

    @property
    def input_dtype(self) -> np.dtype:
        """The file's input dtype: float32, or uint8/int8 for a full-integer model."""
        return np.dtype(self._input["dtype"])

    @property
    def input_quantization(self) -> tuple | None:
        """(scale, zero_point) of a quantized input, None for a float input."""
        scale, zero_point = self._input["quantization"]
        return (float(scale), int(zero_point)) if scale else None

    def _quantize(self, image: np.ndarray) -> np.ndarray:
        dtype = self.input_dtype
        if dtype == np.float32:
            return image
        scale, zero_point = self.input_quantization
        info = np.iinfo(dtype)
        return np.clip(np.round(image / scale + zero_point), info.min, info.max).astype(dtype)

    def _dequantize(self, output: np.ndarray) -> np.ndarray:
        scale, zero_point = self._output["quantization"]
        if np.issubdtype(output.dtype, np.integer):
            return ((output.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return output.astype(np.float32, copy=False)

    def __call__(self, images) -> np.ndarray:
        """Probabilities float32 [N, H, W, K] for float32 images [N, H, W, C]."""
        batch = _as_image_batch(images)
        if batch.shape[1:] != self._image_shape:
            h, w, c = self._image_shape
            raise ValueError(
                f"{self.path.name} expects images of shape [N, {h}, {w}, {c}], got "
                f"{list(batch.shape)}; resize or crop them to {h}x{w} (or export with "
                f"image_size={tuple(batch.shape[1:3])})."
            )
        results = []
        for image in batch:
            self._interpreter.set_tensor(self._input["index"], self._quantize(image[None]))
            self._interpreter.invoke()
            results.append(self._dequantize(self._interpreter.get_tensor(self._output["index"])))
        return np.concatenate(results, axis=0)

    def __repr__(self):
        return f"TFLiteModel({str(self.path)!r}, input {self.input_dtype.name} {list(self.input_shape)})"


class SavedModelRunner(_ExportedModel):
    """Run an exported SavedModel with the same interface as `TFLiteModel`.

    Uses the "serve_float" signature (float32 images scaled by their dtype's range) written
    by `export_model`; a SavedModel from `model.export()` works too through its float
    "serving_default"/"serve" signature. `metadata` holds `assets.extra/unetpp_tf.json`.

    Args:
        path: str or Path. The SavedModel directory.
        batch_size: int. Images per call. Defaults to 32.

    Example:
        >>> runner = SavedModelRunner("export/saved_model")
        >>> probabilities = runner(images)   # float32 [N, H, W, K]
    """

    def __init__(self, path, batch_size: int = 32):
        self.path = Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise FileNotFoundError(f"{self.path} is not a SavedModel directory (no saved_model.pb).")
        self.batch_size = int(batch_size)
        self._loaded = tf.saved_model.load(str(self.path))
        signatures = self._loaded.signatures
        for key in ("serve_float", "serving_default", "serve"):
            if key in signatures:
                spec = signatures[key].structured_input_signature[1]
                if len(spec) == 1 and next(iter(spec.values())).dtype == tf.float32:
                    self._signature = signatures[key]
                    self._input_name, self._input_spec = next(iter(spec.items()))
                    break
        else:
            raise ValueError(
                f"{self.path} has no signature taking one float32 image tensor (found "
                f"{sorted(signatures)}); export it with unetpp_tf.export.export_model."
            )
        outputs = self._signature.structured_outputs
        self._output_name = "probabilities" if "probabilities" in outputs else sorted(outputs)[0]
        self._output_spec = outputs[self._output_name]
        metadata = self.path / METADATA_PATH
        self.metadata = json.loads(metadata.read_text()) if metadata.is_file() else {}

    @property
    def name(self) -> str:
        """The directory name."""
        return self.path.name

    @property
    def input_shape(self) -> tuple:
        """Keras-style input shape (None, H, W, C); H and W are None when dynamic."""
        return (None, *self._input_spec.shape[1:])

    @property
    def size_divisor(self) -> int | None:
        """What H and W must be divisible by (2**depth for UNet++), None if not recorded."""
        return self.metadata.get("size_divisor")

    @property
    def output_shape(self) -> tuple:
        """Keras-style output shape (None, H, W, K)."""
        return (None, *self._output_spec.shape[1:])

    @property
    def input_dtype(self) -> np.dtype:
        """Always float32 (the "serve_float" signature)."""
        return np.dtype(np.float32)

    def __call__(self, images) -> np.ndarray:
        """Probabilities float32 [N, H, W, K] for float32 images [N, H, W, C]."""
        batch = _as_image_batch(images)
        results = []
        for start in range(0, len(batch), self.batch_size):
            chunk = tf.constant(batch[start : start + self.batch_size])
            results.append(self._signature(**{self._input_name: chunk})[self._output_name].numpy())
        return np.concatenate(results, axis=0)

    def predict(self, x, batch_size: int | None = None, verbose=0, **kwargs) -> np.ndarray:
        """Keras-style alias of `__call__`; also accepts an iterable of batches.

        Args:
            x: array, tensor or iterable. Images [N, H, W, C] (float32, scaled by their
                dtype's range), or a dataset of images or (images, masks) batches.
            batch_size: int or None. Images per call; None keeps the runner's.
                Defaults to None.
            verbose: int. Ignored, for Keras compatibility. Defaults to 0.

        Returns:
            np.ndarray: float32 probabilities [N, H, W, K].

        Example:
            >>> probabilities = SavedModelRunner("export/saved_model").predict(data.test)
        """
        saved, self.batch_size = self.batch_size, int(batch_size or self.batch_size)
        try:
            return self(_predict_input(x))
        finally:
            self.batch_size = saved

    def __repr__(self):
        return f"SavedModelRunner({str(self.path)!r})"


# --------------------------------------------------------------------------- inputs


def _as_names(value, allowed, what, aliases=None):
    names = (value,) if isinstance(value, str) else tuple(value)
    names = tuple((aliases or {}).get(name, name) for name in names)
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or names!r}; choose from {allowed}.")
    return tuple(dict.fromkeys(names))


def _single_output(model: keras.Model, mode: str, level):
    """Return (single-output model taking one tensor, resolved level or None)."""
    if len(model.outputs) == 1 and mode == "accurate" and level is None:
        single = model
    else:
        single = inference_model(model, mode, level)  # clear errors for a plain model
        if mode == "fast" and level is None:
            level = max(supervision_heads(model))
    inputs = getattr(single, "inputs", None)
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1 and len(single.outputs) == 1:
        # A functional model over a list of one input warns when called with a tensor.
        single = keras.Model(inputs[0], single.outputs[0], name=single.name)
    return single, level


def _fixed_size(model: keras.Model, image_size, required: bool):
    """The (H, W) TFLite needs: image_size, else the model's fixed size."""
    _, height, width, channels = model.input_shape
    if channels is None:
        raise ValueError(f"model {model.name!r} has an unknown number of input channels; rebuild it with a fixed C.")
    if image_size is None:
        if height is not None and width is not None:
            return (int(height), int(width))
        recorded = (model_preprocessing(model) or {}).get("image_size")
        if recorded is not None:
            return _fixed_size(model, recorded, required)
        if required:
            raise ValueError(
                f"model {model.name!r} takes images of any size ({height} x {width}); TFLite "
                "needs a fixed size: pass image_size=(height, width), e.g. image_size=(256, 256) "
                "(height and width divisible by 2**depth)."
            )
        return None
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}.")
    for given, fixed, axis in ((size[0], height, "height"), (size[1], width, "width")):
        if fixed is not None and given != fixed:
            raise ValueError(
                f"image_size {size} does not match the model's fixed input {axis} {fixed}; "
                f"pass image_size=None or ({height}, {width}), or rebuild the model with "
                f"input_shape=(None, None, {channels}) to export another size."
            )
    return size


def _collect_images(source, size, channels: int, limit: int, what: str) -> list:
    """Up to `limit` float32 [1, H, W, C] images from arrays, tensors or a dataset."""
    if isinstance(source, tuple) and len(source) == 2 and all(hasattr(s, "shape") for s in source):
        source = [source[0]]  # an (images, masks) pair, Keras-style
    elif isinstance(source, (np.ndarray, tf.Tensor)):
        source = [source]
    images = []
    for element in source:
        array = np.asarray(_first(element))
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"{what} must yield images [B, H, W, C] or [H, W, C], got shape {array.shape}.")
        if np.issubdtype(array.dtype, np.integer):  # as the pipeline scales them: by the dtype's range
            array = array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)
        array = array.astype(np.float32, copy=False)
        if array.shape[-1] != channels:
            raise ValueError(f"{what} images have {array.shape[-1]} channels; the model takes {channels}.")
        if size is not None and tuple(array.shape[1:3]) != tuple(size):
            array = tf.image.resize(array, size, method="bilinear").numpy()
        images.extend(array[i : i + 1] for i in range(len(array)))
        if len(images) >= limit:
            break
    if not images:
        raise ValueError(f"{what} yielded no images.")
    return images[:limit]


def _timed(fn, images):
    """Run fn on each batch-1 image; return (list of outputs, median ms after warm-up)."""
    outputs, times = [], []
    for image in images:
        start = time.perf_counter()
        outputs.append(np.asarray(fn(image), dtype=np.float32))
        times.append((time.perf_counter() - start) * 1000.0)
    latency = statistics.median(times[1:] if len(times) > 1 else times)
    return outputs, latency


def _agreement(reference: list, candidate: list) -> tuple[float, float]:
    """(mean per-image Dice between label maps, max absolute probability difference)."""
    scores, max_diff = [], 0.0
    for ref, out in zip(reference, candidate):
        if out.shape != ref.shape:
            raise ValueError(f"artifact output shape {out.shape} differs from the Keras model's {ref.shape}.")
        classes = ref.shape[-1]
        if classes == 1:
            labels = (ref >= 0.5).astype(np.float32)
        else:
            labels = keras.ops.one_hot(np.argmax(ref, axis=-1), classes)
        counts = confusion_counts(labels, out, num_classes=classes, per_sample=True)
        dice = keras.ops.convert_to_numpy(ratios_from_counts(*counts)["dice"])
        scores.append(float(np.mean(dice)))
        max_diff = max(max_diff, float(np.max(np.abs(out - ref))))
    return float(np.mean(scores)), max_diff


# --------------------------------------------------------------------------- writers


def _saved_model(model: keras.Model, path: Path, mode: str, level) -> None:
    """Write a SavedModel with uint8 "serving_default" and float32 "serve_float" signatures.

    Batch, height and width stay dynamic where the model allows them.
    """
    _, height, width, channels = model.input_shape
    num_classes = model.output_shape[-1]
    label_dtype = tf.uint8 if num_classes <= 256 else tf.int32

    def outputs(images):
        probabilities = tf.cast(model(images, training=False), tf.float32)
        if num_classes == 1:
            labels = tf.cast(probabilities[..., 0] >= 0.5, label_dtype)
        else:
            labels = tf.cast(tf.argmax(probabilities, axis=-1), label_dtype)
        return {"probabilities": probabilities, "labels": labels}

    def serve_uint8(images):
        return outputs(tf.cast(images, tf.float32) / 255.0)

    def serve_float(images):
        return outputs(images)

    shape = [None, height, width, channels]
    # No archive.track(model): add_endpoint already tracks the variables the endpoints
    # use, and tracking the model as well stores every weight twice (Keras 3.15).
    archive = keras.export.ExportArchive()
    for name, fn, dtype in (("serving_default", serve_uint8, tf.uint8), ("serve_float", serve_float, tf.float32)):
        archive.add_endpoint(name, fn, input_signature=[tf.TensorSpec(shape, dtype, name="images")])
    archive.write_out(str(path), verbose=False)
    metadata = {
        **_metadata(model, mode, level),
        "input_shape": [None, height, width, channels],
        "input_signatures": {
            "serving_default": "uint8 [0, 255], 8-bit images (divided by 255)",
            "serve_float": "float32, images scaled by their dtype's range (8-bit / 255, 16-bit / 65535)",
        },
    }
    (path / METADATA_PATH).parent.mkdir(exist_ok=True)
    (path / METADATA_PATH).write_text(json.dumps(metadata, indent=2) + "\n")


def _metadata(model: keras.Model, mode: str, level) -> dict:
    """The settings every artifact carries: classes, divisor, mode, level, preprocessing."""
    return {
        "num_classes": int(model.output_shape[-1]),
        "size_divisor": size_divisor(model),
        "mode": mode,
        "level": level,
        "preprocessing": model_preprocessing(model),
    }


def _with_tflite_metadata(content: bytes, metadata: dict) -> bytes:
    """TFLite bytes with `metadata` added as a JSON flatbuffer metadata entry named "unetpp_tf".

    TensorFlow has no public API for TFLite metadata, so this uses the flatbuffer schema module
    it ships; if a TensorFlow version lacks it, the file is written without the entry and one
    warning says so (its users then pass the training image size to predict themselves).
    """
    try:
        from tensorflow.lite.python import schema_py_generated as schema
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError as error:
        warnings.warn(
            f"TFLite files are written without their preprocessing settings ({error}); "
            "pass --image-size to predict with them.",
            stacklevel=2,
        )
        return content
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _read_tflite_metadata(content: bytes) -> dict:
    """The "unetpp_tf" metadata of TFLite bytes, or {} when the file has none (or it cannot be read here)."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:
        return {}

    model = schema.Model.GetRootAs(content, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


def _tflite_source(model: keras.Model, path: Path, size) -> None:
    """Write the batch-1, fixed-size float SavedModel the TFLite converter starts from."""
    channels = model.input_shape[-1]

    def serve(images):
        return {"probabilities": tf.cast(model(images, training=False), tf.float32)}

    archive = keras.export.ExportArchive()
    spec = tf.TensorSpec([1, *size, channels], tf.float32, name="images")
    archive.add_endpoint("serving_default", serve, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def _unsupported_ops(error) -> tuple[list, list]:
    """(flex ops, custom ops) named by a TFLite ConverterError."""
    flex, custom = [], []
    for data in getattr(error, "errors", None) or []:
        try:
            code = type(data).ErrorCode.Name(data.error_code)
        except (AttributeError, ValueError):
            code = {1: "ERROR_NEEDS_FLEX_OPS", 2: "ERROR_NEEDS_CUSTOM_OPS"}.get(getattr(data, "error_code", 0), "")
        name = data.operator.name.removeprefix("tf.")
        if code == "ERROR_NEEDS_FLEX_OPS" and name and name not in flex:
            flex.append(name)
        elif code == "ERROR_NEEDS_CUSTOM_OPS" and name and name not in custom:
            custom.append(name)
    text = str(error)
    for pattern, found in ((r"TF Select ops: ([^\n]+)", flex), (r"Custom ops: ([^\n]+)", custom)):
        for match in re.finditer(pattern, text):
            for name in match.group(1).split(","):
                name = name.strip()
                if name and name not in found:
                    found.append(name)
    return flex, custom


def _convert(source: Path, quantize: str, representative, allow_flex: bool) -> bytes:
    """Convert the fixed-size SavedModel at `source` to TFLite bytes."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(source), signature_keys=["serving_default"])
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if quantize == "int8" else tf.lite.OpsSet.TFLITE_BUILTINS
    converter.target_spec.supported_ops = [builtins] + ([tf.lite.OpsSet.SELECT_TF_OPS] if allow_flex else [])
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = representative
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    try:
        with native_stderr_silenced():
            return converter.convert()
    except Exception as error:  # tf.lite ConverterError and friends
        flex, custom = _unsupported_ops(error)
        if flex:
            raise ValueError(
                f"TFLite conversion ({quantize}) needs TensorFlow (Flex/SELECT_TF_OPS) op(s) "
                f"{', '.join(flex)}, which the builtin TFLite runtime lacks. Replace the layer "
                "that uses them with builtin-friendly ops, or pass allow_flex=True (the app "
                "must then link the Flex delegate, e.g. tensorflow-lite-select-tf-ops)."
            ) from None
        if custom:
            raise ValueError(
                f"TFLite conversion ({quantize}) failed: op(s) {', '.join(custom)} exist neither "
                "as TFLite builtins nor as Flex ops; replace the layer that uses them."
            ) from None
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        hint = " Try quantize='dynamic' or 'float16' instead." if quantize == "int8" else ""
        raise ValueError(f"TFLite conversion ({quantize}) failed: {first}.{hint}") from error


def _representative(images: list):
    """A representative dataset over `images` whose input range is pinned to [0, 1].

    One calibration image gets a 0.0 and a 1.0 pixel so the input quantizes with
    scale 1/255 and zero point 0: the int8 model then takes raw uint8 pixels.
    """

    def generate():
        for index, image in enumerate(images):
            image = np.array(image, np.float32)
            if index == 0:
                image[0, 0, 0, :] = 0.0
                image[0, 0, -1, :] = 1.0
            yield [image]

    return generate


# --------------------------------------------------------------------------- files


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_output_dir(output_dir) -> tuple[Path, Path]:
    """Return (output_dir, nearest existing directory), or raise a clear error."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} exists and is not a directory; pass a directory path.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create output_dir {path}: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to output_dir {path}: {existing} is not writable.")
    return path, existing


def _staging_dir(output_dir: Path, existing: Path) -> Path:
    """A temporary directory on output_dir's filesystem (inside it when it exists)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.export-", dir=existing))
    except OSError as error:
        raise PermissionError(f"cannot write to output_dir {output_dir}: {error.strerror} ({existing}).") from error


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _commit(staging: Path, output_dir: Path, names: list) -> None:
    """Move staging/<name> to output_dir/<name> for every name; all or nothing."""
    created = []
    parent = output_dir
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    previous = staging / ".previous"
    moved, replaced = [], []
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        previous.mkdir()
        for name in names:
            target = output_dir / name
            if target.exists() or target.is_symlink():
                os.replace(target, previous / name)
                replaced.append(name)
            os.replace(staging / name, target)
            moved.append(name)
    except OSError as error:
        for name in moved:
            _remove(output_dir / name)
        for name in replaced:
            os.replace(previous / name, output_dir / name)
        for directory in created:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                pass
        kind = PermissionError if isinstance(error, PermissionError) else OSError
        raise kind(f"cannot write the export into {output_dir}: {error}") from error


# --------------------------------------------------------------------------- export


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
    """Export a model to SavedModel / TFLite / `.keras` and prove each artifact agrees.

    The model becomes single-output first ("accurate": mean of the deep-supervision
    heads; "fast": the pruned head `level`). Every artifact and the Keras model then run
    on the same `samples`; an artifact whose mean Dice agreement with the Keras label
    maps is below its threshold fails the export. Files are built in a temporary
    directory and moved into `output_dir` only when everything passed: on any error
    nothing new is left behind and existing files are untouched.

    Args:
        model: keras.Model. A UNet++ (deep supervision or not) or any single-output
            segmentation model with sigmoid (K=1) or softmax (K>1) outputs.
        output_dir: str or Path. Where the artifacts go; created if missing.
        formats: str or tuple. Any of "saved_model", "tflite", "keras".
            Defaults to ("saved_model", "tflite").
        quantize: str or tuple. TFLite variants: "none" (float32), "float16",
            "dynamic" (int8 weights) and "int8" (full integer, uint8 in/out; needs
            `calibration`). Defaults to ("none",).
        image_size: tuple or None. (height, width) of the TFLite input; the SavedModel
            stays dynamic when the model is. Defaults to the model's fixed input size, else
            the training image size its `InputPreprocessing` records.
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
            "none", "float16", "dynamic", "int8". Defaults to `DEFAULT_THRESHOLDS`
            (0.99, and 0.97 for "dynamic"/"int8").
        max_samples: int. Images used for parity. Defaults to 16.
        calibration_steps: int. Images used for int8 calibration. Defaults to 100.
        num_threads: int or None. TFLite interpreter threads for the parity run.
            Defaults to None (LiteRT chooses).

    Returns:
        dict: the report also written to `output_dir/export_report.json`:
        {"artifacts": [{"name", "path", "format", "quantize", "size_bytes",
        "dice_agreement", "max_abs_diff", "latency_ms", "threshold"}, ...],
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
    bars = dict(DEFAULT_THRESHOLDS)
    for key, value in (thresholds or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown thresholds key {key!r}; use any of {sorted(DEFAULT_THRESHOLDS)}.")
        bars[key] = float(value)
    if mode not in ("accurate", "fast"):
        raise ValueError(f"mode must be 'accurate' or 'fast', got {mode!r}.")

    single, level = _single_output(model, mode, level)
    channels = single.input_shape[-1]
    size = _fixed_size(single, image_size, required="tflite" in formats)
    wants_int8 = "tflite" in formats and "int8" in quantize
    if wants_int8 and calibration is None:
        raise ValueError(
            "quantize='int8' needs calibration images: pass calibration=data.val (an iterable "
            "of float32 [B, H, W, C] images or (images, masks) batches), or drop "
            "'int8' and use 'dynamic'."
        )
    if samples is None:
        samples = calibration
    if samples is None and set(formats) != {"keras"}:
        raise ValueError(
            "export_model checks every artifact against the Keras model: pass samples= (or "
            "calibration=), e.g. samples=data.test, an iterable of images or (images, masks) batches."
        )
    output_dir, existing = _check_output_dir(output_dir)

    parity = _collect_images(samples, size, channels, max_samples, "samples") if samples is not None else []
    representative = (
        _representative(_collect_images(calibration, size, channels, calibration_steps, "calibration"))
        if wants_int8 else None
    )
    try:
        reference, keras_ms = _timed(lambda x: single(x, training=False), parity) if parity else ([], None)
    except Exception as error:
        height, width = parity[0].shape[1:3]
        raise ValueError(
            f"model {single.name!r} cannot run on {height}x{width} images "
            f"({type(error).__name__}); UNet++ needs height and width divisible by 2**depth: "
            "pick another image_size or resize the samples."
        ) from error

    stem = "model" if level is None else f"model_L{level}"
    suffix = "" if level is None else f"_L{level}"
    staging = _staging_dir(output_dir, existing)
    try:
        artifacts, names = [], []

        def record(name, file_name, fmt, quant, runner):
            path = staging / file_name
            entry = {
                "name": name,
                "path": str(output_dir / file_name),
                "format": fmt,
                "quantize": quant,
                "size_bytes": _size_bytes(path),
                "dice_agreement": None,
                "max_abs_diff": None,
                "latency_ms": None,
                "threshold": bars["keras" if fmt == "keras" else "saved_model" if fmt == "saved_model" else quant],
            }
            run = runner(path) if parity else None
            if run is not None:
                outputs, latency = _timed(run, parity)
                agreement, diff = _agreement(reference, outputs)
                entry.update(
                    dice_agreement=round(agreement, 6), max_abs_diff=float(f"{diff:.3g}"), latency_ms=round(latency, 3)
                )
            artifacts.append(entry)
            names.append(file_name)

        if "keras" in formats:
            file_name = f"{stem}_inference.keras"
            single.save(staging / file_name)

            def keras_runner(path):
                loaded = keras.saving.load_model(path, compile=False)
                return lambda x: loaded(x, training=False)

            record(f"{stem}_inference", file_name, "keras", "none", keras_runner)
        if "saved_model" in formats:
            file_name = f"saved_model{suffix}"
            _saved_model(single, staging / file_name, mode, level)
            record(file_name, file_name, "saved_model", "none", lambda path: SavedModelRunner(path))
        if "tflite" in formats:
            source = staging / ".tflite_source"
            _tflite_source(single, source, size)
            metadata = _metadata(single, mode, level)
            for quant in quantize:
                name = f"{stem}_{_FILE_DTYPE[quant]}"
                content = _with_tflite_metadata(_convert(source, quant, representative, allow_flex), metadata)
                (staging / f"{name}.tflite").write_bytes(content)
                record(name, f"{name}.tflite", "tflite", quant, _tflite_runner(allow_flex, num_threads))
            shutil.rmtree(source)

        report = {
            "artifacts": artifacts,
            "image_size": list(size) if size is not None else None,
            "mode": mode,
            "level": level,
            "num_classes": int(single.output_shape[-1]),
            "parity_images": len(parity),
            "keras_latency_ms": round(keras_ms, 3) if keras_ms is not None else None,
        }
        failed = [
            a for a in artifacts
            if a["dice_agreement"] is not None and a["dice_agreement"] < a["threshold"]
        ]
        if failed:
            summary = "; ".join(
                f"{a['name']}: Dice agreement {a['dice_agreement']:.4f} < {a['threshold']}" for a in failed
            )
            suggested = {}
            for a in failed:
                key = a["quantize"] if a["format"] == "tflite" else a["format"]
                value = math.floor(a["dice_agreement"] * 100) / 100
                suggested[key] = min(value, suggested.get(key, value))
            keys = sorted(suggested)
            hint = ""
            if {"int8", "dynamic"} & set(keys):
                hint = ("Quantization lost too much: give int8 more representative calibration "
                        "images (calibration=data.val) or use quantize='float16'. ")
            raise ValueError(
                f"export failed its parity check ({summary}); nothing was written to {output_dir}.\n\n"
                + format_report(report) + "\n"
                f"{hint}To accept the difference pass thresholds="
                + "{" + ", ".join(f"{k!r}: {suggested[k]:.2f}" for k in keys) + "}."
            )
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        names.append(REPORT_NAME)
        _commit(staging, output_dir, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


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


def format_report(report: dict) -> str:
    """Render an export report as a fixed-width text table.

    Args:
        report: dict. What `export_model` returns (or `export_report.json` holds).

    Returns:
        str: a header line and one row per artifact.

    Example:
        >>> print(format_report(export_model(model, "export", samples=data.test)))
    """
    size = report.get("image_size")
    header = (
        f"mode {report.get('mode')}"
        + (f", level {report['level']}" if report.get("level") is not None else "")
        + (f", image size {size[0]}x{size[1]}" if size else ", dynamic image size")
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
    return "\n".join(lines)


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.1f} MiB"
