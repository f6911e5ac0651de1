"""Scans on disk: NIfTI files and DICOM series read as `Volume`s, predictions written back as NIfTI.

Every scan is returned in one canonical orientation: the array axes (z, y, x) run towards the
patient's superior, anterior and right side (nibabel's closest canonical RAS+, with the axes
reversed so that the slice axis comes first). The reader only permutes and flips the stored
axes (no interpolation), so every voxel keeps its value; `Volume.affine` maps the returned array's
(z, y, x) indices to world RAS+ millimetres and `Volume.spacing` is the voxel size along them.
`Volume.source` records the file's own grid (its affine, shape, the axis permutation and flips, and
the canonical grid as read), so `write_scan` can put a prediction made on the canonical grid, or on a
resampled one (`volumes.resample`), back onto the file's voxels.

NIfTI (.nii, .nii.gz) is read with nibabel: a 3D image, or 4D with the 4th axis as channels.
A header whose qform_code and sform_code are both 0 carries no position or orientation: it is
refused unless `allow_missing_affine=True` (then nibabel's default affine is used: voxel sizes
from pixdim, axes taken as RAS, origin at the centre). A DICOM series is a folder holding the
files of one series, read with pydicom: slices sorted along the slice normal by
ImagePositionPatient, Hounsfield units = pixel * RescaleSlope + RescaleIntercept, spacing from
PixelSpacing and the slice positions. One .dcm file is a volume of one slice.

nibabel, pydicom and scipy come with the `medical` extra (`pip install "unetpp-tf[medical]"`);
they are imported when first needed.

Example:
    >>> volume = read_scan_pair("ct/images/case1.nii.gz", "ct/masks/case1.nii.gz")
    >>> write_scan(prediction, "case1_pred.nii.gz", like=volume)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from unetpp_tf.data.checks import describe, describe_lines
from unetpp_tf.data.volumes import Volume, map_to_grid
from unetpp_tf.files import atomic_write

INSTALL_HINT = 'pip install "unetpp-tf[medical]"'
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIX = ".dcm"
MASK_TAGS = ("mask", "masks", "seg", "segmentation", "label", "labels", "gt", "lbl", "annotation")
"""Tags a mask name may add to its image's name: case1.nii.gz pairs with case1_seg.nii.gz (or -mask, .label ...)."""
GEOMETRY_TOLERANCE = 0.1
"""A label grid matches its image when no corner voxel lies further apart than this share of the smallest voxel size."""
SLICE_GAP_TOLERANCE = 0.1
"""A DICOM series' slice gaps may differ from their median by this share before slices count as missing."""

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise ImportError(f"NIfTI files need the nibabel package: {INSTALL_HINT}") from None
    return nibabel


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"DICOM files need the pydicom package: {INSTALL_HINT}") from None
    return pydicom


# ----------------------------------------------------------------------------- names


def is_nifti(path) -> bool:
    """Whether `path` names a NIfTI file (.nii or .nii.gz, any case).

    Example:
        >>> is_nifti("case1.nii.gz")
        True
    """
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path) -> bool:
    """Whether `path` is a file that looks like DICOM: a .dcm name or the "DICM" marker at byte 128.

    Example:
        >>> is_dicom_file("series/IM000001")
        True
    """
    path = Path(path)
    return path.is_file() and (path.suffix.lower() == DICOM_SUFFIX or _has_dicom_magic(path))


def is_dicom_series(path) -> bool:
    """Whether `path` is a folder holding DICOM files (a series folder).

    Example:
        >>> is_dicom_series("ct/images/case1")
        True
    """
    path = Path(path)
    if not path.is_dir():
        return False
    return any(is_dicom_file(entry) for entry in sorted(path.iterdir()) if not entry.name.startswith("."))


