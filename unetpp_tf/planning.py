"""Planning a training configuration from the data: `plan(fingerprint(DIR))`.

`plan` turns a dataset fingerprint (`unetpp_tf.data.fingerprint`) into TrainConfig settings,
each with a one-line reason, and keeps the run within a memory budget. It starts from the
measured recipe (`unetpp_tf.config.IMAGE_RECIPE`, `VOLUME_RECIPES`) and moves away from it
only where the data says so:

- size: images that all have one size train at that size (no resampling; rounded to the
  model's downsampling), large ones on random crops at native scale; images of many sizes
  are resized to the median shape, scaled down to at most `RESIZE_PIXELS` pixels. Scans
  keep the recipe patch, smaller where the scans are smaller; strongly anisotropic scans
  train slice-wise (2.5D); scans of differing spacing are resampled to the median one.
- depth: the deepest level whose smallest map keeps at least `MIN_BOTTLENECK` pixels (the
  accuracy benchmark's 64x64 tiles: depth 3, the measured recipe); depth 5 for large
  objects in large images.
- normalization: "fixed" for 8-bit images that use their range, "dataset" for 16-bit
  (12-bit camera data included), dim and floating-point images; scans that are not CT
  (no Hounsfield units) get the "zscore" window.
- steps: small training sets get more optimizer steps (`--min-steps`).
- batch: the recipe's 8 (16 for large sets), at most half the training split, then the
  memory budget: the batch is halved, then recomputation is switched on, then the width
  halved, until the configuration fits.

Memory: an analytic estimate (`estimate_memory`) orders the candidates; with `measure=True`
the chosen one is verified by `measure_peak_memory`, which trains it for a few steps in a
child process (`python -m unetpp_tf.planning --measure SPEC --result FILE`) and reads that process's
peak: on the CPU the peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, read by
the child itself, so several children never mix their peaks), with a GPU the device's peak
allocation (`tf.config.experimental.get_memory_info("GPU:0")["peak"]`; JAX:
`memory_stats()["peak_bytes_in_use"]`). A training run also holds its decoded dataset
(cached in host memory): on the CPU that is added to the peak compared with the budget.

Example:
    >>> from unetpp_tf.data.fingerprint import fingerprint
    >>> chosen = plan(fingerprint("data/nuclei"), memory_budget_gb=4)
    >>> print(format_plan(chosen))
    >>> config, chosen = planned_config(TrainConfig(data="data/nuclei"), given={"epochs"})
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from unetpp_tf.config import DEFAULT_AUGMENTATION, IMAGE_RECIPE, VOLUME_RECIPES, TrainConfig
from unetpp_tf.data.fingerprint import Fingerprint, fingerprint

GB = 1024**3
MAX_NATIVE = 256
"""Images of one size up to this side train whole at their size; larger ones on crops."""
CROP_SIDE = 256
RESIZE_PIXELS = 128 * 128
"""Images of many sizes are resized to the median shape scaled to at most this many pixels."""
MIN_BOTTLENECK = 6
"""Fewest pixels along each side of the deepest feature map."""
SMALL_SET, TINY_SET, LARGE_SET = 500, 50, 2000
"""Training-split sizes (images) where the step and batch rules change."""
RUN_MARGIN = 0.1
"""A run needs more than the few measured steps (validation, scoring, the input pipeline's buffers):
the plan adds this share. On the accuracy benchmark's tiles the run's peak was 1.5% above the measurement."""
MEASURE_STEPS = 3
MEASURE_TIMEOUT = 600
MAX_MEASUREMENTS = 4
"""Most child processes one plan starts."""
# The analytic estimate, fitted to measured peaks on this project's 2-core CPU (TensorFlow):
# the process floor (runtime, graph, XLA off) and bytes per activation element of one UNet++ node.
CPU_FLOOR_BYTES = 0.9 * GB
ACTIVATION_BYTES = 4 * 12
RECOMPUTE_SHARE = 0.45


@dataclasses.dataclass
class Plan:
    """A planned configuration.

    Attributes:
        settings: dict. TrainConfig fields to set, e.g. {"image_size": (64, 64), "depth": 3}.
        reasons: dict. {field: one-line reason} for each setting.
        memory: dict. "budget_gb" (None: no budget), "peak_gb" (what the run is expected to
            need: measured, or estimated), "measured" (bool), "device" ("cpu" or "gpu"),
            "data_gb" (the decoded dataset in host memory) and "tried" (the configurations
            tried, with their peaks).
        fingerprint: dict. The fingerprint planned from (`Fingerprint.to_dict`).
    """

    settings: dict
    reasons: dict
    memory: dict
    fingerprint: dict

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------- memory


def _pixels(shape) -> int:
    return int(math.prod(shape))


def estimate_memory(settings: dict, channels: int, num_classes: int, input_shape) -> int:
    """Analytic peak memory (bytes) of training one configuration, without the dataset.

    The process floor plus weights, gradients and Adam slots (4 copies of the parameters)
    plus the activations the backward pass keeps: for UNet++ every node X(i, j) holds maps of
    `filters * 2**i` channels at 1/2**i of the input per axis (U-Net: one node per level each
    way), times `ACTIVATION_BYTES` per element, times the batch; recomputation keeps
    `RECOMPUTE_SHARE` of that. Fitted on the CPU; `measure_peak_memory` gives the truth.

    Args:
        settings: dict. "depth", "filters", "batch_size", "recompute", "arch" ("unetpp").
        channels: int. Input channels.
        num_classes: int. Output classes (1 binary).
        input_shape: tuple. Spatial training shape, (height, width) or (depth, height, width).

    Returns:
        int: bytes.

    Example:
        >>> estimate_memory(dict(depth=4, filters=16, batch_size=8), 1, 1, (96, 96)) / 2**30
        1.2
    """
    depth, filters = int(settings["depth"]), int(settings["filters"])
    batch = int(settings["batch_size"])
    dims = len(input_shape)
    kernel = 3**dims
    unetpp = settings.get("arch", "unetpp") == "unetpp"
    elements, params = 0.0, 0
    for level in range(depth + 1):
        width = filters * 2**level
        pixels = _pixels(input_shape) / (2**dims) ** level
        nodes = (depth + 1 - level) if unetpp else (2 if level < depth else 1)
        elements += nodes * pixels * width
        params += nodes * (2 * kernel * width * width + kernel * width * (channels if level == 0 else width // 2))
    activations = elements * ACTIVATION_BYTES * batch
    if settings.get("recompute"):
        activations *= RECOMPUTE_SHARE
    batch_bytes = batch * _pixels(input_shape) * (channels + num_classes) * 8
    return int(CPU_FLOOR_BYTES + 16 * params + activations + batch_bytes)


def measure_peak_memory(
    settings: dict, *, channels: int, num_classes: int, input_shape, scans: bool = False,
    steps: int = MEASURE_STEPS, timeout: float = MEASURE_TIMEOUT,
) -> dict:
    """Train a configuration for a few steps in a child process and return its peak memory.

    The child (`python -m unetpp_tf.planning --measure SPEC --result FILE`) builds the model as training
    does (`training.model_from_config`, the augmenting wrapper when `augment="device"`),
    compiles it with Adam and the run's loss, and trains `steps` batches of random data of
    the planned shape. It reports its own peak: the resident set on the CPU
    (`getrusage(RUSAGE_SELF).ru_maxrss`), and with a GPU also the device's peak allocation.

    Args:
        settings: dict. TrainConfig fields of the candidate ("depth", "filters",
            "batch_size", "recompute", optional "arch", "deep_supervision", "augment",
            "volume_mode", "mixed_precision").
        channels: int. Input channels.
        num_classes: int. Output classes (1 binary).
        input_shape: tuple. Spatial training shape.
        scans: bool. The data are scans (3D models for `volume_mode="3d"`). Defaults to False.
        steps: int. Training steps. Defaults to 3.
        timeout: float. Seconds before the child is stopped. Defaults to 600.

    Returns:
        dict: "rss_bytes" (the child's peak resident set), "gpu_bytes" (device peak, None
        without a GPU), "peak_bytes" (the one that counts: GPU when there is one, else RSS),
        "device" ("cpu" or "gpu"), "seconds".

    Raises:
        RuntimeError: the child failed (its last error lines are in the message).

    Example:
        >>> measure_peak_memory(dict(depth=2, filters=4, batch_size=2), channels=1, num_classes=1,
        ...                     input_shape=(32, 32))["peak_bytes"] / 2**30
        0.8
    """
    spec = dict(settings=_jsonable(settings), channels=int(channels), num_classes=int(num_classes),
                input_shape=[int(s) for s in input_shape], scans=bool(scans), steps=int(steps))
    with tempfile.TemporaryDirectory(prefix="unetpp-tf-measure-") as scratch:
        answer = Path(scratch) / "peak.json"
        command = [sys.executable, "-m", "unetpp_tf.planning", "--measure", json.dumps(spec), "--result", str(answer)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            what = _describe(settings, input_shape)
            raise RuntimeError(f"measuring the memory of {what} took over {timeout:g} s.") from None
        if result.returncode != 0 or not answer.is_file():
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"measuring the memory of {_describe(settings, input_shape)} failed:\n{tail}")
        return json.loads(answer.read_text())


def _jsonable(settings: dict) -> dict:
    return json.loads(json.dumps(settings))


_MODEL_FIELDS = ("arch", "depth", "filters", "batch_size", "recompute", "deep_supervision", "augment", "augmentation",
                 "patch_size", "volume_mode", "mixed_precision", "xla", "batch_norm", "upsampling", "encoder",
                 "dropout")


def _measure_in_this_process(spec: dict) -> dict:
    """The child's side of `measure_peak_memory`: train a few steps, report the peaks."""
    import resource
    import time

    import keras
    import numpy as np

    from unetpp_tf import losses
    from unetpp_tf.data import AugmentedModel
    from unetpp_tf.training import make_augmenter, model_from_config, training_policy, use_xla

    started = time.perf_counter()
    fields = {k: v for k, v in spec["settings"].items() if k in _MODEL_FIELDS}
    config = TrainConfig(data="synthetic-ct" if spec["scans"] else "synthetic", **fields)
    channels, num_classes, shape = spec["channels"], spec["num_classes"], tuple(spec["input_shape"])
    with training_policy(config):
        model = model_from_config(config, channels, num_classes)
        trainer = AugmentedModel(model, make_augmenter(config)) if config.augment == "device" else model
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss=losses.get("bce_dice" if num_classes == 1 else "ce_dice"),
                        jit_compile=use_xla(config.xla))
        rng = np.random.default_rng(0)
        images = rng.random((config.batch_size, *shape, channels), dtype=np.float32)
        masks = rng.integers(0, 2 if num_classes == 1 else num_classes, (config.batch_size, *shape, 1)).astype("int32")
        targets = [masks] * len(model.outputs) if len(model.outputs) > 1 else masks
        for _ in range(spec["steps"]):
            trainer.train_on_batch(images, targets)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    gpu = _gpu_peak()
    return dict(rss_bytes=int(rss), gpu_bytes=gpu, peak_bytes=int(gpu if gpu is not None else rss),
                device="gpu" if gpu is not None else "cpu", seconds=round(time.perf_counter() - started, 1))


