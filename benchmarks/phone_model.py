"""The phone model: MobileNetV3 + UNet++ as TFLite int8 — file size, batch-1 CPU latency and parity.

Exports, through `unetpp_tf.export.export_model`, TFLite float32, float16, dynamic-range and int8
files of
- the phone model, MobileNetV3Large + UNet++ (depth 4, decoder filters 16) at 256x256x3 and
  256x256x1, and MobileNetV3Small + UNet++ at 256x256x3 for comparison;
- a plain UNet++ (depth 4, filters 16 and 32, BatchNorm) at 256x256x3 for reference;
then times each file on this CPU with the LiteRT interpreter (batch 1, median of --repeats
invocations after warm-up, 1 and 2 threads) and prints one table: file size, latency, and the
parity the export measured against the Keras model (Dice agreement of the label maps, largest
probability difference), with whether every op is a TFLite builtin and, for int8, whether every op
runs in int8.

Weights (no download): random initialization, then a short fit on the synthetic set so the label
maps mean something (parity on an untrained model's near-0.5 probabilities says little), on 64x64
tiles cut from 256x256 images, so objects keep the pixel sizes the 256x256 files see. BatchNorm
statistics are then recomputed on full-size synthetic images (one training-mode pass over
--calibration images with momentum 0: the moving mean and variance become those images'), so
they match the images the int8 file is calibrated and checked on. Images come from
`unetpp_tf.data.synthetic` at the model's size: `channels=3` gives its tinted-RGB images,
`channels=1` grayscale. The int8 representative dataset is --calibration validation images; parity
runs on --parity test images.

Usage:
    python benchmarks/phone_model.py                  # 256x256, the five models
    python benchmarks/phone_model.py --quick          # 64x64, two models, a smoke run
    python benchmarks/phone_model.py --models mobilenetv3large-rgb --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import unetpp_tf
from unetpp_tf.export import DEFAULT_THRESHOLDS, export_model
from unetpp_tf.models.analysis import count_flops

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
MODELS = {  # name: (build_unetpp options, input channels)
    "mobilenetv3large-rgb": (dict(encoder="mobilenetv3large", filters=16), 3),
    "mobilenetv3large-gray": (dict(encoder="mobilenetv3large", filters=16), 1),
    "mobilenetv3small-rgb": (dict(encoder="mobilenetv3small", filters=16), 3),
    "mobilenetv3small-gray": (dict(encoder="mobilenetv3small", filters=16), 1),
    "unetpp16-rgb": (dict(filters=16), 3),
    "unetpp32-rgb": (dict(filters=32), 3),
}
DEFAULT_MODELS = ("mobilenetv3large-rgb", "mobilenetv3large-gray", "mobilenetv3small-rgb", "unetpp16-rgb",
                  "unetpp32-rgb")
TILE = 64


def tiles(images, masks, size: int, tile: int):
    """Cut [B, size, size, C] images and masks into [B * (size / tile)**2, tile, tile, C] tiles."""

    def cut(x):
        n, c = size // tile, x.shape[-1]
        x = tf.reshape(x, [-1, n, tile, n, tile, c])
        return tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [-1, tile, tile, c])

    return cut(images), cut(masks)


def recompute_batchnorm(model: keras.Model, images) -> int:
    """Set every BatchNormalization's moving statistics to those of `images`; return how many layers.

    One forward pass in training mode with momentum 0 replaces the moving mean and variance by the
    batch's (layer after layer, each on the previous layers' batch-normalized outputs).
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return len(layers)


