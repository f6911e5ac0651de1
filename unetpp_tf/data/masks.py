"""Mask values -> class ids: mapping rules, class-count inference, range checks, colour tables.

Raw mask values (0/255 binary, class ids, palette indices, RGB colours, trimaps) become int32
class ids 0..num_classes-1 here, the same way for every source. `num_classes=1` means binary
masks with ids {0, 1}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from unetpp_tf.data.checks import describe

MASK_MODES = ("auto", "binary", "index", "rgb")
"""Values of `mask_mode`: how raw mask values become class ids."""


def check_mask_mode(mask_mode: str, allowed: Sequence[str] = MASK_MODES) -> str:
    """Validate `mask_mode` against the modes a source supports."""
    if mask_mode not in allowed:
        raise ValueError(f"mask_mode must be one of {tuple(allowed)}, got {mask_mode!r}.")
    return mask_mode


def check_num_classes(num_classes) -> int | None:
    """Validate an optional `num_classes` argument (a positive integer)."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}.")
    return int(num_classes)


def max_class_id(num_classes: int) -> int:
    """Largest valid class id: num_classes=1 means binary masks {0, 1}."""
    return max(int(num_classes), 2) - 1


def classes_from_max_id(max_id: int) -> int:
    """`num_classes` for masks whose largest id is `max_id`: 1 (binary) when ids are {0, 1}."""
    return 1 if max_id <= 1 else int(max_id) + 1


@dataclasses.dataclass(frozen=True)
class MaskMapping:
    """How raw mask values become class ids.

    Attributes:
        kind: str. "identity" keeps values as class ids, "255to1" maps 255 to 1 (0/255 binary
            masks) and keeps the rest, "nonzero" maps every non-zero value to 1.
        num_classes: int. 1 for binary masks, K for ids 0..K-1.
    """

    kind: str
    num_classes: int

    def map_values(self, values: Iterable[int]) -> set[int]:
        """Apply the mapping to a set of raw values."""
        values = {int(v) for v in values}
        if self.kind == "nonzero":
            return {int(v != 0) for v in values}
        if self.kind == "255to1":
            return {1 if v == 255 else v for v in values}
        return values


def plan_mask_mapping(
    raw_values: Iterable[int],
    *,
    mask_mode: str = "auto",
    num_classes: int | None = None,
    where: Callable[[int], str] | None = None,
) -> MaskMapping:
    """Decide how raw mask values map to class ids and how many classes there are.

    Rules: `mask_mode="binary"` maps every non-zero value to 1; `"index"` keeps the values.
    `"auto"` maps 255 to 1 when the values are {0, 255} or a subset of it, or when
    `num_classes` is 1 or 2 (binary masks saved as 0/1 and 0/255 alike); otherwise it keeps the
    values, so with `num_classes` of 3 or more a 255 (often a "void" label) is a value outside
    the classes that `invalid_values` reports. When 255 appears next to other non-zero values
    and `num_classes` is not given, the masks are ambiguous (0/255 binary mixed with class ids)
    and a ValueError says what to pass. The
    number of classes is `num_classes` when given, else 1 for ids {0, 1} and max id + 1 above.
    Values outside the class range are not checked here (see `invalid_values`).

    Args:
        raw_values: iterable of int. Every raw value found in the masks.
        mask_mode: str. "auto", "binary" or "index". Defaults to "auto".
        num_classes: int or None. Expected number of classes; None infers it. Defaults to None.
        where: callable or None. `where(value)` names the files or samples holding a raw
            value, for error messages. Defaults to None.

    Returns:
        MaskMapping: the mapping and the number of classes.

    Example:
        >>> plan_mask_mapping({0, 255}).num_classes
        1
    """
    values = {int(v) for v in raw_values}
    if mask_mode == "binary":
        kind = "nonzero"
    elif mask_mode == "auto" and 255 in values:
        others = sorted(values - {0, 255})
        if not others or (num_classes is not None and num_classes <= 2):
            kind = "255to1"
        elif num_classes is None:
            found = ""
            if where is not None:
                found = f" (255 in {where(255)}; {others[0]} in {where(others[0])})"
            raise ValueError(
                f"masks mix the value 255 with other class ids {describe(others)}{found}: 0/255 masks "
                "are read as binary, class-id masks as they are, and both at once is ambiguous. Pass "
                "num_classes=1 (255 and 1 both mean foreground), num_classes=K for K-class masks "
                "(then 255 must be fixed), or mask_mode='binary' (every non-zero value is foreground)."
            )
        else:
            kind = "identity"
    else:
        kind = "identity"
    mapping = MaskMapping(kind=kind, num_classes=1)
    if num_classes is None:
        num_classes = classes_from_max_id(max(mapping.map_values(values), default=0))
    return MaskMapping(kind=kind, num_classes=int(num_classes))


