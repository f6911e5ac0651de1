"""The effect of each training speed change, measured side by side in one process.

For the paper-width UNet++ at 96x96 batch 16 (float32, XLA off), in the three variants of
`model_throughput.py` (paper: no BatchNorm, dropout 0.5; no-bn; bn), this trains builds with
identical weights and data, alternating their steps so machine load hits all alike, and
prints images/s (median step) and the speed ratios (median over rounds of the step-time ratio
within a round):

- keras:     Keras' BatchNormalization and Dropout, and each decoder node's Concatenate
             layer feeding a Conv2D (the plain functional graph; the starting point);
- fused:     the fused BatchNorm and one-pass dropout of `unetpp_tf.models.layers`, same graph;
- default:   fused layers and `ConcatConv2D`, whose training call sums convolutions over the
             parts instead of materialising the concatenation (what the builders return);
- recompute: with `--recompute`, the opt-in recomputed training call (less memory, slower;
             `benchmarks/recompute_memory.py` measures its memory).

Usage:
    python benchmarks/training_changes.py              # ~8 min on 2 cores
    python benchmarks/training_changes.py --variant bn --rounds 30
    python benchmarks/training_changes.py --recompute  # and the recomputed training call
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

import unetpp_tf
from unetpp_tf.models import blocks

VARIANTS = {"paper": (False, 0.5), "no-bn": (False, 0.0), "bn": (True, 0.0)}


def concat_then_conv2d(*args, name: str, **kwargs):
    """The graph without ConcatConv2D: a Concatenate layer, then a Conv2D over its output."""
    conv = keras.layers.Conv2D(*args, name=name, **kwargs)
    return lambda parts: conv(keras.layers.Concatenate(name=name.replace("_conv1", "_concat"))(parts))


def build(kind: str, batch_norm: bool, dropout: float, size: int) -> keras.Model:
    """The paper-width model as `kind` builds it, with the weights of seed 0."""
    originals = (blocks.FusedBatchNormalization, blocks.FusedDropout, blocks.ConcatConv2D)
    if kind == "keras":  # conv_block looks these names up when it runs
        blocks.FusedBatchNormalization, blocks.FusedDropout = keras.layers.BatchNormalization, keras.layers.Dropout
    if kind in ("keras", "fused"):
        blocks.ConcatConv2D = concat_then_conv2d
    try:
        keras.utils.set_random_seed(0)
        model = unetpp_tf.from_preset(
            "paper", input_shape=(size, size, 1), batch_norm=batch_norm, dropout=dropout,
            recompute=kind == "recompute",
        )
    finally:
        blocks.FusedBatchNormalization, blocks.FusedDropout, blocks.ConcatConv2D = originals
    model.compile(keras.optimizers.Adam(1e-4), loss=unetpp_tf.losses.BCEDiceLoss(), jit_compile=False)
    return model


def alternate(models: dict, images, masks, rounds: int) -> dict:
    """Seconds per training step of each model, one list entry per round, after two warm-up steps.

    Each round steps every model once, starting with the next model each round, so no build
    always follows the same one.
    """
    for model in models.values():
        for _ in range(2):  # trace and warm up
            model.train_on_batch(images, masks)
    times = {kind: [] for kind in models}
    kinds = list(models)
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            start = time.perf_counter()
            models[kind].train_on_batch(images, masks)
            times[kind].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict, kind: str, reference: str) -> float:
    """Speed of `kind` over `reference`: the median over rounds of their step-time ratio.

    Steps of one round run back to back, so the ratio cancels the slow swings of machine load
    that a ratio of two medians keeps.
    """
    return float(np.median(np.array(times[reference]) / np.array(times[kind])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=(*VARIANTS, "all"), default="all")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per build")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--recompute", action="store_true", help="also time recompute=True")
    args = parser.parse_args()
    builds = ("keras", "fused", "default") + (("recompute",) if args.recompute else ())
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, args.size, args.size, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.int32)
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    print(f"paper-width UNet++, {args.size}x{args.size} batch {args.batch}, float32, XLA off; "
          f"median of {args.rounds} rounds of alternating steps\n")
    ratios = [f"{kind}/keras" for kind in builds[1:]] + ["default/fused"]
    print(f"{'variant':>7} " + " ".join(f"{kind + ' img/s':>15}" for kind in builds)
          + " " + " ".join(f"{r:>16}" for r in ratios))
    for variant in variants:
        batch_norm, dropout = VARIANTS[variant]
        models = {kind: build(kind, batch_norm, dropout, args.size) for kind in builds}
        times = alternate(models, images, masks, args.rounds)
        speed = {kind: args.batch / float(np.median(t)) for kind, t in times.items()}
        values = [paired_ratio(times, kind, "keras") for kind in builds[1:]] + [paired_ratio(times, "default", "fused")]
        print(f"{variant:>7} " + " ".join(f"{speed[kind]:>15.2f}" for kind in builds)
              + " " + " ".join(f"{v:>15.3f}x" for v in values))
        del models


if __name__ == "__main__":
    main()
