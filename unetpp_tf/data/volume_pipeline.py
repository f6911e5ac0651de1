"""Scans as training data: `from_volumes` cuts 3D patches (or 2.5D slabs) out of whole volumes.

Each scan is read once, resampled to the target spacing, windowed, and held in memory once as
float32 (the same arrays `data.volumes` exposes for whole-scan scoring); patches are cut from
it on the fly by the tf.data pipeline and never materialised all together.

Sampling. Training patches are drawn anew each epoch, reproducibly: every patch has its own
seed from `tf.data.Dataset.random(seed, rerandomize_each_iteration=True)` (a new stream for each
pass over the dataset, the same sequence of streams for the same seed), and its position is a
pure function of that seed. A share `foreground_share` of the patches is centred on a labelled
voxel: a class is chosen uniformly among the non-zero classes present in the scan (so a small
nodule class is seen as often as the large lung class) and then one of its voxels (from up to
`MAX_LOCATIONS` voxels per class, drawn once per scan); near a border the patch shifts to stay
inside the scan, so the voxel is inside it but not always central. The other patches are
uniform. Validation and test patches are fixed: drawn the same way once, with a seed of their
own (3d), or every slice of the scan, centre-cropped in-plane (2.5d/2d).

A scan smaller than the patch along an axis is refused, naming every such scan and a patch
that fits, unless `pad_small_scans=True`: then it is padded (image with the scan's minimum per
channel, label with 0), placed at a random offset in the patch for training and centred for
validation, as sliding-window inference sees it whole, centred in padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from unetpp_tf.data import medical_io
from unetpp_tf.data.checks import describe
from unetpp_tf.data.masks import check_num_classes, classes_from_max_id, max_class_id
from unetpp_tf.data.pairing import recorded_parts
from unetpp_tf.data.pipeline import SPLITS, SegmentationData, finalize, split_indices
from unetpp_tf.data.volumes import Volume, apply_window, check_spacing, resample, window_range

AUTOTUNE = tf.data.AUTOTUNE
MODES = ("3d", "2.5d", "2d")
MAX_LOCATIONS = 10_000
"""Foreground voxels kept per class and scan as centres of foreground patches."""
DEFAULT_PATCHES = {"3d": 8, "2.5d": 32, "2d": 32}
_PATCH_STREAM = 0x7061  # folded into the per-patch seeds, apart from the host augmentation's
_EVAL_STREAM = {"val": 0x7661, "test": 0x7465}  # seeds of the fixed validation/test patches


def from_volumes(
    root=None,
    *,
    images=None,
    masks=None,
    volumes: Sequence[Volume] | None = None,
    splits: Mapping | None = None,
    mode: str = "3d",
    patch_size=(64, 64, 64),
    slices: int = 5,
    spacing=None,
    window="lung",
    foreground_share: float = 0.33,
    patches_per_volume: int | None = None,
    batch_size: int = 2,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    augment: Callable | None = None,
    num_classes: int | None = None,
    pad_small_scans: bool = False,
) -> SegmentationData:
    """Train/val/test patches from scans (NIfTI/DICOM files or `Volume`s), split scan by scan.

    Sources: a folder `root` with `images/` and `masks/` (or the two folders `images=` and
    `masks=`), scans and label volumes paired by name (`medical_io.scan_pairs`, read with
    `medical_io.read_scan_pair`); `splits`, the (image, label) files of each split as a run
    recorded them (`data.files`); or `volumes=`, a list of `Volume`s with labels. Each scan is
    resampled to `spacing` (labels by nearest neighbour) when given and windowed with `window`.
    The scans, not the patches, are split with `split` and `seed`: no scan has patches in two
    splits. See the module docstring for how patches are drawn.

    Modes: "3d" yields patches images [B, pd, ph, pw, C] float32 and masks [B, pd, ph, pw, 1]
    int32; "2.5d" yields 2D samples: `slices` neighbouring axial slices as channels
    [B, h, w, slices * C] (slice by slice, the channels of each slice together; the end slice
    repeats at the edges of the scan) with the mask of the centre slice [B, h, w, 1]; "2d" is
    2.5d with one slice (`slices` is not used).

    Args:
        root: str, Path or None. Folder holding `images/` and `masks/`. Defaults to None.
        images: str, Path or None. Folder of scans (relative to `root` when given). Defaults to None.
        masks: str, Path or None. Folder of label volumes (relative to `root` when given).
            Defaults to None.
        volumes: list or None. `Volume`s in memory (image [D, H, W, C] or [D, H, W], label
            [D, H, W]) instead of files. Defaults to None.
        splits: dict or None. {"train"|"val"|"test": [(image, label), ...]} files to use as they
            are, e.g. a run's `data.files`; `root`, `images`, `masks` and `split` are then not
            used. Defaults to None.
        mode: str. "3d", "2.5d" or "2d". Defaults to "3d".
        patch_size: tuple or int. (depth, height, width) for "3d"; (height, width) for
            "2.5d"/"2d", where a 3-number size gives its last two (the slab depth is
            `slices`). An int means a cube/square. Defaults to (64, 64, 64).
        slices: int. Odd number of neighbouring slices per 2.5d sample. Defaults to 5.
        spacing: tuple or None. Target voxel size (z, y, x) in mm; None keeps each scan's.
            Defaults to None.
        window: str, tuple or None. Intensity window (`volumes.apply_window`): a CT window name
            ("lung", "soft_tissue", ...), a (low, high) HU pair mapped to [0, 1], "zscore" (MRI),
            or None to keep the intensities. Defaults to "lung".
        foreground_share: float. Share of training patches centred on a labelled voxel, in
            [0, 1]. Defaults to 0.33.
        patches_per_volume: int or None. Training patches (samples) per scan and epoch, also
            the number of fixed validation/test patches per scan in "3d". None: 8 in "3d", 32
            in "2.5d"/"2d". Defaults to None.
        batch_size: int. Defaults to 2.
        split: tuple. (train, val, test) fractions of the scans. Defaults to (0.7, 0.15, 0.15).
        seed: int. Seed for the split and the patches. Defaults to 0.
        augment: callable or None. Host augmentation of training batches
            (`augment(images, masks, training=True)`, e.g. a `VolumeAugmenter` in "3d" or a
            `SegmentationAugmenter` in "2.5d"); None leaves augmentation to the training step
            (`AugmentedModel`). Defaults to None.
        num_classes: int or None. None infers it from the labels: 1 (sigmoid) when they are
            0/1, else the largest id + 1; given, every label must be below it. Defaults to None.
        pad_small_scans: bool. Pad scans smaller than the patch instead of refusing them.
            Defaults to False.

    Returns:
        SegmentationData: `image_size` is the patch (3 numbers in "3d", 2 otherwise),
        `channels` C ("3d") or slices * C; `counts["train"]` is the patches per epoch; `files`
        holds the (image, label) paths per split ({} for `volumes=`); `volumes` holds
        the preprocessed `Volume`s per split.

    Example:
        >>> data = from_volumes("scans", patch_size=(32, 64, 64), spacing=(2.0, 1.0, 1.0), window="lung")
        >>> images, masks = next(iter(data.train))  # [2, 32, 64, 64, 1], [2, 32, 64, 64, 1]
        >>> slabs = from_volumes(volumes=scans, mode="2.5d", patch_size=(96, 96), slices=5)
    """
    mode = _check_mode(mode)
    patch = _check_patch_size(patch_size, mode)
    slices = 1 if mode == "2d" else _check_slices(slices)
    share = _check_share(foreground_share)
    per_volume = DEFAULT_PATCHES[mode]
    if patches_per_volume is not None:
        per_volume = _positive(patches_per_volume, "patches_per_volume")
    _positive(batch_size, "batch_size")
    num_classes = check_num_classes(num_classes)
    spacing = None if spacing is None else check_spacing(spacing)
    if window is not None:
        window_range(window)  # an unknown window fails here, before any scan is read

    parts, files, where = _load_parts(root, images, masks, volumes, splits, split, seed, spacing, window)
    if not pad_small_scans:
        _check_fits(parts, patch, mode)
    all_scans = [scan for name in SPLITS for scan in parts[name]]
    channels = _check_channels(all_scans)
    num_classes = _check_labels(all_scans, num_classes)
    sampler = _Sampler(parts, mode, patch, slices, share, seed, channels)

    datasets, counts = {}, {}
    for name in SPLITS:
        if name == "train":
            ds = sampler.train_samples(per_volume)
            counts[name] = per_volume * len(parts[name])
        else:
            ds, counts[name] = sampler.fixed_samples(name, per_volume)
        datasets[name] = finalize(
            ds, batch_size=batch_size, shuffle=False, seed=seed, cache=False,
            augment=augment if name == "train" else None,
        )
    return SegmentationData(
        **datasets,
        num_classes=num_classes,
        channels=channels * (slices if mode != "3d" else 1),
        image_size=tuple(patch),
        counts=counts,
        source=f"volumes:{where}",
        files=files,
        volumes={name: list(parts[name]) for name in SPLITS},
    )


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(
            f"mode must be one of {MODES} (3D patches, 2D slices with neighbours as channels, single slices), "
            f"got {mode!r}."
        )
    return mode


def _check_patch_size(patch_size, mode: str) -> tuple:
    wanted = 3 if mode == "3d" else 2
    if isinstance(patch_size, (int, np.integer)) and not isinstance(patch_size, bool):
        patch_size = (int(patch_size),) * wanted
    try:
        values = tuple(patch_size)
        ok = all(not isinstance(v, bool) and int(v) == v and v > 0 for v in values)
    except (TypeError, ValueError):
        values, ok = (), False
    if not ok or not values:
        raise ValueError(f"patch_size must be positive integers, got {patch_size!r}.")
    values = tuple(int(v) for v in values)
    if mode == "3d" and len(values) != 3:
        raise ValueError(
            f"patch_size {values} has {len(values)} number(s) but mode '3d' cuts (depth, height, width) patches "
            "for a 3D model; pass three numbers, e.g. (32, 64, 64), or use mode='2.5d' to train a 2D model on slices."
        )
    if mode != "3d":
        if len(values) not in (2, 3):
            raise ValueError(
                f"patch_size {values} has {len(values)} number(s) but mode {mode!r} cuts (height, width) slices; "
                "pass two numbers, e.g. (96, 96)."
            )
        values = values[-2:]
    return values


def _check_slices(slices) -> int:
    if isinstance(slices, bool) or not isinstance(slices, (int, np.integer)) or slices < 1 or slices % 2 == 0:
        raise ValueError(
            f"slices must be an odd positive integer (the centre slice and as many neighbours on each side), "
            f"got {slices!r}; e.g. 3 or 5."
        )
    return int(slices)


def _check_share(share) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"foreground_share must be a fraction in [0, 1], got {share!r}.")
    return float(share)


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_fits(parts: dict, patch: tuple, mode: str) -> None:
    """Refuse scans smaller than the patch (after resampling), naming each one and a patch that fits."""
    axes = slice(0, 3) if mode == "3d" else slice(1, 3)
    scans = [scan for name in SPLITS for scan in parts[name]]
    small = [scan for scan in scans if any(s < p for s, p in zip(scan.image.shape[axes], patch))]
    if not small:
        return
    fits = tuple(min(p, *(scan.image.shape[axes][k] for scan in scans)) for k, p in enumerate(patch))
    listed = "; ".join(f"{scan.name}: {' x '.join(map(str, scan.image.shape[:3]))} voxels" for scan in small[:10])
    more = f" (and {len(small) - 10} more)" if len(small) > 10 else ""
    raise ValueError(
        f"patch_size {' x '.join(map(str, patch))} is larger than {len(small)} scan(s) (z x y x x, after "
        f"resampling): {listed}{more}; use a patch no larger than every scan, e.g. {' x '.join(map(str, fits))} "
        "(rounded down to what the model's pooling divides), a finer spacing, or pad_small_scans=True."
    )


def _check_channels(scans: list[Volume]) -> int:
    counts = {int(scan.image.shape[-1]) for scan in scans}
    if len(counts) > 1:
        per = describe([f"{scan.name}: {scan.image.shape[-1]}" for scan in scans], 6)
        raise ValueError(f"the scans have different channel counts ({per}); give every scan the same channels.")
    return counts.pop()


def _check_labels(scans: list[Volume], num_classes: int | None) -> int:
    """The number of classes (inferred or checked against every scan's largest label)."""
    highest = {scan.name: int(scan.label.max()) if scan.label.size else 0 for scan in scans}
    top = max(highest.values())
    if num_classes is None:
        return classes_from_max_id(top)
    limit = max_class_id(num_classes)
    bad = [f"{name} (max {value})" for name, value in highest.items() if value > limit]
    if bad:
        raise ValueError(
            f"labels of scan(s) {describe(bad, 5)} exceed the class ids 0..{limit} of num_classes={num_classes}; "
            "raise num_classes or fix the label volumes."
        )
    return num_classes


# ---------------------------------------------------------------------------------------------
# Sources: files or Volumes, split by scan, preprocessed once


def _load_parts(root, images, masks, volumes, splits, split, seed, spacing, window):
    """({split: [preprocessed Volume]}, {split: [(image, label) str]}, description of the source)."""
    if volumes is not None:
        if root is not None or images is not None or masks is not None or splits is not None:
            raise ValueError("pass either volumes= (scans in memory) or files (root/images/masks/splits), not both.")
        if isinstance(volumes, Volume) or not isinstance(volumes, Sequence):
            raise ValueError(f"volumes must be a list of Volume, got {type(volumes).__name__}.")
        for index, volume in enumerate(volumes):
            if not isinstance(volume, Volume):
                raise ValueError(f"volumes[{index}] is a {type(volume).__name__}, not a Volume.")
        indices = _split_scans(len(volumes), split, seed)
        parts = {name: [_prepare(volumes[i], spacing, window) for i in indices[name]] for name in SPLITS}
        return parts, {}, "memory"

    if splits is not None:
        pairs = recorded_parts(splits, folders=True)
        where = "recorded splits"
    else:
        if root is None and images is None:
            raise ValueError("from_volumes needs a source: root (with images/ and masks/), images= and masks=, "
                             "splits= or volumes=.")
        found = medical_io.scan_pairs(root, images=images, masks=masks)
        indices = _split_scans(len(found), split, seed)
        pairs = {name: [found[i] for i in indices[name]] for name in SPLITS}
        where = str(root if root is not None else images)
    parts = {
        name: [_prepare(medical_io.read_scan_pair(image, label), spacing, window) for image, label in pairs[name]]
        for name in SPLITS
    }
    files = {name: [(str(image), str(label)) for image, label in pairs[name]] for name in SPLITS}
    return parts, files, where


def _split_scans(count: int, split, seed: int) -> dict:
    if count == 0:
        raise ValueError("found no scans; check the folders (images/ and masks/ with matching names) or volumes=.")
    try:
        return split_indices(count, split, seed)
    except ValueError as error:
        if "leaves" not in str(error):
            raise
        raise ValueError(
            f"split {tuple(split)} of {count} scan(s) leaves a part without scans (scans are never shared "
            f"between parts, so each part needs a whole scan); add scans, or pass a split with 0 for the "
            f"parts you can do without, e.g. split=(0.8, 0.2, 0.0)."
        ) from None


def _prepare(volume: Volume, spacing, window) -> Volume:
    """The scan as the pipeline holds it: checked, resampled, windowed float32 image, compact integer label."""
    image = np.asarray(volume.image)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4 or 0 in image.shape:
        raise ValueError(f"scan {volume.name!r}: image must be [D, H, W, C] (or [D, H, W]), got shape {image.shape}.")
    if volume.label is None:
        raise ValueError(f"scan {volume.name!r} has no label volume; training needs one label per scan.")
    label = np.asarray(volume.label)
    if label.shape != image.shape[:3]:
        raise ValueError(
            f"scan {volume.name!r}: label shape {label.shape} does not match the image's {image.shape[:3]} (D, H, W)."
        )
    if label.dtype == np.bool_:
        label = label.astype(np.uint8)
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise ValueError(f"scan {volume.name!r}: the label holds non-integer values; labels are class ids.")
        label = label.astype(np.int64)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"scan {volume.name!r}: the label must hold integer class ids, got dtype {label.dtype}.")
    if label.size and int(label.min()) < 0:
        raise ValueError(
            f"scan {volume.name!r}: the label has negative values (min {int(label.min())}); class ids start at 0."
        )
    volume = dataclasses.replace(volume, image=image, label=label)
    if spacing is not None:
        volume = resample(volume, spacing)
    image = np.asarray(volume.image, np.float32)
    if window is not None:
        image = np.asarray(apply_window(image, window), np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"scan {volume.name!r}: the image holds NaN or infinite values; clean the scan first.")
    label = np.asarray(volume.label)
    label = label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32, copy=False)
    return dataclasses.replace(volume, image=image, label=label)


