"""Training runs: data, model, optimizer, callbacks and a run directory holding the results.

`train(config)` is what `unetpp-tf train` calls. A run directory holds:

    config.json       the resolved configuration
    model.keras       the best model by validation Dice (the plain model, no wrapper)
    history.csv       one row per epoch
    metrics.json      test-split metrics of the best model, parameters, timings
    figures/          curves.png, predictions.png
    export/           saved_model/ and model.tflite (float32) unless disabled
    splits.json       folder data and scans: the (image, mask) files of each split
    test_scans.csv    scans: Dice, IoU and surface distances (mm) of each test scan
    best.json         the best validation Dice and its epoch
    backup/           only while a run is unfinished: what `resume=True` continues from
                      (`unetpp_tf.checkpoints`)

Every file is written through a temporary name (`unetpp_tf.files`), so a run killed at any
instant resumes: `train(config, resume=True)` continues from the last finished epoch with the
weights, optimizer, schedule position, callback counters and input stream of that epoch, and
ends with the same weights as a run that was never interrupted (one device, same seed).

A run over a pretrained encoder with `freeze_encoder_epochs` = N trains in two phases
(`training_phases`): epochs 1..N the decoder alone, the encoder frozen with its BatchNorm in
inference mode; then every layer with a fresh optimizer at `finetune_lr_factor` times the
learning rate. history.csv gets an `encoder_frozen` column (1, then 0), metrics.json the
phases, and the log a line where each begins; a resumed run continues in its phase.

Plain Keras works too: the datasets, losses and metrics are ordinary Keras objects, so
`model.fit(data.train, validation_data=data.val)` needs nothing from this module.

Scans (CT/MRI volumes) go through the same loop; what differs (patches, the 3D augmenter and
pooling, scan-by-scan scoring) lives in `unetpp_tf.volume_training`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unetpp_tf import losses as losses_module
from unetpp_tf import distributed
from unetpp_tf import metrics as metrics_module
from unetpp_tf import postprocess
from unetpp_tf import viz
from unetpp_tf.checkpoints import (
    BestModelCheckpoint,
    HistoryFile,
    RunBackup,
    read_backup,
    read_history_rows,
    restore_variables,
)
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
from unetpp_tf.evaluation import evaluate
from unetpp_tf.files import PARTIAL_PREFIX, temporary_name, write_json
from unetpp_tf.inference import as_single_output
from unetpp_tf.models import build_model, encoder_layers, from_preset
from unetpp_tf import volume_training

MIXED_PRECISION = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
MONITOR = "val_dice"

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
CONFIG_FILE = "config.json"
BACKUP_DIR = "backup"
# Settings a resumed run may change: where the run is, what is exported and chosen at the end, and where
# its workers are (a multi-worker run may resume on other machines, or on another number of them)
RESUME_FREE = ("name", "output_dir", "export_saved_model", "export_tflite", "export_onnx", "postprocess",
               "coordinator", "num_processes", "process_id", "init_timeout")
CLUSTER_FIELDS = ("coordinator", "num_processes", "process_id", "init_timeout")


def read_splits(run) -> dict:
    """The (image, mask) files of each split that a run recorded in `splits.json`.

    Args:
        run: str or Path. The run directory.

    Returns:
        dict: {"train": [[image, mask], ...], "val": ..., "test": ..., ...}.

    Example:
        >>> data = load_data(config, splits=read_splits("saved_models/run1"))
    """
    path = Path(run) / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run recorded no file splits (not folder data?).")
    recorded = json.loads(path.read_text())
    return {split: recorded[split] for split in ("train", "val", "test")}


class TrainingDiverged(FloatingPointError):
    """Raised when the loss became NaN or infinite; the last good model is kept."""


# ----------------------------------------------------------------------------- data / model


def make_augmenter(config: TrainConfig) -> keras.layers.Layer:
    """The augmenter a configuration describes, seeded with the run's seed (scans: `scan_augmenter`).

    Example:
        >>> make_augmenter(TrainConfig(augmentation={"rotation": 0.1, "zoom": 0.1}))
    """
    if config.on_scans:
        return volume_training.scan_augmenter(config)
    valid = [name for name in inspect.signature(SegmentationAugmenter).parameters if name not in ("seed", "kwargs")]
    unknown = sorted(set(config.augmentation) - set(valid))
    if unknown:
        raise ValueError(f"augmentation: unknown setting(s) {unknown}; valid settings are {valid}.")
    return SegmentationAugmenter(**config.augmentation, seed=config.seed)


def load_data(config: TrainConfig, splits: dict | None = None) -> SegmentationData:
    """Open the data a configuration names (synthetic, a folder, or tfds:NAME).

    Args:
        config: TrainConfig. The data settings.
        splits: dict or None. Folder data only: the (image, mask) files of each split, as a
            run records them in `splits.json`, instead of splitting the folder anew.
            Defaults to None.

    Example:
        >>> data = load_data(TrainConfig(data="my_folder", image_size=(128, 128)))
    """
    host_augment = make_augmenter(config) if config.augment == "host" else None
    if config.on_scans:
        return volume_training.load_scans(config, splits=splits, augment=host_augment)
    common = dict(batch_size=config.batch_size, split=config.split, seed=config.seed, augment=host_augment)
    folder = dict(
        image_size=config.image_size, crop_size=config.crop_size, channels=config.channels,
        num_classes=config.num_classes, group_by=config.group_by, splits=splits,
        skip_invalid=config.skip_invalid, **common,
    )
    if config.images or config.masks:
        return from_directory(images=config.images, masks=config.masks, **folder)
    if config.data == "synthetic" or config.data.startswith("tfds:"):
        for flag, value in (
            ("--group-by", config.group_by), ("--folds", config.folds), ("--skip-invalid", config.skip_invalid)
        ):
            if value:
                raise ValueError(f"{flag} needs a folder dataset (files to group and record), not {config.data!r}.")
    if config.data == "synthetic":
        return synthetic(
            config.num_samples, image_size=config.image_size, task=config.task, channels=config.channels or 1, **common
        )
    if config.data.startswith("tfds:"):
        return from_tfds(config.data[5:], image_size=config.image_size, num_classes=config.num_classes, **common)
    return from_directory(config.data, **folder)


def model_from_config(
    config: TrainConfig, channels: int, num_classes: int, preprocessing: dict | None = None, pool_sizes=None
) -> keras.Model:
    """Build the model a configuration describes, for `channels` inputs and `num_classes`.

    UNet++ and U-Net on their own encoder or a pretrained one, or DeepLabV3+. A pretrained
    encoder's BatchNorm layers take the run's `bn_momentum` as the decoder's do (the builders
    see to it).

    Args:
        config: TrainConfig. The model settings.
        channels: int. Input channels.
        num_classes: int. 1 for binary, K > 1 for K classes.
        preprocessing: dict or None. Settings of the model's `InputPreprocessing` layer
            (see `preprocessing_for`); None builds the model without one. Defaults to None.
        pool_sizes: list or None. 3D models (scans, `volume_mode="3d"`): the pooling per
            level (`unetpp_tf.volume_training.pool_sizes_for`); None pools 2x on every axis.
            Defaults to None.

    Example:
        >>> model = model_from_config(TrainConfig(filters=8, depth=3), channels=1, num_classes=1)
        >>> model = model_from_config(TrainConfig(encoder="mobilenetv2"), channels=3, num_classes=1)
    """
    spatial = (None, None, None) if config.volumetric else (None, None)
    shape = dict(input_shape=(*spatial, channels), num_classes=num_classes, preprocessing=preprocessing)
    if pool_sizes is not None:
        shape["pool_sizes"] = pool_sizes
    encoder = {key: value for key, value in (("encoder", config.encoder), ("encoder_weights", config.encoder_weights))
               if value is not None}  # unset: the builder's default (DeepLabV3+: resnet50)
    if config.arch == "deeplabv3plus":
        dropout = {} if config.dropout is None else dict(dropout=config.dropout)
        model = build_model(
            config.arch, batch_norm=config.batch_norm, bn_momentum=config.bn_momentum, **dropout, **encoder, **shape
        )
    else:
        shape["recompute"] = config.recompute
        if config.arch == "unetpp":
            shape["deep_supervision"] = config.deep_supervision
        if config.preset:
            return from_preset(config.preset, arch=config.arch, **shape)
        model = build_model(
            config.arch, depth=config.depth, filters=config.filters, batch_norm=config.batch_norm,
            bn_momentum=config.bn_momentum, dropout=config.dropout or 0.0, l2=config.l2, upsampling=config.upsampling,
            **encoder, **shape,
        )
    return model


def check_encoder_weights(config: TrainConfig) -> None:
    """Refuse, before any data is read, an `encoder_weights` file that does not exist.

    Example:
        >>> check_encoder_weights(TrainConfig(encoder="resnet50", encoder_weights="resnet50.weights.h5"))
    """
    path = config.encoder_weights
    if path is not None and path != "imagenet" and not os.path.isfile(path):
        raise FileNotFoundError(
            f"--encoder-weights {path}: no such file; pass 'imagenet', the path of a Keras weights file of the "
            "encoder (written by save_weights, or the file keras.applications downloads), or leave it unset "
            "for random initialization."
        )


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained with one optimizer and one set of trainable layers.

    Attributes:
        name: str. "train" (a run that never freezes), "frozen_encoder" or "fine_tune".
        first_epoch: int. Its first epoch, 0-based.
        end_epoch: int. One past its last epoch.
        learning_rate: float. The peak learning rate of its schedule.
        encoder_frozen: bool. Whether the encoder's layers are frozen.
    """

    name: str
    first_epoch: int
    end_epoch: int
    learning_rate: float
    encoder_frozen: bool = False


