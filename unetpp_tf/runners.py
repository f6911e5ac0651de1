"""Run exported models (`.tflite` and `.onnx` files, SavedModel folders) like Keras models.

`TFLiteModel`, `SavedModelRunner` and `OnnxModel` take float32 images [N, H, W, C] scaled by
their dtype's range (8-bit / 255, 16-bit / 65535), as the data pipeline gives them, and return
float32 probabilities [N, H, W, K]. They offer the Keras surface that `unetpp_tf.predict`,
`evaluate` and the CLI use (`predict`, `predict_on_batch`, `inputs`, `outputs`, `input_shape`),
and expose the settings `unetpp_tf.export.export_model` embedded in the file as `metadata` and
`preprocessing`. This module only reads files; writing them is `unetpp_tf.export`'s job.
`OnnxModel` needs onnxruntime (the extra `unetpp-tf[onnx]`), imported when one is made.

Example:
    >>> lite = TFLiteModel("export/model_int8.tflite")
    >>> probabilities = lite.predict(images)                       # float32 [N, H, W, K]
    >>> probabilities = SavedModelRunner("export/saved_model")(images)
    >>> probabilities = OnnxModel("export/model.onnx")(images)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from unetpp_tf._native_logs import native_stderr_silenced

METADATA_PATH = "assets.extra/unetpp_tf.json"  # inside a SavedModel; TF ignores assets.extra
METADATA_NAME = "unetpp_tf"  # the flatbuffer metadata entry of a TFLite file, the metadata_props key of an ONNX file
ONNX_INSTALL = 'pip install "unetpp-tf[onnx]"'  # what a missing onnxruntime / tf2onnx error says to run


# --------------------------------------------------------------------------- inputs


def image_batch(images, spatial_dims: int = 2) -> np.ndarray:
    """Return float32 [N, H, W, C] from an array-like of one image [H, W, C] or a batch.

    With `spatial_dims=3` the same for volumes: [N, D, H, W, C] from [D, H, W, C] or a batch.

    Example:
        >>> image_batch(np.zeros((32, 32, 1), np.float32)).shape
        (1, 32, 32, 1)
    """
    array = np.asarray(images)
    if array.ndim == spatial_dims + 1:
        array = array[None]
    if array.ndim != spatial_dims + 2:
        layout = "[N, H, W, C] or [H, W, C]" if spatial_dims == 2 else "[N, D, H, W, C] or [D, H, W, C]"
        raise ValueError(f"images must be {layout}, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"images must be float32, got dtype {array.dtype}; scale them by their dtype's range "
            "first (8-bit / 255, 16-bit / 65535)."
        )
    return array.astype(np.float32, copy=False)


def images_of(element):
    """The images of a dataset element: `x` of `(x, y)`, `x["images"]`, or `x` itself.

    Example:
        >>> images_of((images, masks)) is images
        True
    """
    if isinstance(element, tuple):
        return element[0]
    if isinstance(element, dict):
        for key in ("images", "image"):
            if key in element:
                return element[key]
        raise ValueError(f"cannot find images in a dict with keys {sorted(element)}; use key 'images'.")
    return element


def _predict_input(x, spatial_dims: int = 2) -> np.ndarray:
    """Gather the images (volumes: `spatial_dims=3`) of an array, a tensor or an iterable of batches for `.predict`."""
    if isinstance(x, (np.ndarray, tf.Tensor)) or hasattr(x, "__array__"):
        return image_batch(x, spatial_dims)
    batches = [image_batch(images_of(element), spatial_dims) for element in x]
    if not batches:
        raise ValueError("predict received no images.")
    return np.concatenate(batches, axis=0)


# --------------------------------------------------------------------------- metadata


def tflite_schema():
    """The TFLite flatbuffer schema module TensorFlow ships, or None where this TensorFlow lacks it.

    TensorFlow has no public API for a TFLite file's contents; readers of its metadata and
    operators go through this one guarded import and degrade when it returns None.

    Example:
        >>> schema = tflite_schema()
        >>> schema.Model.GetRootAs(content, 0).OperatorCodesLength() if schema else None
    """
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:
        return None
    return schema


def read_tflite_metadata(content: bytes) -> dict:
    """The "unetpp_tf" metadata of TFLite bytes, or {} when the file has none (or it cannot be read here).

    Example:
        >>> read_tflite_metadata(Path("export/model_float32.tflite").read_bytes())["num_classes"]
        1
    """
    schema = tflite_schema()
    if schema is None:
        return {}
    model = schema.Model.GetRootAs(content, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


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


# --------------------------------------------------------------------------- runners


class _ExportedModel:
    """What TFLiteModel, SavedModelRunner and OnnxModel share: the Keras-like surface that lets
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
    def size_divisor(self) -> int | None:
        """What free spatial sizes must be divisible by: 1 when the file pads inside its graph
        (`export_model`'s SavedModel and ONNX files), else the recorded 2**depth, None if not
        recorded. A TFLite file has a fixed size and returns 1."""
        if self.metadata.get("pads_to_divisor"):
            return 1
        return self.metadata.get("size_divisor")

    @property
    def preprocessing(self) -> dict | None:
        """The exported model's `InputPreprocessing` settings (see `model_preprocessing`), or None."""
        return self.metadata.get("preprocessing")

    def predict(self, x, batch_size: int | None = None, verbose=0, **kwargs) -> np.ndarray:
        """Keras-style alias of `__call__`; also accepts an iterable of batches.

        Args:
            x: array, tensor or iterable. Images [N, H, W, C] (float32, scaled by their
                dtype's range), or a dataset of images or (images, masks) batches.
            batch_size: int or None. Images per call of a runner that batches
                (SavedModelRunner, OnnxModel); None keeps the runner's. A TFLite file runs
                one image at a time and ignores it. Defaults to None.
            verbose: int. Ignored, for Keras compatibility. Defaults to 0.

        Returns:
            np.ndarray: float32 probabilities [N, H, W, K].

        Example:
            >>> probabilities = TFLiteModel("export/model_float32.tflite").predict(data.test)
        """
        images = _predict_input(x, len(self.input_shape) - 2)
        if batch_size is None or not hasattr(self, "batch_size"):
            return self(images)
        saved, self.batch_size = self.batch_size, int(batch_size)
        try:
            return self(images)
        finally:
            self.batch_size = saved

    def predict_on_batch(self, x) -> np.ndarray:
        """Keras-style alias of `__call__` for one batch of images."""
        return self(x)


