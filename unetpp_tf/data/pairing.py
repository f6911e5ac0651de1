"""Finding the image/mask files of a folder dataset: folder layouts, pairing by stem, recorded splits, groups.

Nothing here opens a file: the pairs found go to `unetpp_tf.data.inspection` next.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from unetpp_tf.data.checks import describe
from unetpp_tf.data.pipeline import SPLITS
from unetpp_tf.data.readers import IMAGE_EXTENSIONS

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
"""Folder names of the per-split layout, in the order they are looked for."""

Pair = tuple[Path, Path]


def find_folders(root, images, masks) -> dict[str, tuple[Path, Path]]:
    """The (images, masks) folders: {"all": ...} to split randomly, or {split: ...} for the per-split layout.

    Args:
        root: str, Path or None. Dataset folder.
        images: str, Path or None. Image folder (relative to `root` when given), "images" by default.
        masks: str, Path or None. Mask folder (relative to `root` when given), "masks" by default.

    Returns:
        dict: {"all": (images, masks)} or {"train"|"val"|"test": (images, masks)}.

    Example:
        >>> find_folders("data/nuclei", None, None)
        {'all': (PosixPath('data/nuclei/images'), PosixPath('data/nuclei/masks'))}
    """
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


def list_images(folder: Path) -> dict[str, list[Path]]:
    """{stem: [paths]} of the image files directly in `folder` (hidden files ignored).

    Example:
        >>> list_images(Path("data/images"))
        {'a': [PosixPath('data/images/a.png')]}
    """
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        visible = not path.name.startswith(".")
        if visible and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(path.stem, []).append(path)
    return found


def pair_files(img_dir: Path, mask_dir: Path) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Pair the images and masks of two folders by file stem (`a.jpg` with `a.png`).

    Args:
        img_dir: Path. Image folder.
        mask_dir: Path. Mask folder.

    Returns:
        tuple: (sorted (image, mask) pairs, problems as (path, reason)): an image without a
        mask, a mask without an image, several files sharing a stem.

    Example:
        >>> pairs, problems = pair_files(Path("data/images"), Path("data/masks"))
    """
    images, masks = list_images(img_dir), list_images(mask_dir)
    if not images:
        raise FileNotFoundError(f"no images found in {img_dir}; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}.")
    problems = []
    for stem in sorted(set(images) - set(masks)):
        reason = "image has no mask with the same stem (a.jpg pairs with a.png); add or rename its mask"
        problems += [(str(path), reason) for path in images[stem]]
    for stem in sorted(set(masks) - set(images)):
        reason = "mask has no image with the same stem (a.png pairs with a.jpg); add or rename its image"
        problems += [(str(path), reason) for path in masks[stem]]
    pairs = []
    for stem in sorted(set(images) & set(masks)):
        files = images[stem] + masks[stem]
        if len(files) > 2:
            names = describe([path.name for path in files])
            problems.append((str(files[0]), f"several files share the stem {stem!r}: {names}; keep one per folder"))
            continue
        pairs.append((images[stem][0], masks[stem][0]))
    return pairs, problems


def recorded_parts(splits: Mapping, *, folders: bool = False) -> dict[str, list[Pair]]:
    """{split: [(image, mask)]} from recorded file lists; files that no longer exist raise one error.

    An image listed in two splits (with any mask) is refused: the splits would overlap.

    Args:
        splits: dict. {"train"|"val"|"test": [(image, mask), ...]}, e.g. a run's splits.json;
            other keys are ignored.
        folders: bool. Entries may be folders (scans stored as DICOM series). Defaults to False.

    Example:
        >>> recorded_parts({"train": [("i/a.png", "m/a.png")]})["train"]
        [(PosixPath('i/a.png'), PosixPath('m/a.png'))]
    """
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
            if pair[0] in seen:
                raise ValueError(
                    f"{pair[0]} is listed in both the {seen[pair[0]]} and the {name} split; keep it in one."
                )
            seen[pair[0]] = name
            parts[name].append(pair)
    if not seen:
        raise ValueError("splits lists no (image, mask) pairs; pass a recorded split with files in it.")
    present = Path.exists if folders else Path.is_file
    missing = [str(path) for name in SPLITS for pair in parts[name] for path in pair if not present(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) of the recorded split no longer exist: {describe(missing)}; the run's "
            "recorded split refers to them: restore them, or evaluate with --data/--split on the folder as it is now."
        )
    return parts


def group_keys(pairs: list[Pair], group_by: str | None) -> dict | None:
    """{pair: group key} from the regex searched in each image stem; None without `group_by`.

    The key is the first capture group, or the whole match when the regex has none.

    Example:
        >>> group_keys([(Path("slide3_tile1.png"), Path("m/slide3_tile1.png"))], r"^(slide[0-9]+)_")
        {(PosixPath('slide3_tile1.png'), PosixPath('m/slide3_tile1.png')): 'slide3'}
    """
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
            f"{describe(unmatched, 3)}); it is searched in each name without its extension: write a "
            "regex that finds the group in every name, e.g. '^(.+?)_' for slide1_tile3.png."
        )
    if unmatched:
        raise ValueError(
            f"--group-by '{group_by}' does not match {len(unmatched)} of the {len(pairs)} image names: "
            f"{describe(unmatched)}; change the regex so that it matches every name (searched without "
            "the extension), or move those files out of the folder."
        )
    return keys
