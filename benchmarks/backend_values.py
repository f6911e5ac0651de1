"""The same models, losses and metrics on TensorFlow, JAX and PyTorch: do they compute the same values?

Each backend runs in its own process (KERAS_BACKEND is read when Keras is imported), in this
order: the reference (TensorFlow when it is among them) first, then the others. Each process
- builds three tiny models with seed 0: a 2D UNet++ (depth 3, widths 4..32, 3 classes, deep
  supervision, BatchNorm, transposed-convolution upsampling), a 3D UNet++ (depth 2, widths
  4..16, binary, deep supervision, trilinear upsampling) and a 2D U-Net (depth 2, binary,
  bilinear upsampling); the reference writes their weights with `save_weights` to a
  .weights.h5 file in a temporary folder, the others load those files;
- runs a fixed input through each in inference mode (every output), and once in training mode
  for the training loss (CE + Dice or BCE + Dice summed over the heads) and the global norm of
  its gradient w.r.t. the trainable weights, taken with the backend's own autodiff
  (tf.GradientTape, jax.grad, torch autograd);
- computes every loss class of `unetpp_tf.losses` (per-sample values, reduction "none") on fixed
  binary, 3-class and volume targets, from probabilities and from logits, and every metric class
  of `unetpp_tf.metrics` (binary, and 3-class from logits with per-class values), streamed over
  two batches, one of them pixel-weighted; the script stops if a loss or metric class is missing
  from its cases;
- counts the models' parameters.

The parent prints one row per quantity: the value on each backend (the mean when it is an
array), and the largest absolute difference from the reference over all elements. It exits
with status 1 when a backend fails or a difference exceeds the tolerance: parameter counts must
match exactly, anything else within --rtol times max(1, largest |reference value|).

The package never imports torch; give the PyTorch backend an interpreter that has torch and this
package installed with --torch-python (the other backends run with this interpreter).

Usage:
    python benchmarks/backend_values.py --torch-python PATH/TO/venv/bin/python
    python benchmarks/backend_values.py --backends tensorflow jax
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from isolated import answer_single  # benchmarks/isolated.py

BACKENDS = ("tensorflow", "jax", "torch")

# Loss classes and their (non-default) constructor arguments.
LOSS_ARGS = {
    "DiceLoss": dict(smooth=1.0),
    "BCEDiceLoss": dict(bce_weight=0.7, dice_weight=0.5),
    "CEDiceLoss": dict(ce_weight=1.0, dice_weight=0.5),
    "TverskyLoss": dict(alpha=0.3, beta=0.7),
    "FocalLoss": dict(gamma=2.0, alpha=0.25),
}
METRICS = ("Dice", "IoU", "Precision", "Recall", "F1Score", "PixelAccuracy")


def _data():
    """Fixed targets and predictions (numpy, so every backend sees the same bits)."""
    rng = np.random.default_rng(0)
    binary_logits = (2.0 * rng.standard_normal((2, 16, 16, 1))).astype("float32")
    class_logits = (2.0 * rng.standard_normal((2, 16, 16, 3))).astype("float32")
    volume_logits = (2.0 * rng.standard_normal((2, 8, 8, 8, 1))).astype("float32")
    softmax = np.exp(class_logits) / np.exp(class_logits).sum(-1, keepdims=True)
    ids = rng.integers(0, 3, (2, 16, 16))
    return {
        # name: (y_true, probabilities, logits)
        "binary": ((rng.random((2, 16, 16, 1)) > 0.6).astype("float32"), 1 / (1 + np.exp(-binary_logits)),
                   binary_logits),
        "3-class ids": (ids.astype("int32"), softmax, class_logits),
        "3-class one-hot": (np.eye(3, dtype="float32")[ids], softmax, class_logits),
        "volume": ((rng.random((2, 8, 8, 8, 1)) > 0.6).astype("float32"), 1 / (1 + np.exp(-volume_logits)),
                   volume_logits),
        "pixel weights": rng.random((1, 16, 16)).astype("float32"),
    }


def _models():
    """name -> (builder keyword arguments, input shape of the fixed batch)."""
    return {
        "unetpp2d": (dict(input_shape=(32, 32, 1), num_classes=3, depth=3, filters=(4, 8, 16, 32),
                          deep_supervision=True), (2, 32, 32, 1)),
        "unetpp3d": (dict(input_shape=(16, 16, 16, 1), depth=2, filters=(4, 8, 16), deep_supervision=True,
                          upsampling="bilinear"), (2, 16, 16, 16, 1)),
        "unet2d": (dict(input_shape=(32, 32, 1), depth=2, filters=(4, 8, 16), upsampling="bilinear"),
                   (2, 32, 32, 1)),
    }


def _gradient_norm(model, x, loss_of):
    """Global norm of d loss_of(model(x, training=True)) / d trainable weights, and the loss."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def value(trainable, non_trainable):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_of(outputs)

        loss, grads = jax.value_and_grad(value)([v.value for v in model.trainable_variables],
                                                [v.value for v in model.non_trainable_variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_of(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
    else:  # torch: the Keras variables are torch Parameters
        loss = loss_of(model(x, training=True))
        loss.backward()
        grads = [v.value.grad for v in model.trainable_variables]
    squares = sum(float(np.sum(keras.ops.convert_to_numpy(g).astype("float64") ** 2)) for g in grads)
    return float(keras.ops.convert_to_numpy(loss)), squares ** 0.5


def measure(spec: dict) -> dict:
    """Compute every quantity on this process's backend; return {name: [kind, value]}."""
    import importlib

    import keras

    from unetpp_tf import build_unet, build_unetpp, losses, metrics

    values = {}

    def put(name, value, kind="value"):
        values[name] = [kind, np.asarray(keras.ops.convert_to_numpy(value), dtype="float64").tolist()]

    # Fail loudly when the modules grow a loss or metric that the cases below do not cover.
    public = {n for n, o in vars(losses).items() if isinstance(o, type) and issubclass(o, keras.losses.Loss)
              and not n.startswith("_")}
    public |= {n for n, o in vars(metrics).items() if isinstance(o, type) and issubclass(o, keras.metrics.Metric)
               and not n.startswith("_")}
    missing = sorted(public - set(LOSS_ARGS) - set(METRICS))
    if missing:
        raise SystemExit(f"no cases for {missing}: add them to LOSS_ARGS or METRICS in {__file__}")

    for name, (options, shape) in _models().items():
        keras.utils.set_random_seed(0)
        build = build_unet if name.startswith("unet2d") else build_unetpp
        model = build(**options)
        path = os.path.join(spec["weights_dir"], f"{name}.weights.h5")
        if os.path.exists(path):
            model.load_weights(path)
        else:
            model.save_weights(path)
        put(f"{name} params", model.count_params(), "exact")
        put(f"{name} non-trainable params", sum(int(np.prod(v.shape)) for v in model.non_trainable_weights),
            "exact")
        x = np.random.default_rng(1).standard_normal(shape).astype("float32")
        outputs = model(x, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for output_name, output in zip(model.output_names, outputs):
            put(f"{name} {output_name}", output)
        if options.get("num_classes", 1) > 1:
            target, loss = np.random.default_rng(2).integers(0, 3, shape[:-1]), losses.CEDiceLoss()
        else:
            target, loss = (np.random.default_rng(2).random(shape) > 0.5).astype("float32"), losses.BCEDiceLoss()
        train_loss, norm = _gradient_norm(
            model, x, lambda outs: sum(loss(target, o) for o in (outs if isinstance(outs, (list, tuple)) else [outs])))
        put(f"{name} training loss", train_loss)
        put(f"{name} gradient norm", norm)

    data = _data()
    for loss_name, loss_args in LOSS_ARGS.items():
        for case in ("binary", "3-class ids", "3-class one-hot", "volume"):
            y_true, probs, logits = data[case]
            for from_logits, y_pred in ((False, probs), (True, logits)):
                loss = getattr(losses, loss_name)(from_logits=from_logits, reduction="none", **loss_args)
                put(f"{loss_name} {case} {'logits' if from_logits else 'probs'}", loss(y_true, y_pred))

    weights = data["pixel weights"]
    for metric_name in METRICS:
        for case, num_classes, from_logits in (("binary", 1, False), ("3-class ids", 3, True)):
            y_true, probs, logits = data[case]
            metric = getattr(metrics, metric_name)(num_classes=num_classes, from_logits=from_logits)
            y_pred = logits if from_logits else probs
            metric.update_state(y_true[:1], y_pred[:1])
            metric.update_state(y_true[1:], y_pred[1:], sample_weight=weights)
            put(f"{metric_name} {case}", metric.result())
            if num_classes > 1:
                put(f"{metric_name} {case} per class", metric.per_class_result())

    library = importlib.import_module(keras.backend.backend())
    return dict(values=values, version=f"keras {keras.version()}, {library.__name__} {library.__version__}")


def run_backend(backend: str, python: str, weights_dir: str) -> dict:
    """Run `measure` in a new `python` process with KERAS_BACKEND=backend; return its result."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's unetpp_tf comes first
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    result = subprocess.run([python, __file__, "--single", json.dumps(dict(weights_dir=weights_dir))],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{backend} ({python}) failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="backends to compare; the first is the reference unless tensorflow is among them "
                             "(default: every importable one, torch with --torch-python)")
    parser.add_argument("--torch-python", help="a Python interpreter with torch and this package installed")
    parser.add_argument("--rtol", type=float, default=1e-4, help="tolerance, relative to max(1, |reference|)")
    args = answer_single(parser, measure)
    if args is None:
        return
    backends = args.backends or [b for b in BACKENDS if importlib.util.find_spec(b) is not None
                                 or (b == "torch" and args.torch_python)]
    backends = sorted(dict.fromkeys(backends), key=lambda b: b != "tensorflow")  # the reference first
    reference = backends[0]

    results, failed = {}, []
    with tempfile.TemporaryDirectory() as weights_dir:
        for backend in backends:
            python = args.torch_python if backend == "torch" and args.torch_python else sys.executable
            try:
                results[backend] = run_backend(backend, python, weights_dir)
            except RuntimeError as error:
                print(error, file=sys.stderr)
                failed.append(backend)
    if reference not in results:
        sys.exit(f"the reference backend {reference} failed; nothing to compare")
    shown = [b for b in backends if b in results]
    others = shown[1:]
    for backend in shown:
        print(f"{backend}: {results[backend]['version']}, {results[backend]['seconds']:.0f} s")
    print(f"\ndiff = max |value - {reference}| over all elements; arrays show their mean; "
          f"tolerance {args.rtol:g} x max(1, |{reference}|), parameter counts exact\n")
    header = (f"{'quantity':<48} | " + " | ".join(f"{b:>11}" for b in shown) + " | "
              + " | ".join(f"{b + ' diff':>10}" for b in others))
    print(header)
    print("-" * len(header))
    worst = {b: 0.0 for b in others}
    bad = []
    for name, (kind, ref) in results[reference]["values"].items():
        ref = np.asarray(ref)
        row, diffs, row_bad = [], [], False
        for backend in shown:
            value = results[backend]["values"].get(name, [kind, np.nan])[1]
            value = np.asarray(value)
            row.append(f"{value.mean():>11.6g}")
            if backend == reference:
                continue
            diff = float(np.max(np.abs(value - ref))) if value.shape == ref.shape else np.inf
            limit = 0.0 if kind == "exact" else args.rtol * max(1.0, float(np.max(np.abs(ref))))
            diffs.append(f"{diff:>10.2e}")
            worst[backend] = max(worst[backend], diff if kind != "exact" else 0.0)
            if not diff <= limit:
                row_bad = True
                bad.append(f"{name} on {backend}: diff {diff:.3g} > {limit:.3g}")
        label = name + (f" (mean of {ref.size})" if ref.size > 1 else "")
        print(f"{label:<48} | " + " | ".join(row) + " | " + " | ".join(diffs) + (" FAIL" if row_bad else ""))
    print("\nlargest difference (outside counts): " + ", ".join(f"{b} {d:.2e}" for b, d in worst.items()))
    if bad or failed:
        sys.exit("FAILED: " + "; ".join(bad + [f"{b} did not run" for b in failed]))
    print(f"all {len(results[reference]['values'])} quantities agree on {', '.join(shown)}")


if __name__ == "__main__":
    main()
