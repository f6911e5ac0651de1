"""Post-processing: each operation's exact output on hand-built maps, specs, the greedy choice on
validation Dice (cross-checked against the library's metrics and `evaluate`), and the run file."""

import json

import keras
import numpy as np
import pytest
from scipy import ndimage

import unetpp_tf
from unetpp_tf import postprocess as pp
from unetpp_tf.metrics import confusion_counts, ratios_from_counts

independent = pytest.mark.backend_independent


def grid(text):
    """A 2D label map from rows of digits ('.' is 0)."""
    return np.array([[0 if ch == "." else int(ch) for ch in row] for row in text.split()], np.uint8)


def metrics_dice(predictions, truths, num_classes):
    """Dice as `evaluate` computes it: `confusion_counts` of one-hot predictions, summed, mean over classes."""
    predictions, truths = np.asarray(predictions), np.asarray(truths)
    if num_classes == 1:
        probs = predictions[..., None].astype("float32")
    else:
        probs = np.eye(num_classes, dtype="float32")[predictions]
    counts = confusion_counts(truths[..., None], probs, num_classes)
    return float(np.mean(keras.ops.convert_to_numpy(ratios_from_counts(*counts)["dice"])))


# ----------------------------------------------------------------------------- operations


@independent
def test_remove_small_2d_binary_uses_8_connectivity():
    labels = grid("""
        1.....
        ...1..
        ....1.
        ......
        .111..
        """)
    # the speck (1 px) goes at min_size 2; the diagonal pair is one component of 2 (8-connected)
    assert np.array_equal(pp.remove_small_components(labels, 2), grid("""
        ......
        ...1..
        ....1.
        ......
        .111..
        """))
    assert np.array_equal(pp.remove_small_components(labels, 3), grid("""
        ......
        ......
        ......
        ......
        .111..
        """))
    assert np.array_equal(pp.remove_small_components(labels, 1), labels)
    assert pp.remove_small_components(labels, 4).sum() == 0


@independent
def test_remove_small_multiclass_per_class_and_classes_argument():
    labels = grid("""
        1.2.22
        ......
        11.2..
        """)
    assert np.array_equal(pp.remove_small_components(labels, 2), grid("""
        ....22
        ......
        11....
        """))
    assert np.array_equal(pp.remove_small_components(labels, 2, classes=[2]), grid("""
        1...22
        ......
        11....
        """))
    # a class not in the map is no error
    assert np.array_equal(pp.remove_small_components(labels, 2, classes=[7]), labels)


@independent
def test_remove_small_3d_uses_26_connectivity():
    labels = np.zeros((4, 4, 4), np.int32)
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # corner to corner: one component of 2
    labels[3, 3, 3] = 1  # alone
    out = pp.remove_small_components(labels, 2)
    expected = labels.copy()
    expected[3, 3, 3] = 0
    assert np.array_equal(out, expected) and out.dtype == np.int32


@independent
def test_keep_largest_2d_multiclass_and_ties():
    labels = grid("""
        11..2
        11...
        ....1
        22.22
        """)
    assert np.array_equal(pp.keep_largest_component(labels), grid("""
        11...
        11...
        .....
        22...
        """))
    # classes=[1] leaves class 2 alone; of two equal class-2 components the first in raster order stays
    assert np.array_equal(pp.keep_largest_component(labels, classes=[1]), grid("""
        11..2
        11...
        .....
        22.22
        """))
    assert np.array_equal(pp.keep_largest_component(labels, classes=2), grid("""
        11...
        11...
        ....1
        22...
        """))


@independent
def test_keep_largest_3d():
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[4, 4, 4] = 1
    labels[3, 0, 4] = 1
    out = pp.keep_largest_component(labels)
    assert out.sum() == 8 and out[0:2, 0:2, 0:2].all()


@independent
def test_fill_holes_2d_binary():
    labels = grid("""
        .......
        .111...
        .1.1.11
        .111.1.
        .....11
        """)
    # the enclosed pixel fills; the right shape's gap touches the border and stays open
    expected = labels.copy()
    expected[2, 2] = 1
    assert np.array_equal(pp.fill_holes(labels), expected)
    # background meeting the outside only at a corner is enclosed (4-connected background)
    corner = grid("""
        ....
        .11.
        .1.1
        .11.
        """)
    filled = pp.fill_holes(corner)
    assert filled[2, 2] == 1 and filled.sum() == corner.sum() + 1


