"""Peak training memory and speed of UNet++ with and without recomputation.

For the paper-width UNet++ (filters 32..512, 9.04M parameters) at 256x256 batch 4, with
BatchNorm (dropout 0, the library default) and without (dropout 0.5, the paper), and
optionally at 96x96 batch 16, this prints one table for three builds of the same model: the
concatenated graph (a Concatenate layer before each node's first Conv2D), the default
(`ConcatConv2D`: no materialised concatenations) and `recompute=True`. For each: the peak
resident memory of a process that only trains that model (`ru_maxrss`), the floor (the peak
before the first training step: TensorFlow, the model, its weights and the Adam slots) and
the part above it (activations and the backward pass), the ratios of the peaks and the
training images/s. Each configuration runs in its own process so its peak memory is its own.

Usage:
    python benchmarks/recompute_memory.py               # 256x256 batch 4, BN on and off (~6 min)
    python benchmarks/recompute_memory.py --with-96     # and 96x96 batch 16
    python benchmarks/recompute_memory.py --quick       # 16 filters, 2 timed steps: a smoke run
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from isolated import answer_single, run_isolated  # benchmarks/isolated.py

BUILDS = ("functional", "nested", "recompute")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def measure(spec: dict) -> dict:
    """Train one configuration for a few steps in this process and return its figures."""
    import keras

    import unetpp_tf

    keras.utils.set_random_seed(0)
    size, batch, filters = spec["size"], spec["batch"], spec["filters"]
    from training_changes import concat_then_conv2d  # benchmarks/training_changes.py

    from unetpp_tf.models import blocks

    original = blocks.ConcatConv2D
    if spec["build"] == "functional":  # conv_block looks the name up when it runs
        blocks.ConcatConv2D = concat_then_conv2d
    try:
        model = unetpp_tf.from_preset(
            "paper", input_shape=(size, size, 1), filters=tuple(filters * 2**i for i in range(5)),
            batch_norm=spec["batch_norm"], dropout=0.0 if spec["batch_norm"] else 0.5,
            recompute=spec["build"] == "recompute",
        )
    finally:
        blocks.ConcatConv2D = original
    model.compile(keras.optimizers.Adam(1e-4), loss=unetpp_tf.losses.BCEDiceLoss(), jit_compile=False)
    model.optimizer.build(model.trainable_variables)  # the Adam slots belong to the floor
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.int32)
    floor = _peak_gb()
    model.train_on_batch(images, masks)  # trace and warm up
    model.train_on_batch(images, masks)
    samples = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        model.train_on_batch(images, masks)
        samples.append(time.perf_counter() - start)
    return {**spec, "floor_gb": floor, "peak_gb": _peak_gb(), "train_images_s": batch / float(np.median(samples))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-96", action="store_true", help="also 96x96 batch 16")
    parser.add_argument("--batch-norm", choices=("on", "off", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="16 filters and 2 timed steps: a smoke run")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after two warm-up steps")
    args = answer_single(parser, measure)
    if args is None:
        return

    filters, steps = (16, 2) if args.quick else (32, args.steps)
    configs = [(256, 4)] + ([(96, 16)] if args.with_96 else [])
    norms = [True, False] if args.batch_norm == "both" else [args.batch_norm == "on"]
    rows = []
    for size, batch in configs:
        for batch_norm in norms:
            spec = dict(size=size, batch=batch, filters=filters, batch_norm=batch_norm, steps=steps)
            rows.append({build: run_isolated(__file__, {**spec, "build": build}) for build in BUILDS})

    print(f"UNet++ paper preset, filters {tuple(filters * 2**i for i in range(5))}, Adam, BCE+Dice, XLA off")
    print("peak = ru_maxrss of a process training only that model; floor = peak before the first step")
    print("(TensorFlow, model, weights, Adam slots); above floor = peak - floor; changes are recompute's.")
    print("builds: functional = concatenated graph, default = ConcatConv2D, recompute = recompute=True\n")
    header = (f"{'input, batch':>13} {'BN':>3} {'drop':>4} | {'floor':>5} | {'functional':>10} {'default':>7} "
              f"{'recompute':>9} | {'vs default':>10} {'vs funct.':>9} | {'above floor: default':>20} "
              f"{'recompute':>9} {'change':>6} | {'img/s default':>13} {'recompute':>9} {'speed':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        functional, default, rec = r["functional"], r["nested"], r["recompute"]
        above_default, above_rec = default["peak_gb"] - default["floor_gb"], rec["peak_gb"] - rec["floor_gb"]
        print(f"{default['size']:>5}^2, {default['batch']:>3} {'on' if default['batch_norm'] else 'off':>4} "
              f"{0.0 if default['batch_norm'] else 0.5:>4} | {default['floor_gb']:>5.2f} | "
              f"{functional['peak_gb']:>7.2f} GB {default['peak_gb']:>4.2f} GB {rec['peak_gb']:>6.2f} GB | "
              f"{rec['peak_gb'] / default['peak_gb'] - 1:>+10.0%} "
              f"{rec['peak_gb'] / functional['peak_gb'] - 1:>+9.0%} | "
              f"{above_default:>17.2f} GB {above_rec:>6.2f} GB {above_rec / above_default - 1:>+6.0%} | "
              f"{default['train_images_s']:>13.2f} {rec['train_images_s']:>9.2f} "
              f"{rec['train_images_s'] / default['train_images_s']:>4.2f}x")


if __name__ == "__main__":
    main()
