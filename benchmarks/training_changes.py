"""The effect of each training speed change, measured side by side in one process.

For the paper-width UNet++ at 96x96 batch 16 (float32, XLA off), in the three variants of
`model_throughput.py` (paper: no BatchNorm, dropout 0.5; no-bn; bn), this trains three
builds with identical weights and data, alternating their steps so machine load hits all
alike, and prints images/s and the ratio to the first:

- keras:  Keras' BatchNormalization and Dropout, plain functional graph (the starting point);
- fused:  the fused BatchNorm and one-pass dropout of `unetpp_tf.models.layers`;
- nested: fused layers and the concatenation-free training call of `NestedModel` (the default).

Usage:
    python benchmarks/training_changes.py              # ~4 min on 2 cores
    python benchmarks/training_changes.py --variant bn --rounds 8
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np

import unetpp_tf
from unetpp_tf.models import blocks

VARIANTS = {"paper": (False, 0.5), "no-bn": (False, 0.0), "bn": (True, 0.0)}
BUILDS = ("keras", "fused", "nested")


def build(kind: str, batch_norm: bool, dropout: float, size: int) -> keras.Model:
    """The paper-width model as `kind` builds it, with the weights of seed 0."""
    fused_layers = (blocks.FusedBatchNormalization, blocks.FusedDropout)
    if kind == "keras":  # conv_block looks these names up when it runs
        blocks.FusedBatchNormalization, blocks.FusedDropout = keras.layers.BatchNormalization, keras.layers.Dropout
    try:
        keras.utils.set_random_seed(0)
        model = unetpp_tf.from_preset("paper", input_shape=(size, size, 1), batch_norm=batch_norm, dropout=dropout)
    finally:
        blocks.FusedBatchNormalization, blocks.FusedDropout = fused_layers
    if kind != "nested":
        model = keras.Model(model._inputs_struct, model._outputs_struct, name=model.name)
    model.compile(keras.optimizers.Adam(1e-4), loss=unetpp_tf.losses.BCEDiceLoss(), jit_compile=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=(*VARIANTS, "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per build")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, args.size, args.size, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.int32)
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    print(f"paper-width UNet++, {args.size}x{args.size} batch {args.batch}, float32, XLA off; "
          f"median of {args.rounds} alternating steps\n")
    print(f"{'variant':>7} " + " ".join(f"{kind + ' img/s':>13}" for kind in BUILDS) + "   fused/keras  nested/keras")
    for variant in variants:
        batch_norm, dropout = VARIANTS[variant]
        models = {kind: build(kind, batch_norm, dropout, args.size) for kind in BUILDS}
        for model in models.values():
            for _ in range(2):  # trace and warm up
                model.train_on_batch(images, masks)
        times = {kind: [] for kind in BUILDS}
        for _ in range(args.rounds):
            for kind, model in models.items():
                start = time.perf_counter()
                model.train_on_batch(images, masks)
                times[kind].append(time.perf_counter() - start)
        speed = {kind: args.batch / float(np.median(t)) for kind, t in times.items()}
        print(f"{variant:>7} " + " ".join(f"{speed[kind]:>13.2f}" for kind in BUILDS)
              + f"   {speed['fused'] / speed['keras']:>10.2f}x  {speed['nested'] / speed['keras']:>11.2f}x")
        del models


if __name__ == "__main__":
    main()
