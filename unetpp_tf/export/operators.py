"""What a TFLite file computes: its operators, which are not TFLite builtins, which run in float.

A phone or microcontroller runtime runs a file only if every operator is a TFLite builtin (a
TensorFlow "Flex" op needs the Select-TF-ops delegate, a custom op its own kernel), and an
integer-only accelerator takes an int8 file only if no operator between the input and the output
computes in float (the converter leaves an op it cannot quantize in float, with DEQUANTIZE and
QUANTIZE around it). `operator_summary` reads both off the file's flatbuffer.

Example:
    >>> summary = operator_summary(Path("export/model_int8.tflite").read_bytes())
    >>> summary["custom_ops"], summary["float_ops"]
    ([], [])
"""

from __future__ import annotations

import warnings

from unetpp_tf.runners import tflite_schema

FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16")
_CONVERSIONS = ("QUANTIZE", "DEQUANTIZE")  # move values between float and integer, compute nothing
_CUSTOM = 32  # BuiltinOperator.CUSTOM: the op is named by its custom code ("FlexErf", ...)


def _schema():
    """The flatbuffer schema module TensorFlow ships, or None (one warning) when it is missing."""
    schema = tflite_schema()
    if schema is None:
        warnings.warn("cannot list the operators of TFLite files here (no TFLite schema in this TensorFlow).",
                      stacklevel=3)
    return schema


def tflite_operators(content: bytes) -> list[dict] | None:
    """The operators of a TFLite file's main graph, in execution order, with their activations' types.

    Args:
        content: bytes. A `.tflite` file's content.

    Returns:
        list or None: {"op": name, "custom": bool, "inputs": [type, ...], "outputs": [type, ...]}
        per operator, where inputs lists only activations (tensors the graph computes or takes
        in, not weights); None if this TensorFlow cannot read the format.

    Example:
        >>> tflite_operators(content)[0]
        {'op': 'QUANTIZE', 'custom': False, 'inputs': ['UINT8'], 'outputs': ['INT8']}
    """
    schema = _schema()
    if schema is None:
        return None
    model = schema.Model.GetRootAs(content, 0)
    op_names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    type_names = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
    codes = []
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == _CUSTOM:
            codes.append(((code.CustomCode() or b"?").decode(), True))
        else:
            codes.append((op_names.get(builtin, f"BUILTIN_{builtin}"), False))
    graph = model.Subgraphs(0)
    activations = set(graph.InputsAsNumpy().tolist())
    operators = []
    for index in range(graph.OperatorsLength()):
        operator = graph.Operators(index)
        outputs = [i for i in operator.OutputsAsNumpy().tolist() if i >= 0]
        inputs = [i for i in operator.InputsAsNumpy().tolist() if i in activations]
        activations.update(outputs)
        name, custom = codes[operator.OpcodeIndex()]
        operators.append({
            "op": name,
            "custom": custom,
            "inputs": [type_names.get(graph.Tensors(i).Type(), "?") for i in inputs],
            "outputs": [type_names.get(graph.Tensors(i).Type(), "?") for i in outputs],
        })
    return operators


def operator_summary(content: bytes) -> dict | None:
    """The operator names of a TFLite file, its non-builtin ones, and those that compute in float.

    Args:
        content: bytes. A `.tflite` file's content.

    Returns:
        dict or None: {"ops": sorted names, "custom_ops": names that are not TFLite builtins
        (Flex or custom; [] for a builtin-only file), "float_ops": names of operators other
        than QUANTIZE/DEQUANTIZE with a float input or output activation (every op of a float
        file; [] for an integer-only int8 file)}; None if the format cannot be read here.

    Example:
        >>> operator_summary(Path("export/model_int8.tflite").read_bytes())["float_ops"]
        []
    """
    operators = tflite_operators(content)
    if operators is None:
        return None
    in_float = {
        o["op"] for o in operators
        if o["op"] not in _CONVERSIONS and any(t in FLOAT_TYPES for t in o["inputs"] + o["outputs"])
    }
    return {
        "ops": sorted({o["op"] for o in operators}),
        "custom_ops": sorted({o["op"] for o in operators if o["custom"]}),
        "float_ops": sorted(in_float),
    }
