"""Losses against hand-written numpy references, plus gradients and serialization."""

import keras
import numpy as np
import pytest

from unetpp_tf import losses
from test_nested_model import value_and_gradients

pytestmark = pytest.mark.backend_independent

EPS = 1e-7
K = 3  # classes in the multi-class cases


# ---------------------------------------------------------------- numpy references
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def soft_counts(t, p):
    tp = (t * p).sum((1, 2))
    return tp, ((1 - t) * p).sum((1, 2)), (t * (1 - p)).sum((1, 2))


def ref_dice(t, p, smooth=1.0):
    tp = (t * p).sum((1, 2))
    dice = (2 * tp + smooth) / (t.sum((1, 2)) + p.sum((1, 2)) + smooth)
    return 1 - dice.mean(-1)


def ref_tversky(t, p, alpha=0.5, beta=0.5, smooth=1.0):
    tp, fp, fn = soft_counts(t, p)
    return 1 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean(-1)


def ref_bce(t, p):
    p = np.clip(p, EPS, 1 - EPS)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean((1, 2, 3))


def ref_cce(t, p):
    return -(t * np.log(np.clip(p, EPS, 1))).sum(-1).mean((1, 2))


def ref_focal(t, p, gamma=2.0, alpha=0.25):
    if p.shape[-1] == 1:
        p_t = t * p + (1 - t) * (1 - p)
        a_t = t * alpha + (1 - t) * (1 - alpha)
        return (-a_t * (1 - p_t) ** gamma * np.log(p_t)).mean((1, 2, 3))
    return (-alpha * t * (1 - p) ** gamma * np.log(p)).sum(-1).mean((1, 2))


REFERENCES = {
    "dice": (losses.dice_loss, ref_dice),
    "bce_dice": (losses.bce_dice_loss, lambda t, p: 0.5 * ref_bce(t, p) + ref_dice(t, p)),
    "ce_dice": (
        losses.ce_dice_loss,
        lambda t, p: (ref_bce(t, p) if p.shape[-1] == 1 else ref_cce(t, p)) + ref_dice(t, p),
    ),
    "tversky": (
        lambda t, p, **kw: losses.tversky_loss(t, p, alpha=0.3, beta=0.7, **kw),
        lambda t, p: ref_tversky(t, p, 0.3, 0.7),
    ),
    "focal": (losses.focal_loss, ref_focal),
}


def np_loss(fn, y_true, y_pred, **kwargs):
    return keras.ops.convert_to_numpy(fn(y_true, y_pred, **kwargs))


@pytest.fixture
def binary():
    """Binary targets (2, 4, 4, 1), logits and sigmoid probabilities."""
    rng = np.random.default_rng(0)
    t = (rng.random((2, 4, 4, 1)) > 0.5).astype("float32")
    logits = rng.normal(0, 2, (2, 4, 4, 1)).astype("float32")
    return t, logits, sigmoid(logits.astype("float64"))


