"""Export of 3D models: .keras, SavedModel and TFLite (builtin ops only) with parity, and the runners on volumes."""

import keras
import numpy as np
import pytest
from scipy import ndimage

import unetpp_tf
from unetpp_tf.export import SavedModelRunner, TFLiteModel, export_model
from unetpp_tf.export.conversion import padded_forward
from unetpp_tf.export.rewrites import SlicewiseMaxPooling3D, tflite_friendly

SHAPE = (8, 16, 16, 1)


@pytest.fixture(scope="module")
def volumes():
    """Smooth random volumes in [0, 1] and their above-median masks (a task a tiny model learns)."""
    rng = np.random.default_rng(0)
    vols = ndimage.gaussian_filter(rng.random((12, *SHAPE)).astype("float32"), (0, 1, 2, 2, 0))
    vols = (vols - vols.min()) / (vols.max() - vols.min())
    return vols, (vols > np.median(vols)).astype("float32")


@pytest.fixture(scope="module")
def trained(volumes):
    vols, masks = volumes
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp(SHAPE, depth=2, filters=4, deep_supervision=True, pool_sizes=[(1, 2, 2), 2])
    model.compile(keras.optimizers.Adam(1e-2), loss=[unetpp_tf.losses.BCEDiceLoss()] * 2)
    model.fit(vols[:8], (masks[:8],) * 2, epochs=4, batch_size=2, verbose=0)
    foreground = (unetpp_tf.inference_model(model).predict(vols[8:], verbose=0) >= 0.5).mean()
    assert 0.1 < foreground < 0.9, f"the fixture model predicts {foreground:.0%} foreground"
    return model


@pytest.mark.parametrize("pool", [(2, 2, 2), (1, 2, 2), (2, 1, 1), (3, 2, 1)])
def test_slicewise_max_pooling_equals_max_pooling_3d(pool, rng):
    x = rng.normal(size=(2, 7, 9, 6, 3)).astype("float32")  # sizes not divisible: "valid" drops the rest
    expected = keras.layers.MaxPooling3D(pool)(x)
    np.testing.assert_array_equal(SlicewiseMaxPooling3D(pool)(x), expected)


def test_tflite_copy_swaps_only_the_3d_pooling(trained):
    lite = tflite_friendly(trained)
    assert lite is not trained
    pools = [layer for layer in lite.layers if "pool" in layer.name]
    assert pools and all(type(layer) is SlicewiseMaxPooling3D for layer in pools)
    assert [layer.pool_size for layer in pools] == [(1, 2, 2), (2, 2, 2)]
    assert lite.get_layer("x_0_1_conv1") is trained.get_layer("x_0_1_conv1")  # weights shared, not copied


def test_export_every_format_with_parity_and_builtin_ops(trained, volumes, tmp_path):
    vols, _ = volumes
    report = export_model(trained, tmp_path, formats=("keras", "saved_model", "tflite"),
                          quantize=("none", "float16", "dynamic", "int8"), calibration=vols[:8], samples=vols[8:])
    by_name = {a["name"]: a for a in report["artifacts"]}
    assert set(by_name) == {"model_inference", "saved_model", "model_float32", "model_float16", "model_dynamic",
                            "model_int8"}
    assert report["image_size"] in ([8, 16, 16], (8, 16, 16))
    for name, entry in by_name.items():
        assert entry["dice_agreement"] >= entry["threshold"], name
    for name in ("model_float32", "model_float16", "model_dynamic", "model_int8"):
        ops = by_name[name]["ops"]
        assert by_name[name]["custom_ops"] == [] and {"CONV_3D", "MAX_POOL_2D"} <= set(ops), (name, ops)
        assert not any("POOL_3D" in op or op.startswith("Flex") for op in ops)
    assert by_name["model_float32"]["max_abs_diff"] < 1e-5
    # TFLite has no integer 3D convolution kernels: the int8 file keeps them in float, and says so
    assert {"CONV_3D", "CONV_3D_TRANSPOSE"} <= set(by_name["model_int8"]["float_ops"])

    reference = unetpp_tf.inference_model(trained).predict(vols[8:], verbose=0)
    lite = TFLiteModel(tmp_path / "model_float32.tflite")
    assert lite.input_shape == (None, *SHAPE) and lite.output_shape == (None, *SHAPE)
    np.testing.assert_allclose(lite.predict(vols[8:]), reference, atol=1e-5)
    with pytest.raises(ValueError, match="takes 8x16x16 volumes"):
        lite(np.zeros((1, 8, 16, 8, 1), "float32"))
    runner = SavedModelRunner(tmp_path / "saved_model")
    np.testing.assert_allclose(runner(vols[8:]), reference, atol=1e-5)
    np.testing.assert_allclose(runner(vols[8]), reference[:1], atol=1e-5)  # one volume [D, H, W, C]


def test_dynamic_volume_saved_model_pads_every_axis(trained, volumes, tmp_path):
    dynamic = unetpp_tf.build_unetpp((None, None, None, 1), depth=2, filters=4, deep_supervision=True,
                                     pool_sizes=[(1, 2, 2), 2])
    dynamic.set_weights(trained.get_weights())
    export_model(dynamic, tmp_path, formats=("saved_model",), samples=volumes[0][8:])
    odd = volumes[0][:2, :6, :14, :13]  # not divisible by the divisor 4 on any axis
    runner = SavedModelRunner(tmp_path / "saved_model")
    expected = np.asarray(padded_forward(unetpp_tf.inference_model(dynamic))(odd))
    assert expected.shape == (2, 6, 14, 13, 1)
    np.testing.assert_allclose(runner(odd), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"image_size must be \(depth, height, width\)"):
        export_model(dynamic, tmp_path / "b", formats=("tflite",), image_size=(16, 16), samples=volumes[0][8:])
    with pytest.raises(ValueError, match="volumes have the size"):
        export_model(dynamic, tmp_path / "c", formats=("tflite",), image_size=(8, 16, 32), samples=volumes[0][8:])
