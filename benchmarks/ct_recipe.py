"""The scan recipes from the command line's defaults: lung and nodule Dice of the 2.5D and 3D routes.

Each configuration runs `unetpp-tf train --data synthetic-ct --volume-mode MODE` as a user would
(defaults plus the flags given), timed from start to finish (data writing, training, scoring
and export included), then scores the best model on held-out scans written with another seed
(never seen in training or model selection), whole scan by whole scan, as its run recorded
(spacing, window, patch). Regimes: the route, the number of training scans, seeds, extra flags.

Usage:
    python benchmarks/ct_recipe.py --routes 2.5d 3d --seeds 0 1 --output work/ct
    python benchmarks/ct_recipe.py --routes 3d --scans 8 16 --flags "--epochs 24" --output work/ct
    python benchmarks/ct_recipe.py --reuse --output work/ct        # score finished runs again

Prints one row per run and the mean per route; Dice is per scan, averaged over scans.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HOLDOUT_SEED = 1000


def _train(output: Path, name: str, route: str, scans: int, seed: int, flags: list[str], reuse: bool) -> float | None:
    run = output / "runs" / name
    if reuse and (run / "metrics.json").is_file():
        return None
    command = [sys.executable, "-m", "unetpp_tf", "train", "--data", "synthetic-ct", "--volume-mode", route,
               "--num-samples", str(scans), "--seed", str(seed), "--output-dir", str(output / "runs"),
               "--name", name, "--overwrite", "--quiet", *flags]
    env = {**os.environ, "KERAS_HOME": str(output / "keras")}  # the synthetic scans are written there
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    (run / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def _holdout(output: Path, count: int) -> list:
    from unetpp_tf.data import read_scan_pair, scan_pairs, write_synthetic_ct

    root = write_synthetic_ct(output / "holdout", count, seed=HOLDOUT_SEED)
    return [read_scan_pair(image, label) for image, label in scan_pairs(root)]


def _score(run: Path, holdout: list) -> dict:
    import keras

    from unetpp_tf.data import resample
    from unetpp_tf.evaluation import evaluate_volumes

    config = json.loads((run / "config.json").read_text())
    model = keras.models.load_model(run / "model.keras", compile=False)
    scans = [resample(scan, config["spacing"]) if config["spacing"] else scan for scan in holdout]
    window = tuple(config["window"]) if isinstance(config["window"], list) else config["window"]
    patch = dict(patch_size=tuple(config["patch_size"])) if config["volume_mode"] == "3d" else {}
    result = evaluate_volumes(model, scans, window=window, class_names=("lung", "nodule"), **patch)
    return result["metrics"]


def _mm(distance) -> str:
    return "-" if distance is None else f"{distance:.2f}"  # None: nodules missed in every scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", nargs="+", default=["2.5d", "3d"], choices=("2.5d", "3d", "2d"))
    parser.add_argument("--scans", nargs="+", type=int, default=[16], help="synthetic scans (split 70/15/15)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--flags", default="", help="extra train flags, e.g. '--epochs 24'")
    parser.add_argument("--holdout", type=int, default=8, help="held-out scans scored after training")
    parser.add_argument("--output", required=True)
    parser.add_argument("--reuse", action="store_true", help="score finished runs without training again")
    args = parser.parse_args()
    output = Path(args.output)
    flags = shlex.split(args.flags)
    tag = "".join(f.strip("-").replace("-", "")[:6] for f in flags)[:24]
    holdout = _holdout(output, args.holdout)
    print(f"flags: {args.flags or '(defaults)'}; held-out: {len(holdout)} scans (seed {HOLDOUT_SEED})")
    header = (f"{'route':<6}{'scans':>6}{'seed':>5}{'wall s':>8}{'test lung':>10}{'test nod':>9}"
              f"{'lung':>7}{'nodule':>8}{'nod HD95':>9}{'nod ASSD':>9}")
    print(header)
    rows = {}
    for route in args.routes:
        for scans in args.scans:
            for seed in args.seeds:
                name = f"{route}-n{scans}-s{seed}{'-' + tag if tag else ''}"
                _train(output, name, route, scans, seed, flags, args.reuse)
                run = output / "runs" / name
                wall = float((run / "wall_seconds.txt").read_text())
                test = json.loads((run / "metrics.json").read_text())["test"]["per_class"]["dice"]
                held = _score(run, holdout)
                dice = held["per_class"]["dice"]
                hd95, assd = held["per_class"]["hd95"][1], held["per_class"]["assd"][1]
                rows.setdefault(route, []).append((dice[0], dice[1], wall))
                print(f"{route:<6}{scans:>6}{seed:>5}{wall:>8.0f}{test[0]:>10.3f}{test[1]:>9.3f}"
                      f"{dice[0]:>7.3f}{dice[1]:>8.3f}{_mm(hd95):>9}{_mm(assd):>9}", flush=True)
    for route, values in rows.items():
        lung, nodule, wall = np.mean(values, axis=0)
        print(f"mean {route}: held-out lung Dice {lung:.3f}, nodule Dice {nodule:.3f}, wall {wall:.0f} s "
              f"({len(values)} runs)")


if __name__ == "__main__":
    main()
