"""Drop-in Keras layers that do the same work in fewer passes over memory on TensorFlow.

UNet++ runs 2 normalizations and 2 dropouts per node on full-resolution tensors, so the
elementwise layers cost a large share of a training step. Keras 3 computes both from
generic ops: BatchNormalization as about ten elementwise ops forward and more backward,
and Dropout as a random draw, a compare, a multiply and a select, keeping the mask for the
backward pass. These subclasses use one kernel each way instead:

- `FusedBatchNormalization`: TensorFlow's fused batch-norm op (oneDNN on CPU, cuDNN on GPU).
  TensorFlow only: on other backends it computes Keras' BatchNormalization (the same values;
  under JAX, XLA fuses those ops itself), which it logs once.
- `FusedDropout`: a counter-based hash mask applied in one loop (an XLA-compiled kernel on
  TensorFlow, jax.numpy under `jax.custom_vjp` on JAX); the gradient regenerates the mask
  from the seed, so no mask is stored. Both backends draw the same mask for the same seed.

Both keep Keras' variables, configuration and results, and fall back to the Keras code for
the options the fast path does not cover (and, for dropout, on backends other than these two).

The decoder's concatenations get the same treatment on every backend: `ConcatConv2D` is a
`Conv2D` over the concatenation of its inputs (the same single kernel, so the same weights and
parameter count) that in training computes a sum of convolutions over the parts with the
matching kernel slices, so neither the concatenation nor the slices of its gradient exist;
`ConcatConv3D` is the same for `Conv3D` (volumes).

`VolumeUpsampling` is the 3D upsampling of the volume models: nearest or trilinear, any
integer factor per axis, from slices, sums and rank <= 4 reshapes (TFLite builtins only).
"""

from __future__ import annotations

import functools
import logging

import keras
import numpy as np

logger = logging.getLogger(__name__)

_UINT32 = 2**32
_GOLDEN = 0x9E3779B9  # added to the first seed word before hashing
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # Wellons' lowbias32
_logged = set()


def _on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def _log_once(key: str, message: str) -> None:
    """Log `message` the first time `key` is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


@keras.saving.register_keras_serializable(package="unetpp_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel.

    Used for 4-D (images) and 5-D (volumes) channels-last inputs on the TensorFlow backend;
    masks, renormalization, synchronized statistics and other layouts take the Keras path.
    The moving statistics follow Keras' rule (biased batch variance, `momentum` as the
    decay), so weights move freely between the two layers.

    Example:
        >>> layer = FusedBatchNormalization()
        >>> tuple(layer(np.ones((2, 4, 4, 3), "float32"), training=True).shape)
        (2, 4, 4, 3)
    """

    def _fusable(self, inputs, mask) -> bool:
        if not _on_tensorflow():
            _log_once(
                "batchnorm",
                f"FusedBatchNormalization: TensorFlow's fused kernel is not available on the "
                f"{keras.backend.backend()} backend; computing Keras' BatchNormalization (the same values).",
            )
            return False
        return (
            mask is None
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) in (4, 5)
            and self.axis in (len(inputs.shape) - 1, -1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.convert_to_tensor(inputs)
        if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            x = tf.cast(x, tf.float32)
        channels = x.shape[-1]
        layout = "NHWC" if len(x.shape) == 4 else "NDHWC"
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((channels,), tf.float32)
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros((channels,), tf.float32)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format=layout, is_training=True
            )
            # The fused op returns the unbiased variance; Keras averages the biased one.
            count = tf.cast(tf.size(x) // channels, tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
                data_format=layout, is_training=False,
            )
        return tf.cast(y, self.compute_dtype)


def _lowbias32_tf(h):
    """A 32-bit integer hash with low bias (Wellons' `lowbias32` constants), on uint32 tf tensors."""
    import tensorflow as tf

    for shift, multiplier in zip((16, 15), _MULTIPLIERS):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, shift)) * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


def _lowbias32_jax(h):
    """`_lowbias32_tf` on uint32 jax arrays (unsigned shifts, products wrap modulo 2**32)."""
    import jax.numpy as jnp

    for shift, multiplier in zip((16, 15), _MULTIPLIERS):
        h = (h ^ (h >> shift)) * jnp.uint32(multiplier)
    return h ^ (h >> 16)


