"""Reading image and mask files: PIL arrays, and `tf.io` or PIL decoding inside tf.data.

Images become float32 [H, W, C] scaled by their dtype's range (uint8 / 255, uint16 / 65535,
float images kept as they are); masks keep their raw values for `unetpp_tf.data.masks` to map.
`tf.io` decodes 8-bit PNG, JPEG and BMP exactly as PIL does and is used where it can be
(`image_decoder`, `mask_reader` choose per dataset); everything else is read with PIL inside
`tf.numpy_function`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions read as images or masks (case-insensitive)."""

# PIL modes by what they hold.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
COLOR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")

# PIL modes that tf.io decodes exactly as PIL does, per extension.
_TF_IMAGE_MODES = {
    ".png": ("1", "L", "LA", "P", "RGB", "RGBA"),
    ".jpg": ("L", "RGB"),
    ".jpeg": ("L", "RGB"),
    ".bmp": ("L", "P", "RGB", "RGBA"),
}
_TF_MASK_8_MODES = ("1", "L", "LA")
_TF_MASK_RGB_MODES = {".png": ("P", "RGB", "RGBA"), ".bmp": ("RGB", "RGBA")}


def tf_decoder_for(suffix: str, mode: str) -> bool | None:
    """Whether the pipeline may decode a file of this extension and PIL mode with `tf.io`.

    Returns:
        None when it never does; True when it does and a file that `tf.io` rejects is damaged
        (PNG, JPEG: libpng and libjpeg read every valid file); False when it does only for the
        files `tf.io` accepts (BMP, whose compressed variants `tf.io` cannot read: PIL reads those).

    Example:
        >>> tf_decoder_for(".png", "RGB"), tf_decoder_for(".bmp", "P"), tf_decoder_for(".tif", "L")
        (True, False, None)
    """
    modes = _TF_IMAGE_MODES.get(suffix, ()) + (SIXTEEN_BIT_MODES if suffix == ".png" else ())
    if mode not in modes:
        return None
    return suffix != ".bmp"


def image_channels(mode: str) -> int:
    """Channels an image of PIL `mode` is read with when `channels` is inferred: 1 (gray) or 3.

    Example:
        >>> image_channels("RGBA")
        3
    """
    return 1 if mode in GRAY_MODES else 3


def image_decoder(files: Iterable[tuple[str, str, bool]], channels: int) -> tuple[bool, bool]:
    """How `decode_image_file` reads a whole dataset: (use_tf, via_rgb).

    Args:
        files: iterable of (extension, PIL mode, tf_decodes) per image file, `tf_decodes`
            saying whether `tf.io.decode_image` accepted the file.
        channels: int. 1 or 3, the channels the images are read with.

    Returns:
        tuple: `use_tf` when tf.io reads every file exactly as PIL does; `via_rgb` when 1-channel
        reading must go through RGB and PIL's luminance formula (colour images, BMPs).

    Example:
        >>> image_decoder([(".png", "RGB", True)], 1)
        (True, True)
    """
    files = list(files)
    use_tf = all(ok and mode in _TF_IMAGE_MODES.get(suffix, ()) for suffix, mode, ok in files)
    via_rgb = channels == 1 and any(image_channels(mode) == 3 or suffix == ".bmp" for suffix, mode, _ in files)
    return use_tf, via_rgb


def mask_reader(files: Iterable[tuple[str, str, bool]], rgb: bool) -> str:
    """The one mask decoder for a whole dataset: tf.io when it reads every mask exactly, else PIL.

    Args:
        files: iterable of (extension, PIL mode, tf_decodes) per mask file.
        rgb: bool. The masks are RGB colours (a `color_map`).

    Returns:
        str: a `reader` for `decode_mask_file`.

    Example:
        >>> mask_reader([(".png", "L", True)], rgb=False)
        'tf8'
    """
    files = list(files)
    if not all(ok for _, _, ok in files):
        return "pil_rgb" if rgb else "pil"
    if rgb:
        fast = all(mode in _TF_MASK_RGB_MODES.get(suffix, ()) for suffix, mode, _ in files)
        return "tf_rgb" if fast else "pil_rgb"
    if all(suffix == ".png" and mode in _TF_MASK_8_MODES for suffix, mode, _ in files):
        return "tf8"
    if all(suffix == ".png" and mode in SIXTEEN_BIT_MODES for suffix, mode, _ in files):
        return "tf16"
    return "pil"


def pil_image_array(image, channels: int) -> np.ndarray:
    """A PIL image as float32 [H, W, channels] scaled by its dtype's range (alpha dropped, gray <-> RGB converted).

    Alpha is dropped as PIL's `convert` drops it (the colours under it are kept); the folder
    source refuses images with transparent pixels before they get here (see `inspection`).

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


def _read_pil_image(path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path.decode() if isinstance(path, bytes) else path) as image:
        return pil_image_array(image, channels)


def _read_pil_mask(path, rgb: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path.decode() if isinstance(path, bytes) else path) as image:
        array = pil_mask_array(image, rgb=rgb)
    return array.astype(np.uint8) if rgb else array.astype(np.int32)


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
