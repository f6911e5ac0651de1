"""Streaming metrics against numpy confusion matrices, serialization and a saved model."""

import keras
import numpy as np
import pytest

from unetpp_tf import losses, metrics

pytestmark = pytest.mark.backend_independent

CLASSES = [metrics.Dice, metrics.IoU, metrics.Precision, metrics.Recall, metrics.F1Score,
           metrics.PixelAccuracy]
KEYS = {metrics.Dice: "dice", metrics.IoU: "iou", metrics.Precision: "precision",
        metrics.Recall: "recall", metrics.F1Score: "f1", metrics.PixelAccuracy: "accuracy"}


# ---------------------------------------------------------------- numpy references
def ref_counts(true_ids, pred_ids, k, weights=None):
    """Per-class TP, FP, FN, TN from a (weighted) numpy confusion matrix."""
    weights = np.ones(true_ids.shape) if weights is None else np.broadcast_to(weights,
                                                                              true_ids.shape)
    cm = np.zeros((k, k))
    np.add.at(cm, (true_ids.ravel(), pred_ids.ravel()), weights.ravel())
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    return tp, fp, fn, cm.sum() - tp - fp - fn


def ref_scores(tp, fp, fn, tn, zero_division=1.0):
    def ratio(a, b):
        return np.where(b > 0, a / np.where(b > 0, b, 1), zero_division)

    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"dice": ratio(2 * tp, 2 * tp + fp + fn), "iou": ratio(tp, tp + fp + fn),
            "precision": p, "recall": r, "f1": np.where(p + r > 0, 2 * p * r / np.where(
                p + r > 0, p + r, 1), 0.0), "accuracy": ratio(tp + tn, tp + tn + fp + fn)}


def value(x):
    return keras.ops.convert_to_numpy(x)


def run(metric, *batches):
    for batch in batches:
        metric.update_state(*batch)
    return value(metric.result())


