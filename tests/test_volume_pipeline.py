"""from_volumes: patches and 2.5D slabs cut from whole scans, foreground sampling, seeds, grouped splits, files."""

import nibabel
import numpy as np
import pytest

from unetpp_tf.data.augment3d import VolumeAugmenter
from unetpp_tf.data.volume_pipeline import from_volumes
from unetpp_tf.data.volumes import Volume, apply_window

SPLIT = (0.6, 0.2, 0.2)


def _coded(shape, offset=0.0, channels=1):
    """An image whose voxel (z, y, x, c) holds offset + 10000 z + 100 y + x + 0.5 c: every window is recognisable."""
    z, y, x, c = np.meshgrid(*(np.arange(n) for n in (*shape, channels)), indexing="ij")
    return (offset + 10000 * z + 100 * y + x + 0.5 * c).astype(np.float32)


def _scans(count=5, shape=(10, 20, 22), channels=1):
    """Scans with a labelled box (class 1) and one voxel of class 2, well inside every scan."""
    out = []
    for index in range(count):
        label = np.zeros(shape, np.uint8)
        zc, yc, xc = (n // 2 for n in shape)
        label[zc - 1 : zc + 1, yc - 2 : yc + 2, xc - 2 : xc + 2] = 1
        label[zc, yc + 3, xc - 4] = 2
        image = _coded(shape, offset=1e6 * index, channels=channels)
        out.append(Volume(image, label, (2.0, 1.0, 1.0), np.eye(4), f"scan{index}"))
    return out


def _decode(values):
    """(scan, z, y, x) of coded voxel values."""
    values = np.asarray(values, np.float64)
    scan, rest = np.divmod(np.round(values), 1e6)
    z, rest = np.divmod(rest, 10000)
    y, x = np.divmod(rest, 100)
    return scan.astype(int), z.astype(int), y.astype(int), x.astype(int)


def _epoch(dataset):
    return [tuple(np.asarray(t) for t in batch) for batch in dataset]


def test_3d_patches_are_windows_of_one_scan_with_their_labels_and_the_split_is_by_scan():
    scans = _scans()
    data = from_volumes(volumes=scans, patch_size=(4, 8, 8), window=None, split=SPLIT, patches_per_volume=3)
    assert (data.image_size, data.channels, data.num_classes, data.source) == ((4, 8, 8), 1, 3, "volumes:memory")
    assert data.counts == {"train": 9, "val": 3, "test": 3} and data.files == {}
    names = {split: [v.name for v in data.volumes[split]] for split in ("train", "val", "test")}
    assert sorted(sum(names.values(), [])) == [f"scan{i}" for i in range(5)]  # every scan in exactly one split
    by_name = {v.name: v for v in scans}
    for split in ("train", "val", "test"):
        batches = _epoch(data[split])
        assert sum(len(images) for images, _ in batches) == data.counts[split]
        for images, masks in batches:
            assert images.shape[1:] == (4, 8, 8, 1) and masks.shape[1:] == (4, 8, 8, 1) and masks.dtype == np.int32
            for image, mask in zip(images[..., 0], masks[..., 0]):
                scan, z, y, x = _decode(image)
                assert len(np.unique(scan)) == 1 and f"scan{scan[0, 0, 0]}" in names[split]
                np.testing.assert_array_equal(z - z[0, 0, 0], np.arange(4)[:, None, None] + 0 * z)  # one window
                np.testing.assert_array_equal(x - x[0, 0, 0], np.arange(8)[None, None, :] + 0 * x)
                np.testing.assert_array_equal(mask, by_name[f"scan{scan[0, 0, 0]}"].label[z, y, x])


def test_foreground_patches_are_centred_on_labelled_voxels_of_each_class():
    data = from_volumes(volumes=_scans(), patch_size=(3, 5, 5), window=None, split=SPLIT, patches_per_volume=40,
                        foreground_share=1.0, batch_size=8)
    centres = np.concatenate([masks[:, 1, 2, 2, 0] for _, masks in _epoch(data.train)])
    assert len(centres) == 120 and np.all(centres > 0)
    assert 0.3 < np.mean(centres == 2) < 0.7  # a class, then a voxel: the one-voxel class is centred half the time
    uniform = from_volumes(volumes=_scans(), patch_size=(3, 5, 5), window=None, split=SPLIT, patches_per_volume=40,
                           foreground_share=0.0, batch_size=8)
    assert np.mean(np.concatenate([m[:, 1, 2, 2, 0] for _, m in _epoch(uniform.train)]) > 0) < 0.15


def test_same_seed_same_patches_new_patches_each_epoch_and_fixed_validation():
    def make(seed=0, **kwargs):
        return from_volumes(volumes=_scans(), patch_size=(4, 8, 8), window=None, split=SPLIT, seed=seed, **kwargs)

    data = make()
    epochs = [_epoch(data.train), _epoch(data.train)]
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(*epochs))  # new patches in the second epoch
    repeated = [tuple(np.asarray(t) for t in batch) for batch in make().train.repeat().take(2 * len(epochs[0]))]
    for got, want in zip(repeated, epochs[0] + epochs[1]):  # the training loop's data.train.repeat() stream
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    skipped = next(iter(make().train.repeat().skip(len(epochs[0]))))
    np.testing.assert_array_equal(np.asarray(skipped[0]), epochs[1][0][0])
    other = _epoch(make(seed=1).train)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(other, epochs[0]))
    val = [_epoch(data.val), _epoch(make().val)]
    for a, b in zip(*val):
        np.testing.assert_array_equal(a[0], b[0])
    augmented = [_epoch(make(augment=VolumeAugmenter(rotation=0.05, seed=0)).train) for _ in range(2)]
    np.testing.assert_array_equal(augmented[0][0][0], augmented[1][0][0])  # host augmentation seeded per batch
    assert not np.array_equal(augmented[0][0][0], epochs[0][0][0])


