"""Export a trained UNet++ to `.keras`, SavedModel, TFLite and ONNX, with measured parity.

`export_model` is the one entry point (the CLI and the training run call it). It turns a
deep-supervision model into one output ("accurate" = mean of the heads, "fast" = the
pruned head L_level), writes every requested artifact into a hidden staging folder, runs
the Keras model and every artifact on the same images, and only when every artifact
agrees with Keras does it swap the staging folder in as `output_dir`, with
`export_report.json`. Any failure, or a kill, leaves `output_dir` as it was.

The package holds one concern per module: `exporter` (`export_model`), `conversion`
(SavedModel signatures, TFLite conversion, embedded settings), `onnx_format` (ONNX conversion
with tf2onnx, its settings as metadata_props), `operators` (what a TFLite
file computes: its operators, any that are not builtins, those an int8 file runs in float),
`rewrites` (the TFLite-friendly copy of a model), `parity` (agreement and thresholds) and
`report` (`format_report`). The runners of exported files live in
`unetpp_tf.runners` and are re-exported here.

Artifacts (`stem` is "model", or "model_L{level}" for a pruned head):

    saved_model/ (saved_model_L{level}/)   signatures "serving_default" (uint8 images)
                                            and "serve_float" (float32 images, see below)
    {stem}_float32.tflite                   quantize "none": float32 in, float32 out
    {stem}_float16.tflite                   float16 weights; float32 in/out
    {stem}_dynamic.tflite                   int8 weights, float activations; float32 in/out
    {stem}_int8.tflite                      full integer; uint8 in, uint8 out (see below)
    {stem}.onnx                             format "onnx": float32 in, float32 out (see below)
    {stem}_inference.keras                  format "keras": the single-output Keras model

Float inputs are images as the data pipeline gives them, scaled by their dtype's range
(8-bit / 255, 16-bit / 65535, float images as they are); a model built with
`preprocessing=` normalizes them in its own graph (`InputPreprocessing`), so every artifact
applies the same normalization. The uint8 "serving_default" signature divides by 255: it is
for 8-bit images; give 16-bit images to "serve_float" as x / 65535. Both signatures take any
height and width the model allows: images are reflection-padded to a multiple of 2**depth
inside the graph and the outputs cropped back.

TFLite files take one image: float32 [1, H, W, C] and return float32 probabilities
[1, H, W, K]. The int8 file takes uint8 [1, H, W, C] and returns uint8 probabilities: the
input is quantized with scale 1/255 and zero point 0 (the calibration pins the input range to
[0, 1]), so raw 8-bit pixels go in unchanged (it is for 8-bit images too); read the output as
`scale * (q - zero_point)` with the output tensor's quantization parameters.
`TFLiteModel` does all of this for you. The ONNX file (opset 17, converted with tf2onnx, run
for parity in onnxruntime) takes float32 "images" [N, H, W, C] channels last, like the Keras
model, and returns float32 "probabilities" [N, H, W, K]; batch and the spatial axes the model
leaves free are dynamic, padded inside the graph like the SavedModel signatures (`OnnxModel`
runs it; the extra `unetpp-tf[onnx]` installs tf2onnx, onnx and onnxruntime). Every file
carries the model's settings (number of classes, mode, level and the `InputPreprocessing`
settings, among them the training image size and resize policy that `predict_files` follows):
a SavedModel in `assets.extra/unetpp_tf.json`, a TFLite file as flatbuffer metadata named
"unetpp_tf", an ONNX file as metadata_props["unetpp_tf"] (JSON); the runners expose them as
`.metadata` and `.preprocessing`.

Conversion allows TFLite builtin operators only (unless `allow_flex=True`); swish,
hard-swish, squeeze-excitation, exact GELU, LayerNormalization and the encoders' in-model
preprocessing all convert to builtins. TFLite converts a copy of the model
(`rewrites.tflite_friendly`) in which LayerNormalization is written as `(x - mean) * scale +
beta`, so an int8 ConvNeXt stays integer throughout, and an identity 1x1 depthwise convolution
follows the encoder preprocessing, without which the converter quantizes `x - mean` on the
padded image's range and an int8 ResNet, DenseNet or EfficientNet loses the image. The report
lists each TFLite file's operators: "ops", "custom_ops" (not builtins: [] unless Flex was
allowed) and, for int8, "float_ops", those the converter had to leave in float ([] for every
encoder we ship).

Example:
    >>> report = export_model(model, "export", quantize=("none", "int8"),
    ...                       calibration=data.val, samples=data.test)
    >>> print(format_report(report))
"""

from unetpp_tf.export.exporter import FORMATS, QUANTIZATIONS, export_model
from unetpp_tf.export.operators import operator_summary
from unetpp_tf.export.parity import DEFAULT_THRESHOLDS
from unetpp_tf.export.report import REPORT_NAME, format_report
from unetpp_tf.runners import METADATA_NAME, METADATA_PATH, OnnxModel, SavedModelRunner, TFLiteModel

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FORMATS",
    "METADATA_NAME",
    "METADATA_PATH",
    "OnnxModel",
    "QUANTIZATIONS",
    "REPORT_NAME",
    "SavedModelRunner",
    "TFLiteModel",
    "export_model",
    "format_report",
    "operator_summary",
]
