"""The `unetpp-tf` command line: a thin front over the library.

Subcommands: train, evaluate, predict, export, summary, plan. Each parses its flags, calls one
library function and prints what it returns. A bad input prints the library's whole message
(no traceback) on stderr and exits with status 2; nothing else in the package prints.
TensorFlow's native start-up chatter is filtered out of stderr; its other native lines (a
failed CHECK, an out-of-memory report) still show.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
import typing
from pathlib import Path

from unetpp_tf._native_logs import native_stderr_silenced
from unetpp_tf.config import CHOICES, TrainConfig, load_config

# Help for the train flags, generated from TrainConfig's fields (one flag per field).
TRAIN_HELP = {
    "name": "run name: the run directory is OUTPUT_DIR/NAME (default: ARCH-DATA, numbered if taken)",
    "output_dir": "root of run directories",
    "seed": "seed for data order, augmentation and initialization",
    "data": "'synthetic' (built in), 'synthetic-ct' (built-in lung CT scans), a folder with images/ and masks/ "
            "(images, or NIfTI/DICOM scans), or tfds:NAME",
    "images": "explicit image folder (with --masks)",
    "masks": "explicit mask folder (with --images)",
    "task": "synthetic data: binary nuclei or multiclass shapes",
    "num_samples": "synthetic data: number of images (synthetic-ct: of scans)",
    "image_size": "HEIGHT [WIDTH] the images are resized to",
    "crop_size": "HEIGHT [WIDTH] random training crops instead of resizing",
    "channels": "force 1 (gray) or 3 (RGB) input channels",
    "num_classes": "classes in the masks (1 = binary); inferred when omitted",
    "batch_size": "images (or patches) per step",
    "split": "TRAIN VAL TEST fractions for a random split by file",
    "group_by": "regex on image file names; files with the same match (or first group) stay in one split",
    "skip_invalid": "drop unreadable or mismatched image/mask pairs (listed in splits.json) instead of stopping",
    "folds": "train K models on K disjoint validation folds and use their ensemble (0 = one model)",
    "normalize": "image intensities: fixed = divide by the dtype's range, dataset = training-set 1st-99.8th "
                 "percentiles to 0-1, or per image minmax | percentile (1st-99.8th) | zscore; kept in the model",
    "augment": "where augmentation runs: in the train step on the device, in tf.data on the host, or not at all",
    "augmentation": "augmentation settings as JSON, e.g. '{\"rotation\": 0.1, \"zoom\": 0.1}'",
    "volume_mode": "scans: 3d = a 3D network on patches; 2.5d = a 2D network on axial slices with --slices "
                   "neighbours as channels; 2d = one slice",
    "patch_size": "scans: DEPTH HEIGHT WIDTH of the 3D training patches (2.5d/2d: HEIGHT WIDTH of the slice crops)",
    "slices": "scans, 2.5d: neighbouring slices given as channels (odd; the centre one is labelled)",
    "spacing": "scans: resample every scan to Z Y X mm voxels first (default: keep each scan's own)",
    "window": "scans: intensity window, a name (lung, soft_tissue, bone, brain, liver, ...), LOW HIGH in "
              "Hounsfield units, or zscore (MRI)",
    "foreground_share": "scans: share of training patches centred on a labelled voxel (small structures)",
    "patches_per_volume": "scans: training patches drawn from each scan per epoch",
    "arch": "model architecture (deeplabv3plus: DeepLabV3+ on --encoder, resnet50 by default)",
    "encoder": "pretrained backbone under the decoder, a name from unetpp_tf.models.ENCODERS (e.g. resnet50, "
               "efficientnetb0, mobilenetv2); --depth 4 or less; image sizes multiples of 2**(depth+1)",
    "encoder_weights": "the encoder's initial weights: imagenet (downloaded by Keras) or a weights file "
                       "(default: random initialization)",
    "preset": "start from a named model configuration ('paper')",
    "depth": "number of poolings",
    "filters": "base width (doubled per level) or DEPTH+1 widths",
    "deep_supervision": "one head and one loss per decoder column (UNet++ only; needed to prune; off by default)",
    "batch_norm": "BatchNormalization after each convolution",
    "bn_momentum": "decay of BatchNorm's moving statistics (Keras default 0.99 lags in short runs)",
    "dropout": "dropout rate after each convolution (DeepLabV3+: before its classifier; default: the "
               "architecture's own, 0 for UNet++ and U-Net)",
    "l2": "L2 weight decay on convolution kernels",
    "upsampling": "decoder upsampling",
    "loss": "auto = bce_dice for binary, ce_dice for multi-class",
    "optimizer": "optimizer",
    "learning_rate": "peak learning rate",
    "weight_decay": "AdamW weight decay",
    "schedule": "learning-rate schedule",
    "warmup_steps": "linear warm-up optimizer steps of the cosine schedule",
    "min_steps": "at least this many optimizer steps in all: small datasets repeat within an epoch",
    "clipnorm": "clip each gradient to this norm",
    "epochs": "training epochs",
    "freeze_encoder_epochs": "train the first N epochs with the encoder frozen (decoder only, its BatchNorm in "
                             "inference mode), then every layer at a lower learning rate",
    "finetune_lr_factor": "learning rate of the epochs after --freeze-encoder-epochs, as a fraction of "
                          "--learning-rate",
    "early_stopping": "stop after this many epochs without a better validation Dice (0 = never); after "
                      "--freeze-encoder-epochs it counts the fine-tuning epochs",
    "mixed_precision": "mixed precision (outputs and losses stay float32)",
    "xla": "XLA-compile the train step; auto = on with a GPU or TPU, off on CPU (slower there); always on on JAX",
    "recompute": "recompute each node's forward in the backward pass: a third less peak memory at 256x256, 0.8x speed",
    "strategy": "auto = all local GPUs; one-device, mirrored, tpu = tf.distribute strategies (TensorFlow); "
                "multi-worker = data parallel over several processes or hosts (--backend jax)",
    "coordinator": "multi-worker: HOST:PORT of worker 0, which hosts the coordinator (or JAX_COORDINATOR_ADDRESS)",
    "num_processes": "multi-worker: number of worker processes (or JAX_NUM_PROCESSES)",
    "process_id": "multi-worker: this worker's id, 0 to N-1; 0 writes the run directory (or JAX_PROCESS_ID)",
    "init_timeout": "multi-worker: seconds to wait for the coordinator and every worker",
    "export_saved_model": "export a SavedModel into the run",
    "export_tflite": "export a float32 TFLite file into the run",
    "export_onnx": "export an ONNX file into the run (pip install 'unetpp-tf[onnx]')",
    "postprocess": "auto = after training, try removing small components, keeping the largest component and "
                   "filling holes on the validation split; keep those that raise Dice (postprocess.json; predict "
                   "and evaluate apply them)",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults stay unset so a --config file can fill them."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        hint, name = hints[field.name], field.name
        options = dict(dest=name, default=argparse.SUPPRESS, help=TRAIN_HELP[name])
        if hint is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **options)
        elif name in ("image_size", "crop_size", "filters", "patch_size"):
            parser.add_argument(_flag(name), type=int, nargs="+", metavar="N", **options)
        elif name == "spacing":
            parser.add_argument(_flag(name), type=float, nargs=3, metavar="MM", **options)
        elif name == "window":
            parser.add_argument(_flag(name), nargs="+", metavar="NAME|HU", **options)
        elif name == "split":
            parser.add_argument(_flag(name), type=float, nargs=3, metavar="F", **options)
        elif name == "augmentation":
            parser.add_argument(_flag(name), type=json.loads, metavar="JSON", **options)
        else:
            kind = next((t for t in (int, float) if hint is t or t in typing.get_args(hint)), str)
            parser.add_argument(_flag(name), type=kind, choices=CHOICES.get(name), **options)


def _config_from_args(args) -> TrainConfig:
    """The run's settings: a --config file, overridden by the flags given.

    With --resume the run's own config.json is the base, so `unetpp-tf train --name NAME
    --resume` continues with the settings the run started with (flags that differ from
    them are still refused by the resume check, naming them).
    """
    values = load_config(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    for name in ("image_size", "crop_size"):
        if name in given:
            size = given[name]
            given[name] = (size[0], size[-1])
    if "filters" in given:
        widths = given["filters"]
        given["filters"] = widths[0] if len(widths) == 1 else tuple(widths)
    if "window" in given:
        given["window"] = _window(given["window"])
    settings = {**values, **given}
    recorded = _recorded_config(settings) if getattr(args, "resume", False) else None
    if recorded is not None:
        return TrainConfig.from_dict({**load_config(recorded), **settings}, source=str(recorded))
    return TrainConfig.from_dict(settings, source=str(args.config or "flags"))


def _window(words: list[str]):
    """--window NAME or --window LOW HIGH (Hounsfield units)."""
    if len(words) == 1:
        return words[0]
    try:
        low, high = (float(w) for w in words)
    except ValueError:
        raise ValueError(f"--window {' '.join(words)}: give one name (e.g. lung) or two numbers LOW HIGH.") from None
    return (low, high)


def _recorded_config(settings: dict) -> Path | None:
    """config.json of the named run these settings point at, if it exists."""
    if not settings.get("name"):
        return None
    path = Path(settings.get("output_dir") or TrainConfig.output_dir) / settings["name"] / "config.json"
    return path if path.is_file() else None


def _train(args) -> int:
    from unetpp_tf.training import train

    config, chosen = _config_from_args(args), None
    if args.auto:
        config, chosen = _auto_config(args, config)
    elif args.memory_budget is not None:
        raise ValueError("--memory-budget plans the run: add --auto (or run unetpp-tf plan).")
    run, history = train(config, resume=args.resume, overwrite=args.overwrite, verbose=0 if args.quiet else "auto")
    if chosen is not None:
        from unetpp_tf.files import write_json

        write_json(run / "plan.json", chosen.to_dict())
    record = json.loads((run / "metrics.json").read_text())
    metrics = record["test"]
    scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("dice", "iou", "precision", "recall") if k in metrics)
    print(f"run: {run}")
    if "cross_validation" in record:
        folds = record["cross_validation"]
        each = ", ".join(f"{row['best_val_dice']:.4f}" for row in folds["folds"])
        print(f"folds: validation dice {folds['val_dice_mean']:.4f} +- {folds['val_dice_std']:.4f} ({each})")
        print(f"test (ensemble of {len(folds['folds'])}): {scores}")
    else:
        print(f"test: {scores}")
    if "postprocess" in record:
        kept = record["postprocess"]
        steps = ", ".join(_step_text(step) for step in kept["steps"]) or "none raised the validation Dice"
        print(f"post-processing: {steps} (validation dice {kept['val_dice_before']:.4f} -> "
              f"{kept['val_dice_after']:.4f}; applied to the test scores and by predict)")
    if "hd95" in metrics:  # scans: per class, with surface distances in mm
        for i, name in enumerate(metrics["classes"]):
            each = {key: metrics["per_class"][key][i] for key in ("dice", "iou", "hd95", "assd")}
            print(f"  {name}: dice {each['dice']:.4f}, iou {each['iou']:.4f}, "
                  f"hd95 {_millimetres(each['hd95'])}, assd {_millimetres(each['assd'])}")
    return 0


def _auto_config(args, config: TrainConfig):
    """`train --auto`: the settings planned from the data, except those given by flag or --config file."""
    from unetpp_tf.planning import format_plan, planned_config

    if args.resume:
        raise ValueError("--auto with --resume: a resumed run keeps the settings it planned (its config.json); "
                         "drop --auto.")
    if config.strategy == "multi-worker":
        raise ValueError("--auto with --strategy multi-worker: each worker would measure on its own; plan once "
                         "with unetpp-tf plan --data DIR --output plan.json and give every worker --config plan.json.")
    given = {f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        given |= set(load_config(args.config))
    config, chosen = _measured(planned_config, config, given, args.memory_budget)
    print(format_plan(chosen), flush=True)
    return config, chosen


def _measured(planner, *args, **kwargs):
    """Call a planning function; a failed trial run (RuntimeError: its child's last lines) is a plain error."""
    try:
        return planner(*args, **kwargs)
    except RuntimeError as error:
        raise ValueError(f"{error_message(error)}\nPlan without the trial run with unetpp-tf plan --no-measure, "
                         "or give the settings yourself.") from None


def _plan(args) -> int:
    from unetpp_tf.data.fingerprint import fingerprint
    from unetpp_tf.files import write_json
    from unetpp_tf.planning import format_plan, plan

    fp = fingerprint(args.data, task=args.task, num_samples=args.num_samples)
    chosen = _measured(plan, fp, memory_budget_gb=args.memory_budget, measure=not args.no_measure)
    if args.output:
        settings = {"data": args.data, **chosen.settings}
        if args.data == "synthetic":
            settings["task"] = args.task
        write_json(args.output, settings)
    if args.json:
        print(json.dumps(chosen.to_dict()))
        return 0
    print(format_plan(chosen))
    if args.output:
        print(f"wrote {args.output}: train with unetpp-tf train --config {args.output}")
    return 0


def _step_text(step: dict) -> str:
    """One post-processing step for the terminal, e.g. remove_small(min_size=6, classes=[1])."""
    options = ", ".join(f"{k}={v}" for k, v in step.items() if k != "op")
    return f"{step['op']}({options})" if options else step["op"]


def _postprocessing(args, model_path: str):
    """The post-processing steps `--postprocess` asks for: auto = those the model's run chose, if any."""
    from unetpp_tf.postprocess import read_postprocessing

    return read_postprocessing(model_path) if args.postprocess == "auto" else None


def _millimetres(distance) -> str:
    """A surface distance for the terminal; None when no scan had one (the class missed or absent in each)."""
    return "undefined (missed or spurious in every scan)" if distance is None else f"{distance:.2f} mm"


def _run_dir(model_path: str) -> Path | None:
    """The run directory a model file (or run directory) belongs to, or None."""
    path = Path(model_path)
    return next((f for f in (path, path.parent, path.parent.parent) if (f / "config.json").is_file()), None)


def _run_config(model_path: str) -> dict:
    """The config.json of the run a model file belongs to, or {}."""
    run = _run_dir(model_path)
    return json.loads((run / "config.json").read_text()) if run else {}


def _model_file(model_path: str) -> str:
    path = Path(model_path)
    return str(path / "model.keras") if path.is_dir() and (path / "model.keras").exists() else model_path


def _data_for(args, model_path: str):
    """The data to evaluate on: flags if given, else the data of the model's run, split as it recorded."""
    from unetpp_tf.training import SPLITS_FILE, load_data, read_splits

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in _run_config(model_path).items() if k in known}
    for name in ("data", "images", "masks", "seed", "batch_size", "num_samples", "task"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if getattr(args, "skip_invalid", False):
        values["skip_invalid"] = True
    if args.image_size and not values.get("patch_size"):  # scans keep their patches (export sizes a 3D model)
        values["image_size"] = (args.image_size[0], args.image_size[-1])
    values.update(augment="none", folds=0)
    run = _run_dir(model_path)
    own_data = all(getattr(args, name, None) is None for name in ("data", "images", "masks"))
    splits = read_splits(run) if own_data and run and (run / SPLITS_FILE).is_file() else None
    return load_data(TrainConfig.from_dict(values), splits=splits)


def _evaluate(args) -> int:
    from unetpp_tf.evaluation import evaluate, write_per_image_csv
    from unetpp_tf.inference import load_model

    paths = [_model_file(p) for p in args.model]
    if args.prune_report:
        return _prune_report(args, paths)
    if args.tolerance is not None or args.report_dir:
        raise ValueError("--tolerance and --report-dir are for --prune-report; add it, or drop them.")
    args.split = args.split or "test"
    models = [load_model(p) for p in paths]
    data = _data_for(args, args.model[0])
    if data.volumes:
        result = _score_scans(args, models, data)
    else:
        names = [Path(image).name for image, _ in data.files.get(args.split, [])] or None  # folder data: file names
        result = evaluate(
            models, data[args.split], mode=args.ds_mode, level=args.prune_level, threshold=args.threshold,
            names=names, postprocess=_postprocessing(args, paths[0]) if len(paths) == 1 else None,
        )
    if args.csv:
        write_per_image_csv(result["per_image"], args.csv)
    metrics = result["metrics"]
    if args.json:
        print(json.dumps(metrics))
        return 0
    for key, value in metrics.items():  # the scores, then the count of images or scans
        if isinstance(value, float):
            print(f"{key:<10} {value:.4f}")
        elif isinstance(value, int):
            print(f"{key:<10} {value}")
    return 0


def _prune_report(args, paths: list[str]) -> int:
    """`evaluate --prune-report`: every pruning level measured on the validation split, printed and saved."""
    from unetpp_tf.pruning_report import (
        check_tolerance,
        choose_prune_level,
        format_prune_report,
        prune_report,
        write_prune_report,
    )

    if len(paths) > 1:
        raise ValueError("--prune-report: give one model or run directory (an ensemble has no pruning levels).")
    tolerance = None if args.tolerance is None else check_tolerance(args.tolerance)
    data = _data_for(args, paths[0])
    split = args.split or "val"
    report = prune_report(paths[0], data[split], threshold=args.threshold, calibration=data.train.take(4),
                          image_size=_spatial_size(args.image_size))
    report["split"] = split
    if tolerance is not None:
        report["tolerance"], report["chosen"] = tolerance, choose_prune_level(report, tolerance)
    run = _run_dir(paths[0])
    folder = Path(args.report_dir) if args.report_dir else (run or Path(".")) / "prune_report"
    written = write_prune_report(report, folder)
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_prune_report(report, tolerance=tolerance))  # ends with the chosen level when given a tolerance
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0


def _score_scans(args, models: list, data) -> dict:
    """`evaluate` on scans: whole scans, sliding windows of the training patch, surface distances in mm."""
    from unetpp_tf.evaluation import evaluate_volumes
    from unetpp_tf.inference import as_single_output

    if len(models) > 1:
        raise ValueError("--model: scans are scored one model at a time; give one model or run directory.")
    run = _run_config(args.model[0])
    patch = dict(patch_size=tuple(run["patch_size"])) if run.get("volume_mode") == "3d" else {}
    model = as_single_output(models[0], args.ds_mode, args.prune_level)
    return evaluate_volumes(model, data.volumes[args.split], num_classes=data.num_classes, threshold=args.threshold,
                            postprocess=_postprocessing(args, args.model[0]), **patch)


SCAN_SUFFIXES = (".nii", ".nii.gz", ".dcm")


def _scan_inputs(model, run: dict, inputs: list[str]) -> bool:
    """Whether `predict` is given scans: a 3D model, a model trained on scans, or NIfTI/DICOM inputs."""
    import keras

    if not isinstance(model, keras.Model):  # an exported file: scans need the Keras model
        return False
    if len(model.inputs[0].shape) == 5 or run.get("data") == "synthetic-ct" or run.get("patch_size"):
        return True
    return any(str(path).lower().endswith(SCAN_SUFFIXES) for path in inputs)


def _predict(args) -> int:
    from unetpp_tf.inference import load_model, predict_files

    model_path = _model_file(args.model)
    model = load_model(model_path)
    run = _run_config(model_path)
    if _scan_inputs(model, run, args.inputs):
        return _predict_scans(args, model, run)
    written = predict_files(
        model, args.inputs, args.output, overlay=args.overlay, threshold=args.threshold,
        tta=args.tta, tile_size=args.tile_size, overlap=args.overlap, mode=args.ds_mode, level=args.prune_level,
        postprocess=_postprocessing(args, model_path),
    )
    print(f"wrote {len(written)} mask(s) to {args.output}")
    return 0


def _predict_scans(args, model, run: dict) -> int:
    """`predict` on NIfTI files or DICOM series folders: masks as NIfTI on each scan's own geometry."""
    from unetpp_tf.inference import as_single_output
    from unetpp_tf.volume_inference import predict_scans

    window = run.get("window", "lung")
    options = dict(spacing=run.get("spacing"), window=tuple(window) if isinstance(window, list) else window)
    if len(model.inputs[0].shape) == 5:
        patch = args.tile_size or run.get("patch_size")
        options["patch_size"] = tuple(patch) if patch else None
    model = as_single_output(model, args.ds_mode, args.prune_level)
    written = predict_scans(model, args.inputs, args.output, threshold=args.threshold, overlap=args.overlap,
                            postprocess=_postprocessing(args, _model_file(args.model)), **options)
    print(f"wrote {len(written)} mask(s) to {args.output}")
    return 0


def _export(args) -> int:
    from unetpp_tf.export import export_model, format_report
    from unetpp_tf.inference import load_model

    model_path = _model_file(args.model)
    wanted = (("saved_model", args.saved_model), ("tflite", args.tflite), ("onnx", args.onnx))
    formats = [name for name, on in wanted if on]
    if not formats:
        formats = ["saved_model", "tflite"]
    run = _run_config(model_path)
    size = args.image_size or run.get("crop_size") or run.get("image_size") or run.get("patch_size")
    samples = None
    if args.calibration_data:
        args.data, args.images, args.masks = args.calibration_data, None, None
    if args.calibration_data or run:
        samples = _data_for(args, model_path).train.take(8)
    else:
        raise ValueError("export needs sample images for its parity check: pass --calibration-data DIR.")
    model, mode, level = load_model(model_path), args.ds_mode, args.prune_level
    if level == "auto":
        from unetpp_tf.pruning_report import auto_prune_level, format_choice

        level, choice = auto_prune_level(model, _data_for(args, model_path).val, args.tolerance,
                                         threshold=args.threshold, image_size=_spatial_size(size))
        mode = "accurate" if level is None else "fast"
        print(f"--prune-level auto on the validation split: {format_choice(choice)}")
    report = export_model(
        model, args.output, formats=formats, quantize=tuple(args.quantize),
        image_size=_spatial_size(size), mode=mode, level=level, calibration=samples, samples=samples,
    )
    print(format_report(report))
    return 0


def _spatial_size(size) -> tuple | None:
    """HEIGHT [WIDTH] (one number: square), or DEPTH HEIGHT WIDTH for a 3D model."""
    if not size:
        return None
    return tuple(size) if len(size) == 3 else (size[0], size[-1])


def _summary(args) -> int:
    import keras

    from unetpp_tf.models import build_model, from_preset

    size = _spatial_size(args.input_size) or (None, None)
    options = dict(input_shape=(*size, args.channels), num_classes=args.num_classes)
    if args.encoder:
        options["encoder"] = args.encoder
    if args.depth is not None:
        options["depth"] = args.depth
    if args.filters:
        options["filters"] = args.filters[0] if len(args.filters) == 1 else tuple(args.filters)
    if args.deep_supervision:
        options["deep_supervision"] = True
    model = from_preset(args.preset, arch=args.arch, **options) if args.preset else build_model(args.arch, **options)
    model.summary(line_length=110, print_fn=lambda line, **_: print(line))
    print(f"{model.name}: {model.count_params():,} parameters, {len(model.outputs)} output(s) "
          f"(Keras backend: {keras.backend.backend()})")
    return 0


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds-mode", choices=("accurate", "fast"), default="accurate",
                        help="deep supervision: mean of all heads, or one pruned head")
    parser.add_argument("--prune-level", type=_prune_level, metavar="L",
                        help="head kept by --ds-mode fast (default: the deepest); export also takes auto")
    parser.add_argument("--threshold", type=float, default=0.5, help="binary foreground threshold")


def _add_postprocess_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postprocess", choices=("auto", "none"), default="auto",
                        help="auto = apply the post-processing the model's run chose on its validation split "
                             "(postprocess.json, train --postprocess auto), if any; none = the labels as predicted")


def _prune_level(text: str):
    """--prune-level: a level number, or auto (export: the smallest level within --tolerance)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a level number (1..depth) or auto, not {text!r}") from None


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="synthetic, a folder, or tfds:NAME (default: the model's training data)")
    parser.add_argument("--images", help="explicit image folder")
    parser.add_argument("--masks", help="explicit mask folder")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="N",
                        help="HEIGHT [WIDTH] (export of a 3D model: DEPTH HEIGHT WIDTH, default its training patch)")
    parser.add_argument("--batch-size", type=int, help="images per batch")
    parser.add_argument("--seed", type=int, help="split seed (default: the run's)")
    parser.add_argument("--num-samples", type=int, help="synthetic data: number of images")
    parser.add_argument("--task", choices=CHOICES["task"], help="synthetic data task")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="folder data: drop unreadable or mismatched image/mask pairs instead of stopping")


BACKENDS = ("tensorflow", "jax")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `unetpp-tf` (all subcommands)."""
    parser = _Parser(prog="unetpp-tf", description="UNet++ image segmentation for Keras and TensorFlow.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=BACKENDS,
                        help="Keras backend to run on (default: KERAS_BACKEND, else tensorflow)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", parents=[common], help="train a model and write a run directory")
    train.add_argument("--config", help="JSON or YAML file of settings (flags override it)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted (or killed) run from its last finished epoch, same settings")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--auto", action="store_true",
                       help="plan the settings from the data (unetpp-tf plan); flags and --config values given "
                            "are kept; the plan is printed and saved as RUN/plan.json")
    train.add_argument("--memory-budget", type=float, metavar="GB",
                       help="with --auto: the most memory training may take (host memory on the CPU, device "
                            "memory with a GPU), measured in a short trial run")
    _add_config_flags(train)
    train.set_defaults(run=_train)

    evaluate = sub.add_parser("evaluate", parents=[common], help="score a model (or an ensemble) on a data split")
    evaluate.add_argument("--model", required=True, nargs="+", help="model file(s) or run dir(s); several = ensemble")
    evaluate.add_argument("--split", choices=("train", "val", "test"),
                          help="split to score (default: test; val with --prune-report)")
    evaluate.add_argument("--prune-report", action="store_true",
                          help="deep-supervision models: Dice, parameters, FLOPs, batch-1 latency (Keras, int8 "
                               "TFLite) and int8 file size of every pruning level L1..Ld and the full model; "
                               "printed and saved (json, csv, png) in --report-dir")
    evaluate.add_argument("--tolerance", type=float,
                          help="with --prune-report: mark the smallest level within this Dice of the full model")
    evaluate.add_argument("--report-dir", help="folder for the prune report (default: RUN/prune_report)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.add_argument("--csv", help="write per-image metrics to this CSV file")
    _add_data_flags(evaluate)
    _add_inference_flags(evaluate)
    _add_postprocess_flag(evaluate)
    evaluate.set_defaults(run=_evaluate)

    predict = sub.add_parser(
        "predict", parents=[common],
        help="segment image files into mask PNGs, or scans (NIfTI files, DICOM folders) into NIfTI masks",
    )
    predict.add_argument("--model", required=True, help="model file or run directory")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders, or NIfTI files / DICOM series folders")
    predict.add_argument("--output", required=True, help="folder for the masks")
    predict.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    predict.add_argument("--tta", action="store_true", help="average over flips (4 passes)")
    predict.add_argument("--tile-size", type=int, nargs="+", metavar="N",
                         help="sliding-window size for large images (3D scans: D H W; default: the training patch)")
    predict.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction")
    _add_inference_flags(predict)
    _add_postprocess_flag(predict)
    predict.set_defaults(run=_predict)

    export = sub.add_parser("export", parents=[common], help="export SavedModel / TFLite / ONNX with a parity report")
    export.add_argument("--model", required=True, help="model file or run directory")
    export.add_argument("--output", required=True, help="folder for the artifacts")
    export.add_argument("--saved-model", action="store_true", help="write a SavedModel (uint8 serving signature)")
    export.add_argument("--tflite", action="store_true", help="write TFLite file(s)")
    export.add_argument("--onnx", action="store_true",
                        help="write an ONNX file (float32 images in), checked in onnxruntime (pip install "
                             "'unetpp-tf[onnx]')")
    export.add_argument("--quantize", nargs="+", choices=("none", "float16", "dynamic", "int8"), default=["none"])
    export.add_argument("--tolerance", type=float, default=0.01,
                        help="--prune-level auto: the Dice a level may lose against the full model on the "
                             "validation split (default 0.01)")
    export.add_argument("--calibration-data", help="image/mask folder for int8 calibration and the parity check")
    _add_data_flags(export)
    _add_inference_flags(export)
    export.set_defaults(run=_export)

    plan = sub.add_parser("plan", parents=[common],
                          help="fingerprint a dataset and plan a training configuration within a memory budget")
    plan.add_argument("--data", default="synthetic",
                      help="a folder (images/ and masks/, or scans), synthetic, synthetic-ct or tfds:NAME")
    plan.add_argument("--task", choices=CHOICES["task"], default="binary", help="synthetic data task")
    plan.add_argument("--num-samples", type=int, help="synthetic data: number of images (scans)")
    plan.add_argument("--memory-budget", type=float, metavar="GB",
                      help="the most memory training may take, measured in a short trial run (default: no budget)")
    plan.add_argument("--no-measure", action="store_true",
                      help="estimate the memory instead of measuring it (seconds instead of a trial run)")
    plan.add_argument("--json", action="store_true",
                      help="print the plan (settings, reasons, memory, fingerprint) as one JSON object")
    plan.add_argument("--output", metavar="FILE", help="write the settings as a config file for train --config")
    plan.set_defaults(run=_plan)

    summary = sub.add_parser("summary", parents=[common], help="build a model and print its layers and parameter count")
    summary.add_argument("--arch", choices=CHOICES["arch"], default="unetpp", help="model architecture")
    summary.add_argument("--encoder", help="pretrained backbone from unetpp_tf.models.ENCODERS (random weights)")
    summary.add_argument("--preset", choices=("paper",), help="start from a named configuration")
    summary.add_argument("--depth", type=int, help="number of poolings (default 4)")
    summary.add_argument("--filters", type=int, nargs="+", help="base width, or depth+1 widths")
    summary.add_argument("--deep-supervision", action="store_true", help="one head per decoder column")
    summary.add_argument("--input-size", type=int, nargs="+", metavar="N",
                         help="height [width], or depth height width for a 3D model")
    summary.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    summary.add_argument("--num-classes", type=int, default=1, help="1 = binary (sigmoid)")
    summary.set_defaults(run=_summary)
    return parser


class _NotesToStderr(logging.Handler):
    """Show the library's log notes (e.g. a stretched schedule) as `unetpp-tf: ...` lines on stderr."""

    def emit(self, record):
        print(f"unetpp-tf: {record.getMessage()}", file=sys.stderr)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a Python warning as one `unetpp-tf: warning: ...` line (no source location)."""
    print(f"unetpp-tf: warning: {message}", file=sys.stderr)


def _show_library_notes() -> None:
    log = logging.getLogger("unetpp_tf")
    if not any(isinstance(h, _NotesToStderr) for h in log.handlers):
        log.addHandler(_NotesToStderr())
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    _show_library_notes()
    try:
        if args.backend:
            _use_backend(args.backend, restart=argv is None)
        if getattr(args, "prune_level", None) == "auto" and args.command != "export":
            raise ValueError(f"--prune-level auto: only export chooses a level; {args.command} takes a level number "
                             "(see evaluate --prune-report --tolerance T for the one auto would choose).")
        with native_stderr_silenced(), warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return args.run(args)
    except KeyboardInterrupt:
        print("unetpp-tf: interrupted; continue a training run with the same command and --resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, FloatingPointError, ImportError) as error:  # ImportError: an extra
        print(f"unetpp-tf: error: {error_message(error)}", file=sys.stderr)
        return 2


def _use_backend(name: str, restart: bool) -> None:
    """Run on Keras backend `name`: nothing to do when Keras already runs on it.

    Keras fixes its backend when first imported (importing this package imports it), so the
    command starts again with KERAS_BACKEND set (the same process id, `exec`); a call of `main`
    from Python cannot do that and is refused.
    """
    import importlib.util

    import keras

    if keras.backend.backend() == name:
        return
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"--backend {name}: {name} is not installed; pip install 'unetpp-tf[{name}]'.")
    if not restart:
        raise ValueError(
            f"--backend {name}: Keras already runs on {keras.backend.backend()} in this process; set "
            f"KERAS_BACKEND={name} before importing keras (or unetpp_tf), or run the unetpp-tf command."
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "unetpp_tf", *sys.argv[1:]],
              {**os.environ, "KERAS_BACKEND": name})


def error_message(error: BaseException) -> str:
    """The whole text of a library error (every line of it), or its type when it has none.

    A one-argument error's message is its argument: a KeyError prints without quotes, and an
    OSError that carries an errno next to its own message prints that message.

    Example:
        >>> error_message(KeyError("unknown split 'dev'"))
        "unknown split 'dev'"
    """
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return text.strip() or type(error).__name__
