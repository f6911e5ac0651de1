"""Scans in memory: the `Volume` every medical reader returns and every volume pipeline takes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Volume:
    """One scan and its label in one canonical orientation, axes (z, y, x) = (D, H, W).

    Attributes:
        image: np.ndarray. float32 [D, H, W, C] intensities as read (Hounsfield units for CT),
            not yet windowed or normalized.
        label: np.ndarray or None. Integer class ids [D, H, W] on the image's grid, or None.
        spacing: tuple. Voxel size in mm along (z, y, x).
        affine: np.ndarray. 4x4 map from this array's voxel index (z, y, x, 1) to world
            coordinates in mm (RAS+).
        name: str. The scan's name (its file name without the extension).
        source: dict. How to map this grid back to the file it came from, for writing
            predictions with the source geometry (filled by the readers; {} for arrays).

    Example:
        >>> volume = Volume(np.zeros((8, 32, 32, 1), "float32"), None, (2.5, 1.0, 1.0), np.eye(4), "scan")
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple
    affine: np.ndarray
    name: str
    source: dict = dataclasses.field(default_factory=dict)


# CT display windows as (low, high) HU, from the radiology (width W, level L) convention:
# low = L - W/2, high = L + W/2, with the W/L pairs of Radiopaedia's "Windowing (CT)" article:
# lung W1500 L-600, mediastinum W350 L50, soft tissue W400 L40 (abdomen W400 L50), bone W1800 L400,
# brain W80 L40, liver W150 L30.
WINDOWS = {
    "lung": (-1350.0, 150.0),
    "mediastinum": (-125.0, 225.0),
    "soft_tissue": (-160.0, 240.0),
    "abdomen": (-150.0, 250.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
    "liver": (-45.0, 105.0),
}
"""Named CT windows: name -> (low, high) in Hounsfield units; `apply_window` maps low..high to 0..1."""


def window_range(window) -> tuple[float, float] | None:
    """The (low, high) HU of a window argument, or None for "zscore".

    Args:
        window: str or pair. A name of `WINDOWS` (case and "-"/" " for "_" do not matter), "zscore",
            or (low, high) numbers with low < high.

    Returns:
        tuple or None: (low, high) as floats; None for "zscore".

    Example:
        >>> window_range("lung")
        (-1350.0, 150.0)
    """
    valid = ", ".join([*WINDOWS, "zscore"])
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key == "zscore":
            return None
        if key not in WINDOWS:
            raise ValueError(
                f"unknown window {window!r}; pass one of {valid}, or a (low, high) pair of Hounsfield units."
            )
        return WINDOWS[key]
    try:
        low, high = (float(value) for value in window)
        ok = np.isfinite(low) and np.isfinite(high) and low < high
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"window must be one of {valid}, or a (low, high) pair with low < high; got {window!r}.")
    return low, high


def apply_window(image, window) -> np.ndarray:
    """Intensities to network inputs: a CT window clipped and scaled to [0, 1], or a per-scan z-score.

    Args:
        image: np.ndarray. Intensities, e.g. a `Volume.image` [D, H, W, C] in Hounsfield units.
        window: str or pair. A name of `WINDOWS` ("lung", "soft_tissue", ...), a (low, high) pair
            (low -> 0, high -> 1, clipped outside), or "zscore": (x - mean) / std over the voxels of
            the scan, per channel when `image` is 4D (MRI, whose intensities have no fixed scale).

    Returns:
        np.ndarray: float32 of the same shape.

    Example:
        >>> apply_window(np.array([-1350.0, -600.0, 150.0, 400.0]), "lung")
        array([0. , 0.5, 1. , 1. ], dtype=float32)
    """
    image = np.asarray(image, dtype=np.float32)
    bounds = window_range(window)
    if bounds is None:
        axes = tuple(range(image.ndim - 1)) if image.ndim == 4 else None
        mean = image.mean(axis=axes, dtype=np.float64, keepdims=True)
        std = image.std(axis=axes, dtype=np.float64, keepdims=True)
        std = np.where(std > 0, std, 1.0)  # a constant scan becomes zeros, not NaN
        return ((image - mean) / std).astype(np.float32)
    low, high = bounds
    return ((np.clip(image, low, high) - low) / (high - low)).astype(np.float32)


