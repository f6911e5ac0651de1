"""Built-in synthetic chest CT scans (no download): lungs, vessels and nodules in Hounsfield units.

A scan is a pure function of (seed, index). It shows an axial slab of a small chest: air around
the body (-1000 HU), a table under it, subcutaneous fat (~-100 HU) around soft tissue (~40 HU)
with a spine and ribs (bone), a heart and a trachea with its two main bronchi (air, outside the
lungs), two lungs (~-850 HU, denser towards the back) whose bases sit on a domed diaphragm, vessel
trees that branch from each hilum and thin out towards the periphery (+30..+90 HU, tubular), and
two to four nodules (lobulated ellipsoids of 3..15 mm, at least one of 8 mm or more; +20..+60 HU):
some free in the lung, some touching a vessel, some touching the lung wall. The scan is blurred by
a point spread function (partial volume) and carries correlated noise of 12..25 HU, then rounded
to integers like stored CT.

Labels: 0 background, 1 lung (the vessels inside it count as lung), 2 nodule. In one slice a
vessel seen end-on looks like a small nodule, and a nodule touching the wall or a vessel has the
same density as them: telling them apart needs the neighbouring slices and the shape, so the
task is learnable but not trivial.

Example:
    >>> scans = synthetic_ct(4, seed=0)
    >>> scans[0].image.shape, scans[0].spacing
    ((48, 128, 128, 1), (2.5, 1.25, 1.25))
    >>> write_synthetic_ct("data/synthetic_ct", 8)
    PosixPath('data/synthetic_ct')
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from unetpp_tf.data.medical_io import from_canonical, index_map, write_nifti
from unetpp_tf.data.volumes import Volume
from unetpp_tf.files import staged_directory, write_json

DEFAULT_SHAPE = (48, 128, 128)
DEFAULT_SPACING = (2.5, 1.25, 1.25)
CLASSES = ("background", "lung", "nodule")
FILE_ORIENTATION = ((2, 1, 0), (False, True, True))
"""How the files store the canonical (z, y, x) array: NIfTI axes (x, y, z) with x and y reversed (LPS, as
DICOM converters often write), so reading them back exercises the reorientation."""
_PARAMETERS_FILE = "synthetic_ct.json"


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError('the synthetic CT scans need the scipy package: pip install "unetpp-tf[medical]"') from None
    return ndimage


def _smooth_field(rng, shape, cells) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a coarse grid of uniforms upsampled linearly."""
    ndimage = _ndimage()
    coarse = rng.uniform(-1.0, 1.0, size=tuple(max(2, int(c)) for c in cells))
    factors = [n / c for n, c in zip(shape, coarse.shape)]
    field = ndimage.zoom(coarse, factors, order=1, mode="nearest", grid_mode=True)
    return field[tuple(slice(0, n) for n in shape)]


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, float)
    return vector / max(np.linalg.norm(vector), 1e-9)


def _cross(a, b) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross is slow for single vectors)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _turn(direction, angle, rng) -> np.ndarray:
    """`direction` turned by `angle` radians about a random axis perpendicular to it."""
    axis = _unit(_cross(direction, rng.normal(size=3)))
    return _unit(direction * math.cos(angle) + _cross(axis, direction) * math.sin(angle))


class _Grid:
    """Voxel centres in mm, (z, y, x) axes, centred on the volume; boxes around points."""

    def __init__(self, shape, spacing):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, float)
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]
        self.z = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.x = self.axes[2][None, None, :]
        self.half = np.array([a[-1] for a in self.axes])  # centre of the last voxel, per axis

    def box(self, low, high):
        """Slices of the voxels whose centres lie in [low, high] (mm, (z, y, x)), or None when empty."""
        slices = []
        for axis, n, s, lo, hi in zip(self.axes, self.shape, self.spacing, low, high):
            start = max(0, int(math.floor((lo - axis[0]) / s)))
            stop = min(n, int(math.ceil((hi - axis[0]) / s)) + 1)
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def coordinates(self, box):
        z, y, x = (axis[part] for axis, part in zip(self.axes, box))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def index(self, point) -> tuple[int, int, int]:
        """The voxel nearest to `point` (mm), clamped to the grid."""
        return tuple(min(n - 1, max(0, int(round((float(p) - float(a[0])) / float(s)))))
                     for p, a, s, n in zip(point, self.axes, self.spacing, self.shape))


