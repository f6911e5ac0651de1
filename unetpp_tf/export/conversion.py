"""Writing the exported files: SavedModel signatures, TFLite conversion, embedded settings.

Every serving function pads its images to a multiple of the model's downsampling (2**depth
for a UNet++) with centred reflection, runs the model and crops the probabilities back, as
`unetpp_tf.predict` does, so an exported model takes any image size its signature allows.

Example:
    >>> write_saved_model(model, staging / "saved_model", embedded_metadata(model, "accurate", None))
    >>> write_tflite_source(model, staging / ".tflite_source", (256, 256))
    >>> content = with_tflite_metadata(convert_to_tflite(staging / ".tflite_source", "none", None, False), {})
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unetpp_tf import files
from unetpp_tf._native_logs import native_stderr_silenced
from unetpp_tf.export.rewrites import tflite_friendly
from unetpp_tf.models.analysis import size_divisor
from unetpp_tf.models.preprocessing import model_preprocessing
from unetpp_tf.runners import METADATA_NAME, METADATA_PATH


def padded_forward(model: keras.Model):
    """A function images -> float32 probabilities that pads to the model's divisor and crops back.

    Padding is centred reflection (as `unetpp_tf.predict` pads) on every spatial axis, so it
    serves image models [N, H, W, C] and volume models [N, D, H, W, C] alike; sizes already
    divisible, and models without downsampling, run as they are. Works eagerly and inside
    `tf.function`, with static or dynamic spatial sizes.

    Example:
        >>> padded_forward(build_unetpp((None, None, 1), depth=2))(np.zeros((1, 30, 35, 1), np.float32)).shape
        TensorShape([1, 30, 35, 1])
    """
    divisor = size_divisor(model)

    def forward(images):
        images = tf.convert_to_tensor(images, tf.float32)
        static = images.shape[1:-1]
        if divisor == 1 or all(n is not None and n % divisor == 0 for n in static):
            return tf.cast(model(images, training=False), tf.float32)
        dynamic = tf.shape(images)
        sizes = [s if s is not None else dynamic[i + 1] for i, s in enumerate(static)]
        # (divisor - size % divisor) % divisor, not (-size) % divisor: the same for sizes >= 0, and
        # tf2onnx 1.17 converts FloorMod of a negative dynamic size as if it were C's fmod
        pads = [(divisor - size % divisor) % divisor for size in sizes]
        starts = [pad // 2 for pad in pads]
        padding = [[0, 0]] + [[start, pad - start] for start, pad in zip(starts, pads)] + [[0, 0]]
        probabilities = tf.cast(model(tf.pad(images, padding, mode="REFLECT"), training=False), tf.float32)
        crop = (slice(None), *(slice(start, start + size) for start, size in zip(starts, sizes)), slice(None))
        return probabilities[crop]

    return forward


def embedded_metadata(model: keras.Model, mode: str, level) -> dict:
    """The settings every exported file carries: classes, divisor, mode, level, preprocessing.

    Example:
        >>> embedded_metadata(model, "fast", 2)["level"]
        2
    """
    return {
        "num_classes": int(model.output_shape[-1]),
        "size_divisor": size_divisor(model),
        "mode": mode,
        "level": level,
        "preprocessing": model_preprocessing(model),
    }


def write_saved_model(model: keras.Model, path: Path, metadata: dict) -> None:
    """Write a SavedModel with uint8 "serving_default" and float32 "serve_float" signatures.

    Batch and spatial sizes (height and width, and depth for a volume model) stay dynamic
    where the model allows them; inputs of any size are padded to the model's divisor inside
    the graph and the outputs cropped back. Both signatures return "probabilities" and the
    "labels" map. `metadata` (plus the input description) goes to `assets.extra/unetpp_tf.json`.

    Example:
        >>> write_saved_model(model, Path("staging/saved_model"), embedded_metadata(model, "accurate", None))
    """
    _, *spatial, channels = model.input_shape
    num_classes = model.output_shape[-1]
    label_dtype = tf.uint8 if num_classes <= 256 else tf.int32
    forward = padded_forward(model)

    def outputs(images):
        probabilities = forward(images)
        if num_classes == 1:
            labels = tf.cast(probabilities[..., 0] >= 0.5, label_dtype)
        else:
            labels = tf.cast(tf.argmax(probabilities, axis=-1), label_dtype)
        return {"probabilities": probabilities, "labels": labels}

    def serve_uint8(images):
        return outputs(tf.cast(images, tf.float32) / 255.0)

    def serve_float(images):
        return outputs(images)

    shape = [None, *spatial, channels]
    # No archive.track(model): add_endpoint already tracks the variables the endpoints
    # use, and tracking the model as well stores every weight twice (Keras 3.15).
    archive = keras.export.ExportArchive()
    for name, fn, dtype in (("serving_default", serve_uint8, tf.uint8), ("serve_float", serve_float, tf.float32)):
        archive.add_endpoint(name, fn, input_signature=[tf.TensorSpec(shape, dtype, name="images")])
    archive.write_out(str(path), verbose=False)
    (path / METADATA_PATH).parent.mkdir(exist_ok=True)
    files.write_json(path / METADATA_PATH, {
        **metadata,
        "input_shape": shape,
        "pads_to_divisor": True,
        "input_signatures": {
            "serving_default": "uint8 [0, 255], 8-bit images (divided by 255)",
            "serve_float": "float32, images scaled by their dtype's range (8-bit / 255, 16-bit / 65535)",
        },
    })


def write_tflite_source(model: keras.Model, path: Path, size) -> None:
    """Write the batch-1, fixed-size float SavedModel the TFLite converter starts from.

    `size` is (height, width), or (depth, height, width) for a volume model. A size not
    divisible by the model's downsampling is padded inside the graph (static reflection
    padding) and the output cropped back to `size`. The model is converted as
    `rewrites.tflite_friendly` rewrites it (LayerNormalization in operations int8 keeps in
    integers, 3D max pooling in 2D max pooling, which TFLite has as a builtin).

    Example:
        >>> write_tflite_source(model, Path("staging/.tflite_source"), (256, 256))
    """
    channels = model.input_shape[-1]
    forward = padded_forward(tflite_friendly(model))

    def serve(images):
        return {"probabilities": forward(images)}

    archive = keras.export.ExportArchive()
    spec = tf.TensorSpec([1, *size, channels], tf.float32, name="images")
    archive.add_endpoint("serving_default", serve, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def with_tflite_metadata(content: bytes, metadata: dict) -> bytes:
    """TFLite bytes with `metadata` added as a JSON flatbuffer metadata entry named "unetpp_tf".

    TensorFlow has no public API for TFLite metadata, so this uses the flatbuffer schema module
    it ships; if a TensorFlow version lacks it, the file is written without the entry and one
    warning says so (its users then pass the training image size to predict themselves).

    Example:
        >>> content = with_tflite_metadata(content, {"num_classes": 1})
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


