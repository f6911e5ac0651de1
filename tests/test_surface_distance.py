"""Surface distances: surfaces, HD95 and ASSD against hand-computed cases and a brute-force reference."""

import numpy as np
import pytest

from unetpp_tf.surface_distance import average_surface_distance, hausdorff_distance, surface, surface_distances

pytestmark = pytest.mark.backend_independent


def brute_force_surface(mask):
    """Mask voxels with a face neighbour outside the mask (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    outside = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            outside |= ~np.roll(padded, shift, axis=axis)[inner]
    return mask & outside


def brute_force_directed(a, b, spacing):
    points_a = np.argwhere(brute_force_surface(a)) * np.asarray(spacing)
    points_b = np.argwhere(brute_force_surface(b)) * np.asarray(spacing)
    return np.sqrt(((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def cube(shape, corner, side):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


def test_surfaces_by_hand():
    assert surface(cube((5, 5, 5), (1, 1, 1), 3)).sum() == 26  # all but the centre voxel
    assert surface(cube((6, 6), (1, 1), 3)).sum() == 8
    slab = np.zeros((4, 5, 5), bool)
    slab[2] = True
    np.testing.assert_array_equal(surface(slab), slab)  # one voxel thick: all surface
    full = np.ones((4, 4), bool)
    expected = np.ones((4, 4), bool)
    expected[1:3, 1:3] = False  # the array border is a surface; the inner 2x2 is not
    np.testing.assert_array_equal(surface(full), expected)
    assert not surface(np.zeros((3, 3, 3))).any()


def test_single_voxels_with_anisotropic_spacing():
    pred, ref = cube((6, 4, 5), (1, 2, 3), 1), cube((6, 4, 5), (4, 2, 3), 1)
    spacing = (2.5, 1.0, 0.7)
    assert hausdorff_distance(pred, ref, spacing) == pytest.approx(7.5)
    assert hausdorff_distance(pred, ref, spacing, percentile=100) == pytest.approx(7.5)
    assert average_surface_distance(pred, ref, spacing) == pytest.approx(7.5)
    diagonal = cube((6, 4, 5), (4, 0, 0), 1)  # offsets (3, 2, 3) voxels
    assert hausdorff_distance(pred, diagonal, spacing) == pytest.approx(np.sqrt(7.5**2 + 2.0**2 + 2.1**2))


def test_2d_squares_shifted_by_three_rows():
    ref = cube((10, 6), (2, 1), 3)
    pred = cube((10, 6), (5, 1), 3)
    to_ref, to_pred = surface_distances(pred, ref, spacing=(2.0, 1.0))
    # first row of pred 1 row (2 mm) from ref's last, its two side pixels 2 rows, its last row 3 rows
    np.testing.assert_allclose(np.sort(to_ref), [2, 2, 2, 4, 4, 6, 6, 6])
    np.testing.assert_allclose(np.sort(to_pred), [2, 2, 2, 4, 4, 6, 6, 6])
    assert hausdorff_distance(pred, ref, (2.0, 1.0)) == pytest.approx(6.0)
    assert hausdorff_distance(pred, ref, (2.0, 1.0), percentile=50) == pytest.approx(4.0)
    assert average_surface_distance(pred, ref, (2.0, 1.0)) == pytest.approx(32 / 8)
    assert hausdorff_distance(pred, pred, (2.0, 1.0)) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cubes_offset_along_each_axis(axis):
    spacing = (3.0, 2.0, 0.5)
    corner = [2, 2, 2]
    ref = cube((12, 12, 12), corner, 3)
    corner[axis] += 4  # no overlap: layers 2, 3 and 4 voxels beyond ref's far face
    pred = cube((12, 12, 12), corner, 3)
    step = spacing[axis]
    # pred surface: 9 voxels at 2 steps, 8 (no centre) at 3 steps, 9 at 4 steps; ref alike by symmetry
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(np.sort(to_ref), step * np.array([2] * 9 + [3] * 8 + [4] * 9))
    np.testing.assert_allclose(np.sort(to_pred), np.sort(to_ref))
    assert hausdorff_distance(pred, ref, spacing) == pytest.approx(4 * step)
    assert average_surface_distance(pred, ref, spacing) == pytest.approx(step * 78 / 26)


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    ref = cube((6, 16), (1, 1), 3)
    pred = ref.copy()
    pred[3, 13] = True  # a stray pixel 10 pixels from ref's surface
    # pred -> ref: eight 0s and a 10: 95th percentile 0.6 * 10 = 6; ref -> pred: all 0.
    # Pooled (MedPy's hd95) would give 2.0 (sixteen 0s and a 10).
    assert hausdorff_distance(pred, ref) == pytest.approx(6.0)
    assert hausdorff_distance(pred, ref, percentile=100) == pytest.approx(10.0)
    assert average_surface_distance(pred, ref) == pytest.approx(10 / 17)


def test_matches_a_brute_force_reference_on_overlapping_blobs(rng):
    shape, spacing = (10, 14, 12), (2.5, 0.8, 1.1)
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.array(spacing)
    pred = ((grid - [12, 5, 6]) ** 2).sum(-1) < 5.0**2
    ref = (((grid - [11, 6.5, 5]) / [1.3, 1.0, 0.8]) ** 2).sum(-1) < 5.0**2
    ref &= rng.random(shape) < 0.9  # holes make inner surfaces too
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    expected_to_ref = brute_force_directed(pred, ref, spacing)
    expected_to_pred = brute_force_directed(ref, pred, spacing)
    np.testing.assert_allclose(np.sort(to_ref), np.sort(expected_to_ref), rtol=1e-6)
    np.testing.assert_allclose(np.sort(to_pred), np.sort(expected_to_pred), rtol=1e-6)
    expected_hd95 = max(np.percentile(expected_to_ref, 95), np.percentile(expected_to_pred, 95))
    assert hausdorff_distance(pred, ref, spacing) == pytest.approx(expected_hd95)
    pooled = np.concatenate([expected_to_ref, expected_to_pred])
    assert average_surface_distance(pred, ref, spacing) == pytest.approx(pooled.mean())
    assert hausdorff_distance(pred, ref, spacing) > 0  # the case is not trivial


def test_empty_masks():
    empty, blob = np.zeros((4, 5, 6), bool), cube((4, 5, 6), (1, 1, 1), 2)
    assert hausdorff_distance(empty, empty) == 0.0
    assert average_surface_distance(empty, empty) == 0.0
    assert hausdorff_distance(empty, blob) == np.inf
    assert hausdorff_distance(blob, empty) == np.inf
    assert average_surface_distance(blob, empty) == np.inf
    to_ref, to_pred = surface_distances(blob, empty)
    assert to_ref.shape == (8,) and np.all(np.isinf(to_ref)) and to_pred.shape == (0,)


def test_bad_arguments_are_named():
    mask = cube((4, 5, 6), (1, 1, 1), 2)
    with pytest.raises(ValueError, match="same shape"):
        hausdorff_distance(mask, mask[:3])
    with pytest.raises(ValueError, match="spacing has 2 values but the masks have 3 axes"):
        hausdorff_distance(mask, mask, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive voxel sizes"):
        average_surface_distance(mask, mask, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff_distance(mask, mask, percentile=101)
    with pytest.raises(ValueError, match="2D"):
        surface(np.zeros(5))