@independent
def test_fill_holes_multiclass_only_background_enclosed_by_the_class():
    labels = grid("""
        11111..222
        1...1..2.2
        1.2.1..222
        1...1.....
        11111.....
        """)
    out = pp.fill_holes(labels)
    # class 1's hole also touches class 2 (the island): not a hole of either; class 2's hole fills
    expected = labels.copy()
    expected[1, 8] = 2
    assert np.array_equal(out, expected)
    emptied = labels.copy()
    emptied[2, 2] = 0  # no island: class 1's hole fills, with class 1
    assert np.array_equal(pp.fill_holes(emptied, classes=[1])[1:4, 1:4], np.ones((3, 3)))
    assert pp.fill_holes(emptied, classes=[1])[1, 8] == 0  # class 2 not asked for


@independent
def test_fill_holes_3d_and_agrees_with_scipy_on_random_binary_maps():
    cube = np.ones((5, 5, 5), np.uint8)
    cube[1:4, 1:4, 1:4] = 0
    cube[2, 2, 2] = 1
    assert pp.fill_holes(cube).all()
    rng = np.random.default_rng(0)
    for shape in [(15, 17)] * 20 + [(6, 7, 8)] * 20:
        mask = rng.random(shape) < 0.55
        out = pp.fill_holes(mask)
        assert out.dtype == bool and np.array_equal(out, ndimage.binary_fill_holes(mask))


@independent
def test_operations_leave_the_input_alone_and_keep_dtype():
    labels = grid("""
        1.1
        ...
        1.1
        """).astype(np.int16)
    before = labels.copy()
    for out in (pp.remove_small_components(labels, 2), pp.keep_largest_component(labels), pp.fill_holes(labels)):
        assert out.dtype == np.int16 and out.shape == labels.shape
    assert np.array_equal(labels, before)
    empty = np.zeros((4, 4), np.uint8)
    for out in (pp.remove_small_components(empty, 5), pp.keep_largest_component(empty), pp.fill_holes(empty)):
        assert np.array_equal(out, empty)


@independent
@pytest.mark.parametrize("call, message", [
    (lambda: pp.fill_holes(np.zeros((4, 4), np.float32)), "integer class ids"),
    (lambda: pp.keep_largest_component(np.zeros((2, 4, 4, 4), np.uint8)), "batched=True"),
    (lambda: pp.remove_small_components(np.zeros((4, 4), np.uint8), 0), "min_size must be a positive integer"),
    (lambda: pp.remove_small_components(np.zeros((4, 4), np.uint8), 2.5), "min_size must be a positive integer"),
    (lambda: pp.keep_largest_component(np.zeros((4, 4), np.uint8), classes=[0]), "0 is the background"),
    (lambda: pp.keep_largest_component(np.zeros((4, 4), np.uint8), classes=[]), "non-empty list"),
])
def test_operation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- specs


@independent
@pytest.mark.parametrize("spec, message", [
    ([{"op": "dilate"}], r"step 0 has unknown op 'dilate'; known ops: keep_largest, remove_small, fill_holes"),
    ([{"op": "fill_holes"}, {"op": "remove_small"}], "step 1 .remove_small. needs min_size"),
    ([{"op": "remove_small", "min_size": -3}], r"step 0 \(remove_small\) min_size must be a positive integer"),
    ([{"op": "remove_small", "min_size": True}], "min_size must be a positive integer"),
    ([{"op": "keep_largest", "min_size": 3}], "unknown field.s. min_size"),
    ([{"op": "keep_largest", "classes": [1, 1]}], "lists a class twice"),
    ({"steps": [], "extra": 1}, "needs 'steps'"),
    ({"steps": {"op": "fill_holes"}}, "must be a list of steps"),
    ("auto", "resolved after training"),
    (["fill_holes"], "must be a dict"),
])
def test_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        pp.check_postprocessing(spec)


@independent
def test_apply_postprocessing_in_order_on_a_map_and_a_batch():
    labels = grid("""
        111..1
        1.1...
        111..1
        """)
    spec = {"steps": [{"op": "remove_small", "min_size": 2}, {"op": "fill_holes"}]}
    expected = grid("""
        111...
        111...
        111...
        """)
    assert np.array_equal(pp.apply_postprocessing(labels, spec), expected)
    # keep_largest first would leave one speck, not both
    assert pp.apply_postprocessing(labels, [{"op": "keep_largest"}]).sum() == 8
    batch = np.stack([labels, np.zeros_like(labels), expected])
    out = pp.apply_postprocessing(batch, spec, batched=True)
    assert np.array_equal(out, np.stack([expected, np.zeros_like(labels), expected]))
    for nothing in (None, "none", {"steps": []}):
        assert np.array_equal(pp.apply_postprocessing(labels, nothing), labels)


