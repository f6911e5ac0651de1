"""Training with recomputation, opt-in and version-guarded, on public Keras API.

`RecomputedModel` keeps only the node outputs of a UNet++ for the backward pass and runs
each node's forward again there: much less activation memory for about one more forward
pass per step. On TensorFlow each node is a `tf.custom_gradient` segment, on JAX a
`jax.checkpoint` one. That training call walks the functional graph through Keras internals
(`unetpp_tf.models.recompute_graph`), so it runs only under the versions it was tested with
(Keras, and TensorFlow on that backend), on the TensorFlow and JAX backends; anywhere else
`with_recompute` and `build_unetpp(..., recompute=True)` return the plain model with one
warning, and a saved `RecomputedModel` trains as a plain functional model, also with one
warning. This module is on the default path and imports the internals only inside a
recomputed training call.

`NestedModel` is the class name `.keras` files saved by earlier versions of the builders
carry; such files load as an ordinary functional model.
"""

from __future__ import annotations

import re
import warnings

import keras

# [lowest, first untested) (major, minor) versions the recomputed training call was tested with.
TESTED_KERAS = ((3, 14), (3, 16))
TESTED_TENSORFLOW = ((2, 20), (2, 22))


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _span(versions) -> str:
    (low_major, low_minor), (high_major, high_minor) = versions
    return f">={low_major}.{low_minor},<{high_major}.{high_minor}"


def recompute_unavailable() -> str | None:
    """Why recomputed training cannot run here, or None when it can.

    Returns:
        str or None: e.g. "Keras 3.16.0 is outside the tested range >=3.14,<3.16".

    Example:
        >>> recompute_unavailable() is None   # Keras 3.15, and TensorFlow 2.21 on that backend
        True
    """
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        return f"it needs the TensorFlow or JAX backend, not {backend!r}"
    found = {"Keras": (keras.version(), TESTED_KERAS)}
    if backend == "tensorflow":
        import tensorflow as tf

        found["TensorFlow"] = (tf.__version__, TESTED_TENSORFLOW)
    for name, (version, (low, high)) in found.items():
        if not low <= _major_minor(version) < high:
            return f"{name} {version} is outside the tested range {_span((low, high))}"
    return None


def _fallback_warning(reason: str) -> None:
    warnings.warn(
        f"recompute: {reason}, so the model trains without recomputation (the same results with more "
        "memory). Install versions in the tested range or train with recompute off.",
        UserWarning,
        stacklevel=3,
    )


@keras.saving.register_keras_serializable(package="unetpp_tf")
class NestedModel(keras.Model):
    """The class name of UNet++ models saved by earlier versions; loads as a plain functional model.

    Example:
        >>> model = keras.models.load_model("old_run/model.keras")   # saved as a NestedModel
    """


@keras.saving.register_keras_serializable(package="unetpp_tf")
class RecomputedModel(keras.Model):
    """A functional UNet++ that trains with recomputation (see the module docstring).

    Inference (`training=False`) runs the graph as a plain functional model, and a saved
    model loads back as this class once `unetpp_tf` is imported. Outside the tested versions
    the training call is the plain one, with one warning per model.

    Example:
        >>> model = with_recompute(build_unetpp((256, 256, 1), deep_supervision=True))
    """

    def call(self, inputs, training=None, mask=None, **kwargs):
        if training and mask is None and not kwargs:
            reason = recompute_unavailable()
            if reason is None:
                from unetpp_tf.models.recompute_graph import recomputed_call

                return recomputed_call(self, inputs)
            if not getattr(self, "_recompute_fallback_warned", False):
                self._recompute_fallback_warned = True
                _fallback_warning(reason)
        return super().call(inputs, training=training, mask=mask, **kwargs)


def with_recompute(model: keras.Model, enabled: bool = True) -> keras.Model:
    """The same functional model (shared layers and weights) training with or without recomputation.

    Args:
        model: keras.Model. A functional model, e.g. from `build_unetpp`.
        enabled: bool. True returns a `RecomputedModel` where recomputation runs (the
            TensorFlow or JAX backend, versions in the tested range: `recompute_unavailable()`
            is None), otherwise
            `model` with one warning; False returns a plain functional model. Defaults to True.

    Returns:
        keras.Model: `model` itself when it already trains that way, otherwise a new
        model over the same graph.

    Example:
        >>> model = with_recompute(unetpp_tf.from_preset("paper", input_shape=(256, 256, 1)))
    """
    if not enabled:
        if not isinstance(model, RecomputedModel):
            return model
        return keras.Model(model.input, model.output, name=model.name)
    if isinstance(model, RecomputedModel):
        return model
    reason = recompute_unavailable()
    if reason is not None:
        _fallback_warning(reason)
        return model
    return RecomputedModel(model.input, model.output, name=model.name)
