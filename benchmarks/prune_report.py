"""The prune report of the default job's model: each pruning level's Dice against its cost.

Trains the default job (`unetpp-tf train`: 512 synthetic 96x96 images, depth 4, filters 16,
10 epochs) with deep supervision, or loads a run given with --run, then:
1. `prune_report` on the run's validation split: Dice, IoU, parameters, FLOPs, batch-1
   latency in Keras and in int8 TFLite and the int8 file size of L1..L4 and the full model
   (mean of the heads); prints the table and writes prune_report.json/.csv/.png;
2. the level `choose_prune_level` picks at --tolerance;
3. exports that level as float32 TFLite (`export_model`, mode "fast") and scores the file on
   the same split with `evaluate`: its Dice matches the report's.

The run, the report files and the export go to a temporary folder (removed unless --keep).

Usage:
    python benchmarks/prune_report.py                       # train the default job (minutes)
    python benchmarks/prune_report.py --run saved_models/ds  # a deep-supervision run
    python benchmarks/prune_report.py --quick               # 64 images, 1 epoch: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import unetpp_tf
from unetpp_tf.config import TrainConfig
from unetpp_tf.evaluation import evaluate
from unetpp_tf.export import export_model
from unetpp_tf.inference import load_model
from unetpp_tf.pruning_report import choose_prune_level, format_prune_report, prune_report, write_prune_report
from unetpp_tf.training import SPLITS_FILE, load_data, read_splits


def run_data(run: Path):
    """The run's data, split as it recorded, without augmentation."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if k in known}
    values.update(augment="none", folds=0)
    splits = read_splits(run) if (run / SPLITS_FILE).is_file() else None
    return load_data(TrainConfig.from_dict(values), splits=splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory of a deep-supervision model (default: train one)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="Dice the chosen level may lose")
    parser.add_argument("--runs", type=int, default=20, help="timed batch-1 runs per level")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="TFLite interpreter threads")
    parser.add_argument("--quick", action="store_true", help="train 64 images for 1 epoch (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="prune_report_"))
    try:
        start = time.perf_counter()
        if args.run:
            run = Path(args.run)
        else:
            quick = dict(num_samples=64, epochs=1) if args.quick else {}
            config = TrainConfig(deep_supervision=True, name="prune_report", output_dir=str(root / "runs"), **quick)
            run, _ = unetpp_tf.train(config, verbose=2)
            print(f"trained in {time.perf_counter() - start:.0f} s: {run}")
        model = load_model(run / "model.keras")
        data = run_data(run)

        start = time.perf_counter()
        report = prune_report(model, data.val, latency_runs=args.runs, num_threads=args.threads)
        print(f"\nprune report in {time.perf_counter() - start:.0f} s")
        print(format_prune_report(report, tolerance=args.tolerance))
        level = choose_prune_level(report, args.tolerance)
        report["tolerance"], report["chosen"] = args.tolerance, level
        paths = write_prune_report(report, root / "prune_report")
        print(f"wrote {', '.join(p.name for p in paths.values())}")

        mode = "accurate" if level is None else "fast"
        export_model(model, root / "export", formats=("tflite",), quantize=("none",), mode=mode, level=level,
                     samples=data.val)
        stem = "model" if level is None else f"model_L{level}"
        exported = load_model(root / "export" / f"{stem}_float32.tflite")
        dice = evaluate(exported, data.val)["metrics"]["dice"]
        row = next(r for r in report["rows"] if r["level"] == level)
        print(f"\nauto at tolerance {args.tolerance}: {row['name']}; exported {stem}_float32.tflite scores "
              f"Dice {dice:.4f} on the validation split (report: {row['dice']:.4f}, "
              f"difference {abs(dice - row['dice']):.5f})")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
