"""Image/mask pairs from numpy arrays already in memory: `from_arrays`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import tensorflow as tf

from unetpp_tf.data.checks import (
    check_crop_fits,
    check_normalization_channels,
    check_size,
    describe,
    resolve_normalization,
)
from unetpp_tf.data.crops import preprocess_pair
from unetpp_tf.data.masks import (
    apply_mask_mapping,
    check_mask_mode,
    check_num_classes,
    invalid_values,
    mask_values,
    max_class_id,
    plan_mask_mapping,
)
from unetpp_tf.data.pipeline import SPLITS, SegmentationData, batch_splits, split_indices

AUTOTUNE = tf.data.AUTOTUNE


def from_arrays(
    images,
    masks,
    *,
    image_size: tuple[int, int] | None = None,
    crop_size: tuple[int, int] | None = None,
    mask_mode: str = "auto",
    num_classes: int | None = None,
    normalization="unit",
    # The pipeline arguments below have the same names and defaults in every source, on purpose.
    batch_size: int = 8,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    shuffle: bool = True,
    cache: bool | str = True,
    augment: Callable | None = None,
    groups: Sequence[Hashable] | None = None,
) -> SegmentationData:
    """Build train/val/test datasets from numpy image and mask arrays.

    Images: [N, H, W] or [N, H, W, C]; uint8 (divided by 255), uint16 (divided by 65535),
    other integers within 0..255 (read as uint8) or floats in [0, 1] (kept). Floats outside
    [0, 1] are refused unless `normalization=(mean, std)` is given, which is then applied to
    them as they are. Masks: [N, H, W] or [N, H, W, 1] integer (or bool, or integer-valued
    float) class ids, or {0, 255} binary masks (255 -> 1). Everything is checked before a
    dataset is returned; the arrays are split with `split_indices(N, split, seed, groups)`, so
    samples that share a group key (tiles of one slide, slices of one patient) stay in one split.

    Args:
        images: np.ndarray. The images.
        masks: np.ndarray. The masks, same N, H and W as the images.
        image_size: tuple or None. (height, width) to resize to: bilinear for images, nearest
            for masks. Defaults to None (keep).
        crop_size: tuple or None. (height, width) crops, one window for image and mask: random
            (new each epoch, seeded) for train, centred for val/test. Defaults to None.
        mask_mode: str. "auto" (0/255 -> {0, 1}, else class ids), "binary" (non-zero -> 1) or
            "index" (values as they are). Defaults to "auto".
        num_classes: int or None. None infers it from the masks (1 for binary masks); given,
            every mask value must be in range. Defaults to None.
        normalization: str or tuple. "unit" scales to [0, 1]; (mean, std) floats or per-channel
            tuples are applied after that. Defaults to "unit".
        batch_size: int. Defaults to 8.
        split: tuple. (train, val, test) fractions. Defaults to (0.7, 0.15, 0.15).
        seed: int. Seed for the split, shuffling and random crops. Defaults to 0.
        shuffle: bool. Shuffle the train split each epoch. Defaults to True.
        cache: bool or str. True caches preprocessed samples in memory, a path prefix caches on
            disk (as `{path}_{split}`), False disables. Defaults to True.
        augment: callable or None. `augment(images, masks, training=True)` applied to train
            batches in tf.data. Defaults to None.
        groups: sequence or None. One hashable group key per sample (e.g. patient ids); whole
            groups go to one split. Defaults to None (split sample by sample).

    Returns:
        SegmentationData: batched splits (`files` is empty).

    Example:
        >>> x = np.random.randint(0, 256, (40, 32, 32, 3), np.uint8)
        >>> y = (x[..., :1] > 128).astype(np.uint8) * 255
        >>> data = from_arrays(x, y, batch_size=8)
        >>> data.num_classes
        1
    """
    image_size = check_size(image_size, "image_size")
    crop_size = check_size(crop_size, "crop_size")
    num_classes = check_num_classes(num_classes)
    norm = resolve_normalization(normalization)
    check_mask_mode(mask_mode, ("auto", "binary", "index"))

    images = _check_images(np.asarray(images), normalized=norm is not None)
    masks = _check_masks(np.asarray(masks))
    if images.shape[0] != masks.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {masks.shape[0]} masks; pass one mask per image.")
    if images.shape[1:3] != masks.shape[1:3]:
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} but masks are {masks.shape[1]}x{masks.shape[2]} "
            "(height x width); they must match pixel for pixel."
        )
    channels = int(images.shape[-1])
    check_normalization_channels(norm, channels)
    size = image_size or tuple(int(v) for v in images.shape[1:3])
    check_crop_fits(crop_size, size, f"the images ({size[0]}x{size[1]})")

    values = mask_values(masks)

    def where(value):
        return "samples " + describe(_samples_with(masks, [value]), 5)

    mapping = plan_mask_mapping(values, mask_mode=mask_mode, num_classes=num_classes, where=where)
    bad_mapped = set(invalid_values(mapping.map_values(values), mapping.num_classes))
    if bad_mapped:
        bad_raw = [int(v) for v in values if mapping.map_values([v]) & bad_mapped]
        raise ValueError(
            f"masks have values {describe(sorted(bad_mapped), 5)} outside the class ids "
            f"0..{max_class_id(mapping.num_classes)} (num_classes={mapping.num_classes}) in samples "
            f"{describe(_samples_with(masks, bad_raw))}; fix the masks or raise num_classes."
        )

    parts = split_indices(images.shape[0], split, seed, groups=groups)

    def prepare(image, mask):
        mask = apply_mask_mapping(mask, mapping)
        return preprocess_pair(image, mask, image_size=image_size, normalization=norm)

    samples = {
        name: tf.data.Dataset.from_tensor_slices((images[parts[name]], masks[parts[name]])).map(
            prepare, num_parallel_calls=AUTOTUNE
        )
        for name in SPLITS
    }
    batched = batch_splits(
        samples,
        crop_size=crop_size,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        cache=cache,
        augment=augment,
    )
    return SegmentationData(
        **batched,
        num_classes=mapping.num_classes,
        channels=channels,
        image_size=tuple(crop_size or size),
        counts={name: len(parts[name]) for name in SPLITS},
        source="arrays",
        files={},
    )


def _check_images(images: np.ndarray, *, normalized: bool) -> np.ndarray:
    """[N, H, W(, C)] images -> [N, H, W, C] uint8, uint16 or float32, with a helpful error."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty [N, H, W] or [N, H, W, C] array, got shape {images.shape}."
        )
    if images.dtype in (np.uint8, np.uint16):
        return images
    if np.issubdtype(images.dtype, np.integer):
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"integer images ({images.dtype}) have values {low}..{high}; pass uint8 0..255, uint16, "
                "or floats in [0, 1]."
            )
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32, copy=False)
        if not np.all(np.isfinite(images)):
            raise ValueError("images contain NaN or infinite values; clean them first.")
        low, high = float(images.min()), float(images.max())
        if (low < 0 or high > 1) and not normalized:
            raise ValueError(
                f"float images have values {low:g}..{high:g}, outside [0, 1]; scale them to [0, 1] "
                "(e.g. divide by 255), pass uint8 arrays, or give normalization=(mean, std) to "
                "normalize them as they are."
            )
        return images
    raise ValueError(f"images must be uint8, uint16, integer or float arrays, got dtype {images.dtype}.")