def check_spacing(spacing, current=None) -> tuple:
    """Target spacing (z, y, x) in mm from one number (isotropic) or three, where None keeps an axis.

    Args:
        spacing: number or sequence of 3 numbers or None entries.
        current: tuple or None. A scan's own spacing, filled in for None entries; None leaves
            them None (checked before any scan is read). Defaults to None.

    Example:
        >>> check_spacing((None, 1, 1), current=(2.5, 0.7, 0.7))
        (2.5, 1.0, 1.0)
    """
    number = isinstance(spacing, (int, float, np.number)) and not isinstance(spacing, bool)
    values = (spacing,) * 3 if number else spacing
    try:
        values = tuple(None if v is None else float(v) for v in values)
        ok = len(values) == 3 and all(v is None or (np.isfinite(v) and v > 0) for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"spacing must be a positive voxel size in mm or three (z, y, x), where None keeps an axis; "
            f"got {spacing!r}."
        )
    if current is None:
        return values
    return tuple(float(c) if v is None else v for v, c in zip(values, current))


def map_to_grid(array, source_affine, target_affine, target_shape, order: int) -> np.ndarray:
    """Resample `array` ([D, H, W] or [D, H, W, K]) from one voxel grid onto another through their affines.

    Args:
        array: np.ndarray. Values on the source grid.
        source_affine: np.ndarray. 4x4 voxel -> world map of `array`'s grid.
        target_affine: np.ndarray. 4x4 voxel -> world map of the target grid.
        target_shape: tuple. (D, H, W) of the target grid.
        order: int. 0 nearest neighbour (labels, dtype kept), 1 linear (float32).

    Returns:
        np.ndarray: [*target_shape] or [*target_shape, K]; outside the source grid the nearest edge voxel.

    Example:
        >>> map_to_grid(np.arange(4.0).reshape(1, 1, 4), np.eye(4), np.diag([1, 1, 0.5, 1]), (1, 1, 8), 1).shape
        (1, 1, 8)
    """
    try:
        from scipy import ndimage  # deferred: the medical extra
    except ImportError:
        raise ImportError('resampling scans needs the scipy package: pip install "unetpp-tf[medical]"') from None

    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest, labels) or 1 (linear, images/probabilities), got {order!r}.")
    array = np.asarray(array)
    target_shape = tuple(int(n) for n in target_shape)
    transform = np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(target_affine, float)
    matrix, offset = transform[:3, :3], transform[:3, 3]
    if array.ndim == 3:
        channels = array[..., None]
    else:
        channels = array
    out_dtype = channels.dtype if order == 0 else np.float32
    out = np.empty(target_shape + (channels.shape[-1],), out_dtype)
    if np.allclose(matrix, np.diag(np.diag(matrix))):
        matrix = np.diag(matrix)  # axis-aligned: scipy takes the faster separable path
    for k in range(channels.shape[-1]):
        values = channels[..., k] if order == 0 else channels[..., k].astype(np.float32)
        out[..., k] = ndimage.affine_transform(
            values, matrix, offset, output_shape=target_shape, order=order, mode="nearest"
        )
    return out[..., 0] if array.ndim == 3 else out


def resample(volume: Volume, spacing) -> Volume:
    """The volume on a grid of another voxel size: image linear, label nearest neighbour.

    The new grid covers the same field of view (its centre stays in place) with
    round(size * old / new) voxels per axis (at least 1), so the spacing is exactly `spacing`
    and the extent differs from the old one by under a voxel. `source` is kept: `write_scan` maps
    predictions on the new grid back onto the file's grid through the affines.

    Args:
        volume: Volume. The scan (and its label).
        spacing: float or tuple. Target voxel size in mm, one number (isotropic) or (z, y, x);
            None in the tuple keeps that axis.

    Returns:
        Volume: a new Volume; the input is not changed (returned as is when the spacing already matches).

    Example:
        >>> resample(volume, (None, 1.0, 1.0)).spacing
        (2.5, 1.0, 1.0)
    """
    current = tuple(float(s) for s in volume.spacing)
    target = check_spacing(spacing, current)
    if np.allclose(target, current, rtol=1e-6, atol=0):
        return volume
    old_shape = volume.image.shape[:3]
    new_shape = tuple(max(1, int(round(n * c / t))) for n, c, t in zip(old_shape, current, target))
    # The grid is rebuilt so that its spacing is exactly `target`: scale the axes of the old affine.
    step = np.eye(4)
    ratio = np.asarray(target) / np.asarray(current)
    step[:3, :3] = np.diag(ratio)
    # Centre of the new field of view on the old one's centre (in old voxel units).
    step[:3, 3] = (np.asarray(old_shape, float) - 1) / 2 - (np.asarray(new_shape, float) - 1) / 2 * ratio
    affine = np.asarray(volume.affine, float) @ step
    image = map_to_grid(volume.image, volume.affine, affine, new_shape, order=1)
    label = None if volume.label is None else map_to_grid(volume.label, volume.affine, affine, new_shape, order=0)
    return Volume(image, label, target, affine, volume.name, dict(volume.source))