def scan_stem(path) -> str:
    """The name of a scan: its file name without .nii.gz, .nii or .dcm, or the series folder's name.

    Example:
        >>> scan_stem("ct/images/case1.nii.gz")
        'case1'
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in (*NIFTI_SUFFIXES, DICOM_SUFFIX):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- orientation


def canonical_transform(affine) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to turn a file's voxel axes into the canonical (z, y, x) = (S, A, R) ones.

    Each world axis gets the voxel axis whose direction is closest to it (largest cosine first),
    as nibabel's `as_closest_canonical` does for RAS+.

    Args:
        affine: np.ndarray. 4x4 map from the file's voxel indices (i, j, k) to world RAS+ mm.

    Returns:
        tuple: (axes, flips): canonical axis c (0 = z, 1 = y, 2 = x) is file axis `axes[c]`,
        reversed when `flips[c]`.

    Example:
        >>> canonical_transform(np.diag([-2.0, 2.0, 2.0, 1.0]))   # an LAS file
        ((2, 1, 0), (False, False, True))
    """
    columns = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(columns)) or np.any(norms == 0):
        raise ValueError(f"the affine {np.round(columns, 4).tolist()} has a zero or non-finite axis")
    cosines = np.abs(columns / norms)
    world_to_voxel = [0, 0, 0]
    free = cosines.copy()
    for _ in range(3):
        world, voxel = np.unravel_index(np.argmax(free), free.shape)
        world_to_voxel[world] = int(voxel)
        free[world, :] = -1.0
        free[:, voxel] = -1.0
    axes = (world_to_voxel[2], world_to_voxel[1], world_to_voxel[0])  # (S, A, R) = (z, y, x)
    flips = tuple(bool(columns[world, world_to_voxel[world]] < 0) for world in (2, 1, 0))
    return axes, flips


def index_map(axes, flips, file_shape) -> np.ndarray:
    """4x4 map from canonical voxel indices (z, y, x, 1) to the file's voxel indices (i, j, k, 1).

    Args:
        axes: tuple. File axis of each canonical axis (see `canonical_transform`).
        flips: tuple. Whether each canonical axis runs against its file axis.
        file_shape: tuple. (I, J, K) voxels of the file.

    Returns:
        np.ndarray: 4x4; `file_affine @ index_map(...)` is the canonical array's affine.

    Example:
        >>> index_map((2, 1, 0), (False, False, True), (33, 41, 25))[:3, 3]   # x reversed: i = 32 - x
        array([32.,  0.,  0.])
    """
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for canonical, (axis, flip) in enumerate(zip(axes, flips)):
        matrix[axis, canonical] = -1.0 if flip else 1.0
        matrix[axis, 3] = file_shape[axis] - 1.0 if flip else 0.0
    return matrix


def to_canonical(data: np.ndarray, axes, flips) -> np.ndarray:
    """File array (i, j, k[, c]) -> canonical (z, y, x[, c]) by a transpose and flips (a view, no copy).

    Example:
        >>> to_canonical(np.zeros((33, 41, 25)), (2, 1, 0), (False, False, True)).shape
        (25, 41, 33)
    """
    out = np.transpose(data, tuple(axes) + tuple(range(3, data.ndim)))
    flipped = tuple(c for c in range(3) if flips[c])
    return np.flip(out, flipped) if flipped else out


def from_canonical(array: np.ndarray, axes, flips) -> np.ndarray:
    """Canonical array (z, y, x[, c]) -> the file's axis order (i, j, k[, c]): the inverse of `to_canonical`.

    Example:
        >>> from_canonical(np.zeros((25, 41, 33, 2)), (2, 1, 0), (False, False, True)).shape
        (33, 41, 25, 2)
    """
    flipped = tuple(c for c in range(3) if flips[c])
    out = np.flip(array, flipped) if flipped else array
    return np.transpose(out, tuple(np.argsort(axes)) + tuple(range(3, array.ndim)))


def _spacing(affine) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


# ----------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path):
    nibabel = _nibabel()
    try:
        return nibabel.load(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"scan {path} does not exist; check the path.") from None
    except Exception as error:  # nibabel raises ImageFileError, gzip/zlib/struct errors, EOFError ...
        raise ValueError(f"cannot read NIfTI file {path}: {error}; is it a complete .nii/.nii.gz file?") from None


