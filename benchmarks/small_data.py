"""A small tiled fluorescence-nuclei dataset, rendered with NumPy, for `accuracy.py`.

Independent of `unetpp_tf.data.synthetic` on purpose (so that recipe defaults are not tuned
to the library's own generator). One large widefield-like image of a nuclear stain is
rendered from a seed, then cut into 64x64 tiles the way a user cuts a real acquisition:

- nuclei: rotated ellipses with wobbly (low-order Fourier) outlines, semi-axes 3-12 px,
  log-normal brightness, about 12% of them dim; many alone, some in touching clumps of 2-5;
  the local density varies smoothly over the image;
- interior chromatin texture, a brighter or darker rim, out-of-focus haze around nuclei;
- uneven illumination (vignetting and a tilt, multiplicative) and a smooth autofluorescent
  background (additive);
- Gaussian PSF blur, Poisson shot noise and Gaussian read noise, digitised as
  "8bit": uint8 PNG, background ~10-30, nuclei up to ~200; or
  "16bit": uint16 TIFF from a 12-bit camera, offset 100, background ~100-300, nuclei up to
  ~3500 of 65535 (dim once divided by 65535, as real 16-bit microscopy is);
- labels: the footprint of every nucleus (0/255 PNG masks).

Training tiles are the first `tiles` tiles (row by row) of the left part of the image, test
tiles all tiles of the right third, with a gap column between them. Both bit depths share the
scene and the labels; only the digitisation and the noise draw differ.

Usage:
    >>> folders = make_dataset("work/data", tiles=135, bits=8)
    >>> folders["train"], folders["test"]   # each holds images/ and masks/
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 1  # bump when the rendering changes, so cached folders are rebuilt
TILE = 64
DIGITISATION = {  # offset, background span, nucleus peak, camera gain (ADU per photon), read noise, max
    8: dict(offset=10.0, background=20.0, peak=190.0, gain=1.0, read=1.5, top=255),
    16: dict(offset=100.0, background=200.0, peak=3500.0, gain=16.0, read=12.0, top=4095),
}


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with a Gaussian of `sigma` pixels (FFT, edges reflected)."""
    pad = int(np.ceil(4 * sigma))
    padded = np.pad(image, pad, mode="reflect")
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    blurred = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded.shape)
    return blurred[pad:-pad, pad:-pad]


