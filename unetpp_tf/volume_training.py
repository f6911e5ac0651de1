"""What a training run on scans does its own way: the data, the augmenter, the 3D pooling, the scoring.

`unetpp_tf.train` calls these when `TrainConfig.on_scans` is true (`data="synthetic-ct"` or a
folder of NIfTI/DICOM scans): scans are read, resampled and windowed once
(`unetpp_tf.data.volume_pipeline.from_volumes`); a 3D UNet++ trains on random patches with
pooling adapted to the voxel spacing, a 2D one on slices with their neighbours as channels
(2.5D); the best model is scored scan by scan with sliding-window inference (Dice, IoU and
surface distances in mm, `unetpp_tf.evaluation.evaluate_volumes`).
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import numpy as np

from unetpp_tf.config import SYNTHETIC_CT, TrainConfig
from unetpp_tf.data.augment import SegmentationAugmenter
from unetpp_tf.data.augment3d import VolumeAugmenter
from unetpp_tf.data.pipeline import SegmentationData
from unetpp_tf.data.synthetic_ct import CLASSES, write_synthetic_ct
from unetpp_tf.data.volume_pipeline import from_volumes
from unetpp_tf.evaluation import evaluate_volumes, write_per_image_csv
from unetpp_tf.models import pool_sizes_for_spacing

SCANS_CSV = "test_scans.csv"

logger = logging.getLogger(__name__)


def synthetic_ct_folder(num_scans: int, seed: int) -> Path:
    """The built-in synthetic CT scans as NIfTI files, written once into Keras' cache folder.

    The folder is `$KERAS_HOME/datasets/unetpp_tf_synthetic_ct_{num_scans}_seed{seed}` (KERAS_HOME
    defaults to ~/.keras) and holds `images/` and `masks/`; the files are the same for the same
    arguments, so a run resumed or scored later reads the files it trained on.

    Example:
        >>> root = synthetic_ct_folder(16, seed=0)
        >>> sorted(p.name for p in root.iterdir())
        ['images', 'masks', 'synthetic_ct.json']
    """
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    root = home / "datasets" / f"unetpp_tf_synthetic_ct_{num_scans}_seed{seed}"
    return write_synthetic_ct(root, num_scans, seed=seed)  # writes nothing when the files are there


def scan_augmenter(config: TrainConfig):
    """The augmenter of a run on scans: a `VolumeAugmenter` for 3D patches, else a `SegmentationAugmenter`.

    Its settings are the run's `augmentation`, seeded with the run's seed. 90-degree turns need
    a square in-plane patch: with another patch they are left out, and the log says so. With
    `window="zscore"` the intensities have no fixed range, so none is clipped to.

    Example:
        >>> scan_augmenter(TrainConfig(data="synthetic-ct", augmentation={"flip": True}))
    """
    kind = VolumeAugmenter if config.volumetric else SegmentationAugmenter
    valid = [name for name in inspect.signature(kind).parameters if name not in ("seed", "kwargs")]
    unknown = sorted(set(config.augmentation) - set(valid))
    if unknown:
        raise ValueError(f"augmentation: unknown setting(s) {unknown} for {kind.__name__}; valid settings are {valid}.")
    settings = dict(config.augmentation)
    height, width = config.patch_size[-2:]
    if settings.get("rotate90", True) and height != width:
        logger.info(f"--patch-size {' '.join(map(str, config.patch_size))}: the in-plane patch is not square, "
                    "so the augmentation makes no 90-degree turns")
        settings["rotate90"] = False
    if config.window == "zscore":
        settings.setdefault("value_range", None)
    return kind(**settings, seed=config.seed)


def load_scans(config: TrainConfig, splits: dict | None = None, augment=None) -> SegmentationData:
    """Open the scans a configuration names, as patches (3d) or slices with neighbours (2.5d, 2d).

    Args:
        config: TrainConfig. Its data and scan settings.
        splits: dict or None. The (image, label) files of each split as a run recorded them.
            Defaults to None (split the scans anew).
        augment: layer or None. A host augmenter for the training split. Defaults to None.

    Example:
        >>> data = load_scans(TrainConfig(data="synthetic-ct", volume_mode="2.5d"))
    """
    source = {}
    if config.images or config.masks:
        source = dict(images=config.images, masks=config.masks)
    elif config.data == SYNTHETIC_CT:
        source = dict(root=synthetic_ct_folder(config.num_samples, config.seed))
    else:
        source = dict(root=config.data)
    return from_volumes(
        **source, mode=config.volume_mode, patch_size=config.patch_size, slices=config.slices,
        spacing=config.spacing, window=config.window, foreground_share=config.foreground_share,
        patches_per_volume=config.patches_per_volume, batch_size=config.batch_size, split=config.split,
        seed=config.seed, augment=augment, num_classes=config.num_classes, splits=splits,
    )


def training_spacing(data: SegmentationData) -> tuple:
    """The voxel spacing (z, y, x) in mm the model trains at: the median over the training scans."""
    spacings = np.array([volume.spacing for volume in data.volumes["train"]], dtype=float)
    return tuple(float(s) for s in np.median(spacings, axis=0))


def pool_sizes_for(config: TrainConfig, data: SegmentationData) -> list | None:
    """The 3D model's pooling per level for the training scans' spacing; None for 2D models.

    Thick slices are not pooled along z at the first levels, so that the patch keeps its shape
    in mm as it shrinks (`unetpp_tf.models.pool_sizes_for_spacing`). The patch must be divisible
    by the product of the factors along each axis.

    Example:
        >>> pool_sizes_for(TrainConfig(data="synthetic-ct"), data)
        [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    """
    if not config.volumetric:
        return None
    pools = pool_sizes_for_spacing(training_spacing(data), config.depth)
    totals = [int(np.prod([pool[axis] for pool in pools])) for axis in range(3)]
    bad = [(size, total) for size, total in zip(config.patch_size, totals) if size % total]
    if bad:
        fits = " ".join(str(max(t, round(s / t) * t)) for s, t in zip(config.patch_size, totals))
        raise ValueError(
            f"--patch-size {' '.join(map(str, config.patch_size))} does not fit the model: at this spacing "
            f"({' x '.join(f'{s:g}' for s in training_spacing(data))} mm) depth {config.depth} pools "
            f"by {', '.join(map(str, totals))} along z, y, x; use e.g. --patch-size {fits}."
        )
    return pools


def score_scans(model, config: TrainConfig, data: SegmentationData, run: Path, postprocess=None) -> dict:
    """Score the best model on the test scans, whole scan by whole scan, and write their table.

    3D models predict with Gaussian-weighted sliding windows of the training patch size, 2D
    models slice by slice. The rows (Dice, IoU, HD95 and ASSD in mm per class) go to
    `test_scans.csv` in the run directory. `postprocess` (steps of `unetpp_tf.postprocess`) is
    applied to each predicted label volume first.

    Returns:
        dict: the mean metrics over the test scans (`evaluate_volumes`' "metrics").
    """
    options = dict(patch_size=tuple(config.patch_size)) if config.volumetric else {}
    if config.data == SYNTHETIC_CT:
        options["class_names"] = CLASSES
    result = evaluate_volumes(model, data.volumes["test"], num_classes=data.num_classes, postprocess=postprocess,
                              **options)
    write_per_image_csv(result["per_image"], run / SCANS_CSV)
    return result["metrics"]
