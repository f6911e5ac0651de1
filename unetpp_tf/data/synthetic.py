"""A built-in synthetic dataset that looks like fluorescence microscopy of nuclei.

Every sample is a pure function of (seed, index), rendered with TensorFlow ops inside the
tf.data pipeline, so nothing is downloaded or stored. An image holds many bright blobs
(ellipses of varied size, elongation, orientation and brightness, some touching or
overlapping) with internal texture, on an unevenly lit background, blurred and noisy. Dim
nuclei on bright background regions defeat a global threshold, so the task needs context.

The "multiclass" task adds rotated rectangles: class 1 = ellipses, class 2 = rectangles,
0 = background. Shape, not brightness, tells them apart.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from unetpp_tf.data.pipeline import SegmentationData, finalize, split_cache, split_indices

TASKS = {"binary": 1, "multiclass": 3}
MAX_OBJECTS = 28


def _uniform(seed, salt: int, shape, low=0.0, high=1.0):
    return tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, salt), low, high)


def _smooth_field(seed, salt: int, height: int, width: int, cells: int):
    """A smooth random field in [0, 1]: a coarse grid of uniforms resized bilinearly."""
    coarse = _uniform(seed, salt, (1, cells, cells, 1))
    return tf.image.resize(coarse, (height, width), method="bicubic")[0, :, :, 0]


def _gaussian_blur(image, sigma: float):
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = tf.constant(taps / taps.sum(), tf.float32)
    x = image[None, :, :, None]
    x = tf.nn.conv2d(x, tf.reshape(taps, (-1, 1, 1, 1)), 1, "SAME")
    x = tf.nn.conv2d(x, tf.reshape(taps, (1, -1, 1, 1)), 1, "SAME")
    return x[0, :, :, 0]


def synthetic_sample(index, *, seed: int = 0, image_size=(96, 96), task: str = "binary", channels: int = 1):
    """Render sample `index` of the synthetic dataset (a pure function of seed and index).

    Args:
        index: int or scalar tensor. Sample number.
        seed: int. Dataset seed. Defaults to 0.
        image_size: tuple. (height, width). Defaults to (96, 96).
        task: str. "binary" (nuclei vs background) or "multiclass" (ellipses = 1,
            rectangles = 2). Defaults to "binary".
        channels: int. 1 (gray) or 3 (tinted RGB). Defaults to 1.

    Returns:
        tuple: image float32 [H, W, channels] in [0, 1], mask int32 [H, W, 1].

    Example:
        >>> image, mask = synthetic_sample(0, image_size=(64, 64))
    """
    height, width = image_size
    seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
    k = MAX_OBJECTS
    scale = float(min(height, width))

    count = tf.cast(_uniform(seed, 1, (), 0.35, 1.0) * k, tf.int32)
    active = tf.range(k) < count
    cy = _uniform(seed, 2, (k,), -0.05, 1.05) * height
    cx = _uniform(seed, 3, (k,), -0.05, 1.05) * width
    radius = scale * tf.exp(_uniform(seed, 4, (k,), math.log(0.035), math.log(0.1)))
    elongation = _uniform(seed, 5, (k,), 0.55, 1.0)
    angle = _uniform(seed, 6, (k,), 0.0, math.pi)
    brightness = _uniform(seed, 7, (k,), 0.22, 0.85)
    if task == "multiclass":
        label = tf.where(_uniform(seed, 8, (k,)) < 0.5, 1, 2)
    else:
        label = tf.ones((k,), tf.int32)

    ys = tf.range(height, dtype=tf.float32)[None, :, None] + 0.5
    xs = tf.range(width, dtype=tf.float32)[None, None, :] + 0.5
    dy = ys - cy[:, None, None]
    dx = xs - cx[:, None, None]
    cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
    u = (dx * cos + dy * sin) / radius[:, None, None]
    v = (-dx * sin + dy * cos) / (radius * elongation)[:, None, None]
    ellipse = tf.sqrt(u**2 + v**2)
    rectangle = tf.maximum(tf.abs(u), tf.abs(v)) * 1.15
    distance = tf.where((label == 2)[:, None, None], rectangle, ellipse)  # 1 on the boundary
    inside = (distance <= 1.0) & active[:, None, None]

    # The mask: the class of the top-most (last drawn) object covering the pixel.
    depth_order = tf.where(inside, tf.range(1, k + 1)[:, None, None], 0)
    top = tf.reduce_max(depth_order, axis=0)
    mask = tf.where(top > 0, tf.gather(tf.concat([[0], label], 0), top), 0)

    # The image: soft-edged objects with texture on an uneven, noisy background.
    profile = tf.sigmoid((1.0 - distance) * 6.0) * tf.cast(active, tf.float32)[:, None, None]
    texture = 0.75 + 0.5 * _smooth_field(seed, 9, height, width, max(4, int(scale // 8)))
    objects = tf.reduce_max(profile * brightness[:, None, None], axis=0) * texture
    background = 0.05 + 0.4 * _smooth_field(seed, 10, height, width, 3)
    image = _gaussian_blur(background + objects, 1.0)
    noise_level = _uniform(seed, 11, (), 0.02, 0.08)
    noise_seed = tf.random.experimental.stateless_fold_in(seed, 12)
    image = image + noise_level * tf.random.stateless_normal((height, width), noise_seed)
    image = tf.clip_by_value(image, 0.0, 1.0)[:, :, None]
    if channels == 3:
        tint = _uniform(seed, 13, (3,), 0.7, 1.0)
        image = image * tint
    return image, tf.cast(mask, tf.int32)[:, :, None]


def synthetic(
    num_samples: int = 512,
    *,
    image_size=(96, 96),
    task: str = "binary",
    channels: int = 1,
    split=(0.7, 0.15, 0.15),
    seed: int = 0,
    batch_size: int = 8,
    shuffle: bool = True,
    cache: bool | str = True,
    augment=None,
) -> SegmentationData:
    """The built-in dataset: seeded synthetic fluorescence-nuclei images, no download.

    Args:
        num_samples: int. Samples in all splits together. Defaults to 512.
        image_size: tuple. (height, width). Defaults to (96, 96).
        task: str. "binary" (num_classes 1) or "multiclass" (3 classes: background,
            ellipses, rectangles). Defaults to "binary".
        channels: int. 1 or 3. Defaults to 1.
        split: tuple. (train, val, test) fractions. Defaults to (0.7, 0.15, 0.15).
        seed: int. Picks both the images and the split. Defaults to 0.
        batch_size: int. Defaults to 8.
        shuffle: bool. Shuffle the training split each epoch. Defaults to True.
        cache: bool or str. True caches rendered samples in memory, a path prefix caches on
            disk (as `{path}_{split}`), False disables. Defaults to True.
        augment: callable or None. Host-side augmentation of training batches (see
            `finalize`). Defaults to None.

    Returns:
        SegmentationData: batched train/val/test datasets.

    Example:
        >>> data = synthetic(num_samples=64, image_size=(64, 64), batch_size=4)
        >>> images, masks = next(iter(data.train))
        >>> images.shape, masks.shape
        (TensorShape([4, 64, 64, 1]), TensorShape([4, 64, 64, 1]))
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 8:
        raise ValueError(f"image_size must be (height, width) of at least 8 pixels, got {image_size!r}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    parts = split_indices(num_samples, split, seed)

    def render(index):
        return synthetic_sample(index, seed=seed, image_size=image_size, task=task, channels=channels)

    datasets = {}
    for name, indices in parts.items():
        samples = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        samples = samples.map(render, num_parallel_calls=tf.data.AUTOTUNE)
        datasets[name] = finalize(
            samples,
            batch_size=batch_size,
            shuffle=shuffle and name == "train",
            seed=seed,
            cache=split_cache(cache, name),
            augment=augment if name == "train" else None,
        )
    return SegmentationData(
        **datasets,
        num_classes=TASKS[task],
        channels=channels,
        image_size=image_size,
        counts={name: len(indices) for name, indices in parts.items()},
        source=f"synthetic:{task}",
    )