def _read_nifti(path: Path, *, label: bool, allow_missing_affine: bool):
    """(file-order data [i, j, k] or [i, j, k, c], file affine, source fields) of a NIfTI file."""
    image = _load_nifti(path)
    header = image.header
    codes = int(header["qform_code"]), int(header["sform_code"])
    if codes == (0, 0) and not allow_missing_affine:
        raise ValueError(
            f"{path} has no spatial affine (its qform_code and sform_code are both 0): the position and "
            "orientation of its voxels are unknown, so a prediction could not be overlaid on it. Set the "
            "header's sform/qform from the scanner geometry (e.g. convert the DICOM again with dcm2niix), or "
            "pass allow_missing_affine=True to read it with nibabel's default affine (voxel sizes from "
            "pixdim, axes taken as RAS)."
        )
    shape = image.shape
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) == 5 and shape[3] == 1:  # (i, j, k, 1, c): a vector image stored on the 5th axis
        shape = shape[:3] + shape[4:]
    if len(shape) not in (3, 4) or (label and len(shape) == 4 and shape[3] != 1):
        expected = "a 3D label volume (or 4D with one channel)" if label else "3D, or 4D with channels last"
        raise ValueError(f"{path} holds an array of shape {image.shape}; expected {expected}.")
    try:
        if label:
            data = np.asanyarray(image.dataobj)
        else:
            data = image.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as error:
        raise ValueError(f"cannot read the voxels of NIfTI file {path}: {error}; is the file complete?") from None
    data = data.reshape(shape)
    if label and data.ndim == 4:
        data = data[..., 0]
    fields = {"format": "nifti", "qform_code": codes[0], "sform_code": codes[1],
              "zooms": tuple(float(z) for z in header.get_zooms()[:3])}
    return data, np.asarray(image.affine, float), fields


# ----------------------------------------------------------------------------- DICOM


def _dicom_headers(folder: Path):
    """The image datasets (pixels included) of the DICOM files directly in `folder`."""
    pydicom = _pydicom()
    datasets = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            dataset = pydicom.dcmread(entry)
        except pydicom.errors.InvalidDicomError:
            continue  # a README, a thumbnail ...: not part of the series
        except Exception as error:
            raise ValueError(f"cannot read DICOM file {entry}: {error}; remove or replace the broken file.") from None
        media_class = getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", None)
        if media_class == _DICOMDIR_CLASS or "Rows" not in dataset or "PixelData" not in dataset:
            continue  # a DICOMDIR, a structured report ...: no image
        datasets.append((entry, dataset))
    return datasets


def _floats(dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        values = np.array([float(v) for v in value], float)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"DICOM file {path} has no valid {keyword} (got {value!r}): the slice cannot be placed in space; "
            "a series needs ImagePositionPatient, ImageOrientationPatient and PixelSpacing."
        )
    return values


def _slice_pixels(path: Path, dataset) -> np.ndarray:
    """One slice in Hounsfield units (or the stored unit for MRI): pixel * RescaleSlope + RescaleIntercept."""
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(
            f"DICOM file {path} is a multi-frame (enhanced) image of {dataset.NumberOfFrames} frames, which is "
            "not supported; convert it to NIfTI (e.g. with dcm2niix) and read the .nii.gz."
        )
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError(f"DICOM file {path} is a colour image; scans must be grayscale (one sample per pixel).")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # missing decoders for compressed transfer syntaxes raise several kinds
        raise ValueError(
            f"cannot decode the pixels of DICOM file {path}: {error}; install the decoder pydicom names "
            "(e.g. pylibjpeg) or decompress the series."
        ) from None
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _series_error(folder: Path, datasets) -> None:
    """Raise when the files of `folder` hold several series, naming them."""
    series = {}
    for path, dataset in datasets:
        series.setdefault(str(dataset.get("SeriesInstanceUID", "?")), []).append((path, dataset))
    if len(series) > 1:
        lines = []
        for uid, members in series.items():
            description = members[0][1].get("SeriesDescription", "") or ""
            number = members[0][1].get("SeriesNumber", "")
            lines.append(f"series {number} {description!r} ({uid}): {len(members)} file(s), e.g. {members[0][0].name}")
        raise ValueError(
            f"DICOM folder {folder} holds {len(series)} series; put each series in its own folder:\n"
            + describe_lines(lines)
        )