@functools.cache
def _tf_mask_kernel():
    """The XLA-compiled TensorFlow kernel: x * scale where hash(index, keys) >= threshold, else 0."""
    import tensorflow as tf

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def apply(x, keys, threshold, scale):
        index = tf.cast(tf.reshape(tf.range(tf.size(x)), tf.shape(x)), tf.uint32)
        bits = _lowbias32_tf(_lowbias32_tf(tf.bitwise.bitwise_xor(index, keys[0])) + keys[1])
        return tf.where(bits >= threshold, x * tf.cast(scale, x.dtype), tf.zeros_like(x))

    return apply


def _hash_dropout_tf(x, threshold: int, scale: float, seed):
    import tensorflow as tf

    apply = _tf_mask_kernel()
    x = tf.convert_to_tensor(x)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    words = tf.cast(tf.bitwise.bitwise_and(seed, _UINT32 - 1), tf.uint32)
    first = _lowbias32_tf(words[0] + tf.constant(_GOLDEN, tf.uint32))
    keys = tf.stack([first, _lowbias32_tf(tf.bitwise.bitwise_xor(words[1], first))])
    threshold = tf.constant(threshold, tf.uint32)
    scale = tf.constant(scale, tf.float32)

    @tf.custom_gradient
    def dropout(inputs):
        def grad(upstream):
            return apply(upstream, keys, threshold, scale)

        return apply(inputs, keys, threshold, scale), grad

    return dropout(x)


@functools.cache
def _jax_dropout(threshold: int, scale: float):
    """The JAX form of the TensorFlow kernel, a `jax.custom_vjp` whose backward pass rebuilds the mask."""
    import jax
    import jax.numpy as jnp

    def apply(x, keys):
        index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
        bits = _lowbias32_jax(_lowbias32_jax(index ^ keys[0]) + keys[1])
        return jnp.where(bits >= jnp.uint32(threshold), x * jnp.asarray(scale, jnp.float32).astype(x.dtype), 0)

    @jax.custom_vjp
    def dropout(x, keys):
        return apply(x, keys)

    def forward(x, keys):
        return apply(x, keys), keys

    def backward(keys, upstream):
        return apply(upstream, keys), np.zeros(keys.shape, jax.dtypes.float0)

    dropout.defvjp(forward, backward)
    return dropout


def _hash_dropout_jax(x, threshold: int, scale: float, seed):
    import jax.numpy as jnp

    x = jnp.asarray(x)
    words = jnp.asarray(seed).astype(jnp.uint32)  # two's complement, as the TensorFlow path's mask to 32 bits
    first = _lowbias32_jax(words[0] + jnp.uint32(_GOLDEN))
    keys = jnp.stack([first, _lowbias32_jax(words[1] ^ first)])
    return _jax_dropout(threshold, scale)(x, keys)


def hash_dropout(x, rate: float, seed):
    """Inverted dropout of `x` at `rate` with a mask that is a pure function of `seed`.

    Element k is kept when a hash of (k, seed) lands above `rate` of the 32-bit range, and
    kept values are scaled by 1 / (1 - rate). The same seed gives the same mask, on the
    TensorFlow and the JAX backend alike, and the gradient regenerates the mask instead of
    storing it.

    Args:
        x: float tensor.
        rate: float in [0, 1). Fraction of elements set to zero.
        seed: integer tensor of shape (2,), e.g. `keras.random.SeedGenerator().next()`.

    Example:
        >>> y = hash_dropout(np.ones((4, 8, 8, 2), "float32"), 0.5, np.array([1, 2]))
        >>> sorted(set(np.asarray(y).ravel().tolist()))
        [0.0, 2.0]
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
    threshold = min(int(round(rate * _UINT32)), _UINT32 - 1)
    scale = 1.0 / (1.0 - rate)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _hash_dropout_tf(x, threshold, scale, seed)
    if backend == "jax":
        return _hash_dropout_jax(x, threshold, scale, seed)
    raise ValueError(
        f"hash_dropout runs on the TensorFlow and JAX backends, not {backend!r}; use keras.random.dropout there."
    )


@keras.saving.register_keras_serializable(package="unetpp_tf")
class FusedDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` with a one-pass hash mask on the TensorFlow and JAX backends.

    Each training call draws a new seed from the layer's seed generator and applies
    `hash_dropout` (the same mask on both backends); `apply_mask(inputs, seed)` is the same
    transform for a given seed, for callers that replay a forward pass. `noise_shape` and
    other backends use Keras' dropout.

    Example:
        >>> layer = FusedDropout(0.5, seed=1)
        >>> y = layer(np.ones((2, 8, 8, 4), "float32"), training=True)
        >>> sorted(set(np.asarray(y).ravel().tolist()))
        [0.0, 2.0]
    """

    def apply_mask(self, inputs, seed):
        """The training-mode output for `seed` (an integer tensor of shape (2,))."""
        return hash_dropout(inputs, self.rate, seed)

    def call(self, inputs, training=False):
        if not (training and 0.0 < self.rate < 1.0 and self.noise_shape is None
                and keras.backend.backend() in ("tensorflow", "jax")):
            return super().call(inputs, training=training)
        return self.apply_mask(inputs, self.seed_generator.next())


