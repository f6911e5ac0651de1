"""Joint augmentation: alignment of image and mask, integer masks, seeds, train-step use."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf.data import AugmentedModel, SegmentationAugmenter

GEOMETRIC = dict(rotation=0.1, zoom=0.15, translation=0.1, elastic=2.0)


def _shapes(batch=6, size=48, seed=0):
    """Images with flat-valued rectangles (levels 0.1 / 0.5 / 0.9) and the masks derived from them."""
    rng = np.random.default_rng(seed)
    images = np.full((batch, size, size, 1), 0.1, np.float32)
    for b in range(batch):
        for level in (0.5, 0.9):
            y, x = rng.integers(4, size - 20, 2)
            images[b, y : y + rng.integers(8, 16), x : x + rng.integers(8, 16)] = level
    masks = np.digitize(images, [0.3, 0.7]).astype(np.int32)  # 0.1 -> 0, 0.5 -> 1, 0.9 -> 2
    return images, masks


@pytest.mark.backend_independent
def test_geometric_augmentation_keeps_image_and_mask_aligned():
    images, masks = _shapes()
    augmenter = SegmentationAugmenter(flip=True, rotate90=True, seed=3, **GEOMETRIC)
    out_images, out_masks = (np.asarray(t) for t in augmenter(images, masks, training=True))
    assert out_masks.dtype == np.int32 and set(np.unique(out_masks)) <= {0, 1, 2}
    derived = np.digitize(out_images, [0.3, 0.7])
    assert np.mean(derived == out_masks) > 0.97  # only interpolated edge pixels may differ
    assert np.mean(out_masks != masks) > 0.05  # it really moved things
    assert np.mean(derived == masks) < np.mean(derived == out_masks) - 0.03


@pytest.mark.backend_independent
def test_photometric_augmentation_touches_images_only():
    images, masks = _shapes()
    augmenter = SegmentationAugmenter(
        flip=False, rotate90=False, brightness=0.1, contrast=0.2, gamma=0.2, noise=0.05, blur=0.5, seed=0
    )
    out_images, out_masks = augmenter(images, masks, training=True)
    np.testing.assert_array_equal(np.asarray(out_masks), masks)
    out_images = np.asarray(out_images)
    assert np.abs(out_images - images).mean() > 0.01
    assert out_images.min() >= 0.0 and out_images.max() <= 1.0


@pytest.mark.backend_independent
def test_inference_passes_through_and_shapes_dtypes_kept():
    images, masks = _shapes()
    augmenter = SegmentationAugmenter(seed=0, **GEOMETRIC)
    same_images, same_masks = augmenter(images, masks, training=False)
    np.testing.assert_array_equal(np.asarray(same_images), images)
    squeezed = masks[..., 0].astype(np.uint8)
    _, out = augmenter(images, squeezed, training=True)
    assert out.shape == squeezed.shape and np.asarray(out).dtype == np.uint8


@pytest.mark.backend_independent
def test_seeded_draws_are_reproducible():
    images, masks = _shapes()
    first = [np.asarray(t) for t in SegmentationAugmenter(seed=7, noise=0.05, **GEOMETRIC)(images, masks)]
    again = [np.asarray(t) for t in SegmentationAugmenter(seed=7, noise=0.05, **GEOMETRIC)(images, masks)]
    other = [np.asarray(t) for t in SegmentationAugmenter(seed=8, noise=0.05, **GEOMETRIC)(images, masks)]
    np.testing.assert_allclose(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], other[0])


@pytest.mark.backend_independent
def test_bad_settings():
    with pytest.raises(ValueError, match="rotation must be a number >= 0"):
        SegmentationAugmenter(rotation=-0.1)
    with pytest.raises(ValueError, match="blur is a probability"):
        SegmentationAugmenter(blur=2.0)
    with pytest.raises(ValueError, match="rotate90 needs square images.*set rotate90=False"):
        SegmentationAugmenter(rotate90=True)(np.zeros((1, 32, 48, 1)), np.zeros((1, 32, 48, 1)))


@pytest.mark.backend_independent
def test_config_round_trip():
    augmenter = SegmentationAugmenter(rotation=0.1, elastic=2.0, noise=0.03, seed=5)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(augmenter))
    assert clone.get_config() == augmenter.get_config()


def _dihedral(array):
    """The 8 flips/quarter turns of [H, W, C] (square), keyed by name."""
    out = {}
    for turns in range(4):
        turned = np.rot90(array, turns, axes=(0, 1))
        out[f"rot{turns}"] = turned
        out[f"rot{turns}+flip"] = turned[:, ::-1]
    return out


def _transform_of(before, after):
    """The name of the dihedral transform that maps `before` onto `after` exactly, or None."""
    names = [name for name, moved in _dihedral(before).items() if np.array_equal(moved, after)]
    return names[0] if len(names) == 1 else None


def _host_batches(augmenter, seed=0, count=32, epochs=1, size=16):
    """Every train batch of a synthetic set (unshuffled, one split) with host augmentation, per epoch."""
    data = unetpp_tf.data.synthetic(
        count, image_size=(size, size), batch_size=4, split=(1.0, 0.0, 0.0), shuffle=False, seed=seed,
        augment=augmenter,
    )
    return [[(x.numpy(), y.numpy()) for x, y in data.train] for _ in range(epochs)]


def test_host_augmentation_is_reproducible_for_a_seed():
    settings = dict(rotation=0.1, zoom=0.1, noise=0.05, brightness=0.1)
    first = _host_batches(SegmentationAugmenter(**settings, seed=1), seed=3, epochs=2)
    again = _host_batches(SegmentationAugmenter(**settings, seed=1), seed=3, epochs=2)
    for epoch_a, epoch_b in zip(first, again):  # 8 batches per epoch, augmented in parallel by tf.data
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    differs = [not np.array_equal(a[0], b[0]) for a, b in zip(first[0], first[1])]
    assert all(differs)  # a new draw each epoch
    other_data_seed = _host_batches(SegmentationAugmenter(**settings, seed=1), seed=4)[0]
    other_layer_seed = _host_batches(SegmentationAugmenter(**settings, seed=2), seed=3)[0]
    plain = _host_batches(None, seed=3)[0]
    for other in (other_data_seed, other_layer_seed):
        assert all(not np.allclose(a[0], b[0]) for a, b in zip(first[0], other))
    for (x, y), (x0, y0) in zip(first[0], plain):
        assert not np.allclose(x, x0) and y.dtype == np.int32 and set(np.unique(y)) <= {0, 1}


def test_stateless_call_is_a_pure_function_of_its_seed():
    images, masks = _shapes()
    augmenter = SegmentationAugmenter(noise=0.05, seed=0, **GEOMETRIC)
    seed = tf.constant([5, 9])
    a = [np.asarray(t) for t in augmenter(images, masks, training=True, seed=seed)]
    b = [np.asarray(t) for t in augmenter(images, masks, training=True, seed=seed)]
    c = [np.asarray(t) for t in augmenter(images, masks, training=True, seed=tf.constant([5, 10]))]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    # Without a seed the layer's generator moves on: two calls differ.
    d, e = (np.asarray(augmenter(images, masks, training=True)[0]) for _ in range(2))
    assert not np.allclose(d, e)


@pytest.mark.parametrize("rotate90", [False, True])
def test_host_flips_and_quarter_turns_are_exact_and_shared_by_image_and_mask(rotate90):
    count = 128 if rotate90 else 48
    augmented = _host_batches(SegmentationAugmenter(flip=True, rotate90=rotate90, seed=0), count=count)[0]
    plain = _host_batches(None, count=count)[0]
    seen = []
    for (x, y), (x0, y0) in zip(augmented, plain):
        for image, mask, source, source_mask in zip(x, y, x0, y0):
            name = _transform_of(source, image)
            assert name is not None, "the image is not a flip or quarter turn of its source"
            np.testing.assert_array_equal(mask, _dihedral(source_mask)[name])  # the same transform
            seen.append(name)
    # Both axes flip: a horizontal flip is rot0+flip, a vertical one rot2+flip, both rot2.
    expected = set(_dihedral(np.zeros((1, 1, 1)))) if rotate90 else {"rot0", "rot0+flip", "rot2", "rot2+flip"}
    assert set(seen) == expected


def _identity_model():
    """A 1x1 convolution fixed to the identity: its prediction is its input."""
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(1, 1, kernel_initializer="ones")])
    model.compile(keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    return model


@pytest.mark.backend_independent
@pytest.mark.parametrize("settings, zero_loss", [(dict(flip=True, rotate90=True), True), (dict(noise=0.2), False)])
def test_augmentation_runs_inside_the_train_step(settings, zero_loss):
    masks = (np.random.default_rng(0).random((8, 32, 32, 1)) > 0.5).astype(np.int32)
    images = masks.astype(np.float32)  # the identity model predicts the mask from its image
    augmenter = SegmentationAugmenter(**{"flip": False, "rotate90": False, **settings}, seed=0)
    wrapper = AugmentedModel(_identity_model(), augmenter)
    wrapper.compile(keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    loss = wrapper.train_on_batch(images, masks)
    # Geometric transforms move image and mask together (loss stays 0); noise changes the image alone.
    assert (loss < 1e-9) == zero_loss
    assert wrapper.evaluate(images, masks, verbose=0) < 1e-9  # evaluation is never augmented


def test_augmented_model_feeds_every_deep_supervision_head(tiny_ds_model):
    data = unetpp_tf.data.synthetic(16, image_size=(32, 32), batch_size=8)
    wrapper = AugmentedModel(tiny_ds_model, SegmentationAugmenter(rotation=0.05, seed=0))
    wrapper.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
    history = wrapper.fit(data.train, validation_data=data.val, epochs=1, verbose=0).history
    assert {"output_1_loss", "output_2_loss", "val_loss"} <= set(history)


def _noisy_identity_steps(seed, steps=3):
    """Losses of `steps` jitted train steps of the identity model under noise, and the seed states after each."""
    masks = (np.random.default_rng(0).random((4, 32, 32, 1)) > 0.5).astype(np.int32)
    wrapper = AugmentedModel(_identity_model(), SegmentationAugmenter(flip=False, rotate90=False, noise=0.3, seed=seed))
    wrapper.compile(keras.optimizers.SGD(learning_rate=0.0), loss="mse", jit_compile=True)
    losses, states = [], []
    for _ in range(steps):
        losses.append(float(wrapper.train_on_batch(masks.astype(np.float32), masks)))
        states.append(keras.ops.convert_to_numpy(wrapper.augmenter.seed_generator.state.value).tolist())
    return losses, states


@pytest.mark.backend_independent
def test_device_augmentation_draws_anew_each_step_and_repeats_for_a_seed():
    losses, states = _noisy_identity_steps(seed=4)
    # The loss is the squared noise: a new draw each step (the seed state moves), identical steps for the seed.
    assert len(set(losses)) == 3 and all(loss > 1e-4 for loss in losses)
    assert len({tuple(state) for state in states}) == 3
    assert _noisy_identity_steps(seed=4) == (losses, states)
    assert _noisy_identity_steps(seed=5)[0] != losses


@pytest.mark.backend_independent
def test_inside_tf_data_the_host_path_needs_the_tensorflow_backend():
    images, masks = _shapes(batch=2, size=32)
    augmenter = SegmentationAugmenter(noise=0.05, seed=0)
    batches = tf.data.Dataset.from_tensors((images, masks))
    if keras.backend.backend() == "tensorflow":
        seeded = batches.map(lambda x, y: augmenter(x, y, training=True, seed=tf.constant([1, 2])))
        assert not np.allclose(np.asarray(seeded.get_single_element()[0]), images)
        unseeded = batches.map(lambda x, y: augmenter(x, y, training=True))  # the seed generator: a tf variable
        assert not np.allclose(np.asarray(unseeded.get_single_element()[0]), images)
    else:
        for seed in (tf.constant([1, 2]), None):
            with pytest.raises(ValueError, match="in tf.data .* needs Keras' TensorFlow backend.*--augment device"):
                batches.map(lambda x, y: augmenter(x, y, training=True, seed=seed))
