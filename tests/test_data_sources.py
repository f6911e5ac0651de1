"""Folder, array and TFDS sources: decoding, mask conversion, resizing, cropping, splits, errors."""

import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from unetpp_tf.data import checks, crops, decode, masks, pipeline, readers
from unetpp_tf.data.arrays import from_arrays
from unetpp_tf.data.folder import from_directory
from unetpp_tf.data.tfds_source import _split_specs, from_tfds, trimap_to_classes

ALL = (1.0, 0.0, 0.0)  # every pair in train: one deterministic batch when shuffle=False


# ----------------------------------------------------------------------------- helpers


def save(path, array, mode=None, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    image.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def smooth_images(count, size=16, channels=3, seed=0):
    """Smooth uint8 images (JPEG stays close to them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(2, 8, 3)
        planes = [(127 + 120 * np.sin(xx / a + k * b) * np.cos(yy / c)) for k in range(channels)]
        out.append(np.stack(planes, -1).astype(np.uint8))
    out = np.stack(out)
    return out[..., 0] if channels == 1 else out


def write_pairs(root, images, masks, image_ext="png", mask_ext="png", **mask_kwargs):
    for i, (image, mask) in enumerate(zip(images, masks)):
        save(root / "images" / f"{i:03d}.{image_ext}", image)
        save(root / "masks" / f"{i:03d}.{mask_ext}", mask, **mask_kwargs)
    return root


def first_batch(ds):
    images, masks = next(iter(ds))
    return images.numpy(), masks.numpy()


def load_all(root, **kwargs):
    kwargs = dict(dict(split=ALL, shuffle=False, batch_size=64), **kwargs)
    data = from_directory(root, **kwargs)
    return data, *first_batch(data.train)


def binary_masks(count, size=16, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.random((count, size, size)) > 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- folder: images


@pytest.mark.parametrize("ext", ["png", "bmp", "tif"])
@pytest.mark.parametrize("channels", [1, 3])
def test_folder_lossless_images_scaled_exactly(tmp_path, ext, channels):
    images = smooth_images(3, channels=channels)
    write_pairs(tmp_path, images, binary_masks(3) * 255, image_ext=ext)
    data, x, y = load_all(tmp_path)
    expected = images.astype(np.float32) / 255.0
    if channels == 1:
        expected = expected[..., None]
    assert data.channels == channels and x.shape == (3, 16, 16, channels) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-6)
    np.testing.assert_array_equal(y[..., 0], binary_masks(3))


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_jpeg_images_match_pil_decoding(tmp_path, channels):
    write_pairs(tmp_path, smooth_images(3, channels=channels), binary_masks(3), image_ext="jpg")
    data, x, _ = load_all(tmp_path)
    decoded = np.stack([np.asarray(Image.open(tmp_path / "images" / f"{i:03d}.jpg")) for i in range(3)])
    decoded = decoded.astype(np.float32) / 255.0
    assert data.channels == channels
    np.testing.assert_allclose(x, decoded if channels == 3 else decoded[..., None], atol=1e-6)


def test_folder_mixed_gray_rgb_and_rgba(tmp_path):
    rgb = smooth_images(2, channels=3)
    gray = smooth_images(1, channels=1, seed=5)[0]
    rgba = np.concatenate([rgb[1], np.full((16, 16, 1), 255, np.uint8)], -1)  # opaque: alpha is dropped
    masks = binary_masks(3)
    for name, image, mode in (("a", rgb[0], None), ("b", gray, None), ("c", rgba, "RGBA")):
        save(tmp_path / "images" / f"{name}.png", image, mode)
    for name, mask in zip("abc", masks):
        save(tmp_path / "masks" / f"{name}.png", mask)
    data, x, _ = load_all(tmp_path)
    assert data.channels == 3
    np.testing.assert_allclose(x[0], rgb[0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(x[1], np.repeat(gray[..., None], 3, -1) / 255.0, atol=1e-6)
    np.testing.assert_allclose(x[2], rgb[1] / 255.0, atol=1e-6)
    _, x1, _ = load_all(tmp_path, channels=1)
    assert x1.shape == (3, 16, 16, 1)
    np.testing.assert_allclose(x1[1, ..., 0], gray / 255.0, atol=1e-6)
    pil_gray = np.asarray(Image.fromarray(rgb[0]).convert("L")) / 255.0  # PIL's luminance, exactly
    np.testing.assert_allclose(x1[0, ..., 0], pil_gray, atol=1e-6)


@pytest.mark.parametrize("ext", ["jpg", "bmp", "tif"])
def test_folder_rgb_forced_to_one_channel_like_pil(tmp_path, ext):
    write_pairs(tmp_path, smooth_images(2), binary_masks(2), image_ext=ext)
    _, x, _ = load_all(tmp_path, channels=1)
    expected = [np.asarray(Image.open(tmp_path / "images" / f"{i:03d}.{ext}").convert("L")) for i in range(2)]
    np.testing.assert_allclose(x[..., 0], np.stack(expected) / 255.0, atol=1e-6)


def test_folder_16bit_tiff_images_scaled_by_65535(tmp_path):
    image = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    save(tmp_path / "images" / "a.tif", image)
    save(tmp_path / "masks" / "a.png", binary_masks(1)[0])
    _, x, _ = load_all(tmp_path)
    np.testing.assert_allclose(x[0, ..., 0], image / 65535.0, atol=1e-6)


# ----------------------------------------------------------------------------- folder: masks


def test_folder_binary_masks_0_255_and_0_1(tmp_path):
    masks = binary_masks(3)
    data, _, y = load_all(write_pairs(tmp_path / "a", smooth_images(3), masks * 255))
    assert data.num_classes == 1 and y.dtype == np.int32 and y.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(y[..., 0], masks)
    data, _, y = load_all(write_pairs(tmp_path / "b", smooth_images(3), masks))
    assert data.num_classes == 1
    np.testing.assert_array_equal(y[..., 0], masks)
    # 1-bit PNGs are binary too
    data, _, y = load_all(write_pairs(tmp_path / "c", smooth_images(3), masks.astype(bool)))
    assert data.num_classes == 1
    np.testing.assert_array_equal(y[..., 0], masks)


@pytest.mark.parametrize("mask_ext", ["png", "tif", "bmp"])
def test_folder_class_index_masks(tmp_path, mask_ext):
    masks = np.random.default_rng(2).integers(0, 4, (3, 16, 16)).astype(np.uint8)
    data, _, y = load_all(write_pairs(tmp_path, smooth_images(3), masks, mask_ext=mask_ext))
    assert data.num_classes == 4
    np.testing.assert_array_equal(y[..., 0], masks)


def test_folder_16bit_class_index_masks(tmp_path):
    masks = np.random.default_rng(3).integers(0, 5, (2, 16, 16)).astype(np.uint16)
    masks[0, 0, 0] = 300  # really needs 16 bits
    data, _, y = load_all(write_pairs(tmp_path, smooth_images(2), masks))
    assert data.num_classes == 301
    np.testing.assert_array_equal(y[..., 0], masks.astype(np.int32))


def test_folder_palette_masks_give_indices_not_colours(tmp_path):
    masks = np.random.default_rng(4).integers(0, 3, (3, 16, 16)).astype(np.uint8)
    palette = [0, 0, 0, 200, 30, 30, 40, 220, 90]
    data, _, y = load_all(write_pairs(tmp_path, smooth_images(3), masks, mode="P", palette=palette))
    assert data.num_classes == 3
    np.testing.assert_array_equal(y[..., 0], masks)


def test_folder_rgb_masks_with_color_map(tmp_path):
    ids = np.random.default_rng(5).integers(0, 3, (3, 16, 16))
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255]], np.uint8)
    color_map = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 128, 255): 2}
    data, _, y = load_all(write_pairs(tmp_path, smooth_images(3), colours[ids]), color_map=color_map)
    assert data.num_classes == 3
    np.testing.assert_array_equal(y[..., 0], ids)
    # TIFF colour masks go through PIL and give the same ids
    write_pairs(tmp_path / "t", smooth_images(3), colours[ids], mask_ext="tif")
    _, _, y = load_all(tmp_path / "t", color_map=color_map)
    np.testing.assert_array_equal(y[..., 0], ids)


def test_folder_resize_bilinear_images_nearest_masks(tmp_path):
    checker = ((np.indices((16, 16)).sum(0) % 2) * 3).astype(np.uint8)  # ids {0, 3}
    masks = np.stack([checker, checker])
    images = np.repeat((checker * 85)[None, ..., None], 2, 0).repeat(3, -1)  # values {0, 255}
    write_pairs(tmp_path, images, masks)
    data, x, y = load_all(tmp_path, image_size=(24, 20), num_classes=4)
    assert data.image_size == (24, 20) and x.shape == (2, 24, 20, 3) and y.shape == (2, 24, 20, 1)
    assert set(np.unique(y)) == {0, 3}  # nearest: no blended labels such as 1 or 2
    assert len(np.unique(x)) > 2 and x.min() >= 0 and x.max() <= 1  # bilinear blends pixels


def test_folder_crop_keeps_image_and_mask_aligned(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (4, 20, 24), dtype=np.uint8)
    write_pairs(tmp_path, images, (images > 128).astype(np.uint8))
    data = from_directory(tmp_path, crop_size=(8, 10), split=(0.5, 0.25, 0.25), batch_size=4, shuffle=False)
    assert data.image_size == (8, 10)
    epochs = []
    for _ in range(2):
        x, y = first_batch(data.train)
        assert x.shape == (2, 8, 10, 1) and y.shape == (2, 8, 10, 1)
        np.testing.assert_array_equal(np.round(x * 255) > 128, y == 1)
        epochs.append(x)
    assert not np.array_equal(epochs[0], epochs[1])  # a new random window each epoch
    again = from_directory(tmp_path, crop_size=(8, 10), split=(0.5, 0.25, 0.25), batch_size=4, shuffle=False)
    np.testing.assert_array_equal(first_batch(again.train)[0], epochs[0])  # same seed, same crops
    x, y = first_batch(data.val)  # centre crop
    (image_path, _), = data.files["val"]
    source = np.asarray(Image.open(image_path))
    np.testing.assert_allclose(x[0, ..., 0], source[6:14, 7:17] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y[0, ..., 0], source[6:14, 7:17] > 128)


def test_folder_split_is_deterministic_and_disjoint(tmp_path):
    write_pairs(tmp_path, smooth_images(20), binary_masks(20))
    data = from_directory(tmp_path, seed=3)
    assert data.counts == {"train": 14, "val": 3, "test": 3}
    assert data.files["skipped"] == []
    parts = [set(data.files[name]) for name in ("train", "val", "test")]
    assert [len(p) for p in parts] == [14, 3, 3]
    names = [f"{i:03d}.png" for i in range(20)]
    assert set().union(*parts) == {(str(tmp_path / "images" / n), str(tmp_path / "masks" / n)) for n in names}
    assert from_directory(tmp_path, seed=3).files == data.files
    assert from_directory(tmp_path, seed=4).files != data.files
    assert sum(int(x.shape[0]) for x, _ in data.val) == 3


def test_folder_train_order_is_deterministic_per_seed(tmp_path):
    write_pairs(tmp_path, smooth_images(12), binary_masks(12))

    def epoch(data):
        return np.concatenate([x.numpy() for x, _ in data.train])

    first = from_directory(tmp_path, seed=7, batch_size=4, split=ALL)
    second = from_directory(tmp_path, seed=7, batch_size=4, split=ALL)
    order = epoch(first)
    np.testing.assert_array_equal(order, epoch(second))
    assert not np.array_equal(order, epoch(first))  # reshuffled next epoch
    assert not np.array_equal(order, epoch(from_directory(tmp_path, seed=8, batch_size=4, split=ALL)))


def test_folder_per_split_folders_used_as_given(tmp_path):
    counts = {"train": 3, "valid": 2, "test": 1}
    for k, (name, count) in enumerate(counts.items()):
        write_pairs(tmp_path / name, smooth_images(count, seed=k), binary_masks(count, seed=k))
    data = from_directory(tmp_path, batch_size=2)
    assert data.counts == {"train": 3, "val": 2, "test": 1}
    valid = tmp_path / "valid"
    assert data.files["val"] == [
        (str(valid / "images" / f"{i:03d}.png"), str(valid / "masks" / f"{i:03d}.png")) for i in range(2)
    ]
    assert all("/train/" in img for img, _ in data.files["train"])
    x, y = first_batch(data.test)
    np.testing.assert_allclose(x[0], smooth_images(1, seed=2)[0] / 255.0, atol=1e-6)


def test_folder_explicit_image_and_mask_folders(tmp_path):
    for i, (image, mask) in enumerate(zip(smooth_images(3), binary_masks(3))):
        save(tmp_path / "x" / f"s{i}.jpg", image)
        save(tmp_path / "y" / f"s{i}.png", mask * 255)
    data = from_directory(images=tmp_path / "x", masks=tmp_path / "y", split=ALL, shuffle=False)
    assert data.files["train"][0] == (str(tmp_path / "x" / "s0.jpg"), str(tmp_path / "y" / "s0.png"))
    assert data.counts["train"] == 3


def test_folder_normalization_mean_std(tmp_path):
    images = smooth_images(2)
    write_pairs(tmp_path, images, binary_masks(2))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    _, x, _ = load_all(tmp_path, normalization=(mean, std))
    np.testing.assert_allclose(x, (images / 255.0 - np.array(mean)) / np.array(std), atol=1e-5)


# ----------------------------------------------------------------------------- folder: errors


def test_folder_missing_folder_and_no_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_directory(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="masks"):
        from_directory(tmp_path)
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"no images found in .*images.*\.png.*\.tif"):
        from_directory(tmp_path)


def test_folder_unpaired_files_named_both_ways(tmp_path):
    write_pairs(tmp_path, smooth_images(3), binary_masks(3))
    save(tmp_path / "images" / "lonely_image.png", smooth_images(1)[0])
    save(tmp_path / "masks" / "lonely_mask.png", binary_masks(1)[0])
    with pytest.raises(ValueError, match="lonely_image.png") as error:
        from_directory(tmp_path)
    assert "lonely_mask.png" in str(error.value) and "skip_invalid" in str(error.value)


def test_folder_unpaired_files_each_listed(tmp_path):
    write_pairs(tmp_path, smooth_images(1), binary_masks(1))
    for i in range(13):
        save(tmp_path / "images" / f"extra{i:02d}.png", smooth_images(1)[0])
    with pytest.raises(ValueError, match=r"13 invalid image/mask pair\(s\)") as error:
        from_directory(tmp_path)
    lines = str(error.value).splitlines()
    for i in range(13):
        assert sum(f"extra{i:02d}.png: image has no mask" in line for line in lines) == 1


def test_folder_corrupt_file_named(tmp_path):
    write_pairs(tmp_path, smooth_images(3), binary_masks(3))
    (tmp_path / "images" / "001.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match=r"001\.png: cannot be read as an image"):
        from_directory(tmp_path, split=ALL)
    write_pairs(tmp_path / "m", smooth_images(3), binary_masks(3))
    (tmp_path / "m" / "masks" / "002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"masks.002\.png: cannot be read as a mask"):
        from_directory(tmp_path / "m", split=ALL)


def test_folder_size_mismatch_named_with_both_sizes(tmp_path):
    write_pairs(tmp_path, smooth_images(3), binary_masks(3))
    save(tmp_path / "masks" / "001.png", binary_masks(1, size=8)[0])
    with pytest.raises(ValueError, match=r"001\.png: mask is 8x8 but image 001\.png is 16x16"):
        from_directory(tmp_path, split=ALL)


def test_folder_mask_values_out_of_range_named(tmp_path):
    masks = binary_masks(3)
    masks[2, 0, 0] = 3
    write_pairs(tmp_path, smooth_images(3), masks)
    with pytest.raises(ValueError, match=r"002\.png: has class ids 3 outside 0\.\.1 \(num_classes=2\)"):
        from_directory(tmp_path, split=ALL, num_classes=2)
    assert from_directory(tmp_path, split=ALL).num_classes == 4  # inferred when not given


def test_folder_unknown_rgb_colour_named(tmp_path):
    colours = np.zeros((3, 16, 16, 3), np.uint8)
    colours[:, :8] = (255, 0, 0)
    colours[1, 0, 0] = (1, 2, 3)
    write_pairs(tmp_path, smooth_images(3), colours)
    with pytest.raises(ValueError, match=r"001\.png: has colours not in color_map: \(1, 2, 3\)"):
        from_directory(tmp_path, split=ALL, color_map={(0, 0, 0): 0, (255, 0, 0): 1})
    with pytest.raises(ValueError, match=r"colour \(RGB\) mask; pass color_map"):
        from_directory(tmp_path, split=ALL)


def test_folder_other_errors(tmp_path):
    write_pairs(tmp_path, smooth_images(3), binary_masks(3))
    with pytest.raises(ValueError, match="part empty"):
        from_directory(tmp_path)  # 3 pairs at 70/15/15: val and test would be empty
    save(tmp_path / "images" / "big.png", smooth_images(1, size=20)[0])
    save(tmp_path / "masks" / "big.png", binary_masks(1, size=20)[0])
    with pytest.raises(ValueError, match=r"different sizes.*big\.png.*image_size=.*crop_size="):
        from_directory(tmp_path, split=ALL)
    assert from_directory(tmp_path, split=ALL, image_size=(16, 16)).image_size == (16, 16)
    write_pairs(tmp_path / "mixed", smooth_images(2), [binary_masks(1)[0] * 255, binary_masks(1)[0] * 2])
    with pytest.raises(ValueError, match=r"ambiguous.*num_classes=1"):
        from_directory(tmp_path / "mixed", split=ALL)


def test_folder_skip_invalid_records_pairs(tmp_path):
    write_pairs(tmp_path, smooth_images(6), binary_masks(6) * 255)
    (tmp_path / "images" / "001.png").write_bytes(b"garbage")
    save(tmp_path / "masks" / "003.png", binary_masks(1, size=8)[0] * 255)
    save(tmp_path / "images" / "orphan.png", smooth_images(1)[0])
    data = from_directory(tmp_path, split=ALL, skip_invalid=True, shuffle=False)
    skipped = dict(data.files["skipped"])
    assert set(skipped) == {
        str(tmp_path / "images" / "001.png"),
        str(tmp_path / "masks" / "003.png"),
        str(tmp_path / "images" / "orphan.png"),
    }
    assert "cannot be read as an image" in skipped[str(tmp_path / "images" / "001.png")]
    assert "no mask" in skipped[str(tmp_path / "images" / "orphan.png")]
    assert data.counts["train"] == 4
    kept = [name.split("/")[-1] for name, _ in data.files["train"]]
    assert kept == ["000.png", "002.png", "004.png", "005.png"]
    x, _ = first_batch(data.train)
    assert x.shape[0] == 4


# ----------------------------------------------------------------------------- arrays


def test_arrays_uint8_and_255_masks():
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    masks = (images[..., :1] > 128).astype(np.uint8) * 255
    data = from_arrays(images, masks, split=ALL, shuffle=False, batch_size=4)
    assert data.num_classes == 1 and data.channels == 3 and data.image_size == (8, 8) and data.files == {}
    batches = list(data.train)
    assert [int(x.shape[0]) for x, _ in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == tf.float32 and y.dtype == tf.int32 and tuple(y.shape) == (4, 8, 8, 1)
    np.testing.assert_allclose(x.numpy(), images[:4] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), masks[:4] // 255)


def test_arrays_float_gray_and_class_ids():
    images = np.random.default_rng(1).random((6, 8, 8)).astype(np.float64)
    masks = np.random.default_rng(2).integers(0, 3, (6, 8, 8))
    data = from_arrays(images, masks, split=ALL, shuffle=False, batch_size=6)
    x, y = first_batch(data.train)
    assert data.channels == 1 and data.num_classes == 3 and x.shape == (6, 8, 8, 1)
    np.testing.assert_allclose(x[..., 0], images, atol=1e-6)
    np.testing.assert_array_equal(y[..., 0], masks)
    assert from_arrays(images, masks, num_classes=5, split=ALL).num_classes == 5


def test_arrays_float_outside_unit_range():
    images = np.random.default_rng(1).random((4, 8, 8, 1)).astype(np.float32) * 100
    masks = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*normalization"):
        from_arrays(images, masks, split=ALL)
    data = from_arrays(images, masks, split=ALL, shuffle=False, normalization=(50.0, 25.0))
    x, _ = first_batch(data.train)
    np.testing.assert_allclose(x, (images - 50) / 25, rtol=1e-5, atol=1e-5)


def test_arrays_validation_errors():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="4 images but 3 masks"):
        from_arrays(images, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="8x8 but masks are 8x6"):
        from_arrays(images, np.zeros((4, 8, 6), np.uint8))
    bad = np.zeros((4, 8, 8), np.uint8)
    bad[2, 1, 1] = 7
    with pytest.raises(ValueError, match=r"values 7 outside .* samples 2"):
        from_arrays(images, bad, num_classes=3, split=ALL)
    with pytest.raises(ValueError, match="non-integer"):
        from_arrays(images, np.full((4, 8, 8), 0.5), split=ALL)
    with pytest.raises(ValueError, match="negative"):
        from_arrays(images, -np.ones((4, 8, 8), np.int32), split=ALL)
    with pytest.raises(ValueError, match="shape"):
        from_arrays(np.zeros((4, 8), np.uint8), np.zeros((4, 8), np.uint8))
    with pytest.raises(ValueError, match="part empty"):
        from_arrays(images[:3], np.zeros((3, 8, 8), np.uint8))


def test_arrays_split_sizes_and_determinism():
    images = np.arange(20, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
    masks = np.zeros((20, 4, 4), np.uint8)

    def ids(ds):
        return [int(round(v * 255)) for x, _ in ds for v in x.numpy()[:, 0, 0, 0]]

    data = from_arrays(images, masks, seed=1, batch_size=32, shuffle=False)
    parts = {name: ids(data[name]) for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 14, "val": 3, "test": 3} == data.counts
    assert sorted(sum(parts.values(), [])) == list(range(20))
    assert parts == {name: ids(from_arrays(images, masks, seed=1, shuffle=False)[name]) for name in parts}
    assert parts["val"] != ids(from_arrays(images, masks, seed=2, shuffle=False).val)
    shuffled = from_arrays(images, masks, seed=1, batch_size=32)
    assert ids(shuffled.train) == ids(from_arrays(images, masks, seed=1, batch_size=32).train)
    assert sorted(ids(shuffled.train)) == parts["train"] != ids(shuffled.train)


def test_arrays_resize_and_crop():
    images = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    masks = (images > 128).astype(np.uint8)
    data = from_arrays(images, masks, image_size=(12, 12), split=ALL, batch_size=4)
    x, y = first_batch(data.train)
    assert x.shape == (4, 12, 12, 1) and y.shape == (4, 12, 12, 1) and set(np.unique(y)) <= {0, 1}
    data = from_arrays(images, masks, crop_size=(6, 5), split=ALL, batch_size=4)
    x, y = first_batch(data.train)
    assert x.shape == (4, 6, 5, 1) and data.image_size == (6, 5)
    np.testing.assert_array_equal(np.round(x * 255) > 128, y == 1)
    with pytest.raises(ValueError, match="larger than the images"):
        from_arrays(images, masks, crop_size=(32, 32), split=ALL)


# ----------------------------------------------------------------------------- tfds


TRIMAP = np.array([[1, 2, 3], [2, 2, 1], [3, 1, 2]], np.uint8)


def test_trimap_mapping_both_modes():
    binary = trimap_to_classes(tf.constant(TRIMAP), "binary").numpy()
    np.testing.assert_array_equal(binary, [[1, 0, 1], [0, 0, 1], [1, 1, 0]])
    trimap = trimap_to_classes(tf.constant(TRIMAP[..., None]), "trimap").numpy()
    np.testing.assert_array_equal(trimap[..., 0], [[1, 0, 2], [0, 0, 1], [2, 1, 0]])
    assert trimap.dtype == np.int32
    with pytest.raises(tf.errors.InvalidArgumentError, match="trimap value"):
        trimap_to_classes(tf.constant([1, 2, 7]), "binary")


def test_lookup_values_for_colour_codes():
    table = masks.check_color_map({(0, 0, 0): 0, (10, 20, 30): 2})
    rgb = tf.constant([[[0, 0, 0], [10, 20, 30]]], tf.uint8)
    np.testing.assert_array_equal(masks.rgb_to_classes(rgb, table).numpy()[..., 0], [[0, 2]])


def test_decode_keeps_the_earlier_import_path():
    homes = (checks, crops, masks, pipeline, readers)
    for name in decode.__all__:
        owners = [module for module in homes if getattr(module, name, None) is getattr(decode, name)]
        assert owners, f"unetpp_tf.data.decode.{name} is not the object of its module"
    for name in ("IMAGE_EXTENSIONS", "check_size", "pil_image_array"):  # what inference and tests import
        assert name in decode.__all__


PET_SIZES = {"train": 20, "test": 6}
SPLIT_TAG = {"train": 0, "test": 200}  # channel 1 of every mock image says which TFDS split it is from


def _mock_pet(sizes=PET_SIZES):
    """`as_dataset_fn` for tfds.testing.mock_data that honours split slices such as "train[:82.3529%]".

    TFDS itself turns the slice into example indices; example k of split s has the value k in
    channel 0 and SPLIT_TAG[s] in channel 1, random sizes and trimap values {1, 2, 3}.
    """
    infos = {name: types.SimpleNamespace(num_examples=count) for name, count in sizes.items()}

    def as_dataset(self, split, *args, **kwargs):
        (part,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
        indices = range(sizes[part.splitname])[part.from_ : part.to]

        def generate():
            rng = np.random.default_rng(0)
            for k in indices:
                height, width = rng.integers(20, 48, 2)
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                image[..., 0], image[..., 1] = k, SPLIT_TAG[part.splitname]
                yield {"image": image, "segmentation_mask": rng.integers(1, 4, (height, width, 1), dtype=np.uint8)}

        signature = {
            "image": tf.TensorSpec([None, None, 3], tf.uint8),
            "segmentation_mask": tf.TensorSpec([None, None, 1], tf.uint8),
        }
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
        return ds.apply(tf.data.experimental.assert_cardinality(len(indices)))

    return as_dataset


def _examples(ds):
    """(TFDS split, example index) of every image of a batched split, read back from channels 1 and 0."""
    found = []
    for x, _ in ds:
        corner = np.round(x.numpy()[:, 0, 0, :2] * 255).astype(int)
        tags = {value: name for name, value in SPLIT_TAG.items()}
        found += [(tags[int(tag)], int(index)) for index, tag in corner]
    return found


@pytest.mark.parametrize("classes, num_classes, ids", [("binary", 1, {0, 1}), ("trimap", 3, {0, 1, 2})])
def test_tfds_mock_pet(classes, num_classes, ids):
    with tfds.testing.mock_data(as_dataset_fn=_mock_pet()):
        data = from_tfds(classes=classes, image_size=(16, 24), batch_size=4)
        assert data.num_classes == num_classes and data.channels == 3 and data.image_size == (16, 24)
        assert "train[:82.3529%]" in data.source and "train[82.3529%:]" in data.source
        parts = {name: _examples(data[name]) for name in ("train", "val", "test")}
        seen = set()
        for x, y in data.train:
            assert x.dtype == tf.float32 and y.dtype == tf.int32
            assert x.shape[1:] == (16, 24, 3) and y.shape[1:] == (16, 24, 1)
            seen |= set(np.unique(y.numpy()).tolist())
        assert seen == ids
    # TFDS "train" cut 0.7 : 0.15 into train and val, TFDS "test" as the test split: disjoint and covering.
    assert data.counts == {"train": 16, "val": 4, "test": 6} == {name: len(found) for name, found in parts.items()}
    assert sorted(parts["train"]) == [("train", k) for k in range(16)]
    assert sorted(parts["val"]) == [("train", k) for k in range(16, 20)]
    assert sorted(parts["test"]) == [("test", k) for k in range(6)]


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.0, 0.2), (0.5, 0.5, 0.0)])
@pytest.mark.parametrize("available", [["train", "test"], ["train"]])
def test_tfds_split_specs_are_disjoint_and_cover_the_data(fractions, available):
    sizes = {"train": 37, "test": 11}
    infos = {name: types.SimpleNamespace(num_examples=sizes[name]) for name in available}
    specs = _split_specs(fractions, available)
    taken = {}
    for part, spec in specs.items():
        if spec is not None:
            (cut,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
            taken[part] = [(cut.splitname, k) for k in range(sizes[cut.splitname])[cut.from_ : cut.to]]
    together = [example for examples in taken.values() for example in examples]
    assert len(together) == len(set(together))  # no example in two parts
    assert set(together) == {(name, k) for name in available for k in range(sizes[name])}  # each in one
    if available == ["train"]:  # one TFDS split cut three ways, as the fractions say
        for part, fraction in zip(("train", "val", "test"), fractions):
            assert abs(len(taken.get(part, [])) - fraction * sizes["train"]) < 1


def test_tfds_mock_default_generator_and_guards():
    with tfds.testing.mock_data(num_examples=3):  # random masks 0..255, random shapes
        data = from_tfds(classes="auto", num_classes=256, image_size=(8, 8), batch_size=3, crop_size=(6, 6))
        x, y = first_batch(data.val)
        assert x.shape == (3, 6, 6, 3) and y.shape == (3, 6, 6, 1) and y.max() <= 255
        data = from_tfds(image_size=(8, 8), batch_size=3)  # "binary" on values outside {1, 2, 3}
        with pytest.raises(tf.errors.InvalidArgumentError, match="trimap|mask value"):
            first_batch(data.test)
    with pytest.raises(ValueError, match="classes='auto'"):
        from_tfds("some_other_dataset", classes="binary")
    with pytest.raises(ValueError, match="num_classes"):
        from_tfds(classes="auto")
    with pytest.raises(ValueError, match="image_size"):
        from_tfds(image_size=None)


def test_tfds_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tfds.builder_cls("oxford_iiit_pet"), "download_and_prepare", offline)
    with pytest.raises(ValueError, match=r"could not download and prepare TFDS dataset 'oxford_iiit_pet'.*data_dir="):
        from_tfds(data_dir=str(tmp_path))