def test_a_scan_smaller_than_the_patch_is_refused_by_name_unless_padding_is_asked_for():
    scans = _scans(count=3, shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"patch_size 5 x 8 x 8 is larger than 3 scan\(s\).*3 x 8 x 8 voxels.*"
                                         r"e\.g\. 3 x 8 x 8"):
        from_volumes(volumes=scans, patch_size=(5, 8, 8), window=None, split=(1 / 3, 1 / 3, 1 / 3))


def test_a_scan_smaller_than_the_patch_is_padded_with_its_minimum_and_label_zero():
    scans = _scans(count=3, shape=(3, 8, 8))
    for scan in scans:
        scan.image += 5.0
    data = from_volumes(volumes=scans, patch_size=(5, 8, 8), window=None, split=(1 / 3, 1 / 3, 1 / 3),
                        pad_small_scans=True)
    images, masks = _epoch(data.val)[0]
    minimum = data.volumes["val"][0].image.min()
    for image, mask in zip(images[..., 0], masks[..., 0]):
        np.testing.assert_array_equal(image[0], minimum)  # centred: one padded slice above, one below
        np.testing.assert_array_equal(image[4], minimum)
        np.testing.assert_array_equal(mask[[0, 4]], 0)
        np.testing.assert_array_equal(image[1:4], data.volumes["val"][0].image[..., 0])
    for images, _ in _epoch(data.train):
        assert images.shape[1:] == (5, 8, 8, 1)


def test_25d_slabs_stack_neighbouring_slices_slice_by_slice_with_the_centre_mask():
    scans = _scans(count=5, shape=(6, 12, 12), channels=2)
    data = from_volumes(volumes=scans, mode="2.5d", patch_size=(8, 8), slices=3, window=None, split=SPLIT,
                        batch_size=4)
    assert (data.image_size, data.channels) == ((8, 8), 6)
    assert data.counts["val"] == 6 and data.counts["train"] == 3 * 32  # every slice of a val scan; 32 per train scan
    val_scan = data.volumes["val"][0]
    slabs = np.concatenate([images for images, _ in _epoch(data.val)])
    masks = np.concatenate([masks for _, masks in _epoch(data.val)])
    for z in range(6):
        want = np.concatenate([val_scan.image[k, 2:10, 2:10] for k in (max(z - 1, 0), z, min(z + 1, 5))], axis=-1)
        np.testing.assert_array_equal(slabs[z], want)  # centre crop, end slice repeated at the edges
        np.testing.assert_array_equal(masks[z, ..., 0], val_scan.label[z, 2:10, 2:10])
    for images, masks in _epoch(data.train):
        scan, z, y, x = _decode(images[..., 2])  # channel 0 of the centre slice
        label = {v.name: v.label for v in data.volumes["train"]}
        for i in range(len(images)):
            np.testing.assert_array_equal(masks[i, ..., 0], label[f"scan{scan[i, 0, 0]}"][z[i], y[i], x[i]])
    flat = from_volumes(volumes=scans, mode="2d", patch_size=(64, 8, 8), window=None, split=SPLIT)
    assert (flat.image_size, flat.channels) == ((8, 8), 2)


