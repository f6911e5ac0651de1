"""Image/mask pairs from folders on disk: `from_directory`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from unetpp_tf.data import decode
from unetpp_tf.data.pipeline import SPLITS, SegmentationData, split_indices

AUTOTUNE = tf.data.AUTOTUNE

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}

# Files tf.io decodes (exactly as PIL does); everything else is decoded with PIL.
_TF_IMAGE = {
    ".png": ("1", "L", "LA", "P", "RGB", "RGBA"),
    ".jpg": ("L", "RGB"),
    ".jpeg": ("L", "RGB"),
    ".bmp": ("L", "P", "RGB", "RGBA"),
}
_TF_MASK_8 = ("1", "L", "LA")
_TF_MASK_RGB = {".png": ("P", "RGB", "RGBA"), ".bmp": ("RGB", "RGBA")}


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
    batch_size: int = 8,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    shuffle: bool = True,
    cache: bool | str = True,
    augment: Callable | None = None,
    skip_invalid: bool = False,
    group_by: str | None = None,
    splits: Mapping | None = None,
) -> SegmentationData:
    """Load image/mask pairs from folders, validate every file, and split them into train/val/test.

    Layouts: `root/images/` + `root/masks/` (split randomly with `split` and `seed`); per-split
    folders `root/train/{images,masks}`, `root/val/...` (or `valid`, `validation`) and
    `root/test/...`, used as given (detected when `root/train` exists; a missing val or test
    folder gives an empty split); or two explicit folders `images=` and `masks=`. Images and
    masks pair by file stem (`a.jpg` with `a.png`). Images: PNG, JPEG, BMP, TIFF, gray or
    RGB (alpha dropped); 8-bit ones in PNG/JPEG/BMP decode with `tf.io`, the rest (TIFF,
    16-bit) with PIL. Masks: binary 0/255 or 0/1, class ids 0..K-1 (8- or 16-bit), palette
    PNGs (the palette indices are the class ids) or RGB colours with `color_map`.

    Every file is opened once with PIL before anything is returned: a missing folder, no
    images, unpaired files, unreadable files, image/mask size mismatches, mask values outside
    the classes, unknown colours and an empty split raise an error that names the files and
    says what to do. With `skip_invalid=True` the bad pairs are dropped and listed in
    `data.files["skipped"]` as (path, reason); nothing is skipped silently otherwise.

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

    Returns:
        SegmentationData: batched splits; `files` holds the (image, mask) paths per split,
        "skipped", and with `group_by` "groups": {split: [group key per pair]}.

    Example:
        >>> data = from_directory("data/nuclei", image_size=(96, 96), batch_size=16)
        >>> images, masks = next(iter(data.train))
        >>> data = from_directory("data/slides", group_by=r"^(slide[0-9]+)_")
        >>> again = from_directory(splits=data.files)  # the same files in the same splits
    """
    image_size = decode.check_size(image_size, "image_size")
    crop_size = decode.check_size(crop_size, "crop_size")
    num_classes = decode.check_num_classes(num_classes)
    norm = decode.resolve_normalization(normalization)
    decode.check_mask_mode(mask_mode)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (infer), got {channels!r}.")
    table = None
    if color_map is not None and mask_mode == "auto":
        mask_mode = "rgb"
    if mask_mode == "rgb":
        if color_map is None:
            raise ValueError("mask_mode='rgb' needs color_map={(r, g, b): class_id, ...}.")
        table = decode.check_color_map(color_map)
    elif color_map is not None:
        raise ValueError(f"color_map is only used with mask_mode='rgb' (or 'auto'), not {mask_mode!r}.")
    if crop_size and image_size and (crop_size[0] > image_size[0] or crop_size[1] > image_size[1]):
        raise ValueError(
            f"crop_size {crop_size} is larger than image_size {image_size}; pass a smaller crop."
        )

    skipped: list[tuple[str, str]] = []
    if splits is not None:
        parts = _recorded_parts(splits)
    else:
        folders = _find_folders(root, images, masks)
        if group_by is not None and "all" not in folders:
            raise ValueError(
                f"--group-by only applies to the random split of images/ + masks/, but {root} has per-split "
                "folders (train/, val/, test/) that are used as given; drop --group-by or merge the folders."
            )
        parts = {part: _pair_files(*dirs, skip_invalid, skipped) for part, dirs in folders.items()}
    keys = _group_keys([pair for pairs in parts.values() for pair in pairs], group_by)

    # Read every file once (threads: PIL releases the GIL while decoding).
    all_pairs = [pair for pairs in parts.values() for pair in pairs]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        infos = dict(zip(all_pairs, pool.map(lambda p: _inspect(p, mask_mode == "rgb"), all_pairs)))
    problems = {pair: (info["path"], info["problem"]) for pair, info in infos.items() if info["problem"]}

    # Mask values -> class ids, then values outside the classes / unknown colours.
    readable = [pair for pair in all_pairs if pair not in problems]
    if mask_mode == "rgb":
        top = max(table.values())
        if num_classes is not None and top > decode.max_class_id(num_classes):
            raise ValueError(
                f"color_map has class id {top} but num_classes={num_classes}; "
                "raise num_classes or fix color_map."
            )
        mapping = decode.MaskMapping("identity", num_classes or decode.classes_from_max_id(top))
        for pair in readable:
            unknown = sorted(set(infos[pair]["values"].tolist()) - set(table))
            if unknown:
                colors = [tuple(int(c) for c in ((v >> 16) & 255, (v >> 8) & 255, v & 255)) for v in unknown]
                problems[pair] = (
                    str(pair[1]),
                    f"has colours not in color_map: {decode.describe(colors, 5)}; add them to color_map",
                )
    else:
        union = set()
        for pair in readable:
            union.update(infos[pair]["values"].tolist())

        def where(value):
            return decode.describe([pair[1].name for pair in readable if value in infos[pair]["values"]], 3)

        try:
            mapping = decode.plan_mask_mapping(
                union, mask_mode=mask_mode, num_classes=num_classes, where=where
            )
        except ValueError as error:
            lossy = [pair[1].name for pair in readable if infos[pair]["mask_suffix"] in (".jpg", ".jpeg")]
            if not lossy:
                raise
            raise ValueError(
                f"{error} Note: JPEG compression changes mask values ({decode.describe(lossy, 3)}); "
                "save masks as PNG."
            ) from None
        for pair in readable:
            mapped = mapping.map_values(infos[pair]["values"].tolist())
            bad = decode.invalid_values(mapped, mapping.num_classes)
            if bad:
                top = decode.max_class_id(mapping.num_classes)
                problems[pair] = (
                    str(pair[1]),
                    f"has class ids {decode.describe(bad, 5)} outside 0..{top} "
                    f"(num_classes={mapping.num_classes}); fix the mask or raise num_classes",
                )
    if crop_size and not image_size:
        for pair in readable:
            height, width = infos[pair]["size"]
            if pair not in problems and (height < crop_size[0] or width < crop_size[1]):
                problems[pair] = (str(pair[0]), f"is {height}x{width}, smaller than crop_size {crop_size}")

    if problems:
        listed = [f"{problems[pair][0]}: {problems[pair][1]}" for pair in all_pairs if pair in problems]
        if not skip_invalid:
            raise ValueError(
                f"{len(problems)} invalid image/mask pair(s):\n  "
                + "\n  ".join(listed[:10])
                + (f"\n  ... and {len(listed) - 10} more" if len(listed) > 10 else "")
                + "\nFix or remove them, or pass skip_invalid=True to drop them."
            )
        skipped.extend(problems[pair] for pair in all_pairs if pair in problems)
        parts = {part: [pair for pair in pairs if pair not in problems] for part, pairs in parts.items()}
        all_pairs = [pair for pairs in parts.values() for pair in pairs]
        if mask_mode != "rgb" and num_classes is None and all_pairs:  # infer from the kept masks only
            union = set().union(*(infos[pair]["values"].tolist() for pair in all_pairs))
            mapping = decode.plan_mask_mapping(union, mask_mode=mask_mode, where=where)
    if not all_pairs:
        reasons = [f"{path}: {reason}" for path, reason in skipped]
        raise ValueError(
            f"no valid image/mask pairs left after skipping {len(skipped)} file(s):\n  "
            + "\n  ".join(reasons[:5])
            + (f"\n  ... and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        )

    # Sizes and channels.
    sizes = {}
    for pair in all_pairs:
        sizes.setdefault(infos[pair]["size"], []).append(pair[0].name)
    if image_size is None and crop_size is None and len(sizes) > 1:
        listed = [f"{h}x{w} ({decode.describe(names, 2)})" for (h, w), names in sizes.items()]
        raise ValueError(
            f"images have different sizes (height x width): {decode.describe(listed, 5)}; pass "
            "image_size=(height, width) to resize them or crop_size=(height, width) to crop them."
        )
    if channels is None:
        channels = 3 if any(infos[pair]["channels"] == 3 for pair in all_pairs) else 1
    decode.check_normalization_channels(norm, channels)

    # Split.
    if "all" in parts:
        pairs = parts["all"]
        groups = None if keys is None else [keys[pair] for pair in pairs]
        index = split_indices(len(pairs), split, seed, groups=groups)
        parts = {name: [pairs[i] for i in index[name]] for name in SPLITS}
    else:
        parts = {name: parts.get(name, []) for name in SPLITS}

    # Decoders: tf.io where it reads the files exactly, PIL otherwise.
    image_tf = all(
        infos[pair]["image_mode"] in _TF_IMAGE.get(infos[pair]["image_suffix"], ()) for pair in all_pairs
    )
    via_rgb = channels == 1 and any(
        infos[pair]["channels"] == 3 or infos[pair]["image_suffix"] == ".bmp" for pair in all_pairs
    )
    reader = _mask_reader([infos[pair] for pair in all_pairs], mask_mode == "rgb")

    def load(image_path, mask_path):
        image = decode.decode_image_file(image_path, channels, use_tf=image_tf, via_rgb=via_rgb)
        raw = decode.decode_mask_file(mask_path, reader=reader)
        if mask_mode == "rgb":
            mask = decode.rgb_to_classes(raw, table)
        else:
            mask = decode.apply_mask_mapping(raw, mapping)
        return decode.preprocess_pair(image, mask, image_size=image_size, normalization=norm)

    samples = {}
    for name in SPLITS:
        image_paths = tf.constant([str(pair[0]) for pair in parts[name]], dtype=tf.string)
        mask_paths = tf.constant([str(pair[1]) for pair in parts[name]], dtype=tf.string)
        ds = tf.data.Dataset.from_tensor_slices((image_paths, mask_paths))
        samples[name] = ds.map(load, num_parallel_calls=AUTOTUNE)
    batched = decode.batch_splits(
        samples,
        crop_size=crop_size,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        cache=cache,
        augment=augment,
    )
    if crop_size is not None:
        final_size = crop_size
    elif image_size is not None:
        final_size = image_size
    else:
        final_size = next(iter(sizes))
    files = {name: [(str(i), str(m)) for i, m in parts[name]] for name in SPLITS}
    files["skipped"] = [(str(path), reason) for path, reason in skipped]
    if keys is not None:
        files["groups"] = {name: [keys[pair] for pair in parts[name]] for name in SPLITS}
    return SegmentationData(
        **batched,
        num_classes=mapping.num_classes,
        channels=channels,
        image_size=tuple(final_size),
        counts={name: len(parts[name]) for name in SPLITS},
        source=f"folder:{root if root is not None else images or 'recorded splits'}",
        files=files,
    )


def _find_folders(root, images, masks) -> dict[str, tuple[Path, Path]]:
    """{"all": (images, masks)} or {split: (images, masks)} for the per-split layout."""
    if root is None:
        if images is None or masks is None:
            raise ValueError("pass root=<dataset folder> or both images=<folder> and masks=<folder>.")
        folders = {"all": (Path(images), Path(masks))}
    else:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist; check the path.")
        images_name = images if images is not None else "images"
        masks_name = masks if masks is not None else "masks"
        if (root / "train").is_dir():
            folders = {}
            for split, names in SPLIT_FOLDERS.items():
                for name in names:
                    if (root / name).is_dir():
                        folders[split] = (root / name / images_name, root / name / masks_name)
                        break
        else:
            folders = {"all": (root / images_name, root / masks_name)}
    for img_dir, mask_dir in folders.values():
        for folder, what in ((img_dir, "image"), (mask_dir, "mask")):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{what} folder {folder} does not exist; expected root/images + root/masks, "
                    "root/train/{images,masks} (+ val, test), or pass images= and masks= explicitly."
                )
    return folders


def _recorded_parts(splits: Mapping) -> dict[str, list[tuple[Path, Path]]]:
    """{split: [(image, mask)]} from recorded file lists; files that no longer exist raise one error."""
    if not isinstance(splits, Mapping) or not any(name in splits for name in SPLITS):
        raise ValueError(
            f"splits must be a dict {{'train'|'val'|'test': [(image, mask), ...]}} such as a run's "
            f"splits.json or data.files, got {type(splits).__name__}."
        )
    parts, seen = {}, {}
    for name in SPLITS:
        parts[name] = []
        for entry in splits.get(name) or ():
            if isinstance(entry, (str, bytes)) or not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"splits[{name!r}] holds {entry!r}; each entry must be an (image, mask) path pair.")
            pair = (Path(entry[0]), Path(entry[1]))
            if pair in seen:
                raise ValueError(f"{pair[0]} is listed in both the {seen[pair]} and the {name} split; keep it in one.")
            seen[pair] = name
            parts[name].append(pair)
    if not seen:
        raise ValueError("splits lists no (image, mask) pairs; pass a recorded split with files in it.")
    missing = [str(path) for pair in seen for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) of the recorded split no longer exist: {decode.describe(missing)}; the run's "
            "recorded split refers to them: restore them, or evaluate with --data/--split on the folder as it is now."
        )
    return parts


def _group_keys(pairs: list[tuple[Path, Path]], group_by: str | None) -> dict | None:
    """{pair: group key} from the regex searched in each image stem; None without `group_by`."""
    if group_by is None:
        return None
    try:
        pattern = re.compile(group_by)
    except (re.error, TypeError) as error:
        raise ValueError(
            f"--group-by '{group_by}' is not a valid regular expression ({error}); fix it, e.g. '^(.+?)_' "
            "takes the name up to the first underscore as the group."
        ) from None
    keys, unmatched = {}, []
    for pair in pairs:
        match = pattern.search(pair[0].stem)
        key = None if match is None else match.group(1 if pattern.groups else 0)
        if key is None:
            unmatched.append(pair[0].name)
        else:
            keys[pair] = key
    if unmatched and not keys:
        raise ValueError(
            f"--group-by '{group_by}' matches none of the {len(pairs)} image names (e.g. "
            f"{decode.describe(unmatched, 3)}); it is searched in each name without its extension: write a "
            "regex that finds the group in every name, e.g. '^(.+?)_' for slide1_tile3.png."
        )
    if unmatched:
        raise ValueError(
            f"--group-by '{group_by}' does not match {len(unmatched)} of the {len(pairs)} image names: "
            f"{decode.describe(unmatched)}; change the regex so that it matches every name (searched without "
            "the extension), or move those files out of the folder."
        )
    return keys


def _list_images(folder: Path) -> dict[str, list[Path]]:
    """{stem: [paths]} of the image files directly in `folder` (hidden files ignored)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        visible = not path.name.startswith(".")
        if visible and path.is_file() and path.suffix.lower() in decode.IMAGE_EXTENSIONS:
            found.setdefault(path.stem, []).append(path)
    return found