@pytest.fixture
def multiclass():
    """Sparse ids (3, 5, 5), softmax-like probabilities (3, 5, 5, 3), predicted ids."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 3, (3, 5, 5))
    probs = rng.dirichlet(np.ones(3), (3, 5, 5)).astype("float32")
    return ids, probs, probs.argmax(-1)


# ---------------------------------------------------------------- streaming
def test_streaming_equals_whole_dataset_not_mean_of_batches():
    t1, p1 = np.ones((1, 4, 4, 1), "float32"), np.full((1, 4, 4, 1), 0.9, "float32")
    # A batch of two images, each with 4 foreground pixels that are all missed.
    t2, p2 = np.zeros((2, 4, 4, 1), "float32"), np.full((2, 4, 4, 1), 0.1, "float32")
    t2[:, :2, :2] = 1.0
    for cls in CLASSES:
        streamed = run(cls(), (t1, p1), (t2, p2))
        whole = run(cls(), (np.concatenate([t1, t2]), np.concatenate([p1, p2])))
        batch_mean = np.mean([run(cls(), (t1, p1)), run(cls(), (t2, p2))])
        np.testing.assert_allclose(streamed, whole, rtol=1e-6)
        tp, fp, fn, tn = 16, 0, 8, 24
        expected = ref_scores(*map(np.array, ([tp], [fp], [fn], [tn])))[KEYS[cls]][0]
        np.testing.assert_allclose(streamed, expected, rtol=1e-6)
        if cls is not metrics.Precision:  # precision is 1 in both batches
            assert abs(streamed - batch_mean) > 0.01, cls


def test_binary_threshold_and_logits():
    t = np.array([1, 1, 0, 0], "float32").reshape(1, 2, 2, 1)
    p = np.array([0.5, 0.3, 0.6, 0.2], "float32").reshape(1, 2, 2, 1)
    # threshold 0.5: predicted {0.5, 0.6} -> TP=1, FP=1, FN=1, TN=1
    assert run(metrics.Dice(), (t, p)) == pytest.approx(0.5)
    assert run(metrics.PixelAccuracy(), (t, p)) == pytest.approx(0.5)
    # threshold 0.25: predicted {0.5, 0.3, 0.6} -> TP=2, FP=1, FN=0
    assert run(metrics.Dice(threshold=0.25), (t, p)) == pytest.approx(0.8)
    assert run(metrics.Recall(threshold=0.25), (t, p)) == pytest.approx(1.0)
    assert run(metrics.Precision(threshold=0.25), (t, p)) == pytest.approx(2 / 3)
    logits = np.log(p / (1 - p))
    assert run(metrics.Dice(threshold=0.25, from_logits=True), (t, logits)) == pytest.approx(0.8)
    # A (batch, H, W) binary mask works too.
    assert run(metrics.Dice(threshold=0.25), (t[..., 0], p)) == pytest.approx(0.8)


def test_multiclass_per_class_and_mean_against_confusion_matrix(multiclass):
    ids, probs, pred = multiclass
    counts = ref_counts(ids, pred, 3)
    expected = ref_scores(*counts)
    onehot = np.eye(3, dtype="float32")[ids]
    for cls in CLASSES:
        for y_true in (ids, ids[..., None], onehot):
            metric = cls(num_classes=3)
            metric.update_state(y_true, probs)
            np.testing.assert_allclose(value(metric.per_class_result()), expected[KEYS[cls]],
                                       rtol=1e-6)
            mean = (counts[0].sum() / ids.size if cls is metrics.PixelAccuracy
                    else expected[KEYS[cls]].mean())
            np.testing.assert_allclose(value(metric.result()), mean, rtol=1e-6)


def test_class_id_returns_that_class(multiclass):
    ids, probs, pred = multiclass
    expected = ref_scores(*ref_counts(ids, pred, 3))
    for cls in CLASSES:
        for class_id in range(3):
            got = run(cls(num_classes=3, class_id=class_id), (ids, probs))
            assert got.shape == ()
            np.testing.assert_allclose(got, expected[KEYS[cls]][class_id], rtol=1e-6)


def test_zero_division():
    ids = np.array([[[0, 0], [1, 1]]])
    pred = np.eye(3, dtype="float32")[np.array([[[0, 1], [1, 1]]])]
    # class 2 absent from mask and prediction: every ratio is 0/0.
    for cls in CLASSES:
        if cls is metrics.PixelAccuracy:
            continue  # class 2 has TN > 0, so its accuracy is defined
        assert run(cls(num_classes=3, class_id=2), (ids, pred)) == pytest.approx(1.0)
        assert run(cls(num_classes=3, class_id=2, zero_division=0.0), (ids, pred)) == 0.0
    # Empty mask and empty prediction, binary.
    zeros = np.zeros((1, 4, 4, 1), "float32")
    assert run(metrics.Dice(), (zeros, zeros)) == pytest.approx(1.0)
    assert run(metrics.Dice(zero_division=0.0), (zeros, zeros)) == 0.0
    # A missed class has precision 0/0 but F1 0, not zero_division.
    t = np.ones((1, 2, 2, 1), "float32")
    assert run(metrics.Precision(), (t, 0 * t)) == pytest.approx(1.0)
    assert run(metrics.F1Score(), (t, 0 * t)) == 0.0
    assert run(metrics.Dice(), (t, 0 * t)) == 0.0
    # Precision = recall = 0 (TP = 0, FP > 0, FN > 0): F1 is 0, not zero_division.
    t, p = np.array([1, 0], "float32").reshape(1, 1, 2, 1), np.array([0, 1], "float32")
    assert run(metrics.F1Score(), (t, p.reshape(1, 1, 2, 1))) == 0.0


@pytest.mark.parametrize("shape", ["sample", "pixel", "pixel1"])
def test_sample_weight(shape, multiclass):
    ids, probs, pred = multiclass
    rng = np.random.default_rng(5)
    if shape == "sample":
        weights = np.array([0.0, 1.0, 2.5], "float32")
        ref_w = weights[:, None, None]
    else:
        ref_w = rng.random(ids.shape).astype("float32")
        weights = ref_w if shape == "pixel" else ref_w[..., None]
    expected = ref_scores(*ref_counts(ids, pred, 3, ref_w))
    for cls in (metrics.Dice, metrics.IoU, metrics.PixelAccuracy):
        metric = cls(num_classes=3)
        metric.update_state(ids, probs, sample_weight=weights)
        np.testing.assert_allclose(value(metric.per_class_result()), expected[KEYS[cls]],
                                   rtol=1e-5)
    # Weight 0 removes a sample entirely.
    if shape == "sample":
        np.testing.assert_allclose(
            run(metrics.IoU(num_classes=3), (ids, probs, weights)),
            run(metrics.IoU(num_classes=3), (ids[1:], probs[1:], weights[1:])),
            rtol=1e-6,
        )


def test_void_pixels_are_ignored():
    ids = np.array([[[0, 1], [255, 255]]])
    pred = np.eye(2, dtype="float32")[np.array([[[0, 1], [0, 1]]])]
    assert run(metrics.PixelAccuracy(num_classes=2), (ids, pred)) == pytest.approx(1.0)
    assert run(metrics.IoU(num_classes=2), (ids, pred)) == pytest.approx(1.0)


def test_reset_state(multiclass):
    ids, probs, _ = multiclass
    metric = metrics.IoU(num_classes=3)
    metric.update_state(ids[:1], probs[:1])
    first = value(metric.result())
    metric.update_state(ids[1:], probs[1:])
    assert value(metric.result()) != pytest.approx(first)
    metric.reset_state()
    assert all(np.all(value(v) == 0) for v in metric.variables)
    metric.update_state(ids[:1], probs[:1])
    assert value(metric.result()) == pytest.approx(first)


# ---------------------------------------------------------------- pure functions
def test_confusion_counts_per_sample_and_ratios(multiclass):
    ids, probs, pred = multiclass
    per_sample = [value(c) for c in metrics.confusion_counts(ids, probs, 3, per_sample=True)]
    totals = [value(c) for c in metrics.confusion_counts(ids, probs, 3)]
    for i in range(len(ids)):
        for got, want in zip(per_sample, ref_counts(ids[i], pred[i], 3)):
            np.testing.assert_allclose(got[i], want)
    for got_sample, got_total in zip(per_sample, totals):
        assert got_sample.shape == (3, 3) and got_total.shape == (3,)
        np.testing.assert_allclose(got_sample.sum(0), got_total)
    ratios = metrics.ratios_from_counts(*per_sample)
    expected = ref_scores(*per_sample)
    assert sorted(ratios) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(value(ratios[key]), expected[key], rtol=1e-6)
    np.testing.assert_allclose(value(metrics.pixel_accuracy(*per_sample)),
                               (pred == ids).mean((1, 2)), rtol=1e-6)


# ---------------------------------------------------------------- config, get, errors
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_round_trip(cls, multiclass):
    ids, probs, _ = multiclass
    logits = np.log(probs)
    kwargs = dict(num_classes=3, class_id=1, from_logits=True, zero_division=0.0, name="m")
    metric = cls(**kwargs)
    config = metric.get_config()
    assert {k: config[k] for k in kwargs} == kwargs
    clone = cls.from_config(config)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is cls and restored.get_config() == config == clone.get_config()
    expected = run(metric, (ids, logits))
    assert run(clone, (ids, logits)) == pytest.approx(expected)
    assert run(restored, (ids, logits)) == pytest.approx(expected)
    binary = cls(threshold=0.3).get_config()
    assert cls.from_config(binary).threshold == 0.3


def test_default_names_and_get():
    assert [cls().name for cls in CLASSES] == ["dice", "iou", "precision", "recall", "f1", "pixel_accuracy"]
    for name, cls in zip(["dice", "iou", "precision", "recall", "f1", "pixel_accuracy"],
                         CLASSES):
        metric = metrics.get(name, num_classes=4)
        assert type(metric) is cls and metric.num_classes == 4
    metric = metrics.Dice()
    assert metrics.get(metric) is metric
    assert metrics.get(metrics.IoU, num_classes=2).num_classes == 2
    with pytest.raises(ValueError, match="dice.*f1.*iou.*pixel_accuracy"):
        metrics.get("jaccard")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=0), "num_classes=0"),
        (dict(num_classes=2.0), "num_classes=2.0"),
        (dict(threshold=0.0), "threshold=0.0"),
        (dict(threshold=1.5), "threshold=1.5"),
        (dict(num_classes=3, class_id=3), r"class_id=3.*\[0, 2\]"),
        (dict(class_id=1), "class_id=1"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.IoU(**kwargs)


def test_channel_mismatch_errors():
    with pytest.raises(ValueError, match="3 channels.*num_classes=4"):
        metrics.Dice(num_classes=4).update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="3 channels.*num_classes=1.*num_classes=3"):
        metrics.Dice().update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="1 channels.*num_classes=3"):
        metrics.Dice(num_classes=3).update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 1)))


# ---------------------------------------------------------------- in a Keras model
@pytest.mark.parametrize(
    "loss, num_classes",
    [(losses.DiceLoss(), 1), (losses.BCEDiceLoss(), 1), (losses.CEDiceLoss(), 3)],
    ids=["dice", "bce_dice", "ce_dice_3_classes"],
)
def test_compiled_model_saves_and_loads(loss, num_classes, tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8, 1)).astype("float32")
    ids = np.minimum((x[..., 0] * num_classes).astype(int), num_classes - 1)
    y = ids[..., None].astype("float32") if num_classes == 1 else ids  # sparse for 3 classes
    activation = "sigmoid" if num_classes == 1 else "softmax"
    model = keras.Sequential([keras.Input((8, 8, 1)),
                              keras.layers.Conv2D(num_classes, 1, activation=activation)])
    model.compile(optimizer="adam", loss=loss,
                  metrics=[cls(num_classes=num_classes) for cls in CLASSES])
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    before = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = loaded.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    assert sorted(after) == sorted(before)
    np.testing.assert_allclose([after[k] for k in before], list(before.values()), rtol=1e-5)
    # evaluate streams over three batches; the values are the whole-dataset ones.
    probs = value(model.predict(x, verbose=0))
    pred = (probs[..., 0] >= 0.5).astype(int) if num_classes == 1 else probs.argmax(-1)
    counts = ref_counts(ids, pred, max(num_classes, 2))
    if num_classes == 1:
        counts = [c[1:] for c in counts]  # the foreground class
    scores = ref_scores(*counts)
    for cls in CLASSES:
        key = cls().name
        want = (counts[0].sum() / ids.size if cls is metrics.PixelAccuracy and num_classes > 1
                else scores[KEYS[cls]].mean())
        assert before[key] == pytest.approx(float(want), rel=1e-5), key


# ---------------------------------------------------------------- cross-checks with Keras and NumPy
def batches_with_every_class(seed=7, k=3, batches=3):
    """Streamed batches of (ids (2, 6, 6), probabilities (2, 6, 6, k)) where every class occurs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        ids = rng.integers(0, k, (2, 6, 6))
        probs = rng.dirichlet(np.ones(k), (2, 6, 6)).astype("float32")
        out.append((ids, probs))
    return out


def numpy_dice(truth, pred, k):
    """Per-class Dice 2|A and B| / (|A| + |B|) from boolean masks of the pooled pixels (written independently)."""
    scores = []
    for c in range(k):
        a, b = truth == c, pred == c
        scores.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return np.array(scores)


def test_iou_matches_keras_mean_iou_and_iou_where_conventions_agree():
    batches = batches_with_every_class()
    ours = metrics.IoU(num_classes=3)
    mean_iou = keras.metrics.MeanIoU(num_classes=3, sparse_y_pred=False)
    per_class = [keras.metrics.IoU(num_classes=3, target_class_ids=[c], sparse_y_pred=False) for c in range(3)]
    for ids, probs in batches:  # streaming: both accumulate one confusion matrix over the batches
        for metric in [ours, mean_iou, *per_class]:
            metric.update_state(ids, probs)
    np.testing.assert_allclose(value(ours.result()), value(mean_iou.result()), rtol=1e-5)
    np.testing.assert_allclose(value(ours.per_class_result()), [value(m.result()) for m in per_class], rtol=1e-5)


def test_iou_matches_keras_with_pixel_weights_and_void_labels():
    (ids, probs), = batches_with_every_class(seed=8, batches=1)
    weights = np.random.default_rng(9).random(ids.shape).astype("float32")
    ids = ids.copy()
    ids[0, :2] = 255  # "void" pixels: ignored by both (keras: ignore_class=255)
    ours = metrics.IoU(num_classes=3)
    ours.update_state(ids, probs, sample_weight=weights)
    reference = keras.metrics.MeanIoU(num_classes=3, sparse_y_pred=False, ignore_class=255, dtype="float32")
    reference.update_state(ids, probs, sample_weight=weights)
    np.testing.assert_allclose(value(ours.result()), value(reference.result()), rtol=1e-5)


