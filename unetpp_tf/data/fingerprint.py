"""A dataset fingerprint: what `unetpp_tf.planning` needs to know about the data to choose settings.

`fingerprint(source)` reads a dataset cheaply and summarises it: the number of images, their
sizes (median, smallest, largest and how much they vary), the voxel spacing of scans, the
storage type and the bits actually used (12-bit camera data in 16-bit files), channels,
intensity percentiles, and per foreground class the share of pixels it covers and the sizes
of its objects (connected components, `scipy.ndimage.label`). Sources are the ones training
reads: a folder (`images/` + `masks/`, the per-split layout, or NIfTI/DICOM scans),
"synthetic", "synthetic-ct" and "tfds:NAME".

Cost: every image file's header is read for its size (no pixels); intensities and masks are
read from at most `max_files` files spread evenly over the dataset, and at most `max_pixels`
intensity values are kept (each sampled image is strided), so a few hundred files take
seconds.

Example:
    >>> fp = fingerprint("data/nuclei")
    >>> fp.num_images, fp.sizes["median"], fp.classes[0]["foreground_fraction"]
    (135, [64, 64], 0.21)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

PERCENTILES = (0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5)
MIN_IMAGES = 10
"""Fewest image/mask pairs a dataset must have: enough for train, validation and test splits."""
MIN_SCANS = 3
"""Fewest scans: one per split."""
MAX_FILES = 256
MAX_PIXELS = 2_000_000


@dataclasses.dataclass
class Fingerprint:
    """What a dataset looks like, for planning a training configuration.

    Attributes:
        source: str. What was read ("synthetic", a folder, "tfds:NAME").
        kind: str. "images" or "scans".
        num_images: int. Image/mask pairs (scans for scans).
        sizes: dict. "median", "min", "max" as [height, width] ([depth, height, width] for
            scans, in voxels), and "spread": largest over smallest pixel count (1.0: all alike).
        spacing: dict or None. Scans: "median", "min", "max" voxel size [z, y, x] in mm and
            "anisotropy" (largest over smallest axis of the median); None for images.
        dtype: str. How the pixels are stored ("uint8", "uint16", "float32", ...).
        bit_depth: int. Bits of the storage type (8, 16, 32).
        effective_max: float. Largest value seen.
        effective_bits: int or None. Bits that value needs (12 for 12-bit data in 16-bit
            files); None for floating-point data.
        channels: int. Image channels (1 gray, 3 RGB).
        intensity: dict. {"p0.5": ..., "p1": ..., "p50": ..., "p99": ..., "p99.5": ..., "min",
            "max", "mean", "std"} of the sampled values, in the stored units.
        num_classes: int. 1 for binary masks, K for K classes (background included).
        classes: list of dict. Per foreground class: "class" (id), "foreground_fraction"
            (its pixels over all pixels), "present" (share of images holding it),
            "object_size" {"median", "p5", "max"} in pixels (voxels), "objects_per_image"
            (mean count of connected components).
        sampled: dict. {"images": files whose pixels were read, "pixels": intensity values kept}.
    """

    source: str
    kind: str
    num_images: int
    sizes: dict
    spacing: dict | None
    dtype: str
    bit_depth: int
    effective_max: float
    effective_bits: int | None
    channels: int
    intensity: dict
    num_classes: int
    classes: list
    sampled: dict

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def median_size(self) -> tuple:
        """The median image size, (height, width) or (depth, height, width)."""
        return tuple(self.sizes["median"])

    @property
    def same_size(self) -> bool:
        """Whether every image has the same size."""
        return self.sizes["min"] == self.sizes["max"]


def fingerprint(
    source: str,
    *,
    task: str = "binary",
    num_samples: int | None = None,
    image_size=(96, 96),
    max_files: int = MAX_FILES,
    max_pixels: int = MAX_PIXELS,
) -> Fingerprint:
    """Fingerprint a dataset: sizes, spacing, bit depth, intensities, classes and object sizes.

    Args:
        source: str or Path. A folder (images/ + masks/, train/val/test, or NIfTI/DICOM
            scans), "synthetic", "synthetic-ct" or "tfds:NAME".
        task: str. "synthetic" only: "binary" or "multiclass". Defaults to "binary".
        num_samples: int or None. "synthetic" / "synthetic-ct": the number of samples (scans)
            training would render; None is the recipe's (512 images, 16 scans).
            Defaults to None.
        image_size: tuple. "synthetic" only: the rendered size. Defaults to (96, 96).
        max_files: int. Most files (examples, scans) whose pixels are read. Defaults to 256.
        max_pixels: int. Most intensity values kept for the percentiles. Defaults to 2e6.

    Returns:
        Fingerprint: the summary.

    Raises:
        ValueError: the data is too small to fingerprint (fewer than `MIN_IMAGES` pairs or
            `MIN_SCANS` scans, or no foreground pixel in any mask read), in one line saying
            how many there are and how many are needed.
        FileNotFoundError: the folder does not exist.

    Example:
        >>> fingerprint("synthetic", task="multiclass").num_classes
        3
        >>> fingerprint("ct_scans").spacing["anisotropy"]
        2.0
    """
    source = str(source)
    if source == "synthetic":
        return _synthetic(task, num_samples or 512, tuple(image_size), max_files, max_pixels)
    if source == "synthetic-ct":
        return _synthetic_ct(num_samples or 16, min(max_files, 4), max_pixels)
    if source.startswith("tfds:"):
        return _tfds(source[5:], max_files, max_pixels)
    from unetpp_tf.data.medical_io import is_scan_folder  # deferred: it imports the scan readers

    if not Path(source).is_dir():
        raise FileNotFoundError(f"--data {source}: no such folder; pass a dataset folder, 'synthetic' or 'tfds:NAME'.")
    if is_scan_folder(source):
        return _scan_folder(source, max_files, max_pixels)
    return _image_folder(source, max_files, max_pixels)


# ----------------------------------------------------------------------------- the pieces


class _Summary:
    """Accumulates sizes, intensities and mask statistics sample by sample."""

    def __init__(self, max_pixels: int, expected: int):
        self.per_image = max(1, max_pixels // max(1, expected))
        self.values, self.kept = [], 0
        self.max_value, self.integer, self.dtype, self.channels = -math.inf, True, None, 1
        self.class_pixels, self.total_pixels, self.present, self.components = {}, 0, {}, {}
        self.counts, self.masks = {}, 0

    def add_image(self, array: np.ndarray, channels_last: bool = True) -> None:
        array = np.asarray(array)
        if self.dtype is None or np.dtype(array.dtype).itemsize > np.dtype(self.dtype).itemsize:
            self.dtype = str(array.dtype)
        self.integer = self.integer and np.issubdtype(array.dtype, np.integer)
        spatial = array.shape[:-1] if channels_last and array.ndim >= 3 else array.shape
        if channels_last and array.ndim >= 3:
            self.channels = max(self.channels, int(array.shape[-1]))
        self.max_value = max(self.max_value, float(np.max(array)))
        count = int(np.prod(array.shape))  # values, channels included
        stride = max(1, math.ceil((count / self.per_image) ** (1.0 / len(spatial))))
        window = tuple(slice(None, None, stride) for _ in spatial)
        self.values.append(np.asarray(array[window], np.float64).ravel())
        self.kept += self.values[-1].size

    def add_mask(self, classes: np.ndarray, class_ids) -> None:
        from scipy import ndimage

        self.masks += 1
        self.total_pixels += classes.size
        for k in class_ids:
            where = classes == k
            pixels = int(where.sum())
            self.class_pixels[k] = self.class_pixels.get(k, 0) + pixels
            self.counts.setdefault(k, []).append(0)
            if not pixels:
                continue
            self.present[k] = self.present.get(k, 0) + 1
            labels, found = ndimage.label(where)
            self.counts[k][-1] = int(found)
            self.components.setdefault(k, []).append(np.bincount(labels.ravel())[1:])

    def intensity(self) -> dict:
        values = np.concatenate(self.values) if self.values else np.zeros(1)
        found = np.percentile(values, PERCENTILES)
        stats = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, found)}
        stats.update(min=float(values.min()), max=float(values.max()), mean=float(values.mean()),
                     std=float(values.std()))
        return stats

    def class_stats(self, num_classes: int, where: str) -> list:
        ids = [1] if num_classes == 1 else list(range(1, num_classes))
        if not any(self.class_pixels.get(k, 0) for k in ids):
            raise ValueError(
                f"{where}: too small to fingerprint: none of the {self.masks} mask(s) read has a foreground pixel; "
                "at least one labelled object is needed."
            )
        rows = []
        for k in ids:
            sizes = np.concatenate(self.components[k]) if k in self.components else np.zeros(0, np.int64)
            rows.append(dict(
                **{"class": k},
                foreground_fraction=self.class_pixels.get(k, 0) / max(1, self.total_pixels),
                present=self.present.get(k, 0) / max(1, self.masks),
                object_size=dict(
                    median=float(np.median(sizes)) if sizes.size else 0.0,
                    p5=float(np.percentile(sizes, 5)) if sizes.size else 0.0,
                    max=float(sizes.max()) if sizes.size else 0.0,
                ),
                objects_per_image=float(np.mean(self.counts.get(k, [0]))),
            ))
        return rows

    def storage(self) -> dict:
        dtype = np.dtype(self.dtype or "float32")
        bits = dtype.itemsize * 8
        effective = None
        if self.integer:
            effective = max(1, math.ceil(math.log2(max(self.max_value, 0.0) + 1.0)))
        return dict(dtype=str(dtype), bit_depth=bits, effective_max=float(self.max_value), effective_bits=effective)


def _size_stats(sizes: list) -> dict:
    array = np.asarray(sizes, np.int64)
    pixels = np.prod(array, axis=1)
    return dict(
        median=[int(v) for v in np.round(np.median(array, axis=0))],
        min=[int(v) for v in array.min(axis=0)],
        max=[int(v) for v in array.max(axis=0)],
        spread=float(pixels.max() / max(1, pixels.min())),
    )


def _too_few(where: str, found: int, needed: int, what: str = "image/mask pairs") -> None:
    if found < needed:
        raise ValueError(
            f"{where}: too small to fingerprint: {found} {what}, at least {needed} are needed "
            "(train, validation and test splits)."
        )


def _sample(count: int, max_files: int) -> list:
    """Indices of at most `max_files` items spread evenly over `count`."""
    if count <= max_files:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, max_files)})


def _finish(summary: _Summary, *, source, kind, num_images, sizes, spacing, num_classes) -> Fingerprint:
    return Fingerprint(
        source=source, kind=kind, num_images=int(num_images), sizes=_size_stats(sizes), spacing=spacing,
        channels=summary.channels, intensity=summary.intensity(), num_classes=int(num_classes),
        classes=summary.class_stats(num_classes, source), sampled=dict(images=summary.masks, pixels=summary.kept),
        **summary.storage(),
    )


# ----------------------------------------------------------------------------- sources


def _image_folder(root: str, max_files: int, max_pixels: int) -> Fingerprint:
    from PIL import Image

    from unetpp_tf.data.masks import plan_mask_mapping
    from unetpp_tf.data.pairing import find_folders, pair_files
    from unetpp_tf.data.readers import pil_mask_array

    pairs = []
    for dirs in find_folders(root, None, None).values():
        found, _ = pair_files(*dirs)  # unpaired files are for from_directory to report
        pairs += found
    _too_few(f"--data {root}", len(pairs), MIN_IMAGES)
    sizes = []
    for image_path, _ in pairs:  # headers only
        with Image.open(image_path) as image:
            sizes.append((image.height, image.width))
    chosen = _sample(len(pairs), max_files)
    summary = _Summary(max_pixels, len(chosen))
    raw_masks = []
    for index in chosen:
        image_path, mask_path = pairs[index]
        with Image.open(image_path) as image:
            summary.add_image(_pil_pixels(image))
        with Image.open(mask_path) as mask:
            try:
                raw_masks.append(pil_mask_array(mask))
            except ValueError as error:
                raise ValueError(f"{mask_path}: {error}") from None
    union = set()
    for raw in raw_masks:
        union.update(np.unique(raw).tolist())
    mapping = plan_mask_mapping(union)
    ids = [1] if mapping.num_classes == 1 else list(range(1, mapping.num_classes))
    for raw in raw_masks:
        if mapping.kind == "255to1":
            raw = np.where(raw == 255, 1, raw)
        elif mapping.kind == "nonzero":
            raw = (raw != 0).astype(np.int64)
        summary.add_mask(raw, ids)
    return _finish(summary, source=root, kind="images", num_images=len(pairs), sizes=sizes, spacing=None,
                   num_classes=mapping.num_classes)


def _pil_pixels(image) -> np.ndarray:
    """An opened image's pixels as stored: [H, W] or [H, W, 3] (palette and alpha images as RGB)."""
    mode = image.mode
    if mode in ("P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    if mode == "LA":
        return np.asarray(image)[..., 0]
    if mode == "1":
        return np.asarray(image.convert("L"))
    return np.asarray(image)


def _synthetic(task: str, num_samples: int, image_size: tuple, max_files: int, max_pixels: int) -> Fingerprint:
    from unetpp_tf.data.synthetic import synthetic_sample

    _too_few("--data synthetic", num_samples, MIN_IMAGES, "samples (--num-samples)")
    chosen = _sample(num_samples, min(max_files, 32))  # rendered: the generator is the same for all
    summary = _Summary(max_pixels, len(chosen))
    num_classes = 1 if task == "binary" else 3
    for index in chosen:
        image, mask = synthetic_sample(index, image_size=image_size, task=task)
        summary.add_image(np.asarray(image, np.float32))
        summary.add_mask(np.asarray(mask)[..., 0], [1] if num_classes == 1 else [1, 2])
    return _finish(summary, source="synthetic", kind="images", num_images=num_samples,
                   sizes=[image_size] * len(chosen), spacing=None, num_classes=num_classes)


def _tfds(name: str, max_files: int, max_pixels: int) -> Fingerprint:
    import tensorflow_datasets as tfds

    from unetpp_tf.data.tfds_source import PET, PET_CLASSES

    try:
        builder = tfds.builder(name)
    except Exception as error:  # noqa: BLE001 - an unknown name: one line saying so
        raise ValueError(f"--data tfds:{name}: no such TFDS dataset ({type(error).__name__}).") from None
    total = 0
    try:
        total = sum(int(split.num_examples) for split in builder.info.splits.values())
    except Exception:  # noqa: BLE001 - split sizes unknown (not prepared, mocked): counted below
        total = 0
    table = PET_CLASSES["binary"] if name == PET else None  # what training reads (load_data: classes="binary")
    try:
        examples = builder.as_dataset(split="train", shuffle_files=False).take(max_files)
    except Exception as error:  # noqa: BLE001 - not prepared, or no "train" split: one line saying so
        raise ValueError(
            f"--data tfds:{name}: cannot read its train split to fingerprint it ({type(error).__name__}); "
            f"prepare the dataset first (training with --data tfds:{name} downloads it)."
        ) from None
    summary = _Summary(max_pixels, max_files)
    sizes, masks = [], []
    for example in examples.as_numpy_iterator():
        image, mask = example["image"], np.asarray(example["segmentation_mask"])
        mask = mask[..., 0] if mask.ndim == 3 else mask
        sizes.append(image.shape[:2])
        summary.add_image(image)
        masks.append(np.vectorize(table.get, otypes=[np.int64])(mask) if table else mask.astype(np.int64))
    total = total or len(sizes)
    _too_few(f"--data tfds:{name}", total, MIN_IMAGES, "examples")
    num_classes = 1 if table else max(1, int(max(m.max() for m in masks)))
    num_classes = num_classes if num_classes == 1 else num_classes + 1
    for mask in masks:
        summary.add_mask(mask, [1] if num_classes == 1 else list(range(1, num_classes)))
    return _finish(summary, source=f"tfds:{name}", kind="images", num_images=total, sizes=sizes, spacing=None,
                   num_classes=num_classes)


def _scan_stats(volumes, summary: _Summary) -> tuple[list, dict, int]:
    sizes, spacings, top = [], [], 0
    for volume in volumes:
        sizes.append(volume.image.shape[:3])
        spacings.append(volume.spacing)
        summary.add_image(volume.image)
        if volume.label is not None:
            top = max(top, int(volume.label.max()))
    num_classes = 1 if top <= 1 else top + 1
    for volume in volumes:
        if volume.label is not None:
            summary.add_mask(np.asarray(volume.label), [1] if num_classes == 1 else list(range(1, num_classes)))
    spacing = np.asarray(spacings, np.float64)
    median = np.median(spacing, axis=0)
    described = dict(
        median=[float(v) for v in median], min=[float(v) for v in spacing.min(axis=0)],
        max=[float(v) for v in spacing.max(axis=0)], anisotropy=float(median.max() / median.min()),
    )
    return sizes, described, num_classes


def _scan_folder(root: str, max_files: int, max_pixels: int) -> Fingerprint:
    from unetpp_tf.data.medical_io import read_scan_pair, scan_pairs

    pairs = scan_pairs(root)
    _too_few(f"--data {root}", len(pairs), MIN_SCANS, "scan/label pairs")
    chosen = _sample(len(pairs), min(max_files, 32))
    summary = _Summary(max_pixels, len(chosen))
    volumes = (read_scan_pair(*pairs[i]) for i in chosen)
    sizes, spacing, num_classes = _scan_stats(list(volumes), summary)
    return _finish(summary, source=root, kind="scans", num_images=len(pairs), sizes=sizes, spacing=spacing,
                   num_classes=num_classes)


def _synthetic_ct(num_scans: int, max_files: int, max_pixels: int) -> Fingerprint:
    from unetpp_tf.data.synthetic_ct import synthetic_scan

    _too_few("--data synthetic-ct", num_scans, MIN_SCANS, "scans (--num-samples)")
    chosen = _sample(num_scans, max_files)
    summary = _Summary(max_pixels, len(chosen))
    sizes, spacing, num_classes = _scan_stats([synthetic_scan(i) for i in chosen], summary)
    return _finish(summary, source="synthetic-ct", kind="scans", num_images=num_scans, sizes=sizes, spacing=spacing,
                   num_classes=num_classes)
