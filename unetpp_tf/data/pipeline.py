"""The one tf.data pipeline every source goes through: splits, crops, cache, shuffle, batches, augmentation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from unetpp_tf.data.augment import SegmentationAugmenter
from unetpp_tf.data.augment3d import VolumeAugmenter
from unetpp_tf.data.checks import describe
from unetpp_tf.data.crops import center_crop_pair, random_crop_pair

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "val", "test")
_AUGMENT_STREAM = 0x6175  # folded into the per-batch seeds of host augmentation


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
        volumes: dict. Volume sources only: per split, the whole `Volume`s the patches or
            slices come from (scored scan by scan); empty for image sources.

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
    volumes: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, split: str) -> tf.data.Dataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; choose one of {SPLITS}.")
        return getattr(self, split)


def split_indices(
    count: int,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> dict:
    """Split `range(count)` into train/val/test index arrays, deterministically.

    The same count, fractions, seed (and groups) give the same split; no index is in two parts.
    Without `groups`, sizes are rounded so that they add up to `count`. With `groups`, whole
    groups go to one part (tiles of one slide, slices of one patient never straddle parts): the
    groups are shuffled with `seed`, then test and val are filled to their target sample counts
    (a group is taken when it brings the part closer to its target) and the rest is train.

    Args:
        count: int. Number of samples.
        fractions: tuple. (train, val, test) fractions summing to 1. Defaults to
            (0.7, 0.15, 0.15).
        seed: int. Shuffling seed. Defaults to 0.
        groups: sequence or None. One hashable group key per sample; None puts every sample
            in its own group. Defaults to None.

    Returns:
        dict: {"train": ndarray, "val": ndarray, "test": ndarray} of sorted indices.

    Example:
        >>> parts = split_indices(20)
        >>> [len(parts[k]) for k in ("train", "val", "test")]
        [14, 3, 3]
        >>> parts = split_indices(6, (0.5, 0.0, 0.5), groups=["a", "a", "b", "b", "c", "c"])
    """
    fractions = _check_fractions(fractions)
    n_val = int(round(count * fractions[1]))
    n_test = int(round(count * fractions[2]))
    if groups is None:
        order = np.random.default_rng(seed).permutation(count)
        n_train = count - n_val - n_test
        parts = {
            "train": np.sort(order[:n_train]),
            "val": np.sort(order[n_train : n_train + n_val]),
            "test": np.sort(order[n_train + n_val :]),
        }
        where, fix = f"{count} samples", "add data or raise that fraction"
    else:
        parts, where = _grouped_split(_group_members(groups, count), seed, n_val, n_test)
        fix = "use more, smaller groups (change --group-by), add data, or change the fractions (--split)"
    empty = [name for name, fraction in zip(SPLITS, fractions) if fraction > 0 and len(parts[name]) == 0]
    if empty:
        raise ValueError(f"split {fractions} of {where} leaves the {' and '.join(empty)} part empty; {fix}.")
    return parts


def fold_indices(
    count: int,
    folds: int,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
    exclude: Sequence[int] | None = None,
) -> list[dict]:
    """K cross-validation folds of `range(count)`: disjoint validation parts that cover the data.

    Every sample not in `exclude` is in exactly one fold's "val" and in the other folds'
    "train"; whole groups stay in one fold. Groups are shuffled with `seed`, then dealt
    largest first to the fold with the fewest samples so far, which balances the fold sizes.

    Args:
        count: int. Number of samples.
        folds: int. Number of folds K, at least 2 and at most the number of groups.
        seed: int. Seed that orders groups of equal size. Defaults to 0.
        groups: sequence or None. One hashable group key per sample; None puts every sample
            in its own group. Defaults to None.
        exclude: sequence of int or None. Indices left out of every fold (e.g. a held-out test
            split). Defaults to None.

    Returns:
        list: K dicts {"train": ndarray, "val": ndarray} of sorted indices.

    Example:
        >>> parts = fold_indices(10, 5)
        >>> [len(part["val"]) for part in parts]
        [2, 2, 2, 2, 2]
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"--folds must be an integer of at least 2 (K models on K folds), got {folds!r}.")
    keep = np.ones(count, bool)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
        if exclude.size and (exclude.min() < 0 or exclude.max() >= count):
            raise ValueError(f"exclude holds indices outside 0..{count - 1}; pass sample indices of the data.")
        keep[exclude] = False
    members = [m[keep[m]] for m in _group_members(groups if groups is not None else range(count), count)]
    members = [m for m in members if len(m)]
    if folds > len(members):
        if groups is None:
            raise ValueError(
                f"--folds {folds} needs at least {folds} samples but the data has {len(members)}; "
                "lower --folds or add data."
            )
        keys = describe([repr(groups[int(m[0])]) for m in members], 5)
        raise ValueError(
            f"--folds {folds} needs at least {folds} groups but the data has {len(members)} ({keys}); "
            "lower --folds or change --group-by."
        )
    shuffled = [members[i] for i in np.random.default_rng(seed).permutation(len(members))]
    shuffled.sort(key=len, reverse=True)  # stable: equal sizes keep the seeded order
    vals: list[list[np.ndarray]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for member in shuffled:
        fold = int(np.argmin(sizes))
        vals[fold].append(member)
        sizes[fold] += len(member)
    used = np.flatnonzero(keep)
    out = []
    for val in vals:
        val = _joined(val)
        out.append({"train": np.setdiff1d(used, val), "val": val})
    return out


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
    reshuffles each epoch in the same sequence for the same seed. A `SegmentationAugmenter`
    gets one seed per batch from a seeded stream that is new each epoch (like the shuffle
    order and the random crops), and its draws are a pure function of that seed: two pipelines
    with the same seed give the same augmented batches, epoch after epoch, however tf.data
    schedules the parallel calls. As for shuffling, TensorFlow's global seed
    (`keras.utils.set_random_seed`) also enters these streams. Any other `augment` callable
    is called without a seed and draws its randomness itself.

    Args:
        samples: tf.data.Dataset. Unbatched (image float32 [H, W, C], mask int32 [H, W, 1]).
        batch_size: int. Defaults to 8.
        shuffle: bool. Shuffle (training splits). Defaults to False.
        seed: int. Shuffle seed. Defaults to 0.
        cache: bool or str. True caches decoded samples in memory, a path caches on
            disk, False disables. Defaults to True.
        augment: callable or None. `augment(images, masks, training=True) -> (images, masks)`
            applied to training batches in tf.data (the host), e.g. `SegmentationAugmenter`;
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
        batches = augmented(batches, augment, seed)
    return batches.prefetch(AUTOTUNE)


def augmented(batches: tf.data.Dataset, augment: Callable, seed: int = 0) -> tf.data.Dataset:
    """Apply `augment` to every batch in parallel; a Segmentation- or VolumeAugmenter gets a seed per batch.

    The seed of batch b in epoch e comes from `tf.data.Dataset.random(seed)` (a new stream each
    iteration) folded with a constant of its own, so it is independent of the random-crop
    stream of the same seed.

    Args:
        batches: tf.data.Dataset. Batches of (images, masks).
        augment: callable. `augment(images, masks, training=True)`, e.g. a `SegmentationAugmenter`.
        seed: int. Seed of the per-batch seed stream. Defaults to 0.

    Returns:
        tf.data.Dataset: augmented batches, in the order of `batches`.

    Example:
        >>> ds = augmented(batches, SegmentationAugmenter(rotation=0.1), seed=3)
    """
    if not isinstance(augment, (SegmentationAugmenter, VolumeAugmenter)):
        return batches.map(lambda x, y: augment(x, y, training=True), num_parallel_calls=AUTOTUNE)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    seeds = seeds.map(lambda pair: tf.random.experimental.stateless_fold_in(pair, _AUGMENT_STREAM))
    return tf.data.Dataset.zip(batches, seeds).map(
        lambda pair, batch_seed: augment(pair[0], pair[1], training=True, seed=batch_seed),
        num_parallel_calls=AUTOTUNE,
    )


def split_cache(cache: bool | str, split: str) -> bool | str:
    """Per-split cache setting: a path becomes `{path}_{split}` so the splits never share files."""
    if isinstance(cache, (str,)) or hasattr(cache, "__fspath__"):
        return f"{cache}_{split}"
    return bool(cache)


def batch_splits(
    samples: Mapping[str, tf.data.Dataset],
    *,
    crop_size: tuple[int, int] | None = None,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 0,
    cache: bool | str = True,
    augment: Callable | None = None,
) -> dict[str, tf.data.Dataset]:
    """Crop and `finalize` per-sample train/val/test datasets the same way for every source.

    The train split gets a random crop (seeded; a new window each epoch, the same sequence for
    the same seed) applied after the cache, so caching never freezes the crops; val and test get
    a centre crop before the cache. Then each split goes through `finalize`: the train split
    is shuffled when `shuffle` and augmented when `augment` is given; val and test are neither.

    Args:
        samples: dict. {"train"|"val"|"test": unbatched dataset of (image, mask)}.
        crop_size: tuple or None. (height, width) of the crops. Defaults to None.
        batch_size: int. Defaults to 8.
        shuffle: bool. Shuffle the train split each epoch. Defaults to True.
        seed: int. Seed for shuffling and random crops. Defaults to 0.
        cache: bool or str. True caches in memory, a path prefix caches on disk as
            `{path}_{split}`, False disables. Defaults to True.
        augment: callable or None. `augment(images, masks, training=True)` applied to train
            batches (see `finalize`). Defaults to None.

    Returns:
        dict: {"train": ..., "val": ..., "test": ...} batched datasets.

    Example:
        >>> parts = batch_splits({"train": ds, "val": ds, "test": ds}, crop_size=(32, 32))
    """
    out = {}
    for split in SPLITS:
        ds = samples[split]
        split_caching = split_cache(cache, split)
        if crop_size is not None and split == "train":
            if split_caching:
                ds = ds.cache() if split_caching is True else ds.cache(split_caching)
                split_caching = False
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip(ds, seeds).map(
                lambda pair, s: random_crop_pair(pair[0], pair[1], crop_size, s), num_parallel_calls=AUTOTUNE
            )
        elif crop_size is not None:
            ds = ds.map(lambda x, y: center_crop_pair(x, y, crop_size), num_parallel_calls=AUTOTUNE)
        out[split] = finalize(
            ds,
            batch_size=batch_size,
            shuffle=split == "train" and bool(shuffle),
            seed=seed,
            cache=split_caching,
            augment=augment if split == "train" else None,
        )
    return out


def advance_epochs(dataset: tf.data.Dataset, epochs: int) -> tf.data.Dataset:
    """Move a split's per-epoch random streams `epochs` epochs ahead, for resuming a run.

    The shuffle order, the random crops and the host augmentation seeds of a split are drawn
    anew for each iterator over it, when it yields its first batch. This reads the first
    advanced epoch to its end (which also completes an in-memory cache) and one batch of each
    further one, so the next epoch is the one an uninterrupted run would see after `epochs`.

    Args:
        dataset: tf.data.Dataset. A split from a data source, e.g. `data.train`.
        epochs: int. Epochs already done.

    Returns:
        tf.data.Dataset: `dataset` itself, its streams advanced.

    Example:
        >>> advance_epochs(data.train, initial_epoch)  # then fit(..., initial_epoch=initial_epoch)
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}.")
    for done in range(int(epochs)):
        iterator = iter(dataset)
        if done == 0:
            for _ in iterator:
                pass
        else:
            next(iterator, None)
    return dataset


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


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions (train, val, test) summing to 1, got {fractions}."
        )
    return fractions


def _group_members(groups: Sequence[Hashable], count: int) -> list[np.ndarray]:
    """Sample indices per group, the groups ordered by str(key) (so not by sample order)."""
    if len(groups) != count:
        raise ValueError(f"got {len(groups)} group keys for {count} samples; pass one group key per sample.")
    members: dict = {}
    for index, key in enumerate(groups):
        try:
            members.setdefault(key, []).append(index)
        except TypeError:
            raise TypeError(
                f"group key {key!r} of sample {index} is not hashable; use strings or numbers as group keys."
            ) from None
    return [np.asarray(members[key], np.int64) for key in sorted(members, key=str)]


def _grouped_split(members: list[np.ndarray], seed: int, n_val: int, n_test: int) -> tuple[dict, str]:
    """(parts, description): seeded group order, test then val filled to their targets, the rest train."""
    order = np.random.default_rng(seed).permutation(len(members))
    test, rest = _fill([members[i] for i in order], n_test)
    val, rest = _fill(rest, n_val)
    count = sum(len(m) for m in members)
    smallest = min((len(m) for m in members), default=0)
    where = (
        f"{count} samples in {len(members)} groups (whole groups only; the smallest has {smallest} "
        f"samples, the targets are {count - n_val - n_test}/{n_val}/{n_test} for train/val/test)"
    )
    return {"train": _joined(rest), "val": _joined(val), "test": _joined(test)}, where


def _fill(groups: list[np.ndarray], target: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(taken, rest): groups taken in order while each brings the taken total closer to `target`."""
    taken, rest, total = [], [], 0
    for member in groups:
        if 2 * total + len(member) < 2 * target:  # |total + size - target| < |total - target|
            taken.append(member)
            total += len(member)
        else:
            rest.append(member)
    return taken, rest


def _joined(members: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(members)) if members else np.zeros(0, np.int64)
