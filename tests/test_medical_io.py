"""Reading and writing scans on the real example files that nibabel and pydicom ship, and bad input."""

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest

from unetpp_tf.data.medical_io import (
    canonical_transform,
    is_scan_folder,
    read_scan,
    read_scan_pair,
    scan_pairs,
    write_scan,
)
from unetpp_tf.data.volumes import resample

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
DICOM_SERIES = CT_SMALL.parent / "dicomdirtests"


def nibabel_file(name):
    path = NIBABEL_DATA / name
    assert path.is_file(), f"nibabel's wheel ships {name} in nibabel/tests/data; reinstall nibabel from PyPI"
    return path


def dicom_folder(*parts):
    path = DICOM_SERIES.joinpath(*parts)
    assert path.is_dir(), f"pydicom's wheel ships the {'/'.join(parts)} series in its test files; reinstall pydicom"
    return path


def voxel_world(affine, index):
    return np.asarray(affine)[:3, :3] @ np.asarray(index, float) + np.asarray(affine)[:3, 3]


def canonical_index(volume, file_affine, file_index):
    """The index in `volume`'s array of the file voxel `file_index` (through world coordinates)."""
    world = voxel_world(file_affine, file_index)
    index = np.linalg.solve(volume.affine[:3, :3], world - volume.affine[:3, 3])
    np.testing.assert_allclose(index, np.round(index), atol=1e-4)  # lands on a voxel centre
    return tuple(int(i) for i in np.round(index))


def test_nifti_las_file_is_read_in_the_canonical_orientation():
    path = nibabel_file("anatomical.nii")  # 33 x 41 x 25, 2 mm, stored LAS
    source = nib.load(path)
    data = source.get_fdata()
    volume = read_scan(path)
    assert volume.image.shape == (25, 41, 33, 1) and volume.image.dtype == np.float32
    assert volume.spacing == (2.0, 2.0, 2.0) and volume.name == "anatomical"
    # Array axes (z, y, x) run towards S, A, R: the affine's columns point along +S, +A, +R.
    np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, 2], [0, 2, 0], [2, 0, 0]])
    rng = np.random.default_rng(0)
    for file_index in zip(*[rng.integers(0, n, 20) for n in data.shape]):
        z, y, x = canonical_index(volume, source.affine, file_index)
        assert volume.image[z, y, x, 0] == data[file_index]


def test_write_scan_restores_the_file_grid_of_a_non_canonical_file(tmp_path):
    source = nib.load(nibabel_file("anatomical.nii"))
    data = np.asarray(source.dataobj)
    # A non-canonical copy: axes permuted (k, i, j), the first two reversed, same world positions.
    moved = np.flip(np.transpose(data, (2, 0, 1)), (0, 1))
    index = np.zeros((4, 4))
    index[2, 0], index[0, 1], index[1, 2], index[3, 3] = -1, -1, 1, 1
    index[2, 3], index[0, 3] = data.shape[2] - 1, data.shape[0] - 1
    affine = source.affine @ index  # moved voxel -> original voxel -> world
    odd = nib.Nifti1Image(moved, affine)
    nib.save(odd, tmp_path / "odd.nii.gz")
    assert nib.aff2axcodes(affine) == ("I", "R", "A")
    volume, reference = read_scan(tmp_path / "odd.nii.gz"), read_scan(nibabel_file("anatomical.nii"))
    np.testing.assert_array_equal(volume.image, reference.image)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-5)
    assert canonical_transform(affine) == (volume.source["axes"], volume.source["flips"])

    label = (volume.image[..., 0] > 60).astype(np.uint8)
    written = nib.load(write_scan(label, tmp_path / "pred.nii.gz", like=volume))
    assert written.shape == moved.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)  # every voxel keeps its world position
    np.testing.assert_array_equal(np.asarray(written.dataobj), (moved > 60).astype(np.uint8))
    assert int(written.header["sform_code"]) == int(odd.header["sform_code"])


