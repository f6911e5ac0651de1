"""Planned against fixed settings: test Dice of `train --auto` and of the defaults, and the memory budget.

For each regime this trains twice, each run in its own process:

    defaults  `unetpp-tf train --data DIR` with no size flags: the recipe of
              `unetpp_tf.config.IMAGE_RECIPE` (96x96 resize, depth 4, 16 filters, batch 8,
              10 epochs, at least 200 steps, --normalize dataset)
    planned   `unetpp-tf train --data DIR --auto --memory-budget GB`, here its Python
              equivalent: `planning.planned_config(config, given, GB)` then `unetpp_tf.train`

and prints the test Dice of both, the difference, PASS when the plan is at most 0.01 worse,
and the plan's budget against the peak resident memory of the planned training process
(`ru_maxrss` read in that process when `train` returns; PASS when peak <= budget).

Regimes (the data of `benchmarks/accuracy.py` and a pet-shaped set):

    base        135 64x64 8-bit PNG tiles (`small_data.py`)
    32-tiles    32 tiles
    16-bit      135 16-bit TIFF tiles of a 12-bit camera
    multiclass  the built-in synthetic set, --task multiclass (its own test split)
    pets        Oxford-IIIT Pet-shaped: RGB images of varied sizes around 500x375, a 3-class
                trimap (background, pet, border) of one blob "pet" per image, rendered here

Binary tiles and pets are scored on a separate test folder predicted at native size
(`predict_files`), Dice pooled over its images (pets: the mean over the pet and border
classes); multiclass on the run's own test split (metrics.json). Both arms export nothing
(`export_saved_model=False`, `export_tflite=False`): the export does not change Dice.

Usage:
    python benchmarks/planning.py                                # all regimes, seed 0
    python benchmarks/planning.py --regimes base,pets --seeds 2 --memory-budget 2.5
    python benchmarks/planning.py --epochs 4                     # both arms with 4 epochs
    python benchmarks/planning.py --regimes pets --memory-budget 1.3   # a budget the plan must step down for
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_data  # noqa: E402  (the helper next to this script)
from isolated import answer_single, run_isolated  # noqa: E402

REGIMES = ("base", "32-tiles", "16-bit", "multiclass", "pets")
TOLERANCE = 0.01


# ----------------------------------------------------------------------------- pet-shaped data


def render_pet(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image with a blob "pet" and its trimap: 0 background, 1 pet, 2 border (a ring at its edge)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    background = np.stack([small_data.unit_range(small_data.smooth_noise(rng, (height, width), s))
                           for s in (40.0, 60.0, 80.0)], axis=-1)
    background = 0.25 + 0.5 * background * rng.uniform(0.5, 1.0, 3)
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    a, b = rng.uniform(0.2, 0.38) * height, rng.uniform(0.2, 0.38) * width
    theta = np.arctan2((yy - cy) / a, (xx - cx) / b)
    wobble = 1.0 + sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    rho = np.hypot((yy - cy) / a, (xx - cx) / b) / wobble
    fur = small_data.smooth_noise(rng, (height, width), 2.0)[..., None]
    colour = rng.uniform(0.1, 0.9, 3)
    pet = np.clip(colour + 0.12 * fur, 0, 1)
    inside = rho <= 1.0
    image = np.where(inside[..., None], pet, background)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    ring = max(2.0, 0.03 * min(height, width))
    scale = min(a, b)
    border = np.abs(rho - 1.0) * scale <= ring / 2
    label = np.where(border, 2, np.where(inside, 1, 0)).astype(np.uint8)
    return np.round(image * 255).astype(np.uint8), label


def make_pets(work, *, count: int = 100, test: int = 30, seed: int = 0) -> dict:
    """Render (or reuse) the pet-shaped train and test folders: {"train": Path, "test": Path}."""
    root = Path(work) / f"pets-{count}-{test}-seed{seed}"
    folders = {split: root / split for split in ("train", "test")}
    if (root / "done").exists():
        return folders
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, number in (("train", count), ("test", test)):
        for sub in ("images", "masks"):
            (folders[split] / sub).mkdir(parents=True, exist_ok=True)
        for k in range(number):
            height, width = int(rng.integers(300, 451)), int(rng.integers(380, 561))
            if rng.random() < 0.3:  # some portrait images, as in the real set
                height, width = width, height
            image, label = render_pet(rng, height, width)
            Image.fromarray(image).save(folders[split] / "images" / f"pet_{k:03d}.jpg", quality=92)
            Image.fromarray(label).save(folders[split] / "masks" / f"pet_{k:03d}.png")
    (root / "done").write_text("ok\n")
    return folders


# ----------------------------------------------------------------------------- one arm (child process)


def pooled_class_dice(predicted: dict, truth: dict, classes) -> float:
    """Mean over `classes` of the Dice pooled over all images."""
    scores = []
    for k in classes:
        overlap = sum(int(np.sum((predicted[n] == k) & (truth[n] == k))) for n in truth)
        total = sum(int(np.sum(predicted[n] == k) + np.sum(truth[n] == k)) for n in truth)
        scores.append(2.0 * overlap / total if total else 1.0)
    return float(np.mean(scores))


def run_arm(spec: dict) -> dict:
    """Train one arm in this process; return Dice, the plan and the peak memory."""
    import unetpp_tf
    from unetpp_tf.config import TrainConfig
    from unetpp_tf.inference import predict_files
    from unetpp_tf.planning import planned_config

    values = dict(name=spec["name"], output_dir=spec["output_dir"], seed=spec["seed"],
                  export_saved_model=False, export_tflite=False)
    if spec["regime"] == "multiclass":
        values.update(data="synthetic", task="multiclass")
    else:
        values["data"] = spec["train"]
    if spec["epochs"]:
        values["epochs"] = spec["epochs"]
    config = TrainConfig.from_dict(values)
    planned, plan_seconds = None, 0.0
    if spec["arm"] == "planned":
        started = time.perf_counter()
        config, planned = planned_config(config, given=set(values), memory_budget_gb=spec["budget"])
        plan_seconds = time.perf_counter() - started
    shutil.rmtree(Path(spec["output_dir"]) / spec["name"], ignore_errors=True)
    started = time.perf_counter()
    run, _ = unetpp_tf.train(config, verbose=0)
    train_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = json.loads((run / "metrics.json").read_text())
    if spec["regime"] == "multiclass":
        dice = float(metrics["test"]["dice"])
    else:
        output = Path(spec["output_dir"]) / f"{spec['name']}-predictions"
        shutil.rmtree(output, ignore_errors=True)
        test = Path(spec["test"])
        predict_files(run / "model.keras", [test / "images"], output)
        truth = {p.stem: np.asarray(Image.open(p)) for p in sorted((test / "masks").glob("*.png"))}
        predicted = {p.stem: np.asarray(Image.open(p)) for p in sorted(output.glob("*.png"))}
        if spec["regime"] == "pets":
            dice = pooled_class_dice(predicted, truth, (1, 2))
        else:
            dice = pooled_class_dice({k: v > 127 for k, v in predicted.items()},
                                     {k: v > 127 for k, v in truth.items()}, (True,))
    return dict(dice=dice, peak_gb=peak / 2**30, train_seconds=train_seconds, plan_seconds=plan_seconds,
                plan=planned.to_dict() if planned else None, config=config.to_dict(),
                steps=metrics.get("schedule", {}).get("total_steps"))


# ----------------------------------------------------------------------------- the table


def data_for(regime: str, work: Path) -> dict:
    if regime == "multiclass":
        return {}
    if regime == "pets":
        folders = make_pets(work / "data")
    else:
        tiles = 32 if regime == "32-tiles" else 135
        folders = small_data.make_dataset(work / "data", tiles=tiles, bits=16 if regime == "16-bit" else 8)
    return {split: str(path) for split, path in folders.items()}


def describe(config: dict) -> str:
    size = config["crop_size"] or config["image_size"]
    return (f"{'x'.join(map(str, size))} d{config['depth']} f{config['filters']} b{config['batch_size']} "
            f"{config['normalize']} e{config['epochs']} min{config['min_steps']}"
            + (" rc" if config["recompute"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated: {', '.join(REGIMES)}")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="training seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--memory-budget", type=float, default=2.5, help="GB, for the planned arm")
    parser.add_argument("--epochs", type=int, help="epochs of both arms (default: each arm's own, 10)")
    parser.add_argument("--work", default="saved_models/planning", help="data cache and runs")
    parser.add_argument("--json", help="write the results to this JSON file (after every run)")
    args = answer_single(parser, run_arm)
    if args is None:
        return
    work = Path(args.work)
    rows = []
    for regime in [r.strip() for r in args.regimes.split(",") if r.strip()]:
        if regime not in REGIMES:
            parser.error(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
        folders = data_for(regime, work)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            result = dict(regime=regime, seed=seed)
            for arm in ("defaults", "planned"):
                spec = dict(regime=regime, arm=arm, seed=seed, epochs=args.epochs, budget=args.memory_budget,
                            name=f"{regime}-{arm}-seed{seed}", output_dir=str(work / "runs"), **folders)
                started = time.perf_counter()
                try:
                    result[arm] = run_isolated(__file__, spec)
                except RuntimeError as error:
                    result[arm] = dict(error=str(error)[-1500:])
                result[arm]["wall_seconds"] = time.perf_counter() - started
                print(f"{regime} seed {seed} {arm}: " + json.dumps(
                    {k: v for k, v in result[arm].items() if k not in ("plan", "config")}), flush=True)
            rows.append(result)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(budget_gb=args.memory_budget, epochs=args.epochs,
                                                           rows=rows), indent=2) + "\n")
    print_table(rows, args)


def print_table(rows: list, args) -> None:
    print(f"\nmemory budget {args.memory_budget:g} GB; epochs: "
          + (f"{args.epochs} for both arms" if args.epochs else "each arm's own (10 for both)") + "\n")
    header = (f"{'regime':<10} {'seed':>4} {'defaults':>8} {'planned':>8} {'diff':>7} {'Dice':>4} | "
              f"{'plan peak':>9} {'run peak':>8} {'mem':>4} | {'fit s def/plan':>14} | planned settings")
    print(header)
    print("-" * len(header))
    for r in rows:
        d, p = r["defaults"], r["planned"]
        if "dice" not in d or "dice" not in p:
            print(f"{r['regime']:<10} {r['seed']:>4} failed: {d.get('error', '')[-200:]} {p.get('error', '')[-200:]}")
            continue
        diff = p["dice"] - d["dice"]
        budget = p["plan"]["memory"]["budget_gb"]
        print(f"{r['regime']:<10} {r['seed']:>4} {d['dice']:>8.4f} {p['dice']:>8.4f} {diff:>+7.4f} "
              f"{'PASS' if diff >= -TOLERANCE else 'FAIL':>4} | {p['plan']['memory']['peak_gb']:>6.2f} GB "
              f"{p['peak_gb']:>5.2f} GB {'PASS' if p['peak_gb'] <= budget else 'FAIL':>4} | "
              f"{d['train_seconds']:>6.0f}/{p['train_seconds']:<6.0f} | {describe(p['config'])}")


if __name__ == "__main__":
    main()
