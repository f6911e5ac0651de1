"""Runs on folder data: recorded splits reused by evaluate, grouped splits, K-fold ensembles."""

import json

import keras
import numpy as np
import pytest
from PIL import Image

import unetpp_tf
from unetpp_tf.cli import main
from unetpp_tf.training import train

TINY = dict(image_size=(32, 32), depth=2, filters=4, batch_size=4, epochs=1, min_steps=0,
            export_saved_model=False, export_tflite=False)


def _write_folder(root, names, seed=0):
    """Nuclei-like image/mask PNG pairs named `names` under root/images and root/masks."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        image, mask = unetpp_tf.data.synthetic_sample(k, seed=seed, image_size=(32, 32))
        Image.fromarray((image.numpy()[..., 0] * 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray((mask.numpy()[..., 0] * 255).astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def _names(slides, tiles):
    return [f"slide{s}_tile{t}" for s in range(slides) for t in range(tiles)]


def test_evaluate_uses_the_recorded_split_after_files_are_added(tmp_path, capsys):
    data_dir = _write_folder(tmp_path / "data", _names(5, 4))
    run, _ = train(dict(TINY, data=str(data_dir), output_dir=str(tmp_path), name="r"), verbose=0)
    recorded = json.loads((run / "splits.json").read_text())
    assert sorted(len(recorded[k]) for k in ("train", "val", "test")) == [3, 3, 14]
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # New files shift a fresh random split; the run's own test split must not move.
    _write_folder(data_dir, [f"new{k}" for k in range(6)], seed=9)
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    after = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert after == before and after["images"] == len(recorded["test"])
    for name in ("train", "val", "test"):
        assert not any("new" in image for image, _ in recorded[name])
    # A recorded file that disappeared is one clear line naming it.
    missing = recorded["test"][0][0]
    (tmp_path / "gone.png").write_bytes(open(missing, "rb").read())
    __import__("os").remove(missing)
    assert main(["evaluate", "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "recorded split" in err


def test_grouped_split_keeps_slides_together(tmp_path):
    data_dir = _write_folder(tmp_path / "data", _names(6, 4))
    run, _ = train(dict(TINY, data=str(data_dir), output_dir=str(tmp_path), name="g", group_by=r"^(slide\d+)_"),
                   verbose=0)
    recorded = json.loads((run / "splits.json").read_text())
    slides = {
        name: {image.split("/")[-1].split("_")[0] for image, _ in recorded[name]} for name in ("train", "val", "test")
    }
    assert not (slides["train"] & slides["val"] or slides["train"] & slides["test"] or slides["val"] & slides["test"])
    assert recorded["groups"]["test"] and set(recorded["groups"]["test"]) == slides["test"]


def test_group_by_matching_nothing_is_one_clear_line(tmp_path, capsys):
    data_dir = _write_folder(tmp_path / "data", _names(2, 3))
    code = main(["train", "--data", str(data_dir), "--output-dir", str(tmp_path), "--group-by", "^patient(\\d+)",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--group-by '^patient(\\d+)' matches none" in err


def test_folds_train_disjoint_models_and_serve_their_ensemble(tmp_path, capsys):
    data_dir = _write_folder(tmp_path / "data", _names(8, 3))
    config = dict(TINY, data=str(data_dir), output_dir=str(tmp_path), name="cv", folds=3, group_by=r"^(slide\d+)_",
                  deep_supervision=True)
    run, histories = train(config, verbose=0)
    assert sorted(histories) == ["fold_1", "fold_2", "fold_3"]
    top = json.loads((run / "splits.json").read_text())
    pool = {tuple(pair) for name in ("train", "val") for pair in top[name]}
    vals, slides_seen = [], []
    for k in (1, 2, 3):
        fold = json.loads((run / f"fold_{k}" / "splits.json").read_text())
        val = {tuple(pair) for pair in fold["val"]}
        assert val and not val & {tuple(pair) for pair in fold["train"]}
        assert fold["test"] == top["test"]
        vals.append(val)
        slides_seen.append({image.split("/")[-1].split("_")[0] for image, _ in val})
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)  # disjoint and covering
    assert not (slides_seen[0] & slides_seen[1] or slides_seen[0] & slides_seen[2] or slides_seen[1] & slides_seen[2])
    summary = json.loads((run / "folds.json").read_text())
    scores = [row["best_val_dice"] for row in summary["folds"]]
    assert summary["val_dice_mean"] == pytest.approx(np.mean(scores)) and summary["val_dice_std"] == pytest.approx(
        np.std(scores))
    # RUN/model.keras is the ensemble: the mean of the folds' mean-of-heads outputs.
    ensemble = keras.models.load_model(run / "model.keras")
    folds = [keras.models.load_model(run / f"fold_{k}" / "model.keras") for k in (1, 2, 3)]
    images = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    expected = np.mean([unetpp_tf.inference_model(m).predict(images, verbose=0) for m in folds], axis=0)
    np.testing.assert_allclose(ensemble.predict(images, verbose=0), expected, atol=1e-5)
    recorded = json.loads((run / "metrics.json").read_text())
    assert recorded["cross_validation"]["val_dice_mean"] == pytest.approx(summary["val_dice_mean"])
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["dice"] == pytest.approx(recorded["test"]["dice"], abs=1e-5)
    assert metrics["images"] == len(top["test"])


def test_more_folds_than_groups_is_one_clear_line(tmp_path, capsys):
    data_dir = _write_folder(tmp_path / "data", _names(4, 3))
    code = main(["train", "--data", str(data_dir), "--output-dir", str(tmp_path), "--group-by", "^(slide\\d+)_",
                 "--split", "0.75", "0", "0.25", "--folds", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--folds 5 needs at least 5 groups" in err
