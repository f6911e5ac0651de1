"""UNet++ training and prediction throughput against the CPU's measured ceiling.

For the paper-width UNet++ (filters 32..512, 9.04M parameters) in three variants (the
official configuration: no BatchNorm, dropout 0.5; no BatchNorm and no dropout; BatchNorm
and no dropout, the library default and the peers' setup), at 96x96 batch 16 and 256x256
batch 4, in float32 and mixed bfloat16, this prints one table: training and prediction
images/s, FLOPs per image counted from the graph, the effective GFLOP/s (training = 3x
forward) and its fraction of a ceiling measured in the same run (the best of a large
matmul and a 3x3 convolution), and the peak resident memory of each configuration. Each
configuration runs in its own process so its peak memory is its own.

Usage:
    python benchmarks/model_throughput.py                   # the full table, XLA off (~12 min)
    python benchmarks/model_throughput.py --quick           # 16 filters, fewer steps
    python benchmarks/model_throughput.py --only 96 --precision float32 --variant bn --jit both
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from isolated import answer_single, run_isolated  # benchmarks/isolated.py

CONFIGS = [  # (size, batch)
    (96, 16),
    (256, 4),
]
VARIANTS = {  # name: (batch_norm, dropout)
    "paper": (False, 0.5),
    "no-bn": (False, 0.0),
    "bn": (True, 0.0),
}


def ceiling(dtype: str, repeats: int = 20) -> dict:
    """GFLOP/s of a 2048^3 matmul and of a 3x3 convolution in `dtype`, median of `repeats`.

    The larger of the two is the practical peak of this CPU. It is a median, as the model's
    step times are, so that both sides of the ratio see the machine alike.
    """
    import tensorflow as tf

    a = tf.cast(tf.random.normal((2048, 2048)), dtype)
    x = tf.cast(tf.random.normal((16, 96, 96, 128)), dtype)
    w = tf.cast(tf.random.normal((3, 3, 128, 128)), dtype)
    kernels = {
        "matmul": (tf.function(lambda: tf.matmul(a, a)), 2 * 2048**3),
        "conv3x3": (tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME")), 2 * 16 * 96 * 96 * 128 * 128 * 9),
    }
    rates = {}
    for name, (kernel, flops) in kernels.items():
        kernel().numpy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel().numpy()
            times.append(time.perf_counter() - start)
        rates[name] = flops / float(np.median(times)) / 1e9
    return rates


def measure(spec: dict) -> dict:
    """Run one configuration in this process and return its figures."""
    import keras

    import unetpp_tf
    from unetpp_tf.models import count_flops

    if spec["precision"] == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    size, batch, filters = spec["size"], spec["batch"], spec["filters"]
    widths = tuple(filters * 2**i for i in range(5))
    model = unetpp_tf.from_preset(
        "paper", input_shape=(size, size, 1), filters=widths, batch_norm=spec["batch_norm"],
        dropout=spec["dropout"],
    )
    model.compile(
        keras.optimizers.Adam(1e-4), loss=unetpp_tf.losses.BCEDiceLoss(), jit_compile=spec["jit"]
    )
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.int32)

    def timed(fn, steps):
        fn()
        fn()  # trace, compile, warm up
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples))

    train = timed(lambda: model.train_on_batch(images, masks), spec["steps"])
    predict = timed(lambda: model.predict_on_batch(images), spec["steps"])
    flops = count_flops(model)
    return {
        **spec,
        "params": model.count_params(),
        "gflops_per_image": flops / 1e9,
        "train_images_s": batch / train,
        "predict_images_s": batch / predict,
        "train_gflops_s": 3 * flops * batch / train / 1e9,
        "predict_gflops_s": flops * batch / predict / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 filters and 3 steps: a smoke run")
    parser.add_argument("--only", type=int, choices=[size for size, _ in CONFIGS], help="one input size")
    parser.add_argument("--precision", choices=("float32", "bfloat16", "both"), default="both")
    parser.add_argument("--variant", choices=(*VARIANTS, "all"), default="all",
                        help="paper: no BN, dropout 0.5; no-bn: no BN, no dropout; bn: BN, no dropout")
    parser.add_argument("--jit", choices=("on", "off", "both"), default="off", help="XLA compilation")
    parser.add_argument("--steps", type=int, default=5)
    args = answer_single(parser, measure)
    if args is None:
        return

    filters, steps = (16, 3) if args.quick else (32, args.steps)
    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    jits = [True, False] if args.jit == "both" else [args.jit == "on"]
    kernels = {p: ceiling(p) for p in precisions}
    peaks = {p: max(rates.values()) for p, rates in kernels.items()}
    rows = []
    for size, batch in CONFIGS:
        if args.only and size != args.only:
            continue
        for precision in precisions:
            for variant in variants:
                batch_norm, dropout = VARIANTS[variant]
                for jit in jits:
                    spec = dict(size=size, batch=batch, filters=filters, precision=precision, variant=variant,
                                batch_norm=batch_norm, dropout=dropout, jit=jit, steps=steps)
                    rows.append(run_isolated(__file__, spec))

    for p, rates in kernels.items():
        print(f"ceiling {p}: {peaks[p]:.0f} GFLOP/s (median of 20: 2048^3 matmul {rates['matmul']:.0f}, "
              f"3x3 conv 16x96x96x128->128 {rates['conv3x3']:.0f})")
    print(f"model: UNet++ filters {tuple(filters * 2**i for i in range(5))}, {rows[0]['params']:,} params "
          f"({rows[0]['variant']} variant); training GFLOP/s = 3 x forward FLOPs x images/s\n")
    header = (f"{'size':>7} {'batch':>5} {'dtype':>8} {'variant':>7} {'XLA':>3} {'GFLOP/img':>9} "
              f"{'train img/s':>11} {'train %':>7} {'pred img/s':>10} {'pred %':>6} {'peak GB':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = peaks[r["precision"]]
        print(f"{r['size']:>4}^2 {r['batch']:>5} {r['precision'][:8]:>8} {r['variant']:>7} "
              f"{'on' if r['jit'] else 'off':>3} {r['gflops_per_image']:>9.2f} "
              f"{r['train_images_s']:>11.2f} {100 * r['train_gflops_s'] / peak:>6.0f}% "
              f"{r['predict_images_s']:>10.2f} {100 * r['predict_gflops_s'] / peak:>5.0f}% {r['peak_rss_gb']:>7.2f}")
    by_key = {(r["size"], r["precision"], r["variant"], r["jit"]): r for r in rows}
    print()
    for (size, precision, variant, jit), r in by_key.items():
        if precision == "bfloat16" and (size, "float32", variant, jit) in by_key:
            base = by_key[(size, "float32", variant, jit)]
            print(f"bf16 / fp32 training speed-up at {size}^2, {variant}, XLA {'on' if jit else 'off'}: "
                  f"{r['train_images_s'] / base['train_images_s']:.2f}x (target >= 1.5x)")
        if jit and (size, precision, variant, False) in by_key:
            base = by_key[(size, precision, variant, False)]
            print(f"XLA on / off training speed at {size}^2 {precision}, {variant}: "
                  f"{r['train_images_s'] / base['train_images_s']:.2f}x")


if __name__ == "__main__":
    main()
