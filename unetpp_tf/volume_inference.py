"""Prediction on volumes: sliding-window 3D, slice-wise 2D/2.5D, and whole scan files to NIfTI masks.

`sliding_window_predict` runs a 3D model on overlapping patches of one volume and blends
them with Gaussian importance weights (sigma = patch / 8 per axis, nnU-Net's convention) or
uniformly. Patches are cut and predicted `batch_size` at a time; the only volume-sized array
it allocates is the probability accumulator, which becomes the result. The summed weights are
not stored as a volume: windows lie on a grid (the product of per-axis start positions), so
the summed weight at a voxel is the product of three 1-D sums, and the accumulator is divided
by them slice by slice at the end. Peak memory beyond the input image and the model is

    4 * D * H * W * K bytes (accumulator = result)  +  4 * batch_size * Pd * Ph * Pw * (C + K) bytes

(plus the model's activations for one batch of patches), for a volume [D, H, W, C], K output
channels and patches (Pd, Ph, Pw).

`predict_slices` runs a 2D model slice by slice; a 2.5D model (trained on k neighbouring
slices as channels) gets them stacked the same way: slice offsets -(k // 2) .. k // 2 in
order, each slice's C channels together, the end slices repeated past the ends.
`predict_volume` picks one of the two from the model's input rank, and `predict_scans` reads
NIfTI files or DICOM series, predicts them and writes the masks as NIfTI in the geometry of
the source file. Every function takes a Keras model, a path for `inference.load_model`, or an
exported model (`unetpp_tf.runners.SavedModelRunner` / `TFLiteModel`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import keras
import numpy as np

from unetpp_tf import inference
from unetpp_tf.postprocess import apply_postprocessing, check_postprocessing

BLENDS = ("gaussian", "constant")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


# ----------------------------------------------------------------------------- model geometry


def _describe(model) -> str:
    """How an error names a model: its name for a Keras model, its file for an exported one."""
    if isinstance(model, keras.Model) or not hasattr(model, "path"):
        return f"model {model.name!r}"
    return f"{model.path}"


def _input_shape(model) -> tuple:
    if len(model.inputs) != 1:
        raise ValueError(f"{_describe(model)} has {len(model.inputs)} inputs; volume prediction needs one image input.")
    return tuple(None if d is None else int(d) for d in model.inputs[0].shape)


def _single_output_of_rank(model, rank: int):
    """The model's single-output form (deep supervision: accurate mode), refused unless its input has `rank` axes."""
    model = inference.as_single_output(model)
    shape = _input_shape(model)
    if len(shape) != rank:
        wanted, other = (("volumes (batch, D, H, W, C)", "a 2D model with predict_slices") if rank == 5 else
                         ("2D slices (batch, H, W, C)", "a 3D model with sliding_window_predict"))
        raise ValueError(f"{_describe(model)} takes inputs of shape {shape}, not {wanted}; run {other} or "
                         "predict_volume.")
    return model


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return batch_size


def _check_image(image, channels, model) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(
            f"image must be one volume [D, H, W, C], got shape {image.shape}; add a channel axis with image[..., None]."
        )
    if np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float32)
    if channels is not None and image.shape[-1] != channels:
        raise ValueError(f"the volume has {image.shape[-1]} channel(s) but {_describe(model)} expects {channels}.")
    return image


# ----------------------------------------------------------------------------- 3D sliding window


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start positions of windows of `patch` voxels every `stride` voxels, the last flush with the end.

    Args:
        size: int. Length of the axis (at least `patch`).
        patch: int. Window length.
        stride: int. Step between windows (at least 1).

    Returns:
        list of int: from 0 to size - patch; consecutive starts differ by at most `stride`.

    Example:
        >>> window_starts(100, 64, 32)
        [0, 32, 36]
    """
    if size <= patch:
        return [0]
    return [*range(0, size - patch, stride), size - patch]


def importance_weights(patch: int, blend: str = "gaussian") -> np.ndarray:
    """1-D blending weight of a window axis: a Gaussian (sigma = patch / 8, peak 1) or ones.

    The 3-D weight of a patch is the outer product of its three axes' weights.

    Args:
        patch: int. Window length.
        blend: str. "gaussian" or "constant". Defaults to "gaussian".

    Returns:
        np.ndarray: float64 [patch], symmetric about the window centre.

    Example:
        >>> importance_weights(8).round(3)
        array([0.002, 0.044, 0.325, 0.882, 0.882, 0.325, 0.044, 0.002])
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}.")
    if blend == "constant":
        return np.ones(patch)
    offsets = np.arange(patch) - (patch - 1) / 2.0
    return np.exp(-0.5 * (offsets / (patch / 8.0)) ** 2)


