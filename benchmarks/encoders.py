"""UNet++ over each pretrained encoder: parameters, FLOPs at 256x256 and CPU inference speed.

For every encoder (the `unetpp_tf.models.ENCODERS` rows, or those named with --encoders), one
fresh process builds `build_unetpp((256, 256, 3), encoder=NAME, filters=F)` with random
weights (speed and size do not depend on them) and measures:

    parameters   the whole model, and the encoder's share (`encoder_layers`)
    GFLOPs       forward FLOPs of one 256x256 image (`count_flops`: a multiply-add is 2)
    latency      median batch-1 `predict_on_batch` time at 256x256 over --repeats calls
    images/s     batch 8 at 256x256

The plain UNet++ (our own encoder, same decoder width) is the first row for reference. The
output is a markdown table (the README's encoder table).

Usage:
    python benchmarks/encoders.py                       # a representative row per family (~5 min)
    python benchmarks/encoders.py --all                 # every row (~20 min; the largest are slow)
    python benchmarks/encoders.py --encoders resnet50,mobilenetv3large --filters 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from isolated import answer_single, run_isolated  # benchmarks/isolated.py

REPRESENTATIVE = (
    "resnet50", "resnet50v2", "efficientnetb0", "efficientnetb3", "efficientnetv2b0", "efficientnetv2s",
    "mobilenetv2", "mobilenetv3small", "mobilenetv3large", "convnexttiny", "densenet121", "vgg16",
)


def measure(spec: dict) -> dict:
    """In a fresh process: the size and speed of one UNet++ (encoder None = our own)."""
    import numpy as np

    from unetpp_tf.models import build_unetpp, count_flops, encoder_layers

    model = build_unetpp((256, 256, 3), encoder=spec["encoder"], filters=spec["filters"])
    encoder_params = sum(layer.count_params() for layer in encoder_layers(model))
    rng = np.random.default_rng(0)
    single = rng.random((1, 256, 256, 3), dtype=np.float32)
    batch = rng.random((8, 256, 256, 3), dtype=np.float32)

    def median_seconds(x) -> float:
        model.predict_on_batch(x)  # warm-up: tracing
        times = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            model.predict_on_batch(x)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return dict(params=model.count_params(), encoder_params=encoder_params, gflops=count_flops(model) / 1e9,
                latency_ms=1000 * median_seconds(single), images_per_second=8 / median_seconds(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", help="comma-separated names (default: one or two per family)")
    parser.add_argument("--all", action="store_true", help="every row of ENCODERS")
    parser.add_argument("--filters", type=int, default=16, help="decoder base width (training's default 16)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = answer_single(parser, measure)
    if args is None:
        return
    if args.all:
        from unetpp_tf.models import ENCODERS

        names = list(ENCODERS)
    else:
        names = args.encoders.split(",") if args.encoders else list(REPRESENTATIVE)
    results = {}
    for name in [None, *names]:
        label = name or "(plain UNet++)"
        results[label] = run_isolated(__file__, dict(encoder=name, filters=args.filters, repeats=args.repeats))
        print(f"  {label}: {json.dumps(results[label])}", flush=True)
    print(f"\nUNet++ depth 4, decoder filters {args.filters}, 256x256x3, random weights, batch-1 latency and "
          "batch-8 throughput of predict_on_batch on this CPU:\n")
    print("| encoder | parameters (encoder) | GFLOPs @256 | latency (ms) | images/s |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['params'] / 1e6:.2f}M ({r['encoder_params'] / 1e6:.2f}M) | {r['gflops']:.1f} "
              f"| {r['latency_ms']:.0f} | {r['images_per_second']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(filters=args.filters, rows=results), indent=2))


if __name__ == "__main__":
    main()