def training_phases(config: TrainConfig) -> list[Phase]:
    """The phases of a run: one, or with `freeze_encoder_epochs` = N a frozen phase then fine-tuning.

    Epochs 1..N train the decoder on the frozen encoder (its BatchNorm layers in inference
    mode) at `learning_rate`; the remaining epochs train every layer at `learning_rate *
    finetune_lr_factor` with a fresh optimizer. Each phase has its own warm-up and cosine decay.

    Example:
        >>> [p.name for p in training_phases(TrainConfig(encoder="resnet50", freeze_encoder_epochs=3))]
        ['frozen_encoder', 'fine_tune']
    """
    frozen = config.freeze_encoder_epochs
    if not frozen:
        return [Phase("train", 0, config.epochs, config.learning_rate)]
    phases = [Phase("frozen_encoder", 0, frozen, config.learning_rate, encoder_frozen=True)]
    if frozen < config.epochs:
        phases.append(Phase("fine_tune", frozen, config.epochs, config.learning_rate * config.finetune_lr_factor))
    return phases


@contextlib.contextmanager
def layers_trainable(layers):
    """Make `layers` trainable inside the block and put their previous state back after.

    A model saved during a frozen phase is written this way, so the file records the model,
    not the phase of training it was in.

    Example:
        >>> with layers_trainable(encoder_layers(model)):
        ...     model.save("model.keras")
    """
    states = [layer.trainable for layer in layers]
    for layer in layers:
        layer.trainable = True
    try:
        yield
    finally:
        for layer, state in zip(layers, states):
            layer.trainable = state


