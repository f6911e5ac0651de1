"""Per-sample preprocessing shared by every data source: decoding, scaling, resizing, cropping
and turning raw mask values into class ids.

Every source (folder, arrays, tfds) goes through these functions, so an image is scaled,
resized and cropped the same way wherever it comes from:

- images: float32 [H, W, C] scaled by their dtype's range (uint8 / 255, uint16 / 65535, float
  images kept as they are), resized bilinearly, then optionally normalized with a (mean, std)
  pair; intensity normalization that travels with the model is the model's own first layer
  (`unetpp_tf.models.preprocessing.InputPreprocessing`);
- masks: int32 [H, W, 1] class ids, resized with nearest neighbour (never fractional labels);
- crops: one window for image and mask, random (seeded, new each epoch) for the train split and
  centred for val/test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from unetpp_tf.data.pipeline import SPLITS, finalize

AUTOTUNE = tf.data.AUTOTUNE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions read as images or masks (case-insensitive)."""

MASK_MODES = ("auto", "binary", "index", "rgb")

# PIL modes by what they hold.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
COLOR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


# ----------------------------------------------------------------------------- arguments


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
    """Raise when per-channel mean/std do not match the image channels."""
    if normalization is None:
        return
    for label, values in zip(("mean", "std"), normalization):
        if values.size not in (1, channels):
            raise ValueError(
                f"normalization {label} has {values.size} values but the images have {channels} "
                f"channel(s); give one value or {channels}."
            )


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


def describe(items: Sequence, limit: int = 10) -> str:
    """Join items for an error message, eliding after `limit`: "a, b, ... and 3 more".

    Example:
        >>> describe(["a", "b", "c"], limit=2)
        'a, b ... and 1 more'
    """
    items = [str(item) for item in items]
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f" ... and {len(items) - limit} more"
    return text


# ----------------------------------------------------------------------------- mask values


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
    `num_classes` is given and 255 cannot be a class id; otherwise it keeps the values. When
    255 appears next to other non-zero values and `num_classes` is not given, the masks are
    ambiguous (0/255 binary mixed with class ids) and a ValueError says what to pass. The
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
        if not others or (num_classes is not None and 255 > max_class_id(num_classes)):
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


# ----------------------------------------------------------------------------- PIL readers


def pil_image_array(image, channels: int) -> np.ndarray:
    """A PIL image as float32 [H, W, channels] scaled by its dtype's range (alpha dropped, gray <-> RGB converted).

    8-bit images ("L", "P", "RGB", ...) are divided by 255; 16-bit ones ("I;16", "I;16B",
    "I;16L", "I;16N": 16-bit PNG and TIFF) and "I" (32-bit integer, how PIL opens some
    16-bit files) by 65535; 32-bit float ("F", e.g. float TIFF) images are kept as they are.

    Args:
        image: PIL.Image.Image. An opened image.
        channels: int. 1 or 3.

    Returns:
        np.ndarray: float32 [H, W, channels].

    Example:
        >>> pil_image_array(PIL.Image.open("a.tif"), 3).shape
        (32, 32, 3)
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        if mode != "F":
            array = array / 65535.0
        array = array[..., None]
        return np.repeat(array, 3, axis=-1) if channels == 3 else array
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return array[..., None] if channels == 1 else array


def pil_mask_array(image, *, rgb: bool = False) -> np.ndarray:
    """A PIL mask as its raw values: [H, W] integers, or [H, W, 3] uint8 colours when `rgb`.

    Palette ("P") masks give their palette indices, 1-bit masks 0/255, gray masks their values,
    RGB masks whose three channels are equal their gray value. A colour mask without `rgb`,
    or a float mask with non-integer values, raises ValueError saying what to do.

    Args:
        image: PIL.Image.Image. An opened mask.
        rgb: bool. Return RGB colours (for a `color_map`). Defaults to False.

    Returns:
        np.ndarray: raw values.

    Example:
        >>> pil_mask_array(PIL.Image.open("mask.png")).dtype
        dtype('uint8')
    """
    mode = image.mode
    if rgb:
        return np.asarray(image.convert("RGB"))
    if mode == "P":
        return np.asarray(image)
    if mode == "PA":
        return np.asarray(image.convert("P"))
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "LA":
        return np.asarray(image)[..., 0]
    if mode == "F":
        array = np.asarray(image)
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError("has non-integer (float) values; class ids must be integers")
        return array.astype(np.int64)
    if mode in GRAY_MODES:
        return np.asarray(image)
    if mode in ("RGB", "RGBA", "RGBX"):
        array = np.asarray(image)[..., :3]
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
            return array[..., 0]
        raise ValueError(
            "is a colour (RGB) mask; pass color_map={(r, g, b): class_id, ...} (mask_mode='rgb') "
            "or save masks as single-channel class ids"
        )
    raise ValueError(
        f"has unsupported image mode {mode!r} for a mask; save it as 8/16-bit gray, palette or RGB"
    )


def mask_values(array: np.ndarray) -> np.ndarray:
    """Sorted unique values of a raw mask array (fast path for 8-bit masks)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.reshape(-1), minlength=256))
    return np.unique(array)


def _read_pil_image(path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path.decode() if isinstance(path, bytes) else path) as image:
        return pil_image_array(image, channels)


def _read_pil_mask(path, rgb: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path.decode() if isinstance(path, bytes) else path) as image:
        array = pil_mask_array(image, rgb=rgb)
    return array.astype(np.uint8) if rgb else array.astype(np.int32)


# ----------------------------------------------------------------------------- decoding


