"""Batch-1 latency and file size of every export variant of the paper-width UNet++.

Builds the paper's UNet++ (32..512 filters, deep supervision, random init, optionally trained
for --train-steps on synthetic images) or loads a trained run's model.keras, exports it with
`unetpp_tf.export.export_model`:
1. the "accurate" model (mean of the heads): SavedModel, TFLite float32, float16,
   dynamic-range and int8, and ONNX (float32, run in onnxruntime on the CPU);
2. every pruned head L1..L4 ("fast" mode): TFLite float32 and int8, and ONNX
   (skipped with --accurate-only);
then times one image at a time (median over --repeats after warm-up, every variant once per
round so that a change in the machine's load touches all alike) for Keras
(`predict_on_batch` and `model(x)`), the SavedModel, each TFLite file and the ONNX file, and
prints one table with the ratios int8 size / float32 size and int8, float32 TFLite and ONNX
latency / Keras latency.

With random weights the label maps are meaningless, so the parity bars are switched off
(agreement is still printed); with --run DIR the default bars apply, with --train-steps N
those of the float files (SavedModel, TFLite float32, ONNX).

Usage:
    python benchmarks/export_latency.py                     # 256x256, 20 repeats
    python benchmarks/export_latency.py --quick             # 64x64, 3 repeats
    python benchmarks/export_latency.py --run saved_models/my_run --size 96
    python benchmarks/export_latency.py --size 96 --train-steps 150 --accurate-only --threads 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import unetpp_tf
from unetpp_tf.export import export_model
from unetpp_tf.inference import as_single_output
from unetpp_tf.runners import OnnxModel, SavedModelRunner, TFLiteModel

ALL_QUANT = ("none", "float16", "dynamic", "int8")


def interleaved_ms(fns: list, x, repeats: int, warmup: int = 2) -> list[float]:
    """Median batch-1 ms of each function, timed in rounds (one call of each per round), so that
    a change in the machine's load (a shared CPU) affects every variant alike."""
    for fn in fns:
        for _ in range(warmup):
            fn(x)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, measured in zip(fns, times):
            start = time.perf_counter()
            fn(x)
            measured.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(measured) for measured in times]


def build(args) -> keras.Model:
    if args.run:
        return unetpp_tf.load_model(Path(args.run) / "model.keras")  # safe mode, clear errors
    keras.utils.set_random_seed(0)
    filters = tuple(args.filters * 2**i for i in range(5))
    model = unetpp_tf.from_preset("paper", input_shape=(None, None, 1), deep_supervision=True, filters=filters)
    if args.train_steps:
        train(model, args)
    return model


def train(model: keras.Model, args) -> None:
    """A few Adam steps on synthetic images, so the label maps (and the agreement figures) mean something."""
    data = unetpp_tf.data.synthetic(96, image_size=(args.size, args.size), split=(1.0, 0.0, 0.0), batch_size=8)
    heads = len(model.outputs)
    model.compile(keras.optimizers.Adam(1e-3), loss=[unetpp_tf.losses.BCEDiceLoss()] * heads)
    start = time.perf_counter()
    history = model.fit(data.train.repeat().map(lambda x, y: (x, (y,) * heads)), steps_per_epoch=args.train_steps,
                        epochs=1, verbose=0)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s, "
          f"final loss {history.history['loss'][-1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width (multiple of 16)")
    parser.add_argument("--filters", type=int, default=32, help="first-level filters (32 = the paper)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs per variant")
    parser.add_argument("--calibration", type=int, default=16, help="int8 calibration images")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="TFLite interpreter / onnxruntime threads")
    parser.add_argument("--train-steps", type=int, default=0, help="train the random model this many steps first")
    parser.add_argument("--accurate-only", action="store_true", help="skip the pruned heads L1..L4")
    parser.add_argument("--run", help="a training run directory holding model.keras")
    parser.add_argument("--out", help="keep the exports here (default: a temporary directory, removed)")
    parser.add_argument("--quick", action="store_true", help="64x64, 3 repeats, 4 calibration images")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats, args.calibration = 64, 3, 4

    model = build(args)
    channels = model.input_shape[-1]
    data = unetpp_tf.data.synthetic(
        args.calibration + 8, image_size=(args.size, args.size), channels=channels,
        split=(0.0, 0.5, 0.5), batch_size=4,
    )
    if args.run:
        thresholds = None
    elif args.train_steps:  # a briefly trained model: the float files must agree, quantized ones are only measured
        thresholds = {k: 0.0 for k in ("float16", "dynamic", "int8")}
    else:
        thresholds = {k: 0.0 for k in ("saved_model", "onnx", *ALL_QUANT)}
    common = dict(image_size=(args.size, args.size), calibration=data.val, samples=data.test,
                  thresholds=thresholds, max_samples=4, calibration_steps=args.calibration,
                  num_threads=args.threads)
    x = next(iter(data.test))[0][:1].numpy()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="export_latency_"))
    try:
        run_all(args, model, common, x, root)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