def _check_masks(masks: np.ndarray) -> np.ndarray:
    """[N, H, W(, 1)] masks -> [N, H, W, 1] integers, with a helpful error."""
    if masks.ndim == 3:
        masks = masks[..., None]
    if masks.ndim != 4 or masks.shape[-1] != 1:
        raise ValueError(f"masks must be [N, H, W] or [N, H, W, 1] class ids, got shape {masks.shape}.")
    if masks.dtype == np.bool_:
        return masks.astype(np.uint8)
    if np.issubdtype(masks.dtype, np.floating):
        if not np.all(np.isfinite(masks)) or not np.array_equal(masks, np.round(masks)):
            raise ValueError(
                "masks have non-integer float values; masks hold class ids: threshold or round them "
                "(e.g. (masks > 0.5).astype('uint8'))."
            )
        masks = masks.astype(np.int64)
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"masks must be integer class ids, got dtype {masks.dtype}.")
    if masks.size and int(masks.min()) < 0:
        raise ValueError(
            f"masks have negative values (min {int(masks.min())}) in samples "
            f"{describe(_samples_with(masks, np.unique(masks[masks < 0])))}; class ids start at 0."
        )
    if masks.dtype == np.uint64 or (masks.size and int(masks.max()) > np.iinfo(np.int32).max):
        masks = masks.astype(np.int64)
    return masks


def _samples_with(masks: np.ndarray, values) -> list[int]:
    """Indices of the samples whose mask holds any of `values`."""
    hit = np.isin(masks, np.asarray(list(values))).reshape(masks.shape[0], -1).any(axis=1)
    return [int(i) for i in np.flatnonzero(hit)]
