"""Hostile image and mask files: each refused by the inspection pass with one line naming the file and what to do."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from unetpp_tf.data import from_directory
from unetpp_tf.data.inspection import MAX_IMAGE_PIXELS, UnusableFile, inspect_image, inspect_mask

ALL = (1.0, 0.0, 0.0)
SIZE = 16


def gradient(channels=3, seed=0):
    """A smooth uint8 image [SIZE, SIZE(, channels)] (JPEG keeps it close)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    planes = [(127 + 100 * np.sin(xx / (3 + seed + k)) * np.cos(yy / 4)) for k in range(channels)]
    image = np.stack(planes, -1).astype(np.uint8)
    return image[..., 0] if channels == 1 else image


def binary_mask(seed=0):
    return (np.random.default_rng(seed).random((SIZE, SIZE)) > 0.5).astype(np.uint8)


def encoded(array, fmt, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def write_dataset(root, count=4):
    """root/images/{i}.png + root/masks/{i}.png, all valid."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.fromarray(gradient(seed=i)).save(root / "images" / f"{i}.png")
        Image.fromarray(binary_mask(i)).save(root / "masks" / f"{i}.png")
    return root


def png_header_only(height, width):
    """A valid PNG signature and IHDR declaring height x width gray pixels, with one row of data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
        + chunk(b"IEND", b"")
    )


def raw_tiff(pixels, extra_samples=None):
    """An uncompressed little-endian TIFF of uint8 pixels [H, W, S], written tag by tag.

    `extra_samples` is the ExtraSamples value of the channels after the first (0 unspecified,
    2 unassociated alpha); None leaves the tag out.
    """
    height, width, samples = pixels.shape
    data = pixels.tobytes()
    entries = [  # (tag, type (3 SHORT, 4 LONG), values)
        (256, 4, [width]), (257, 4, [height]), (258, 3, [8] * samples), (259, 3, [1]), (262, 3, [1]),
        (273, 4, [0]), (277, 3, [samples]), (278, 4, [height]), (279, 4, [len(data)]), (284, 3, [1]),
    ]
    if extra_samples is not None:
        entries.append((338, 3, [extra_samples] * (samples - 1)))
    ifd_size = 2 + 12 * len(entries) + 4
    overflow, blobs = 8 + ifd_size, b""
    fields = []
    for tag, kind, values in entries:
        packed = struct.pack("<" + ("H" if kind == 3 else "I") * len(values), *values)
        if len(packed) <= 4:
            fields.append((tag, kind, len(values), packed.ljust(4, b"\x00")))
        else:
            fields.append((tag, kind, len(values), struct.pack("<I", overflow + len(blobs))))
            blobs += packed
    pixel_offset = overflow + len(blobs)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in fields:
        if tag == 273:
            value = struct.pack("<I", pixel_offset)
        ifd += struct.pack("<HHI", tag, kind, count) + value
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + blobs + data


