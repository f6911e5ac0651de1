"""Dataset statistics: counts, sizes, class pixel fractions, empty masks."""

from __future__ import annotations

from collections import Counter

import numpy as np


def dataset_statistics(dataset, num_classes: int = 1) -> dict:
    """Count what a dataset of (image, mask) batches holds.

    Args:
        dataset: iterable of (images, masks) batches, e.g. `data.train`.
        num_classes: int. 1 for binary masks, K for K classes. Defaults to 1.

    Returns:
        dict: `count` (images), `image_sizes` ({"HxW": count}), `channels`,
        `class_pixel_fraction` (one value per class id 0..max(1, K-1), summing to 1),
        `empty_mask_fraction` (masks with no foreground pixel), `intensity_mean`, `intensity_std`.

    Example:
        >>> stats = dataset_statistics(unetpp_tf.data.synthetic(64).train)
        >>> round(sum(stats["class_pixel_fraction"]), 6)
        1.0
    """
    ids = max(2, num_classes)
    pixels = np.zeros(ids, np.int64)
    sizes = Counter()
    count = empty = 0
    channels = None
    total = total_sq = values = 0.0
    for images, masks in dataset:
        images, masks = np.asarray(images), np.asarray(masks)
        count += len(images)
        channels = images.shape[-1]
        sizes[f"{images.shape[1]}x{images.shape[2]}"] += len(images)
        flat = masks.reshape(len(masks), -1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= ids):
            raise ValueError(f"mask values span {flat.min()}..{flat.max()}, outside 0..{ids - 1}; check num_classes.")
        pixels += np.bincount(flat.ravel(), minlength=ids)
        empty += int(np.sum(flat.max(axis=1) == 0))
        values += images.size
        total += float(images.sum(dtype=np.float64))
        total_sq += float(np.square(images, dtype=np.float64).sum())
    if count == 0:
        raise ValueError("the dataset is empty: nothing to describe.")
    mean = total / values
    return {
        "count": count,
        "image_sizes": dict(sizes),
        "channels": int(channels),
        "class_pixel_fraction": (pixels / pixels.sum()).tolist(),
        "empty_mask_fraction": empty / count,
        "intensity_mean": mean,
        "intensity_std": float(np.sqrt(max(total_sq / values - mean**2, 0.0))),
    }