# ----------------------------------------------------------------------------- choosing


def disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def binary_case(two_objects: bool, specks: bool = True, holes: bool = False):
    """Predictions with a few false specks (and optionally a hole) around true disks."""
    truths, predictions = [], []
    for i in range(4):
        truth = disk((32, 32), (12 + i, 12), 6)
        if two_objects:
            truth |= disk((32, 32), (26, 26), 1)  # a small true object, 5 px
        pred = truth.copy()
        if specks and not two_objects:
            pred[28, 2 + i] = pred[2, 28] = True  # specks
        if holes:
            pred[12 + i, 12] = False
        truths.append(truth.astype(np.uint8))
        predictions.append(pred.astype(np.uint8))
    return np.stack(predictions), np.stack(truths)


def trials_of(choice, op):
    return [t for t in choice["record"]["trials"] if t["step"]["op"] == op]


@independent
def test_choose_keeps_keep_largest_when_specks_are_false():
    predictions, truths = binary_case(two_objects=False)
    choice = pp.choose_postprocessing(predictions, truths, 1)
    record = choice["record"]
    assert choice["steps"][0] == {"op": "keep_largest", "classes": [1]}
    assert trials_of(choice, "keep_largest")[0]["kept"]
    assert record["dice_after"] == 1.0 > record["dice_before"]
    assert record["dice_before"] == pytest.approx(metrics_dice(predictions, truths, 1), abs=1e-6)
    assert record["dice_before"] == pytest.approx(2 * 4 * 113 / (2 * 4 * 113 + 4 * 2))  # disk of radius 6: 113 px
    assert np.array_equal(pp.apply_postprocessing(predictions, choice, batched=True), truths)


@independent
def test_choose_rejects_keep_largest_when_truths_have_two_objects():
    predictions, truths = binary_case(two_objects=True)
    predictions[:, 2, 2] = 1  # one false speck each: removing it helps, keeping only the largest does not
    choice = pp.choose_postprocessing(predictions, truths, 1)
    largest = trials_of(choice, "keep_largest")[0]
    assert not largest["kept"] and largest["dice"] < choice["record"]["dice_before"]
    assert largest["changed_pixels"] == 4 * 6
    # the smallest true object has 5 px: min_size 2 (0.25, 0.5 of 5) removes the specks and is kept
    removes = trials_of(choice, "remove_small")
    assert [t["step"]["min_size"] for t in removes] == [2, 4]
    assert [t["kept"] for t in removes] == [True, False]  # 4 removes nothing more: no gain
    assert choice["steps"] == [{"op": "remove_small", "min_size": 2, "classes": [1]}]
    assert choice["record"]["dice_after"] == 1.0


@independent
def test_choose_fill_holes_kept_and_rejected():
    predictions, truths = binary_case(two_objects=False, specks=False, holes=True)
    choice = pp.choose_postprocessing(predictions, truths, 1, candidates=[{"op": "fill_holes"}])
    assert choice["steps"] == [{"op": "fill_holes"}] and choice["record"]["dice_after"] == 1.0
    # truths with a real hole (a ring): filling it now lowers Dice
    rings = truths.copy()
    rings[:, 12:14, 12] = 0
    predictions = rings.copy()
    choice = pp.choose_postprocessing(predictions, rings, 1, candidates=[{"op": "fill_holes"}])
    trial = choice["record"]["trials"][0]
    assert choice["steps"] == [] and not trial["kept"] and trial["changed_pixels"] == 8
    filled = np.stack([pp.fill_holes(p) for p in predictions])
    assert trial["dice"] == pytest.approx(metrics_dice(filled, rings, 1), abs=1e-6) and trial["dice"] < 1.0
    assert choice["record"]["dice_after"] == choice["record"]["dice_before"] == 1.0