def refusal(root, **kwargs):
    """The message from_directory raises for the folder."""
    with pytest.raises(ValueError) as error:
        from_directory(root, split=ALL, **kwargs)
    return str(error.value)


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif")])
@pytest.mark.parametrize("which", ["image", "mask"])
def test_truncated_file_named_with_what_to_do(tmp_path, fmt, suffix, which):
    root = write_dataset(tmp_path)
    content = gradient() if which == "image" else binary_mask() * 255
    data = encoded(content, fmt)
    target = root / f"{which}s" / f"2.{suffix}"
    (root / f"{which}s" / "2.png").unlink()
    target.write_bytes(data[: len(data) // 2])
    message = refusal(root)
    assert message.startswith("1 invalid image/mask pair(s):")
    assert f"{target}: is truncated or damaged (" in message and "replace or remove it" in message
    assert "skip_invalid=True" in message


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif"])
def test_garbage_content_cannot_be_read(tmp_path, suffix):
    root = write_dataset(tmp_path)
    (root / "images" / "1.png").unlink()
    (root / "images" / f"1.{suffix}").write_bytes(b"\x89PNG\r\n" + bytes(range(256)) * 4)
    assert f"1.{suffix}: cannot be read as an image: the content is not PNG, JPEG, BMP or TIFF" in refusal(root)


def test_png_that_only_pil_reads_is_refused_too(tmp_path):
    # The last byte missing (the IEND checksum): PIL still decodes the pixels, tf.io.decode_png does not,
    # and the pipeline decodes PNGs with tf.io, so training would fail in the middle of an epoch.
    root = write_dataset(tmp_path)
    data = encoded(gradient(), "PNG")
    (root / "images" / "3.png").write_bytes(data[:-1])
    with Image.open(root / "images" / "3.png") as image:
        image.load()  # PIL alone would accept it
    message = refusal(root)
    assert "3.png: is damaged: TensorFlow's decoder rejects it (Invalid PNG data" in message
    assert "re-save it or replace it" in message


@pytest.mark.parametrize("which", ["image", "mask"])
def test_zero_byte_file(tmp_path, which):
    root = write_dataset(tmp_path)
    (root / f"{which}s" / "0.png").write_bytes(b"")
    assert f"{root / (which + 's') / '0.png'}: is an empty file (0 bytes); replace or remove it" in refusal(root)


# ----------------------------------------------------------------------------- decompression bombs


def test_bomb_header_refused_before_decoding(tmp_path):
    root = write_dataset(tmp_path)
    (root / "images" / "1.png").write_bytes(png_header_only(60000, 60000))  # 138 bytes declaring 3.6e9 pixels
    message = refusal(root)
    assert "1.png: was refused before decoding (Image size (3600000000 pixels) exceeds limit" in message
    assert "downscale or tile it" in message and "truncated" not in message


def test_file_above_max_pixels_refused_from_its_header(tmp_path):
    root = write_dataset(tmp_path)
    # Above the library's limit, below PIL's own refusal: the library's check is the one that refuses it.
    (root / "images" / "2.png").write_bytes(png_header_only(12000, 12000))
    assert 12000 * 12000 > MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):  # PIL warns when it opens the header
        message = refusal(root)
    assert (
        "2.png: declares 12000x12000 pixels (height x width, 144,000,000 in all), more than "
        "max_pixels=134,217,728; it was refused before decoding" in message
    )
    assert "truncated" not in message  # it never got as far as decoding the one row of data


def test_max_pixels_is_overridable(tmp_path):
    root = write_dataset(tmp_path)
    message = refusal(root, max_pixels=SIZE * SIZE - 1)
    assert message.startswith("4 invalid image/mask pair(s)")
    assert "declares 16x16 pixels (height x width, 256 in all), more than max_pixels=255" in message
    assert from_directory(root, split=ALL, max_pixels=SIZE * SIZE).counts["train"] == 4
    assert from_directory(root, split=ALL, max_pixels=None).counts["train"] == 4
    with pytest.raises(ValueError, match="max_pixels must be a positive integer or None"):
        from_directory(root, split=ALL, max_pixels=0)


# ----------------------------------------------------------------------------- channels and alpha


def test_opaque_alpha_is_dropped_transparent_refused(tmp_path):
    root = write_dataset(tmp_path)
    rgb = gradient(seed=9)
    opaque = np.concatenate([rgb, np.full((SIZE, SIZE, 1), 255, np.uint8)], -1)
    Image.fromarray(opaque, "RGBA").save(root / "images" / "0.png")
    data = from_directory(root, split=ALL, shuffle=False, batch_size=8)
    images, _ = next(iter(data.train))
    assert data.channels == 3
    np.testing.assert_allclose(images.numpy()[0], rgb / 255.0, atol=1e-6)  # the colours, no alpha

    seen = opaque.copy()
    seen[:4, :4, 3] = 0  # 16 transparent pixels
    Image.fromarray(seen, "RGBA").save(root / "images" / "0.png")
    gray = np.stack([gradient(1), np.full((SIZE, SIZE), 255, np.uint8)], -1)
    gray[0, 0, 1] = 128  # one half-transparent pixel
    Image.fromarray(gray, "LA").save(root / "images" / "1.png")
    message = refusal(root)
    assert "0.png: has transparent pixels (alpha below 255 in 16 of 256); images are read without alpha" in message
    assert "1.png: has transparent pixels (alpha below 255 in 1 of 256)" in message
    assert "flatten it onto a background or save it without alpha" in message


def test_palette_transparency_refused(tmp_path):
    root = write_dataset(tmp_path)
    Image.fromarray(gradient(1)).save(root / "images" / "3.png", transparency=int(gradient(1)[5, 5]))
    assert "3.png: has transparent pixels" in refusal(root)


def test_gray_plus_alpha_tiff_follows_the_alpha_rule(tmp_path):
    root = write_dataset(tmp_path)
    pixels = np.stack([gradient(1), np.full((SIZE, SIZE), 255, np.uint8)], -1)
    (root / "images" / "2.png").unlink()
    (root / "images" / "2.tif").write_bytes(raw_tiff(pixels, extra_samples=2))  # 2 = unassociated alpha
    data = from_directory(root, split=ALL, shuffle=False, channels=1, batch_size=8)
    images, _ = next(iter(data.train))
    np.testing.assert_allclose(images.numpy()[2, ..., 0], gradient(1) / 255.0, atol=1e-6)


@pytest.mark.parametrize("which", ["image", "mask"])
def test_two_channel_tiff_refused_not_read_as_its_first_channel(tmp_path, which):
    root = write_dataset(tmp_path)
    first = gradient(1) if which == "image" else binary_mask()
    pixels = np.stack([first, 255 - first], -1)
    (root / f"{which}s" / "1.png").unlink()
    path = root / f"{which}s" / "1.tif"
    path.write_bytes(raw_tiff(pixels, extra_samples=0))  # 0 = unspecified: not alpha
    with Image.open(path) as opened:
        assert opened.mode == "L"  # PIL on its own would read the first channel and drop the second
    message = refusal(root)
    assert f"{path}: has 2 channels per pixel that are not gray, gray + alpha, RGB or RGB + alpha" in message
    assert f"save the channel to use as a {'gray' if which == 'image' else 'single-channel'} {which}" in message


def test_inspection_functions_raise_unusable_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(UnusableFile) as error:
        inspect_image(path)
    assert error.value.path == str(path) and error.value.reason.startswith("is an empty file")
    Image.fromarray(binary_mask() * 3).save(tmp_path / "m.png")
    info, values = inspect_mask(tmp_path / "m.png")
    assert info.size == (SIZE, SIZE) and info.mode == "L" and info.tf_decodes and values.tolist() == [0, 3]


# ----------------------------------------------------------------------------- masks and sizes


def test_mask_values_outside_the_classes(tmp_path):
    root = write_dataset(tmp_path)
    bad = binary_mask(1)
    bad[0, 0] = 5
    Image.fromarray(bad).save(root / "masks" / "1.png")
    void = binary_mask(2) * 2
    void[3, 3] = 255  # a "void" label
    Image.fromarray(void).save(root / "masks" / "2.png")
    message = refusal(root, num_classes=3)
    assert message.startswith("2 invalid image/mask pair(s)")
    assert "1.png: has class ids 5 outside 0..2 (num_classes=3); fix the mask or raise num_classes" in message
    assert "2.png: has class ids 255 outside 0..2 (num_classes=3) (255 often marks pixels to ignore" in message


def test_many_bad_files_listed_once_each_and_skipped_exactly(tmp_path):
    root = write_dataset(tmp_path, count=9)
    bad = {
        root / "images" / "1.png": "is an empty file",
        root / "images" / "2.png": "is truncated or damaged",
        root / "masks" / "3.png": "mask is 8x8 but image 3.png is 16x16",
        root / "images" / "4.png": "was refused before decoding",
        root / "masks" / "5.png": "has class ids 7 outside 0..1",
        root / "images" / "6.png": "has transparent pixels",
        root / "images" / "lonely.png": "image has no mask with the same stem",
    }
    (root / "images" / "1.png").write_bytes(b"")
    data = encoded(gradient(), "PNG")
    (root / "images" / "2.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(binary_mask()[:8, :8]).save(root / "masks" / "3.png")
    (root / "images" / "4.png").write_bytes(png_header_only(60000, 60000))
    out_of_range = binary_mask(5)
    out_of_range[1, 1] = 7
    Image.fromarray(out_of_range).save(root / "masks" / "5.png")
    transparent = np.concatenate([gradient(), np.zeros((SIZE, SIZE, 1), np.uint8)], -1)
    Image.fromarray(transparent, "RGBA").save(root / "images" / "6.png")
    Image.fromarray(gradient()).save(root / "images" / "lonely.png")

    message = refusal(root, num_classes=1)
    lines = message.splitlines()
    assert lines[0] == "7 invalid image/mask pair(s):"
    for path, reason in bad.items():
        assert sum(line.startswith(f"  {path}: {reason}") for line in lines) == 1, path
    assert lines[-1].startswith("Fix or remove them, or pass skip_invalid=True")

    data = from_directory(root, split=ALL, num_classes=1, skip_invalid=True, shuffle=False, batch_size=16)
    assert dict(data.files["skipped"]).keys() == {str(path) for path in bad}
    for path, reason in data.files["skipped"]:
        assert reason.startswith(bad[type(root)(path)])
    kept = [image for image, _ in data.files["train"]]
    assert kept == [str(root / "images" / f"{i}.png") for i in (0, 7, 8)]
    images, masks = next(iter(data.train))
    np.testing.assert_allclose(images.numpy(), np.stack([gradient(seed=i) for i in (0, 7, 8)]) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(masks.numpy()[..., 0], np.stack([binary_mask(i) for i in (0, 7, 8)]))


def test_content_in_another_format_than_its_extension_is_read_with_pil(tmp_path):
    root = write_dataset(tmp_path)
    (root / "masks" / "1.png").write_bytes(encoded(binary_mask(1), "BMP"))  # a BMP named .png
    with Image.open(root / "masks" / "1.png") as opened:
        assert (opened.format, opened.mode) == ("BMP", "L")
    data = from_directory(root, split=ALL, shuffle=False, batch_size=8)
    _, read = next(iter(data.train))  # tf.io.decode_png would fail on it here
    np.testing.assert_array_equal(read.numpy()[..., 0], np.stack([binary_mask(i) for i in range(4)]))


def test_images_smaller_than_the_crop(tmp_path):
    root = write_dataset(tmp_path, count=3)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "images" / "1.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "masks" / "1.png")
    message = refusal(root, crop_size=(20, 20))
    assert message.startswith("2 invalid image/mask pair(s)")  # 0.png and 2.png (16x16); 1.png is 24x24
    assert "0.png: is 16x16, smaller than crop_size (20, 20); pass a smaller crop_size" in message
    assert "1.png" not in message
    assert from_directory(root, split=ALL, crop_size=(20, 20), image_size=(24, 24)).image_size == (20, 20)