def decode_image_file(path: tf.Tensor, channels: int, *, use_tf: bool, via_rgb: bool = False) -> tf.Tensor:
    """Read an image file into float32 [H, W, channels] in [0, 1], exactly as PIL reads it.

    Args:
        path: tf.Tensor. Scalar string path.
        channels: int. 1 or 3.
        use_tf: bool. Decode with `tf.io` (8-bit PNG, JPEG, BMP; fast) instead of PIL inside
            `tf.numpy_function` (TIFF, 16-bit, anything else).
        via_rgb: bool. With `use_tf` and channels=1: decode RGB and convert with PIL's
            luminance formula (needed for colour images and BMPs, since libpng's own gray
            conversion uses other weights and tf cannot read a BMP as 1 channel). Defaults
            to False.

    Returns:
        tf.Tensor: float32 [H, W, channels].

    Example:
        >>> decode_image_file(tf.constant("a.png"), 3, use_tf=True).dtype
        tf.float32
    """
    if use_tf:
        data = tf.io.read_file(path)
        decoded = 3 if via_rgb else channels
        # decode_image's JPEG path uses the fast integer IDCT (up to ~10 levels off PIL/libjpeg's
        # default); the accurate one matches PIL exactly.
        image = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=decoded, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, channels=decoded, expand_animations=False),
        )
        if decoded != channels:
            image = rgb_to_luminance(image)
        image = scale_to_unit(image)
    else:
        image = tf.numpy_function(lambda p: _read_pil_image(p, channels), [path], tf.float32, stateful=False)
    image.set_shape([None, None, channels])
    return image


def rgb_to_luminance(image: tf.Tensor) -> tf.Tensor:
    """uint8 RGB [H, W, 3] -> uint8 [H, W, 1] with PIL's convert("L") integer formula (ITU-R 601)."""
    rgb = tf.cast(image, tf.int32)
    gray = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) // 65536
    return tf.cast(gray, tf.uint8)[..., None]


def decode_mask_file(path: tf.Tensor, *, reader: str) -> tf.Tensor:
    """Read a mask file into its raw values: int32 [H, W, 1], or uint8 [H, W, 3] for "rgb" readers.

    Args:
        path: tf.Tensor. Scalar string path.
        reader: str. "tf8" (8-bit gray PNG via tf.io), "tf16" (16-bit gray PNG), "tf_rgb"
            (RGB PNG/BMP), "pil" (palette, TIFF, anything else) or "pil_rgb".

    Returns:
        tf.Tensor: the raw mask.
    """
    if reader in ("tf8", "tf16"):
        data = tf.io.read_file(path)
        mask = tf.io.decode_png(data, channels=1, dtype=tf.uint8 if reader == "tf8" else tf.uint16)
        mask = tf.cast(mask, tf.int32)
    elif reader == "tf_rgb":
        mask = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    elif reader == "pil_rgb":
        mask = tf.numpy_function(lambda p: _read_pil_mask(p, True), [path], tf.uint8, stateful=False)
    elif reader == "pil":
        mask = tf.numpy_function(lambda p: _read_pil_mask(p, False), [path], tf.int32, stateful=False)
        mask = mask[..., None]
    else:
        raise ValueError(f"unknown mask reader {reader!r}.")
    mask.set_shape([None, None, 3 if reader.endswith("rgb") else 1])
    return mask


def scale_to_unit(image: tf.Tensor) -> tf.Tensor:
    """Image tensor -> float32: uint8 / 255, uint16 / 65535, floats unchanged."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    if image.dtype == tf.uint16:
        return tf.cast(image, tf.float32) / 65535.0
    return tf.cast(image, tf.float32)


def preprocess_pair(
    image: tf.Tensor,
    mask: tf.Tensor,
    *,
    image_size: tuple[int, int] | None = None,
    normalization: tuple | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Scale, resize (image bilinear, mask nearest) and normalize one sample.

    Args:
        image: tf.Tensor. [H, W, C] uint8, uint16 or float.
        mask: tf.Tensor. [H, W, 1] integer class ids.
        image_size: tuple or None. (height, width) to resize to; None keeps the size.
            Defaults to None.
        normalization: tuple or None. (mean, std) from `resolve_normalization`, applied after
            scaling to [0, 1]. Defaults to None.

    Returns:
        tuple: (float32 [h, w, C] image, int32 [h, w, 1] mask).

    Example:
        >>> image, mask = tf.zeros([40, 50, 3], tf.uint8), tf.zeros([40, 50, 1], tf.int32)
        >>> x, y = preprocess_pair(image, mask, image_size=(32, 32))
    """
    image = scale_to_unit(image)
    mask = tf.cast(mask, tf.int32)
    if image_size is not None:
        image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
        mask = tf.image.resize(mask, image_size, method="nearest")
    if normalization is not None:
        mean, std = normalization
        image = (image - tf.constant(mean)) / tf.constant(std)
    return image, mask


def center_crop_pair(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop the same centred `size` window out of image and mask."""
    shape = tf.shape(image)
    top = (shape[0] - size[0]) // 2
    left = (shape[1] - size[1]) // 2
    return _crop(image, mask, top, left, size)


def random_crop_pair(
    image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop the same random `size` window out of image and mask (stateless, from `seed` [2])."""
    shape = tf.shape(image)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    top = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - size[1] + 1, dtype=tf.int32)
    return _crop(image, mask, top, left, size)


def _crop(image, mask, top, left, size):
    shape = tf.shape(image)
    check = tf.debugging.assert_greater_equal(
        shape[:2], tf.constant(size, tf.int32), message=f"image smaller than crop_size {size}"
    )
    with tf.control_dependencies([check]):
        image = image[top : top + size[0], left : left + size[1]]
        mask = mask[top : top + size[0], left : left + size[1]]
    image.set_shape([size[0], size[1], image.shape[-1]])
    mask.set_shape([size[0], size[1], mask.shape[-1]])
    return image, mask


# ----------------------------------------------------------------------------- splits


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