class TFLiteModel(_ExportedModel):
    """Run a `.tflite` segmentation model like a Keras model (LiteRT interpreter).

    Images go in as float32 [N, H, W, C], scaled by their dtype's range (8-bit / 255,
    16-bit / 65535), whatever the file's input type: int8/uint8 inputs are quantized with
    the file's scale and zero point (1/255 for `export_model`'s int8 files, so those are
    for 8-bit images) and quantized outputs are dequantized, so `__call__` always returns
    float32 probabilities [N, H, W, K]. The file holds a batch-1 graph of a fixed image size;
    batches run one image at a time, and images of another size are refused with a message
    that says what to do (`unetpp_tf.predict` tiles them instead). `metadata` holds the
    settings `export_model` embedded ({} otherwise).

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
        if len(shape) not in (4, 5):
            raise ValueError(f"{self.path} takes inputs of shape {shape}; expected [1, H, W, C] or [1, D, H, W, C].")
        self._image_shape = shape[1:]
        self.metadata = read_tflite_metadata(self.path.read_bytes())

    def _probabilities_output(self):
        outputs = self._interpreter.get_output_details()
        if len(outputs) == 1:
            return outputs[0]
        for signature in self._interpreter.get_signature_list():
            details = self._interpreter.get_signature_runner(signature).get_output_details()
            if "probabilities" in details:
                index = details["probabilities"]["index"]
                return next(o for o in outputs if o["index"] == index)
        return next(o for o in outputs if len(o["shape"]) in (4, 5))

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
        batch = image_batch(images, len(self._image_shape) - 1)
        if batch.shape[1:] != self._image_shape and len(self._image_shape) == 4:
            wanted, got = "x".join(map(str, self._image_shape[:-1])), "x".join(map(str, batch.shape[1:-1]))
            raise ValueError(
                f"{self.path} takes {wanted} volumes with {self._image_shape[-1]} channel(s) (a fixed size), got "
                f"{got} with {batch.shape[-1]}; run them through sliding-window inference in {wanted} windows, "
                "or export the model at another size."
            )
        if batch.shape[1:] != self._image_shape:
            h, w, c = self._image_shape
            got_h, got_w, got_c = batch.shape[1:]
            if got_c != c:
                raise ValueError(f"{self.path} takes {c}-channel images, got {got_c} channel(s).")
            raise ValueError(
                f"{self.path} takes {h}x{w} images (a fixed size), got {got_h}x{got_w}. Resize the "
                f"images to {h}x{w} (predict_files(..., image_size=({h}, {w}))), run them through "
                f"unetpp_tf.predict, which tiles them in {h}x{w} windows, or export the model at "
                f"that size (unetpp-tf export --image-size {got_h} {got_w})."
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
    Signatures written by `export_model` pad images to a multiple of the model's
    downsampling inside the graph and crop the result back, so any image size runs.

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
    def output_shape(self) -> tuple:
        """Keras-style output shape (None, H, W, K)."""
        return (None, *self._output_spec.shape[1:])

    @property
    def input_dtype(self) -> np.dtype:
        """Always float32 (the "serve_float" signature)."""
        return np.dtype(np.float32)

    def __call__(self, images) -> np.ndarray:
        """Probabilities float32 [N, H, W, K] for float32 images [N, H, W, C]."""
        expected = self._input_spec.shape
        batch = image_batch(images, len(expected) - 2)
        names = ("height", "width", "channels") if len(expected) == 4 else ("depth", "height", "width", "channels")
        for axis, name in enumerate(names, start=1):
            if expected[axis] is not None and batch.shape[axis] != expected[axis]:
                raise ValueError(
                    f"{self.path} takes images of {name} {expected[axis]}, got {list(batch.shape)}; "
                    "resize them, or run them through unetpp_tf.predict, which tiles them."
                )
        results = []
        for start in range(0, len(batch), self.batch_size):
            chunk = tf.constant(batch[start : start + self.batch_size])
            try:
                results.append(self._signature(**{self._input_name: chunk})[self._output_name].numpy())
            except tf.errors.InvalidArgumentError as error:
                divisor = self.metadata.get("size_divisor")
                needs = f"height and width divisible by {divisor}" if divisor else "another image size"
                raise ValueError(
                    f"{self.path} cannot run on {batch.shape[1]}x{batch.shape[2]} images: it needs {needs} "
                    "(a SavedModel exported by an older unetpp_tf does not pad inside its signature). "
                    "Run the images through unetpp_tf.predict, which pads them, or export the model again."
                ) from error
        return np.concatenate(results, axis=0)

    def __repr__(self):
        return f"SavedModelRunner({str(self.path)!r})"


class OnnxModel(_ExportedModel):
    """Run an `.onnx` segmentation model with onnxruntime, with the same interface as `TFLiteModel`.

    Images go in as float32 [N, H, W, C] (volumes [N, D, H, W, C]), channels last and scaled by
    their dtype's range (8-bit / 255, 16-bit / 65535), and float32 probabilities [N, H, W, K]
    come out. Files written by `export_model` take a dynamic batch and any size on the axes the
    Keras model leaves free (padded to its downsampling inside the graph and cropped back);
    an axis fixed in the file must match, or the images are refused with a message that says
    what to do. `metadata` holds the settings `export_model` embedded in the file's
    `metadata_props` ({} for other ONNX files). Needs onnxruntime (`pip install "unetpp-tf[onnx]"`).

    Args:
        path: str or Path. The `.onnx` file.
        num_threads: int or None. onnxruntime intra-op threads; None lets it choose.
            Defaults to None.
        batch_size: int. Images per run (a file with a fixed batch runs that many).
            Defaults to 32.
        providers: list or None. onnxruntime execution providers, e.g.
            ["CUDAExecutionProvider", "CPUExecutionProvider"]. Defaults to None (CPU).

    Example:
        >>> onnx_model = OnnxModel("export/model.onnx")
        >>> probabilities = onnx_model(images)          # float32 [N, H, W, K]
        >>> probabilities = onnx_model.predict(data.test)
    """

    def __init__(self, path, num_threads: int | None = None, batch_size: int = 32, providers=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}.")
        try:
            import onnxruntime
        except ImportError:
            raise ImportError(f"running {self.path.name} needs onnxruntime: {ONNX_INSTALL}") from None
        self.batch_size = int(batch_size)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: no per-node placement notices
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self._session = onnxruntime.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as error:  # noqa: BLE001  (onnxruntime raises its own types for an unreadable file)
            raise ValueError(
                f"{self.path} is not a readable ONNX model ({_first_line(error)}); export it again with "
                "unetpp_tf.export.export_model(..., formats=('onnx',)) or copy it again."
            ) from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path} has {len(inputs)} inputs; expected one image input.")
        self._input = inputs[0]
        if self._input.type != "tensor(float)":
            raise ValueError(
                f"{self.path} takes {self._input.type} images; OnnxModel runs float32 (tensor(float)) inputs."
            )
        shape = tuple(_onnx_dim(d) for d in self._input.shape)
        if len(shape) not in (4, 5):
            raise ValueError(f"{self.path} takes inputs of shape {list(self._input.shape)}; expected "
                             "[N, H, W, C] or [N, D, H, W, C].")
        self._shape = shape
        self._output = self._probabilities_output(len(shape))
        stored = self._session.get_modelmeta().custom_metadata_map.get(METADATA_NAME)
        try:
            self.metadata = json.loads(stored) if stored else {}
        except ValueError:
            raise ValueError(
                f"{self.path} has unreadable {METADATA_NAME!r} metadata (not JSON); export it again."
            ) from None

    def _probabilities_output(self, rank: int):
        outputs = self._session.get_outputs()
        named = [o for o in outputs if o.name == "probabilities"]
        ranked = [o for o in outputs if len(o.shape) == rank]
        if named or ranked:
            return (named or ranked)[0]
        raise ValueError(f"{self.path} has no output of rank {rank} (found {[o.name for o in outputs]}); "
                         "expected probabilities [N, H, W, K].")

    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return self.path.stem

    @property
    def input_shape(self) -> tuple:
        """Keras-style input shape (None, H, W, C); H and W are None when dynamic."""
        return (None, *self._shape[1:])

    @property
    def output_shape(self) -> tuple:
        """Keras-style output shape (None, H, W, K)."""
        return (None, *(_onnx_dim(d) for d in self._output.shape[1:]))

    @property
    def input_dtype(self) -> np.dtype:
        """Always float32."""
        return np.dtype(np.float32)

    @property
    def providers(self) -> list:
        """The onnxruntime execution providers the session runs on."""
        return self._session.get_providers()

    def __call__(self, images) -> np.ndarray:
        """Probabilities float32 [N, H, W, K] for float32 images [N, H, W, C]."""
        batch = image_batch(images, len(self._shape) - 2)
        names = ("height", "width", "channels") if len(self._shape) == 4 else ("depth", "height", "width", "channels")
        for axis, name in enumerate(names, start=1):
            if self._shape[axis] is not None and batch.shape[axis] != self._shape[axis] and name == "channels":
                raise ValueError(f"{self.path} takes {self._shape[axis]}-channel inputs, got {batch.shape[axis]} "
                                 f"channel(s) (shape {list(batch.shape)}).")
            if self._shape[axis] is not None and batch.shape[axis] != self._shape[axis]:
                fixed = "x".join("?" if n is None else str(n) for n in self._shape[1:-1])
                raise ValueError(
                    f"{self.path} takes inputs of {name} {self._shape[axis]} ({fixed}, {self._shape[-1]} "
                    f"channel(s)), got {list(batch.shape)}; resize them, run them through unetpp_tf.predict "
                    "(or sliding-window inference for volumes), which tiles them, or export a model with "
                    "free spatial axes."
                )
        step = self._shape[0] or self.batch_size
        results = []
        for start in range(0, len(batch), step):
            chunk = np.ascontiguousarray(batch[start : start + step])
            try:
                results.append(self._session.run([self._output.name], {self._input.name: chunk})[0])
            except Exception as error:  # noqa: BLE001  (onnxruntime's own error types)
                divisor = self.metadata.get("size_divisor")
                needs = f"sizes divisible by {divisor}" if divisor and not self.metadata.get("pads_to_divisor") else (
                    "another input size")
                raise ValueError(
                    f"{self.path} cannot run on inputs of shape {list(chunk.shape)} ({_first_line(error)}); it needs "
                    f"{needs}. Run the images through unetpp_tf.predict, which pads them, or export the model again."
                ) from None
        return np.asarray(np.concatenate(results, axis=0), np.float32)

    def __repr__(self):
        return f"OnnxModel({str(self.path)!r}, input float32 {list(self.input_shape)})"


def _onnx_dim(dim):
    """An onnxruntime dimension: an int when fixed, None when named ("batch", "unk__3") or unknown."""
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
