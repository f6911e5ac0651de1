"""3D joint augmentation: exact flips and quarter turns, integer labels, seeds, identity, a 3D train step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from unetpp_tf.data import AugmentedModel
from unetpp_tf.data.augment3d import VolumeAugmenter


def _blocks(batch=4, shape=(6, 16, 16), seed=0):
    """Volumes of flat-valued boxes (levels 0.1 / 0.5 / 0.9) and the labels 0 / 1 / 2 derived from them."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    images = np.full((batch, *shape, 1), 0.1, np.float32)
    for b in range(batch):
        for level in (0.5, 0.9):
            z, y, x = rng.integers(0, depth - 2), *rng.integers(2, height - 8, 2)
            images[b, z : z + 3, y : y + rng.integers(4, 7), x : x + rng.integers(4, 7)] = level
    labels = np.digitize(images, [0.3, 0.7]).astype(np.int32)
    return images, labels


def _moves(volume):
    """The 32 results of flipping along z, y, x and turning in-plane by k quarter turns (some coincide)."""
    out = []
    for flips in np.ndindex(2, 2, 2):
        moved = volume
        for axis, flip in enumerate(flips):
            if flip:
                moved = np.flip(moved, axis)
        out += [np.rot90(moved, k, axes=(1, 2)) for k in range(4)]
    return out


def test_flips_and_quarter_turns_are_exact_and_shared_by_image_and_label(rng):
    images = rng.random((4, 5, 8, 8, 2)).astype(np.float32)  # distinct voxel values: any move is visible
    labels = rng.integers(0, 4, (4, 5, 8, 8, 1)).astype(np.int32)
    augmenter = VolumeAugmenter(flip=True, rotate90=True)
    seen = set()
    for call in range(4):
        out_images, out_labels = (np.asarray(t) for t in augmenter(images, labels, seed=tf.constant([call, 9])))
        assert out_labels.dtype == np.int32
        for b in range(4):
            matches = [
                i for i, (im, lb) in enumerate(zip(_moves(images[b]), _moves(labels[b])))
                if np.allclose(im, out_images[b], atol=1e-6) and np.array_equal(lb, out_labels[b])
            ]
            assert matches, "the output is not an exact flip/turn of the input, or the label moved differently"
            seen.add(matches[0])
    assert len(seen) > 4  # several different moves were drawn


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_single_flip_axis_flips_along_that_axis_only(axis, rng):
    images = rng.random((8, 4, 6, 6, 1)).astype(np.float32)
    out, _ = VolumeAugmenter(flip=(axis,), rotate90=False)(images, images[..., 0] > 0.5, seed=tf.constant([1, 2]))
    out = np.asarray(out)
    flipped = [np.allclose(out[b], np.flip(images[b], axis)) for b in range(8)]
    kept = [np.allclose(out[b], images[b]) for b in range(8)]
    assert all(f != k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


@pytest.mark.backend_independent  # keras.ops maths or a jitted 3D train step
def test_rotation_and_zoom_keep_labels_integer_and_aligned():
    images, labels = _blocks()
    augmenter = VolumeAugmenter(rotation=0.05, zoom=0.15, seed=3)
    out_images, out_labels = (np.asarray(t) for t in augmenter(images, labels[..., 0].astype(np.uint8)))
    assert out_labels.shape == labels.shape[:-1] and out_labels.dtype == np.uint8
    assert set(np.unique(out_labels)) <= {0, 1, 2}
    derived = np.digitize(out_images[..., 0], [0.3, 0.7])
    assert np.mean(derived == out_labels) > 0.97  # only interpolated edge voxels may differ
    assert np.mean(out_labels != labels[..., 0]) > 0.02  # it really moved things


def test_same_seed_same_output_and_photometric_changes_touch_images_only():
    images, labels = _blocks()
    settings = dict(rotation=0.03, zoom=0.1, brightness=0.1, contrast=0.2, gamma=0.2, noise=0.05, seed=5)
    seed = tf.constant([4, 2])
    first = VolumeAugmenter(**settings)(images, labels, seed=seed)
    again = VolumeAugmenter(**settings)(images, labels, seed=seed)
    other = VolumeAugmenter(**settings)(images, labels, seed=tf.constant([4, 3]))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(first[0]), np.asarray(other[0]))
    generator_a, generator_b = VolumeAugmenter(**settings), VolumeAugmenter(**settings)
    np.testing.assert_array_equal(
        np.asarray(generator_a(images, labels)[0]), np.asarray(generator_b(images, labels)[0])
    )  # the seed generator path: the same layer seed gives the same draws
    photometric = VolumeAugmenter(flip=False, rotate90=False, brightness=0.1, contrast=0.2, noise=0.05, seed=0)
    out_images, out_labels = photometric(images, labels)
    np.testing.assert_array_equal(np.asarray(out_labels), labels)
    out_images = np.asarray(out_images)
    assert np.abs(out_images - images).mean() > 0.01 and out_images.min() >= 0.0 and out_images.max() <= 1.0