# ---------------------------------------------------------------------------------------------
# Patches


class _Sampler:
    """Cuts patches (3d) or slabs (2.5d) out of the scans of each split, by seed or by origin."""

    def __init__(self, parts: dict, mode: str, patch: tuple, slices: int, share: float, seed: int, channels: int):
        self.parts, self.mode, self.patch, self.slices, self.share = parts, mode, patch, slices, share
        self.seed = seed
        rng = np.random.default_rng([seed, 0x666F])
        self.fill = {name: [scan.image.min(axis=(0, 1, 2)) for scan in parts[name]] for name in SPLITS}
        self.locations = {name: [_locations(scan.label, rng) for scan in parts[name]] for name in SPLITS}
        if mode == "3d":
            self.shapes = ([*patch, channels], [*patch, 1])
        else:
            self.shapes = ([*patch, slices * channels], [*patch, 1])

    # -- positions ---------------------------------------------------------------------------

    def _extent(self) -> tuple:
        """The patch's extent along (z, y, x): 1 slice along z for 2.5d (the centre slice)."""
        return tuple(self.patch) if self.mode == "3d" else (1, *self.patch)

    def random_origin(self, split: str, scan: int, rng: np.random.Generator) -> np.ndarray:
        """First voxel (z, y, x) of a random patch (may be negative or beyond: padded)."""
        shape = self.parts[split][scan].label.shape
        extent = self._extent()
        low = np.minimum(0, np.subtract(shape, extent))
        high = np.maximum(0, np.subtract(shape, extent))
        locations = self.locations[split][scan]
        if locations and rng.random() < self.share:
            voxels = locations[int(rng.integers(len(locations)))]
            centre = np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), shape)
            return np.clip(np.subtract(centre, np.asarray(extent) // 2), low, high)
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])

    # -- cutting -----------------------------------------------------------------------------

    def cut(self, split: str, scan: int, origin) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) at `origin` (z, y, x): [pd, ph, pw, C] and [pd, ph, pw, 1], or the 2.5d slab."""
        volume = self.parts[split][scan]
        fill = self.fill[split][scan]
        z, y, x = (int(v) for v in origin)
        if self.mode == "3d":
            image = _window(volume.image, (z, y, x), self.patch, fill)
            label = _window(volume.label, (z, y, x), self.patch, 0)
            return image, label[..., None].astype(np.int32)
        half = self.slices // 2
        depth = volume.image.shape[0]
        rows = [_window(volume.image[k], (y, x), self.patch, fill)
                for k in np.clip(np.arange(z - half, z + half + 1), 0, depth - 1)]
        image = np.concatenate(rows, axis=-1)  # slice-major: the C channels of each slice together
        label = _window(volume.label[z], (y, x), self.patch, 0)
        return image, label[..., None].astype(np.int32)

    # -- datasets ----------------------------------------------------------------------------

    def _mapped(self, ds: tf.data.Dataset, function) -> tf.data.Dataset:
        image_shape, mask_shape = self.shapes

        def numpy_call(*args):
            image, mask = tf.numpy_function(function, list(args), [tf.float32, tf.int32], stateful=False)
            image.set_shape(image_shape)
            mask.set_shape(mask_shape)
            return image, mask

        return ds.map(numpy_call, num_parallel_calls=AUTOTUNE)

    def train_samples(self, per_volume: int) -> tf.data.Dataset:
        """Random training samples, `per_volume` per scan, new ones each pass (seeded per sample)."""
        count = len(self.parts["train"]) * per_volume
        if count == 0:
            return self._mapped(tf.data.Dataset.from_tensor_slices(np.zeros((0, 4), np.int64)), self._draw)
        scans = tf.data.Dataset.range(count).shuffle(count, seed=self.seed, reshuffle_each_iteration=True)
        scans = scans.map(lambda i: i % len(self.parts["train"]))
        seeds = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).batch(2)
        seeds = seeds.map(lambda pair: tf.random.experimental.stateless_fold_in(pair, _PATCH_STREAM))
        rows = tf.data.Dataset.zip(scans, seeds).map(lambda scan, pair: tf.concat([[scan], pair, [0]], 0))
        return self._mapped(rows, self._draw)

    def _draw(self, row):
        scan, seed_a, seed_b = (int(v) for v in row[:3])
        rng = np.random.default_rng(np.array([seed_a, seed_b], np.int64).view(np.uint64))
        return self.cut("train", scan, self.random_origin("train", scan, rng))

    def fixed_samples(self, split: str, per_volume: int) -> tuple[tf.data.Dataset, int]:
        """The validation/test samples, the same every epoch, and their count."""
        rows = []
        for scan, volume in enumerate(self.parts[split]):
            if self.mode == "3d":
                rng = np.random.default_rng([self.seed, _EVAL_STREAM[split], scan])
                rows += [(scan, *self.random_origin(split, scan, rng)) for _ in range(per_volume)]
            else:
                height, width = volume.label.shape[1:]
                top, left = (height - self.patch[0]) // 2, (width - self.patch[1]) // 2
                rows += [(scan, z, top, left) for z in range(volume.label.shape[0])]
        table = np.asarray(rows, np.int64).reshape(-1, 4)

        def cut(row):
            return self.cut(split, int(row[0]), row[1:])

        return self._mapped(tf.data.Dataset.from_tensor_slices(table), cut), len(table)


def _locations(label: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Flat indices of up to MAX_LOCATIONS voxels of each non-zero class present in `label`."""
    top = int(label.max(initial=0))
    counts = np.zeros(top + 1, np.int64)
    for plane in label:  # class counts slice by slice: O(voxels) time, one slice of extra memory
        counts += np.bincount(plane.reshape(-1), minlength=top + 1)
    flat = label.reshape(-1)
    out = []
    for value in np.flatnonzero(counts[1:]) + 1:
        where = np.flatnonzero(flat == value)
        if where.size > MAX_LOCATIONS:
            where = np.sort(rng.choice(where, MAX_LOCATIONS, replace=False))
        out.append(where)
    return out


def _window(array: np.ndarray, origin: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """array[origin : origin + size] along the leading axes, padded with `fill` where it leaves the array."""
    out = np.empty((*size, *array.shape[len(size):]), array.dtype)
    out[...] = fill
    source, target = [], []
    for start, length, dim in zip(origin, size, array.shape):
        low, high = max(start, 0), min(start + length, dim)
        source.append(slice(low, max(high, low)))
        target.append(slice(low - start, max(high, low) - start))
    out[tuple(target)] = array[tuple(source)]
    return out