def interpreter_ms(path: Path, threads: int, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one `invoke()` of the LiteRT interpreter on a batch-1 input."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(detail["dtype"], np.integer):
        value = rng.integers(0, 256, detail["shape"]).astype(detail["dtype"])
    else:
        value = rng.random(detail["shape"], dtype=np.float32)
    interpreter.set_tensor(detail["index"], value)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure(name: str, args, out: Path) -> list[dict]:
    """Train, export and time one model; one row per variant (Keras first)."""
    options, channels = MODELS[name]
    size, tile = args.size, min(TILE, args.size)
    keras.utils.set_random_seed(0)
    count = args.train_images + args.calibration + args.parity
    data = unetpp_tf.data.synthetic(
        count, image_size=(size, size), channels=channels, batch_size=8, shuffle=False,
        split=(args.train_images / count, args.calibration / count, args.parity / count),
    )
    model = unetpp_tf.build_unetpp((None, None, channels), depth=4, **options)
    params, gflops = model.count_params(), count_flops(model, (size, size, channels)) / 1e9

    start = time.perf_counter()
    train = data.train.map(lambda x, y: tiles(x, y, size, tile)).unbatch().shuffle(1024, seed=0).batch(16).repeat()
    model.compile(keras.optimizers.Adam(2e-3), unetpp_tf.losses.BCEDiceLoss(), jit_compile=False)
    model.fit(train, epochs=1, steps_per_epoch=args.train_steps, verbose=0)
    recompute_batchnorm(model, np.concatenate([x for x, _ in data.val.as_numpy_iterator()]))
    trained_s = time.perf_counter() - start

    start = time.perf_counter()
    report = export_model(
        model, out / name, formats="tflite", quantize=QUANTIZATIONS, image_size=(size, size),
        calibration=data.val, samples=data.test, max_samples=args.parity, calibration_steps=args.calibration,
        thresholds={q: 0.0 for q in QUANTIZATIONS},  # measure, never refuse: the table marks the bars
    )
    exported_s = time.perf_counter() - start
    images = np.concatenate([x for x, _ in data.test.as_numpy_iterator()])
    masks = np.concatenate([y for _, y in data.test.as_numpy_iterator()])
    predicted = model.predict(images, verbose=0) >= 0.5
    dice = 2.0 * (predicted & (masks > 0)).sum() / max(predicted.sum() + (masks > 0).sum(), 1)

    label = f"{name} ({params / 1e6:.2f}M, {gflops:.2f} GFLOPs)"
    rows = [dict(model=label, variant="keras", size_mb=None, ms={}, keras_ms=report["keras_latency_ms"],
                 dice=None, diff=None, ok="", ops=f"test Dice {dice:.3f}")]
    for artifact in report["artifacts"]:
        path = Path(artifact["path"])
        ms = {threads: interpreter_ms(path, threads, args.repeats) for threads in args.threads}
        bar = DEFAULT_THRESHOLDS[artifact["quantize"]]
        builtin = "builtin" if artifact["custom_ops"] == [] else "FLEX " + ",".join(artifact["custom_ops"] or [])
        if artifact["quantize"] == "int8":
            builtin += ", all int8" if artifact["float_ops"] == [] else ", float " + ",".join(artifact["float_ops"])
        rows.append(dict(
            model=label, variant=path.stem.removeprefix("model_"), size_mb=artifact["size_bytes"] / 1e6, ms=ms,
            keras_ms=None, dice=artifact["dice_agreement"], diff=artifact["max_abs_diff"],
            ok="yes" if artifact["dice_agreement"] >= bar else f"NO (<{bar})", ops=builtin,
        ))
    print(f"{name}: trained {trained_s:.0f} s (test Dice {dice:.3f}), exported {exported_s:.0f} s", flush=True)
    return rows


def table(rows: list[dict], threads) -> str:
    """Fixed-width text table of all rows."""
    header = ["model", "variant", "size MB"] + [f"ms {t} thr" for t in threads] + [
        "Dice agr.", "max|dp|", "bar ok", "ops"]
    cells = []
    for r in rows:
        latency = [f"{r['ms'][t]:.1f}" if t in r["ms"] else "" for t in threads]
        if r["keras_ms"] is not None:
            latency = [f"{r['keras_ms']:.1f} (TF)"] + [""] * (len(threads) - 1)
        cells.append([
            r["model"], r["variant"], "" if r["size_mb"] is None else f"{r['size_mb']:.2f}", *latency,
            "" if r["dice"] is None else f"{r['dice']:.4f}", "" if r["diff"] is None else f"{r['diff']:.2g}",
            r["ok"], r["ops"],
        ])
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    previous = None
    for c in cells:
        shown = [("" if c[0] == previous else c[0])] + c[1:]
        previous = c[0]
        lines.append("  ".join(str(v).ljust(w) if i in (0, 1, len(c) - 1) else str(v).rjust(w)
                               for i, (v, w) in enumerate(zip(shown, widths))).rstrip())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width (multiple of 64)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=DEFAULT_MODELS)
    parser.add_argument("--repeats", type=int, default=10, help="timed invocations per file and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2), help="interpreter thread counts")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps of 16 tiles")
    parser.add_argument("--train-images", type=int, default=64, help="synthetic training images (cut into tiles)")
    parser.add_argument("--calibration", type=int, default=16, help="int8 calibration (and BatchNorm) images")
    parser.add_argument("--parity", type=int, default=8, help="parity images")
    parser.add_argument("--out", help="keep the exported files here (default: a temporary folder, removed)")
    parser.add_argument("--quick", action="store_true", help="64x64, two models, 10 steps, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.size, args.train_steps, args.repeats, args.calibration, args.parity = 64, 10, 3, 8, 4
        args.models = ("mobilenetv3small-rgb", "unetpp16-rgb")
    if args.size % 64:
        parser.error(f"--size {args.size} is not a multiple of 64 (the training tiles and depth 4 need it).")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        out = Path(args.out) if args.out else Path(temporary)
        rows = [row for name in args.models for row in measure(name, args, out)]
    print(f"\n{args.size}x{args.size}, batch 1, LiteRT interpreter on {os.cpu_count()} CPU core(s), median of "
          f"{args.repeats}; parity on {args.parity} synthetic test images, int8 calibrated on {args.calibration}; "
          f"Keras row: eager TensorFlow, default threads\n")
    print(table(rows, tuple(args.threads)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
