"""Batch-1 latency and file size of every export variant of the paper-width UNet++.

Builds the paper's UNet++ (32..512 filters, deep supervision, random init) or loads a
trained run's model.keras, exports it with `unetpp_tf.export.export_model`:
1. the "accurate" model (mean of the heads): SavedModel and TFLite float32, float16,
   dynamic-range and int8;
2. every pruned head L1..L4 ("fast" mode): TFLite float32 and int8;
then times one image at a time (median over --repeats after warm-up) for Keras
(`predict_on_batch` and `model(x)`), the SavedModel and each TFLite file, and prints one
table with the ratios int8 size / float32 size and int8 latency / Keras latency.

With random weights the label maps are meaningless, so the parity bars are switched off
(agreement is still printed); with --run DIR the default bars apply.

Usage:
    python benchmarks/export_latency.py                     # 256x256, 20 repeats
    python benchmarks/export_latency.py --quick             # 64x64, 3 repeats
    python benchmarks/export_latency.py --run saved_models/my_run --size 96
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
from unetpp_tf.runners import SavedModelRunner, TFLiteModel

ALL_QUANT = ("none", "float16", "dynamic", "int8")


def median_ms(fn, x, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def build(args) -> keras.Model:
    if args.run:
        return unetpp_tf.load_model(Path(args.run) / "model.keras")  # safe mode, clear errors
    keras.utils.set_random_seed(0)
    filters = tuple(args.filters * 2**i for i in range(5))
    return unetpp_tf.from_preset("paper", input_shape=(None, None, 1), deep_supervision=True, filters=filters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width (multiple of 16)")
    parser.add_argument("--filters", type=int, default=32, help="first-level filters (32 = the paper)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs per variant")
    parser.add_argument("--calibration", type=int, default=16, help="int8 calibration images")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="TFLite interpreter threads")
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
    thresholds = None if args.run else {k: 0.0 for k in ("saved_model", *ALL_QUANT)}
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
          f"batch 1, median of {args.repeats}, TFLite threads {args.threads}, exports in {root}")
    rows = []  # (group, variant, size bytes or params, latency ms, dice agreement)

    start = time.perf_counter()
    report = export_model(model, root / "accurate", formats=("saved_model", "tflite"), quantize=ALL_QUANT, **common)
    print(f"exported accurate model in {time.perf_counter() - start:.0f} s")
    accurate = as_single_output(model)  # the model the export runs: mean of the heads, taking a tensor
    rows.append(("accurate", "keras predict_on_batch", f"{accurate.count_params():,} params",
                 median_ms(accurate.predict_on_batch, x, args.repeats), None))
    rows.append(("accurate", "keras model(x)", f"{accurate.count_params():,} params",
                 median_ms(lambda t: accurate(t, training=False), x, args.repeats), None))
    for artifact in report["artifacts"]:
        if artifact["format"] == "saved_model":
            runner, label = SavedModelRunner(artifact["path"]), "saved_model"
        else:
            runner = TFLiteModel(artifact["path"], num_threads=args.threads)
            label = f"tflite {artifact['name'].removeprefix('model_')}"
        rows.append(("accurate", label, artifact["size_bytes"], median_ms(runner, x, args.repeats),
                     artifact["dice_agreement"]))

    for level in range(1, depth + 1):
        start = time.perf_counter()
        report = export_model(model, root / f"L{level}", formats="tflite", quantize=("none", "int8"),
                              mode="fast", level=level, **common)
        print(f"exported L{level} in {time.perf_counter() - start:.0f} s")
        pruned = as_single_output(model, "fast", level)
        rows.append((f"L{level}", "keras predict_on_batch", f"{pruned.count_params():,} params",
                     median_ms(pruned.predict_on_batch, x, args.repeats), None))
        for artifact in report["artifacts"]:
            runner = TFLiteModel(artifact["path"], num_threads=args.threads)
            rows.append((f"L{level}", f"tflite {artifact['quantize'].replace('none', 'float32')}",
                         artifact["size_bytes"], median_ms(runner, x, args.repeats), artifact["dice_agreement"]))

    print()
    print(f"{'model':<9} {'variant':<24} {'size':>18} {'ms/image':>10} {'dice agr.':>10}")
    print("-" * 75)
    for group, variant, size, ms, agreement in rows:
        size_text = size if isinstance(size, str) else f"{size / 1e6:.2f} MB"
        agreement_text = "" if agreement is None else f"{agreement:.4f}"
        print(f"{group:<9} {variant:<24} {size_text:>18} {ms:>10.2f} {agreement_text:>10}")
    print()
    for group in ["accurate"] + [f"L{level}" for level in range(1, depth + 1)]:
        found = {variant: (size, ms) for g, variant, size, ms, _ in rows if g == group}
        int8, float32 = found["tflite int8"], found["tflite float32"]
        keras_ms = found["keras predict_on_batch"][1]
        print(f"{group:<9} int8/float32 size {int8[0] / float32[0]:.3f}   "
              f"int8/keras latency {int8[1] / keras_ms:.3f}   float32/keras latency {float32[1] / keras_ms:.3f}")
    if not args.run:
        print("\n(random weights: parity bars off; agreement figures describe an untrained model)")


if __name__ == "__main__":
    main()