def _part_shapes(input_shape, layer_class: str, plain: str) -> list:
    """The list of part shapes in `input_shape` (a list of shapes), or a clear error."""
    shapes = list(input_shape) if isinstance(input_shape, (list, tuple)) else []
    if not shapes or not all(isinstance(shape, (list, tuple)) for shape in shapes):
        raise ValueError(
            f"{layer_class} takes a list of tensors (the parts of the concatenation), got input shape "
            f"{input_shape!r}; for a single tensor use keras.layers.{plain}."
        )
    return [tuple(shape) for shape in shapes]


class _ConcatConv:
    """The concatenation-free training call shared by `ConcatConv2D` and `ConcatConv3D`.

    Mixed in before a Keras convolution class (`Conv2D`, `Conv3D`), whose kernel has the shape
    (k..., sum of the part channels, filters); nothing here depends on the number of spatial axes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The convolution's input spec describes one tensor; this layer checks its list of parts itself.
        self.input_spec = None

    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _parts(self, input_shape) -> list:
        plain = type(self).__name__.removeprefix("Concat")
        return _part_shapes(input_shape, type(self).__name__, plain)

    def _merged_shape(self, input_shape) -> tuple:
        shapes = self._parts(input_shape)
        axis = self._channel_axis()
        channels = [shape[axis] for shape in shapes]
        if any(c is None for c in channels):
            raise ValueError(f"layer {self.name!r}: every part needs a known channel count, got shapes {shapes}.")
        others = {shape[:axis % len(shape)] + shape[axis % len(shape) + 1:] for shape in shapes}
        if len(others) > 1:
            raise ValueError(
                f"layer {self.name!r}: the parts must agree in every dimension but the channels, got shapes {shapes}."
            )
        merged = list(shapes[0])
        merged[axis] = sum(channels)
        return tuple(merged)

    def build(self, input_shape):
        if self.groups != 1:
            raise ValueError(
                f"layer {self.name!r}: {type(self).__name__} supports groups=1 only, got groups={self.groups}."
            )
        axis = self._channel_axis()
        self.part_channels = [shape[axis] for shape in self._parts(input_shape)]
        super().build(self._merged_shape(input_shape))
        self.input_spec = None

    def compute_output_shape(self, input_shape):
        # The convolution's build checks the merged (single-tensor) shape through this method too.
        if input_shape and isinstance(input_shape[0], (list, tuple)):
            input_shape = self._merged_shape(input_shape)
        return super().compute_output_shape(input_shape)

    def call(self, inputs, training=None):
        parts = list(inputs)
        channels = [part.shape[self._channel_axis()] for part in parts]
        if channels != self.part_channels:
            raise ValueError(
                f"layer {self.name!r} was built for parts with {self.part_channels} channels, got {channels}."
            )
        if not training:
            return super().call(keras.ops.concatenate(parts, axis=self._channel_axis()))
        kernel = keras.ops.cast(self.kernel, self.compute_dtype)  # one read of the variable for all slices
        outputs, start = None, 0
        for part, count in zip(parts, channels):
            term = keras.ops.conv(
                part, kernel[..., start:start + count, :], strides=self.strides, padding=self.padding,
                data_format=self.data_format, dilation_rate=self.dilation_rate,
            )
            outputs = term if outputs is None else keras.ops.add(outputs, term)
            start += count
        if self.use_bias:
            spatial = (1,) * (len(self.kernel.shape) - 2)
            last = self.data_format == "channels_last"
            shape = (1, *spatial, self.filters) if last else (1, self.filters, *spatial)
            outputs = keras.ops.add(outputs, keras.ops.reshape(self.bias, shape))
        return self.activation(outputs) if self.activation is not None else outputs


@keras.saving.register_keras_serializable(package="unetpp_tf")
class ConcatConv2D(_ConcatConv, keras.layers.Conv2D):
    """`Conv2D(concatenate(parts))` without materialising the concatenation in training.

    Called on a list of tensors that agree in every dimension but channels, it holds the one
    kernel a `Conv2D` over their concatenation would hold (kh, kw, sum of the channels,
    filters), with the same configuration, bias, regularizers and parameter count. Training
    calls compute the sum over the parts of a convolution with the part's kernel slice, so
    the concatenated tensor and, in the backward pass, its gradient and their slices are
    never built; inference calls concatenate and run `Conv2D.call`, the plain graph (one
    convolution op in exported models). Both equal the concatenated form up to float rounding.

    Example:
        >>> layer = ConcatConv2D(8, 3, padding="same")
        >>> parts = [np.ones((2, 16, 16, 4), "float32"), np.ones((2, 16, 16, 6), "float32")]
        >>> tuple(layer(parts, training=True).shape), tuple(layer.kernel.shape)
        ((2, 16, 16, 8), (3, 3, 10, 8))
    """


@keras.saving.register_keras_serializable(package="unetpp_tf")
class ConcatConv3D(_ConcatConv, keras.layers.Conv3D):
    """`Conv3D(concatenate(parts))` without materialising the concatenation in training.

    The volume twin of `ConcatConv2D`: one (kd, kh, kw, sum of the channels, filters) kernel,
    a sum of per-part convolutions in training, one `Conv3D` over the concatenation otherwise.

    Example:
        >>> layer = ConcatConv3D(8, 3, padding="same")
        >>> parts = [np.ones((1, 8, 8, 8, 4), "float32"), np.ones((1, 8, 8, 8, 2), "float32")]
        >>> tuple(layer(parts, training=True).shape), tuple(layer.kernel.shape)
        ((1, 8, 8, 8, 8), (3, 3, 3, 6, 8))
    """


def _interleave(phases: list, axis: int):
    """Stack same-shape tensors along a new axis after `axis` and merge the two (rank <= 4 reshapes)."""
    x = phases[0]
    if len(phases) == 1:
        return x
    shape = keras.ops.shape(x)
    rank = len(x.shape)
    before = shape[0]
    for d in range(1, axis):
        before = before * shape[d]
    after = 1
    for d in range(axis + 1, rank):
        after = after * shape[d]
    flat = [keras.ops.reshape(p, (before, shape[axis], after)) for p in phases]
    merged = keras.ops.stack(flat, axis=2)
    return keras.ops.reshape(
        merged, tuple(shape[:axis]) + (shape[axis] * len(phases),) + tuple(shape[axis + 1:])
    )


def _shifted(x, axis: int, step: int):
    """`x` moved one position along `axis` (step -1: previous element, +1: next), edges repeated."""
    count = x.shape[axis]
    index = [slice(None)] * len(x.shape)
    if step < 0:
        index[axis] = slice(0, 1)
        first = x[tuple(index)]
        index[axis] = slice(0, -1 if count is None else count - 1)
        return keras.ops.concatenate([first, x[tuple(index)]], axis=axis)
    index[axis] = slice(1, None)
    rest = x[tuple(index)]
    index[axis] = slice(-1, None)
    return keras.ops.concatenate([rest, x[tuple(index)]], axis=axis)


def upsample_axis(x, axis: int, factor: int, interpolation: str = "linear"):
    """Upsample `x` by the integer `factor` along `axis`: nearest (repeat) or linear (half-pixel centres).

    Linear uses the convention of `tf.image.resize(..., "bilinear")` (half-pixel centres,
    edges clamped): output position p of input cell k samples k + (p + 0.5) / factor - 0.5.

    Example:
        >>> upsample_axis(np.array([[0.0, 4.0]]), 1, 2).tolist()
        [[0.0, 1.0, 3.0, 4.0]]
    """
    x = keras.ops.convert_to_tensor(x)
    if factor == 1:
        return x
    if interpolation == "nearest":
        return _interleave([x] * factor, axis)
    before, after = _shifted(x, axis, -1), _shifted(x, axis, 1)
    phases = []
    for p in range(factor):
        offset = (p + 0.5) / factor - 0.5
        if offset < 0:
            phases.append(x * (1.0 + offset) + before * (-offset))
        else:
            phases.append(x * (1.0 - offset) + after * offset)
    return _interleave(phases, axis)


@keras.saving.register_keras_serializable(package="unetpp_tf")
class VolumeUpsampling(keras.layers.Layer):
    """Upsample channels-last volumes [B, D, H, W, C] by an integer factor per axis.

    "nearest" repeats voxels (as `keras.layers.UpSampling3D`); "trilinear" interpolates
    along each axis in turn with half-pixel centres and clamped edges, the 3D form of
    `tf.image.resize(..., "bilinear")`. Built from slices, weighted sums and reshapes of rank
    <= 4, so it runs at None sizes, on every backend, and converts to TFLite builtins.

    Args:
        size: int or tuple of 3 ints. Factor per axis (depth, height, width). Defaults to 2.
        interpolation: str. "nearest" or "trilinear". Defaults to "trilinear".

    Example:
        >>> tuple(VolumeUpsampling((1, 2, 2))(np.ones((1, 3, 4, 5, 2), "float32")).shape)
        (1, 3, 8, 10, 2)
    """

    def __init__(self, size=2, interpolation: str = "trilinear", **kwargs):
        super().__init__(**kwargs)
        size = (size,) * 3 if isinstance(size, int) else tuple(size)
        if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"VolumeUpsampling size must be a positive integer or 3 of them, got {size!r}.")
        if interpolation not in ("nearest", "trilinear"):
            raise ValueError(f"VolumeUpsampling interpolation must be 'nearest' or 'trilinear', got {interpolation!r}.")
        self.size = size
        self.interpolation = interpolation

    def call(self, inputs):
        mode = "nearest" if self.interpolation == "nearest" else "linear"
        x = inputs
        for axis, factor in enumerate(self.size, start=1):
            x = upsample_axis(x, axis, factor, mode)
        return x

    def compute_output_shape(self, input_shape):
        batch, *spatial, channels = input_shape
        return (batch, *(None if n is None else n * f for n, f in zip(spatial, self.size)), channels)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="unetpp_tf")
class BilinearUpsampling(keras.layers.UpSampling2D):
    """`UpSampling2D(size, interpolation="bilinear")` that also runs where height and width are None.

    Keras 3.15's bilinear resize checks the target size with a Python comparison, which fails on
    the symbolic sizes of a TensorFlow graph traced for a None x None input (the second size a
    model predicts at). Static sizes, and other backends (which trace with concrete shapes), take
    the Keras path; dynamic ones on TensorFlow call the same op (`tf.image.resize`, half-pixel
    centers) with the size as a tensor.

    Example:
        >>> tuple(BilinearUpsampling(4)(np.ones((1, 3, 5, 2), "float32")).shape)
        (1, 12, 20, 2)
    """

    def __init__(self, size=2, **kwargs):
        kwargs.pop("interpolation", None)
        super().__init__(size, interpolation="bilinear", **kwargs)

    def call(self, inputs):
        dynamic = inputs.shape[1] is None or inputs.shape[2] is None
        if not dynamic or keras.backend.backend() != "tensorflow" or self.data_format != "channels_last":
            return super().call(inputs)
        import tensorflow as tf

        shape = tf.shape(inputs)
        target = tf.stack([shape[1] * self.size[0], shape[2] * self.size[1]])
        return tf.cast(tf.image.resize(inputs, target, method="bilinear"), inputs.dtype)
