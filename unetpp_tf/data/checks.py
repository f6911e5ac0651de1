"""Argument checks shared by every data source, and the list formatting of their error messages.

Each check returns the argument in its canonical form or raises a ValueError that names the
argument and says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_size(value, name: str) -> tuple[int, int] | None:
    """Validate an optional (height, width) pair of positive integers.

    Args:
        value: tuple, int or None. The size; an int means a square.
        name: str. Argument name for the error message.

    Returns:
        tuple or None: (height, width) as ints, or None.

    Example:
        >>> check_size(64, "crop_size")
        (64, 64)
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        height, width = (int(v) for v in value)
        ok = all(int(v) == v and v > 0 for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be (height, width) positive integers or None, got {value!r}.")
    return height, width


def check_crop_fits(crop_size: tuple[int, int] | None, size: tuple[int, int] | None, what: str) -> None:
    """Raise when a crop is larger than the (resized) images it is cut from.

    Args:
        crop_size: tuple or None. (height, width) of the crop.
        size: tuple or None. (height, width) of the images; None when sizes vary (nothing checked).
        what: str. What `size` is, for the message, e.g. "image_size (64, 64)".

    Example:
        >>> check_crop_fits((32, 32), (64, 64), "image_size (64, 64)")
    """
    if crop_size and size and (crop_size[0] > size[0] or crop_size[1] > size[1]):
        raise ValueError(f"crop_size {crop_size} is larger than {what}; pass a smaller crop.")


def check_channels(channels) -> int | None:
    """Validate the `channels` argument of a file source: 1, 3 or None (infer).

    Example:
        >>> check_channels(3)
        3
    """
    if channels not in (None, 1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1, 3 or None (infer), got {channels!r}.")
    return channels


def check_max_pixels(max_pixels) -> int | None:
    """Validate the `max_pixels` argument: a positive integer, or None for no limit of the library's own.

    Example:
        >>> check_max_pixels(2**20)
        1048576
    """
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}.")
    return int(max_pixels)


def resolve_normalization(normalization) -> tuple[np.ndarray, np.ndarray] | None:
    """Turn the `normalization` argument into (mean, std) arrays, or None for unit scaling only.

    Args:
        normalization: str or tuple. "unit" scales to [0, 1] only; `(mean, std)` (floats or
            per-channel tuples, in [0, 1] units) is applied after unit scaling.

    Returns:
        tuple or None: (mean, std) float32 arrays broadcastable to [H, W, C], or None.

    Example:
        >>> resolve_normalization(((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))[1].shape
        (3,)
    """
    if isinstance(normalization, str):
        if normalization == "unit":
            return None
        raise ValueError(
            f"normalization must be 'unit' or a (mean, std) pair, got {normalization!r}."
        )
    try:
        mean, std = normalization
        mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        std = np.asarray(std, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(
            f"normalization must be 'unit' or a (mean, std) pair of floats or per-channel tuples, "
            f"got {normalization!r}."
        ) from None
    if mean.size == 0 or std.size == 0 or np.any(std <= 0) or not np.all(np.isfinite(mean)):
        raise ValueError(
            f"normalization (mean, std) needs finite means and positive stds, got {normalization!r}."
        )
    return mean, std


def check_normalization_channels(normalization: tuple | None, channels: int) -> None:
    """Raise when per-channel mean/std do not match the image channels.

    Example:
        >>> check_normalization_channels(resolve_normalization((0.5, 0.2)), 3)
    """
    if normalization is None:
        return
    for label, values in zip(("mean", "std"), normalization):
        if values.size not in (1, channels):
            raise ValueError(
                f"normalization {label} has {values.size} values but the images have {channels} "
                f"channel(s); give one value or {channels}."
            )


def describe(items: Sequence, limit: int = 10) -> str:
    """Join items for an error message, eliding after `limit`: "a, b ... and 3 more".

    Example:
        >>> describe(["a", "b", "c"], limit=2)
        'a, b ... and 1 more'
    """
    items = [str(item) for item in items]
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f" ... and {len(items) - limit} more"
    return text


def describe_lines(lines: Sequence[str], limit: int = 10) -> str:
    """Indented lines for a multi-line error message, eliding after `limit`.

    Example:
        >>> describe_lines(["a.png: empty", "b.png: truncated"], limit=1)
        '  a.png: empty\\n  ... and 1 more'
    """
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)