def _read_dicom(path: Path):
    """(file-order data [column, row, slice], RAS affine, source fields) of a DICOM series folder or file."""
    if path.is_dir():
        datasets = _dicom_headers(path)
        if not datasets:
            inner = [entry.name for entry in sorted(path.iterdir()) if is_dicom_series(entry)]
            hint = f" (its subfolders {describe(inner, 5)} do: pass one of them)" if inner else ""
            raise FileNotFoundError(f"DICOM folder {path} holds no DICOM image files{hint}; check the path.")
        _series_error(path, datasets)
    else:
        pydicom = _pydicom()
        try:
            datasets = [(path, pydicom.dcmread(path))]
        except FileNotFoundError:
            raise FileNotFoundError(f"scan {path} does not exist; check the path.") from None
        except Exception as error:
            raise ValueError(f"cannot read DICOM file {path}: {error}; is it a DICOM image?") from None
        if "PixelData" not in datasets[0][1]:
            raise ValueError(f"DICOM file {path} holds no image (no PixelData).")

    orientations = [_floats(ds, "ImageOrientationPatient", 6, p) for p, ds in datasets]
    reference = orientations[0]
    mixed = [p.name for (p, _), o in zip(datasets, orientations) if not np.allclose(o, reference, atol=1e-4)]
    if mixed:
        raise ValueError(
            f"DICOM series {path} mixes slice orientations: {datasets[0][0].name} has ImageOrientationPatient "
            f"{np.round(reference, 4).tolist()} but {describe(mixed)} do not; a volume needs parallel slices "
            "(put a localizer or a reformatted series in its own folder)."
        )
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in datasets}
    if len(sizes) > 1:
        raise ValueError(f"DICOM series {path} mixes slice sizes {sorted(sizes)}; a volume needs equal slices.")
    row_dir, column_dir = reference[:3], reference[3:]  # along a row (column index grows), down a column
    normal = np.cross(row_dir, column_dir)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, p) for p, ds in datasets])
    pixel_spacing = _floats(datasets[0][1], "PixelSpacing", 2, datasets[0][0])  # (between rows, between columns)
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    distances = positions @ normal

    if len(datasets) > 1:
        gaps = np.diff(distances)
        duplicated = np.flatnonzero(gaps < 1e-3)
        if duplicated.size:
            pairs = [f"{datasets[i][0].name} and {datasets[i + 1][0].name} (at {distances[i]:.3f} mm)"
                     for i in duplicated]
            raise ValueError(
                f"DICOM series {path} has duplicated slice positions: {describe(pairs, 5)}; remove the duplicate "
                "files (or separate the acquisitions into their own folders)."
            )
        step = float(np.median(gaps))
        uneven = np.flatnonzero(np.abs(gaps - step) > SLICE_GAP_TOLERANCE * step)
        if uneven.size:
            where = [f"{datasets[i][0].name} -> {datasets[i + 1][0].name}: {gaps[i]:.3f} mm" for i in uneven]
            raise ValueError(
                f"DICOM series {path} has uneven slice gaps (missing slices?): the slices are {step:.3f} mm apart "
                f"except {describe(where, 5)}; restore the missing files, or convert the series with a tool that "
                "resamples it (e.g. dcm2niix) and read the .nii.gz."
            )
        slice_step = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        dataset = datasets[0][1]
        thickness = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0
        slice_step = normal * float(thickness)

    volume = np.stack([_slice_pixels(p, ds) for p, ds in datasets])  # [slice, row, column]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]  # file axis i = column index
    lps[:3, 1] = column_dir * pixel_spacing[0]  # file axis j = row index
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS world to RAS
    fields = {"format": "dicom", "files": [str(p) for p, _ in datasets]}
    return np.transpose(volume, (2, 1, 0)), affine, fields