def smooth_noise(rng: np.random.Generator, shape: tuple, sigma: float) -> np.ndarray:
    """White noise blurred by `sigma`, rescaled to zero mean and unit deviation."""
    field = gaussian_blur(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / field.std()


def unit_range(field: np.ndarray) -> np.ndarray:
    """`field` rescaled to [0, 1]."""
    return (field - field.min()) / (field.max() - field.min())


def _nucleus_shapes(rng: np.random.Generator, size: int, coverage: float) -> list[dict]:
    """Centres, semi-axes, angles, outline wobble and brightness of the nuclei of one scene."""
    density = 0.25 + 0.75 * unit_range(smooth_noise(rng, (size, size), size / 8))
    shapes, area, target = [], 0.0, coverage * size * size
    while area < target:
        cy, cx = rng.uniform(0, size, 2)
        if rng.random() > density[int(cy), int(cx)]:
            continue
        members = 1 if rng.random() < 0.7 else int(rng.integers(2, 6))  # alone, or a clump
        previous = 0.0
        for _ in range(members):
            radius = float(np.exp(rng.uniform(np.log(3.5), np.log(11.0))))
            if previous:  # the next member of a clump touches the last one
                step, direction = (previous + radius) * rng.uniform(0.75, 0.95), rng.uniform(0, 2 * np.pi)
                cy, cx = cy + step * np.sin(direction), cx + step * np.cos(direction)
            dim = rng.uniform(0.2, 0.4) if rng.random() < 0.12 else 1.0
            shape = dict(
                cy=cy, cx=cx, a=radius, b=radius * rng.uniform(0.6, 1.0), angle=rng.uniform(0, np.pi),
                wobble=rng.uniform(0, 0.07, 3), phase=rng.uniform(0, 2 * np.pi, 3),
                brightness=float(rng.lognormal(0.0, 0.3)) * dim, rim=rng.uniform(-0.25, 0.2),
            )
            shapes.append(shape)
            area += np.pi * shape["a"] * shape["b"]
            previous = radius
    return shapes


def _draw(shape: dict, signal: np.ndarray, label: np.ndarray, texture: np.ndarray) -> None:
    """Paint one nucleus into `signal` (brightest wins) and its footprint into `label`."""
    size = signal.shape[0]
    reach = int(np.ceil(shape["a"] * 1.3)) + 1
    y0, y1 = max(0, int(shape["cy"]) - reach), min(size, int(shape["cy"]) + reach + 1)
    x0, x1 = max(0, int(shape["cx"]) - reach), min(size, int(shape["cx"]) + reach + 1)
    if y0 >= y1 or x0 >= x1:
        return
    dy = np.arange(y0, y1)[:, None] + 0.5 - shape["cy"]
    dx = np.arange(x0, x1)[None, :] + 0.5 - shape["cx"]
    cos, sin = np.cos(shape["angle"]), np.sin(shape["angle"])
    u, v = (dx * cos + dy * sin) / shape["a"], (-dx * sin + dy * cos) / shape["b"]
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    outline = 1.0 + sum(w * np.cos(k * theta + p) for k, w, p in zip((2, 3, 5), shape["wobble"], shape["phase"]))
    inside = rho <= outline
    depth = np.clip(rho / outline, 0, 1)
    profile = shape["brightness"] * (1.0 + shape["rim"] * depth**4) * (1.0 + 0.25 * texture[y0:y1, x0:x1])
    window = signal[y0:y1, x0:x1]
    window[inside] = np.maximum(window[inside], profile[inside])
    label[y0:y1, x0:x1] |= inside


def render_scene(seed: int = 0, size: int = 1024, coverage: float = 0.22) -> dict:
    """The noise-free scene: nuclear signal, illumination, background and the label image.

    Returns:
        dict: "signal" (blurred nuclei and haze, nuclei ~1), "illumination" (0.6-1),
        "background" (0-1), "label" (bool), all [size, size].
    """
    rng = np.random.default_rng(seed)
    signal, label = np.zeros((size, size)), np.zeros((size, size), bool)
    texture = smooth_noise(rng, (size, size), 0.9)
    for shape in _nucleus_shapes(rng, size, coverage):
        _draw(shape, signal, label, texture)
    haze = gaussian_blur(signal, 6.0)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    tilt = rng.uniform(-0.15, 0.15, 2)
    illumination = np.clip(1.0 - 0.9 * (yy**2 + xx**2) + tilt[0] * yy + tilt[1] * xx, 0.6, 1.0)
    background = unit_range(smooth_noise(rng, (size, size), size / 6) + 2.0 * (tilt[0] * yy + tilt[1] * xx))
    return dict(
        signal=gaussian_blur(signal, 1.3) + 0.12 * haze, illumination=illumination, background=background,
        label=label,
    )


def digitise(scene: dict, bits: int, seed: int = 0) -> np.ndarray:
    """Camera image of a scene: expected counts, Poisson and read noise, clipped integers."""
    camera = DIGITISATION[bits]
    light = scene["illumination"] * scene["signal"]
    expected = camera["offset"] + camera["background"] * scene["background"]
    expected = expected + camera["peak"] * light / np.percentile(light, 99.9)
    rng = np.random.default_rng([seed, bits])
    photons = rng.poisson(expected / camera["gain"]) * camera["gain"]
    noisy = photons + rng.normal(0.0, camera["read"], expected.shape)
    return np.clip(np.round(noisy), 0, camera["top"]).astype(np.uint8 if bits == 8 else np.uint16)


def tile_grid(size: int, tiles: int) -> dict:
    """(row, col) tile origins: `tiles` training tiles on the left, all of the right third for test."""
    per_side = size // TILE
    test_first = int(np.ceil(per_side * 2 / 3))
    left = [(r, c) for r in range(per_side) for c in range(test_first - 1)]  # one gap column
    if tiles > len(left):
        raise ValueError(f"tiles={tiles}, but the left part of a {size}-pixel image holds {len(left)}: raise size.")
    test = [(r, c) for r in range(per_side) for c in range(test_first, per_side)]
    return {"train": left[:tiles], "test": test}


def _write_split(folder: Path, image: np.ndarray, label: np.ndarray, cells: list, bits: int) -> None:
    suffix = ".png" if bits == 8 else ".tif"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for row, col in cells:
        window = np.s_[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
        stem = f"tile_r{row:02d}_c{col:02d}"
        Image.fromarray(image[window]).save(folder / "images" / f"{stem}{suffix}")
        Image.fromarray(label[window].astype(np.uint8) * np.uint8(255)).save(folder / "masks" / f"{stem}.png")


def make_dataset(work, *, tiles: int = 135, bits: int = 8, seed: int = 0, size: int = 1024) -> dict:
    """Render (or reuse from `work`) the train and test tile folders of one regime.

    Args:
        work: str or Path. Cache root; the folders go under work/<key of the parameters>.
        tiles: int. Training tiles (64x64), taken from the left part of the image.
            Defaults to 135.
        bits: int. 8 (uint8 PNG) or 16 (uint16 TIFF, 12-bit camera). Defaults to 8.
        seed: int. Scene and noise seed. Defaults to 0.
        size: int. Side of the whole image in pixels. Defaults to 1024.

    Returns:
        dict: {"train": Path, "test": Path}, each with images/ and masks/.

    Example:
        >>> make_dataset("work/data", tiles=96, bits=16)["train"]
    """
    if bits not in DIGITISATION:
        raise ValueError(f"bits must be 8 or 16, got {bits}.")
    params = dict(version=VERSION, tiles=tiles, bits=bits, seed=seed, size=size)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(work) / f"nuclei-{bits}bit-{tiles}tiles-seed{seed}-{digest}"
    folders = {split: root / split for split in ("train", "test")}
    if (root / "params.json").exists():
        return folders
    shutil.rmtree(root, ignore_errors=True)  # an interrupted render
    scene = render_scene(seed, size)
    image = digitise(scene, bits, seed)
    for split, cells in tile_grid(size, tiles).items():
        _write_split(folders[split], image, scene["label"], cells, bits)
    (root / "params.json").write_text(json.dumps(params, indent=2) + "\n")  # written last: the cache is complete
    return folders


def read_masks(folder) -> dict:
    """{stem: bool array} of the mask PNGs in `folder`."""
    return {p.stem: np.asarray(Image.open(p)) > 127 for p in sorted(Path(folder).glob("*.png"))}


def pooled_dice(predicted: dict, truth: dict) -> float:
    """Dice over all pixels of all tiles together: 2 |P and G| / (|P| + |G|)."""
    missing = sorted(set(truth) - set(predicted))
    if missing:
        raise ValueError(f"{len(missing)} test tile(s) have no prediction, e.g. {missing[0]}.")
    overlap = sum(int(np.sum(predicted[k] & truth[k])) for k in truth)
    total = sum(int(predicted[k].sum() + truth[k].sum()) for k in truth)
    return 2.0 * overlap / total if total else 1.0


def otsu_dice(folder) -> float:
    """Pooled Dice of one global Otsu threshold over the tiles of `folder` (a difficulty reference)."""
    folder = Path(folder)
    images = {p.stem: np.asarray(Image.open(p)) for p in sorted((folder / "images").iterdir())}
    pixels = np.concatenate([a.ravel() for a in images.values()]).astype(np.int64)
    counts = np.bincount(pixels).astype(float)
    levels = np.arange(len(counts))
    below, mass_below = np.cumsum(counts), np.cumsum(counts * levels)
    above, mass_above = below[-1] - below, mass_below[-1] - mass_below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mass_below / below - mass_above / above) ** 2
    threshold = int(np.nanargmax(between))
    return pooled_dice({k: a > threshold for k, a in images.items()}, read_masks(folder / "masks"))
