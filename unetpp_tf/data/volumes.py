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
