"""Training runs: data, model, optimizer, callbacks and a run directory holding the results.

`train(config)` is what `unetpp-tf train` calls. A run directory holds:

    config.json       the resolved configuration
    model.keras       the best model by validation Dice (the plain model, no wrapper)
    history.csv       one row per epoch
    metrics.json      test-split metrics of the best model, parameters, timings
    figures/          curves.png, predictions.png
    export/           saved_model/ and model.tflite (float32) unless disabled
    backup/           only while a run is unfinished: what `resume=True` continues from

Plain Keras works too: the datasets, losses and metrics are ordinary Keras objects, so
`model.fit(data.train, validation_data=data.val)` needs nothing from this module.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import time
import warnings
from pathlib import Path

import keras
import tensorflow as tf

from unetpp_tf import losses as losses_module
from unetpp_tf import metrics as metrics_module
from unetpp_tf import viz
from unetpp_tf.config import TrainConfig
from unetpp_tf.data import (
    AugmentedModel,
    SegmentationAugmenter,
    SegmentationData,
    from_directory,
    from_tfds,
    synthetic,
    targets_per_head,
)
from unetpp_tf.evaluation import evaluate, write_metrics_json
from unetpp_tf.inference import as_single_output
from unetpp_tf.models import build_model, from_preset

MIXED_PRECISION = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


class TrainingDiverged(FloatingPointError):
    """Raised when the loss became NaN or infinite; the last good model is kept."""


# ----------------------------------------------------------------------------- data / model


def make_augmenter(config: TrainConfig) -> SegmentationAugmenter:
    """The augmenter a configuration describes, seeded with the run's seed.

    Example:
        >>> make_augmenter(TrainConfig(augmentation={"rotation": 0.1, "zoom": 0.1}))
    """
    valid = [name for name in inspect.signature(SegmentationAugmenter).parameters if name not in ("seed", "kwargs")]
    unknown = sorted(set(config.augmentation) - set(valid))
    if unknown:
        raise ValueError(f"augmentation: unknown setting(s) {unknown}; valid settings are {valid}.")
    return SegmentationAugmenter(**config.augmentation, seed=config.seed)


def load_data(config: TrainConfig) -> SegmentationData:
    """Open the data a configuration names (synthetic, a folder, or tfds:NAME).

    Example:
        >>> data = load_data(TrainConfig(data="my_folder", image_size=(128, 128)))
    """
    host_augment = make_augmenter(config) if config.augment == "host" else None
    common = dict(batch_size=config.batch_size, split=config.split, seed=config.seed, augment=host_augment)
    if config.images or config.masks:
        return from_directory(
            images=config.images, masks=config.masks, image_size=config.image_size, crop_size=config.crop_size,
            channels=config.channels, num_classes=config.num_classes, **common,
        )
    if config.data == "synthetic":
        return synthetic(
            config.num_samples, image_size=config.image_size, task=config.task, channels=config.channels or 1, **common
        )
    if config.data.startswith("tfds:"):
        return from_tfds(config.data[5:], image_size=config.image_size, num_classes=config.num_classes, **common)
    return from_directory(
        config.data, image_size=config.image_size, crop_size=config.crop_size, channels=config.channels,
        num_classes=config.num_classes, **common,
    )


def model_from_config(config: TrainConfig, channels: int, num_classes: int) -> keras.Model:
    """Build the model a configuration describes, for `channels` inputs and `num_classes`.

    Example:
        >>> model = model_from_config(TrainConfig(filters=8, depth=3), channels=1, num_classes=1)
    """
    shape = dict(input_shape=(None, None, channels), num_classes=num_classes, recompute=config.recompute)
    if config.arch == "unetpp":
        shape["deep_supervision"] = config.deep_supervision
    if config.preset:
        return from_preset(config.preset, arch=config.arch, **shape)
    return build_model(
        config.arch, depth=config.depth, filters=config.filters, batch_norm=config.batch_norm,
        dropout=config.dropout, l2=config.l2, upsampling=config.upsampling, **shape,
    )


def _loss(config: TrainConfig, num_classes: int) -> keras.losses.Loss:
    name = config.loss if config.loss != "auto" else ("bce_dice" if num_classes == 1 else "ce_dice")
    return losses_module.get(name)


def _optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate = config.learning_rate
    if config.schedule == "cosine":
        warmup = min(config.warmup_epochs, config.epochs - 1) * steps_per_epoch
        rate = keras.optimizers.schedules.CosineDecay(
            rate / 10 if warmup else rate,
            decay_steps=config.epochs * steps_per_epoch - warmup,
            warmup_target=rate if warmup else None,
            warmup_steps=warmup,
        )
    clip = dict(clipnorm=config.clipnorm) if config.clipnorm else {}
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay, **clip)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, **clip)
    return keras.optimizers.Adam(rate, **clip)


def use_xla(setting: str = "auto") -> bool:
    """Whether to XLA-compile the train step: "on", "off", or "auto" (only with a GPU or TPU).

    On this project's 2-core CPU benchmark XLA made training slower (7.4 vs 11.0 images/s
    for the paper UNet++ at 96x96, batch 16): TensorFlow's oneDNN kernels beat XLA's CPU
    code, so "auto" keeps it for accelerators.

    Example:
        >>> model.compile(..., jit_compile=use_xla("auto"))
    """
    if setting != "auto":
        return setting == "on"
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Return the tf.distribute strategy for "auto", "one-device", "mirrored" or "tpu".

    "auto" mirrors over all local GPUs when there are several and otherwise uses the
    default strategy; "mirrored" uses all local GPUs, or all logical CPU devices when
    there is no GPU. Multi-host training is not offered: Keras 3 `fit` fails with
    MultiWorkerMirroredStrategy across real workers (keras issue 20585).

    Example:
        >>> with make_strategy("mirrored").scope():
        ...     model = build_unetpp()
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one-device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.NotFoundError) as error:
            raise ValueError(f"strategy 'tpu': no TPU found ({error}); use 'auto' on this machine.") from error
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of auto, one-device, mirrored, tpu; got {name!r}.")


# ----------------------------------------------------------------------------- callbacks


def _atomic_save(model: keras.Model, path: Path) -> None:
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    model.save(partial)
    os.replace(partial, path)


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the plain model whenever `monitor` improves; the best value survives a resume.

    Args:
        model_to_save: keras.Model. The model to write (not a training wrapper).
        path: Path. The `.keras` file.
        monitor: str. A log key, higher is better (e.g. "val_dice").
        state: Path. JSON file remembering the best value across resumed runs.
    """

    def __init__(self, model_to_save: keras.Model, path: Path, monitor: str, state: Path):
        super().__init__()
        self.model_to_save, self.path, self.monitor, self.state = model_to_save, path, monitor, state
        self.best = json.loads(state.read_text())["best"] if state.exists() else -math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"monitor {self.monitor!r} not in the logs {sorted(logs or {})}.")
        if math.isfinite(value) and value > self.best and not self.model.stop_training:
            self.best = float(value)
            _atomic_save(self.model_to_save, self.path)
            self.state.write_text(json.dumps({"best": self.best, "epoch": epoch + 1, "monitor": self.monitor}))