# ----------------------------------------------------------------------------- reading


def _read_grid(path, *, label: bool, allow_missing_affine: bool):
    """(canonical data, canonical affine, source dict) of a scan path."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and not is_nifti(path) and is_dicom_file(path)):
        data, affine, fields = _read_dicom(path)
    elif is_nifti(path):
        data, affine, fields = _read_nifti(path, label=label, allow_missing_affine=allow_missing_affine)
    elif not path.exists():
        raise FileNotFoundError(f"scan {path} does not exist; check the path.")
    else:
        raise ValueError(
            f"{path} is not a scan: pass a NIfTI file (.nii, .nii.gz), a DICOM file (.dcm) or a folder "
            "holding one DICOM series."
        )
    try:
        axes, flips = canonical_transform(affine)
    except ValueError as error:
        raise ValueError(f"{path}: {error}; the header's voxel-to-world geometry is broken.") from None
    file_shape = data.shape[:3]
    canonical = np.ascontiguousarray(to_canonical(data, axes, flips))
    canonical_affine = affine @ index_map(axes, flips, file_shape)
    source = {
        "path": str(path),
        **fields,
        "affine": affine,
        "shape": tuple(int(n) for n in file_shape),
        "axes": tuple(axes),
        "flips": tuple(flips),
        "grid_affine": canonical_affine.copy(),
        "grid_shape": tuple(int(n) for n in canonical.shape[:3]),
    }
    return canonical, canonical_affine, source


def read_scan(path, *, allow_missing_affine: bool = False) -> Volume:
    """Read a scan (NIfTI file, DICOM series folder or one .dcm file) in the canonical orientation.

    Args:
        path: str or Path. A .nii/.nii.gz file (3D, or 4D with channels last), a folder holding
            one DICOM series, or one DICOM file (a one-slice volume).
        allow_missing_affine: bool. Read a NIfTI whose qform and sform codes are both 0 with
            nibabel's default affine instead of refusing it. Defaults to False.

    Returns:
        Volume: image float32 [D, H, W, C] as stored (Hounsfield units for CT), label None,
        spacing and affine of the canonical (z, y, x) array, source for `write_scan`.

    Example:
        >>> volume = read_scan("ct/images/case1.nii.gz")
        >>> volume.image.shape, volume.spacing
        ((48, 128, 128, 1), (2.5, 1.25, 1.25))
    """
    data, affine, source = _read_grid(path, label=False, allow_missing_affine=allow_missing_affine)
    image = data.astype(np.float32, copy=False)
    if image.ndim == 3:
        image = image[..., None]
    return Volume(image, None, _spacing(affine), affine, scan_stem(path), source)


def _label_values(data: np.ndarray, path) -> np.ndarray:
    """Integer class ids of a label array (uint8 when they fit, else int32); non-integers raise."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        finite = np.isfinite(data)
        rounded = np.round(data)
        bad = ~finite | (np.abs(data - rounded) > 1e-3)
        if bad.any():
            examples = np.unique(data[bad])[:5]
            raise ValueError(
                f"label {path} holds non-integer values (e.g. {', '.join(f'{v:g}' for v in examples)}); a label "
                "volume must hold class ids 0, 1, 2 ...: was a probability map or a resampled (interpolated) "
                "label saved? Threshold or resample it with nearest-neighbour interpolation."
            )
        data = rounded
    low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if low < 0:
        raise ValueError(f"label {path} holds negative values (min {low}); class ids must be 0, 1, 2 ...")
    return data.astype(np.uint8 if high <= 255 else np.int32)


def _corner_distance(affine_a, affine_b, shape) -> float:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    difference = (np.asarray(affine_a) @ corners - np.asarray(affine_b) @ corners)[:3]
    return float(np.max(np.linalg.norm(difference, axis=0)))