def test_4d_oblique_nifti_gives_channels_and_writes_probabilities_back(tmp_path):
    path = nibabel_file("example4d.nii.gz")  # 128 x 96 x 24 x 2, oblique
    source = nib.load(path)
    volume = read_scan(path)
    assert volume.image.shape == (24, 96, 128, 2)
    np.testing.assert_allclose(volume.spacing, source.header.get_zooms()[:3][::-1], rtol=1e-5)
    data = source.get_fdata()
    z, y, x = canonical_index(volume, source.affine, (5, 7, 3))
    np.testing.assert_allclose(volume.image[z, y, x], data[5, 7, 3])
    probabilities = volume.image / volume.image.max()
    written = nib.load(write_scan(probabilities, tmp_path / "p.nii.gz", like=volume, order=1))
    assert written.shape == (128, 96, 24, 2) and written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(written.dataobj), data / data.max(), atol=1e-6)


def test_resampled_prediction_goes_back_onto_the_file_grid(tmp_path):
    source = nib.load(nibabel_file("anatomical.nii"))
    volume = read_scan(nibabel_file("anatomical.nii"))
    truth = (np.asarray(source.dataobj) > 60).astype(np.uint8)
    volume.label = (volume.image[..., 0] > 60).astype(np.uint8)
    fine = resample(volume, (1.0, 1.0, 1.0))  # exactly twice as fine: nearest there and back is lossless
    assert fine.image.shape[:3] == (50, 82, 66)
    written = nib.load(write_scan(fine.label, tmp_path / "fine.nii.gz", like=fine))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), truth)
    coarse = resample(volume, (3.0, 3.0, 3.0))  # lossy: the outline moves by up to a voxel
    back = np.asarray(nib.load(write_scan(coarse.label, tmp_path / "coarse.nii.gz", like=coarse)).dataobj)
    assert back.shape == truth.shape
    assert 2 * np.sum(back * truth) / (back.sum() + truth.sum()) > 0.9
    linear = write_scan(coarse.image, tmp_path / "image.nii.gz", like=coarse, order=1)
    assert nib.load(linear).shape == truth.shape + (1,)


def test_volume_from_arrays_is_written_with_its_own_affine(tmp_path):
    from unetpp_tf.data.volumes import Volume

    affine = np.array([[0, 0, 0.8, -10], [0, 0.8, 0, 4], [3.0, 0, 0, 7], [0, 0, 0, 1]], float)
    labels = np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3
    like = Volume(np.zeros((4, 5, 6, 1)), None, (3.0, 0.8, 0.8), affine, "a")
    written = nib.load(write_scan(labels, tmp_path / "a.nii", like=like))
    assert written.shape == (6, 5, 4)
    back = read_scan(tmp_path / "a.nii")
    np.testing.assert_array_equal(back.image[..., 0], labels)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)


def test_dicom_file_hounsfield_units_and_geometry():
    dataset = pydicom.dcmread(CT_SMALL)
    volume = read_scan(CT_SMALL)
    assert volume.image.shape == (1, 128, 128, 1) and volume.name == "CT_small"
    hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    # Rows run towards P and columns towards L (LPS): both reversed in the canonical (A, R) axes.
    np.testing.assert_array_equal(volume.image[0, :, :, 0], hu[::-1, ::-1])
    assert volume.image.min() == dataset.pixel_array.min() - 1024
    assert volume.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    # World (RAS) of pixel (row r, column c): ImagePositionPatient + c * dx * X + r * dy * Y, LPS -> RAS.
    r, c = 10, 30
    lps = np.array(dataset.ImagePositionPatient, float) + c * 0.661468 * np.array([1, 0, 0]) + r * 0.661468 * np.array(
        [0, 1, 0])
    ras = lps * [-1, -1, 1]
    np.testing.assert_allclose(voxel_world(volume.affine, (0, 127 - r, 127 - c)), ras, atol=1e-4)


