"""The inspection pass: every image and mask file is opened once and checked before a dataset exists.

A file that cannot be used is reported with its path, the reason and what to do, so that
nothing is trained (or written) on data that would fail, or be silently wrong, half-way
through an epoch. The checks, in order:

- the file can be read and is not empty (0 bytes);
- PIL recognises the format and the header is intact;
- the declared size is at most `max_pixels` (`MAX_IMAGE_PIXELS` by default): a decompression
  bomb (a few kilobytes that declare 60000 x 60000 pixels) is refused from its header, before
  any pixel is decoded. PIL refuses above twice `PIL.Image.MAX_IMAGE_PIXELS` by itself (about
  179 million pixels by default), which is reported the same way;
- the pixels decode completely (truncated or damaged files fail here);
- PNG and JPEG files also decode with `tf.io`, the decoder the pipeline uses for them (TensorFlow
  rejects a PNG whose last bytes are missing, which PIL still reads);
- channels: gray, gray + alpha, RGB or RGB + alpha (and palette, CMYK, ... that PIL converts to
  RGB). A TIFF with other channel counts (2 channels that are not gray + alpha, 4 that are not
  RGBA, ...) is refused rather than read as its first channel(s);
- transparency: alpha is dropped as PIL's `convert("RGB")` and `tf.io` drop it, which keeps the
  colours under transparent pixels as they are; so an image with any pixel of alpha below 255
  is refused, and a fully opaque one is read without its alpha channel. Mask alpha is ignored
  (mask values are class ids);
- the mask has the image's height and width, and integer (or RGB with `color_map`) values.

Example:
    >>> info = inspect_pair((Path("images/a.png"), Path("masks/a.png")), rgb=False)
    >>> info.problem is None, info.image.size
    (True, (256, 256))
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from unetpp_tf.data.masks import color_code, mask_values
from unetpp_tf.data.readers import COLOR_MODES, GRAY_MODES, pil_mask_array, tf_decoder_for

MAX_IMAGE_PIXELS = 2**27
"""Default `max_pixels`: 134,217,728 pixels (e.g. 11585 x 11585), above which a file is refused
from its header, before decoding. Below PIL's own refusal (2 * PIL.Image.MAX_IMAGE_PIXELS,
178,956,970 by default), so by default this limit is the one that applies."""

_SAMPLES_PER_PIXEL = 277  # TIFF tag
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}  # PIL's format per extension


class UnusableFile(ValueError):
    """A file that cannot be used: `str(error)` is "path: reason; what to do".

    Attributes:
        path: str. The file.
        reason: str. What is wrong and what to do.
    """

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What the inspection found out about one readable file.

    Attributes:
        path: Path. The file.
        mode: str. PIL mode ("L", "RGB", "I;16", ...).
        size: tuple. (height, width).
        tf_decodes: bool. `tf.io` decodes the file (and the pipeline may use it).
    """

    path: Path
    mode: str
    size: tuple[int, int]
    tf_decodes: bool

    @property
    def suffix(self) -> str:
        """Lower-case extension, e.g. ".png"."""
        return self.path.suffix.lower()

    @property
    def decoding(self) -> tuple[str, str, bool]:
        """(extension, mode, tf_decodes): what `readers.image_decoder` and `mask_reader` choose from."""
        return self.suffix, self.mode, self.tf_decodes


@dataclasses.dataclass(frozen=True)
class PairInfo:
    """The inspection of one image/mask pair: both files and the raw mask values, or the problem.

    Attributes:
        image: FileInfo or None. None when the image is unusable.
        mask: FileInfo or None. None when the image or the mask is unusable.
        values: np.ndarray or None. Sorted raw mask values (packed colour codes for RGB masks).
        problem: tuple or None. (path, reason) of the first unusable file of the pair.
    """

    image: FileInfo | None = None
    mask: FileInfo | None = None
    values: np.ndarray | None = None
    problem: tuple[str, str] | None = None