def _gpu_peak() -> int | None:
    """Peak device memory of this process's first GPU, None without one."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
        return int(gpus[0].memory_stats().get("peak_bytes_in_use", 0)) if gpus else None
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


# ----------------------------------------------------------------------------- the plan


def _round_down(size: int, multiple: int) -> int:
    return max(multiple, (int(size) // multiple) * multiple)


def _round(size: float, multiple: int) -> int:
    return max(multiple, int(round(size / multiple)) * multiple)


def _pow2_floor(value: float) -> int:
    return 2 ** int(math.floor(math.log2(max(1.0, value))))


def _describe(settings: dict, shape) -> str:
    parts = [f"batch {settings['batch_size']}", f"{settings['filters']} filters", f"depth {settings['depth']}",
             "x".join(str(s) for s in shape)]
    if settings.get("recompute"):
        parts.append("recompute")
    return ", ".join(parts)


def _train_count(fp: Fingerprint, split) -> int:
    count = fp.num_images
    return max(1, count - int(round(count * split[1])) - int(round(count * split[2])))


def _object_diameter(fp: Fingerprint) -> float:
    """The median object's equivalent diameter in pixels (largest over the classes)."""
    dims = len(fp.sizes["median"])
    sizes = [row["object_size"]["median"] for row in fp.classes] or [0.0]
    volume = max(sizes)
    return 2.0 * (volume / math.pi) ** 0.5 if dims == 2 else 2.0 * (3.0 * volume / (4.0 * math.pi)) ** (1 / 3)