class StopOnNaN(keras.callbacks.Callback):
    """Stop training at the first NaN or infinite loss and remember where it happened."""

    def __init__(self):
        super().__init__()
        self.where = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = (self._epoch + 1, batch + 1)
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


# ----------------------------------------------------------------------------- run directory


def _resolve_run_dir(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
    root = Path(config.output_dir)
    if config.name:
        run = root / config.name
        if run.exists() and not resume and not overwrite:
            raise FileExistsError(
                f"run directory {run} already exists; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --name."
            )
        if resume and not run.exists():
            raise FileNotFoundError(f"cannot resume: run directory {run} does not exist.")
        return run
    stem = f"{config.arch}-{config.data.replace(':', '-').replace(os.sep, '-').strip('-.') or 'data'}"
    candidates = [root / stem] + [root / f"{stem}-{k}" for k in range(2, 1000)]
    existing = [c for c in candidates if c.exists()]
    if resume:
        if not existing:
            raise FileNotFoundError(f"cannot resume: no run named {stem}* in {root}.")
        return existing[-1]
    return next(c for c in candidates if not c.exists())


def _read_history(path: Path) -> dict:
    """Read history.csv; an epoch logged twice (a kill between logging and backup) keeps its last row."""
    with open(path, newline="") as handle:
        rows = {int(row["epoch"]): row for row in csv.DictReader(handle)}
    ordered = [rows[epoch] for epoch in sorted(rows)]
    return {key: [float(row[key]) for row in ordered] for key in (ordered[0] if ordered else {})}


# ----------------------------------------------------------------------------- train


def train(
    config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    verbose="auto",
):
    """Train a model as `config` says and write a run directory.

    Args:
        config: TrainConfig, dict or None. The settings; None trains the defaults (the
            built-in synthetic task). Defaults to None.
        resume: bool. Continue an interrupted run from its last finished epoch.
            Defaults to False.
        overwrite: bool. Replace an existing run directory of the same name.
            Defaults to False.
        callbacks: list or None. Extra Keras callbacks for `fit`. Defaults to None.
        verbose: "auto", 0, 1 or 2. Keras' progress output. Defaults to "auto".

    Returns:
        tuple: (run directory Path, history dict {metric: [value per epoch]}).

    Raises:
        TrainingDiverged: the loss became NaN/inf; the best model so far is kept.

    Example:
        >>> run_dir, history = unetpp_tf.train({"epochs": 5, "filters": 8})
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    run = _resolve_run_dir(config, resume, overwrite)
    if resume and (run / "metrics.json").exists() and not (run / "backup").exists():
        raise ValueError(f"run {run} already finished; there is nothing to resume. Start a new run instead.")
    data = load_data(config)
    previous_policy = keras.mixed_precision.global_policy()
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(MIXED_PRECISION[config.mixed_precision])
    try:
        return run, _fit(config, data, run, resume, list(callbacks or []), verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def replica_batches(data: SegmentationData, batch_size: int, replicas: int) -> tuple:
    """The train and validation sets, batched so that `replicas` replicas can split every batch.

    A distribution strategy gives each replica an equal share of a batch; a replica left
    with no images fails in TensorFlow, and Keras builds the distributed model from the
    first batch of each set averaged over the replicas. So a split whose size is not a
    multiple of `replicas` leaves out the remainder (fewer than `replicas` images, with a
    warning): the training set a different few each epoch, as it is reshuffled, and the
    validation set its last few. A split smaller than one batch gets one smaller batch.

    Args:
        data: SegmentationData. Batched by `batch_size`.
        batch_size: int. The global batch size.
        replicas: int. Replicas of the distribution strategy.

    Returns:
        tuple: (train dataset, validation dataset).

    Raises:
        ValueError: `batch_size` is not a multiple of `replicas`, or a split has fewer
            images than replicas.

    Example:
        >>> train_set, val_set = replica_batches(data, 16, strategy.num_replicas_in_sync)
    """
    if replicas == 1:
        return data.train, data.val
    if batch_size % replicas:
        raise ValueError(
            f"batch_size {batch_size} does not split over {replicas} replicas; use a multiple of {replicas}."
        )
    datasets = []
    for split in ("train", "val"):
        dataset, count = getattr(data, split), data.counts[split]
        even = count - count % replicas
        if not even:
            raise ValueError(
                f"the {split} split has {count} image(s), fewer than the {replicas} replicas; "
                "use more data or change --split."
            )
        if even != count:
            which = "a different few each epoch" if split == "train" else "the last ones"
            warnings.warn(
                f"the {split} split's {count} images do not split evenly over {replicas} replicas: "
                f"{count - even} of them are left out ({which}).",
                stacklevel=2,
            )
            dataset = dataset.unbatch().take(even).batch(min(batch_size, even))
        datasets.append(dataset)
    return tuple(datasets)


def _fit(config: TrainConfig, data: SegmentationData, run: Path, resume: bool, extra: list, verbose) -> dict:
    steps = math.ceil(data.counts["train"] / config.batch_size)
    strategy = make_strategy(config.strategy)
    train_set, val_set = replica_batches(data, config.batch_size, strategy.num_replicas_in_sync)
    with strategy.scope():
        model = model_from_config(config, data.channels, data.num_classes)
        final = model.output_names[-1]
        scores = [metrics_module.Dice(num_classes=data.num_classes), metrics_module.IoU(num_classes=data.num_classes)]
        trainer = model
        if config.augment == "device":
            trainer = AugmentedModel(model, make_augmenter(config))
        trainer.compile(
            optimizer=_optimizer(config, steps),
            loss=_loss(config, data.num_classes),
            metrics={final: scores} if len(model.outputs) > 1 else scores,
            jit_compile=use_xla(config.xla),
        )
    monitor = f"val_{final}_dice" if len(model.outputs) > 1 else "val_dice"
    nan_guard = StopOnNaN()
    callbacks = [
        nan_guard,
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=resume),
        BestModelCheckpoint(model, run / "model.keras", monitor, run / "best.json"),
        keras.callbacks.BackupAndRestore(str(run / "backup")),  # last: an epoch counts once all is written
        *extra,
    ]
    if config.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor, mode="max", patience=config.early_stopping))
    if config.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=3, min_lr=1e-6))
    started = time.time()
    run.mkdir(parents=True, exist_ok=True)  # only now: a bad setting above leaves no directory
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if not resume:
        for stale in ("history.csv", "best.json", "model.keras", "metrics.json"):
            (run / stale).unlink(missing_ok=True)
    train_set, val_set = targets_per_head(train_set, model), targets_per_head(val_set, model)
    trainer.fit(
        train_set, validation_data=val_set, epochs=config.epochs, callbacks=callbacks, verbose=verbose, shuffle=False
    )
    if nan_guard.where is not None:
        epoch, batch = nan_guard.where
        if (run / "model.keras").exists():
            kept = f"the last good model is {run / 'model.keras'}"
        else:
            kept = "no epoch finished, so no model was kept"
        raise TrainingDiverged(
            f"loss became NaN at epoch {epoch}, batch {batch}; training stopped and {kept}. "
            "Lower --learning-rate, set --clipnorm, or check the data for bad values."
        )
    history = _read_history(run / "history.csv")
    _finish(config, data, run, history, time.time() - started)
    return history


def _finish(config: TrainConfig, data: SegmentationData, run: Path, history: dict, seconds: float) -> None:
    """Evaluate the best model on the test split, draw figures, export."""
    best = keras.models.load_model(run / "model.keras")
    result = evaluate(best, data.test, num_classes=data.num_classes)
    record = {
        "test": result["metrics"],
        "best_val_dice": json.loads((run / "best.json").read_text())["best"],
        "epochs": len(next(iter(history.values()), [])),
        "parameters": best.count_params(),
        "train_seconds": round(seconds, 1),
        "counts": data.counts,
        "source": data.source,
    }
    figures = run / "figures"
    figures.mkdir(exist_ok=True)
    viz.plot_history(history, path=figures / "curves.png")
    images, masks = next(iter(data.test))
    probabilities = as_single_output(best).predict(images, verbose=0)
    viz.plot_predictions(images, masks, probabilities, path=figures / "predictions.png")
    wanted = {"saved_model": config.export_saved_model, "tflite": config.export_tflite}
    formats = [name for name, on in wanted.items() if on]
    if formats:
        from unetpp_tf.export import export_model  # deferred: it pulls in the TFLite converter

        report = export_model(
            best, run / "export", formats=formats, image_size=config.crop_size or data.image_size,
            samples=data.test.take(2),
        )
        fields = ("path", "size_bytes", "dice_agreement")
        record["export"] = {a["name"]: {k: a[k] for k in fields} for a in report["artifacts"]}
    write_metrics_json(record, run / "metrics.json")