def test_dicom_series_slices_sorted_along_the_normal(tmp_path):
    folder = dicom_folder("98892001", "CT5N")  # 5 slices, 2.5 mm apart, file names in descending z
    files = sorted(folder.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    heights = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert heights == sorted(heights, reverse=True)
    volume = read_scan(folder)
    assert volume.image.shape == (5, 16, 16, 1) and volume.name == "CT5N"
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    for z, dataset in enumerate(datasets[::-1]):  # z grows towards S: lowest slice first
        expected = dataset.pixel_array.astype(np.float32) - 1024
        np.testing.assert_array_equal(volume.image[z, :, :, 0], expected[::-1, ::-1])
        assert voxel_world(volume.affine, (z, 15, 15))[2] == pytest.approx(float(dataset.ImagePositionPatient[2]))
    # The order comes from the positions, not the file names.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, path in enumerate(files):
        shutil.copy(path, shuffled / f"{(i * 3) % 5}.dcm")
    np.testing.assert_array_equal(read_scan(shuffled).image, volume.image)
    assert is_scan_folder(tmp_path.parent) is False


def test_dicom_series_with_missing_slices_is_refused(tmp_path):
    with pytest.raises(ValueError, match="CT2 has uneven slice gaps.*17106 -> 17136: 202.500 mm"):
        read_scan(dicom_folder("77654033", "CT2"))  # pydicom's own series: 1 slice far below the others
    copy = tmp_path / "gap"
    shutil.copytree(dicom_folder("98892001", "CT5N"), copy)
    (copy / "2693").unlink()
    with pytest.raises(ValueError, match="missing slices.*3023 -> 2392: 5.000 mm"):
        read_scan(copy)


def test_dicom_series_with_duplicated_slices_is_refused(tmp_path):
    copy = tmp_path / "dup"
    shutil.copytree(dicom_folder("98892001", "CT5N"), copy)
    shutil.copy(copy / "2693", copy / "2693_again")
    with pytest.raises(ValueError, match=r"dup has duplicated slice positions: 2693 and 2693_again \(at 3.76"):
        read_scan(copy)


def test_dicom_mixed_orientations_and_several_series_are_refused():
    with pytest.raises(ValueError, match="CT2N mixes slice orientations.*6924"):
        read_scan(dicom_folder("98892001", "CT2N"))
    with pytest.raises(ValueError, match="MR2 holds 3 series; put each series in its own folder"):
        read_scan(dicom_folder("98892003", "MR2"))
    with pytest.raises(FileNotFoundError, match="98892001 holds no DICOM image files .*CT2N, CT5N do: pass one"):
        read_scan(dicom_folder("98892001"))


def test_nifti_without_spatial_affine_is_refused_unless_allowed(tmp_path):
    source = nib.load(nibabel_file("anatomical.nii"))
    bare = nib.Nifti1Image(np.asarray(source.dataobj), None)
    bare.header.set_zooms((2.0, 2.0, 2.0))
    nib.save(bare, tmp_path / "bare.nii.gz")
    assert int(bare.header["qform_code"]) == int(bare.header["sform_code"]) == 0
    with pytest.raises(ValueError, match="bare.nii.gz has no spatial affine.*allow_missing_affine=True"):
        read_scan(tmp_path / "bare.nii.gz")
    volume = read_scan(tmp_path / "bare.nii.gz", allow_missing_affine=True)
    assert volume.spacing == (2.0, 2.0, 2.0)
    written = nib.load(write_scan(volume.image[..., 0] > 60, tmp_path / "out.nii.gz", like=volume))
    assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 0  # stays without one
    np.testing.assert_allclose(written.affine, nib.load(tmp_path / "bare.nii.gz").affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj) > 60)