def test_classes_are_inferred_or_checked_against_every_scan():
    scans = _scans(count=3)
    binary = [Volume(s.image, (s.label > 0).astype(np.uint8), s.spacing, s.affine, s.name) for s in scans]
    assert from_volumes(volumes=binary, window=None, patch_size=8, split=(1 / 3, 1 / 3, 1 / 3)).num_classes == 1
    with pytest.raises(ValueError, match=r"scan0 \(max 2\).*num_classes=2"):
        from_volumes(volumes=scans, window=None, patch_size=8, split=(1 / 3, 1 / 3, 1 / 3), num_classes=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_size=(8, 8)), r"patch_size \(8, 8\) has 2 number\(s\) but mode '3d'"),
        (dict(mode="2.5d", patch_size=(2, 8, 8, 8)), r"patch_size .* mode '2.5d' cuts \(height, width\)"),
        (dict(mode="2.5d", patch_size=8, slices=4), "slices must be an odd positive integer"),
        (dict(mode="2.5d", patch_size=8, slices=0), "slices must be an odd positive integer"),
        (dict(mode="volume"), "mode must be one of"),
        (dict(foreground_share=1.5), r"foreground_share must be a fraction in \[0, 1\]"),
        (dict(split=(0.8, 0.1, 0.1)), r"of 3 scan\(s\) leaves a part without scans"),
        (dict(window="lungs"), "unknown window 'lungs'"),
        (dict(spacing=(1.0, 0.0, 1.0)), "spacing must be a positive voxel size"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_volumes(volumes=_scans(count=3), **{"patch_size": 8, "window": None, **kwargs})


def test_bad_scans_are_named():
    scans = _scans(count=3)
    scans[1].label = None
    with pytest.raises(ValueError, match="scan 'scan1' has no label volume"):
        from_volumes(volumes=scans, window=None, patch_size=8, split=(1 / 3, 1 / 3, 1 / 3))
    scans = _scans(count=3)
    scans[2].label = scans[2].label[:-1]
    with pytest.raises(ValueError, match=r"scan 'scan2': label shape \(9, 20, 22\) does not match"):
        from_volumes(volumes=scans, window=None, patch_size=8, split=(1 / 3, 1 / 3, 1 / 3))


def test_files_are_read_resampled_windowed_and_recorded_per_split(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for index in range(4):
        hu = rng.uniform(-1000, 400, (8, 12, 10)).astype(np.float32)  # (z, y, x)
        label = np.zeros((8, 12, 10), np.uint8)
        label[2:6, 3:9, 2:8] = 1
        affine = np.diag([1.0, 1.0, 2.0, 1.0])  # x, y, z (RAS) voxel sizes 1, 1, 2 mm
        for folder, array in (("images", hu), ("masks", label)):
            path = tmp_path / folder / f"case{index}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(array.transpose(2, 1, 0), affine), path)
    kwargs = dict(patch_size=(4, 8, 8), window="lung", split=(0.5, 0.25, 0.25))
    data = from_volumes(tmp_path, **kwargs)
    assert data.source == f"volumes:{tmp_path}" and data.num_classes == 1
    for split in ("train", "val", "test"):
        assert [_scan_name(image) for image, _ in data.files[split]] == [v.name for v in data.volumes[split]]
        for image, label in data.files[split]:
            assert isinstance(image, str) and image.endswith(".nii.gz") and "masks" in label
    volume = data.volumes["train"][0]
    raw = nibabel.load(data.files["train"][0][0]).get_fdata().transpose(2, 1, 0)[..., None]
    np.testing.assert_allclose(volume.image, apply_window(raw, "lung"), atol=1e-6)  # windowed to [0, 1]
    again = from_volumes(splits=data.files, **kwargs)
    assert again.files == data.files
    fine = from_volumes(tmp_path, spacing=(1.0, 1.0, 1.0), **kwargs)
    assert fine.volumes["train"][0].spacing == pytest.approx((1.0, 1.0, 1.0))
    assert fine.volumes["train"][0].image.shape == (16, 12, 10, 1)
    images, masks = next(iter(fine.train))
    assert images.shape == (2, 4, 8, 8, 1) and 0.0 <= float(np.min(images)) and float(np.max(images)) <= 1.0


def _scan_name(path):
    """The scan name of a NIfTI path (its file name without .nii.gz)."""
    return str(path).rsplit("/", 1)[-1][: -len(".nii.gz")]