def intensity_percentiles(dataset, percentiles=(1.0, 99.0, 99.8), max_pixels: int = 4_000_000) -> dict:
    """Percentiles of the image intensities of a dataset of (images, masks) batches.

    Reads batches until about `max_pixels` values are collected (all of a small dataset).

    Args:
        dataset: iterable of (images, masks) batches, e.g. `data.train`.
        percentiles: tuple of floats in [0, 100]. Defaults to (1.0, 99.0, 99.8).
        max_pixels: int. Stop reading once this many values are collected. Defaults to 4e6.

    Returns:
        dict: {percentile: value} as floats.

    Example:
        >>> intensity_percentiles(data.train)[99.0]
    """
    parts, seen = [], 0
    for images, _ in dataset:
        values = np.asarray(images, np.float32).ravel()
        parts.append(values)
        seen += values.size
        if seen >= max_pixels:
            break
    if not parts:
        raise ValueError("the training split is empty: no images to measure.")
    found = np.percentile(np.concatenate(parts), percentiles)
    return {float(p): float(v) for p, v in zip(percentiles, found)}


# Below this 99th percentile (as a fraction of the dtype's range) "fixed" scaling leaves images nearly black.
DIM_FRACTION = 0.01


def preprocessing_for(config: TrainConfig, data: SegmentationData) -> dict | None:
    """The model's input preprocessing for a run: normalization and the training geometry.

    "dataset" normalization maps the training split's 1st..99.8th intensity percentiles to
    0..1. With "fixed" (divide by the dtype's range), images whose 99th percentile stays
    under 1% of that range (a 16-bit file holding 12-bit camera data) warn once with the fix.

    Args:
        config: TrainConfig. `normalize`, `crop_size` and `data` are read.
        data: SegmentationData. The opened data (its train split is measured).

    Returns:
        dict or None: keyword arguments of `unetpp_tf.models.InputPreprocessing`; None for
        scans, which the pipeline windows (the run's `window` and `spacing` say how).

    Example:
        >>> preprocessing_for(TrainConfig(normalize="dataset"), data)["normalize"]
        'dataset'
    """
    if config.on_scans:
        return None
    settings = dict(normalize=config.normalize, image_size=data.image_size, resize=_resize_policy(config, data))
    if config.normalize in ("fixed", "dataset"):
        levels = intensity_percentiles(data.train)
        if config.normalize == "dataset":
            settings.update(low=levels[1.0], high=max(levels[99.8], levels[1.0] + 1e-6))
        elif levels[99.0] < DIM_FRACTION:
            warnings.warn(
                f"with --normalize fixed the training images are almost black: 99% of their pixels are below "
                f"{levels[99.0]:.2%} of their type's range (16-bit files holding 12-bit data?); "
                "use --normalize dataset or --normalize percentile.",
                stacklevel=2,
            )
    return settings


def _resize_policy(config: TrainConfig, data: SegmentationData) -> str:
    """How training images met the model: "crop" (random crops at native scale), "resize"
    (resized to `image_size`) or "none" (already that size: synthetic data, or tiles cut to it).

    Only "resize" makes `predict` resize new images, so a model trained on 64x64 tiles cut from
    large images still predicts a large image at its native scale.
    """
    if config.crop_size:
        return "crop"
    if not config.image_size or config.data == "synthetic" and not (config.images or config.masks):
        return "none"
    if not data.files:  # tensorflow-datasets: images of any size were resized
        return "resize"
    from PIL import Image

    sizes = set()
    for image, _ in data.files["train"]:
        with Image.open(image) as opened:
            sizes.add((opened.height, opened.width))
    return "none" if sizes == {tuple(config.image_size)} else "resize"


def training_schedule(config: TrainConfig, train_count: int) -> dict:
    """Steps per epoch and in total: at least `min_steps` optimizer steps, whatever the data size.

    A tiny training split gives few steps per epoch (96 images at batch 16: 6), too few for
    the weights to converge in a usual number of epochs. When `epochs` full passes give fewer
    than `min_steps` steps, each epoch is stretched to `ceil(min_steps / epochs)` steps by
    repeating the (reshuffled) training split; the returned `note` says so.

    Args:
        config: TrainConfig. `epochs`, `batch_size` and `min_steps` are read.
        train_count: int. Images in the training split.

    Returns:
        dict: `steps_per_epoch`, `total_steps`, `passes_per_epoch` (float) and `note` (str or None).

    Example:
        >>> training_schedule(TrainConfig(epochs=40, batch_size=16, min_steps=1000), 96)["steps_per_epoch"]
        25
    """
    full = max(1, math.ceil(train_count / config.batch_size))
    steps = max(full, math.ceil(config.min_steps / config.epochs))
    note = None
    if steps > full:
        note = (
            f"small training split: {train_count} images give {full} step(s) per epoch, "
            f"{full * config.epochs} in {config.epochs} epochs; each epoch runs {steps} steps "
            f"(the split repeated, reshuffled) for {steps * config.epochs} steps in all "
            f"(--min-steps {config.min_steps})"
        )
    return dict(
        steps_per_epoch=steps, total_steps=steps * config.epochs, passes_per_epoch=steps / full, note=note
    )