def _segment_occupancy(grid: _Grid, start, end, radius: float, box):
    """Share of each voxel of `box` inside a tube of `radius` mm around the segment start -> end (anti-aliased)."""
    z, y, x = grid.coordinates(box)
    axis = end - start
    length2 = max(float(axis @ axis), 1e-9)
    t = ((z - start[0]) * axis[0] + (y - start[1]) * axis[1] + (x - start[2]) * axis[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    d2 = (z - start[0] - t * axis[0]) ** 2 + (y - start[1] - t * axis[1]) ** 2 + (x - start[2] - t * axis[2]) ** 2
    edge = float(grid.spacing[1:].mean())
    return np.clip((radius - np.sqrt(d2)) / edge + 0.5, 0.0, 1.0)


def _vessel_tree(rng, grid: _Grid, inside: np.ndarray, hilum, trunks, radius: float, length: float):
    """Segments (start, end, radius) of a vessel tree grown from `hilum` along the `trunks` directions.

    `inside` is the distance (mm) of each voxel inside the lung; a branch whose end would leave
    the lung is turned (a few tries, wider each time) or, failing that, dropped.
    """
    segments = []
    stack = [(np.asarray(hilum, float), _unit(d), radius * rng.uniform(0.85, 1.1), length * rng.uniform(0.8, 1.1), 0)
             for d in trunks]
    while stack:
        start, direction, r, ell, generation = stack.pop()
        for attempt in range(5):
            trial = direction if attempt == 0 else _turn(direction, rng.uniform(0.3, 0.5) * attempt, rng)
            end = start + trial * ell
            if inside[grid.index(end)] >= max(r, 0.5) or (generation == 0 and attempt == 4):
                break
        else:
            continue
        segments.append((start, end, r))
        if r * 0.75 < 0.45:
            continue
        children = 3 if rng.uniform() < 0.2 else 2
        first = _turn(trial, rng.uniform(0.35, 0.7), rng)
        others = [_unit(2 * trial - first)] + [_turn(trial, rng.uniform(0.5, 0.9), rng)] * (children - 2)
        for child in [first] + others:
            stack.append((end, child, r * rng.uniform(0.7, 0.82), ell * rng.uniform(0.75, 0.92), generation + 1))
    return segments


def _nodule(rng, grid: _Grid, centre, radius: float):
    """(box, occupancy) of a lobulated ellipsoid nodule of about `radius` mm centred on `centre`."""
    axes = radius * rng.uniform(0.8, 1.15, size=3)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    reach = float(axes.max()) * 1.25 + grid.spacing.max()
    box = grid.box(np.asarray(centre) - reach, np.asarray(centre) + reach)
    if box is None:
        return None, None
    z, y, x = grid.coordinates(box)
    offsets = [z - centre[0], y - centre[1], x - centre[2]]
    local = [sum(rotation[i, j] * offsets[j] for j in range(3)) / axes[i] for i in range(3)]
    rho = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)  # 1 on the ellipsoid
    unit = [v / np.maximum(rho, 1e-6) for v in local]
    bumps = 1.0
    for _ in range(3):  # lobulation: a few smooth bumps of the surface
        w = _unit(rng.normal(size=3))
        along = w[0] * unit[0] + w[1] * unit[1] + w[2] * unit[2]
        bumps = bumps + rng.uniform(0.03, 0.1) * np.cos(rng.uniform(2.0, 4.0) * along + rng.uniform(0, 6.3))
    edge = float(grid.spacing[1:].mean())
    occupancy = np.clip((bumps - rho) * radius / edge + 0.5, 0.0, 1.0)
    return box, occupancy


def synthetic_scan(index: int, *, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, seed: int = 0) -> Volume:
    """Render synthetic chest CT scan `index` (a pure function of seed and index).

    Args:
        index: int. Scan number.
        shape: tuple. (D, H, W) voxels. Defaults to (48, 128, 128).
        spacing: tuple. (z, y, x) voxel size in mm. Defaults to (2.5, 1.25, 1.25).
        seed: int. Dataset seed. Defaults to 0.

    Returns:
        Volume: image float32 [D, H, W, 1] in integer Hounsfield units, label uint8 [D, H, W]
        (0 background, 1 lung, 2 nodule), canonical affine centred on the world origin,
        source {}.

    Example:
        >>> scan = synthetic_scan(3, shape=(32, 96, 96))
        >>> sorted(np.unique(scan.label))
        [0, 1, 2]
    """
    ndimage = _ndimage()
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (D, H, W) with at least 8 voxels per axis, got {shape!r}.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes (z, y, x) in mm, got {spacing!r}.")
    rng = np.random.default_rng([int(seed), int(index), 14])
    grid = _Grid(shape, spacing)
    z, y, x = grid.z, grid.y, grid.x
    half_z, half_y, half_x = grid.half
    full = np.broadcast_shapes(z.shape, y.shape, x.shape)

    # Body: a superellipse in each slice, a little narrower towards the top, flatter at the back.
    body_x = rng.uniform(0.80, 0.90) * half_x
    body_y = rng.uniform(0.62, 0.72) * half_y
    centre_y = rng.uniform(-0.04, 0.04) * half_y + 0.04 * half_y
    centre_x = rng.uniform(-0.03, 0.03) * half_x
    taper = 1.0 - rng.uniform(0.0, 0.08) * (z / max(half_z, 1e-6))
    semi_y = np.where(y < centre_y, body_y * 0.92, body_y) * taper
    power = rng.uniform(2.2, 2.8)
    rho_body = ((np.abs(x - centre_x) / (body_x * taper)) ** power
                + (np.abs(y - centre_y) / semi_y) ** power) ** (1 / power)
    depth = (1.0 - rho_body) * min(body_x, body_y)  # about the distance inside the skin, mm
    body = rho_body < 1.0
    fat = rng.uniform(3.0, 8.0)

    hu = np.full(full, -1000.0, np.float32)
    soft = 40.0 + 12.0 * _smooth_field(rng, full, (4, 8, 8))
    hu = np.where(body, np.where(depth < fat, -100.0 + 15.0 * _smooth_field(rng, full, (4, 8, 8)), soft), hu)
    table_y = centre_y - body_y * 0.92 - rng.uniform(4.0, 8.0)
    table = (np.abs(y - table_y) < 1.6) & (np.abs(x) < 0.9 * half_x) & ~body
    hu = np.where(table, 150.0, hu)

    # Spine at the back: vertebral body (cortex + cancellous bone), canal behind it.
    spine_y = centre_y - body_y * 0.62
    spine_r = rng.uniform(0.14, 0.18) * body_y
    spine_d = np.sqrt((x - centre_x) ** 2 + (y - spine_y) ** 2)
    hu = np.where(spine_d < spine_r, np.where(spine_d > spine_r - 1.8, 700.0, 230.0), hu)
    canal = np.sqrt((x - centre_x) ** 2 + (y - spine_y + spine_r * 1.7) ** 2) < spine_r * 0.5
    hu = np.where(canal & body, 15.0, hu)

    # Lungs: an ellipse per slice with a wavy outline, tapering to the apex, on a domed diaphragm.
    wall = rng.uniform(5.0, 9.0)
    z_base = -half_z + rng.uniform(0.1, 0.35) * 2 * half_z
    z_top = half_z + rng.uniform(-0.1, 0.5) * 2 * half_z
    dome = rng.uniform(0.25, 0.45) * (z_top - z_base)
    wobble = _smooth_field(rng, full, (3, 5, 5))
    heart_centre = np.array([z_base + rng.uniform(0.15, 0.3) * (z_top - z_base),
                             centre_y + rng.uniform(0.15, 0.3) * body_y, centre_x - rng.uniform(0.1, 0.2) * body_x])
    heart_radii = np.array([rng.uniform(0.3, 0.45) * (z_top - z_base), rng.uniform(0.35, 0.45) * body_y,
                            rng.uniform(0.3, 0.38) * body_x])
    heart = (((z - heart_centre[0]) / heart_radii[0]) ** 2 + ((y - heart_centre[1]) / heart_radii[1]) ** 2
             + ((x - heart_centre[2]) / heart_radii[2]) ** 2) < 1.0
    lungs, hila = np.zeros(full, bool), []
    for side in (-1.0, 1.0):  # -x: the patient's left (smaller: the heart), +x: right
        lung_x = rng.uniform(0.30, 0.36) * body_x * (0.9 if side < 0 else 1.0)
        lung_y = rng.uniform(0.66, 0.76) * body_y
        lung_cx = centre_x + side * (body_x - wall - fat - lung_x * rng.uniform(0.95, 1.05))
        lung_cy = centre_y + rng.uniform(-0.05, 0.05) * body_y
        profile = np.sqrt(np.clip((z_top - z) / (0.4 * (z_top - z_base)), 0.0, 1.0))
        r = np.sqrt(((x - lung_cx) / lung_x) ** 2 + ((y - lung_cy) / lung_y) ** 2) * (1.0 + 0.07 * wobble)
        floor = z_base + dome * np.clip(1.0 - r ** 2, 0.0, 1.0)
        lungs |= (r < profile) & (z > floor)
        hila.append(np.array([z_base + rng.uniform(0.45, 0.6) * (z_top - z_base),
                              lung_cy + rng.uniform(0.0, 0.1) * lung_y, lung_cx - side * 0.6 * lung_x]))
    lungs &= body & (depth > fat + wall) & ~heart

    # Ribs: bony tubes in the chest wall, running from the spine round to the front and down.
    rib_r = min(2.5, 0.4 * wall)
    shrink = 1.0 - (fat + 0.5 * wall) / min(body_x, body_y)  # the wall's middle on the body outline
    rib_gap = rng.uniform(12.0, 16.0)
    for z0 in np.arange(-half_z - rng.uniform(0, rib_gap), half_z + 2 * rib_gap, rib_gap):
        drop = rng.uniform(8.0, 16.0)
        rib_hu = rng.uniform(350.0, 650.0)
        for side in (-1.0, 1.0):
            angles = np.linspace(-0.45 * math.pi, 0.3 * math.pi, 10)  # from the back to the front
            cos, sin = np.cos(angles), np.sin(angles)
            points = np.stack([z0 - drop * (angles - angles[0]) / (angles[-1] - angles[0]),
                               centre_y + np.sign(sin) * body_y * np.abs(sin) ** (2 / power) * shrink,
                               centre_x + side * body_x * np.abs(cos) ** (2 / power) * shrink], -1)
            for start, end in zip(points[:-1], points[1:]):
                box = grid.box(np.minimum(start, end) - rib_r - 1, np.maximum(start, end) + rib_r + 1)
                if box is not None:
                    bone = _segment_occupancy(grid, start, end, rib_r, box)
                    hu[box] = hu[box] * (1 - bone) + rib_hu * bone

    # Trachea and main bronchi: air tubes with a wall, in the mediastinum (never lung).
    carina = np.array([min(z_top, half_z) - rng.uniform(0.25, 0.45) * 2 * half_z, centre_y + 0.15 * body_y, centre_x])
    airway_r = rng.uniform(0.09, 0.12) * body_y
    airway = np.zeros(full, np.float32)
    top = np.array([half_z + 5.0, carina[1], carina[2]])
    pieces = [(top, carina, airway_r)] + [(carina, carina + 0.55 * (h - carina), airway_r * 0.75) for h in hila]
    for start, end, radius in pieces:
        reach = radius + 2.5
        box = grid.box(np.minimum(start, end) - reach, np.maximum(start, end) + reach)
        if box is not None:
            airway[box] = np.maximum(airway[box], _segment_occupancy(grid, start, end, radius + 1.5, box))
    lumen = np.zeros(full, np.float32)
    for start, end, radius in pieces:
        box = grid.box(np.minimum(start, end) - radius - 1, np.maximum(start, end) + radius + 1)
        if box is not None:
            lumen[box] = np.maximum(lumen[box], _segment_occupancy(grid, start, end, radius, box))
    lungs &= airway < 0.5
    hu = np.where(body, hu * (1 - airway) + 45.0 * airway, hu)
    hu = np.where(body, hu * (1 - lumen) - 1000.0 * lumen, hu)

    # Parenchyma: ~-850 HU, denser at the back (dependent lung), with a soft texture.
    parenchyma = (rng.uniform(-880.0, -830.0) + 45.0 * np.clip((centre_y - y) / body_y, -1.0, 1.0)
                  + 18.0 * _smooth_field(rng, full, (8, 16, 16)))
    hu = np.where(lungs, parenchyma, hu)

    # Vessels: trees from each hilum, drawn inside the lungs only.
    inside = ndimage.distance_transform_edt(lungs, sampling=spacing)
    vessels = np.zeros(full, np.float32)
    segments = []
    lung_size = float(np.mean([body_x * 0.33, body_y * 0.7, (z_top - z_base) * 0.5]))
    for hilum, side in zip(hila, (-1.0, 1.0)):
        trunks = [(1.0, 0.0, side * 0.5), (-1.0, 0.1, side * 0.5), (0.1, 0.6, side), (0.1, -0.7, side),
                  (0.5, -0.3, side * 0.7), (-0.5, 0.5, side * 0.6), (0.6, 0.6, side * 0.4)]
        trunks = [_turn(_unit(t), rng.uniform(0.0, 0.3), rng) for t in trunks]
        segments += _vessel_tree(rng, grid, inside, hilum, trunks, rng.uniform(2.2, 3.0), lung_size * 0.3)
    for start, end, radius in segments:
        reach = radius + grid.spacing.max()
        box = grid.box(np.minimum(start, end) - reach, np.maximum(start, end) + reach)
        if box is not None:
            vessels[box] = np.maximum(vessels[box], _segment_occupancy(grid, start, end, radius, box))
    vessels *= lungs
    vessel_hu = rng.uniform(30.0, 90.0)
    hu = hu * (1 - vessels) + vessel_hu * vessels

    # Nodules: free in the lung, touching the wall, or touching a vessel.
    label = lungs.astype(np.uint8)
    count = int(rng.integers(2, 5))
    thick = [s for s in segments if s[2] >= 1.0 and lungs[grid.index((s[0] + s[1]) / 2)]]
    placed = 0
    for attempt in range(count * 20):
        if placed == count:
            break
        # 3..15 mm across; the first one 8..15 mm, so every scan has a nodule a Dice score can see.
        radius = rng.uniform(4.0 if placed == 0 else 1.5, 7.5)
        kind = rng.choice(["free", "wall", "vessel"], p=[0.4, 0.3, 0.3])
        if kind == "vessel" and thick:
            start, end, vessel_r = thick[int(rng.integers(len(thick)))]
            point = start + rng.uniform(0.2, 0.8) * (end - start)
            side = _unit(_cross(end - start, rng.normal(size=3)))
            centre = point + side * (vessel_r + radius) * rng.uniform(0.6, 0.95)
            ok = inside[grid.index(centre)] >= 0.6 * radius
        elif kind == "wall":
            band = np.argwhere((np.abs(inside - radius * 0.95) < 0.75 * grid.spacing.max()) & (inside > 0))
            if band.size == 0:
                continue
            centre = np.array([grid.axes[a][i] for a, i in enumerate(band[int(rng.integers(len(band)))])])
            ok = True
        else:
            pool = np.argwhere(inside > radius + 3.0)
            if pool.size == 0:
                continue
            centre = np.array([grid.axes[a][i] for a, i in enumerate(pool[int(rng.integers(len(pool)))])])
            ok = True
        if not ok:
            continue
        box, occupancy = _nodule(rng, grid, centre, radius)
        if box is None:
            continue
        solid = (occupancy >= 0.5) & lungs[box]
        if solid.sum() < 2 or (label[box] == 2)[occupancy > 0].any():
            continue  # too small to see after the lung cut, or overlapping an earlier nodule
        nodule_hu = rng.uniform(20.0, 60.0)
        occupancy = occupancy * (body[box])
        hu[box] = hu[box] * (1 - occupancy) + (nodule_hu + 10.0 * rng.normal(size=occupancy.shape)) * occupancy
        label[box][solid] = 2
        placed += 1

    # Scanner: point spread (thicker across slices), correlated noise, integer HU.
    sigma_mm = rng.uniform(0.6, 0.9)
    hu = ndimage.gaussian_filter(hu, (0.45, sigma_mm / spacing[1], sigma_mm / spacing[2]))
    noise = ndimage.gaussian_filter(rng.normal(size=full), (0.4, 0.7, 0.7))
    noise *= rng.uniform(12.0, 25.0) / max(float(noise.std()), 1e-6)
    hu = np.clip(np.round(hu + noise), -1024, 3071).astype(np.float32)

    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = spacing[2], spacing[1], spacing[0], 1.0
    affine[:3, 3] = [grid.axes[2][0], grid.axes[1][0], grid.axes[0][0]]
    return Volume(hu[..., None], label, spacing, affine, f"ct_{int(index):03d}", {})


def _check_count(num_scans) -> None:
    if isinstance(num_scans, bool) or not isinstance(num_scans, (int, np.integer)) or num_scans < 1:
        raise ValueError(f"num_scans must be a positive integer, got {num_scans!r}.")


def synthetic_ct(num_scans: int, *, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, seed: int = 0) -> list[Volume]:
    """A list of synthetic chest CT scans with their labels (0 background, 1 lung, 2 nodule).

    Args:
        num_scans: int. Number of scans.
        shape: tuple. (D, H, W) voxels per scan. Defaults to (48, 128, 128).
        spacing: tuple. (z, y, x) voxel size in mm. Defaults to (2.5, 1.25, 1.25).
        seed: int. Dataset seed: the same seed gives the same scans. Defaults to 0.

    Returns:
        list: `num_scans` Volumes (see `synthetic_scan`).

    Example:
        >>> scans = synthetic_ct(2, shape=(32, 64, 64), seed=1)
    """
    _check_count(num_scans)
    return [synthetic_scan(i, shape=shape, spacing=spacing, seed=seed) for i in range(int(num_scans))]


def write_volume_files(volume: Volume, image_path, label_path=None) -> None:
    """Write a canonical Volume's image (int16 HU when integral) and label as NIfTI in `FILE_ORIENTATION`.

    Example:
        >>> write_volume_files(scan, "ct/images/ct_000.nii.gz", "ct/masks/ct_000.nii.gz")
    """
    axes, flips = FILE_ORIENTATION
    shape = volume.image.shape[:3]
    file_shape = tuple(shape[a] for a in axes)
    affine = np.asarray(volume.affine, float) @ np.linalg.inv(index_map(axes, flips, file_shape))
    image = volume.image[..., 0] if volume.image.shape[-1] == 1 else volume.image
    if np.array_equal(image, np.round(image)) and image.min() >= -32768 and image.max() <= 32767:
        image = image.astype(np.int16)
    write_nifti(np.ascontiguousarray(from_canonical(image, axes, flips)), affine, image_path)
    if label_path is not None and volume.label is not None:
        label = np.ascontiguousarray(from_canonical(volume.label, axes, flips)).astype(np.uint8)
        write_nifti(label, affine, label_path)


def write_synthetic_ct(directory, num_scans: int = 16, *, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING,
                       seed: int = 0) -> Path:
    """Write synthetic chest CT scans as NIfTI: directory/images/ct_000.nii.gz and directory/masks/ct_000.nii.gz ...

    The files carry a real anisotropic affine (stored LPS-style, see `FILE_ORIENTATION`); images
    are int16 Hounsfield units, masks uint8 class ids. The folder is written atomically as a whole
    (`unetpp_tf.files.staged_directory`: a killed call leaves the previous folder or none, and
    images/ and masks/ are replaced whole). The parameters are recorded in
    directory/synthetic_ct.json: a second call with the same ones finds the files and writes nothing.

    Args:
        directory: str or Path. Output folder (created when missing).
        num_scans: int. Number of scans. Defaults to 16.
        shape: tuple. (D, H, W) voxels per scan. Defaults to (48, 128, 128).
        spacing: tuple. (z, y, x) voxel size in mm. Defaults to (2.5, 1.25, 1.25).
        seed: int. Dataset seed. Defaults to 0.

    Returns:
        Path: `directory`, ready for `scan_pairs(directory)`.

    Example:
        >>> data_dir = write_synthetic_ct("data/synthetic_ct", 8, seed=0)
    """
    _check_count(num_scans)
    directory = Path(directory)
    parameters = {"num_scans": int(num_scans), "shape": [int(n) for n in shape],
                  "spacing": [float(s) for s in spacing], "seed": int(seed), "version": 3}
    names = [f"ct_{i:03d}.nii.gz" for i in range(int(num_scans))]
    record = directory / _PARAMETERS_FILE
    try:
        done = json.loads(record.read_text(encoding="utf-8")) == parameters
    except (OSError, ValueError):
        done = False
    if done and all((directory / folder / name).is_file() for folder in ("images", "masks") for name in names):
        return directory
    with staged_directory(directory) as staging:  # the whole folder appears at once, or not at all
        for index, name in enumerate(names):  # one scan in memory at a time
            scan = synthetic_scan(index, shape=shape, spacing=spacing, seed=seed)
            write_volume_files(scan, staging / "images" / name, staging / "masks" / name)
        write_json(staging / _PARAMETERS_FILE, parameters)
    return directory