@independent
def test_choose_multiclass_record_matches_metrics_and_steps_merge():
    truths, predictions = [], []
    for i in range(3):
        truth = np.zeros((24, 24), np.uint8)
        truth[disk((24, 24), (7, 7), 4)] = 1
        truth[14:20, 12:22] = 2
        truth[0, 23] = 255  # void: ignored
        pred = truth.copy()
        pred[0, 23] = 0
        pred[22, 1 + i] = 1
        pred[1, 20] = 2
        pred[16, 15] = 0  # a hole in class 2
        truths.append(truth)
        predictions.append(pred)
    predictions, truths = np.stack(predictions), np.stack(truths)
    choice = pp.choose_postprocessing(predictions, truths, 3)
    record = choice["record"]
    assert record["dice_before"] == pytest.approx(metrics_dice(predictions, truths, 3), abs=1e-6)
    assert [t["kept"] for t in trials_of(choice, "keep_largest")] == [True, True]
    assert choice["steps"][0] == {"op": "keep_largest", "classes": [1, 2]}  # two kept trials, one step
    assert choice["steps"][-1] == {"op": "fill_holes", "classes": [2]}
    applied = pp.apply_postprocessing(predictions, choice, batched=True)
    assert record["dice_after"] == pytest.approx(metrics_dice(applied, truths, 3), abs=1e-6)
    assert np.array_equal(applied[truths != 255], truths[truths != 255])
    # every trial's Dice is the Dice of the kept steps before it plus its own step
    kept = []
    for trial in record["trials"]:
        out = pp.apply_postprocessing(predictions, kept + [trial["step"]], batched=True)
        assert trial["dice"] == pytest.approx(metrics_dice(out, truths, 3), abs=1e-6)
        kept += [trial["step"]] if trial["kept"] else []
    assert json.loads(json.dumps(choice)) == choice  # serializable as it is


@independent
def test_volume_pooling_is_the_mean_of_per_volume_foreground_dice():
    truths = np.zeros((2, 4, 6, 6), np.uint8)
    truths[0, 1:3, 1:4, 1:4] = 1  # 18 voxels
    truths[1, 0:2, 0:2, 0:2] = 1  # 8 voxels
    predictions = truths.copy()
    predictions[0, 3, 5, 5] = 1  # a false voxel in volume 0 only
    expected = (2 * 18 / (2 * 18 + 1) + 1.0) / 2
    assert pp.dice_score(predictions, truths, 1, pooling="volumes") == pytest.approx(expected)
    choice = pp.choose_postprocessing(list(predictions), list(truths), 1, pooling="volumes")
    assert choice["record"]["dice_before"] == pytest.approx(expected)
    assert choice["record"]["dice_after"] == 1.0


@independent
def test_empty_predictions_change_nothing_and_score_zero():
    truths = np.zeros((2, 16, 16), np.uint8)
    truths[:, 4:8, 4:8] = 1
    empty = np.zeros_like(truths)
    choice = pp.choose_postprocessing(empty, truths, 1)
    record = choice["record"]
    assert choice["steps"] == [] and record["dice_before"] == record["dice_after"] == 0.0
    assert record["trials"] and all(t["changed_pixels"] == 0 and not t["kept"] for t in record["trials"])
    # empty truths and predictions: Dice 1 (absent class), nothing to try beyond the no-op steps
    nothing = pp.choose_postprocessing(empty, empty, 1)
    assert nothing["record"]["dice_before"] == 1.0 and nothing["steps"] == []
    assert [t["step"]["op"] for t in nothing["record"]["trials"]] == ["keep_largest", "fill_holes"]


@independent
@pytest.mark.parametrize("predictions, truths, num_classes, message", [
    (np.zeros((0, 8, 8), np.uint8), np.zeros((0, 8, 8), np.uint8), 1, "predictions is empty"),
    ([], [], 1, "predictions is empty"),
    (np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 9), np.uint8), 1, r"truths\[0\] has shape \(8, 9\)"),
    (np.zeros((2, 8, 8), np.uint8), np.zeros((3, 8, 8), np.uint8), 1, "predictions has 2 maps but truths has 3"),
    (np.full((1, 8, 8), 3, np.uint8), np.zeros((1, 8, 8), np.uint8), 3, "class id 3 but num_classes=3"),
    (np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8), 0, "num_classes must be"),
    (np.full((1, 8, 8), -1, np.int8), np.zeros((1, 8, 8), np.uint8), 3, "negative class ids"),
])
def test_choose_errors(predictions, truths, num_classes, message):
    with pytest.raises(ValueError, match=message):
        pp.choose_postprocessing(predictions, truths, num_classes)