def read_scan_pair(image_path, label_path, *, allow_missing_affine: bool = False) -> Volume:
    """Read a scan and its label volume, checking that the label lies on the image's voxel grid.

    The label may be stored in another orientation (both are brought to the canonical one); its
    grid must then match the image's: same shape, and corner voxels no further apart than
    `GEOMETRY_TOLERANCE` of the smallest voxel size. Its values must be integer class ids.

    Args:
        image_path: str or Path. The scan (see `read_scan`).
        label_path: str or Path. The label volume (NIfTI, class ids 0, 1, 2 ...).
        allow_missing_affine: bool. As in `read_scan`, for both files. Defaults to False.

    Returns:
        Volume: with label [D, H, W] (uint8, or int32 for ids above 255).

    Example:
        >>> volume = read_scan_pair("ct/images/case1.nii.gz", "ct/masks/case1.nii.gz")
        >>> volume.label.shape == volume.image.shape[:3]
        True
    """
    volume = read_scan(image_path, allow_missing_affine=allow_missing_affine)
    data, affine, _ = _read_grid(label_path, label=True, allow_missing_affine=allow_missing_affine)
    if data.ndim == 4:  # a DICOM "label" series cannot be 4D; kept for clarity
        data = data[..., 0]
    shape = volume.image.shape[:3]
    if data.shape != shape:
        raise ValueError(
            f"label {label_path} does not match its image {image_path}: {data.shape} voxels against "
            f"{shape} (both in the canonical (z, y, x) orientation); pair the right files, or resample the "
            "label onto the image's grid (nearest neighbour)."
        )
    distance = _corner_distance(affine, volume.affine, shape)
    tolerance = GEOMETRY_TOLERANCE * min(volume.spacing)
    if distance > tolerance:
        raise ValueError(
            f"label {label_path} does not match its image {image_path}: the same voxels lie up to "
            f"{distance:.3g} mm apart in the two headers (tolerance {tolerance:.3g} mm): different position, "
            "spacing or orientation. Pair the right files, or resample the label onto the image's grid."
        )
    volume.label = _label_values(np.ascontiguousarray(data), label_path)
    return volume


# ----------------------------------------------------------------------------- writing


def _output_dtype(array: np.ndarray, order: int):
    if order == 1 or np.issubdtype(array.dtype, np.floating):
        return np.float32
    if array.dtype == bool:
        return np.uint8
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"the label values {low}..{high} do not fit in int32; pass class ids.")


