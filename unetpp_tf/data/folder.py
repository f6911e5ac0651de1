"""Image/mask pairs from folders on disk: `from_directory`.

`from_directory` runs four steps, each a function of its own: find the pairs
(`unetpp_tf.data.pairing`), inspect every file (`unetpp_tf.data.inspection`), decide the
classes and drop or report the bad pairs, then build the tf.data pipelines.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import tensorflow as tf

from unetpp_tf.data.checks import (
    check_channels,
    check_crop_fits,
    check_max_pixels,
    check_normalization_channels,
    check_size,
    describe,
    describe_lines,
    resolve_normalization,
)
from unetpp_tf.data.crops import preprocess_pair
from unetpp_tf.data.inspection import MAX_IMAGE_PIXELS, inspect_pairs
from unetpp_tf.data.masks import (
    MaskMapping,
    apply_mask_mapping,
    check_color_map,
    check_mask_mode,
    check_num_classes,
    classes_from_max_id,
    invalid_values,
    max_class_id,
    plan_mask_mapping,
    rgb_to_classes,
)
from unetpp_tf.data.pairing import find_folders, group_keys, pair_files, recorded_parts
from unetpp_tf.data.pipeline import SPLITS, SegmentationData, batch_splits, split_indices
from unetpp_tf.data.readers import decode_image_file, decode_mask_file, image_channels, image_decoder, mask_reader

AUTOTUNE = tf.data.AUTOTUNE

LISTED_PROBLEMS = 100
"""Files listed one per line in the invalid-pairs error before the rest is counted."""

Pair = tuple[Path, Path]


def from_directory(
    root: str | os.PathLike | None = None,
    *,
    images: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    image_size: tuple[int, int] | None = None,
    crop_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mask_mode: str = "auto",
    color_map: dict | None = None,
    num_classes: int | None = None,
    normalization="unit",
    # The pipeline arguments below have the same names and defaults in every source, on purpose.
    batch_size: int = 8,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    shuffle: bool = True,
    cache: bool | str = True,
    augment: Callable | None = None,
    skip_invalid: bool = False,
    group_by: str | None = None,
    splits: Mapping | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> SegmentationData:
    """Load image/mask pairs from folders, validate every file, and split them into train/val/test.

    Layouts: `root/images/` + `root/masks/` (split randomly with `split` and `seed`); per-split
    folders `root/train/{images,masks}`, `root/val/...` (or `valid`, `validation`) and
    `root/test/...`, used as given (detected when `root/train` exists; a missing val or test
    folder gives an empty split); or two explicit folders `images=` and `masks=`. Images and
    masks pair by file stem (`a.jpg` with `a.png`). Images: PNG, JPEG, BMP, TIFF, gray or
    RGB (an alpha channel that is fully opaque is dropped; see below); 8-bit ones in
    PNG/JPEG/BMP decode with `tf.io`, the rest (TIFF, 16-bit) with PIL. Masks: binary 0/255
    or 0/1, class ids 0..K-1 (8- or 16-bit), palette PNGs (the palette indices are the class
    ids) or RGB colours with `color_map`.

    Every file is opened and decoded once before anything is returned (the inspection pass,
    `unetpp_tf.data.inspection`). Structural problems raise at once: a missing folder, no
    images, an empty split, recorded files that no longer exist. Problems of single files are
    collected and raised together, one line per file with the reason and what to do: unpaired
    files, several files sharing a stem, empty (0-byte), unreadable, truncated or damaged files
    (PNG, JPEG, TIFF, BMP), files that declare more than `max_pixels` pixels (refused from the
    header, before decoding: decompression bombs), images with transparent pixels (alpha is
    only dropped when it is opaque everywhere), TIFFs with channel counts other than gray,
    gray + alpha, RGB, RGB + alpha, image/mask size mismatches, mask values outside the
    classes, unknown colours, images smaller than `crop_size`. With `skip_invalid=True`
    exactly those pairs are dropped and listed in `data.files["skipped"]` as (path, reason);
    nothing is skipped silently otherwise.

    `group_by` keeps files that share a group (tiles of one slide, slices of one patient) in one
    split: the regex is searched (`re.search`) in each image's file stem and the group key is its
    first capture group, or the whole match when it has none. Every image name must match (the
    ones that do not are named in the error). The per-split folder layout is used as given, so
    `group_by` raises there. `splits` replaces the folder scan and the random split with
    recorded file lists (a run's `data.files`, as saved in splits.json): the files are validated
    as usual and any that no longer exist are named in one error. `group_by` then only labels
    the files with their groups in `files["groups"]`.

    Args:
        root: str, Path or None. Dataset folder. Defaults to None.
        images: str, Path or None. Image folder (relative to `root` when given). Defaults to
            "images".
        masks: str, Path or None. Mask folder (relative to `root` when given). Defaults to
            "masks".
        image_size: tuple or None. (height, width) to resize to: bilinear for images, nearest
            for masks. None keeps the sizes, which must then be equal (or pass `crop_size`).
            Defaults to None.
        crop_size: tuple or None. (height, width) crops, one window for image and mask: random
            (new each epoch, seeded) for train, centred for val/test. Defaults to None.
        channels: int or None. 1 or 3 image channels; None infers 1 when all images are gray,
            else 3. Defaults to None.
        mask_mode: str. "auto" (0/255 -> {0, 1}, other values and palette indices as class
            ids, "rgb" when `color_map` is given), "binary" (non-zero -> 1), "index" (values
            as they are) or "rgb" (colours through `color_map`). Defaults to "auto".
        color_map: dict or None. {(r, g, b): class_id} for RGB masks. Defaults to None.
        num_classes: int or None. None infers it from the masks (1 for binary masks); given,
            every mask value must be a class id in range. Defaults to None.
        normalization: str or tuple. "unit" scales images to [0, 1]; (mean, std) floats or
            per-channel tuples are applied after that. Defaults to "unit".
        batch_size: int. Defaults to 8.
        split: tuple. (train, val, test) fractions for the random split. Defaults to
            (0.7, 0.15, 0.15).
        seed: int. Seed for the split, shuffling and random crops. Defaults to 0.
        shuffle: bool. Shuffle the train split each epoch. Defaults to True.
        cache: bool or str. True caches decoded samples in memory, a path prefix caches on
            disk (as `{path}_{split}`), False decodes every epoch. Defaults to True.
        augment: callable or None. `augment(images, masks, training=True)` applied to train
            batches in tf.data. Defaults to None.
        skip_invalid: bool. Drop bad pairs (recorded in `files["skipped"]`) instead of raising.
            Defaults to False.
        group_by: str or None. Regex that finds the group key in each image file stem, e.g.
            r"^(slide[0-9]+)_" for "slide3_tile12.png"; None splits file by file. Defaults to None.
        splits: dict or None. {"train"|"val"|"test": [(image, mask), ...]} file paths to use
            instead of scanning `root` (lists of 2-lists from JSON work; other keys such as
            "skipped" and "groups" are ignored, so a recorded `data.files` can be passed as it
            is); `root`, `images`, `masks` and `split` are then not used. Defaults to None.
        max_pixels: int or None. Largest height * width of a file; larger ones are refused
            from their header, before decoding. None leaves only PIL's own limit (twice
            `PIL.Image.MAX_IMAGE_PIXELS`). Defaults to `MAX_IMAGE_PIXELS` (2**27).

    Returns:
        SegmentationData: batched splits; `files` holds the (image, mask) paths per split,
        "skipped", and with `group_by` "groups": {split: [group key per pair]}.

    Example:
        >>> data = from_directory("data/nuclei", image_size=(96, 96), batch_size=16)
        >>> images, masks = next(iter(data.train))
        >>> data = from_directory("data/slides", group_by=r"^(slide[0-9]+)_")
        >>> again = from_directory(splits=data.files)  # the same files in the same splits
    """
    options = _Options.check(image_size, crop_size, channels, mask_mode, color_map, num_classes, normalization)
    parts, file_problems = _find_pairs(root, images, masks, splits, group_by)
    keys = group_keys(_joined(parts), group_by)
    infos = inspect_pairs(_joined(parts), rgb=options.rgb, max_pixels=check_max_pixels(max_pixels))
    problems = {pair: info.problem for pair, info in infos.items() if info.problem}
    mapping, class_problems = _plan_classes(infos, [pair for pair in infos if pair not in problems], options)
    problems.update(class_problems)
    problems.update(_crop_problems(infos, [pair for pair in infos if pair not in problems], options))
    parts, skipped = _drop_invalid(parts, file_problems, problems, skip_invalid)
    if problems:  # the classes of the pairs kept
        mapping, _ = _plan_classes(infos, _joined(parts), options)
    size, channels = _size_and_channels(infos, _joined(parts), options)
    parts = _assign_splits(parts, split, seed, keys)
    samples = _sample_datasets(parts, infos, channels, mapping, options)
    batched = batch_splits(
        samples, crop_size=options.crop_size, batch_size=batch_size, shuffle=shuffle, seed=seed, cache=cache,
        augment=augment,
    )
    return SegmentationData(
        **batched,
        num_classes=mapping.num_classes,
        channels=channels,
        image_size=tuple(size),
        counts={name: len(parts[name]) for name in SPLITS},
        source=f"folder:{root if root is not None else images or 'recorded splits'}",
        files=_files_record(parts, skipped, keys),
    )


@dataclasses.dataclass(frozen=True)
class _Options:
    """The checked per-sample settings of `from_directory`."""

    image_size: tuple[int, int] | None
    crop_size: tuple[int, int] | None
    channels: int | None
    mask_mode: str
    table: dict | None  # {packed colour: class id} for RGB masks
    num_classes: int | None
    normalization: tuple | None

    @property
    def rgb(self) -> bool:
        return self.table is not None

    @classmethod
    def check(cls, image_size, crop_size, channels, mask_mode, color_map, num_classes, normalization) -> _Options:
        image_size = check_size(image_size, "image_size")
        crop_size = check_size(crop_size, "crop_size")
        check_mask_mode(mask_mode)
        table = None
        if color_map is not None and mask_mode == "auto":
            mask_mode = "rgb"
        if mask_mode == "rgb":
            if color_map is None:
                raise ValueError("mask_mode='rgb' needs color_map={(r, g, b): class_id, ...}.")
            table = check_color_map(color_map)
        elif color_map is not None:
            raise ValueError(f"color_map is only used with mask_mode='rgb' (or 'auto'), not {mask_mode!r}.")
        check_crop_fits(crop_size, image_size, f"image_size {image_size}")
        return cls(
            image_size=image_size,
            crop_size=crop_size,
            channels=check_channels(channels),
            mask_mode=mask_mode,
            table=table,
            num_classes=check_num_classes(num_classes),
            normalization=resolve_normalization(normalization),
        )


def _joined(parts: Mapping[str, list[Pair]]) -> list[Pair]:
    return [pair for pairs in parts.values() for pair in pairs]


def _find_pairs(root, images, masks, splits, group_by) -> tuple[dict[str, list[Pair]], list[tuple[str, str]]]:
    """({"all" or split: pairs}, problems of unpaired files) from the folders or a recorded split."""
    if splits is not None:
        return recorded_parts(splits), []
    folders = find_folders(root, images, masks)
    if group_by is not None and "all" not in folders:
        raise ValueError(
            f"--group-by only applies to the random split of images/ + masks/, but {root} has per-split "
            "folders (train/, val/, test/) that are used as given; drop --group-by or merge the folders."
        )
    parts, problems = {}, []
    for part, dirs in folders.items():
        parts[part], found = pair_files(*dirs)
        problems += found
    return parts, problems


def _plan_classes(infos: Mapping, pairs: list[Pair], options: _Options) -> tuple[MaskMapping, dict]:
    """(mask mapping, {pair: (path, reason)}) for the masks of `pairs`: class ids out of range, unknown colours."""
    problems = {}
    if options.rgb:
        top = max(options.table.values())
        if options.num_classes is not None and top > max_class_id(options.num_classes):
            raise ValueError(
                f"color_map has class id {top} but num_classes={options.num_classes}; "
                "raise num_classes or fix color_map."
            )
        for pair in pairs:
            unknown = sorted(set(infos[pair].values.tolist()) - set(options.table))
            if unknown:
                colors = [((v >> 16) & 255, (v >> 8) & 255, v & 255) for v in unknown]
                reason = f"has colours not in color_map: {describe(colors, 5)}; add them to color_map"
                problems[pair] = (str(pair[1]), reason)
        return MaskMapping("identity", options.num_classes or classes_from_max_id(top)), problems

    union = set().union(*(infos[pair].values.tolist() for pair in pairs))

    def where(value):
        return describe([pair[1].name for pair in pairs if value in infos[pair].values], 3)

    try:
        mapping = plan_mask_mapping(union, mask_mode=options.mask_mode, num_classes=options.num_classes, where=where)
    except ValueError as error:
        lossy = [pair[1].name for pair in pairs if pair[1].suffix.lower() in (".jpg", ".jpeg")]
        if not lossy:
            raise
        raise ValueError(
            f"{error} Note: JPEG compression changes mask values ({describe(lossy, 3)}); save masks as PNG."
        ) from None
    top = max_class_id(mapping.num_classes)
    for pair in pairs:
        bad = invalid_values(mapping.map_values(infos[pair].values.tolist()), mapping.num_classes)
        if bad:
            hint = " (255 often marks pixels to ignore; give them a class id)" if 255 in bad else ""
            problems[pair] = (
                str(pair[1]),
                f"has class ids {describe(bad, 5)} outside 0..{top} (num_classes={mapping.num_classes}){hint}; "
                "fix the mask or raise num_classes",
            )
    return mapping, problems


def _crop_problems(infos: Mapping, pairs: list[Pair], options: _Options) -> dict:
    """{pair: (path, reason)} for images smaller than `crop_size` (when they are cropped at their own size)."""
    if not options.crop_size or options.image_size:
        return {}
    problems = {}
    for pair in pairs:
        height, width = infos[pair].image.size
        if height < options.crop_size[0] or width < options.crop_size[1]:
            reason = (
                f"is {height}x{width}, smaller than crop_size {options.crop_size}; pass a smaller crop_size "
                "or image_size= to resize before cropping"
            )
            problems[pair] = (str(pair[0]), reason)
    return problems


def _drop_invalid(parts, file_problems, problems, skip_invalid) -> tuple[dict, list[tuple[str, str]]]:
    """(parts without the bad pairs, skipped (path, reason)); raises listing every problem unless `skip_invalid`."""
    listed = list(file_problems) + [problems[pair] for pair in _joined(parts) if pair in problems]
    if listed and not skip_invalid:
        lines = [f"{path}: {reason}" for path, reason in listed]
        raise ValueError(
            f"{len(listed)} invalid image/mask pair(s):\n{describe_lines(lines, LISTED_PROBLEMS)}\n"
            "Fix or remove them, or pass skip_invalid=True to drop them (they are then listed in "
            "data.files['skipped'])."
        )
    kept = {part: [pair for pair in pairs if pair not in problems] for part, pairs in parts.items()}
    if not _joined(kept):
        lines = [f"{path}: {reason}" for path, reason in listed]
        raise ValueError(
            f"no valid image/mask pairs left after skipping {len(listed)} file(s):\n{describe_lines(lines, 5)}"
        )
    return kept, listed


def _size_and_channels(infos: Mapping, pairs: list[Pair], options: _Options) -> tuple[tuple[int, int], int]:
    """(final (height, width), channels): sizes must agree unless resized or cropped; channels inferred."""
    sizes = {}
    for pair in pairs:
        sizes.setdefault(infos[pair].image.size, []).append(pair[0].name)
    if options.image_size is None and options.crop_size is None and len(sizes) > 1:
        listed = [f"{h}x{w} ({describe(names, 2)})" for (h, w), names in sizes.items()]
        raise ValueError(
            f"images have different sizes (height x width): {describe(listed, 5)}; pass "
            "image_size=(height, width) to resize them or crop_size=(height, width) to crop them."
        )
    channels = options.channels
    if channels is None:
        channels = max(image_channels(infos[pair].image.mode) for pair in pairs)
    check_normalization_channels(options.normalization, channels)
    return options.crop_size or options.image_size or next(iter(sizes)), channels


def _assign_splits(parts: dict, split, seed: int, keys: dict | None) -> dict[str, list[Pair]]:
    """{split: pairs}: the per-split folders as given, or a seeded (grouped) random split of all pairs."""
    if "all" not in parts:
        return {name: parts.get(name, []) for name in SPLITS}
    pairs = parts["all"]
    groups = None if keys is None else [keys[pair] for pair in pairs]
    index = split_indices(len(pairs), split, seed, groups=groups)
    return {name: [pairs[i] for i in index[name]] for name in SPLITS}


def _sample_datasets(parts, infos, channels: int, mapping: MaskMapping, options: _Options) -> dict:
    """{split: dataset of (image, mask)}, decoded with tf.io where it reads every file exactly, else PIL."""
    pairs = _joined(parts)
    use_tf, via_rgb = image_decoder([infos[pair].image.decoding for pair in pairs], channels)
    reader = mask_reader([infos[pair].mask.decoding for pair in pairs], options.rgb)

    def load(image_path, mask_path):
        image = decode_image_file(image_path, channels, use_tf=use_tf, via_rgb=via_rgb)
        raw = decode_mask_file(mask_path, reader=reader)
        mask = rgb_to_classes(raw, options.table) if options.rgb else apply_mask_mapping(raw, mapping)
        return preprocess_pair(image, mask, image_size=options.image_size, normalization=options.normalization)

    samples = {}
    for name in SPLITS:
        image_paths = tf.constant([str(pair[0]) for pair in parts[name]], dtype=tf.string)
        mask_paths = tf.constant([str(pair[1]) for pair in parts[name]], dtype=tf.string)
        samples[name] = tf.data.Dataset.from_tensor_slices((image_paths, mask_paths)).map(
            load, num_parallel_calls=AUTOTUNE
        )
    return samples


def _files_record(parts, skipped, keys) -> dict:
    """`SegmentationData.files`: (image, mask) paths per split, "skipped" and, with groups, "groups"."""
    files = {name: [(str(image), str(mask)) for image, mask in parts[name]] for name in SPLITS}
    files["skipped"] = [(str(path), reason) for path, reason in skipped]
    if keys is not None:
        files["groups"] = {name: [keys[pair] for pair in parts[name]] for name in SPLITS}
    return files
