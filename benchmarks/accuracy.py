"""Small-data accuracy: Dice of the CLI recipe across regimes, seeds and flags (issue 11).

Imitates how the library is judged on a small real fluorescence set: about 135 64x64 tiles
of one image, trained and predicted with the two commands a user types

    unetpp-tf train --data DIR --epochs 40 --batch-size 16 --image-size 64 --depth 3 --filters 16
    unetpp-tf predict --model RUN/model.keras TEST_IMAGES --output OUT

and scored by Dice pooled over the tiles of another region of the image. The tiles come from
`small_data.py` (NumPy-rendered nuclei, not the library's own synthetic generator). Each
row adds flags or changes the data; each (row, seed) is one `unetpp-tf train` process and one
`unetpp-tf predict` process, run one after the other:

    base          135 tiles, 8-bit PNG, the commands above
    96-tiles      96 training tiles
    32-tiles      32 training tiles (22 after the split: where --min-steps stretches the epochs)
    16-bit        16-bit TIFF from a 12-bit camera (dim once divided by 65535)
    augment-none  --augment none
    deep-supervision  --deep-supervision (off by default; what pruning needs)
    unet          --arch unet (the baseline UNet++ must match or beat)
    lr-1e-3       --learning-rate 1e-3
    batch-8       --batch-size 8
    epochs-100    --epochs 100
    multiclass    unetpp-tf train --task multiclass --epochs 10 on the built-in synthetic set;
                  mean and per-class test Dice from the run's metrics.json
    multiclass-ds, multiclass-unet   the same with --deep-supervision, with --arch unet

It prints Dice mean +- std over seeds, the worst seed and the mean training time per row, the
spread of the binary rows, UNet++ against U-Net, the issue's targets with PASS/FAIL, and a
markdown table for the README.

Usage:
    python benchmarks/accuracy.py                        # all rows, 3 seeds: ~1.5 h on 2 idle cores
    python benchmarks/accuracy.py --rows base,unet --seeds 5
    python benchmarks/accuracy.py --extra "--bn-momentum 0.99" --json momentum-0.99.json
    python benchmarks/accuracy.py --quick --rows base,16-bit   # smoke run: 1 seed, 1/4 epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_data  # noqa: E402  (the helper next to this script)

CLI = [sys.executable, "-m", "unetpp_tf"]  # the `unetpp-tf` entry point, in this interpreter
RECIPE = ["--epochs", "40", "--batch-size", "16", "--image-size", "64", "--depth", "3", "--filters", "16"]
MULTICLASS = ["--task", "multiclass", "--epochs", "10"]
TARGETS = dict(binary=0.90, spread=0.03, multiclass=0.85, foreground_class=0.75)


@dataclasses.dataclass(frozen=True)
class Row:
    """One regime: flags added to the train command, and the data it trains on."""

    name: str
    flags: tuple = ()
    tiles: int = 135
    bits: int = 8
    multiclass: bool = False


ROWS = {
    row.name: row
    for row in (
        Row("base"),
        Row("96-tiles", tiles=96),
        Row("32-tiles", tiles=32),
        Row("16-bit", bits=16),
        Row("augment-none", ("--augment", "none")),
        Row("deep-supervision", ("--deep-supervision",)),
        Row("unet", ("--arch", "unet")),
        Row("lr-1e-3", ("--learning-rate", "1e-3")),
        Row("batch-8", ("--batch-size", "8")),
        Row("epochs-100", ("--epochs", "100")),
        Row("multiclass", multiclass=True),
        Row("multiclass-ds", ("--deep-supervision",), multiclass=True),
        Row("multiclass-unet", ("--arch", "unet"), multiclass=True),
    )
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, help="training seeds per row (default 3; 1 with --quick)")
    parser.add_argument("--extra", default="", help='flags appended to every train command, e.g. "--bn-momentum 0.99"')
    parser.add_argument("--work", default="saved_models/accuracy", help="data cache, runs and predictions")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the rendered image (scene and noise)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a quarter of the epochs")
    parser.add_argument("--json", help="write the results to this JSON file (after every run)")
    args = parser.parse_args()
    args.rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.work = Path(args.work)
    return args


# ----------------------------------------------------------------------------- one run


def last_epochs(flags: list) -> int:
    """The value of the last --epochs in `flags` (argparse keeps the last one)."""
    return int([flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--epochs"][-1])


def train_flags(row: Row, args: argparse.Namespace) -> list:
    """The flags of the row's train command, without data, name and seed."""
    flags = [*(MULTICLASS if row.multiclass else RECIPE), *row.flags, *shlex.split(args.extra)]
    if args.quick:
        flags += ["--epochs", str(max(1, last_epochs(flags) // 4))]
    return flags


def cli(*arguments) -> float:
    """Run `unetpp-tf ARGUMENTS`; return its wall time, or raise with the end of its stderr."""
    started = time.perf_counter()
    result = subprocess.run([*CLI, *map(str, arguments)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"unetpp-tf {shlex.join(map(str, arguments))} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def train(row: Row, seed: int, data: list, args: argparse.Namespace) -> Path:
    """Train one (row, seed) in its own process; return the run directory.

    A previous run of the same name is deleted first rather than passed --overwrite, which
    keeps the old best.json and so can skip saving the new model.
    """
    name = f"{row.name}-seed{seed}"
    runs = args.work / "runs"
    shutil.rmtree(runs / name, ignore_errors=True)
    cli("train", *data, *train_flags(row, args), "--seed", seed, "--name", name, "--output-dir", runs, "--quiet")
    return runs / name


def run_binary(row: Row, seed: int, folders: dict, args: argparse.Namespace) -> dict:
    """Train on the training tiles, predict the test tiles with the CLI, pool the Dice."""
    run = train(row, seed, ["--data", folders["train"]], args)
    output = args.work / "predictions" / run.name
    shutil.rmtree(output, ignore_errors=True)
    predict_seconds = cli("predict", "--model", run / "model.keras", folders["test"] / "images", "--output", output)
    dice = small_data.pooled_dice(small_data.read_masks(output), small_data.read_masks(folders["test"] / "masks"))
    return dict(dice=dice, predict_seconds=predict_seconds, **run_record(run))


def run_multiclass(row: Row, seed: int, folders: dict, args: argparse.Namespace) -> dict:
    """Train on the built-in multi-class set; the run's own test metrics (mean over classes)."""
    run = train(row, seed, [], args)
    record = run_record(run)
    return dict(dice=record["test"]["dice"], class_dice=record["test"]["per_class"]["dice"], **record)


def run_record(run: Path) -> dict:
    """What the run wrote to metrics.json that the table uses (its own test split, timings)."""
    metrics = json.loads((run / "metrics.json").read_text())
    return dict(run=str(run), test=metrics["test"], train_seconds=metrics["train_seconds"],
                epochs=metrics["epochs"], best_val_dice=metrics["best_val_dice"])


def measure_row(row: Row, args: argparse.Namespace) -> dict:
    """All seeds of one row; a failed seed is recorded with its error and the row goes on."""
    folders = None
    if not row.multiclass:
        folders = small_data.make_dataset(args.work / "data", tiles=row.tiles, bits=row.bits, seed=args.data_seed)
    measure = run_multiclass if row.multiclass else run_binary
    runs = []
    for seed in range(args.seeds):
        started = time.perf_counter()
        try:
            result = measure(row, seed, folders, args)
        except (RuntimeError, ValueError, OSError, KeyError) as error:
            result = dict(dice=None, error=str(error))
        result.update(seed=seed, wall_seconds=time.perf_counter() - started)
        runs.append(result)
        print(f"  {row.name} seed {seed}: " + (f"Dice {result['dice']:.4f}, train {result['train_seconds']:.0f} s, "
              f"wall {result['wall_seconds']:.0f} s" if result["dice"] is not None else result["error"]), flush=True)
    return dict(row=dataclasses.asdict(row), flags=train_flags(row, args), runs=runs, **statistics(runs),
                otsu=None if folders is None else small_data.otsu_dice(folders["test"]))


def statistics(runs: list) -> dict:
    """Mean, std (over seeds), worst seed and mean times of the successful runs."""
    done = [r for r in runs if r["dice"] is not None]
    dice = np.array([r["dice"] for r in done])
    stats = dict(mean=None, std=None, min=None, train_seconds=None, wall_seconds=None, failed=len(runs) - len(done))
    if done:
        stats.update(mean=float(dice.mean()), std=float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
                     min=float(dice.min()), **{k: float(np.mean([r[k] for r in done]))
                                               for k in ("train_seconds", "wall_seconds")})
    if done and "class_dice" in done[0]:
        stats["class_dice"] = np.mean([r["class_dice"] for r in done], axis=0).tolist()
    return stats


# ----------------------------------------------------------------------------- report


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def describe(result: dict) -> str:
    """What the row changes, in words for the tables."""
    row = result["row"]
    if row["multiclass"]:
        return "built-in synthetic, " + " ".join([*MULTICLASS, *row["flags"]])
    data = [f"{row['tiles']} tiles", "16-bit TIFF" if row["bits"] == 16 else "8-bit PNG"]
    return ", ".join(data + [" ".join(row["flags"])] if row["flags"] else data)


def print_rows(results: dict, args: argparse.Namespace) -> None:
    print(f"\n{args.seeds} seed(s){', quick' if args.quick else ''}"
          + (f", extra flags: {args.extra}" if args.extra else "") + "\n")
    print("train s: fit time from metrics.json; wall s: the train and predict processes, start to end;")
    print("Otsu: Dice of one global Otsu threshold on the test tiles (how hard the data is)\n")
    print(f"{'row':<14} {'Dice mean':>9} {'± std':>7} {'min':>7} {'train s':>8} {'wall s':>7}  {'Otsu':<5}  what")
    for name, r in results.items():
        failed = f"  ({r['failed']} failed)" if r["failed"] else ""
        print(f"{name:<14} {fmt(r['mean']):>9} {fmt(r['std']):>7} {fmt(r['min']):>7} {fmt(r['train_seconds'], 0):>8}"
              f" {fmt(r['wall_seconds'], 0):>7}  {fmt(r['otsu']):<5}  {describe(r)}{failed}")
        if r.get("class_dice"):
            print(f"{'':<14} per class: " + ", ".join(f"{c} {d:.3f}" for c, d in enumerate(r["class_dice"])))


def target_checks(results: dict) -> list:
    """(target, measured, PASS/FAIL/n/a) for the issue's targets that these rows can judge."""
    binary = {n: r["mean"] for n, r in results.items() if not r["row"]["multiclass"] and r["mean"] is not None}
    checks = []
    if binary:
        worst = min(binary, key=binary.get)
        spread = max(binary.values()) - min(binary.values())
        checks.append((f"no binary row below {TARGETS['binary']}", f"lowest {worst} {binary[worst]:.3f}",
                       binary[worst] >= TARGETS["binary"]))
        checks.append((f"spread across rows <= {TARGETS['spread']}", f"{spread:.3f} over {len(binary)} rows",
                       spread <= TARGETS["spread"] if len(binary) > 1 else None))
    if "base" in binary and "unet" in binary:
        checks.append(("UNet++ (base) >= U-Net", f"{binary['base']:.3f} vs {binary['unet']:.3f}",
                       binary["base"] >= binary["unet"]))
    multi = results.get("multiclass")
    if multi and multi["mean"] is not None:
        foreground = multi["class_dice"][1:]
        checks.append((f"multi-class mean >= {TARGETS['multiclass']}", f"{multi['mean']:.3f}",
                       multi["mean"] >= TARGETS["multiclass"]))
        checks.append((f"no foreground class below {TARGETS['foreground_class']}", f"lowest {min(foreground):.3f}",
                       min(foreground) >= TARGETS["foreground_class"]))
    if multi and results.get("multiclass-unet", {}).get("mean") is not None:
        unet = results["multiclass-unet"]["mean"]
        checks.append(("UNet++ (multiclass) >= U-Net", f"{multi['mean']:.3f} vs {unet:.3f}", multi["mean"] >= unet))
    return checks


def print_summary(results: dict) -> None:
    if "base" in results and "unet" in results:
        base, unet = results["base"], results["unet"]
        print(f"\nUNet++ (base) {fmt(base['mean'])} ± {fmt(base['std'])}, min {fmt(base['min'])}   "
              f"U-Net {fmt(unet['mean'])} ± {fmt(unet['std'])}, min {fmt(unet['min'])}")
    print("\ntargets (issue 11):")
    for target, measured, passed in target_checks(results):
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        print(f"  {verdict:<4}  {target:<36} {measured}")


def markdown_table(results: dict, args: argparse.Namespace) -> str:
    header = f"| row | regime | Dice, mean ± std ({args.seeds} seeds) | worst seed | train s |"
    lines = [header, "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {describe(r)} | {fmt(r['mean'])} ± {fmt(r['std'])} | {fmt(r['min'])} | "
                     f"{fmt(r['train_seconds'], 0)} |")
    return "\n".join(lines)


def save(results: dict, args: argparse.Namespace) -> None:
    if args.json:
        settings = dict(seeds=args.seeds, extra=args.extra, quick=args.quick, data_seed=args.data_seed)
        Path(args.json).write_text(json.dumps(dict(settings=settings, rows=results), indent=2) + "\n")


def main() -> None:
    args = parse_args()
    results = {}
    for name in args.rows:
        print(f"{name}: {shlex.join(train_flags(ROWS[name], args))}", flush=True)
        results[name] = measure_row(ROWS[name], args)
        save(results, args)
    print_rows(results, args)
    print_summary(results)
    print("\n" + markdown_table(results, args))


if __name__ == "__main__":
    main()
