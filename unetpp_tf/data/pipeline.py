"""The one tf.data pipeline every source goes through, and the splits it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class SegmentationData:
    """Batched train/val/test datasets of (image, mask) and what a model needs to know.

    Images are float32 [batch, H, W, C] in [0, 1] (or normalized as the source states);
    masks are int32 [batch, H, W, 1] class ids in 0..num_classes-1 (binary: 0/1).

    Attributes:
        train: tf.data.Dataset. Shuffled each epoch when `shuffle=True`.
        val: tf.data.Dataset. Deterministic order.
        test: tf.data.Dataset. Deterministic order.
        num_classes: int. 1 for binary masks (sigmoid models), K > 1 otherwise.
        channels: int. Image channels.
        image_size: tuple or None. (height, width) of every image, None if sizes vary.
        counts: dict. Number of samples per split.
        source: str. Where the data came from, for run records.
        files: dict. Per split, the (image, mask) file pairs; empty for in-memory sources.

    Example:
        >>> data = unetpp_tf.data.synthetic(num_samples=64)
        >>> images, masks = next(iter(data.train))
    """

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    channels: int
    image_size: tuple | None
    counts: dict
    source: str
    files: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, split: str) -> tf.data.Dataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; choose one of {SPLITS}.")
        return getattr(self, split)


def split_indices(count: int, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """Split `range(count)` into train/val/test index arrays, deterministically.

    The same count, fractions and seed give the same split; no index is in two parts.
    Sizes are rounded so that they add up to `count`.

    Args:
        count: int. Number of samples.
        fractions: tuple. (train, val, test) fractions summing to 1. Defaults to
            (0.7, 0.15, 0.15).
        seed: int. Shuffling seed. Defaults to 0.

    Returns:
        dict: {"train": ndarray, "val": ndarray, "test": ndarray} of sorted indices.

    Example:
        >>> parts = split_indices(20)
        >>> [len(parts[k]) for k in ("train", "val", "test")]
        [14, 3, 3]
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions (train, val, test) summing to 1, got {fractions}."
        )
    order = np.random.default_rng(seed).permutation(count)
    n_val = int(round(count * fractions[1]))
    n_test = int(round(count * fractions[2]))
    n_train = count - n_val - n_test
    parts = {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }
    empty = [name for name, fraction in zip(SPLITS, fractions) if fraction > 0 and len(parts[name]) == 0]
    if empty:
        raise ValueError(
            f"split {fractions} of {count} samples leaves the {' and '.join(empty)} part empty; "
            "add data or raise that fraction."
        )
    return parts


def finalize(
    samples: tf.data.Dataset,
    *,
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = True,
    augment: Callable | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Cache, shuffle, batch, (optionally) augment and prefetch a per-sample dataset.

    Every source ends here, so all of them behave alike. Shuffling is seeded and
    reshuffles each epoch in the same sequence for the same seed.

    Args:
        samples: tf.data.Dataset. Unbatched (image float32 [H, W, C], mask int32 [H, W, 1]).
        batch_size: int. Defaults to 8.
        shuffle: bool. Shuffle (training splits). Defaults to False.
        seed: int. Shuffle seed. Defaults to 0.
        cache: bool or str. True caches decoded samples in memory, a path caches on
            disk, False disables. Defaults to True.
        augment: callable or None. `augment(images, masks) -> (images, masks)` applied
            to training batches in tf.data (the host), e.g. `SegmentationAugmenter`;
            leave None to augment on the device inside the train step instead.
        drop_remainder: bool. Drop the last incomplete batch. Defaults to False.

    Returns:
        tf.data.Dataset: batched, prefetched (image, mask) tuples.

    Example:
        >>> ds = finalize(tf.data.Dataset.from_tensor_slices((x, y)), batch_size=4)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if cache:
        samples = samples.cache() if cache is True else samples.cache(str(cache))
    if shuffle:
        size = samples.cardinality()
        buffer = 1024 if size < 0 else int(min(size, 4096))
        samples = samples.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    batches = samples.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    if augment is not None:
        batches = batches.map(lambda x, y: augment(x, y, training=True), num_parallel_calls=AUTOTUNE)
    return batches.prefetch(AUTOTUNE)


def targets_per_head(dataset: tf.data.Dataset, model_or_heads) -> tf.data.Dataset:
    """Repeat each mask once per model output, for plain `model.fit` with deep supervision.

    Keras needs one target per output; the masks are repeated as a tuple (never a list,
    which tf.data would stack into one tensor). `AugmentedModel` does this by itself.

    Args:
        dataset: tf.data.Dataset. Batches of (images, masks).
        model_or_heads: keras.Model or int. The model (its number of outputs is used) or
            the number of heads.

    Returns:
        tf.data.Dataset: batches of (images, (masks, masks, ...)); unchanged for one output.

    Example:
        >>> model.fit(targets_per_head(data.train, model), validation_data=targets_per_head(data.val, model))
    """
    heads = model_or_heads if isinstance(model_or_heads, int) else len(model_or_heads.outputs)
    if heads == 1:
        return dataset
    return dataset.map(lambda images, masks: (images, tuple(masks for _ in range(heads))))
