"""3D UNet++ / U-Net from the same builder: exact parameter counts, layers, anisotropic pooling,
deep supervision, pruning, recomputation, FLOPs, the 5D layers, and losses/metrics on volumes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import unetpp_tf
from unetpp_tf import losses, metrics
from unetpp_tf.models import (
    ConcatConv3D,
    VolumeUpsampling,
    build_unet,
    build_unetpp,
    count_flops,
    pool_sizes_for_spacing,
    prune,
    size_divisor,
    with_recompute,
)
from unetpp_tf.models.layers import FusedBatchNormalization, FusedDropout
from test_encoders import shapes_only
from test_nested_model import _gradients, value_and_gradients  # the same gradient step as the 2D recompute test

independent = pytest.mark.backend_independent

PAPER = dict(depth=4, filters=32, batch_norm=False, dropout=0.5, l2=1e-4, upsampling="transpose")


def _hand_count(widths, kernel=27, nested=True, batch_norm=False, in_channels=1, classes=1, up_kernels=None):
    """Parameters from the formula: conv k*cin*cout (+ bias, or BN's 4 per channel), transpose t*cin*cout + cout."""
    depth = len(widths) - 1
    up_kernels = up_kernels or [8] * depth

    def conv(cin, cout):
        return kernel * cin * cout + (4 * cout if batch_norm else cout)

    total = sum(conv(in_channels if i == 0 else widths[i - 1], w) + conv(w, w) for i, w in enumerate(widths))
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            if nested or i + j == depth:
                parts = (j if nested else 1) + 1
                total += up_kernels[i] * widths[i + 1] * widths[i] + widths[i]
                total += conv(parts * widths[i], widths[i]) + conv(widths[i], widths[i])
    return total + widths[0] * classes + classes


def test_paper_style_3d_parameter_counts():
    widths = (32, 64, 128, 256, 512)
    assert _hand_count(widths) == 26_198_273 and _hand_count(widths, nested=False) == 22_575_329
    assert unetpp_tf.from_preset("paper", input_shape=(None, None, None, 1)).count_params() == 26_198_273
    assert build_unet((None, None, None, 1), **PAPER).count_params() == 22_575_329
    # the 2D formula gives the paper's figures: the 3D counts come from the same graph
    assert _hand_count(widths, kernel=9, up_kernels=[4] * 4) == 9_041_601


@independent
def test_small_batch_norm_and_anisotropic_counts():
    bn = dict(depth=2, filters=4, num_classes=2)
    with shapes_only():
        nested, plain = build_unetpp((16, 16, 16, 1), **bn), build_unet((16, 16, 16, 1), **bn)
    assert nested.count_params() == _hand_count((4, 8, 16), batch_norm=True, classes=2) == 23_622
    assert plain.count_params() == 21_602
    # (1, 2, 2) at level 0: the transposed convolutions back to level 0 have 1x2x2 kernels
    with shapes_only():
        model = build_unetpp((8, 16, 16, 2), depth=2, filters=4, batch_norm=False, pool_sizes=[(1, 2, 2), 2])
    assert model.count_params() == _hand_count((4, 8, 16), in_channels=2, up_kernels=[4, 8]) == 23_205


@independent
def test_3d_layers_and_names_match_2d():
    with shapes_only():
        vol = build_unetpp((8, 16, 16, 1), depth=2, filters=4, deep_supervision=True, pool_sizes=[(1, 2, 2), 2],
                           dropout=0.2)
        img = build_unetpp((16, 16, 1), depth=2, filters=4, deep_supervision=True, dropout=0.2)
    assert [layer.name for layer in vol.layers] == [layer.name for layer in img.layers]
    assert vol.output_names == ["output_1", "output_2"]
    merge = vol.get_layer("x_0_2_conv1")
    assert isinstance(merge, ConcatConv3D) and tuple(merge.kernel.shape) == (3, 3, 3, 12, 4)
    assert isinstance(vol.get_layer("x_0_1_conv2"), keras.layers.Conv3D)
    assert vol.get_layer("x_1_0_pool").pool_size == (1, 2, 2)
    assert vol.get_layer("x_2_0_pool").pool_size == (2, 2, 2)
    up = vol.get_layer("x_0_1_up")
    assert isinstance(up, keras.layers.Conv3DTranspose) and up.strides == (1, 2, 2)
    assert vol.get_layer("x_1_1_up").strides == (2, 2, 2)
    assert tuple(vol.get_layer("output_1_logits").kernel.shape) == (1, 1, 1, 4, 1)
    assert isinstance(vol.get_layer("x_0_0_bn1"), FusedBatchNormalization)
    assert isinstance(vol.get_layer("x_0_0_drop1"), FusedDropout)
    lines = []
    vol.summary(line_length=120, print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert "x_0_2_conv1 (ConcatConv3D)" in text and "(None, 8, 16, 16, 4)" in text
    assert f"Total params: {vol.count_params():,}" in text
    assert tuple(vol.get_layer("x_2_0_act2").output.shape) == (None, 4, 4, 4, 16)
    for mode, cls in (("bilinear", VolumeUpsampling), ("nearest", VolumeUpsampling)):
        with shapes_only():
            layer = build_unet((None, None, None, 1), depth=2, filters=2, upsampling=mode).get_layer("x_0_2_up")
        assert isinstance(layer, cls) and layer.interpolation == {"bilinear": "trilinear"}.get(mode, mode)


def test_size_checks_name_the_axis_and_the_size_to_pad_to():
    with pytest.raises(ValueError, match=r"input depth 20 is not divisible by 8 \(depth 3\); resize or pad to 16 or 2"):
        build_unetpp((20, 32, 32, 1), depth=3, filters=2)
    with pytest.raises(ValueError, match=r"input width 36 is not divisible by 8"):
        build_unetpp((None, 32, 36, 1), depth=3, filters=2)
    # the depth axis is pooled once (1 * 1 * 2): 6 is fine, 5 is not
    pools = [(1, 2, 2), (1, 2, 2), 2]
    assert build_unet((6, 32, 32, 1), depth=3, filters=2, pool_sizes=pools).output_shape == (None, 6, 32, 32, 1)
    with pytest.raises(ValueError, match=r"input depth 5 is not divisible by 2 \(the depth pool sizes \[1, 1, 2\] "
                                         r"multiply to 2\); resize or pad to 4 or 6"):
        build_unet((5, 32, 32, 1), depth=3, filters=2, pool_sizes=pools)
    # 2D takes pool_sizes too
    flat = build_unet((8, 32, 1), depth=2, filters=2, pool_sizes=[(1, 2), (2, 2)])
    assert flat.get_layer("x_1_0_pool").pool_size == (1, 2) and flat.output_shape == (None, 8, 32, 1)
    with pytest.raises(ValueError, match="pool_sizes must have one entry per level"):
        build_unetpp((16, 16, 16, 1), depth=2, pool_sizes=[2])
    with pytest.raises(ValueError, match=r"pool_sizes\[1\] must be a positive int or a tuple of 3"):
        build_unetpp((16, 16, 16, 1), depth=2, pool_sizes=[2, (2, 2)])
    with pytest.raises(ValueError, match="pretrained encoders are 2D"):
        build_unetpp((16, 64, 64, 3), depth=2, encoder="resnet50")
    with pytest.raises(ValueError, match=r"input_shape must be \(height, width, channels\) or \(depth"):
        build_unetpp((1, 16, 16, 16, 1), depth=2)


def test_pool_sizes_for_spacing_follows_the_anisotropy_rule():
    assert pool_sizes_for_spacing((5.0, 1.0, 1.0), 4) == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert pool_sizes_for_spacing((1.0, 1.0, 1.0), 2) == [(2, 2, 2)] * 2
    assert pool_sizes_for_spacing((2.0, 1.0, 1.0), 2) == [(2, 2, 2)] * 2  # exactly 2x: pooled
    assert pool_sizes_for_spacing((3.0, 0.7, 0.7), 4) == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert pool_sizes_for_spacing((2.5, 0.7, 0.7), 3) == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert pool_sizes_for_spacing((1.0, 4.5), 3) == [(2, 1), (2, 1), (2, 2)]
    with pytest.raises(ValueError, match="spacing must be 2 or 3 positive sizes"):
        pool_sizes_for_spacing((1.0, 0.0, 1.0), 2)


def test_volume_upsampling_is_the_3d_form_of_bilinear_resize(rng):
    x = rng.random((2, 3, 4, 5, 2), dtype=np.float32)
    # (1, 2, 2): every slice resized as tf.image.resize does (half-pixel centres)
    y = np.asarray(VolumeUpsampling((1, 2, 2))(x))
    expected = tf.image.resize(x.reshape(6, 4, 5, 2), (8, 10), method="bilinear").numpy().reshape(2, 3, 8, 10, 2)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    # along the depth axis with a factor of 3: the same 1D rule
    z = np.asarray(VolumeUpsampling((3, 1, 1))(x))
    assert z.shape == (2, 9, 4, 5, 2)
    ref = tf.image.resize(x.transpose(0, 2, 1, 3, 4).reshape(8, 3, 5 * 2, 1), (9, 10), "bilinear").numpy()
    np.testing.assert_allclose(z, ref.reshape(2, 4, 9, 5, 2).transpose(0, 2, 1, 3, 4), atol=1e-6)
    nearest = np.asarray(VolumeUpsampling(2, interpolation="nearest")(x))
    np.testing.assert_array_equal(nearest, x.repeat(2, 1).repeat(2, 2).repeat(2, 3))
    # None sizes inside a traced function
    fn = tf.function(lambda v: VolumeUpsampling(2)(v), input_signature=[tf.TensorSpec((None,) * 4 + (2,))])
    assert tuple(fn(x).shape) == (2, 6, 8, 10, 2)


@independent
def test_concat_conv3d_training_equals_the_concatenated_convolution(rng):
    parts = [rng.random((1, 4, 6, 6, 3), dtype=np.float32), rng.random((1, 4, 6, 6, 5), dtype=np.float32)]
    layer = ConcatConv3D(4, 3, padding="same", bias_initializer="glorot_uniform")
    train, infer = layer(parts, training=True), layer(parts, training=False)
    plain = keras.layers.Conv3D(4, 3, padding="same")
    plain.build((None, 4, 6, 6, 8))
    plain.set_weights(layer.get_weights())
    np.testing.assert_allclose(train, plain(np.concatenate(parts, -1)), atol=1e-5)
    np.testing.assert_allclose(infer, train, atol=1e-5)


@independent
def test_fused_batch_norm_and_dropout_in_5d(rng):
    x = rng.normal(2.0, 3.0, (2, 4, 6, 6, 3)).astype(np.float32)
    fused, plain = FusedBatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    assert fused._fusable(x, None) == (keras.backend.backend() == "tensorflow")
    for training in (True, False, True):
        np.testing.assert_allclose(fused(x, training=training), plain(x, training=training), atol=1e-4)
    np.testing.assert_allclose(fused.moving_variance, plain.moving_variance, rtol=1e-5)
    np.testing.assert_allclose(fused.moving_mean, np.mean(x, (0, 1, 2, 3)) * 0.75, rtol=1e-5)
    _, _, grads = value_and_gradients(lambda v: keras.ops.sum(fused(v, training=True) ** 3), [x], fused)
    assert len(grads) == 2 and all(np.all(np.isfinite(g)) for g in grads)
    dropped = np.asarray(FusedDropout(0.5, seed=3)(np.ones((2, 4, 8, 8, 2), np.float32), training=True))
    assert set(np.unique(dropped)) == {0.0, 2.0} and 0.4 < np.mean(dropped == 0) < 0.6


@pytest.fixture(scope="module")
def volume_ds():
    keras.utils.set_random_seed(2)
    return build_unetpp((8, 16, 16, 1), depth=2, filters=4, deep_supervision=True, pool_sizes=[(1, 2, 2), 2],
                        dropout=0.3, upsampling="bilinear")


def test_deep_supervision_pruning_and_inference_modes(volume_ds, rng):
    x = rng.random((2, 8, 16, 16, 1), dtype=np.float32)
    full = [np.asarray(o) for o in volume_ds(x, training=False)]
    for level in (1, 2):
        pruned = prune(volume_ds, level)
        np.testing.assert_allclose(pruned(x, training=False), full[level - 1], atol=1e-6)
    l1 = prune(volume_ds, 1)
    assert "x_2_0_conv1" not in {layer.name for layer in l1.layers} and l1.count_params() < volume_ds.count_params()
    accurate = unetpp_tf.inference_model(volume_ds, "accurate")
    np.testing.assert_allclose(accurate(x, training=False), (full[0] + full[1]) / 2, atol=1e-6)


def test_recompute_gradients_equal_the_plain_model_in_3d(volume_ds, rng):
    x = rng.random((2, 8, 16, 16, 1), dtype=np.float32)
    plain = keras.Model(volume_ds.input, volume_ds.output)
    recomputed = with_recompute(plain)
    assert type(recomputed).__name__ == "RecomputedModel"
    state = [v.numpy() for v in plain.variables]
    seeds = [layer.seed_generator.state.numpy() for layer in plain.layers if isinstance(layer, keras.layers.Dropout)]

    loss, grads, moving = _gradients(plain, x)
    for variable, value in zip(plain.variables, state):
        variable.assign(value)
    dropouts = [layer for layer in plain.layers if isinstance(layer, keras.layers.Dropout)]
    for layer, seed in zip(dropouts, seeds):
        layer.seed_generator.state.assign(seed)
    loss_r, grads_r, moving_r = _gradients(recomputed, x)
    assert loss_r == pytest.approx(loss, rel=1e-6)
    scale = max(np.abs(g).max() for g in grads)
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g_r, g, atol=1e-5 * scale)
    for m, m_r in zip(moving, moving_r):
        np.testing.assert_allclose(m_r, m, atol=1e-6)
    recomputed_built = build_unetpp((8, 16, 16, 1), depth=2, filters=4, recompute=True)
    assert type(recomputed_built).__name__ == "RecomputedModel"


@independent
def test_count_flops_and_size_divisor_in_3d():
    with shapes_only():
        model = build_unet((8, 16, 16, 1), depth=1, filters=2, batch_norm=False, pool_sizes=[(1, 2, 2)])
        flexible = build_unetpp((None, None, None, 1), depth=3, filters=2)
        pooled = build_unet((None, None, None, 1), depth=2, filters=2, pool_sizes=[(1, 2, 2), 2])
        bilinear = build_unetpp((None, None, None, 1), depth=2, filters=2, upsampling="bilinear")
    full, half = 8 * 16 * 16, 8 * 8 * 8
    expected = 2 * (
        full * 27 * 1 * 2 + full * 27 * 2 * 2  # x_0_0
        + half * 27 * 2 * 4 + half * 27 * 4 * 4  # x_1_0
        + half * 4 * 4 * 2  # transpose 1x2x2, each input position scatters its kernel
        + full * 27 * 4 * 2 + full * 27 * 2 * 2  # x_0_1 over [x_0_0, up]
        + full * 2 * 1  # head
    )
    assert count_flops(model) == expected
    assert count_flops(flexible, (8, 16, 16, 1)) * 8 == count_flops(flexible, (16, 32, 32, 1))
    assert size_divisor(flexible) == 8
    assert size_divisor(pooled) == 4
    assert size_divisor(bilinear) == 4


def test_fit_save_and_load_round_trip(volume_ds, rng, tmp_path):
    images = rng.random((2, 8, 16, 16, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    model = build_unetpp((8, 16, 16, 1), depth=2, filters=4, pool_sizes=[(1, 2, 2), 2], upsampling="nearest")
    model.compile("adam", loss=losses.BCEDiceLoss(), metrics=[metrics.Dice(), metrics.IoU()])
    history = model.fit(images, masks, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for source in (model, volume_ds):
        source.save(tmp_path / "volume.keras")
        loaded = keras.models.load_model(tmp_path / "volume.keras")
        for a, b in zip(keras.tree.flatten(source(images)), keras.tree.flatten(loaded(images))):
            np.testing.assert_allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- losses and metrics on [B, D, H, W, C]


def _np_dice_loss(t, p, smooth=1.0):
    axes = tuple(range(1, t.ndim - 1))
    tp = (t * p).sum(axes)
    return 1 - ((2 * tp + smooth) / (t.sum(axes) + p.sum(axes) + smooth)).mean(-1)


@independent
def test_losses_on_volumes_match_numpy(rng):
    shape = (2, 4, 6, 5)
    binary_t = (rng.random(shape + (1,)) > 0.6).astype(np.float32)
    binary_p = rng.uniform(0.02, 0.98, shape + (1,)).astype(np.float32)
    ids = rng.integers(0, 3, shape)
    onehot = np.eye(3, dtype=np.float32)[ids]
    logits = rng.normal(size=shape + (3,)).astype(np.float32)
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    np.testing.assert_allclose(losses.dice_loss(binary_t, binary_p), _np_dice_loss(binary_t, binary_p), rtol=1e-5)
    np.testing.assert_allclose(losses.dice_loss(ids, logits, from_logits=True), _np_dice_loss(onehot, soft),
                               rtol=1e-5)
    bce = -(binary_t * np.log(binary_p) + (1 - binary_t) * np.log(1 - binary_p)).mean((1, 2, 3, 4))
    np.testing.assert_allclose(losses.bce_dice_loss(binary_t, binary_p),
                               0.5 * bce + _np_dice_loss(binary_t, binary_p), rtol=1e-5)
    ce = -(onehot * np.log(soft)).sum(-1).mean((1, 2, 3))
    np.testing.assert_allclose(losses.ce_dice_loss(ids[..., None], logits, from_logits=True),
                               ce + _np_dice_loss(onehot, soft), rtol=1e-5)
    tp = (binary_t * binary_p).sum((1, 2, 3))
    fp, fn = binary_p.sum((1, 2, 3)) - tp, binary_t.sum((1, 2, 3)) - tp
    tversky = 1 - ((tp + 1) / (tp + 0.3 * fp + 0.7 * fn + 1)).mean(-1)
    np.testing.assert_allclose(losses.tversky_loss(binary_t, binary_p, alpha=0.3, beta=0.7), tversky, rtol=1e-5)
    p_t = np.where(binary_t == 1, binary_p, 1 - binary_p)
    alpha_t = np.where(binary_t == 1, 0.25, 0.75)
    focal = (alpha_t * (1 - p_t) ** 2 * -np.log(p_t)).mean((1, 2, 3, 4))
    np.testing.assert_allclose(losses.focal_loss(binary_t, binary_p), focal, rtol=1e-5)
    assert tuple(losses.DiceLoss()(binary_t, binary_p).shape) == ()


@independent
def test_metrics_on_volumes_match_numpy(rng):
    truth = rng.integers(0, 3, (2, 4, 6, 5))
    pred_ids = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, truth.shape))
    probs = np.eye(3, dtype=np.float32)[pred_ids] * 0.8 + 0.2 / 3
    dice = metrics.Dice(num_classes=3)
    iou = metrics.IoU(num_classes=3)
    dice.update_state(truth, probs)
    iou.update_state(truth, probs)
    expected_dice, expected_iou = [], []
    for c in range(3):
        t, p = truth == c, pred_ids == c
        inter = np.sum(t & p)
        expected_dice.append(2 * inter / (t.sum() + p.sum()))
        expected_iou.append(inter / np.sum(t | p))
    assert float(dice.result()) == pytest.approx(np.mean(expected_dice), rel=1e-5)
    assert float(iou.result()) == pytest.approx(np.mean(expected_iou), rel=1e-5)
    binary_t = (rng.random((2, 4, 6, 5, 1)) > 0.5).astype(np.float32)
    binary_p = rng.random((2, 4, 6, 5, 1)).astype(np.float32)
    tp, fp, fn, tn = (np.asarray(c) for c in metrics.confusion_counts(binary_t, binary_p, per_sample=True))
    hard = binary_p >= 0.5
    np.testing.assert_array_equal(tp[:, 0], np.sum((binary_t == 1) & hard, (1, 2, 3, 4)))
    np.testing.assert_array_equal(tn[:, 0], np.sum((binary_t == 0) & ~hard, (1, 2, 3, 4)))
    weighted = metrics.confusion_counts(binary_t, binary_p, sample_weight=np.ones((2, 4, 6, 5)) * 2)
    assert float(weighted[0][0]) == 2 * tp.sum()