def test_select_postprocessing_on_a_tiny_model_matches_evaluate():
    keras.utils.set_random_seed(2)
    data = unetpp_tf.data.synthetic(num_samples=16, image_size=(32, 32), batch_size=4)
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    model.fit(data.train, epochs=2, verbose=0)
    choice = pp.select_postprocessing(model, data.val)
    report = unetpp_tf.evaluate(model, data.val)
    record = choice["record"]
    assert record["maps"] == report["metrics"]["images"]
    assert record["dice_before"] == pytest.approx(report["metrics"]["dice"], abs=1e-5)
    assert record["dice_after"] >= record["dice_before"]
    assert pp.check_postprocessing(choice) == choice
    images = np.concatenate([np.asarray(x) for x, _ in data.val])
    masks = np.concatenate([np.asarray(y) for _, y in data.val])[..., 0]
    labels = (np.asarray(model.predict_on_batch(images))[..., 0] >= 0.5).astype(np.uint8)
    applied = pp.apply_postprocessing(labels, choice, batched=True)
    assert record["dice_after"] == pytest.approx(metrics_dice(applied, masks, 1), abs=1e-6)
    with pytest.raises(ValueError, match="pass one split"):
        pp.select_postprocessing(model, data)
    with pytest.raises(ValueError, match="dataset is empty"):
        pp.select_postprocessing(model, data.val.take(0))


@independent
@pytest.mark.parametrize("spatial", [3, 2])  # a 3D model in sliding windows, a 2D one slice by slice
def test_select_postprocessing_volumes_matches_evaluate_volumes(spatial):
    from unetpp_tf.data.volumes import Volume
    from unetpp_tf.evaluation import evaluate_volumes

    inputs = keras.Input((None,) * spatial + (1,))
    identity = keras.Model(inputs, keras.layers.Identity()(inputs))  # probabilities = the image
    shape = (6, 12, 12)
    label = np.zeros(shape, np.uint8)
    label[1:5, 2:8, 2:8] = 1
    probs = label * 0.9
    probs[5, 11, 11] = 0.8  # a false voxel
    scans = [Volume(probs[..., None].astype(np.float32), label, (1.0, 1.0, 1.0), np.eye(4), "a"),
             Volume((label * 0.9)[..., None].astype(np.float32), label, (1.0, 1.0, 1.0), np.eye(4), "b")]
    patch = (4, 8, 8) if spatial == 3 else None
    choice = pp.select_postprocessing_volumes(identity, scans, patch_size=patch)
    record = choice["record"]
    expected = evaluate_volumes(identity, scans, num_classes=1, patch_size=patch)["metrics"]["dice"]
    assert record["pooling"] == "volumes" and record["maps"] == 2
    assert record["dice_before"] == pytest.approx(expected, abs=1e-6)
    assert record["dice_before"] == pytest.approx((2 * 144 / 289 + 1) / 2)
    assert choice["steps"][0] == {"op": "keep_largest", "classes": [1]} and record["dice_after"] == 1.0
    with pytest.raises(ValueError, match="volumes is empty"):
        pp.select_postprocessing_volumes(identity, [], patch_size=patch)


# ----------------------------------------------------------------------------- files


@independent
def test_write_read_round_trip_and_lookup(tmp_path):
    run = tmp_path / "run"
    spec = {"steps": [{"op": "remove_small", "min_size": 37}, {"op": "keep_largest", "classes": [1]},
                      {"op": "fill_holes"}], "record": {"dice_before": 0.5}}
    path = pp.write_postprocessing(run, spec)
    assert path == run / pp.POSTPROCESS_FILE and sorted(p.name for p in run.iterdir()) == [pp.POSTPROCESS_FILE]
    assert pp.read_postprocessing(run) == spec
    (run / "model.keras").write_bytes(b"")
    (run / "export" / "saved_model").mkdir(parents=True)
    (run / "export" / "saved_model" / "saved_model.pb").write_bytes(b"")
    (run / "export" / "model.tflite").write_bytes(b"")
    for model_path in (run / "model.keras", run / "export" / "model.tflite", run / "export" / "saved_model"):
        assert pp.read_postprocessing(model_path) == spec
    assert pp.read_postprocessing(tmp_path) is None
    assert pp.read_postprocessing(run / "export") is None  # a plain folder: only itself is looked in
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pp.read_postprocessing(tmp_path / "missing")
    (run / pp.POSTPROCESS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="postprocess.json is not valid JSON"):
        pp.read_postprocessing(run)
    (run / pp.POSTPROCESS_FILE).write_text(json.dumps({"steps": [{"op": "erode"}]}))
    with pytest.raises(ValueError, match="postprocess.json: post-processing step 0 has unknown op 'erode'"):
        pp.read_postprocessing(run / "model.keras")
    with pytest.raises(ValueError, match="unknown op"):
        pp.write_postprocessing(run, [{"op": "erode"}])
