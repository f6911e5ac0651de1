"""Surface distances between binary masks in physical units: Hausdorff (HD95) and ASSD.

The surface of a mask is its voxels (pixels in 2D) with at least one face neighbour in the
background; voxels outside the array count as background, so a mask touching the border has
a surface there. Distances run from each surface voxel of one mask to the nearest surface
voxel of the other, measured between voxel centres with the voxel `spacing` (mm for scans,
any unit for images), through a Euclidean distance transform.

Conventions (those of MONAI's `compute_hausdorff_distance` / `compute_average_surface_distance`;
DeepMind's `surface-distance` package agrees on the Hausdorff reduction but weights each
surface element by its area):
- `hausdorff_distance(..., percentile=95)` is the larger of the two directed 95th percentiles
  (prediction -> reference and reference -> prediction), with numpy's linear interpolation.
  MedPy's `hd95` takes the percentile of the two directions pooled instead, which can be lower.
  `percentile=100` is the classical Hausdorff distance under both conventions.
- `average_surface_distance` (ASSD) is the mean of both directions' distances pooled (MONAI's
  `symmetric=True`); MedPy's `assd` averages the two directed means instead, which differs
  when the surfaces have different sizes.
- Empty masks: both empty gives 0.0 (the masks agree); exactly one empty gives `inf` (no
  surface to measure to). `unetpp_tf.evaluation` leaves infinite values out of its means and
  counts them, so a missed structure never hides inside an average.

Only numpy and `scipy.ndimage` are used; scipy comes with the `medical` extra.

Example:
    >>> pred = np.zeros((8, 8), bool); pred[2:5, 2:5] = True
    >>> hausdorff_distance(pred, np.roll(pred, 2, axis=1), spacing=(1.0, 0.5))
    1.0
"""

from __future__ import annotations

import numpy as np


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as error:  # pragma: no cover - scipy ships with the medical and test extras
        raise ImportError(
            'surface distances need scipy; install it with pip install "unetpp-tf[medical]".'
        ) from error
    return ndimage


def _mask(array, label: str) -> np.ndarray:
    mask = np.asarray(array)
    if mask.ndim not in (2, 3):
        raise ValueError(f"{label} must be a 2D [H, W] or 3D [D, H, W] mask, got shape {mask.shape}.")
    return mask.astype(bool, copy=False)


def _spacing(spacing, ndim: int) -> tuple:
    if spacing is None:
        return (1.0,) * ndim
    values = (spacing,) * ndim if np.isscalar(spacing) else tuple(spacing)
    if len(values) != ndim:
        raise ValueError(
            f"spacing has {len(values)} values but the masks have {ndim} axes; give one voxel size per axis "
            f"({'(z, y, x)' if ndim == 3 else '(y, x)'})."
        )
    values = tuple(float(v) for v in values)
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must hold positive voxel sizes, got {tuple(spacing)}.")
    return values


def _pair(pred, ref, spacing) -> tuple[np.ndarray, np.ndarray, tuple]:
    pred, ref = _mask(pred, "pred"), _mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}.")
    return pred, ref, _spacing(spacing, pred.ndim)


def surface(mask) -> np.ndarray:
    """The surface voxels of a binary mask: mask voxels with a face neighbour in the background.

    Voxels outside the array count as background. A mask one voxel thick is all surface.

    Args:
        mask: array. Binary mask [H, W] or [D, H, W] (nonzero = inside).

    Returns:
        np.ndarray: bool, the same shape, True on the surface.

    Example:
        >>> int(surface(np.ones((3, 3, 3))).sum())   # all but the centre voxel
        26
    """
    mask = _mask(mask, "mask")
    if not mask.any():
        return np.zeros(mask.shape, bool)
    cross = _ndimage().generate_binary_structure(mask.ndim, 1)
    return mask & ~_ndimage().binary_erosion(mask, structure=cross, border_value=0)


def _bounding_box(mask: np.ndarray) -> tuple:
    """Slices of the smallest box that holds every True voxel."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple) -> np.ndarray:
    """Distance from each voxel of `from_surface` to the nearest voxel of `to_surface` (both non-empty)."""
    distance = _ndimage().distance_transform_edt(~to_surface, sampling=spacing)
    return distance[from_surface]


def surface_distances(pred, ref, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances: prediction -> reference and reference -> prediction.

    Both masks are cropped to the box around their union first (exact: every surface voxel
    lies inside it), so a small structure in a large scan costs little.

    Args:
        pred: array. Predicted binary mask [H, W] or [D, H, W].
        ref: array. Reference binary mask, the same shape.
        spacing: float, tuple or None. Voxel size per axis ((z, y, x) in mm for scans);
            None is 1 per axis. Defaults to None.

    Returns:
        tuple: (float64 distances of the prediction's surface voxels to the reference surface,
        float64 distances of the reference's surface voxels to the prediction surface).
        Empty when the mask they start from is empty; when only the other mask is empty, every
        distance is inf.

    Example:
        >>> to_ref, to_pred = surface_distances(pred, ref, spacing=(2.5, 0.7, 0.7))
    """
    pred, ref, spacing = _pair(pred, ref, spacing)
    union = pred | ref
    if not union.any():
        return np.zeros(0), np.zeros(0)
    box = _bounding_box(union)
    pred_surface, ref_surface = surface(pred[box]), surface(ref[box])
    if not ref_surface.any() or not pred_surface.any():
        return np.full(int(pred_surface.sum()), np.inf), np.full(int(ref_surface.sum()), np.inf)
    return _directed(pred_surface, ref_surface, spacing), _directed(ref_surface, pred_surface, spacing)


def hausdorff_distance(pred, ref, spacing=None, percentile: float = 95) -> float:
    """Hausdorff distance at a percentile: the larger of the two directed percentiles (HD95 by default).

    Args:
        pred: array. Predicted binary mask [H, W] or [D, H, W].
        ref: array. Reference binary mask, the same shape.
        spacing: float, tuple or None. Voxel size per axis; None is 1 per axis. Defaults to None.
        percentile: float. In [0, 100]; 100 is the classical (maximum) Hausdorff distance.
            Defaults to 95.

    Returns:
        float: in the units of `spacing`; 0.0 when both masks are empty, inf when one is.

    Example:
        >>> hausdorff_distance(pred, ref, spacing=(2.5, 0.7, 0.7))            # HD95 in mm
        >>> hausdorff_distance(pred, ref, spacing=(2.5, 0.7, 0.7), percentile=100)
    """
    if isinstance(percentile, bool) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile!r}; 95 gives HD95, 100 the maximum.")
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    if not to_ref.size and not to_pred.size:
        return 0.0
    if not to_ref.size or not to_pred.size:
        return float("inf")
    return float(max(np.percentile(to_ref, percentile), np.percentile(to_pred, percentile)))


def average_surface_distance(pred, ref, spacing=None) -> float:
    """Average symmetric surface distance (ASSD): the mean of both directions' distances pooled.

    Args:
        pred: array. Predicted binary mask [H, W] or [D, H, W].
        ref: array. Reference binary mask, the same shape.
        spacing: float, tuple or None. Voxel size per axis; None is 1 per axis. Defaults to None.

    Returns:
        float: in the units of `spacing`; 0.0 when both masks are empty, inf when one is.

    Example:
        >>> average_surface_distance(pred, ref, spacing=(2.5, 0.7, 0.7))
    """
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    if not to_ref.size and not to_pred.size:
        return 0.0
    if not to_ref.size or not to_pred.size:
        return float("inf")
    return float((to_ref.sum() + to_pred.sum()) / (to_ref.size + to_pred.size))