def run_all(args, model: keras.Model, common: dict, x: np.ndarray, root: Path) -> None:
    """Export every variant into `root`, time them and print the table."""
    channels, depth = model.input_shape[-1], len(model.outputs)
    print(f"UNet++ filters {args.filters}..{args.filters * 16}, {args.size}x{args.size}x{channels}, "
          f"batch 1, median of {args.repeats}, TFLite and onnxruntime threads {args.threads}, exports in {root}")
    rows = []  # (group, variant, size bytes or params, the function timed, then its latency ms, dice agreement)

    start = time.perf_counter()
    report = export_model(model, root / "accurate", formats=("saved_model", "tflite", "onnx"), quantize=ALL_QUANT,
                          **common)
    print(f"exported accurate model in {time.perf_counter() - start:.0f} s")
    accurate = as_single_output(model)  # the model the export runs: mean of the heads, taking a tensor
    rows.append(("accurate", "keras predict_on_batch", f"{accurate.count_params():,} params",
                 accurate.predict_on_batch, None))
    rows.append(("accurate", "keras model(x)", f"{accurate.count_params():,} params",
                 lambda t: accurate(t, training=False), None))
    for artifact in report["artifacts"]:
        if artifact["format"] == "saved_model":
            runner, label = SavedModelRunner(artifact["path"]), "saved_model"
        elif artifact["format"] == "onnx":
            runner, label = OnnxModel(artifact["path"], num_threads=args.threads), "onnx float32"
        else:
            runner = TFLiteModel(artifact["path"], num_threads=args.threads)
            label = f"tflite {artifact['name'].removeprefix('model_')}"
        rows.append(("accurate", label, artifact["size_bytes"], runner,
                     artifact["dice_agreement"]))

    levels = [] if args.accurate_only else list(range(1, depth + 1))
    for level in levels:
        start = time.perf_counter()
        report = export_model(model, root / f"L{level}", formats=("tflite", "onnx"), quantize=("none", "int8"),
                              mode="fast", level=level, **common)
        print(f"exported L{level} in {time.perf_counter() - start:.0f} s")
        pruned = as_single_output(model, "fast", level)
        rows.append((f"L{level}", "keras predict_on_batch", f"{pruned.count_params():,} params",
                     pruned.predict_on_batch, None))
        for artifact in report["artifacts"]:
            if artifact["format"] == "onnx":
                runner, label = OnnxModel(artifact["path"], num_threads=args.threads), "onnx float32"
            else:
                runner = TFLiteModel(artifact["path"], num_threads=args.threads)
                label = f"tflite {artifact['quantize'].replace('none', 'float32')}"
            rows.append((f"L{level}", label, artifact["size_bytes"], runner,
                         artifact["dice_agreement"]))

    latencies = interleaved_ms([fn for _, _, _, fn, _ in rows], x, args.repeats)
    rows = [(group, variant, size, ms, agreement) for (group, variant, size, _, agreement), ms in zip(rows, latencies)]
    print()
    print(f"{'model':<9} {'variant':<24} {'size':>18} {'ms/image':>10} {'dice agr.':>10}")
    print("-" * 75)
    for group, variant, size, ms, agreement in rows:
        size_text = size if isinstance(size, str) else f"{size / 1e6:.2f} MB"
        agreement_text = "" if agreement is None else f"{agreement:.4f}"
        print(f"{group:<9} {variant:<24} {size_text:>18} {ms:>10.2f} {agreement_text:>10}")
    print()
    for group in ["accurate"] + [f"L{level}" for level in levels]:
        found = {variant: (size, ms) for g, variant, size, ms, _ in rows if g == group}
        int8, float32, onnx = found["tflite int8"], found["tflite float32"], found["onnx float32"]
        keras_ms = found["keras predict_on_batch"][1]
        print(f"{group:<9} int8/float32 size {int8[0] / float32[0]:.3f}   "
              f"int8/keras latency {int8[1] / keras_ms:.3f}   float32/keras latency {float32[1] / keras_ms:.3f}   "
              f"onnx/keras latency {onnx[1] / keras_ms:.3f}   onnx/tflite float32 size {onnx[0] / float32[0]:.3f}")
    if not (args.run or args.train_steps):
        print("\n(random weights: parity bars off; agreement figures describe an untrained model)")


if __name__ == "__main__":
    main()
