"""Per-sample geometry: resize (images bilinear, masks nearest), normalize, and crop image and mask together.

Masks are never interpolated, so they keep integer class ids; a crop cuts the same window out
of image and mask.
"""

from __future__ import annotations

import tensorflow as tf

from unetpp_tf.data.readers import scale_to_unit


def preprocess_pair(
    image: tf.Tensor,
    mask: tf.Tensor,
    *,
    image_size: tuple[int, int] | None = None,
    normalization: tuple | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Scale, resize (image bilinear, mask nearest) and normalize one sample.

    Args:
        image: tf.Tensor. [H, W, C] uint8, uint16 or float.
        mask: tf.Tensor. [H, W, 1] integer class ids.
        image_size: tuple or None. (height, width) to resize to; None keeps the size.
            Defaults to None.
        normalization: tuple or None. (mean, std) from `resolve_normalization`, applied after
            scaling to [0, 1]. Defaults to None.

    Returns:
        tuple: (float32 [h, w, C] image, int32 [h, w, 1] mask).

    Example:
        >>> image, mask = tf.zeros([40, 50, 3], tf.uint8), tf.zeros([40, 50, 1], tf.int32)
        >>> x, y = preprocess_pair(image, mask, image_size=(32, 32))
    """
    image = scale_to_unit(image)
    mask = tf.cast(mask, tf.int32)
    if image_size is not None:
        image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
        mask = tf.image.resize(mask, image_size, method="nearest")
    if normalization is not None:
        mean, std = normalization
        image = (image - tf.constant(mean)) / tf.constant(std)
    return image, mask


def center_crop_pair(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop the same centred `size` window out of image and mask."""
    shape = tf.shape(image)
    top = (shape[0] - size[0]) // 2
    left = (shape[1] - size[1]) // 2
    return _crop(image, mask, top, left, size)


def random_crop_pair(
    image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop the same random `size` window out of image and mask (stateless, from `seed` [2])."""
    shape = tf.shape(image)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    top = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - size[1] + 1, dtype=tf.int32)
    return _crop(image, mask, top, left, size)


def _crop(image, mask, top, left, size):
    shape = tf.shape(image)
    check = tf.debugging.assert_greater_equal(
        shape[:2], tf.constant(size, tf.int32), message=f"image smaller than crop_size {size}"
    )
    with tf.control_dependencies([check]):
        image = image[top : top + size[0], left : left + size[1]]
        mask = mask[top : top + size[0], left : left + size[1]]
    image.set_shape([size[0], size[1], image.shape[-1]])
    mask.set_shape([size[0], size[1], mask.shape[-1]])
    return image, mask