def write_scan(array, path, like: Volume, *, order: int = 0) -> Path:
    """Write `array`, made on `like`'s grid, as a NIfTI file in the geometry of the file `like` came from.

    A prediction on a resampled grid is first resampled back onto the grid the reader returned
    (nearest neighbour for `order=0`, linear for `order=1`), then the canonical reorientation is
    undone, so the written voxels are the source file's voxels (for a DICOM series: column, row,
    slice) and the header carries the source's affine (and qform/sform codes): the file overlays the
    scan in any viewer. A Volume built from arrays (`source` {}) is written on its own grid with its
    own affine. The file is written atomically (`unetpp_tf.files.atomic_write`).

    Args:
        array: np.ndarray. [D, H, W] labels or [D, H, W, K] probabilities on `like.image`'s grid.
        path: str or Path. Output file, ending in .nii.gz (or .nii).
        like: Volume. The volume the prediction was made on.
        order: int. 0 nearest neighbour (labels; integer dtype kept, as small as the values allow),
            1 linear (probabilities; written float32). Defaults to 0.

    Returns:
        Path: `path`.

    Example:
        >>> write_scan(prediction.argmax(-1), "out/case1.nii.gz", like=volume)
        PosixPath('out/case1.nii.gz')
    """
    nibabel = _nibabel()
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"write_scan writes NIfTI: {path} must end in .nii.gz (or .nii).")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest, labels) or 1 (linear, probabilities), got {order!r}.")
    array = np.asarray(array)
    shape = tuple(like.image.shape[:3])
    if array.ndim not in (3, 4) or array.shape[:3] != shape:
        raise ValueError(
            f"write_scan: array of shape {array.shape} for {path} does not lie on the {shape} grid of volume "
            f"{like.name!r}; pass [D, H, W] labels or [D, H, W, K] probabilities of that grid."
        )
    dtype = _output_dtype(array, order)
    source = like.source or {}
    if "grid_shape" in source:
        grid_shape, grid_affine = tuple(source["grid_shape"]), np.asarray(source["grid_affine"], float)
        resampled = shape != grid_shape or not np.allclose(like.affine, grid_affine, atol=1e-6)
        if resampled:
            array = map_to_grid(array, like.affine, grid_affine, grid_shape, order)
        axes, flips = tuple(source["axes"]), tuple(source["flips"])
        affine = np.asarray(source["affine"], float)
    else:  # arrays: the canonical grid written in NIfTI's (x, y, z) order
        axes, flips = (2, 1, 0), (False, False, False)
        file_shape = (shape[2], shape[1], shape[0])
        affine = np.asarray(like.affine, float) @ np.linalg.inv(index_map(axes, flips, file_shape))
    data = np.ascontiguousarray(from_canonical(np.asarray(array), axes, flips)).astype(dtype, copy=False)
    codes = (int(source.get("qform_code", 1)), int(source.get("sform_code", 1))) if source else (2, 2)
    if codes == (0, 0):  # the source had no affine: keep it that way, with its voxel sizes
        image = nibabel.Nifti1Image(data, None)
        image.header.set_zooms(tuple(source["zooms"]) + (1.0,) * (data.ndim - 3))
    else:
        image = nibabel.Nifti1Image(data, affine)
        image.set_qform(affine, code=codes[0])
        image.set_sform(affine, code=codes[1])
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: nibabel.save(image, str(temp)))


def write_nifti(data, affine, path) -> Path:
    """Write a file-order array ([i, j, k] or [i, j, k, c]) with its voxel -> RAS+ affine as NIfTI, atomically.

    Args:
        data: np.ndarray. The voxels in the file's axis order.
        affine: np.ndarray. 4x4 map of those axes to world RAS+ mm (stored as qform and sform, code 1).
        path: str or Path. Output file (.nii.gz or .nii).

    Example:
        >>> write_nifti(np.zeros((4, 4, 2), "int16"), np.diag([-1.0, -1.0, 2.5, 1.0]), "scan.nii.gz")
        PosixPath('scan.nii.gz')
    """
    nibabel = _nibabel()
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"write_nifti writes NIfTI: {path} must end in .nii.gz (or .nii).")
    image = nibabel.Nifti1Image(np.asarray(data), np.asarray(affine, float))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: nibabel.save(image, str(temp)))


# ----------------------------------------------------------------------------- folders


def list_scans(folder) -> dict[str, list[Path]]:
    """{name: [paths]} of the scans directly in `folder`: NIfTI files, .dcm files and DICOM series folders.

    Example:
        >>> list_scans("ct/images")
        {'case1': [PosixPath('ct/images/case1.nii.gz')]}
    """
    found: dict[str, list[Path]] = {}
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and (is_nifti(entry) or entry.suffix.lower() == DICOM_SUFFIX):
            found.setdefault(scan_stem(entry), []).append(entry)
        elif entry.is_dir() and is_dicom_series(entry):
            found.setdefault(entry.name, []).append(entry)
    return found


def _mask_key(stem: str) -> str:
    """The image name a mask name refers to: case1_seg -> case1 (tags of MASK_TAGS after _ - or .)."""
    match = re.fullmatch(rf"(.+?)[_.-]({'|'.join(MASK_TAGS)})", stem, flags=re.IGNORECASE)
    return match.group(1) if match else stem