def save_label(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_label_pairs_checked_on_the_image_grid(tmp_path):
    image = nibabel_file("anatomical.nii")  # LAS
    source = nib.load(image)
    data = (np.asarray(source.dataobj) > 60).astype(np.uint8)
    # The same grid stored RAS (x reversed): accepted and aligned voxel for voxel.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    ras = save_label(tmp_path / "ras.nii.gz", data[::-1].copy(), source.affine @ flip)
    volume = read_scan_pair(image, ras)
    assert volume.label.dtype == np.uint8
    np.testing.assert_array_equal(volume.label, (volume.image[..., 0] > 60).astype(np.uint8))
    shifted = source.affine.copy()
    shifted[:3, 3] += 0.05  # a rounding-sized difference is tolerated (0.2 mm for 2 mm voxels)
    read_scan_pair(image, save_label(tmp_path / "near.nii.gz", data, shifted))
    shifted[:3, 3] += 1.0
    with pytest.raises(ValueError, match="label .*far.nii.gz does not match its image .*anatomical.nii.*1.82 mm"):
        read_scan_pair(image, save_label(tmp_path / "far.nii.gz", data, shifted))
    with pytest.raises(ValueError, match=r"short.nii.gz does not match .*\(24, 41, 33\) voxels against \(25, 41, 33\)"):
        read_scan_pair(image, save_label(tmp_path / "short.nii.gz", data[..., 1:], source.affine))


def test_label_values_must_be_integer_class_ids(tmp_path):
    image = nibabel_file("anatomical.nii")
    affine = nib.load(image).affine
    values = np.zeros((33, 41, 25), np.float32)
    values[3, 4, 5] = 0.5
    with pytest.raises(ValueError, match=r"label .*soft.nii.gz holds non-integer values \(e.g. 0.5\)"):
        read_scan_pair(image, save_label(tmp_path / "soft.nii.gz", values, affine))
    values[3, 4, 5] = 2.0  # whole numbers stored as float are fine
    assert read_scan_pair(image, save_label(tmp_path / "ok.nii.gz", values, affine)).label.max() == 2


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r'pip install "unetpp-tf\[medical\]"'):
        read_scan(tmp_path / "a.nii.gz")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'pip install "unetpp-tf\[medical\]"'):
        read_scan(CT_SMALL)


def test_write_scan_refuses_other_grids_and_formats(tmp_path):
    volume = read_scan(nibabel_file("anatomical.nii"))
    with pytest.raises(ValueError, match=r"shape \(25, 41\) .* the \(25, 41, 33\) grid of volume 'anatomical'"):
        write_scan(np.zeros((25, 41)), tmp_path / "a.nii.gz", like=volume)
    with pytest.raises(ValueError, match="a.png must end in .nii.gz"):
        write_scan(np.zeros((25, 41, 33)), tmp_path / "a.png", like=volume)
    assert not list(tmp_path.iterdir())


def touch_nifti(path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), path)


def test_scan_pairs_by_name_and_one_error_for_all_unmatched(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a.nii.gz", "b.nii", "c_0000.nii.gz", "d.nii.gz"):
        touch_nifti(images / name)
    shutil.copytree(dicom_folder("98892001", "CT5N"), images / "series1")
    for name in ("a.nii.gz", "b_seg.nii.gz", "c.nii.gz", "d-mask.nii.gz", "series1.nii.gz"):
        touch_nifti(masks / name)
    (images / "notes.txt").write_text("not a scan")
    pairs = scan_pairs(tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.nii.gz", "a.nii.gz"), ("b.nii", "b_seg.nii.gz"), ("c_0000.nii.gz", "c.nii.gz"),
        ("d.nii.gz", "d-mask.nii.gz"), ("series1", "series1.nii.gz")]
    assert scan_pairs(images=images, masks=masks) == pairs
    assert is_scan_folder(tmp_path)

    touch_nifti(images / "e.nii.gz")
    touch_nifti(masks / "zz.nii.gz")
    touch_nifti(images / "a.nii")
    with pytest.raises(ValueError, match="3 problem") as error:
        scan_pairs(tmp_path)
    message = str(error.value)
    assert "e.nii.gz: no mask named e" in message
    assert "zz.nii.gz: no image named zz" in message
    assert "a.nii, a.nii.gz: several files named 'a'" in message


def test_is_scan_folder_is_false_for_image_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    assert not is_scan_folder(tmp_path)
    assert not is_scan_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="mask folder .*masks does not exist"):
        scan_pairs(tmp_path)