@pytest.mark.backend_independent  # keras.ops maths or a jitted 3D train step
def test_identity_at_zero_strength_and_at_inference(rng):
    images = rng.random((2, 4, 8, 12, 1)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4, 8, 12)).astype(np.int32)
    for augmenter, training in ((VolumeAugmenter(flip=False, rotate90=False), True), (VolumeAugmenter(), False)):
        out_images, out_labels = augmenter(images, labels, training=training)
        np.testing.assert_array_equal(np.asarray(out_images), images)
        np.testing.assert_array_equal(np.asarray(out_labels), labels)


@pytest.mark.backend_independent  # keras.ops maths or a jitted 3D train step
def test_bad_settings_and_inputs_are_named(rng):
    with pytest.raises(ValueError, match="rotation"):
        VolumeAugmenter(rotation=-0.1)
    with pytest.raises(ValueError, match="flip"):
        VolumeAugmenter(flip=(3,))
    images = rng.random((1, 4, 8, 12, 1)).astype(np.float32)
    with pytest.raises(ValueError, match="rotate90 needs square in-plane"):
        VolumeAugmenter()(images, np.zeros((1, 4, 8, 12), np.int32))
    with pytest.raises(ValueError, match="SegmentationAugmenter"):
        VolumeAugmenter()(images[:, 0], np.zeros((1, 8, 12), np.int32))


def test_config_round_trip_gives_the_same_draws():
    images, labels = _blocks()
    augmenter = VolumeAugmenter(flip=(1, 2), rotation=0.02, zoom=0.1, brightness=0.05, value_range=None, seed=7)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(augmenter))
    assert isinstance(restored, VolumeAugmenter) and restored.get_config() == augmenter.get_config()
    seed = tf.constant([1, 1])
    np.testing.assert_array_equal(
        np.asarray(augmenter(images, labels, seed=seed)[0]), np.asarray(restored(images, labels, seed=seed)[0])
    )


@pytest.mark.backend_independent  # keras.ops maths or a jitted 3D train step
def test_augmented_model_trains_a_3d_model_under_xla_with_the_volume_augmenter():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16, 16, 1))
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv3D(1, 1, activation="sigmoid", name="output")(x)
    model = keras.Model(inputs, outputs)  # a tiny 3D network: the augmenter, not the model, is under test
    images, labels = _blocks(batch=4, shape=(8, 16, 16))
    labels = (labels > 0).astype(np.int32)
    trainer = AugmentedModel(model, VolumeAugmenter(rotation=0.03, zoom=0.1, brightness=0.05, seed=0))
    trainer.compile(keras.optimizers.Adam(1e-2), loss="binary_crossentropy", jit_compile=True)
    before = [w.copy() for w in model.get_weights()]
    history = trainer.fit(images, labels, batch_size=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
