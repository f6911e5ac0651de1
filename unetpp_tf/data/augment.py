"""Joint image/mask augmentation as a Keras layer, so it runs on the accelerator.

Geometric transforms (flips, 90-degree rotations, rotation, zoom, translation, elastic
deformation) move image and mask with the same random parameters; masks are resampled
with nearest-neighbour interpolation only, so they keep integer class ids. Photometric
transforms (brightness, contrast, gamma, noise, blur) touch the image alone and are relative to
each image's own intensities: brightness shifts and noise scale with its spread (max - min),
contrast changes about its mean and gamma curves run over its [min, max]. A dim 16-bit image in
[0, 0.06] is then augmented like a full-range 8-bit one, and full-range images as before.

All geometric transforms are composed into one sampling map per image and applied in a
single resampling pass (bilinear for images, nearest for masks, mirrored borders). Keras'
RandomRotation/Zoom/Translation layers would do the same job with one interpolation
each, and they switch XLA off for the whole train step; this composed version stays
XLA-compatible and works on any backend (keras.ops only).

The layer is used in one of two places:
- on the device, inside the training step: `AugmentedModel(model, augmenter)` wraps a
  model so `fit` augments each batch where the model runs (the GPU when there is one). The
  draws come from the layer's `keras.random.SeedGenerator`, a new draw each step;
- on the host, in tf.data: pass `augment=augmenter` to a data source. Each batch then comes
  with its own seed from the pipeline (`unetpp_tf.data.pipeline.finalize`) and every draw is a
  stateless function of that seed (`tf.random.stateless_*`), so the augmented batches are the
  same for the same pipeline seed however many batches tf.data augments in parallel. This
  path needs Keras' TensorFlow backend (keras.ops on JAX cannot compute on tf.data's
  tensors; it is refused there with a clear error): on JAX augment on the device.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops


def _gaussian_taps(sigma: float):
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-radius, radius + 1)]
    return [t / sum(taps) for t in taps]


def _reflect(coords, size):
    """Mirror float pixel coordinates into [0, size - 1] (reflect padding)."""
    last = ops.cast(size - 1, "float32")
    period = 2.0 * ops.maximum(last, 1.0)
    coords = ops.mod(ops.abs(coords), period)
    return ops.where(coords > last, period - coords, coords)


def _sample(x, rows, cols, *, bilinear: bool):
    """Resample x [B, H, W, C] at float pixel positions rows/cols [B, H, W] (in range)."""
    shape = ops.shape(x)
    batch, height, width = shape[0], shape[1], shape[2]
    flat = ops.reshape(x, (-1, x.shape[-1]))
    base = ops.arange(batch)[:, None, None] * height * width

    def gather(r, c):
        r = ops.clip(ops.cast(r, "int32"), 0, height - 1)
        c = ops.clip(ops.cast(c, "int32"), 0, width - 1)
        return ops.take(flat, base + r * width + c, axis=0)

    if not bilinear:
        return gather(ops.round(rows), ops.round(cols))
    r0, c0 = ops.floor(rows), ops.floor(cols)
    wr, wc = (rows - r0)[..., None], (cols - c0)[..., None]
    top = gather(r0, c0) * (1 - wc) + gather(r0, c0 + 1) * wc
    bottom = gather(r0 + 1, c0) * (1 - wc) + gather(r0 + 1, c0 + 1) * wc
    return top * (1 - wr) + bottom * wr


def _intensity_range(images):
    """(min, max - min) of each image [B, H, W, C], shaped [B, 1, 1, 1]."""
    low = ops.min(images, axis=(1, 2, 3), keepdims=True)
    return low, ops.max(images, axis=(1, 2, 3), keepdims=True) - low


class _GeneratorDraws:
    """Random draws from a `keras.random.SeedGenerator`: new values on every call (any backend)."""

    def __init__(self, generator):
        self.generator = generator

    def uniform(self, shape, low, high):
        return keras.random.uniform(shape, low, high, seed=self.generator)

    def normal(self, shape):
        return keras.random.normal(shape, seed=self.generator)


class _StatelessDraws:
    """Random draws that are a pure function of a seed tensor [2]: the k-th draw uses fold_in(seed, k)."""

    def __init__(self, seed):
        self.seed = tf.cast(seed, tf.int64)
        self.count = 0

    def _next_seed(self):
        self.count += 1
        return tf.random.experimental.stateless_fold_in(self.seed, self.count)

    def uniform(self, shape, low, high):
        return tf.random.stateless_uniform(shape, self._next_seed(), low, high)

    def normal(self, shape):
        return tf.random.stateless_normal(shape, self._next_seed())


class JointAugmenter(keras.layers.Layer):
    """What the image and volume augmenters share: seeded draws, the call protocol, serialization.

    A subclass sets `spatial_rank` (2 or 3), `settings` (its arguments), `seed_generator` and
    `moves` (whether any geometric transform is on) and defines `_move(images, masks, draws)`,
    one resampling pass of images and float masks, and `_photometric(images, draws)`.
    """

    spatial_rank = 2
    layout = "[B, H, W, C]"

    def _keep(self, strengths: dict, **settings) -> None:
        """Check the strengths (numbers >= 0), keep every setting for `get_config`, seed the draws."""
        for key, value in strengths.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"augmentation {key} must be a number >= 0, got {value!r}.")
        value_range = settings["value_range"]
        settings["value_range"] = None if value_range is None else tuple(float(v) for v in value_range)
        self.settings = {**settings, **strengths}
        self.seed_generator = keras.random.SeedGenerator(settings["seed"])

    def build(self, images_shape=None, masks_shape=None):
        self.built = True

    def _draws(self, seed):
        """Where the random values come from: the seed generator, or stateless ops on `seed`."""
        if seed is None:
            return _GeneratorDraws(self.seed_generator)
        seed = tf.cast(seed, tf.int64)
        if self.settings["seed"] is not None:
            seed = tf.random.experimental.stateless_fold_in(seed, self.settings["seed"])
        return _StatelessDraws(seed)

    def __call__(self, images, masks, training=True, seed=None, **kwargs):
        if keras.backend.backend() != "tensorflow" and (seed is not None or tf.is_symbolic_tensor(images)):
            raise ValueError(
                f"{type(self).__name__} in tf.data (augment on the host) needs Keras' TensorFlow backend, but Keras "
                f"runs on {keras.backend.backend()}: keras.ops cannot compute on tf.data's tensors there. Augment on "
                "the device instead (--augment device, AugmentedModel), which runs on every backend."
            )
        return super().__call__(images, masks, training=training, seed=seed, **kwargs)

    def call(self, images, masks, training=True, seed=None):
        if not training:
            return images, masks
        if len(images.shape) != self.spatial_rank + 2:
            raise ValueError(
                f"{type(self).__name__} takes image batches {self.layout}, got shape {tuple(images.shape)}; "
                "use SegmentationAugmenter for 2D (and 2.5D) batches and VolumeAugmenter for volumes."
            )
        draws = self._draws(seed)
        mask_dtype = masks.dtype
        squeeze = len(masks.shape) == self.spatial_rank + 1
        images = ops.cast(images, "float32")
        masks = ops.cast(masks[..., None] if squeeze else masks, "float32")
        if self.moves:
            images, masks = self._move(images, masks, draws)
        images = self._photometric(images, draws)
        masks = ops.cast(masks[..., 0] if squeeze else masks, mask_dtype)
        return images, masks

    def compute_output_spec(self, images, masks, training=True, seed=None):
        return keras.KerasTensor(images.shape, "float32"), keras.KerasTensor(masks.shape, masks.dtype)

    def get_config(self):
        return {**super().get_config(), **self.settings}


@keras.saving.register_keras_serializable(package="unetpp_tf")
class SegmentationAugmenter(JointAugmenter):
    """Random joint augmentation of an image batch and its mask batch.

    Call it as `images, masks = augmenter(images, masks, training=True)`; with
    `training=False` both pass through unchanged. Masks may be [B, H, W] or [B, H, W, 1]
    of any integer or float dtype and come back with the same shape and dtype.

    Randomness: without `seed=` in the call, the draws come from the layer's seed generator
    (seeded with `seed`), new on every call. With `seed=` (an integer tensor of shape [2], as
    the host pipeline gives each batch), the draws are a pure function of that seed and of
    the layer's `seed` setting: the same call gives the same batch (TensorFlow backend).

    Args:
        flip: bool. Random horizontal and vertical flips. Defaults to True.
        rotate90: bool. Random multiples of 90 degrees (square images only).
            Defaults to True.
        rotation: float. Maximum rotation as a fraction of a full turn (0.1 = 36
            degrees). Defaults to 0.0.
        zoom: float. Maximum zoom in or out as a fraction of the size. Defaults to 0.0.
        translation: float. Maximum shift as a fraction of the size. Defaults to 0.0.
        elastic: float. Elastic deformation strength: displacement in pixels of a
            smooth random field. Defaults to 0.0.
        brightness: float. Maximum additive brightness change, as a fraction of each
            image's intensity spread (max - min). Defaults to 0.0.
        contrast: float. Maximum relative contrast change about each image's mean.
            Defaults to 0.0.
        gamma: float. Maximum |log gamma| of a random gamma curve over each image's own
            [min, max]. Defaults to 0.0.
        noise: float. Maximum standard deviation of additive Gaussian noise, as a fraction
            of each image's intensity spread. Defaults to 0.0.
        blur: float. Probability of a Gaussian blur (sigma 1 pixel). Defaults to 0.0.
        value_range: tuple or None. Clip images to this range after photometric
            changes; None for normalized images. Defaults to (0.0, 1.0).
        seed: int or None. Seed for reproducible draws. Defaults to None.

    Example:
        >>> augmenter = SegmentationAugmenter(rotation=0.05, zoom=0.1, brightness=0.1, seed=0)
        >>> images, masks = augmenter(images, masks, training=True)
        >>> again = augmenter(images, masks, training=True, seed=tf.constant([3, 7]))  # a pure function of [3, 7]
    """

    def __init__(
        self,
        flip: bool = True,
        rotate90: bool = True,
        rotation: float = 0.0,
        zoom: float = 0.0,
        translation: float = 0.0,
        elastic: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        gamma: float = 0.0,
        noise: float = 0.0,
        blur: float = 0.0,
        value_range=(0.0, 1.0),
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= blur <= 1.0:
            raise ValueError(f"augmentation blur is a probability in [0, 1], got {blur}.")
        self._keep(
            dict(rotation=rotation, zoom=zoom, translation=translation, elastic=elastic, brightness=brightness,
                 contrast=contrast, gamma=gamma, noise=noise),
            flip=flip, rotate90=rotate90, blur=blur, value_range=value_range, seed=seed,
        )
        self.moves = flip or rotate90 or rotation or zoom or translation or elastic

    def _sampling_map(self, images, draws):
        """Source pixel positions (rows, cols) [B, H, W] for all geometric transforms at once."""
        s = self.settings

        def uniform(low, high):
            return draws.uniform((batch, 1, 1, 1), low, high)[..., 0]

        shape = ops.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        if s["rotate90"] and (images.shape[1] is None or images.shape[1] != images.shape[2]):
            raise ValueError(
                f"rotate90 needs square images of a known size, got {images.shape[1]}x{images.shape[2]}; "
                "set rotate90=False or crop/resize to a square."
            )
        center_y = ops.cast(height - 1, "float32") / 2.0
        center_x = ops.cast(width - 1, "float32") / 2.0
        y = ops.cast(ops.arange(height), "float32")[None, :, None] - center_y + ops.zeros((batch, 1, 1))
        x = ops.cast(ops.arange(width), "float32")[None, None, :] - center_x + ops.zeros((batch, 1, 1))
        if s["flip"]:
            y = y * ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
            x = x * ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        if s["rotate90"]:  # exact quarter turns: cos/sin from a table, not from pi/2
            k = ops.cast(ops.floor(uniform(0.0, 4.0)), "int32")
            cos = ops.take(ops.convert_to_tensor([1.0, 0.0, -1.0, 0.0]), k)
            sin = ops.take(ops.convert_to_tensor([0.0, 1.0, 0.0, -1.0]), k)
            y, x = cos * y - sin * x, sin * y + cos * x
        if s["rotation"]:
            angle = uniform(-2 * math.pi * s["rotation"], 2 * math.pi * s["rotation"])
            cos, sin = ops.cos(angle), ops.sin(angle)
            y, x = cos * y - sin * x, sin * y + cos * x
        if s["zoom"]:
            scale = uniform(1.0 - s["zoom"], 1.0 + s["zoom"])
            y, x = y / scale, x / scale
        rows, cols = y + center_y, x + center_x
        if s["translation"]:
            shift = s["translation"]
            rows = rows - uniform(-shift, shift) * ops.cast(height, "float32")
            cols = cols - uniform(-shift, shift) * ops.cast(width, "float32")
        if s["elastic"]:
            coarse = draws.normal((batch, 6, 6, 2))
            field = ops.image.resize(coarse, (height, width), interpolation="bicubic") * s["elastic"]
            rows, cols = rows + field[..., 0], cols + field[..., 1]
        return _reflect(rows, height), _reflect(cols, width)

    def _photometric(self, images, draws):
        s = self.settings
        batch = ops.shape(images)[0]

        def uniform(low, high):
            return draws.uniform((batch, 1, 1, 1), low, high)

        _, spread = _intensity_range(images)
        if s["brightness"]:
            images = images + uniform(-s["brightness"], s["brightness"]) * spread
        if s["contrast"]:
            mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
            images = (images - mean) * uniform(1 - s["contrast"], 1 + s["contrast"]) + mean
        if s["gamma"]:
            now_low, now_spread = _intensity_range(images)
            unit = (images - now_low) / ops.maximum(now_spread, 1e-12)
            images = unit ** ops.exp(uniform(-s["gamma"], s["gamma"])) * now_spread + now_low
        if s["noise"]:
            sigma = uniform(0.0, s["noise"]) * spread
            images = images + sigma * draws.normal(ops.shape(images))
        if s["blur"]:
            taps = ops.convert_to_tensor(_gaussian_taps(1.0), "float32")
            channels = images.shape[-1]
            vertical = ops.tile(ops.reshape(taps, (-1, 1, 1, 1)), (1, 1, channels, 1))
            horizontal = ops.tile(ops.reshape(taps, (1, -1, 1, 1)), (1, 1, channels, 1))
            blurred = ops.depthwise_conv(images, vertical, padding="same")
            blurred = ops.depthwise_conv(blurred, horizontal, padding="same")
            apply = uniform(0.0, 1.0) < s["blur"]
            images = ops.where(apply, blurred, images)
        if s["value_range"] is not None:
            images = ops.clip(images, *s["value_range"])
        return images

    def _move(self, images, masks, draws):
        rows, cols = self._sampling_map(images, draws)
        return _sample(images, rows, cols, bilinear=True), _sample(masks, rows, cols, bilinear=False)


@keras.saving.register_keras_serializable(package="unetpp_tf")
class AugmentedModel(keras.Model):
    """Wrap a segmentation model so `fit` augments every batch inside the train step.

    The augmentation then runs where the model runs (on the GPU when there is one), not
    in the host input pipeline. Prediction and evaluation see the data unchanged. With
    a deep-supervision model the dataset may give one mask per sample or one per head
    (`targets_per_head`, needed under a distribution strategy); the mask is augmented once
    and fed to every head. Save `wrapper.model`, the plain model, for deployment. Works on the
    TensorFlow, JAX and PyTorch backends (on JAX inside the jitted, stateless train step).

    Args:
        model: keras.Model. The segmentation model.
        augmenter: SegmentationAugmenter. The random transform.

    Example:
        >>> trainer = AugmentedModel(model, SegmentationAugmenter(rotation=0.05, seed=0))
        >>> trainer.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
        >>> trainer.fit(data.train, validation_data=data.val, epochs=10)
    """

    def __init__(self, model, augmenter, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.augmenter = augmenter
        augmenter.build()  # no weights: built now, so fit does not take a training batch to build it (JAX)
        if hasattr(model, "output_names"):  # functional models: losses and metrics keyed per head
            self.output_names = model.output_names
        self.built = model.built  # the weights are the wrapped model's

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def _targets(self, masks):
        if masks is None:
            return None
        if isinstance(masks, (tuple, list)):  # already one copy per head (targets_per_head)
            masks = masks[0]
        heads = len(self.model.outputs)
        return masks if heads == 1 else tuple(masks for _ in range(heads))

    def train_step(self, *args):
        """Augment the batch, then take the backend's own train step on it.

        TensorFlow and PyTorch call `train_step(data)` and the augmenter's seed generator moves
        on as a variable. JAX calls the stateless `train_step(state, data)`: the augmenter runs in
        a `keras.StatelessScope` over the non-trainable variables (its seed generator's state is
        one of them) and the advanced seed goes into the state the JAX step returns, so every
        jitted step draws anew and a fixed seed repeats the same steps.
        """
        if keras.backend.backend() != "jax":
            (data,) = args
            return super().train_step(self._augmented(data))
        (trainable, non_trainable, optimizer_variables, metrics_variables), data = args
        with keras.StatelessScope(state_mapping=list(zip(self.non_trainable_variables, non_trainable))) as scope:
            data = self._augmented(data)
        non_trainable = [
            value if scope.get_current_value(variable) is None else scope.get_current_value(variable)
            for variable, value in zip(self.non_trainable_variables, non_trainable)
        ]
        return super().train_step((trainable, non_trainable, optimizer_variables, metrics_variables), data)

    def _augmented(self, data):
        images, masks, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(masks, (tuple, list)):  # one copy per head (targets_per_head): augment one
            masks = masks[0]
        images, masks = self.augmenter(images, masks, training=True)
        return images, masks, sample_weight

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled loss, with the mask fed to every head (in every step and in Keras' symbolic build)."""
        return super().compute_loss(x, self._targets(y), y_pred, sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The compiled metrics, with the mask fed to every head."""
        return super().compute_metrics(x, self._targets(y), y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "augmenter": keras.saving.serialize_keras_object(self.augmenter),
        }

    @classmethod
    def from_config(cls, config):
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        config["augmenter"] = keras.saving.deserialize_keras_object(config["augmenter"])
        return cls(**config)
