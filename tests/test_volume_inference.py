"""Volume inference: sliding windows in 3D, slices (2.5D) for 2D models, scan files to NIfTI masks."""

import itertools

import keras
import nibabel as nib
import numpy as np
import pydicom
import pytest

from unetpp_tf import volume_inference as vi


def conv3d_model(shape=(None, None, None, 1), kernel=3, classes=2, seed=0):
    """A tiny 3D net: a 3x3x3 (or pointwise) conv, then softmax (or sigmoid) probabilities."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape)
    x = keras.layers.Conv3D(4, kernel, padding="same", activation="tanh")(inputs)
    outputs = keras.layers.Conv3D(classes, 1, activation="softmax" if classes > 1 else "sigmoid")(x)
    return keras.Model(inputs, outputs)


def conv2d_model(channels, classes=1, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, channels))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(classes, 1, activation="sigmoid")(x))


class Recorder:
    """Duck-typed model that records the batches it is given (to check batching)."""

    def __init__(self, model):
        self.model, self.batches = model, []
        self.inputs, self.outputs, self.name = model.inputs, model.outputs, "recorder"

    def predict_on_batch(self, batch):
        self.batches.append(batch.shape)
        return self.model.predict_on_batch(batch)


@pytest.fixture(scope="module")
def net3d():
    return conv3d_model()


def manual_blend(model, image, patch, overlap, blend):
    """Reference: every window predicted on its own, weighted, summed and normalized, written out plainly."""
    strides = [max(1, round(p * (1 - overlap))) for p in patch]
    starts = [vi.window_starts(n, p, s) for n, p, s in zip(image.shape[:3], patch, strides)]
    weight = np.einsum("i,j,k->ijk", *(vi.importance_weights(p, blend) for p in patch))
    total = np.zeros((*image.shape[:3], 2))
    norm = np.zeros(image.shape[:3])
    for z, y, x in itertools.product(*starts):
        region = np.s_[z : z + patch[0], y : y + patch[1], x : x + patch[2]]
        probs = model.predict_on_batch(image[region][None])[0]
        total[region] += probs * weight[..., None]
        norm[region] += weight
    return total / norm[..., None]


@pytest.mark.backend_independent
def test_window_starts_cover_every_voxel_with_the_last_flush():
    assert vi.window_starts(100, 64, 32) == [0, 32, 36]
    assert vi.window_starts(64, 64, 32) == [0]
    for size, patch, stride in [(100, 64, 32), (17, 8, 4), (9, 8, 8), (50, 7, 3), (30, 16, 1)]:
        starts = vi.window_starts(size, patch, stride)
        covered = np.zeros(size, bool)
        for start in starts:
            covered[start : start + patch] = True
        assert covered.all() and starts[-1] == size - patch and starts[0] == 0
        assert max(np.diff(starts), default=0) <= stride


@pytest.mark.backend_independent
def test_importance_weights_follow_sigma_patch_over_8():
    weights = vi.importance_weights(16)
    centre = 7.5
    np.testing.assert_allclose(weights, np.exp(-0.5 * ((np.arange(16) - centre) / 2.0) ** 2))
    np.testing.assert_allclose(weights, weights[::-1])
    np.testing.assert_array_equal(vi.importance_weights(5, "constant"), np.ones(5))


@pytest.mark.backend_independent
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_one_window_equals_direct_inference(net3d, rng, blend):
    image = rng.random((8, 16, 12, 1), dtype=np.float32)
    expected = net3d.predict_on_batch(image[None])[0]
    probs = vi.sliding_window_predict(net3d, image, patch_size=(8, 16, 12), blend=blend)
    assert probs.dtype == np.float32 and probs.shape == (8, 16, 12, 2)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


@pytest.mark.backend_independent
def test_fixed_size_model_uses_its_input_size(rng):
    model = conv3d_model((8, 8, 8, 1), classes=1)
    image = rng.random((8, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(vi.sliding_window_predict(model, image), model.predict_on_batch(image[None])[0],
                               atol=1e-6)


@pytest.mark.backend_independent
def test_a_volume_smaller_than_the_patch_is_padded_and_cropped(net3d, rng):
    image = rng.random((5, 12, 7, 1), dtype=np.float32)
    padded = np.pad(image, ((1, 2), (0, 0), (0, 1), (0, 0)), mode="reflect")  # to (8, 12, 8), centred
    expected = net3d.predict_on_batch(padded[None])[0, 1:6, :, 0:7]
    probs = vi.sliding_window_predict(net3d, image, patch_size=(8, 8, 8), overlap=0.5)
    # z and x fit one window (padded), y runs two windows: compare where y's windows agree with the whole
    assert probs.shape == (5, 12, 7, 2)
    windows = vi.window_starts(12, 8, 4)
    assert windows == [0, 4]
    first = net3d.predict_on_batch(padded[None, :, 0:8])[0, 1:6, :, 0:7]
    np.testing.assert_allclose(probs[:, :3], first[:, :3], atol=1e-6)  # y < 4: only the first window
    assert np.abs(probs - expected).max() < 0.05  # seams differ a little from a whole-volume pass


@pytest.mark.backend_independent
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_pointwise_model_tiles_exactly_on_any_volume(rng, blend):
    model = conv3d_model(kernel=1)  # no context: every window predicts each voxel like the whole volume
    image = rng.random((11, 21, 18, 1), dtype=np.float32)
    probs = vi.sliding_window_predict(model, image, patch_size=(4, 8, 8), overlap=0.5, batch_size=5, blend=blend)
    np.testing.assert_allclose(probs, model.predict_on_batch(image[None])[0], atol=1e-5)


@pytest.mark.backend_independent
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blending_matches_a_plain_reference_loop(net3d, rng, blend):
    image = rng.random((12, 20, 14, 1), dtype=np.float32)
    recorder = Recorder(net3d)
    probs = vi.sliding_window_predict(recorder, image, patch_size=(8, 8, 8), overlap=0.5, batch_size=3, blend=blend)
    np.testing.assert_allclose(probs, manual_blend(net3d, image, (8, 8, 8), 0.5, blend), atol=1e-5)
    windows = 2 * 4 * 3  # z starts [0, 4], y [0, 4, 8, 12], x [0, 4, 6]
    assert [shape[0] for shape in recorder.batches] == [3] * (windows // 3)  # batch by batch, never all at once
    assert all(shape[1:] == (8, 8, 8, 1) for shape in recorder.batches)


def test_deep_supervision_unetpp_runs_in_accurate_mode(rng):
    import unetpp_tf

    keras.utils.set_random_seed(2)
    model = unetpp_tf.build_unetpp((None, None, None, 1), depth=2, filters=2, deep_supervision=True)
    image = rng.random((12, 16, 16, 1), dtype=np.float32)
    heads = model.predict_on_batch(image[None, :8, :8, :8])
    window = vi.sliding_window_predict(model, image[:8, :8, :8], patch_size=8)
    np.testing.assert_allclose(window, np.mean([h[0] for h in heads], axis=0), atol=1e-6)  # mean of the heads
    probs = vi.sliding_window_predict(model, image, patch_size=(8, 8, 8), overlap=0.25)
    assert probs.shape == (12, 16, 16, 1) and np.all((probs > 0) & (probs < 1))
    with pytest.raises(ValueError, match=r"cannot run on patches of \(6, 8, 8\) voxels.*divisible"):
        vi.sliding_window_predict(model, image, patch_size=(6, 8, 8))


@pytest.mark.backend_independent
def test_a_patch_the_graph_rejects_is_named_on_every_backend(rng):
    inputs = keras.Input((None, None, None, 1))
    pooled = keras.layers.UpSampling3D(2)(keras.layers.MaxPooling3D(2)(inputs))
    skip = keras.layers.Concatenate()([inputs, pooled])  # a U-Net skip: odd sides do not come back
    model = keras.Model(inputs, keras.layers.Conv3D(1, 1, activation="sigmoid")(skip))
    image = rng.random((8, 8, 8, 1), dtype=np.float32)
    assert vi.sliding_window_predict(model, image, patch_size=8).shape == (8, 8, 8, 1)
    with pytest.raises(ValueError, match=r"cannot run on patches of \(5, 8, 8\) voxels.*divisible"):
        vi.sliding_window_predict(model, image, patch_size=(5, 8, 8))


@pytest.mark.backend_independent
def test_exported_savedmodel_runs_like_the_keras_model(tmp_path, rng):
    from unetpp_tf.runners import SavedModelRunner

    model = conv3d_model((8, 8, 8, 1), classes=1)
    model.export(str(tmp_path / "saved"), verbose=False)
    runner = SavedModelRunner(tmp_path / "saved")
    image = rng.random((10, 12, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(vi.predict_volume(runner, image), vi.predict_volume(model, image), atol=1e-5)


@pytest.mark.backend_independent
def test_sliding_window_refuses_bad_arguments(net3d, rng):
    image = rng.random((8, 8, 8, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="pass patch_size"):
        vi.sliding_window_predict(net3d, image)
    with pytest.raises(ValueError, match="differs from the fixed input"):
        vi.sliding_window_predict(conv3d_model((8, 8, 8, 1)), image, patch_size=16)
    with pytest.raises(ValueError, match=r"\[D, H, W, C\]"):
        vi.sliding_window_predict(net3d, image[..., 0], patch_size=8)
    with pytest.raises(ValueError, match="2 channel"):
        vi.sliding_window_predict(net3d, np.concatenate([image, image], -1), patch_size=8)
    with pytest.raises(ValueError, match="overlap"):
        vi.sliding_window_predict(net3d, image, patch_size=8, overlap=1.0)
    with pytest.raises(ValueError, match="blend"):
        vi.sliding_window_predict(net3d, image, patch_size=8, blend="hann")
    with pytest.raises(ValueError, match="predict_slices"):
        vi.sliding_window_predict(conv2d_model(1), image, patch_size=8)


@pytest.mark.backend_independent
def test_predict_slices_equals_a_manual_slice_loop(rng):
    image = rng.random((5, 12, 10, 2), dtype=np.float32)
    model = conv2d_model(6)  # 3 slices of 2 channels
    expected = []
    for z in range(5):
        rows = [max(z - 1, 0), z, min(z + 1, 4)]
        stacked = np.concatenate([image[r] for r in rows], axis=-1)
        expected.append(model.predict_on_batch(stacked[None])[0])
    probs = vi.predict_slices(model, image, batch_size=2)
    assert probs.shape == (5, 12, 10, 1)
    np.testing.assert_allclose(probs, np.stack(expected), atol=1e-6)
    np.testing.assert_allclose(vi.predict_volume(model, image), probs, atol=1e-6)
    with pytest.raises(ValueError, match="pass slices=3"):
        vi.predict_slices(model, image, slices=5)
    with pytest.raises(ValueError, match="odd number"):
        vi.predict_slices(conv2d_model(2), image[..., :1])
    with pytest.raises(ValueError, match="sliding_window_predict"):
        vi.predict_slices(conv3d_model(), image)


@pytest.mark.backend_independent
def test_predict_volume_dispatches_3d_models_to_sliding_windows(net3d, rng):
    image = rng.random((10, 9, 9, 1), dtype=np.float32)
    np.testing.assert_allclose(
        vi.predict_volume(net3d, image, patch_size=(8, 8, 8), blend="constant"),
        vi.sliding_window_predict(net3d, image, patch_size=(8, 8, 8), blend="constant"),
    )
    with pytest.raises(ValueError, match="2.5D"):
        vi.predict_volume(net3d, image, patch_size=8, slices=3)


# ----------------------------------------------------------------------------- scan files


def identity3d():
    inputs = keras.Input((None, None, None, 1))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


@pytest.mark.backend_independent
def test_predict_scans_writes_masks_on_the_source_geometry(tmp_path, rng):
    data = rng.uniform(-1000, 0, size=(9, 7, 6)).astype(np.float32)  # file axes (i, j, k)
    affine = np.array([[-0.8, 0, 0, 90.0], [0, 0, 2.5, -40.0], [0, 0.7, 0, 12.0], [0, 0, 0, 1]])  # not canonical
    source = tmp_path / "patient1.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)
    [written] = vi.predict_scans(identity3d(), [source], tmp_path / "out", window=(-1000, 0), patch_size=(4, 4, 4))
    assert written == tmp_path / "out" / "patient1_mask.nii.gz"
    mask = nib.load(written)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    assert mask.shape == data.shape
    # identity model on a (-1000, 0) HU window: foreground where HU >= -500, voxel for voxel in file order
    np.testing.assert_array_equal(np.asarray(mask.dataobj).astype(int), (data >= -500).astype(int))


@pytest.mark.backend_independent
def test_predict_scans_runs_2d_models_slice_by_slice_on_a_dataset_folder(tmp_path, rng):
    (tmp_path / "ct" / "images").mkdir(parents=True)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    for name in ("a", "b"):
        data = rng.uniform(-1000, 400, size=(10, 8, 5)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct" / "images" / f"{name}.nii.gz")
    model = conv2d_model(3)  # 2.5D: 3 slices of 1 channel
    written = vi.predict_scans(model, tmp_path / "ct", tmp_path / "out", window="lung", spacing=(1.5, 1.2, 1.2),
                               probabilities=True)
    assert [p.name for p in written] == ["a_mask.nii.gz", "b_mask.nii.gz"]
    for path in written:
        mask = nib.load(path)
        assert mask.shape == (10, 8, 5)
        np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert nib.load(tmp_path / "out" / "a_probabilities.nii.gz").shape[:3] == (10, 8, 5)


@pytest.mark.backend_independent
def test_predict_scans_names_every_bad_input_at_once(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    one_slice = pydicom.data.get_testdata_file("CT_small.dcm")
    with pytest.raises(ValueError, match="4 problem") as caught:
        vi.predict_scans(identity3d(), [tmp_path / "missing.nii", photo, broken, one_slice], tmp_path / "out")
    message = str(caught.value)
    assert "missing.nii does not exist" in message and "photo.png is a 2D image" in message
    assert "broken.nii.gz" in message and "CT_small.dcm holds a single 2D slice" in message
    assert not (tmp_path / "out").exists()
