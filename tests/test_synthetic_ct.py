"""The built-in synthetic chest CT: anatomy in Hounsfield units, labels, seeding, NIfTI files."""

import importlib

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from unetpp_tf.data.medical_io import read_scan_pair, scan_pairs
from unetpp_tf.data.synthetic_ct import synthetic_ct, synthetic_scan, write_synthetic_ct

SMALL = dict(shape=(24, 64, 64), spacing=(2.5, 1.25, 1.25))


@pytest.fixture(scope="module")
def scans():
    return synthetic_ct(3, seed=0)


def test_default_scans_are_anisotropic_ct_with_three_classes(scans):
    for scan in scans:
        assert scan.image.shape == (48, 128, 128, 1) and scan.image.dtype == np.float32
        assert scan.label.shape == (48, 128, 128) and scan.label.dtype == np.uint8
        assert scan.spacing == (2.5, 1.25, 1.25) and scan.source == {}
        np.testing.assert_allclose(scan.affine[:3, :3], [[0, 0, 1.25], [0, 1.25, 0], [2.5, 0, 0]])
        assert set(np.unique(scan.label)) == {0, 1, 2}
        image = scan.image[..., 0]
        np.testing.assert_array_equal(image, np.round(image))  # integer HU, like stored CT
        assert -1024 <= image.min() and image.max() <= 3071


def test_hounsfield_units_of_air_body_lung_vessels_and_nodules(scans):
    for scan in scans:
        image, label = scan.image[..., 0], scan.label
        corners = image[:, :6, :6]
        assert abs(np.mean(corners) + 1000) < 25  # air around the body
        body = image[(label == 0) & (image > -300) & (image < 300)]
        assert 20 < np.median(body) < 60  # soft tissue ~40 HU
        lung = image[label == 1]
        assert -900 < np.median(lung) < -780  # parenchyma ~-850 HU
        vessels = (label == 1) & (image > -300)  # bright, tubular, inside the lung, labelled lung
        assert 0.01 < vessels.sum() / (label == 1).sum() < 0.2
        components, count = ndimage.label(label == 2)
        assert 1 <= count <= 4
        for k in range(1, count + 1):
            nodule = components == k
            diameter = (nodule.sum() * np.prod(scan.spacing) * 6 / np.pi) ** (1 / 3)
            assert 2.5 <= diameter <= 16.0  # 3..15 mm, less where the lung wall cuts it
            core = ndimage.binary_erosion(nodule)
            if core.sum() >= 8:
                assert np.mean(image[core]) > -150  # solid, +20..+60 HU before the blur


def test_nodules_touch_vessels_or_the_wall_in_some_scans(scans):
    touching_wall = touching_vessel = free = 0
    for scan in scans:
        image, label = scan.image[..., 0], scan.label
        bright, _ = ndimage.label((image > -400) & (label != 0))  # vessels and nodules, connected
        components, count = ndimage.label(label == 2)
        for k in range(1, count + 1):
            nodule = components == k
            ring = ndimage.binary_dilation(nodule) & ~nodule
            wall = bool(np.any(label[ring] == 0))
            joined = np.setdiff1d(np.unique(bright[nodule]), [0])
            vessel = np.sum(np.isin(bright, joined) & ~ndimage.binary_dilation(nodule, iterations=3)) > 8
            touching_wall += wall
            touching_vessel += vessel
            free += not (wall or vessel)
    assert touching_wall >= 1 and touching_vessel >= 1 and free >= 1


def test_scans_are_seeded_and_varied():
    a, b = synthetic_ct(2, seed=5, **SMALL)
    again = synthetic_scan(1, seed=5, **SMALL)
    np.testing.assert_array_equal(again.image, b.image)
    np.testing.assert_array_equal(again.label, b.label)
    assert not np.array_equal(a.label, b.label)
    assert not np.array_equal(synthetic_scan(1, seed=6, **SMALL).label, b.label)
    with pytest.raises(ValueError, match="num_scans must be a positive integer"):
        synthetic_ct(0)


def test_written_files_read_back_to_the_same_scans(tmp_path):
    directory = write_synthetic_ct(tmp_path / "ct", 2, seed=1, **SMALL)
    assert directory == tmp_path / "ct"
    pairs = scan_pairs(directory)
    assert [(i.name, m.name) for i, m in pairs] == [("ct_000.nii.gz",) * 2, ("ct_001.nii.gz",) * 2]
    image = nib.load(pairs[0][0])
    assert image.get_data_dtype() == np.int16 and nib.load(pairs[0][1]).get_data_dtype() == np.uint8
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # stored LPS: reading must reorient
    np.testing.assert_allclose(image.header.get_zooms(), (1.25, 1.25, 2.5))
    assert int(image.header["sform_code"]) == 1
    for (image_path, mask_path), scan in zip(pairs, synthetic_ct(2, seed=1, **SMALL)):
        volume = read_scan_pair(image_path, mask_path)
        np.testing.assert_array_equal(volume.image, scan.image)
        np.testing.assert_array_equal(volume.label, scan.label)
        np.testing.assert_allclose(volume.affine, scan.affine, atol=1e-6)


def test_writing_is_deterministic_cached_and_drops_stale_scans(tmp_path):
    tiny = dict(shape=(16, 48, 48), spacing=(2.5, 1.25, 1.25))
    first = write_synthetic_ct(tmp_path / "a", 2, seed=2, **tiny)
    other = write_synthetic_ct(tmp_path / "b", 2, seed=2, **tiny)
    names = sorted(p.name for p in (first / "images").iterdir())
    assert names == ["ct_000.nii.gz", "ct_001.nii.gz"]
    for folder in ("images", "masks"):
        for name in names:
            assert (first / folder / name).read_bytes() == (other / folder / name).read_bytes()
    stamp = (first / "images" / "ct_000.nii.gz").stat().st_mtime_ns
    write_synthetic_ct(first, 2, seed=2, **tiny)  # same parameters: nothing rewritten
    assert (first / "images" / "ct_000.nii.gz").stat().st_mtime_ns == stamp
    write_synthetic_ct(first, 1, seed=2, **tiny)
    assert sorted(p.name for p in (first / "masks").iterdir()) == ["ct_000.nii.gz"]
    assert not [p for p in first.rglob("*") if p.name.startswith(".partial-")]


def test_a_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    synthetic_module = importlib.import_module("unetpp_tf.data.synthetic_ct")  # the package re-exports the function

    calls = []
    real = synthetic_module.write_volume_files

    def fail_on_second(volume, image_path, label_path=None):
        calls.append(volume.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(volume, image_path, label_path)

    monkeypatch.setattr(synthetic_module, "write_volume_files", fail_on_second)
    with pytest.raises(OSError):
        write_synthetic_ct(tmp_path / "ct", 2, seed=0, shape=(8, 16, 16))
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []
