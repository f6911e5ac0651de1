"""Callbacks the resume tests use to stop a run between epochs and read its final state."""

import keras
import numpy as np


class Interrupted(Exception):
    """Stands for a kill between two epochs."""


class StopAfter(keras.callbacks.Callback):
    """Raise at the end of epoch `epoch` (0-based), after the run backed it up."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(epoch)


class FinalState(keras.callbacks.Callback):
    """Keep every variable of the trained model and its optimizer when training ends."""

    def on_train_end(self, logs=None):
        self.values = [np.array(v.numpy()) for v in [*self.model.variables, *self.model.optimizer.variables]]


def assert_same_state(expected: list, got: list) -> None:
    """Every variable of a resumed run equals the uninterrupted run's (FinalState values)."""
    assert len(got) == len(expected) > 0
    for want, value in zip(expected, got):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
