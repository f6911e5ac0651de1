"""U-Net vs UNet++ vs DeepLabV3+ on the same data and budget: accuracy, size, FLOPs and speed.

The seed tutorial's comparison, measured the way a user would run it: every row is one
`unetpp-tf train` process on the built-in synthetic set with the default recipe (same data,
split, epochs, optimizer and seed), differing only in the model flags:

    U-Net              --arch unet
    UNet++             (the defaults)
    U-Net + ENC        --arch unet --encoder ENC
    UNet++ + ENC       --encoder ENC
    DeepLabV3+ + ENC   --arch deeplabv3plus --encoder ENC

Encoders start from random weights (`--encoder-weights` unset): this compares architectures on
one budget, not ImageNet transfer, and runs with no download. For each row it prints the test
Dice from the run's metrics.json (mean +- std over seeds), parameters, forward GFLOPs per
256x256 image, training images/s (timed `fit` steps at 96x96, batch 8, after a warm-up) and
prediction images/s (batch 8 at 96x96) and batch-1 latency at 256x256, all measured on the
trained model in a fresh process per row so rows do not share a warmed-up runtime.

Usage:
    python benchmarks/three_way.py                      # 5 rows, 1 seed, encoder resnet50 (~25 min on 2 cores)
    python benchmarks/three_way.py --encoder mobilenetv2 --seeds 3
    python benchmarks/three_way.py --quick              # 2 epochs: a smoke run, meaningless numbers
    python benchmarks/three_way.py --work DIR --reuse   # the runs already in DIR: speed measured again
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolated import answer_single, run_isolated  # benchmarks/isolated.py

CLI = [sys.executable, "-m", "unetpp_tf"]


def rows(encoder: str) -> dict:
    return {
        "U-Net": ["--arch", "unet"],
        "UNet++": [],
        f"U-Net + {encoder}": ["--arch", "unet", "--encoder", encoder],
        f"UNet++ + {encoder}": ["--encoder", encoder],
        f"DeepLabV3+ + {encoder}": ["--arch", "deeplabv3plus", "--encoder", encoder],
    }


def train(flags: list, name: str, seed: int, args: argparse.Namespace) -> dict:
    """One `unetpp-tf train` process; the run's test Dice and fit time from its metrics.json."""
    runs = args.work / "runs"
    if args.reuse and (runs / name / "metrics.json").exists():  # measured before: only the speed is measured again
        metrics = json.loads((runs / name / "metrics.json").read_text())
        return dict(run=str(runs / name), dice=metrics["test"]["dice"], train_seconds=metrics["train_seconds"],
                    wall_seconds=None)
    shutil.rmtree(runs / name, ignore_errors=True)
    command = [*CLI, "train", *flags, "--seed", str(seed), "--name", name, "--output-dir", str(runs), "--quiet"]
    if args.quick:
        command += ["--epochs", "2"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((runs / name / "metrics.json").read_text())
    return dict(run=str(runs / name), dice=metrics["test"]["dice"], train_seconds=metrics["train_seconds"],
                wall_seconds=time.perf_counter() - started)


def measure(spec: dict) -> dict:
    """In a fresh process: size, FLOPs and speed of the trained model at `spec["model"]`."""
    import keras
    import numpy as np

    from unetpp_tf.models import count_flops

    model = keras.models.load_model(spec["model"])
    channels = model.input_shape[-1]
    flops = count_flops(model, (256, 256, channels))

    def rate(call, repeats: int) -> float:  # median seconds of `call` after one warm-up call
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    rng = np.random.default_rng(0)
    batch = rng.random((8, 96, 96, channels), dtype=np.float32)
    single = rng.random((1, 256, 256, channels), dtype=np.float32)
    predict_seconds = rate(lambda: model.predict_on_batch(batch), spec["repeats"])
    latency = rate(lambda: model.predict_on_batch(single), spec["repeats"])

    target = (rng.random((8, 96, 96, 1)) > 0.5).astype("float32")
    outputs = len(model.outputs)
    model.compile(optimizer="adam", loss=["binary_crossentropy"] * outputs if outputs > 1 else "binary_crossentropy")
    steps = spec["train_steps"]
    dataset = [(batch, [target] * outputs if outputs > 1 else target)]
    model.fit(batch, [target] * outputs if outputs > 1 else target, epochs=1, verbose=0)  # warm-up and tracing
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*dataset[0])
    train_seconds = (time.perf_counter() - started) / steps
    return dict(params=model.count_params(), gflops_256=flops / 1e9, train_ips=8 / train_seconds,
                predict_ips=8 / predict_seconds, latency_256_ms=1000 * latency)


def parse_args() -> argparse.Namespace | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet50", help="encoder of the encoder rows (default resnet50)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 epochs per run: checks the script, not the models")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the finished runs found in --work (their Dice and fit time) and measure speed again")
    return answer_single(parser, measure)


def main() -> None:
    args = parse_args()
    if args is None:
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="three_way_"))
    results = {}
    for label, flags in rows(args.encoder).items():
        runs = []
        for seed in range(args.seeds):
            name = "".join(c if c.isalnum() else "-" for c in label).strip("-").lower() + f"-seed{seed}"
            runs.append(train(flags, name, seed, args))
            print(f"  {label} seed {seed}: Dice {runs[-1]['dice']:.4f}, fit {runs[-1]['train_seconds']:.0f} s",
                  flush=True)
        speed = run_isolated(__file__, dict(model=str(Path(runs[0]["run"]) / "model.keras"), repeats=10,
                                            train_steps=10))
        dice = [r["dice"] for r in runs]
        results[label] = dict(flags=flags, runs=runs, dice=statistics.mean(dice),
                              dice_std=statistics.stdev(dice) if len(dice) > 1 else 0.0,
                              fit_seconds=statistics.mean(r["train_seconds"] for r in runs), **speed)
    print("\n| model | test Dice | parameters | GFLOPs @256x256 | fit s | train img/s @96 | predict img/s @96 "
          "| latency @256 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['dice']:.3f} +- {r['dice_std']:.3f} | {r['params'] / 1e6:.2f}M | {r['gflops_256']:.1f} "
              f"| {r['fit_seconds']:.0f} | {r['train_ips']:.0f} | {r['predict_ips']:.0f} | {r['latency_256_ms']:.0f} |")
    base = results["UNet++"]
    print("\nratios to UNet++: " + ", ".join(
        f"{label}: Dice {r['dice'] - base['dice']:+.3f}, params x{r['params'] / base['params']:.2f}, "
        f"FLOPs x{r['gflops_256'] / base['gflops_256']:.2f}, train speed x{r['train_ips'] / base['train_ips']:.2f}"
        for label, r in results.items() if label != "UNet++"))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(encoder=args.encoder, seeds=args.seeds, rows=results), indent=2))


if __name__ == "__main__":
    main()