def _pair_files(img_dir: Path, mask_dir: Path, skip_invalid: bool, skipped: list) -> list[tuple[Path, Path]]:
    """Sorted (image, mask) pairs matched by stem; unpaired or ambiguous files raise or are skipped."""
    images, masks = _list_images(img_dir), _list_images(mask_dir)
    if not images:
        raise FileNotFoundError(
            f"no images found in {img_dir}; accepted extensions: {', '.join(decode.IMAGE_EXTENSIONS)}."
        )
    problems = []
    lonely_images = [str(p) for stem in sorted(set(images) - set(masks)) for p in images[stem]]
    lonely_masks = [str(p) for stem in sorted(set(masks) - set(images)) for p in masks[stem]]
    if (lonely_images or lonely_masks) and not skip_invalid:
        lines = []
        if lonely_images:
            listed = decode.describe(lonely_images)
            lines.append(f"{len(lonely_images)} image(s) without a mask in {mask_dir}: {listed}")
        if lonely_masks:
            listed = decode.describe(lonely_masks)
            lines.append(f"{len(lonely_masks)} mask(s) without an image in {img_dir}: {listed}")
        raise ValueError(
            "; ".join(lines) + ". Images and masks pair by file stem (a.jpg with a.png): add or rename the "
            "missing files, remove the extra ones, or pass skip_invalid=True to drop them."
        )
    problems += [(path, "image has no mask with the same stem") for path in lonely_images]
    problems += [(path, "mask has no image with the same stem") for path in lonely_masks]
    pairs = []
    for stem in sorted(set(images) & set(masks)):
        duplicates = images[stem] + masks[stem]
        if len(duplicates) > 2:
            names = decode.describe([p.name for p in duplicates])
            reason = f"several files share the stem {stem!r}: {names}; keep one per folder"
            if not skip_invalid:
                raise ValueError(f"{duplicates[0]}: {reason}.")
            problems.append((str(duplicates[0]), reason))
            continue
        pairs.append((images[stem][0], masks[stem][0]))
    skipped.extend(problems)
    return pairs