def invalid_values(values: Iterable[int], num_classes: int) -> list[int]:
    """Class ids outside 0..num_classes-1 (0..1 for num_classes=1), sorted."""
    top = max_class_id(num_classes)
    return sorted(int(v) for v in values if v < 0 or v > top)


def apply_mask_mapping(mask: tf.Tensor, mapping: MaskMapping) -> tf.Tensor:
    """Raw mask tensor -> int32 class ids, following `mapping`."""
    mask = tf.cast(mask, tf.int32)
    if mapping.kind == "nonzero":
        return tf.cast(mask != 0, tf.int32)
    if mapping.kind == "255to1":
        return tf.where(mask == 255, tf.ones_like(mask), mask)
    return mask


def lookup_values(values: tf.Tensor, table: Mapping[int, int], what: str = "mask value") -> tf.Tensor:
    """Map integer tensor values through `table` ({raw: class_id}), failing on unknown values.

    Used for trimaps ({1: 1, 2: 0, 3: 2}) and RGB colour codes alike. An unknown value raises
    InvalidArgumentError when the dataset is iterated, naming `what`.

    Args:
        values: tf.Tensor. Integer tensor of any shape.
        table: dict. {raw value: class id}.
        what: str. Description of the values for the error message. Defaults to "mask value".

    Returns:
        tf.Tensor: int32 class ids, the shape of `values`.

    Example:
        >>> lookup_values(tf.constant([[1, 2, 3]]), {1: 1, 2: 0, 3: 2}).numpy()
        array([[1, 0, 2]], dtype=int32)
    """
    keys = np.array(sorted(table), dtype=np.int64)
    ids = np.array([table[k] for k in sorted(table)], dtype=np.int32)
    flat = tf.reshape(tf.cast(values, tf.int64), [-1])
    index = tf.minimum(tf.searchsorted(tf.constant(keys), flat), len(keys) - 1)
    found = tf.gather(tf.constant(keys), index)
    known = tf.reduce_all(tf.equal(found, flat))
    message = f"unknown {what}: expected one of {[int(k) for k in keys]}"
    unknown = tf.boolean_mask(flat, tf.not_equal(found, flat))[:3]
    with tf.control_dependencies([tf.debugging.Assert(known, [message, "got", unknown])]):
        classes = tf.gather(tf.constant(ids), index)
    return tf.reshape(classes, tf.shape(values))


def check_class_range(mask: tf.Tensor, num_classes: int, what: str = "mask") -> tf.Tensor:
    """Pass `mask` through, failing at iteration time when a value is outside the classes."""
    top = max_class_id(num_classes)
    valid = tf.logical_and(tf.reduce_min(mask) >= 0, tf.reduce_max(mask) <= top)
    message = f"{what} value outside 0..{top} (num_classes={num_classes}); pass a larger num_classes"
    check = tf.debugging.Assert(valid, [message, "min", tf.reduce_min(mask), "max", tf.reduce_max(mask)])
    with tf.control_dependencies([check]):
        return tf.identity(mask)


def color_code(rgb) -> np.ndarray | tf.Tensor:
    """Pack (..., 3) RGB values into one int (r << 16 | g << 8 | b), numpy or tensor."""
    if isinstance(rgb, tf.Tensor):
        rgb = tf.cast(rgb, tf.int32)
        return rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]


def check_color_map(color_map) -> dict[int, int]:
    """Validate `{(r, g, b): class_id}` and return it keyed by packed colour code."""
    if not isinstance(color_map, Mapping) or not color_map:
        raise ValueError(f"color_map must be a non-empty dict {{(r, g, b): class_id}}, got {color_map!r}.")
    table = {}
    for color, class_id in color_map.items():
        try:
            rgb = tuple(int(c) for c in color)
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
            raise ValueError(f"color_map key {color!r} is not an (r, g, b) triple of 0..255 integers.")
        if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)) or class_id < 0:
            raise ValueError(f"color_map value for {rgb} must be a non-negative class id, got {class_id!r}.")
        table[int(color_code(np.array(rgb)))] = int(class_id)
    return table


def rgb_to_classes(mask_rgb: tf.Tensor, table: Mapping[int, int]) -> tf.Tensor:
    """RGB mask [H, W, 3] -> int32 class ids [H, W, 1] through a packed-colour table."""
    classes = lookup_values(color_code(mask_rgb[..., :3]), table, "mask colour (r << 16 | g << 8 | b)")
    return classes[..., None]


def mask_values(array: np.ndarray) -> np.ndarray:
    """Sorted unique values of a raw mask array (fast path for 8-bit masks)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.reshape(-1), minlength=256))
    return np.unique(array)