def scan_pairs(root=None, *, images=None, masks=None) -> list[tuple[Path, Path]]:
    """Pair the scans of an images folder with the label volumes of a masks folder by name.

    Names are compared without .nii.gz / .nii / .dcm (a DICOM series folder is named by its folder).
    A mask pairs with the image of the same name; failing that, a mask named like the image plus a
    tag (case1_seg, case1-mask, case1_label ..., see `MASK_TAGS`), or an image named like the mask
    plus nnU-Net's channel suffix (case1_0000). Every image without a mask, mask without an image,
    or name with several files is listed in one error.

    Args:
        root: str, Path or None. Dataset folder holding images/ and masks/.
        images: str, Path or None. Image folder (relative to `root` when given). Defaults to "images".
        masks: str, Path or None. Mask folder (relative to `root` when given). Defaults to "masks".

    Returns:
        list: (image, mask) path pairs sorted by image name.

    Example:
        >>> scan_pairs("ct")
        [(PosixPath('ct/images/case1.nii.gz'), PosixPath('ct/masks/case1.nii.gz'))]
    """
    if root is None:
        if images is None or masks is None:
            raise ValueError("pass root=<dataset folder> or both images=<folder> and masks=<folder>.")
        image_dir, mask_dir = Path(images), Path(masks)
    else:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist; check the path.")
        image_dir = root / (images if images is not None else "images")
        mask_dir = root / (masks if masks is not None else "masks")
    for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{what} folder {folder} does not exist; expected root/images + root/masks holding NIfTI files "
                "or DICOM series folders, or pass images= and masks= explicitly."
            )
    image_scans, mask_scans = list_scans(image_dir), list_scans(mask_dir)
    if not image_scans:
        raise FileNotFoundError(
            f"no scans found in {image_dir}; expected NIfTI files (.nii, .nii.gz), .dcm files or DICOM series folders."
        )
    problems = []
    for name, paths in {**image_scans, **mask_scans}.items():
        for scans in (image_scans, mask_scans):
            if len(scans.get(name, ())) > 1:
                problems.append(f"{describe([p.name for p in scans[name]])}: several files named {name!r}; keep one")
    by_key: dict[str, list[str]] = {}
    for name in mask_scans:
        by_key.setdefault(_mask_key(name), []).append(name)
    pairs, used = [], {}
    for name in sorted(image_scans):
        if name in mask_scans:
            candidates = [name]
        else:
            candidates = by_key.get(name, [])
            channel = re.fullmatch(r"(.+)_\d{4}", name)
            if not candidates and channel and channel.group(1) in mask_scans:
                candidates = [channel.group(1)]
        image = image_scans[name][0]
        if not candidates:
            problems.append(f"{image}: no mask named {name} (or {name}_seg, {name}_mask ...) in {mask_dir}")
        elif len(candidates) > 1:
            problems.append(f"{image}: several masks could be its label: {describe(candidates)}; keep one")
        elif candidates[0] in used:
            problems.append(f"{image}: its mask {candidates[0]} is also claimed by {used[candidates[0]]}")
        else:
            used[candidates[0]] = image.name
            pairs.append((image, mask_scans[candidates[0]][0]))
    for name in sorted(set(mask_scans) - set(used)):
        problems.append(f"{mask_scans[name][0]}: no image named {_mask_key(name)} in {image_dir}")
    if problems:
        raise ValueError(
            f"cannot pair the scans of {image_dir} with the masks of {mask_dir} ({len(problems)} problem(s)); "
            "rename or move these files:\n" + describe_lines(problems, limit=20)
        )
    return pairs


def is_scan_folder(path) -> bool:
    """Whether `path` is a dataset of scans: its images/ folder holds NIfTI files or DICOM series.

    Example:
        >>> is_scan_folder("ct")
        True
    """
    images = Path(path) / "images"
    if not images.is_dir():
        return False
    for entry in images.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and (is_nifti(entry) or entry.suffix.lower() == DICOM_SUFFIX):
            return True
        if entry.is_dir() and is_dicom_series(entry):
            return True
    return False