def _image_size_plan(fp: Fingerprint) -> tuple[dict, dict, tuple]:
    """(settings, reasons, training shape) for the size and the depth of an image dataset."""
    native = fp.median_size
    diameter = _object_diameter(fp)
    if fp.same_size and max(native) <= MAX_NATIVE:
        shape, how = native, "native"
    elif fp.same_size or (min(fp.sizes["min"]) >= 2 * CROP_SIDE and diameter < CROP_SIDE / 4):
        shape, how = (min(min(fp.sizes["min"]), CROP_SIDE),) * 2, "crop"  # square: 90-degree rotations
    else:  # square, so that 90-degree rotations apply
        side = min(RESIZE_PIXELS, _pixels(native)) ** 0.5
        shape, how = (side, side), "resize"
    depth = IMAGE_RECIPE["depth"]
    while depth > 2 and min(shape) / 2**depth < MIN_BOTTLENECK:
        depth -= 1
    large_objects = diameter >= 96 and min(shape) / 2**5 >= MIN_BOTTLENECK
    if large_objects:
        depth = 5
    multiple = 2**depth
    settings, reasons = {}, {}
    if how == "native":
        size = tuple(_round_down(s, multiple) for s in shape)
        settings["image_size"] = size
        if size == tuple(native):
            reasons["image_size"] = f"every image is {_hw(native)}: trained whole at its own size, nothing resampled"
        else:
            reasons["image_size"] = (f"every image is {_hw(native)}: resized slightly to {_hw(size)}, the nearest "
                                     f"multiple of {multiple} (depth {depth} downsamples {multiple}x)")
    elif how == "crop":
        size = tuple(_round_down(s, multiple) for s in shape)
        settings["crop_size"] = size
        settings["image_size"] = tuple(native)
        reasons["crop_size"] = (f"images are large ({_hw(fp.sizes['min'])} and up, objects ~{diameter:.0f} px): "
                                f"random {_hw(size)} crops at native scale")
        reasons["image_size"] = ("the native size: nothing resampled, crops keep the scale" if fp.same_size else
                                 "the median size (close to native scale) before cropping")
    else:
        size = tuple(_round(s, multiple) for s in shape)
        settings["image_size"] = size
        reasons["image_size"] = (f"sizes vary ({_hw(fp.sizes['min'])} to {_hw(fp.sizes['max'])}, median "
                                 f"{_hw(native)}): resized to a square of the median's pixels, at most "
                                 f"{RESIZE_PIXELS}, a multiple of {multiple}")
    settings["depth"] = depth
    if size[0] != size[1]:
        settings["augmentation"] = {**DEFAULT_AUGMENTATION, "rotate90": False}
        reasons["augmentation"] = f"{_hw(size)} is not square: the default augmentation without 90-degree rotations"
    bottleneck = min(size) // multiple
    if large_objects:
        reasons["depth"] = (f"objects are large (median ~{diameter:.0f} px across): 5 poolings, "
                            f"deepest map {bottleneck} px")
    elif depth == IMAGE_RECIPE["depth"]:
        reasons["depth"] = f"the recipe's {depth} poolings: deepest map {bottleneck} px, objects ~{diameter:.0f} px"
    else:
        reasons["depth"] = (f"{_hw(size)} images: {depth} poolings keep the deepest map at {bottleneck} px "
                            f"(>= {MIN_BOTTLENECK}); the accuracy benchmark's 64x64 recipe uses depth 3")
    return settings, reasons, size