def test_prediction_on_a_dicom_series_is_written_on_its_slices(tmp_path):
    folder = dicom_folder("98892001", "CT5N")
    volume = read_scan(folder)
    written = nib.load(write_scan(volume.image[..., 0], tmp_path / "series.nii.gz", like=volume, order=1))
    assert written.shape == (16, 16, 5)  # (column, row, slice) of the series
    assert int(written.header["sform_code"]) == 1  # scanner coordinates
    volume.label = (volume.image[..., 0] > 0).astype(np.uint8)
    fine = resample(volume, (1.25, 0.25, 0.25))
    label = np.asarray(nib.load(write_scan(fine.label, tmp_path / "label.nii.gz", like=fine)).dataobj)
    data = np.asarray(written.dataobj)
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        position = np.array(dataset.ImagePositionPatient, float)
        # The written voxel (column c, row r) of this slice lies where DICOM puts the pixel (r, c).
        index = canonical_slice_index(written.affine, position, 3, 7)
        lps = position + 3 * 0.488281 * np.array([1, 0, 0]) + 7 * 0.488281 * np.array([0, 1, 0])
        np.testing.assert_allclose(voxel_world(written.affine, index), lps * [-1, -1, 1], atol=1e-3)
        hu = dataset.pixel_array.astype(np.float32) - 1024
        np.testing.assert_array_equal(data[:, :, index[2]], hu.T)
        agreement = np.mean(label[:, :, index[2]] == (hu.T > 0))  # resampled to 2x in z, ~2x in-plane and back
        assert agreement > 0.99


def canonical_slice_index(affine, position, column, row):
    """(column, row, k) of the written voxel whose slice goes through `position` (LPS)."""
    ras = position * [-1, -1, 1]
    k = np.linalg.solve(affine[:3, :3], ras - affine[:3, 3])[2]
    assert abs(k - round(k)) < 1e-3
    return column, row, int(round(k))


def test_canonical_transform_undoes_every_axis_order_and_direction():
    from itertools import permutations, product

    from unetpp_tf.data.medical_io import from_canonical, index_map, to_canonical

    rng = np.random.default_rng(0)
    data = rng.random((3, 4, 5))
    base = np.diag([1.5, 0.7, 2.5, 1.0])  # canonical RAS file: i -> R, j -> A, k -> S
    base[:3, 3] = (-3.0, 8.0, 1.0)
    for order, signs in product(permutations(range(3)), product((1, -1), repeat=3)):
        # A file storing the same voxels with axes permuted and reversed.
        stored = np.transpose(data, order)
        step = np.zeros((4, 4))
        step[3, 3] = 1
        for new_axis, (old_axis, sign) in enumerate(zip(order, signs)):
            step[old_axis, new_axis] = sign
            step[old_axis, 3] = 0 if sign > 0 else data.shape[old_axis] - 1
        stored = np.flip(stored, [a for a in range(3) if signs[a] < 0])
        affine = base @ step
        axes, flips = canonical_transform(affine)
        canonical = to_canonical(stored, axes, flips)
        np.testing.assert_array_equal(canonical, np.transpose(data, (2, 1, 0)))
        canonical_affine = affine @ index_map(axes, flips, stored.shape)
        np.testing.assert_allclose(canonical_affine[:3, :3], [[0, 0, 1.5], [0, 0.7, 0], [2.5, 0, 0]])
        np.testing.assert_allclose(canonical_affine[:3, 3], base[:3, 3])
        np.testing.assert_array_equal(from_canonical(canonical, axes, flips), stored)
