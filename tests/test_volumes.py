"""Volumes in memory: CT windows and z-score by hand, resampling against exact values."""

import numpy as np
import pytest

from unetpp_tf.data.volumes import WINDOWS, Volume, apply_window, resample


def ramp_volume(shape=(10, 12, 14), spacing=(2.5, 1.0, 1.0)):
    """A volume whose image is the world z + 2 y - x of each voxel (linear: resampling reproduces it)."""
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = spacing[2], spacing[1], spacing[0], 1.0
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    world = index @ affine[:3, :3].T + affine[:3, 3]  # (R, A, S) per voxel
    image = (world[..., 2] + 2 * world[..., 1] - world[..., 0]).astype(np.float32)[..., None]
    label = (index[..., 0] >= shape[0] // 2).astype(np.uint8) * 2
    return Volume(image, label, spacing, affine, "ramp", {"path": "ramp.nii.gz"})


def world_of(volume):
    shape = volume.image.shape[:3]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    return index @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def test_named_windows_follow_width_and_level():
    # lung W1500 L-600, soft tissue W400 L40, bone W1800 L400, brain W80 L40 (Radiopaedia's values)
    assert WINDOWS["lung"] == (-1350.0, 150.0)
    assert WINDOWS["soft_tissue"] == (-160.0, 240.0)
    assert WINDOWS["bone"] == (-500.0, 1300.0)
    assert WINDOWS["brain"] == (0.0, 80.0)
    assert {"mediastinum", "liver"} <= set(WINDOWS)


def test_apply_window_values_by_hand():
    hu = np.array([-2000.0, -1350.0, -975.0, -600.0, 150.0, 900.0])
    np.testing.assert_allclose(apply_window(hu, "lung"), [0.0, 0.0, 0.25, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(apply_window(np.array([-160.0, 0.0, 40.0, 240.0]), "Soft-Tissue"),
                               [0.0, 0.4, 0.5, 1.0])
    np.testing.assert_allclose(apply_window(np.array([-1000.0, -250.0, 0.0, 400.0]), (-1000, 400)),
                               [0.0, 750 / 1400, 1000 / 1400, 1.0], rtol=1e-6)
    assert apply_window(hu, "lung").dtype == np.float32


def test_zscore_is_per_scan_and_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100.0, 20.0, (6, 8, 8)), rng.normal(-3.0, 0.5, (6, 8, 8))], -1)
    out = apply_window(image, "zscore")
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), [0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), [1.0, 1.0], atol=1e-5)
    expected = (image[..., 1] - image[..., 1].mean()) / image[..., 1].std()
    np.testing.assert_allclose(out[..., 1], expected, atol=1e-5)
    assert np.all(apply_window(np.full((2, 3, 3, 1), 7.0), "zscore") == 0.0)  # constant: zeros, not NaN


@pytest.mark.parametrize("window", ["lungs", (400, -1000), (0, 0), "1000,400", (1, 2, 3)])
def test_bad_windows_name_the_valid_ones(window):
    with pytest.raises(ValueError, match="lung, mediastinum, soft_tissue.*zscore"):
        apply_window(np.zeros(3), window)


def test_resample_reproduces_a_linear_image_at_the_new_voxels():
    volume = ramp_volume()
    out = resample(volume, (1.25, 0.5, 2.0))
    assert out.spacing == (1.25, 0.5, 2.0)
    assert out.image.shape == (20, 24, 7, 1)
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), out.spacing)
    # The centre of the field of view stays in place.
    centre = lambda v: v.affine[:3, :3] @ ((np.array(v.image.shape[:3]) - 1) / 2) + v.affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(out), centre(volume), atol=1e-9)
    world = world_of(out)
    expected = world[..., 2] + 2 * world[..., 1] - world[..., 0]
    inner = (slice(2, -2), slice(2, -2), slice(1, -1))  # away from the clamped edges
    np.testing.assert_allclose(out.image[..., 0][inner], expected[inner], atol=1e-3)
    assert out.source == volume.source and out.source is not volume.source


def test_resample_labels_by_nearest_neighbour():
    volume = ramp_volume()
    out = resample(volume, (1.0, 1.0, 1.0))
    assert out.label.dtype == np.uint8
    assert set(np.unique(out.label)) == {0, 2}  # never an interpolated 1
    world = world_of(out)
    # The label is 2 from slice 5 of 2.5 mm on: world S >= 5 + 4.5 * 2.5 (half way from slice 4).
    boundary = 5.0 + 4.5 * 2.5
    expected = np.where(world[..., 2] >= boundary, 2, 0)
    clear = np.abs(world[..., 2] - boundary) > 1e-6  # a voxel exactly half way may round either way
    np.testing.assert_array_equal(out.label[clear], expected[clear])
    back = resample(out, volume.spacing)
    assert back.image.shape == volume.image.shape
    np.testing.assert_array_equal(back.label, volume.label)


def test_resample_keeps_an_axis_given_none_and_returns_the_same_volume_when_nothing_changes():
    volume = ramp_volume()
    assert resample(volume, (None, 0.5, 0.5)).spacing == (2.5, 0.5, 0.5)
    assert resample(volume, (2.5, 1.0, 1.0)) is volume
    assert resample(volume, 2.0).spacing == (2.0, 2.0, 2.0)
    for bad in (0, (1.0, 1.0), (1.0, -1.0, 1.0), "fine"):
        with pytest.raises(ValueError, match="spacing must be"):
            resample(volume, bad)
