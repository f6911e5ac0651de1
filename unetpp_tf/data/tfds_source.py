"""Segmentation datasets from tensorflow-datasets: `from_tfds` (Oxford-IIIT Pet by default)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

from unetpp_tf.data.checks import check_crop_fits, check_normalization_channels, check_size, resolve_normalization
from unetpp_tf.data.crops import preprocess_pair
from unetpp_tf.data.masks import check_class_range, check_num_classes, classes_from_max_id, lookup_values, max_class_id
from unetpp_tf.data.pipeline import SPLITS, SegmentationData, batch_splits

AUTOTUNE = tf.data.AUTOTUNE

PET = "oxford_iiit_pet"
PET_CLASSES = {
    # Oxford-IIIT Pet trimaps: 1 = pet, 2 = background, 3 = border (outline of the pet).
    "binary": {1: 1, 2: 0, 3: 1},  # pet (border counted as pet) vs background
    "trimap": {1: 1, 2: 0, 3: 2},  # 0 background, 1 pet, 2 border
}


def trimap_to_classes(mask: tf.Tensor, classes: str = "binary") -> tf.Tensor:
    """Map Oxford-IIIT Pet trimap values {1: pet, 2: background, 3: border} to class ids.

    `classes="binary"`: pet and border -> 1, background -> 0 (num_classes=1).
    `classes="trimap"`: background -> 0, pet -> 1, border -> 2 (num_classes=3).
    Any other value fails when the tensor is computed.

    Args:
        mask: tf.Tensor. Integer trimap of any shape.
        classes: str. "binary" or "trimap". Defaults to "binary".

    Returns:
        tf.Tensor: int32 class ids, the shape of `mask`.

    Example:
        >>> trimap_to_classes(tf.constant([1, 2, 3]), "trimap").numpy()
        array([1, 0, 2], dtype=int32)
    """
    if classes not in PET_CLASSES:
        raise ValueError(f"classes must be one of {tuple(PET_CLASSES)} for trimaps, got {classes!r}.")
    return lookup_values(mask, PET_CLASSES[classes], "oxford_iiit_pet trimap value")


def from_tfds(
    name: str = PET,
    *,
    classes: str | Mapping[int, int] = "binary",
    data_dir: str | None = None,
    download: bool = True,
    image_size: tuple[int, int] | None = (128, 128),
    crop_size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    normalization="unit",
    # The pipeline arguments below have the same names and defaults in every source, on purpose.
    batch_size: int = 8,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    shuffle: bool = True,
    cache: bool | str = True,
    augment: Callable | None = None,
) -> SegmentationData:
    """Load a tensorflow-datasets segmentation dataset with "image" and "segmentation_mask" features.

    Oxford-IIIT Pet (the default) stores trimaps {1: pet, 2: background, 3: border}:
    `classes="binary"` gives pet (1 and 3) vs background (2) as {1, 0} (num_classes=1);
    `classes="trimap"` gives {0: background, 1: pet, 2: border} (num_classes=3). Other
    datasets take `classes="auto"` (ids kept as they are; `num_classes` required) or a dict
    {raw value: class id}. Splits: TFDS "train" is cut into train and val in the ratio
    split[0] : split[1] (a contiguous slice such as "train[:82.3529%]"; TFDS shuffles records
    when it builds a dataset, so the slice is already mixed, and the cut does not depend on
    `seed`), and TFDS "test" is the test split (split[2] is then unused). A dataset with no
    "test" split is cut into all three parts by `split`. Images come in varying sizes, so they
    are always resized to `image_size`.

    Args:
        name: str. TFDS dataset name. Defaults to "oxford_iiit_pet".
        classes: str or dict. "binary" or "trimap" (Oxford-IIIT Pet), "auto", or
            {raw value: class id}. Defaults to "binary".
        data_dir: str or None. TFDS data directory. Defaults to None (TFDS default).
        download: bool. Download and prepare the dataset when missing. Defaults to True.
        image_size: tuple. (height, width) to resize to: bilinear for images, nearest for
            masks. Defaults to (128, 128).
        crop_size: tuple or None. (height, width) crops after resizing: random (new each epoch,
            seeded) for train, centred for val/test. Defaults to None.
        num_classes: int or None. None infers it from `classes`; required for "auto".
            Defaults to None.
        normalization: str or tuple. "unit" scales to [0, 1]; (mean, std) floats or per-channel
            tuples are applied after that. Defaults to "unit".
        batch_size: int. Defaults to 8.
        split: tuple. (train, val, test) fractions, see above. Defaults to (0.7, 0.15, 0.15).
        seed: int. Seed for shuffling and random crops. Defaults to 0.
        shuffle: bool. Shuffle the train split each epoch. Defaults to True.
        cache: bool or str. True caches decoded, resized samples in memory, a path prefix on
            disk (as `{path}_{split}`), False disables. Defaults to True.
        augment: callable or None. `augment(images, masks, training=True)` applied to train
            batches in tf.data. Defaults to None.

    Returns:
        SegmentationData: batched splits; `source` records the TFDS split strings.

    Example:
        >>> data = from_tfds("oxford_iiit_pet", classes="trimap", image_size=(128, 128))
        >>> data.num_classes
        3
    """
    import tensorflow_datasets as tfds

    image_size = check_size(image_size, "image_size")
    if image_size is None:
        raise ValueError("from_tfds needs image_size=(height, width): TFDS images come in varying sizes.")
    crop_size = check_size(crop_size, "crop_size")
    check_crop_fits(crop_size, image_size, f"image_size {image_size}")
    num_classes = check_num_classes(num_classes)
    norm = resolve_normalization(normalization)
    fractions = _check_split(split)
    table, num_classes = _class_table(name, classes, num_classes)

    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    missing = [key for key in ("image", "segmentation_mask") if key not in features]
    if missing:
        raise ValueError(
            f"TFDS dataset {name!r} has no {' or '.join(missing)} feature (it has {sorted(features)}); "
            "from_tfds needs 'image' and 'segmentation_mask'."
        )
    channels = features["image"].shape[-1]
    if channels is None:
        raise ValueError(f"TFDS dataset {name!r} does not fix the number of image channels.")
    check_normalization_channels(norm, channels)
    if download:
        try:
            builder.download_and_prepare()
        except Exception as error:  # noqa: BLE001  (network, disk and builder errors all land here)
            raise ValueError(
                f"could not download and prepare TFDS dataset {name!r} into {builder.data_dir}: "
                f"{type(error).__name__}: {error}. Check the network connection, or prepare it once "
                "elsewhere and pass data_dir= (with download=False)."
            ) from error

    specs = _split_specs(fractions, list(builder.info.splits.keys()))

    def prepare(example):
        mask = tf.cast(example["segmentation_mask"], tf.int32)
        if mask.shape.rank == 2:
            mask = mask[..., None]
        if table is None:
            mask = check_class_range(mask, num_classes, f"{name} mask")
        else:
            mask = lookup_values(mask, table, f"{name} mask value")
        return preprocess_pair(example["image"], mask, image_size=image_size, normalization=norm)

    samples, counts = {}, {}
    for part in SPLITS:
        spec = specs[part]
        if spec is None:
            ds = builder.as_dataset(split=specs["train"], shuffle_files=False).take(0)
        else:
            ds = builder.as_dataset(split=spec, shuffle_files=False)
        counts[part] = _count(builder, spec, ds)
        samples[part] = ds.map(prepare, num_parallel_calls=AUTOTUNE)
    batched = batch_splits(
        samples,
        crop_size=crop_size,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        cache=cache,
        augment=augment,
    )
    described = ", ".join(f"{part}={specs[part]}" for part in SPLITS)
    return SegmentationData(
        **batched,
        num_classes=num_classes,
        channels=int(channels),
        image_size=tuple(crop_size or image_size),
        counts=counts,
        source=f"tfds:{name} ({described})",
        files={},
    )


def _class_table(name: str, classes, num_classes: int | None) -> tuple[dict | None, int]:
    """({raw: class id} or None for "auto", num_classes) with the argument checks."""
    if isinstance(classes, Mapping):
        table = {int(k): int(v) for k, v in classes.items()}
        if not table or min(table.values()) < 0:
            raise ValueError(f"classes dict must map raw values to non-negative class ids, got {classes!r}.")
    elif classes == "auto":
        if num_classes is None:
            raise ValueError("classes='auto' keeps the mask ids as they are; pass num_classes too.")
        return None, num_classes
    elif classes in PET_CLASSES:
        if name != PET:
            raise ValueError(
                f"classes={classes!r} describes {PET} trimaps; for {name!r} pass classes='auto' with "
                "num_classes, or a dict {raw value: class id}."
            )
        table = PET_CLASSES[classes]
    else:
        raise ValueError(f"classes must be 'binary', 'trimap', 'auto' or a dict, got {classes!r}.")
    top = max(table.values())
    if num_classes is None:
        return table, classes_from_max_id(top)
    if top > max_class_id(num_classes):
        raise ValueError(
            f"classes={classes!r} gives class ids up to {top} but num_classes={num_classes}; raise it."
        )
    return table, num_classes


def _check_split(split) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions (train, val, test) summing to 1, got {split!r}."
        )
    if fractions[0] == 0:
        raise ValueError(f"split {fractions} leaves no training data; raise the train fraction.")
    return fractions


def _split_specs(fractions: tuple[float, float, float], available: list[str]) -> dict[str, str | None]:
    """TFDS split strings per part; None for an empty part."""
    train, val, test = fractions

    def pct(value: float) -> str:
        return f"{round(100 * value, 4):g}%"

    if not available or "test" in available:  # unknown split names (e.g. mock data): assume train/test
        cut = train / (train + val)
        if val == 0:
            return {"train": "train", "val": None, "test": "test"}
        return {"train": f"train[:{pct(cut)}]", "val": f"train[{pct(cut)}:]", "test": "test"}
    specs = {"train": f"train[:{pct(train)}]"}
    specs["val"] = f"train[{pct(train)}:{pct(train + val)}]" if val > 0 else None
    specs["test"] = f"train[{pct(train + val)}:]" if test > 0 else None
    return specs


def _count(builder, spec: str | None, ds: tf.data.Dataset) -> int:
    if spec is None:
        return 0
    try:
        return int(builder.info.splits[spec].num_examples)
    except Exception:  # noqa: BLE001 - split sizes unknown (not prepared, mocked): ask the dataset
        cardinality = int(ds.cardinality())
        return cardinality if cardinality >= 0 else -1