def _hw(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _normalize_plan(fp: Fingerprint) -> tuple[str, str]:
    p99 = fp.intensity["p99.5"]
    if fp.effective_bits is not None and fp.bit_depth == 8:
        if p99 >= 0.25 * 255:
            return "fixed", (f"8-bit images using their range (99.5th percentile {p99:.0f} of 255): divided by "
                             "255 (base tiles: 0.958 with fixed and with dataset)")
        return "dataset", f"dim 8-bit images (99.5th percentile {p99:.0f} of 255): the training split's percentiles"
    if fp.effective_bits is not None:
        top = 2**fp.bit_depth - 1
        return "dataset", (f"{fp.bit_depth}-bit files holding {fp.effective_bits}-bit data (max {fp.effective_max:.0f}"
                           f" of {top}): the training split's 1st..99.8th percentiles to 0..1")
    return "dataset", (f"floating-point images ({fp.intensity['p1']:.3g}..{fp.intensity['p99']:.3g} at the 1st..99th "
                       "percentiles): the training split's percentiles to 0..1")


def _steps_plan(train_count: int) -> tuple[int, str]:
    default = TrainConfig.min_steps
    if train_count < TINY_SET:
        return 3 * default, (f"tiny training split ({train_count} images): at least {3 * default} optimizer steps "
                             f"(32 tiles: {default} stretched steps 0.951 vs 0.935 without)")
    if train_count < SMALL_SET:
        return 2 * default, (f"small training split ({train_count} images): at least {2 * default} steps "
                             "(base tiles: 0.964 at 600 steps vs 0.958 at 240)")
    return default, f"{train_count} training images: the recipe's {default} steps at least"


def _batch_cap(train_count: int, recipe_batch: int) -> tuple[int, str]:
    cap = recipe_batch if train_count < LARGE_SET else 2 * recipe_batch
    why = (f"the recipe's {cap} (small sets: batch 8 beat 16, 0.961 vs 0.958 binary, 0.855 vs 0.815 multi-class)"
           if cap == recipe_batch else f"{train_count} training images: {cap} per batch")
    half = _pow2_floor(train_count / 2)
    if half < cap:
        return half, f"{train_count} training images: at most half of them per batch"
    return cap, why


def _scan_plan(fp: Fingerprint, split) -> tuple[dict, dict, tuple, dict]:
    """(settings, reasons, training shape, recipe) for scans."""
    spacing = fp.spacing
    settings, reasons = {}, {}
    in_plane = min(spacing["median"][1:])
    anisotropy = spacing["median"][0] / in_plane
    mode = "2.5d" if anisotropy > 3.0 else "3d"
    settings["volume_mode"] = mode
    reasons["volume_mode"] = (f"slices {anisotropy:.1f}x thicker than the in-plane spacing: slice-wise with "
                              "neighbours as channels" if mode == "2.5d" else
                              f"spacing anisotropy {anisotropy:.1f} (<= 3): 3D patches")
    recipe = VOLUME_RECIPES[mode]
    varied = any(hi > lo * 1.1 for lo, hi in zip(spacing["min"], spacing["max"]))
    if varied:
        settings["spacing"] = tuple(round(s, 3) for s in spacing["median"])
        reasons["spacing"] = (f"voxel sizes differ between scans ({spacing['min']} to {spacing['max']} mm): "
                              "resampled to the median")
    depth = recipe["depth"]
    shape = tuple(fp.median_size)
    if mode == "3d":
        patch = tuple(min(p, _round_down(s, 2**depth)) for p, s in zip(recipe["patch_size"], shape))
    else:
        patch = tuple(min(p, _round_down(s, 2**depth)) for p, s in zip(recipe["patch_size"], shape[1:]))
    settings["patch_size"] = patch
    reasons["patch_size"] = (f"the recipe's {_hw(recipe['patch_size'])} patch" if patch == tuple(recipe["patch_size"])
                             else f"scans are {_hw(shape)} (median): the patch shrunk to {_hw(patch)}")
    settings["depth"] = depth
    reasons["depth"] = f"the {mode} recipe's {depth} poolings"
    ct = fp.intensity["p0.5"] < -500
    if not ct:
        settings["window"] = "zscore"
        reasons["window"] = (f"no Hounsfield units (values {fp.intensity['p0.5']:.3g}..{fp.intensity['p99.5']:.3g}): "
                             "MRI-like, z-scored per scan")
    settings["epochs"] = recipe["epochs"]
    reasons["epochs"] = f"the {mode} recipe's {recipe['epochs']} epochs"
    return settings, reasons, patch, recipe


def plan(
    fp: Fingerprint,
    *,
    memory_budget_gb: float | None = None,
    measure: bool = True,
    split=(0.7, 0.15, 0.15),
    arch: str = "unetpp",
    deep_supervision: bool = False,
    augment: str = "device",
) -> Plan:
    """Choose training settings for a fingerprinted dataset, within a memory budget.

    Args:
        fp: Fingerprint. From `unetpp_tf.data.fingerprint.fingerprint`.
        memory_budget_gb: float or None. The most memory training may take, in GB (host
            memory on the CPU, device memory with a GPU); None plans without a budget (the
            batch stays at its cap). Defaults to None.
        measure: bool. Verify the chosen configuration by training it for a few steps in a
            child process (`measure_peak_memory`); False relies on `estimate_memory`.
            Defaults to True.
        split: tuple. (train, val, test) fractions, for the training-split size.
            Defaults to (0.7, 0.15, 0.15).
        arch: str. "unetpp" or "unet" (for the memory figures). Defaults to "unetpp".
        deep_supervision: bool. Whether the run trains every head. Defaults to False.
        augment: str. The run's `augment` ("device" augments inside the measured step).
            Defaults to "device".

    Returns:
        Plan: settings, reasons, memory.

    Raises:
        ValueError: `memory_budget_gb` is too small for the smallest configuration (the
            message says what that one needs).

    Example:
        >>> chosen = plan(fingerprint("data/nuclei"), memory_budget_gb=2, measure=False)
        >>> chosen.settings["batch_size"], chosen.reasons["batch_size"]
    """
    if memory_budget_gb is not None and not memory_budget_gb > 0:
        raise ValueError(f"--memory-budget must be a positive number of GB, got {memory_budget_gb}.")
    train_count = _train_count(fp, split)
    if fp.kind == "scans":
        settings, reasons, shape, recipe = _scan_plan(fp, split)
    else:
        recipe = IMAGE_RECIPE
        settings, reasons, shape = _image_size_plan(fp)
        settings["normalize"], reasons["normalize"] = _normalize_plan(fp)
        settings["epochs"] = recipe["epochs"]
        reasons["epochs"] = f"the recipe's {recipe['epochs']} epochs; the steps below set the length"
        settings["min_steps"], reasons["min_steps"] = _steps_plan(train_count)
    if fp.kind == "scans":
        cap, cap_reason = recipe["batch_size"], f"the {settings['volume_mode']} recipe's {recipe['batch_size']}"
    else:
        cap, cap_reason = _batch_cap(train_count, recipe["batch_size"])
    channels = fp.channels * (TrainConfig.slices if fp.kind == "scans" and settings["volume_mode"] == "2.5d" else 1)
    fixed = dict(arch=arch, depth=settings["depth"], deep_supervision=deep_supervision, augment=augment)
    if fp.kind == "scans":
        fixed.update(volume_mode=settings["volume_mode"], patch_size=settings["patch_size"])
    if "augmentation" in settings:
        fixed["augmentation"] = settings["augmentation"]
    chosen, memory = _fit_memory(fp, fixed, recipe["filters"], cap, shape, channels, memory_budget_gb, measure)
    settings.update(batch_size=chosen["batch_size"], filters=chosen["filters"], recompute=chosen["recompute"])
    reasons["filters"] = (f"the recipe's {recipe['filters']}" if chosen["filters"] == recipe["filters"]
                          else f"halved to fit {memory_budget_gb:g} GB")
    budget = f"{memory_budget_gb:g} GB" if memory_budget_gb is not None else None
    peak = f"{memory['peak_gb']:.2f} GB {'measured' if memory['measured'] else 'estimated'}"
    if chosen["batch_size"] == cap:
        reasons["batch_size"] = cap_reason + (f"; fits {budget} ({peak})" if budget else f" ({peak})")
    else:
        reasons["batch_size"] = f"largest power of two that fits {budget} ({peak}; {cap} would not)"
    reasons["recompute"] = ("on: recomputing activations in the backward pass is what makes it fit "
                            f"{budget}") if chosen["recompute"] else "off: not needed to fit the budget (runs faster)"
    return Plan(settings=settings, reasons=reasons, memory=memory, fingerprint=fp.to_dict())


def _candidates(filters: int, cap: int) -> list[dict]:
    """Configurations from the largest down: the batch halved, then recompute, then half the width."""
    batches = [b for b in (cap, cap // 2, cap // 4, cap // 8, cap // 16) if b >= 2] or [1]
    found = [dict(batch_size=b, filters=filters, recompute=False) for b in batches]
    found += [dict(batch_size=b, filters=filters, recompute=True) for b in batches]
    found += [dict(batch_size=b, filters=max(4, filters // 2), recompute=True) for b in batches]
    found.append(dict(batch_size=1, filters=max(4, filters // 2), recompute=True))
    unique = []
    for candidate in found:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _data_bytes(fp: Fingerprint, shape) -> int:
    """The decoded dataset as the pipeline caches it (float32 images, int32 masks)."""
    if fp.kind == "scans":
        return int(min(fp.num_images, 10**6) * _pixels(fp.median_size) * (fp.channels * 4 + 1))
    return int(fp.num_images * _pixels(shape) * (fp.channels * 4 + 4))


def _fit_memory(fp, fixed, filters, cap, shape, channels, budget_gb, measure) -> tuple[dict, dict]:
    """The first candidate that fits the budget (estimated, then measured) and the memory record."""
    num_classes = fp.num_classes
    data = _data_bytes(fp, shape)
    candidates = _candidates(filters, cap)
    budget = None if budget_gb is None else budget_gb * GB
    tried, measurements = [], 0
    scans = fp.kind == "scans"

    def need(candidate, measured):
        host = measured["device"] == "cpu" if measured else True
        core = measured["peak_bytes"] if measured else estimate(candidate)
        return core * (1 + RUN_MARGIN) + (data if host else 0), (measured["device"] if measured else "cpu")

    def estimate(candidate):
        return estimate_memory({**fixed, **candidate}, channels, num_classes, shape)

    ratio, index, peak = 1.0, 0, 0  # ratio: measured over estimated, once something was measured
    while index < len(candidates):
        if budget is not None:  # skip what the (corrected) estimate already rules out
            while (index < len(candidates) - 1
                   and estimate(candidates[index]) * ratio * (1 + RUN_MARGIN) + data > budget):
                index += 1
        candidate = candidates[index]
        measured = None
        if measure and measurements < MAX_MEASUREMENTS:
            measured = measure_peak_memory({**fixed, **candidate}, channels=channels, num_classes=num_classes,
                                           input_shape=shape, scans=scans)
            measurements += 1
            ratio = measured["peak_bytes"] / estimate(candidate)
        peak, device = need(candidate, measured)
        tried.append(dict(**candidate, peak_gb=round(peak / GB, 3), measured=measured is not None))
        if budget is None or peak <= budget:
            return candidate, dict(budget_gb=budget_gb, peak_gb=round(peak / GB, 3), measured=measured is not None,
                                   device=device, data_gb=round(data / GB, 3), tried=tried)
        index += 1
    smallest = candidates[-1]
    raise ValueError(
        f"--memory-budget {budget_gb:g} GB is too small: the smallest configuration "
        f"({_describe({**fixed, **smallest}, shape)}) needs {peak / GB:.1f} GB; raise --memory-budget to at least "
        f"{math.ceil(peak / GB * 10) / 10:.1f}."
    )


# ----------------------------------------------------------------------------- output and train --auto


def format_plan(chosen: Plan) -> str:
    """The plan as a table: setting, value, reason; then the memory line.

    Example:
        >>> print(format_plan(plan(fingerprint("synthetic"), measure=False)))
    """
    rows = [(name, _value(value), chosen.reasons.get(name, "")) for name, value in chosen.settings.items()]
    width = max(len("setting"), *(len(r[0]) for r in rows))
    value_width = max(len("value"), *(len(r[1]) for r in rows))
    fp = chosen.fingerprint
    lines = [f"plan for {fp['source']}: {fp['num_images']} {'scans' if fp['kind'] == 'scans' else 'images'}, "
             f"median {_hw(fp['sizes']['median'])}, {fp['dtype']}, {fp['num_classes']} class(es)",
             f"{'setting':<{width}}  {'value':<{value_width}}  reason",
             f"{'-' * width}  {'-' * value_width}  {'-' * 6}"]
    lines += [f"{name:<{width}}  {value:<{value_width}}  {reason}" for name, value, reason in rows]
    memory = chosen.memory
    how = "measured" if memory["measured"] else "estimated"
    budget = f"budget {memory['budget_gb']:g} GB" if memory["budget_gb"] is not None else "no budget"
    lines.append(f"memory: {memory['peak_gb']:.2f} GB {how} on the {memory['device']} "
                 f"(dataset {memory['data_gb']:.2f} GB of it), {budget}")
    return "\n".join(lines)


def _value(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return "-" if value is None else str(value)


def planned_config(config: TrainConfig, given, memory_budget_gb: float | None = None, *,
                   measure: bool = True) -> tuple[TrainConfig, Plan]:
    """`train --auto`: the configuration with the planned settings, except those the user gave.

    Args:
        config: TrainConfig. The run's settings; its data (`data`, or `images`) is fingerprinted.
        given: set of str. TrainConfig fields set explicitly (flags, config file): kept as they are.
        memory_budget_gb: float or None. See `plan`. Defaults to None.
        measure: bool. See `plan`. Defaults to True.

    Returns:
        tuple: (TrainConfig with the plan applied, Plan). Write `plan.to_dict()` into the run.

    Raises:
        ValueError: the data is too small to fingerprint, or the budget too small.

    Example:
        >>> config, chosen = planned_config(TrainConfig(data="data/nuclei", epochs=20), given={"epochs"})
        >>> config.epochs, config.image_size
        (20, (64, 64))
    """
    given = set(given)
    if config.images or config.masks:
        raise ValueError("--auto fingerprints --data DIR; with --images/--masks pass a dataset folder as --data.")
    source = config.data
    fp = fingerprint(source, task=config.task, num_samples=config.num_samples if "num_samples" in given else None,
                     image_size=config.image_size if "image_size" in given and config.image_size else (96, 96))
    arch = config.arch if config.arch in ("unetpp", "unet") else "unetpp"
    chosen = plan(fp, memory_budget_gb=memory_budget_gb, measure=measure, split=config.split, arch=arch,
                  deep_supervision=config.deep_supervision, augment=config.augment)
    values = config.to_dict()
    if fp.kind == "scans" and "volume_mode" in given:  # the user's mode: its recipe's patch
        chosen.settings.pop("patch_size", None)
    for name, value in chosen.settings.items():
        if name in given or name not in values:
            continue
        if config.has_encoder and name in ("depth", "filters", "recompute"):
            continue  # the encoder's own shape
        values[name] = list(value) if isinstance(value, tuple) else value
    if "image_size" in given or "crop_size" in given:
        for name in ("image_size", "crop_size"):
            if name not in given and name in chosen.settings:
                values[name] = config.to_dict()[name]
    if fp.kind == "scans":  # recipe values follow the (possibly given) mode
        for name in ("image_size", "crop_size"):
            values[name] = None
    planned = TrainConfig.from_dict(values, source="plan")
    # a given depth, encoder or architecture downsamples otherwise: the planned sizes follow it
    multiple = planned.size_multiple()
    changes = {}
    for name in ("image_size", "crop_size"):
        value = getattr(planned, name)
        if fp.kind != "scans" and name not in given and name in chosen.settings and value is not None:
            if name == "image_size" and "crop_size" in chosen.settings and "crop_size" not in given:
                continue  # resized before cropping: any size
            if any(s % multiple for s in value):
                changes[name] = tuple(_round(s, multiple) for s in value)
                chosen.settings[name] = changes[name]
                chosen.reasons[name] += f"; rounded to {_hw(changes[name])} for the model's {multiple}x downsampling"
    return (dataclasses.replace(planned, **changes) if changes else planned), chosen


# ----------------------------------------------------------------------------- child process


def _main(argv=None) -> None:
    """The child: measure the spec, write its peaks to --result (an error exits non-zero with its traceback)."""
    import argparse

    from unetpp_tf import files

    parser = argparse.ArgumentParser(prog="python -m unetpp_tf.planning",
                                     description="Measure the peak memory of a few training steps (a planning child).")
    parser.add_argument("--measure", required=True, help="JSON spec (see measure_peak_memory)")
    parser.add_argument("--result", required=True, help="JSON file the peaks are written to")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    files.write_json(args.result, _measure_in_this_process(json.loads(args.measure)))


if __name__ == "__main__":
    _main()
