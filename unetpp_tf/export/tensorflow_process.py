"""Export from another Keras backend (JAX, PyTorch): `export_model` in a TensorFlow child process.

SavedModel, TFLite and ONNX conversion (tf2onnx) trace the model as TensorFlow graphs, which
needs Keras' TensorFlow backend, and a Python process has one backend. On any other backend
`export_model` therefore saves the model as `.keras` (the format is the same on every
backend), gathers the parity and calibration images as it would itself (float32, resized to
the export size), and runs `python -m unetpp_tf.export REQUEST` with KERAS_BACKEND=tensorflow.
The child loads the file and calls `export_model` there; its report comes back unchanged, its
warnings are re-issued here, and an error it raises is raised here with the same type and
message. The export folder is written by the child, with the same all-or-nothing staging.

Example:
    >>> # KERAS_BACKEND=jax
    >>> report = unetpp_tf.export.export_model(model, "export", samples=data.test)  # runs this
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_LOGGED = []  # the one log line per process


def export_in_tensorflow(model, output_dir, *, size, rank: int, channels: int, wants_int8: bool, options: dict,
                         calibration=None, samples=None) -> dict:
    """Run `export_model` on a saved copy of `model` in a process with the TensorFlow backend.

    `size`, `rank` and `channels` are the export geometry `export_model` worked out; the images
    are gathered here with `collect_images` as the in-process export gathers them. `options`
    are `export_model`'s remaining keyword arguments (JSON values).

    Example:
        >>> export_in_tensorflow(model, "export", size=(32, 32), rank=2, channels=1, wants_int8=False,
        ...                      options={"formats": ["tflite"]}, samples=data.test)
    """
    from unetpp_tf.export.parity import collect_images

    if not _LOGGED:
        _LOGGED.append(True)
        import keras

        logger.info("Keras runs on %s: exporting in a TensorFlow process (python -m unetpp_tf.export).",
                    keras.backend.backend())
    images = {}
    if samples is not None:
        images["samples"] = collect_images(samples, size, channels, options["max_samples"], "samples", rank)
    if wants_int8 and calibration is not None:
        images["calibration"] = collect_images(
            calibration, size, channels, options["calibration_steps"], "calibration", rank
        )
    with tempfile.TemporaryDirectory(prefix="unetpp_tf_export_") as folder:
        folder = Path(folder)
        model.save(folder / "model.keras")
        np.savez(folder / "images.npz", **{f"{key}_{i:06d}": a for key, arrays in images.items()
                                           for i, a in enumerate(arrays)})
        request = {
            "model": str(folder / "model.keras"),
            "images": str(folder / "images.npz"),
            "output_dir": str(Path(output_dir).absolute()),
            "options": options,
            "result": str(folder / "result.json"),
        }
        (folder / "request.json").write_text(json.dumps(request))
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "KERAS_BACKEND": "tensorflow",
               "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        done = subprocess.run([sys.executable, "-m", "unetpp_tf.export", str(folder / "request.json")],
                              env=env, capture_output=True, text=True)
        result_path = folder / "result.json"
        if not result_path.exists():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(
                f"the TensorFlow export process (python -m unetpp_tf.export) ended with exit code "
                f"{done.returncode} and no result; its last output:\n{tail}"
            )
        result = json.loads(result_path.read_text())
    for message in result.get("warnings", []):
        warnings.warn(message, stacklevel=3)
    if "error" in result:
        raise _exception(result["error"]["type"], result["error"]["message"])
    return result["report"]


def _exception(name: str, message: str) -> Exception:
    """The child's error as the same built-in exception type (RuntimeError naming it otherwise)."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return RuntimeError(f"{name}: {message}")


def main(argv: list[str]) -> int:
    """The child: export the request's model with TensorFlow and write the result file.

    Example:
        >>> main(["request.json"])  # what `python -m unetpp_tf.export request.json` runs
        0
    """
    request = json.loads(Path(argv[0]).read_text())
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                f"python -m unetpp_tf.export needs KERAS_BACKEND=tensorflow, got {keras.backend.backend()}."
            )
        from unetpp_tf.export.exporter import export_model

        model = keras.saving.load_model(request["model"], compile=False, safe_mode=False)  # our own file
        with np.load(request["images"]) as stored:
            images = {key: [stored[name] for name in sorted(stored.files) if name.rsplit("_", 1)[0] == key] or None
                      for key in ("samples", "calibration")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = export_model(model, request["output_dir"], **request["options"], **images)
        ours = [w for w in caught if f"{os.sep}unetpp_tf{os.sep}" in str(w.filename)]  # not TensorFlow's notices
        result = {"report": report, "warnings": list(dict.fromkeys(str(w.message) for w in ours))}
    except Exception as error:  # noqa: BLE001 -- any error goes back to the parent as it was
        result = {"error": {"type": type(error).__name__, "message": str(error)}}
    Path(request["result"]).write_text(json.dumps(result))
    return 0