def convert_to_tflite(source: Path, quantize: str, representative, allow_flex: bool) -> bytes:
    """Convert the fixed-size SavedModel at `source` to TFLite bytes.

    Args:
        source: Path. What `write_tflite_source` wrote.
        quantize: str. "none", "float16", "dynamic" or "int8" (uint8 in and out).
        representative: callable or None. The int8 calibration data (`representative_dataset`).
        allow_flex: bool. Allow TensorFlow (Flex) ops.

    Returns:
        bytes: the `.tflite` file's content.

    Example:
        >>> content = convert_to_tflite(Path("staging/.tflite_source"), "float16", None, False)
    """
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


def representative_dataset(images: list):
    """A representative dataset over `images` whose input range is pinned to [0, 1].

    One calibration image gets a 0.0 and a 1.0 pixel (voxel) so the input quantizes with
    scale 1/255 and zero point 0: the int8 model then takes raw uint8 pixels.

    Example:
        >>> converter.representative_dataset = representative_dataset(calibration_images)
    """

    def generate():
        for index, image in enumerate(images):
            image = np.array(image, np.float32)
            if index == 0:  # the first and the last pixel of the first row (of the first slice)
                corner = (0,) * (image.ndim - 2)
                image[(*corner, 0, slice(None))] = 0.0
                image[(*corner, -1, slice(None))] = 1.0
            yield [image]

    return generate