def inspect_image(path, *, max_pixels: int | None = MAX_IMAGE_PIXELS, tf_check: bool = True) -> FileInfo:
    """Open and fully decode one image file, raising `UnusableFile` when it cannot be used.

    Args:
        path: str or Path. The image file.
        max_pixels: int or None. Largest height * width accepted; None leaves only PIL's own
            limit. Defaults to `MAX_IMAGE_PIXELS`.
        tf_check: bool. Also decode PNG/JPEG with tf.io, as the tf.data pipeline may (False for
            readers that only use PIL, such as prediction). Defaults to True.

    Returns:
        FileInfo: mode, size and whether tf.io decodes it.

    Example:
        >>> inspect_image("images/a.png").size
        (256, 256)
    """
    path = Path(path)
    with _open_checked(path, "image", max_pixels) as (image, data):
        if image.mode not in GRAY_MODES and image.mode not in COLOR_MODES:
            raise UnusableFile(path, f"has the unsupported image mode {image.mode!r}; save it as gray or RGB")
        _check_opaque(path, image)
        tf_decodes = _tf_decodes(path, image, data) if tf_check else False
        return FileInfo(path, image.mode, (image.height, image.width), tf_decodes)


def inspect_mask(path, *, rgb: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[FileInfo, np.ndarray]:
    """Open and fully decode one mask file: its info and its sorted raw values.

    Args:
        path: str or Path. The mask file.
        rgb: bool. The mask holds RGB colours (values are packed colour codes). Defaults to False.
        max_pixels: int or None. As in `inspect_image`. Defaults to `MAX_IMAGE_PIXELS`.

    Returns:
        tuple: (FileInfo, np.ndarray of the sorted distinct raw values).

    Example:
        >>> info, values = inspect_mask("masks/a.png")
        >>> values.tolist()
        [0, 255]
    """
    path = Path(path)
    with _open_checked(path, "mask", max_pixels) as (mask, data):
        try:
            array = pil_mask_array(mask, rgb=rgb)
        except ValueError as error:
            raise UnusableFile(path, f"mask {error}") from None
        values = np.unique(color_code(array)) if rgb else mask_values(array)
        return FileInfo(path, mask.mode, (mask.height, mask.width), _tf_decodes(path, mask, data)), values


def inspect_pair(pair: tuple[Path, Path], *, rgb: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS) -> PairInfo:
    """Inspect an (image, mask) pair; the first problem found is kept as (path, reason).

    Example:
        >>> inspect_pair((Path("images/a.png"), Path("masks/a.png"))).problem
    """
    image_path, mask_path = pair
    try:
        image = inspect_image(image_path, max_pixels=max_pixels)
    except UnusableFile as error:
        return PairInfo(problem=(error.path, error.reason))
    try:
        mask, values = inspect_mask(mask_path, rgb=rgb, max_pixels=max_pixels)
    except UnusableFile as error:
        return PairInfo(image=image, problem=(error.path, error.reason))
    if mask.size != image.size:
        reason = (
            f"mask is {mask.size[0]}x{mask.size[1]} but image {Path(image_path).name} is "
            f"{image.size[0]}x{image.size[1]} (height x width); they must match pixel for pixel"
        )
        return PairInfo(image=image, mask=mask, problem=(str(mask_path), reason))
    return PairInfo(image=image, mask=mask, values=values)


def inspect_pairs(pairs, *, rgb: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict:
    """{pair: PairInfo} for many pairs, read in threads (PIL and tf.io release the GIL while decoding).

    Example:
        >>> infos = inspect_pairs([(Path("images/a.png"), Path("masks/a.png"))])
    """
    pairs = list(pairs)
    workers = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(pairs, pool.map(lambda pair: inspect_pair(pair, rgb=rgb, max_pixels=max_pixels), pairs)))


class _open_checked:
    """Context manager: (PIL image, file bytes) after the file, header, size, channel and pixel checks."""

    def __init__(self, path: Path, what: str, max_pixels: int | None):
        self.path, self.what, self.max_pixels = path, what, max_pixels
        self.image = None

    def __enter__(self):
        from PIL import Image, UnidentifiedImageError

        path, what = self.path, self.what
        try:
            data = path.read_bytes()
        except OSError as error:
            reason = f"cannot be read ({error.strerror or error}); check that it exists and is readable"
            raise UnusableFile(path, reason) from None
        if not data:
            raise UnusableFile(path, "is an empty file (0 bytes); replace or remove it")
        try:
            self.image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise UnusableFile(
                path,
                f"was refused before decoding ({error}); downscale or tile it, or if it is genuine raise "
                "PIL.Image.MAX_IMAGE_PIXELS and max_pixels",
            ) from None
        except UnidentifiedImageError:
            raise UnusableFile(
                path,
                f"cannot be read as {'an image' if what == 'image' else 'a mask'}: the content is not PNG, JPEG, "
                "BMP or TIFF, or its header is damaged; replace or remove it",
            ) from None
        except Exception as error:  # noqa: BLE001 - any header parser failure means the file is unusable
            raise UnusableFile(path, f"is truncated or damaged ({error}); replace or remove it") from None
        self._check_size()
        self._check_channels()
        try:
            self.image.load()
        except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
            raise UnusableFile(path, f"is truncated or damaged ({error}); replace or remove it") from None
        return self.image, data

    def __exit__(self, *exc):
        if self.image is not None:
            self.image.close()
        return False

    def _check_size(self):
        height, width = self.image.height, self.image.width
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise UnusableFile(
                self.path,
                f"declares {height}x{width} pixels (height x width, {height * width:,} in all), more than "
                f"max_pixels={self.max_pixels:,}; it was refused before decoding (a decompression bomb, or a scan "
                "too large to train on whole): downscale or tile it, or pass a larger max_pixels if it is genuine",
            )

    def _check_channels(self):
        bands = self.image.getbands()
        samples = None
        if self.image.format == "TIFF":
            samples = self.image.tag_v2.get(_SAMPLES_PER_PIXEL)
        if "X" in bands or (samples is not None and samples != len(bands)):
            count = samples if samples is not None else len(bands)
            kept = "a gray" if self.what == "image" else "a single-channel"
            raise UnusableFile(
                self.path,
                f"has {count} channels per pixel that are not gray, gray + alpha, RGB or RGB + alpha, and would be "
                f"read as its first channel(s) only; save the channel to use as {kept} {self.what}"
                + (" (or three channels as RGB)" if self.what == "image" else ""),
            )


def _check_opaque(path: Path, image) -> None:
    """Refuse an image with any transparent pixel: dropping alpha would keep the colours under it."""
    if not image.has_transparency_data:
        return
    alpha = image.getchannel("A") if "A" in image.getbands() else image.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] == 255:
        return
    transparent = int(np.count_nonzero(np.asarray(alpha) < 255))
    raise UnusableFile(
        path,
        f"has transparent pixels (alpha below 255 in {transparent:,} of {image.width * image.height:,}); images "
        "are read without alpha, which would keep the colours under the transparency as they are: flatten it "
        "onto a background or save it without alpha",
    )


def _tf_decodes(path: Path, image, data: bytes) -> bool:
    """Whether tf.io decodes the file; a PNG or JPEG it rejects (though PIL reads it) is unusable.

    A file whose content is another format than its extension says (a JPEG saved as mask.png)
    is left to PIL: the pipeline picks tf.io decoders by extension.
    """
    suffix = path.suffix.lower()
    strict = tf_decoder_for(suffix, image.mode)
    if strict is None or image.format != _FORMATS.get(suffix):
        return False
    try:
        tf.io.decode_image(data, expand_animations=False)
    except tf.errors.InvalidArgumentError as error:
        if strict:
            raise UnusableFile(
                path,
                f"is damaged: TensorFlow's decoder rejects it ({_op_message(error)}) though PIL reads it (a "
                "truncated end or a bad checksum, for example); re-save it or replace it",
            ) from None
        return False
    return True


def _op_message(error) -> str:
    """The text of a TensorFlow op error without its function-node prefix and op suffix."""
    text = re.sub(r"\{\{[^}]*\}\}", "", error.message)
    return re.sub(r"\s*\[Op:\w+\]", "", text).strip()
