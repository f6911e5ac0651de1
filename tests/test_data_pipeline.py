"""The per-epoch random streams of a split: the same for the same seed, and resumable epoch by epoch."""

import numpy as np
import pytest

from unetpp_tf.data import SegmentationAugmenter, advance_epochs, from_arrays


def make_data(seed=0, cache=True):
    """Shuffled, randomly cropped, host-augmented train split of 24 arrays (each sample knows its index)."""
    images = (np.arange(24, dtype=np.uint8)[:, None, None, None] * 10 + np.zeros((1, 12, 12, 1), np.uint8))
    images[:, ::2, ::3] += 1  # texture, so that crops and flips change the pixels
    masks = (images % 2).astype(np.uint8)
    return from_arrays(
        images, masks, crop_size=(8, 8), split=(1.0, 0.0, 0.0), batch_size=6, seed=seed, cache=cache,
        augment=SegmentationAugmenter(flip=True, rotate90=True, noise=0.05, seed=1),
    )


def epoch(dataset):
    return np.concatenate([images.numpy() for images, _ in dataset])


def test_streams_repeat_for_a_seed_and_change_each_epoch():
    first, again = make_data(), make_data()
    epochs = [epoch(first.train) for _ in range(3)]
    for k in range(3):
        np.testing.assert_array_equal(epoch(again.train), epochs[k])
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.allclose(epoch(make_data(seed=1).train), epochs[0])


@pytest.mark.parametrize("cache", [True, False])
def test_advance_epochs_continues_where_a_run_stopped(cache):
    uninterrupted = make_data(cache=cache)
    epochs = [epoch(uninterrupted.train) for _ in range(4)]
    resumed = make_data(cache=cache)
    assert advance_epochs(resumed.train, 3) is resumed.train
    np.testing.assert_array_equal(epoch(resumed.train), epochs[3])  # shuffle, crops and augmentation of epoch 4
    with pytest.raises(ValueError, match="epochs must be a non-negative integer"):
        advance_epochs(resumed.train, -1)