def _inspect(pair: tuple[Path, Path], rgb: bool) -> dict:
    """Open an image/mask pair with PIL: sizes, modes, mask values, or the problem found."""
    from PIL import Image

    image_path, mask_path = pair
    info = {
        "problem": None,
        "path": None,
        "image_suffix": image_path.suffix.lower(),
        "mask_suffix": mask_path.suffix.lower(),
    }
    try:
        with Image.open(image_path) as image:
            image.load()
            info["image_mode"] = image.mode
            info["size"] = (image.height, image.width)
            info["channels"] = 1 if image.mode in decode.GRAY_MODES else 3
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        problem = f"cannot read the image ({error}); replace or remove it"
        return dict(info, path=str(image_path), problem=problem)
    if image.mode not in decode.GRAY_MODES and image.mode not in decode.COLOR_MODES:
        problem = f"unsupported image mode {image.mode!r}; save it as gray or RGB"
        return dict(info, path=str(image_path), problem=problem)
    try:
        with Image.open(mask_path) as mask:
            mask.load()
            info["mask_mode"] = mask.mode
            mask_size = (mask.height, mask.width)
            array = decode.pil_mask_array(mask, rgb=rgb)
    except ValueError as error:
        return dict(info, path=str(mask_path), problem=f"mask {error}")
    except Exception as error:  # noqa: BLE001
        problem = f"cannot read the mask ({error}); replace or remove it"
        return dict(info, path=str(mask_path), problem=problem)
    if mask_size != info["size"]:
        return dict(
            info,
            path=str(mask_path),
            problem=(
                f"mask is {mask_size[0]}x{mask_size[1]} but image {image_path.name} is "
                f"{info['size'][0]}x{info['size'][1]} (height x width); they must match pixel for pixel"
            ),
        )
    info["values"] = np.unique(decode.color_code(array)) if rgb else decode.mask_values(array)
    return info


def _mask_reader(infos: list[dict], rgb: bool) -> str:
    """The one mask decoder for the whole dataset: tf.io when it reads every mask exactly, else PIL."""
    if rgb:
        fast = all(info["mask_mode"] in _TF_MASK_RGB.get(info["mask_suffix"], ()) for info in infos)
        return "tf_rgb" if fast else "pil_rgb"
    if all(info["mask_suffix"] == ".png" and info["mask_mode"] in _TF_MASK_8 for info in infos):
        return "tf8"
    if all(info["mask_suffix"] == ".png" and info["mask_mode"] in decode.SIXTEEN_BIT_MODES for info in infos):
        return "tf16"
    return "pil"
