"""The built-in synthetic dataset: deterministic, well-formed, and a real task."""

import numpy as np
import pytest

import unetpp_tf
from unetpp_tf.data import synthetic, synthetic_sample


def _arrays(count, **kwargs):
    pairs = [synthetic_sample(i, **kwargs) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_samples_are_pure_functions_of_seed_and_index():
    a_image, a_mask = synthetic_sample(3, seed=1, image_size=(48, 64))
    b_image, b_mask = synthetic_sample(3, seed=1, image_size=(48, 64))
    c_image, _ = synthetic_sample(4, seed=1, image_size=(48, 64))
    d_image, _ = synthetic_sample(3, seed=2, image_size=(48, 64))
    np.testing.assert_array_equal(a_image.numpy(), b_image.numpy())
    np.testing.assert_array_equal(a_mask.numpy(), b_mask.numpy())
    assert not np.allclose(a_image.numpy(), c_image.numpy())
    assert not np.allclose(a_image.numpy(), d_image.numpy())
    assert a_image.shape == (48, 64, 1) and a_mask.shape == (48, 64, 1)


def test_binary_task_is_many_varied_nuclei():
    images, masks = _arrays(40, image_size=(96, 96))
    assert images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 1.0
    assert set(np.unique(masks)) == {0, 1}
    foreground = masks.mean()
    assert 0.05 < foreground < 0.35
    means = [images[masks == 1].mean(), images[masks == 0].mean()]
    assert means[0] > means[1] + 0.15  # nuclei are brighter on average ...


def test_binary_task_defeats_a_global_threshold():
    # ... but dim nuclei on bright background mean no single threshold segments them well.
    images, masks = _arrays(60, image_size=(96, 96))
    truth = masks == 1
    best = max(
        2 * np.sum((images > t) & truth) / (np.sum(images > t) + np.sum(truth)) for t in np.linspace(0.05, 0.95, 37)
    )
    assert best < 0.85


def test_multiclass_task_has_both_shapes():
    _, masks = _arrays(20, image_size=(64, 64), task="multiclass")
    values, counts = np.unique(masks, return_counts=True)
    assert list(values) == [0, 1, 2] and counts[1] > 0.02 * masks.size and counts[2] > 0.02 * masks.size


def test_dataset_splits_and_batches():
    data = synthetic(40, image_size=(32, 32), batch_size=4, channels=3, task="multiclass", seed=5)
    assert data.counts == {"train": 28, "val": 6, "test": 6}
    assert data.num_classes == 3 and data.channels == 3 and data.image_size == (32, 32)
    images, masks = next(iter(data.test))
    assert images.shape == (4, 32, 32, 3) and masks.shape == (4, 32, 32, 1)
    assert sum(int(x.shape[0]) for x, _ in data.val) == 6


def test_training_order_is_seeded_and_reshuffled():
    def first_epoch(seed):
        data = synthetic(32, image_size=(16, 16), seed=seed)
        return np.concatenate([m.numpy().sum(axis=(1, 2, 3)) for _, m in data.train])

    data = synthetic(32, image_size=(16, 16), seed=0)
    epoch1 = np.concatenate([m.numpy().sum(axis=(1, 2, 3)) for _, m in data.train])
    epoch2 = np.concatenate([m.numpy().sum(axis=(1, 2, 3)) for _, m in data.train])
    np.testing.assert_array_equal(epoch1, first_epoch(0))
    assert not np.array_equal(epoch1, epoch2) and sorted(epoch1) == sorted(epoch2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="cells"), "task must be one of"),
        (dict(channels=2), "channels must be 1 or 3"),
        (dict(num_samples=0), "num_samples must be a positive integer"),
        (dict(num_samples=3), "leaves the val and test part empty"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**kwargs)


def test_statistics_match_the_masks():
    data = synthetic(20, image_size=(32, 32), batch_size=5, split=(1.0, 0.0, 0.0), shuffle=False)
    _, masks = _arrays(20, image_size=(32, 32))
    stats = unetpp_tf.data.dataset_statistics(data.train)
    assert stats["count"] == 20 and stats["image_sizes"] == {"32x32": 20} and stats["channels"] == 1
    assert stats["class_pixel_fraction"][1] == pytest.approx(masks.mean())
    assert stats["empty_mask_fraction"] == pytest.approx(np.mean(masks.reshape(20, -1).max(1) == 0))