@pytest.fixture
def multiclass():
    """Sparse ids (2, 4, 4), logits (2, 4, 4, K) and softmax probabilities."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, K, (2, 4, 4))
    logits = rng.normal(0, 2, (2, 4, 4, K)).astype("float32")
    return ids, logits, softmax(logits.astype("float64"))


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_binary_matches_reference(key, binary):
    fn, ref = REFERENCES[key]
    t, _, p = binary
    got = np_loss(fn, t, p.astype("float32"))
    assert got.shape == (2,)
    np.testing.assert_allclose(got, ref(t, p), rtol=1e-5, atol=1e-6)
    # A (batch, H, W) binary mask gets its channel axis.
    np.testing.assert_allclose(np_loss(fn, t[..., 0], p.astype("float32")), got, rtol=1e-6)


@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_multiclass_sparse_and_onehot_agree_with_reference(key, multiclass):
    fn, ref = REFERENCES[key]
    ids, _, p = multiclass
    onehot = np.eye(K, dtype="float32")[ids]
    p32 = p.astype("float32")
    expected = ref(onehot, p)
    for y_true in (ids, ids[..., None], ids.astype("float32"), onehot):
        got = np_loss(fn, y_true, p32)
        assert got.shape == (2,)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_from_logits_equals_probabilities(key, binary, multiclass):
    fn, _ = REFERENCES[key]
    for t, logits, p in (binary, multiclass):
        np.testing.assert_allclose(
            np_loss(fn, t, logits, from_logits=True),
            np_loss(fn, t, p.astype("float32")),
            rtol=1e-5,
            atol=1e-6,
        )


def test_empty_target_and_prediction_give_zero_dice_loss():
    zeros = np.zeros((2, 8, 8, 1), "float32")
    np.testing.assert_allclose(np_loss(losses.dice_loss, zeros, zeros), [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(np_loss(losses.tversky_loss, zeros, zeros), [0.0, 0.0], atol=1e-7)
    # Without smoothing the empty case would be 0/0; smooth makes it a perfect score.
    assert np.isnan(np_loss(losses.dice_loss, zeros, zeros, smooth=0.0)).all()


def test_all_foreground_perfect_prediction():
    ones = np.ones((2, 8, 8, 1), "float32")
    np.testing.assert_allclose(np_loss(losses.dice_loss, ones, ones), [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(np_loss(losses.bce_dice_loss, ones, ones), [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(
        np_loss(losses.bce_dice_loss, ones, 30.0 * ones, from_logits=True), [0.0, 0.0], atol=1e-6
    )


def test_fully_wrong_prediction_gives_dice_loss_near_one():
    t = np.ones((1, 16, 16, 1), "float32")
    got = np_loss(losses.dice_loss, t, np.zeros_like(t))
    np.testing.assert_allclose(got, [1 - 1 / 257], rtol=1e-6)
    assert got[0] > 0.99
    # Multi-class: every pixel predicted as the wrong class.
    ids = np.zeros((1, 16, 16), "int32")
    wrong = np.eye(2, dtype="float32")[np.ones_like(ids)]
    # class 0: dice 1/(256+1); class 1: dice 1/(256+1) -> loss 1 - 1/257
    np.testing.assert_allclose(np_loss(losses.dice_loss, ids, wrong), [1 - 1 / 257], rtol=1e-6)


# ---------------------------------------------------------------- Keras' own losses
def keras_mean(values):
    """Mean over every axis but the batch axis of a Keras loss computed per pixel."""
    values = keras.ops.convert_to_numpy(values)
    return values.reshape(len(values), -1).mean(1)


def test_cross_entropies_and_focal_match_keras(binary, multiclass):
    t, logits, p = binary
    p32 = p.astype("float32")
    bce = np_loss(losses.bce_dice_loss, t, p32, bce_weight=1.0, dice_weight=0.0)
    np.testing.assert_allclose(bce, keras_mean(keras.losses.binary_crossentropy(t, p32)), rtol=1e-5)
    bce_logits = np_loss(losses.bce_dice_loss, t, logits, bce_weight=1.0, dice_weight=0.0, from_logits=True)
    expected = keras_mean(keras.losses.binary_crossentropy(t, logits, from_logits=True))
    np.testing.assert_allclose(bce_logits, expected, rtol=1e-5)
    focal = keras.losses.binary_focal_crossentropy(t, p32, apply_class_balancing=True, alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(np_loss(losses.focal_loss, t, p32), keras_mean(focal), rtol=1e-4)

    ids, logits, p = multiclass
    onehot, p32 = np.eye(K, dtype="float32")[ids], p.astype("float32")
    ce = np_loss(losses.ce_dice_loss, ids, p32, ce_weight=1.0, dice_weight=0.0)
    np.testing.assert_allclose(ce, keras_mean(keras.losses.categorical_crossentropy(onehot, p32)), rtol=1e-5)
    sparse = keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
    ce_logits = np_loss(losses.ce_dice_loss, ids, logits, ce_weight=1.0, dice_weight=0.0, from_logits=True)
    np.testing.assert_allclose(ce_logits, keras_mean(sparse), rtol=1e-5)
    focal = keras.losses.categorical_focal_crossentropy(onehot, p32, alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(np_loss(losses.focal_loss, ids, p32), keras_mean(focal), rtol=1e-4)


def test_dice_and_tversky_match_keras_where_conventions_agree(binary, multiclass):
    # keras.losses.dice has no smoothing (an epsilon instead): smooth=0 here. Over axis (1, 2) it gives one
    # value per class, whose mean is this loss; over (1, 2, 3) it pools the classes, which this loss does not.
    t, _, p = binary
    p32 = p.astype("float32")
    keras_dice = keras.ops.convert_to_numpy(keras.losses.dice(t, p32, axis=(1, 2, 3)))
    np.testing.assert_allclose(np_loss(losses.dice_loss, t, p32, smooth=0.0), keras_dice, rtol=1e-5)
    ids, _, p = multiclass
    onehot, p32 = np.eye(K, dtype="float32")[ids], p.astype("float32")
    per_class = keras.ops.convert_to_numpy(keras.losses.dice(onehot, p32, axis=(1, 2)))
    np.testing.assert_allclose(np_loss(losses.dice_loss, ids, p32, smooth=0.0), per_class.mean(-1), rtol=1e-5)
    pooled = keras.ops.convert_to_numpy(keras.losses.dice(onehot, p32, axis=(1, 2, 3)))
    assert not np.allclose(pooled, per_class.mean(-1), rtol=1e-3)
    # Tversky with alpha == beta: Keras up to 3.15 weights false negatives with alpha (its docstring says false
    # positives), so only the symmetric case is a cross-check; the asymmetric one is checked against NumPy above.
    t, _, p = binary
    keras_tversky = keras.ops.convert_to_numpy(keras.losses.tversky(t, p.astype("float32"), 0.3, 0.3, axis=(1, 2, 3)))
    ours = np_loss(losses.tversky_loss, t, p.astype("float32"), alpha=0.3, beta=0.3, smooth=0.0)
    np.testing.assert_allclose(ours, keras_tversky, rtol=1e-5)


def test_tversky_half_half_is_dice(binary, multiclass):
    for t, _, p in (binary, multiclass):
        p = p.astype("float32")
        np.testing.assert_allclose(
            np_loss(losses.tversky_loss, t, p, smooth=0.0),
            np_loss(losses.dice_loss, t, p, smooth=0.0),
            rtol=1e-6,
        )
        # With smoothing the identity holds for twice the smooth term.
        np.testing.assert_allclose(
            np_loss(losses.tversky_loss, t, p, smooth=1.0),
            np_loss(losses.dice_loss, t, p, smooth=2.0),
            rtol=1e-6,
        )


def test_tversky_alpha_weights_false_positives():
    t = np.zeros((1, 4, 4, 1), "float32")
    t[0, :2] = 1.0  # 8 foreground pixels
    over = np.ones_like(t)  # 8 false positives
    under = np.zeros_like(t)
    under[0, 0] = 1.0  # 4 false negatives
    fp_heavy = dict(alpha=0.9, beta=0.1)
    # TP=8, FP=8: 1 - 9 / (8 + 0.9 * 8 + 1)
    np.testing.assert_allclose(
        np_loss(losses.tversky_loss, t, over, **fp_heavy), [1 - 9 / 16.2], rtol=1e-6
    )
    # TP=4, FN=4: 1 - 5 / (4 + 0.1 * 4 + 1)
    np.testing.assert_allclose(
        np_loss(losses.tversky_loss, t, under, **fp_heavy), [1 - 5 / 5.4], rtol=1e-6
    )


def test_focal_gamma0_alpha_half_is_half_bce(binary):
    t, logits, p = binary
    half_bce = 0.5 * ref_bce(t, p)
    for y_pred, from_logits in ((p.astype("float32"), False), (logits, True)):
        got = np_loss(losses.focal_loss, t, y_pred, gamma=0.0, alpha=0.5, from_logits=from_logits)
        np.testing.assert_allclose(got, half_bce, rtol=1e-5)


def test_focal_down_weights_easy_pixels():
    t = np.ones((1, 2, 2, 1), "float32")
    easy, hard = np.full_like(t, 0.9), np.full_like(t, 0.1)
    # foreground: alpha * (1 - p) ** 2 * -log(p)
    np.testing.assert_allclose(
        np_loss(losses.focal_loss, t, easy), [0.25 * 0.01 * -np.log(0.9)], rtol=1e-5
    )
    np.testing.assert_allclose(
        np_loss(losses.focal_loss, t, hard), [0.25 * 0.81 * -np.log(0.1)], rtol=1e-5
    )


def test_stable_bce_for_large_logits():
    t = np.array([[[[1.0], [0.0]]]], "float32")
    logits = np.array([[[[-100.0], [100.0]]]], "float32")
    # Each pixel costs exactly 100 nats; sigmoid-then-log would saturate at -log(1e-7).
    got = np_loss(losses.bce_dice_loss, t, logits, bce_weight=1.0, dice_weight=0.0,
                  from_logits=True)
    np.testing.assert_allclose(got, [100.0], rtol=1e-5)


# ---------------------------------------------------------------- Loss objects
CLASSES = {
    losses.DiceLoss: dict(smooth=0.5, from_logits=True),
    losses.BCEDiceLoss: dict(bce_weight=0.3, dice_weight=2.0, smooth=0.5, from_logits=True),
    losses.CEDiceLoss: dict(ce_weight=0.7, dice_weight=1.5, smooth=2.0, from_logits=True),
    losses.TverskyLoss: dict(alpha=0.2, beta=0.8, smooth=0.1, from_logits=True),
    losses.FocalLoss: dict(gamma=1.5, alpha=0.6, from_logits=True),
}
FUNCTIONS = {
    losses.DiceLoss: losses.dice_loss,
    losses.BCEDiceLoss: losses.bce_dice_loss,
    losses.CEDiceLoss: losses.ce_dice_loss,
    losses.TverskyLoss: losses.tversky_loss,
    losses.FocalLoss: losses.focal_loss,
}


@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
def test_loss_object_reduces_per_sample_values(cls, binary, multiclass):
    kwargs = CLASSES[cls]
    for t, logits, _ in (binary, multiclass):
        per_sample = np_loss(FUNCTIONS[cls], t, logits, **kwargs)
        obj = cls(**kwargs)
        np.testing.assert_allclose(float(obj(t, logits)), per_sample.mean(), rtol=1e-6)
        weights = np.array([0.25, 1.0], "float32")
        np.testing.assert_allclose(
            float(obj(t, logits, sample_weight=weights)), (weights * per_sample).mean(), rtol=1e-6
        )
        none = cls(reduction="none", **kwargs)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(none(t, logits)), per_sample,
                                   rtol=1e-6)


@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
def test_config_round_trip(cls, binary):
    t, logits, _ = binary
    obj = cls(name="custom", reduction="sum", **CLASSES[cls])
    config = obj.get_config()
    assert config["name"] == "custom" and config["reduction"] == "sum"
    assert {k: config[k] for k in CLASSES[cls]} == CLASSES[cls]
    clone = cls.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(restored) is cls and restored.get_config() == config
    expected = float(obj(t, logits))
    assert float(clone(t, logits)) == pytest.approx(expected, rel=1e-6)
    assert float(restored(t, logits)) == pytest.approx(expected, rel=1e-6)
    # The non-default kwargs matter: the default object gives another value.
    assert float(cls(reduction="sum")(t, logits)) != pytest.approx(expected, rel=1e-3)


def test_default_names():
    names = [cls().name for cls in CLASSES]
    assert names == ["dice_loss", "bce_dice_loss", "ce_dice_loss", "tversky_loss", "focal_loss"]


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
def test_gradients_finite_at_extremes(cls):
    t_bin = np.array([1, 0, 1, 0], "float32").reshape(1, 2, 2, 1)
    ids = np.array([0, 1, 2, 0]).reshape(1, 2, 2)
    cases = [
        (t_bin, np.array([40, -40, -40, 40], "float32").reshape(1, 2, 2, 1), True),
        (t_bin, np.array([1, 0, 0, 1], "float32").reshape(1, 2, 2, 1), False),
        (t_bin, np.array([1, 0, 1, 0], "float32").reshape(1, 2, 2, 1), False),
        (ids, np.array([[60, -60, 0]] * 4, "float32").reshape(1, 2, 2, 3), True),
        (ids, np.eye(3, dtype="float32")[[0, 0, 0, 1]].reshape(1, 2, 2, 3), False),
        (ids, np.eye(3, dtype="float32")[[0, 1, 2, 0]].reshape(1, 2, 2, 3), False),
    ]
    for t, y_pred, from_logits in cases:
        kwargs = {**CLASSES[cls], "from_logits": from_logits}
        value, (grad,), _ = value_and_gradients(lambda x: cls(**kwargs)(t, x), [y_pred])
        assert np.isfinite(value) and np.isfinite(grad).all(), (t, y_pred, from_logits)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_focal_gradient_finite_for_confident_logits(gamma):
    t = np.array([1, 0], "float32").reshape(1, 1, 2, 1)
    for y_true, y_pred in ((t, np.array([40, -40], "float32").reshape(1, 1, 2, 1)),
                           (np.array([[[0, 1]]]), np.array([[[[40, -40], [-40, 40]]]], "float32"))):
        def loss_fn(x, y_true=y_true):
            return keras.ops.sum(losses.focal_loss(y_true, x, gamma=gamma, from_logits=True))

        _, (grad,), _ = value_and_gradients(loss_fn, [y_pred])
        assert np.isfinite(grad).all()


# ---------------------------------------------------------------- get and errors
def test_get():
    assert isinstance(losses.get("dice"), losses.DiceLoss)
    assert isinstance(losses.get("bce_dice_loss"), losses.BCEDiceLoss)
    assert isinstance(losses.get("TVERSKY"), losses.TverskyLoss)
    assert isinstance(losses.get(losses.FocalLoss), losses.FocalLoss)
    obj = losses.CEDiceLoss(ce_weight=3.0)
    assert losses.get(obj) is obj
    wrapped = losses.get(lambda t, p: keras.ops.mean(keras.ops.abs(t - p), axis=(1, 2, 3)))
    assert isinstance(wrapped, keras.losses.Loss)
    t, p = np.zeros((2, 2, 2, 1), "float32"), np.full((2, 2, 2, 1), 0.25, "float32")
    assert float(wrapped(t, p)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="bce_dice.*ce_dice.*dice.*focal.*tversky"):
        losses.get("jaccard")
    with pytest.raises(ValueError, match="Cannot build a loss"):
        losses.get(3)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 2\).*\(2, 4, 4, 3\)"):
        losses.dice_loss(np.zeros((2, 4, 4, 2)), np.zeros((2, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match=r"\(2, 5, 5\).*\(2, 4, 4, 1\)"):
        losses.dice_loss(np.zeros((2, 5, 5)), np.zeros((2, 4, 4, 1), "float32"))


def test_negative_parameter_rejected():
    with pytest.raises(ValueError, match="smooth=-1.0"):
        losses.DiceLoss(smooth=-1.0)