def _axis_plan(size: int, patch: int, overlap: float, weight: np.ndarray) -> dict:
    """Per-axis windows: starts in volume coordinates, the padding of a volume shorter than the patch,
    and the summed weight profile along the axis."""
    if size < patch:  # one window over the whole axis, reflection-padded about its centre and cropped back
        before = (patch - size) // 2
        return {"starts": [0], "before": before, "sums": weight[before : before + size].copy()}
    stride = max(1, int(round(patch * (1.0 - overlap))))
    starts = window_starts(size, patch, stride)
    sums = np.zeros(size)
    for start in starts:
        sums[start : start + patch] += weight
    return {"starts": starts, "before": 0, "sums": sums}


def _patch_size(patch_size, fixed, model) -> tuple:
    if patch_size is None:
        if any(f is None for f in fixed):
            raise ValueError(
                f"{_describe(model)} takes volumes of any size {tuple(fixed)}; pass patch_size=(D, H, W), e.g. "
                "the patch size it was trained on."
            )
        return tuple(fixed)
    patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    whole = all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p > 0 for p in patch)
    if len(patch) != 3 or not whole:
        raise ValueError(f"patch_size must be three positive integers (D, H, W), got {patch_size!r}.")
    for axis, p, f in zip("DHW", patch, fixed):
        if f is not None and p != f:
            raise ValueError(
                f"patch_size {axis} {p} differs from the fixed input {axis} {f} of {_describe(model)}; "
                f"pass patch_size={tuple(fixed)} or leave it unset."
            )
    return tuple(int(p) for p in patch)