def test_binary_iou_matches_keras_binary_iou_including_the_threshold_itself():
    rng = np.random.default_rng(10)
    truth = (rng.random((4, 8, 8, 1)) > 0.6).astype("float32")
    probs = rng.random((4, 8, 8, 1)).astype("float32")
    probs[0, 0, :4, 0] = 0.5  # exactly at the threshold: foreground for both (p >= threshold)
    reference = keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5)
    reference.update_state(truth, probs)
    np.testing.assert_allclose(run(metrics.IoU(), (truth, probs)), value(reference.result()), rtol=1e-5)
    both = keras.metrics.BinaryIoU(target_class_ids=[0, 1], threshold=0.5)
    both.update_state(truth, probs)
    ours_both = metrics.IoU(num_classes=2)  # the same as a 2-class softmax model's IoU
    two_class = np.concatenate([probs < 0.5, probs >= 0.5], -1).astype("float32")
    np.testing.assert_allclose(run(ours_both, (truth[..., 0], two_class)), value(both.result()), rtol=1e-5)


def test_dice_against_numpy_and_keras_f1_on_pooled_pixels():
    batches = batches_with_every_class(seed=11)
    truth = np.concatenate([ids for ids, _ in batches])
    pred = np.concatenate([probs.argmax(-1) for _, probs in batches])
    expected = numpy_dice(truth, pred, 3)
    dice, f1 = metrics.Dice(num_classes=3), metrics.F1Score(num_classes=3)
    keras_f1 = keras.metrics.F1Score(average=None)  # per class; threshold None = the argmax class
    for ids, probs in batches:
        dice.update_state(ids, probs)
        f1.update_state(ids, probs)
        keras_f1.update_state(np.eye(3, dtype="float32")[ids].reshape(-1, 3), probs.reshape(-1, 3))
    np.testing.assert_allclose(value(dice.per_class_result()), expected, rtol=1e-6)
    np.testing.assert_allclose(value(dice.result()), expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(value(f1.per_class_result()), expected, rtol=1e-6)
    np.testing.assert_allclose(value(keras_f1.result()), expected, rtol=1e-5)


def test_binary_dice_against_numpy():
    rng = np.random.default_rng(12)
    truth = rng.random((3, 10, 10, 1)) > 0.7
    probs = rng.random((3, 10, 10, 1)).astype("float32")
    a, b = truth, probs >= 0.5
    expected = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    metric = metrics.Dice()
    for i in range(3):
        metric.update_state(truth[i : i + 1].astype("float32"), probs[i : i + 1])
    np.testing.assert_allclose(value(metric.result()), expected, rtol=1e-6)


def test_documented_differences_from_keras_and_per_image_means():
    # 1. A class absent from mask and prediction: Keras leaves it out of the mean, these metrics count it
    #    as zero_division (1.0 by default), and zero_division=0.0 counts it as 0.
    ids = np.array([[[0, 0, 1, 1]]])
    probs = np.eye(3, dtype="float32")[np.array([[[0, 1, 1, 1]]])]
    iou0, iou1 = 1 / 2, 2 / 3
    mean_iou = keras.metrics.MeanIoU(num_classes=3, sparse_y_pred=False)
    mean_iou.update_state(ids, probs)
    np.testing.assert_allclose(value(mean_iou.result()), (iou0 + iou1) / 2, rtol=1e-5)
    assert run(metrics.IoU(num_classes=3), (ids, probs)) == pytest.approx((iou0 + iou1 + 1.0) / 3)
    assert run(metrics.IoU(num_classes=3, zero_division=0.0), (ids, probs)) == pytest.approx((iou0 + iou1) / 3)
    # 2. Pooled over all pixels, not the mean of per-image scores (per-image: confusion_counts(per_sample=True)).
    truth = np.zeros((2, 4, 4, 1), "float32")
    truth[0] = 1.0  # image 0: 16 foreground pixels, all found; image 1: 1 pixel, missed
    truth[1, 0, 0] = 1.0
    pred = truth.copy()
    pred[1, 0, 0] = 0.0
    pooled = run(metrics.Dice(), (truth, pred))
    per_image = metrics.ratios_from_counts(*metrics.confusion_counts(truth, pred, per_sample=True))["dice"]
    assert pooled == pytest.approx(32 / 33)
    np.testing.assert_allclose(value(per_image)[:, 0], [1.0, 0.0])
    # 3. No smoothing: the Dice loss adds smooth=1 to both terms, the metric does not.
    small_truth, small_pred = np.zeros((1, 4, 4, 1), "float32"), np.zeros((1, 4, 4, 1), "float32")
    small_truth[0, 0, 0] = 1.0
    small_pred[0, 0, :2] = 1.0
    assert run(metrics.Dice(), (small_truth, small_pred)) == pytest.approx(2 / 3)
    loss = value(losses.dice_loss(small_truth, small_pred))[0]
    assert 1.0 - loss == pytest.approx(3 / 4)  # (2 * 1 + 1) / (1 + 2 + 1)