def _loss(config: TrainConfig, num_classes: int) -> keras.losses.Loss:
    name = config.loss if config.loss != "auto" else ("bce_dice" if num_classes == 1 else "ce_dice")
    return losses_module.get(name)


def _optimizer(config: TrainConfig, total_steps: int, rate: float) -> keras.optimizers.Optimizer:
    if config.schedule == "cosine":
        warmup = min(config.warmup_steps, total_steps // 2)
        rate = keras.optimizers.schedules.CosineDecay(
            rate / 10 if warmup else rate,
            decay_steps=total_steps - warmup,
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
    """Whether to XLA-compile the train step: "on", "off", or "auto".

    On TensorFlow "auto" compiles only with a GPU or TPU: on this project's 2-core CPU
    benchmark XLA made training slower (7.4 vs 11.0 images/s for the paper UNet++ at 96x96,
    batch 16), as TensorFlow's oneDNN kernels beat XLA's CPU code. On JAX every step is
    XLA-compiled ("off" runs op by op, for debugging).

    Example:
        >>> model.compile(..., jit_compile=use_xla("auto"))
    """
    if setting != "auto":
        return setting == "on"
    if keras.backend.backend() != "tensorflow":
        return True
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


class KerasDistribution:
    """The strategy object of a run on JAX: Keras' distribution API is global, so `scope()` is empty.

    `num_replicas_in_sync` is the number of devices every global batch is split over.
    """

    def __init__(self, replicas: int):
        self.num_replicas_in_sync = replicas

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(name: str = "auto"):
    """Return the strategy for "auto", "one-device", "mirrored", "tpu" or "multi-worker".

    On TensorFlow these are tf.distribute strategies: "auto" mirrors over all local GPUs
    when there are several and otherwise uses the default strategy; "mirrored" uses all
    local GPUs, or all logical CPU devices when there is no GPU. On JAX, "auto" spreads each
    batch over all local devices with `keras.distribution.DataParallel` when there are
    several, and "multi-worker" over every device of every worker (`unetpp_tf.distributed.start`
    must have joined them). Multi-host training runs on JAX: Keras 3 `fit` fails with
    TensorFlow's MultiWorkerMirroredStrategy across real workers (keras issue 20585).

    Example:
        >>> with make_strategy("mirrored").scope():
        ...     model = build_unetpp()
    """
    distributed.check_backend(name)
    if keras.backend.backend() != "tensorflow":
        import jax

        if name == "multi-worker":
            return KerasDistribution(jax.device_count())
        if jax.local_device_count() > 1 and keras.distribution.distribution() is None:
            keras.distribution.set_distribution(keras.distribution.DataParallel())
        return KerasDistribution(jax.local_device_count() if keras.distribution.distribution() else 1)
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
    raise ValueError(f"strategy must be one of auto, one-device, mirrored, tpu, multi-worker; got {name!r}.")


# ----------------------------------------------------------------------------- callbacks


class ValidationDice(keras.callbacks.Callback):
    """Add `val_dice` and `val_iou` of the output that evaluation, prediction and export use.

    For a deep-supervision model that output is the mean of the heads ("accurate" mode), which
    Keras' per-output metrics do not score; the values come from `evaluate`, the function
    that scores the test split, so checkpoint selection and the final metrics agree. Place it
    before the callbacks that read the logs.

    Args:
        model_to_score: keras.Model. The (multi-output) model being trained.
        dataset: tf.data.Dataset. Validation batches of (images, masks).
        num_classes: int. 1 for binary, K for K classes.
        local: bool. Score a copy of the model outside the Keras distribution (multi-worker
            runs). Defaults to False.

    Example:
        >>> callbacks = [ValidationDice(model, data.val, data.num_classes), CSVLogger(...)]
    """

    def __init__(self, model_to_score: keras.Model, dataset, num_classes: int, local: bool = False):
        super().__init__()
        self.scored, self.dataset, self.num_classes = as_single_output(model_to_score), dataset, num_classes
        self.local, self.copy = local, None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.local:  # multi-worker: every worker scores the whole split on its own copy, so all agree
            if self.copy is None:
                self.copy = distributed.local_copy(self.scored)
            with distributed.outside_distribution():
                distributed.sync_weights(self.scored, self.copy)
                metrics = evaluate(self.copy, self.dataset, num_classes=self.num_classes)["metrics"]
        else:
            metrics = evaluate(self.scored, self.dataset, num_classes=self.num_classes)["metrics"]
        logs["val_dice"], logs["val_iou"] = metrics["dice"], metrics["iou"]


class PhaseRecord(keras.callbacks.Callback):
    """Log `encoder_frozen` (1 or 0) with every epoch, so history.csv shows where the encoder unfroze.

    Place it before the callbacks that write the logs.

    Example:
        >>> callbacks = [PhaseRecord(encoder_frozen=True), HistoryFile(run / "history.csv")]
    """

    def __init__(self, encoder_frozen: bool):
        super().__init__()
        self.encoder_frozen = encoder_frozen

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["encoder_frozen"] = float(self.encoder_frozen)


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


def resolve_run_dir(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
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


def check_writable(run: Path) -> None:
    """Refuse, before anything is written, a run directory that cannot be created or written.

    Raises:
        PermissionError: the folder (or the nearest existing folder above it) is read-only.
        FileExistsError: a file stands where a folder is needed.

    Example:
        >>> check_writable(Path("saved_models/run1"))
    """
    existing = run
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(
            f"cannot create the run directory {run}: {existing} is a file, not a folder; choose another --output-dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == run else f"{existing} is"
        raise PermissionError(
            f"cannot write the run directory {run}: {where} not writable (read-only); choose a writable --output-dir."
        )


def check_resumable(run: Path, config: TrainConfig) -> None:
    """Refuse to resume `run` with settings other than the ones it recorded in config.json.

    Only the settings in `RESUME_FREE` (where the run is, what it exports) may change; a
    setting the file lacks (added to `TrainConfig` since) counts as its default.

    Raises:
        ValueError: naming each differing setting with its recorded and its new value.

    Example:
        >>> check_resumable(Path("saved_models/run1"), TrainConfig(name="run1", epochs=30))
    """
    path = run / CONFIG_FILE
    if not path.is_file():  # killed before its first write: nothing to compare
        return
    try:
        recorded = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); pass --overwrite to start the run again.") from None
    recorded = {**TrainConfig().to_dict(), **recorded}  # a setting added since the run started has its default
    now = config.to_dict()
    changed = [k for k in sorted(set(recorded) | set(now)) if k not in RESUME_FREE and recorded.get(k) != now.get(k)]
    if changed:
        listed = "; ".join(f"{k}: {json.dumps(recorded.get(k))} -> {json.dumps(now.get(k))}" for k in changed)
        raise ValueError(
            f"cannot resume {run} with other settings than it was trained with ({listed}). Resume with the "
            "recorded settings (see its config.json), or pass --overwrite to start the run again."
        )


def run_finished(run: Path) -> bool:
    """Whether a run directory holds a finished run (its metrics written, no backup left)."""
    return (run / "metrics.json").exists() and not (run / BACKUP_DIR).exists()


def prepare_run_dir(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """The run directory to train into, checked: writable, and for a resume unfinished and same settings.

    Example:
        >>> run = prepare_run_dir(config, resume=True, overwrite=False)
    """
    run = resolve_run_dir(config, resume, overwrite)
    check_writable(run)
    if resume:
        if run_finished(run):
            raise ValueError(f"run {run} already finished; there is nothing to resume. Start a new run instead.")
        check_resumable(run, config)
    return run


def _read_history(path: Path) -> dict:
    """history.csv as {metric: [value per epoch]} (a value an epoch did not log is NaN)."""
    rows = read_history_rows(path)
    keys = [key for key in (rows[0] if rows else {}) if key != "epoch"]
    return {key: [float(row[key]) if row.get(key) else math.nan for row in rows] for key in keys}


def _remove_backup(run: Path) -> None:
    """Delete a finished run's backup: renamed away first, so a kill leaves it whole or gone."""
    backup = run / BACKUP_DIR
    if backup.exists():
        doomed = temporary_name(backup)
        os.replace(backup, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ----------------------------------------------------------------------------- train


def train(
    config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    splits: dict | None = None,
    callbacks: list | None = None,
    verbose="auto",
):
    """Train a model as `config` says and write a run directory.

    With `config.folds` = K >= 2 this trains K models on K disjoint validation folds and
    their ensemble (`unetpp_tf.crossval.train_folds`).

    Args:
        config: TrainConfig, dict or None. The settings; None trains the defaults (the
            built-in synthetic task). Defaults to None.
        resume: bool. Continue an interrupted run from its last finished epoch, on the
            files it recorded in `splits.json`, with the settings it recorded in
            `config.json` (other settings are refused). Defaults to False.
        overwrite: bool. Replace an existing run directory of the same name.
            Defaults to False.
        splits: dict or None. Folder data: the (image, mask) files of each split to use
            instead of splitting the folder. Defaults to None.
        callbacks: list or None. Extra Keras callbacks for `fit`. Defaults to None.
        verbose: "auto", 0, 1 or 2. Keras' progress output. Defaults to "auto".

    Returns:
        tuple: (run directory Path, history dict {metric: [value per epoch]}).

    Random seeds are set from `config.seed` for the run; Python's and NumPy's global random
    states are put back afterwards (`training_policy`).

    Raises:
        TrainingDiverged: the loss became NaN/inf; the best model so far is kept.
        ValueError: `resume` with settings other than the run's.
        PermissionError: the output directory is read-only (nothing is written).
        OSError: a file could not be written (a full disk): the error names it, and the
            last backup and best model stay intact for `resume`.

    Example:
        >>> run_dir, history = unetpp_tf.train({"epochs": 5, "filters": 8})
    """
    config = as_config(config)
    if config.folds and config.strategy == "multi-worker":
        raise ValueError("--folds with --strategy multi-worker is not supported: train the folds on one machine, "
                         "or one run without --folds across the workers.")
    if config.folds:
        from unetpp_tf.crossval import train_folds  # deferred: crossval builds on this module

        return train_folds(config, resume=resume, overwrite=overwrite, callbacks=callbacks, verbose=verbose)
    cluster = _join_workers(config) if config.strategy == "multi-worker" else None
    reader = cluster is not None and not cluster.is_chief  # a worker that reads the chief's run directory
    if reader:
        run = Path(config.output_dir) / config.name
        if resume and not run.exists():
            raise FileNotFoundError(f"cannot resume: run directory {run} does not exist (workers read the chief's).")
    else:
        run = prepare_run_dir(config, resume, overwrite)
    config.check_training_size()
    if not (resume and (run / BACKUP_DIR).exists()):  # a resumed run takes its weights from the backup
        check_encoder_weights(config)
    if config.freeze_encoder_epochs and config.encoder_weights is None:
        warnings.warn(
            "--freeze-encoder-epochs with a randomly initialized encoder (no --encoder-weights): the frozen "
            "epochs train the decoder on random features.",
            stacklevel=2,
        )
    if resume and splits is None and (run / SPLITS_FILE).exists():
        splits = read_splits(run)
    # the other workers write what the training loop writes (history, checkpoints, backup) into a scratch
    # folder deleted afterwards; the chief alone writes the run directory, scores and exports
    writes = Path(tempfile.mkdtemp(prefix=f"unetpp-worker{cluster.process_id}-")) if reader else run
    try:
        with training_policy(config):
            data = load_data(config, splits=splits)
            history = _fit(config, data, writes, resume, list(callbacks or []), verbose, cluster=cluster,
                           resume_from=run)
        if cluster:
            _all_workers_done()
    finally:
        if reader:
            shutil.rmtree(writes, ignore_errors=True)
    return run, history


def _join_workers(config: TrainConfig) -> distributed.Cluster:
    """Join the other workers of a multi-worker run (`unetpp_tf.distributed.start`)."""
    if not config.name:
        raise ValueError(
            "--strategy multi-worker needs --name, so that every worker names the same run directory "
            "(the chief writes it, the others read it to resume)."
        )
    distributed.check_backend(config.strategy)
    cluster = distributed.Cluster.from_settings(config.coordinator, config.num_processes, config.process_id)
    shared = {k: v for k, v in config.to_dict().items() if k not in CLUSTER_FIELDS}  # what all must agree on
    distributed.start(cluster, config.batch_size, settings=shared, timeout=config.init_timeout)
    if cluster.process_id is None:  # detected by JAX (SLURM, Open MPI)
        import jax

        cluster = dataclasses.replace(cluster, num_processes=jax.process_count(), process_id=jax.process_index())
    return cluster


def _all_workers_done() -> None:
    """Wait until every worker got here (the chief after scoring and exporting the run)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("unetpp_tf run finished")


def as_config(config: TrainConfig | dict | None) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a dict of settings, or None (the defaults)."""
    if config is None:
        return TrainConfig()
    return TrainConfig.from_dict(config) if isinstance(config, dict) else config


@contextlib.contextmanager
def training_policy(config: TrainConfig):
    """Seed the random streams and set the mixed-precision policy for the block; put both back after.

    Python's and NumPy's global random states, TensorFlow's global seed and the mixed-precision
    policy are restored on leaving, so a caller's own random streams continue as if the block
    had not run. Keras' global seed generator (used by `keras.random` calls given no seed)
    keeps `config.seed`: Keras offers no way to read it back.

    Example:
        >>> with training_policy(TrainConfig(seed=3)):
        ...     model = model_from_config(config, channels=1, num_classes=1)
    """
    previous_policy = keras.mixed_precision.global_policy()
    python_state, numpy_state, tf_seed = random.getstate(), np.random.get_state(), _tf_global_seed()
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(MIXED_PRECISION[config.mixed_precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        tf.random.set_seed(tf_seed)


def _tf_global_seed() -> int | None:
    """TensorFlow's global seed, None when unset (asked so that nothing is drawn when it is unset)."""
    if tf.compat.v1.random.get_seed(None) == (None, None):
        return None
    return tf.compat.v1.random.get_seed(1)[0]


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


def _fit(config: TrainConfig, data: SegmentationData, run: Path, resume: bool, extra: list, verbose,
         cluster: distributed.Cluster | None = None, resume_from: Path | None = None) -> dict:
    """Train into `run` (a resumed run reads its backup from `resume_from`, by default `run`).

    With a `cluster` (multi-worker), each worker feeds its slice of every global batch; only
    the chief (whose `run` is the run directory) scores and exports at the end.
    """
    resume_from = resume_from or run
    strategy = make_strategy(config.strategy)
    replicas = strategy.num_replicas_in_sync
    train_set, val_set = replica_batches(data, config.batch_size, replicas)
    schedule = training_schedule(config, data.counts["train"] - data.counts["train"] % replicas)
    if schedule["note"]:
        logger.info(schedule["note"])
    preprocessing = preprocessing_for(config, data)  # reads the training split (see _fresh_train_set)
    state = read_backup(resume_from / BACKUP_DIR) if resume else None
    with strategy.scope():
        # a resumed run's weights come from its backup: the encoder's initial weights are not loaded again
        built = dataclasses.replace(config, encoder_weights=None) if state else config
        pools = volume_training.pool_sizes_for(config, data)  # 3D: pooling for the scans' spacing
        model = model_from_config(built, data.channels, data.num_classes, preprocessing, pools)
        trainer = AugmentedModel(model, make_augmenter(config)) if config.augment == "device" else model
    _clean_run_dir(run, resume)
    start = state["epoch"] if state else 0
    phases = training_phases(config)
    freezable = encoder_layers(model) if config.freeze_encoder_epochs else []
    if config.freeze_encoder_epochs and not freezable:
        raise ValueError(f"--freeze-encoder-epochs: model {model.name!r} has no encoder layers to freeze.")
    nan_guard = StopOnNaN()
    best = state["best"] if state else -math.inf
    checkpoint = BestModelCheckpoint(
        model, run / "model.keras", MONITOR, run / "best.json", best=best, saving=lambda: layers_trainable(freezable)
    )
    local = cluster is not None and cluster.num_processes > 1
    scoring = [ValidationDice(model, val_set, data.num_classes, local=local)] if len(model.outputs) > 1 else []
    history_file = HistoryFile(run / "history.csv", start_epoch=start)
    started = time.time()
    run.mkdir(parents=True, exist_ok=True)  # only now: a bad setting above leaves no directory
    # without where the workers were: a resumed run (each worker reading the chief's file) gives its own
    write_json(run / CONFIG_FILE, {k: v for k, v in config.to_dict().items() if k not in CLUSTER_FIELDS})
    if data.files:
        write_json(run / SPLITS_FILE, data.files)
        skipped = data.files.get("skipped")
        if skipped:
            logger.info(f"skipped {len(skipped)} invalid image/mask pair(s), listed in {run / SPLITS_FILE}")
    steps = schedule["steps_per_epoch"]
    val_set = _worker_part(targets_per_head(val_set, model), cluster)
    stopped = bool((state or {}).get("stopped"))
    for phase in phases:
        if phase.end_epoch <= start or stopped or nan_guard.where is not None:
            continue
        first = max(start, phase.first_epoch)
        with strategy.scope():
            for layer in freezable:
                layer.trainable = not phase.encoder_frozen
            _compile(trainer, config, model, data.num_classes, (phase.end_epoch - phase.first_epoch) * steps,
                     phase.learning_rate)
            restored = None
            if state and first == start:  # the phase this resumed run continues
                same_phase = state.get("phase", "train") == phase.name
                # at the boundary the backup holds the previous phase's optimizer: this phase starts a fresh one
                restore_variables(trainer, resume_from / BACKUP_DIR, state, optimizer=same_phase)
                restored = state if same_phase else None
        if config.freeze_encoder_epochs:
            logger.info(_phase_note(phase, first, config, len(freezable)))
        stateful = _stateful_callbacks(config, last_phase=phase is phases[-1])
        callbacks = [
            *scoring,  # first: the callbacks below read the val_dice it adds
            *([PhaseRecord(phase.encoder_frozen)] if config.freeze_encoder_epochs else []),
            nan_guard,
            history_file,
            checkpoint,
            *stateful.values(),
            RunBackup(  # after the others: an epoch counts once all they write is written
                run / BACKUP_DIR, stateful, best=lambda: checkpoint.best,
                skip=lambda: nan_guard.where is not None, restored=restored, phase=phase.name,
            ),
            *extra,
        ]
        # One stream of batches for the whole run: each phase (and a resumed run) reads a fresh copy
        # of the training split and skips the batches of the epochs before it, so the shuffles,
        # random crops and host augmentation continue where they stopped.
        phase_train = train_set if first == start else _fresh_train_set(config, data, replicas)
        stream = _worker_part(targets_per_head(phase_train.repeat().skip(first * steps), model), cluster)
        if keras.backend.backend() == "jax":
            # Keras' JAX fit builds freshly compiled metrics from the first batch of the stream and does not
            # train on that batch, so a resumed run would lose another one: build them on a validation batch
            trainer.evaluate(val_set.take(1), verbose=0)
        trainer.fit(
            stream, validation_data=val_set, epochs=phase.end_epoch, initial_epoch=first, steps_per_epoch=steps,
            callbacks=callbacks, verbose=verbose, shuffle=False,
        )
        stopped = bool(trainer.stop_training)
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
    record = {
        "best_val_dice": checkpoint.best,
        "epochs": len(next(iter(history.values()), [])),
        "train_seconds": round(time.time() - started, 1),
        "backend": keras.backend.backend(),
        "workers": cluster.num_processes if cluster else 1,
        "schedule": {k: v for k, v in schedule.items() if k != "note"},
        "preprocessing": preprocessing,
    }
    if config.freeze_encoder_epochs:
        record["phases"] = [
            {"name": p.name, "epochs": [p.first_epoch + 1, p.end_epoch],
             "learning_rate": float(f"{p.learning_rate:.12g}"), "encoder_frozen": p.encoder_frozen}
            for p in phases
        ]
    if cluster is not None and not cluster.is_chief:
        return history
    with distributed.outside_distribution() if cluster else contextlib.nullcontext():
        finish_run(config, data, run, record, history)
    _remove_backup(run)  # last: until metrics.json is written, a resume can finish the run
    return history


def _worker_part(dataset, cluster: distributed.Cluster | None):
    """This worker's slice of every batch in a multi-worker run; the dataset itself otherwise."""
    if cluster is None:
        return dataset
    return distributed.worker_slice(dataset, cluster.process_id, cluster.num_processes)


def _phase_note(phase: Phase, first: int, config: TrainConfig, layers: int) -> str:
    """The log line that announces a phase of a run with a frozen start."""
    epochs = f"epochs {first + 1}-{phase.end_epoch}" if phase.end_epoch > first + 1 else f"epoch {first + 1}"
    if phase.encoder_frozen:
        return (f"{epochs}: encoder frozen ({layers} layers, BatchNorm in inference mode), training the decoder "
                f"at learning rate {phase.learning_rate:g}")
    return (f"{epochs}: encoder unfrozen, fine-tuning every layer at learning rate {phase.learning_rate:g} "
            f"({config.finetune_lr_factor:g} x --learning-rate)")


def _fresh_train_set(config: TrainConfig, data: SegmentationData, replicas: int):
    """The training split opened again as a new (resumed) process opens it, so its random streams
    (shuffles, crops, host augmentation) are where a resumed run finds them.

    Each iterator over a split draws the next shuffle order, and `_fit` reads newly opened data
    once (`preprocessing_for` measures it) before its training stream: so does this.
    """
    splits = {split: data.files[split] for split in ("train", "val", "test")} if data.files else None
    fresh = load_data(config, splits=splits)
    preprocessing_for(config, fresh)
    return replica_batches(fresh, config.batch_size, replicas)[0]


def _compile(trainer: keras.Model, config: TrainConfig, model: keras.Model, num_classes: int, total_steps: int,
             rate: float) -> None:
    """Compile the model `fit` runs (`model` or its augmenting wrapper) for a phase; build its optimizer."""
    final = model.output_names[-1]
    scores = [metrics_module.Dice(num_classes=num_classes), metrics_module.IoU(num_classes=num_classes)]
    trainer.compile(
        optimizer=_optimizer(config, total_steps, rate),
        loss=_loss(config, num_classes),
        metrics={final: scores} if len(model.outputs) > 1 else scores,
        jit_compile=use_xla(config.xla),
    )
    trainer.optimizer.build(trainer.trainable_variables)  # now, so a backup can fill it before fit


def _stateful_callbacks(config: TrainConfig, last_phase: bool = True) -> dict:
    """The schedule and stopping callbacks of a phase, by the name their backup state uses.

    Each phase starts them afresh; early stopping watches the last phase only (after a frozen
    start, the fine-tuning epochs).
    """
    stateful = {}
    if config.schedule == "plateau":
        stateful["plateau"] = keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=3, min_lr=1e-6)
    if config.early_stopping and last_phase:
        stateful["early_stopping"] = keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=config.early_stopping)
    return stateful


def _clean_run_dir(run: Path, resume: bool) -> None:
    """Remove what a new run must not read (all results, unless resuming) and files of killed writes."""
    if not resume:
        for stale in ("history.csv", "best.json", "model.keras", "metrics.json", SPLITS_FILE):
            (run / stale).unlink(missing_ok=True)
        shutil.rmtree(run / BACKUP_DIR, ignore_errors=True)
    for leftover in sorted(run.rglob(f"{PARTIAL_PREFIX}*"), key=lambda path: len(path.parts)):  # figures/ too
        if not leftover.exists():  # inside a leftover folder removed above
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def postprocessing_for_run(config: TrainConfig, data: SegmentationData, model: keras.Model, run: Path) -> dict | None:
    """`postprocess="auto"`: the steps that raise the validation Dice, written to the run's postprocess.json.

    Returns the chosen spec (with its record of trials), or None when the config asks for none;
    a postprocess.json left by an earlier finish of the run is then removed, so `predict`
    applies only what this run chose.

    Example:
        >>> postprocessing_for_run(TrainConfig(postprocess="auto"), data, model, run)["steps"]
        [{'op': 'remove_small', 'min_size': 6}]
    """
    if config.postprocess != "auto":
        (run / postprocess.POSTPROCESS_FILE).unlink(missing_ok=True)
        return None
    if config.on_scans:
        options = dict(patch_size=tuple(config.patch_size)) if config.volumetric else {}
        spec = postprocess.select_postprocessing_volumes(model, data.volumes["val"], num_classes=data.num_classes,
                                                         **options)
    else:
        spec = postprocess.select_postprocessing(model, data.val, num_classes=data.num_classes)
    postprocess.write_postprocessing(run, spec)
    return spec


def finish_run(config: TrainConfig, data: SegmentationData, run: Path, record: dict, history: dict | None) -> None:
    """Choose post-processing, score `model.keras` on the test split, draw figures, export, write metrics.json.

    Args:
        config: TrainConfig. Export settings are read.
        data: SegmentationData. Its test split is scored.
        run: Path. The run directory holding `model.keras`.
        record: dict. Entries for metrics.json besides the test metrics.
        history: dict or None. Per-epoch logs for curves.png; None draws no curves.

    Example:
        >>> finish_run(config, data, run, {"train_seconds": 12.0}, history)
    """
    # compile=False: a model trained without a wrapper was saved with the optimizer of its phase, which
    # scoring and export do not need (and which a frozen phase's file holds for fewer variables)
    best = keras.models.load_model(run / "model.keras", compile=False)
    steps = postprocessing_for_run(config, data, best, run)
    if config.on_scans:
        scores = volume_training.score_scans(best, config, data, run, postprocess=steps)
    else:
        scores = evaluate(best, data.test, num_classes=data.num_classes, postprocess=steps)["metrics"]
    if steps is not None:
        record["postprocess"] = {"steps": steps["steps"], "val_dice_before": steps["record"]["dice_before"],
                                 "val_dice_after": steps["record"]["dice_after"]}
    record = {
        "test": scores,
        **record,
        "parameters": best.count_params(),
        "counts": data.counts,
        "source": data.source,
    }
    figures = run / "figures"
    figures.mkdir(exist_ok=True)
    if history:
        viz.plot_history({k: v for k, v in history.items() if k != "encoder_frozen"}, path=figures / "curves.png")
    images, masks = next(iter(data.test))
    probabilities = as_single_output(best).predict(images, verbose=0)
    if images.ndim == 5:  # 3D patches: their middle slices
        middle = images.shape[1] // 2
        images, masks, probabilities = images[:, middle], masks[:, middle], probabilities[:, middle]
    viz.plot_predictions(images, masks, probabilities, path=figures / "predictions.png")
    wanted = {"saved_model": config.export_saved_model, "tflite": config.export_tflite, "onnx": config.export_onnx}
    formats = [name for name, on in wanted.items() if on]
    if formats:
        from unetpp_tf.export import export_model  # deferred: it pulls in the TFLite converter

        report = export_model(
            best, run / "export", formats=formats, image_size=config.crop_size or data.image_size,
            samples=data.test.take(2),
        )
        fields = ("path", "size_bytes", "dice_agreement")
        record["export"] = {a["name"]: {k: a[k] for k in fields} for a in report["artifacts"]}
    write_json(run / "metrics.json", record)