def _shape_errors() -> tuple:
    """What running a model on a patch shape its graph rejects raises on the backend Keras runs on."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return ValueError, tf.errors.InvalidArgumentError
    return ValueError, TypeError  # JAX: concatenating skip connections of different sizes is a TypeError


def _forward(model, batch: np.ndarray, patch: tuple) -> np.ndarray:
    try:
        return np.asarray(model.predict_on_batch(batch), np.float32)
    except _shape_errors() as error:  # a shape the graph rejects
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{_describe(model)} cannot run on patches of {patch} voxels ({reason}); give a patch_size whose "
            "sides are divisible by the model's downsampling along each axis (its pooling per level)."
        ) from error


def sliding_window_predict(
    model,
    image,
    *,
    patch_size=None,
    overlap: float = 0.5,
    batch_size: int = 2,
    blend: str = "gaussian",
) -> np.ndarray:
    """Probabilities for one volume from a 3D model run on overlapping, blended patches.

    Windows of `patch_size` step by patch * (1 - overlap) along each axis, the last flush with
    the end, so every voxel is covered; an axis shorter than the patch is reflection-padded
    about its centre and cropped back. Each window's probabilities are weighted (Gaussian,
    sigma = patch / 8 per axis, or uniformly), summed, and divided by the summed weights.
    Memory: the result is the only volume-sized array made (4 * D * H * W * K bytes); patches
    go through the model `batch_size` at a time (see the module docstring for the formula).

    Args:
        model: keras.Model, str or runner. A 3D model taking [N, D, H, W, C] (deep-supervision
            models run in "accurate" mode, the mean of the heads), a path for
            `unetpp_tf.inference.load_model`, or an exported model from `unetpp_tf.runners`.
        image: array. One volume float32 [D, H, W, C], intensities as the model was trained on
            (e.g. windowed CT).
        patch_size: int, tuple or None. (D, H, W) of the windows; None uses the model's fixed
            input size (required for a model of free size). Defaults to None.
        overlap: float. Fraction of a window shared with its neighbour along each axis, in
            [0, 1). Defaults to 0.5.
        batch_size: int. Patches per forward pass. Defaults to 2.
        blend: str. "gaussian" (centre voxels count more, hiding seams) or "constant".
            Defaults to "gaussian".

    Returns:
        np.ndarray: float32 probabilities [D, H, W, K], K = the model's output channels.

    Example:
        >>> probs = sliding_window_predict(model, volume.image, overlap=0.5, batch_size=2)
    """
    model = _single_output_of_rank(model, 5)
    shape = _input_shape(model)
    batch_size = _check_batch_size(batch_size)
    if isinstance(overlap, bool) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap!r}; 0.5 is a good default.")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}.")
    image = _check_image(image, shape[4], model)
    patch = _patch_size(patch_size, shape[1:4], model)
    weights = [importance_weights(p, blend) for p in patch]
    plans = [_axis_plan(n, p, overlap, w) for n, p, w in zip(image.shape[:3], patch, weights)]
    accumulator = None
    corners = itertools.product(*(plan["starts"] for plan in plans))
    while chunk := list(itertools.islice(corners, batch_size)):
        batch = np.stack([_cut(image, corner, patch, plans) for corner in chunk])
        probs = _forward(model, batch, patch)
        if accumulator is None:
            accumulator = np.zeros((*image.shape[:3], probs.shape[-1]), np.float32)
        for corner, window in zip(chunk, probs):
            _add(accumulator, window, corner, patch, plans, weights)
    for z in range(accumulator.shape[0]):  # divide by the summed weights, one slice at a time
        accumulator[z] /= (plans[0]["sums"][z] * np.outer(plans[1]["sums"], plans[2]["sums"]))[..., None].astype(
            np.float32
        )
    return accumulator


def _window(corner, patch, plans, shape) -> tuple[tuple, tuple]:
    """(slices of the volume, slices of the patch) that one window covers."""
    volume, window = [], []
    for start, p, plan, n in zip(corner, patch, plans, shape):
        if n < p:
            volume.append(slice(0, n))
            window.append(slice(plan["before"], plan["before"] + n))
        else:
            volume.append(slice(start, start + p))
            window.append(slice(0, p))
    return tuple(volume), tuple(window)


def _cut(image, corner, patch, plans) -> np.ndarray:
    """One patch [Pd, Ph, Pw, C] of the volume, reflection-padded along axes shorter than the patch."""
    volume, window = _window(corner, patch, plans, image.shape[:3])
    piece = np.asarray(image[volume], np.float32)
    pads = [(w.start, p - w.stop) for w, p in zip(window, patch)]
    return np.pad(piece, [*pads, (0, 0)], mode="reflect") if any(a or b for a, b in pads) else piece


def _add(accumulator, probs, corner, patch, plans, weights) -> None:
    volume, window = _window(corner, patch, plans, accumulator.shape[:3])
    wz, wy, wx = (w[s] for w, s in zip(weights, window))
    weight = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32)
    accumulator[volume] += probs[window] * weight[..., None]


# ----------------------------------------------------------------------------- 2D / 2.5D slice by slice


def stack_slices(image, index: int, k: int) -> np.ndarray:
    """The k slices around `index` as channels: [H, W, k * C], offsets -(k // 2) .. k // 2, ends repeated.

    Args:
        image: array. Volume [D, H, W, C].
        index: int. The centre slice.
        k: int. Odd number of slices.

    Returns:
        np.ndarray: [H, W, k * C]; channel j * C + c is channel c of slice index - k // 2 + j.

    Example:
        >>> stack_slices(np.arange(3.0).reshape(3, 1, 1, 1), 0, 3).ravel()
        array([0., 0., 1.])
    """
    depth = image.shape[0]
    rows = [min(max(index + offset, 0), depth - 1) for offset in range(-(k // 2), k // 2 + 1)]
    return np.concatenate([image[r] for r in rows], axis=-1)


def _slices_per_input(model, image, slices) -> int:
    channels = _input_shape(model)[3]
    per_slice = image.shape[-1]
    if channels is None:
        k = 1 if slices is None else slices
    else:
        if channels % per_slice:
            raise ValueError(
                f"{_describe(model)} expects {channels} input channels, which is not a whole number of slices of "
                f"{per_slice} channel(s); check the model and the volume's channels."
            )
        k = channels // per_slice
        if slices is not None and slices != k:
            raise ValueError(
                f"slices={slices} but {_describe(model)} takes {channels} channels = {k} slice(s) of {per_slice}; "
                f"pass slices={k} or leave it unset."
            )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(
            f"a 2.5D model needs an odd number of neighbouring slices (centred on the slice predicted), got {k}."
        )
    return k


def predict_slices(model, image, *, slices: int | None = None, batch_size: int = 8, tile_size=None,
                   overlap: float = 0.25) -> np.ndarray:
    """Probabilities for one volume from a 2D (or 2.5D) model run slice by slice.

    A 2.5D model sees k neighbouring slices as channels (see `stack_slices`); k is the model's
    input channels divided by the volume's channels. Each slice goes through
    `unetpp_tf.inference.predict`: a model of free size gets it reflection-padded to its
    downsampling factor and cropped back, a fixed-size model tiles it.

    Args:
        model: keras.Model or str. A 2D model taking [N, H, W, k * C], or a path.
        image: array. One volume float32 [D, H, W, C].
        slices: int or None. k, the slices per input; None reads it from the model's input
            channels (1 when they are free). Defaults to None.
        batch_size: int. Slices per forward pass. Defaults to 8.
        tile_size: int, tuple or None. In-plane windows for `predict` (None: whole slices, or
            the model's fixed size). Defaults to None.
        overlap: float. In-plane window overlap when tiling. Defaults to 0.25.

    Returns:
        np.ndarray: float32 probabilities [D, H, W, K].

    Example:
        >>> probs = predict_slices(model_25d, volume.image)   # a 3-slice model on a 1-channel CT
    """
    model = _single_output_of_rank(model, 4)
    batch_size = _check_batch_size(batch_size)
    image = _check_image(image, None, model)
    k = _slices_per_input(model, image, slices)
    out = None
    for start in range(0, image.shape[0], batch_size):
        indices = range(start, min(start + batch_size, image.shape[0]))
        batch = np.stack([stack_slices(image, z, k) for z in indices]).astype(np.float32, copy=False)
        probs = inference.predict(model, batch, batch_size=batch_size, tile_size=tile_size, overlap=overlap)
        if out is None:
            out = np.empty((*image.shape[:3], probs.shape[-1]), np.float32)
        out[start : start + len(indices)] = probs
    return out


def model_dims(model) -> int:
    """Spatial dimensions a model works in: 2 (images or slices) or 3 (volumes).

    Example:
        >>> model_dims(build_unetpp((32, 32, 1), depth=2))
        2
    """
    rank = len(_input_shape(model))
    if rank not in (4, 5):
        raise ValueError(
            f"{_describe(model)} takes inputs of rank {rank}; expected 2D (N, H, W, C) or 3D (N, D, H, W, C)."
        )
    return rank - 2


def predict_volume(model, image, *, patch_size=None, overlap: float = 0.5, batch_size: int | None = None,
                   blend: str = "gaussian", slices: int | None = None) -> np.ndarray:
    """Probabilities for one volume: sliding-window for a 3D model, slice by slice for a 2D/2.5D one.

    Args:
        model: keras.Model or str. A 3D or 2D model, or a path.
        image: array. One volume float32 [D, H, W, C].
        patch_size: int, tuple or None. 3D: the (D, H, W) windows; 2D: in-plane (H, W) windows
            (None: whole slices, or the model's fixed size). Defaults to None.
        overlap: float. Window overlap in [0, 1). Defaults to 0.5.
        batch_size: int or None. Patches (3D) or slices (2D) per pass; None is 2 for 3D and
            8 for 2D. Defaults to None.
        blend: str. 3D blending, "gaussian" or "constant" (2D tiles blend with
            `unetpp_tf.predict`'s Hann weight). Defaults to "gaussian".
        slices: int or None. 2.5D only: slices per input (None: from the model). Defaults to None.

    Returns:
        np.ndarray: float32 probabilities [D, H, W, K].

    Example:
        >>> probs = predict_volume(model, volume.image, overlap=0.5)
    """
    model = inference.as_single_output(model)
    if model_dims(model) == 3:
        if slices is not None:
            raise ValueError(f"slices={slices} is for 2.5D models; {_describe(model)} is a 3D model.")
        return sliding_window_predict(model, image, patch_size=patch_size, overlap=overlap,
                                      batch_size=batch_size or 2, blend=blend)
    if patch_size is not None and not isinstance(patch_size, int) and len(patch_size) != 2:
        raise ValueError(
            f"patch_size {patch_size!r} has {len(patch_size)} values but {_describe(model)} is a 2D model; "
            "give in-plane (H, W) windows or leave it unset."
        )
    return predict_slices(model, image, slices=slices, batch_size=batch_size or 8, tile_size=patch_size,
                          overlap=overlap)


# ----------------------------------------------------------------------------- scan files


def _scans_in(folder: Path) -> list[Path]:
    """The NIfTI files and DICOM series folders directly inside `folder`, sorted by name."""
    from unetpp_tf.data import medical_io

    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if (p.is_file() and medical_io.is_nifti(p)) or medical_io.is_dicom_series(p)]


def _scan_inputs(inputs) -> tuple[list[Path], list[str]]:
    """Expand inputs into scans (NIfTI files, DICOM files or series folders); collect every problem."""
    from unetpp_tf.data import medical_io

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    scans, problems = [], []
    for item in map(Path, inputs):
        if not item.exists():
            problems.append(f"{item} does not exist; check the path")
        elif item.is_dir():
            if medical_io.is_dicom_series(item):
                scans.append(item)
                continue
            found = _scans_in(item / "images" if medical_io.is_scan_folder(item) else item)
            if found:
                scans.extend(found)
            else:
                problems.append(f"folder {item} holds no DICOM series and no NIfTI (.nii, .nii.gz) files")
        elif item.name.lower().endswith(_IMAGE_SUFFIXES):
            problems.append(
                f"{item} is a 2D image file, not a scan; predict_scans reads NIfTI files and DICOM series "
                "(use unetpp_tf.predict_files for images)"
            )
        elif medical_io.is_nifti(item) or medical_io.is_dicom_file(item):
            scans.append(item)
        else:
            problems.append(f"{item} is not a scan; pass .nii/.nii.gz files or DICOM series folders")
    if not scans and not problems:
        problems.append("inputs is empty; pass NIfTI files or DICOM series folders")
    unique = {}
    for scan in scans:  # a scan named directly and through its folder is predicted once
        unique.setdefault(scan.resolve(), scan)
    return list(unique.values()), problems


def _prepare(volume, *, spacing, window):
    """The volume resampled and windowed; its image replaced, so the HU array is not kept alongside."""
    from unetpp_tf.data import volumes

    if spacing is not None:
        volume = volumes.resample(volume, spacing)
    image = volume.image if window is None else volumes.apply_window(volume.image, window)
    return dataclasses.replace(volume, image=np.asarray(image, np.float32))


def _scan_problem(model, dims, volume, path) -> str | None:
    """Why a scan cannot go through the model, or None."""
    shape = _input_shape(model)
    channels = volume.image.shape[-1]
    if dims == 3:
        if volume.image.shape[0] < 2:
            return (f"{path} holds a single 2D slice of shape {volume.image.shape[1:3]}, but {_describe(model)} is a "
                    "3D model; use a 2D model for 2D images")
        if shape[4] is not None and shape[4] != channels:
            return f"{path} has {channels} channel(s) but {_describe(model)} expects {shape[4]}"
    elif shape[3] is not None and shape[3] % channels:
        return (f"{path} has {channels} channel(s), which does not divide the {shape[3]} input channels of "
                f"{_describe(model)}")
    return None


def predict_scans(
    model,
    inputs,
    output_dir,
    *,
    spacing=None,
    window="lung",
    threshold: float = 0.5,
    patch_size=None,
    overlap: float = 0.5,
    batch_size: int | None = None,
    probabilities: bool = False,
    postprocess=None,
) -> list[Path]:
    """Segment scans (NIfTI files, DICOM series) and write each mask as NIfTI in the scan's own geometry.

    Each scan is read with `unetpp_tf.data.medical_io.read_scan` (reoriented to the canonical
    orientation), resampled to `spacing` when given, windowed, predicted with `predict_volume`
    (sliding-window for 3D models, slice-wise for 2D/2.5D ones) and turned into class ids; the
    mask is written as `<name>_mask.nii.gz` on the source file's grid and affine (resampling
    and reorientation undone), so it overlays the scan in any viewer. Every input is checked
    (read, and matched against the model) before anything is predicted; all problems are
    reported in one error that names the files.

    Args:
        model: keras.Model or str. A 3D or 2D/2.5D model, or a path for `load_model`.
        inputs: str, Path or list of them. NIfTI files (.nii, .nii.gz), DICOM files or series
            folders, folders of NIfTI files or series, or a dataset folder (its images/).
        output_dir: str or Path. Where the masks go; created if needed.
        spacing: tuple or None. (z, y, x) mm to resample to before predicting (the spacing the
            model was trained at); None keeps the scan's own. Defaults to None.
        window: str, tuple or None. Intensity window for `volumes.apply_window` ("lung",
            "soft_tissue", (low, high) HU, "zscore"); None feeds the intensities unchanged.
            Defaults to "lung".
        threshold: float. Binary foreground threshold. Defaults to 0.5.
        patch_size: int, tuple or None. Windows for `predict_volume`. Defaults to None.
        overlap: float. Window overlap. Defaults to 0.5.
        batch_size: int or None. Patches or slices per pass (None: 2 for 3D, 8 for 2D).
            Defaults to None.
        probabilities: bool. Also write `<name>_probabilities.nii.gz` (float32 [.., K],
            linearly interpolated back to the source grid). Defaults to False.
        postprocess: dict, list or None. Post-processing steps (`unetpp_tf.postprocess`, e.g. the
            run's `read_postprocessing(run)`) applied to each label volume, on the grid it was
            predicted on, before it is written. Defaults to None (the labels as predicted).

    Returns:
        list of Path: the mask files written, in input order.

    Example:
        >>> predict_scans("model.keras", ["ct/patient1.nii.gz", "ct/patient2_dicom/"], "masks/")
    """
    from unetpp_tf import files
    from unetpp_tf.data import medical_io, volumes

    postprocess = check_postprocessing(postprocess)
    model = inference.as_single_output(model)
    dims = model_dims(model)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    if window is not None:
        volumes.window_range(window)  # a bad window name is refused before any scan is read
    scans, problems = _scan_inputs(inputs)
    names = {}
    for path in scans:
        name = medical_io.scan_stem(path)
        if name in names:
            problems.append(f"{path} and {names[name]} would both be written as {name}_mask.nii.gz; rename one")
        names.setdefault(name, path)
        try:
            problem = _scan_problem(model, dims, medical_io.read_scan(path), path)
        except ImportError:
            raise
        except Exception as error:  # noqa: BLE001  (nibabel and pydicom raise their own types for a bad file)
            problem = str(error).rstrip(".") if str(path) in str(error) else f"{path}: {error}".rstrip(".")
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the inputs, nothing predicted:\n  " + "\n  ".join(problems))
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise files.write_error(output_dir, error) from error
    files.require_writable(output_dir)
    written = []
    for path in scans:
        volume = _prepare(medical_io.read_scan(path), spacing=spacing, window=window)
        probs = predict_volume(model, volume.image, patch_size=patch_size, overlap=overlap, batch_size=batch_size)
        labels = apply_postprocessing(inference.labels_from_probabilities(probs, threshold), postprocess)
        name = medical_io.scan_stem(path)
        if probabilities:
            medical_io.write_scan(probs, output_dir / f"{name}_probabilities.nii.gz", like=volume, order=1)
        del probs
        written.append(medical_io.write_scan(labels, output_dir / f"{name}_mask.nii.gz", like=volume))
    return written
