"""Shared helpers: tiny models and seeded inputs keep the suite fast.

The suite runs on the Keras backend KERAS_BACKEND names (TensorFlow by default). On any other
backend only the tests marked `backend_independent` are collected; the others are deselected
(listed in the summary line), as they exercise TensorFlow itself (tf.data, GradientTape,
TFLite, SavedModel).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import unetpp_tf  # noqa: E402

TINY = dict(depth=2, filters=4)


def pytest_collection_modifyitems(config, items):
    """Keep only the backend-independent tests when Keras runs on a backend other than TensorFlow."""
    if keras.backend.backend() == "tensorflow":
        return
    kept = [item for item in items if item.get_closest_marker("backend_independent")]
    dropped = [item for item in items if not item.get_closest_marker("backend_independent")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def rng():
    """A seeded numpy generator."""
    return np.random.default_rng(0)


@pytest.fixture
def tiny_ds_model():
    """A depth-2, 4-filter UNet++ with deep supervision on 32x32x1 inputs."""
    keras.utils.set_random_seed(1)
    return unetpp_tf.build_unetpp((32, 32, 1), deep_supervision=True, **TINY)


@pytest.fixture
def images(rng):
    """Four random 32x32x1 float32 images in [0, 1]."""
    return rng.random((4, 32, 32, 1), dtype=np.float32)
