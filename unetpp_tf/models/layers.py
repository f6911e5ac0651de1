"""Drop-in Keras layers that do the same work in fewer passes over memory on TensorFlow.

UNet++ runs 2 normalizations and 2 dropouts per node on full-resolution tensors, so the
elementwise layers cost a large share of a training step. Keras 3 computes both from
generic ops: BatchNormalization as about ten elementwise ops forward and more backward,
and Dropout as a random draw, a compare, a multiply and a select, keeping the mask for the
backward pass. On the TensorFlow backend these subclasses use one kernel each way instead:

- `FusedBatchNormalization`: TensorFlow's fused batch-norm op (oneDNN on CPU, cuDNN on GPU).
- `FusedDropout`: an XLA-compiled kernel that draws a counter-based hash mask and applies it in
  the same loop; the gradient regenerates the mask from the seed, so no mask is stored.

Both keep Keras' variables, configuration and results, and fall back to the Keras code on
other backends and for the options the fast path does not cover.

The decoder's concatenations get the same treatment on every backend: `ConcatConv2D` is a
`Conv2D` over the concatenation of its inputs (the same single kernel, so the same weights and
parameter count) that in training computes a sum of convolutions over the parts with the
matching kernel slices, so neither the concatenation nor the slices of its gradient exist.
"""

from __future__ import annotations

import keras
import tensorflow as tf

_UINT32 = 2**32


def _on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


@keras.saving.register_keras_serializable(package="unetpp_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel.

    Used for 4-D channels-last inputs on the TensorFlow backend; masks, renormalization,
    synchronized statistics and other layouts take the Keras path. The moving statistics
    follow Keras' rule (biased batch variance, `momentum` as the decay), so weights move
    freely between the two layers.

    Example:
        >>> layer = FusedBatchNormalization()
        >>> tuple(layer(np.ones((2, 4, 4, 3), "float32"), training=True).shape)
        (2, 4, 4, 3)
    """

    def _fusable(self, inputs, mask) -> bool:
        return (
            _on_tensorflow()
            and mask is None
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (3, -1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.convert_to_tensor(inputs)
        if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            x = tf.cast(x, tf.float32)
        channels = x.shape[-1]
        gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((channels,), tf.float32)
        beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros((channels,), tf.float32)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
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
                data_format="NHWC", is_training=False,
            )
        return tf.cast(y, self.compute_dtype)


def _lowbias32(h):
    """A 32-bit integer hash with low bias (Wellons' `lowbias32` constants)."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16)) * tf.constant(0x7FEB352D, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 15)) * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _apply_hash_mask(x, keys, threshold, scale):
    """x * scale where hash(index, keys) >= threshold, else 0; one fused loop under XLA."""
    index = tf.cast(tf.reshape(tf.range(tf.size(x)), tf.shape(x)), tf.uint32)
    bits = _lowbias32(_lowbias32(tf.bitwise.bitwise_xor(index, keys[0])) + keys[1])
    return tf.where(bits >= threshold, x * tf.cast(scale, x.dtype), tf.zeros_like(x))


def hash_dropout(x, rate: float, seed):
    """Inverted dropout of `x` at `rate` with a mask that is a pure function of `seed`.

    Element k is kept when a hash of (k, seed) lands above `rate` of the 32-bit range, and
    kept values are scaled by 1 / (1 - rate). The same seed gives the same mask, which the
    gradient uses to regenerate the mask instead of storing it.

    Args:
        x: float tensor.
        rate: float in [0, 1). Fraction of elements set to zero.
        seed: integer tensor of shape (2,), e.g. `keras.random.SeedGenerator().next()`.

    Example:
        >>> y = hash_dropout(tf.ones((4, 8, 8, 2)), 0.5, tf.constant([1, 2]))
        >>> sorted(set(y.numpy().ravel().tolist()))
        [0.0, 2.0]
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
    x = tf.convert_to_tensor(x)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    words = tf.cast(tf.bitwise.bitwise_and(seed, _UINT32 - 1), tf.uint32)
    first = _lowbias32(words[0] + tf.constant(0x9E3779B9, tf.uint32))
    keys = tf.stack([first, _lowbias32(tf.bitwise.bitwise_xor(words[1], first))])
    threshold = tf.constant(min(int(round(rate * _UINT32)), _UINT32 - 1), tf.uint32)
    scale = tf.constant(1.0 / (1.0 - rate), tf.float32)

    @tf.custom_gradient
    def dropout(inputs):
        def grad(upstream):
            return _apply_hash_mask(upstream, keys, threshold, scale)

        return _apply_hash_mask(inputs, keys, threshold, scale), grad

    return dropout(x)


@keras.saving.register_keras_serializable(package="unetpp_tf")
class FusedDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` with a one-pass hash mask on the TensorFlow backend.

    Each training call draws a new seed from the layer's seed generator and applies
    `hash_dropout`; `apply_mask(inputs, seed)` is the same transform for a given seed, for
    callers that replay a forward pass. `noise_shape` and other backends use Keras' dropout.

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
        if not (training and 0.0 < self.rate < 1.0 and self.noise_shape is None and _on_tensorflow()):
            return super().call(inputs, training=training)
        return self.apply_mask(inputs, self.seed_generator.next())


def _part_shapes(input_shape) -> list:
    """The list of part shapes in `input_shape` (a list of shapes), or a clear error."""
    shapes = list(input_shape) if isinstance(input_shape, (list, tuple)) else []
    if not shapes or not all(isinstance(shape, (list, tuple)) for shape in shapes):
        raise ValueError(
            f"ConcatConv2D takes a list of tensors (the parts of the concatenation), got input shape "
            f"{input_shape!r}; for a single tensor use keras.layers.Conv2D."
        )
    return [tuple(shape) for shape in shapes]


@keras.saving.register_keras_serializable(package="unetpp_tf")
class ConcatConv2D(keras.layers.Conv2D):
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Conv2D's input spec describes one tensor; this layer checks its list of parts itself.
        self.input_spec = None

    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _merged_shape(self, input_shape) -> tuple:
        shapes = _part_shapes(input_shape)
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
            raise ValueError(f"layer {self.name!r}: ConcatConv2D supports groups=1 only, got groups={self.groups}.")
        axis = self._channel_axis()
        self.part_channels = [shape[axis] for shape in _part_shapes(input_shape)]
        super().build(self._merged_shape(input_shape))
        self.input_spec = None

    def compute_output_shape(self, input_shape):
        # Conv2D.build checks the merged (single-tensor) shape through this method too.
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
                part, kernel[:, :, start:start + count, :], strides=self.strides, padding=self.padding,
                data_format=self.data_format, dilation_rate=self.dilation_rate,
            )
            outputs = term if outputs is None else keras.ops.add(outputs, term)
            start += count
        if self.use_bias:
            shape = (1, 1, 1, self.filters) if self.data_format == "channels_last" else (1, self.filters, 1, 1)
            outputs = keras.ops.add(outputs, keras.ops.reshape(self.bias, shape))
        return self.activation(outputs) if self.activation is not None else outputs


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
