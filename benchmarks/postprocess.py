"""Post-processing chosen on validation: does it help on test, and how long does it take?

Part 1 (accuracy): a small UNet++ trains briefly on the built-in synthetic nuclei set (binary,
and the 3-class task: ellipses and rectangles), so its masks have specks and gaps.
`unetpp_tf.postprocess.select_postprocessing` chooses the steps on the validation split;
the script prints the Dice of the validation and the test split before and after applying
the chosen steps (pooled as `evaluate` pools it; the test "before" equals `evaluate`'s Dice),
and which steps were tried and kept. Then the same predictions with false specks added (1-4 px,
about 5 per 64 x 64 image, on val and test alike): steps chosen on the speckled val predictions,
Dice on val and test before and after.

Part 2 (speed): the seconds each operation (and all three in a row) takes on a 512 x 512 map
and on a 300 x 512 x 512 volume, binary and 3-class, built from smoothed noise (blobs with
holes) plus scattered specks; the median of repeated runs for the maps, single runs for the
volumes.

Usage:
    python benchmarks/postprocess.py                 # both parts (~5 min on 2 cores)
    python benchmarks/postprocess.py --quick         # fewer samples and epochs, a 64 x 256 x 256 volume
    python benchmarks/postprocess.py --part speed --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from scipy import ndimage

OPS = {
    "remove_small": {"op": "remove_small", "min_size": 50},
    "keep_largest": {"op": "keep_largest"},
    "fill_holes": {"op": "fill_holes"},
}


def labels_of(model, dataset, threshold=0.5):
    """(predicted class ids, true class ids) of every image of a split, as `evaluate` predicts them."""
    predictions, truths = [], []
    for images, masks in dataset:
        probs = np.asarray(model.predict_on_batch(np.asarray(images)))
        predictions.append((probs[..., 0] >= threshold) if probs.shape[-1] == 1 else probs.argmax(-1))
        truths.append(np.asarray(masks)[..., 0])
    return np.concatenate(predictions).astype(np.uint8), np.concatenate(truths)


def accuracy(task: str, samples: int, epochs: int, image_size: int, seed: int) -> dict:
    import keras

    import unetpp_tf
    from unetpp_tf import postprocess

    keras.utils.set_random_seed(seed)
    data = unetpp_tf.data.synthetic(num_samples=samples, image_size=(image_size, image_size), task=task,
                                    batch_size=8, seed=seed)
    num_classes = 1 if task == "binary" else 3
    model = unetpp_tf.build_unetpp((image_size, image_size, 1), num_classes=num_classes, depth=3, filters=8)
    loss = "binary_crossentropy" if num_classes == 1 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    start = time.perf_counter()
    model.fit(data.train, epochs=epochs, verbose=0)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = postprocess.select_postprocessing(model, data.val)
    select_s = time.perf_counter() - start
    result = {"task": task, "samples": samples, "epochs": epochs, "image_size": image_size,
              "train_s": round(train_s, 1), "select_s": round(select_s, 2),
              "steps": spec["steps"], "trials": len(spec["record"]["trials"])}
    for split in ("val", "test"):
        predictions, truths = labels_of(model, getattr(data, split))
        after = postprocess.apply_postprocessing(predictions, spec, batched=True)
        result[split] = {"images": len(predictions),
                         "dice_before": round(postprocess.dice_score(predictions, truths, num_classes), 4),
                         "dice_after": round(postprocess.dice_score(after, truths, num_classes), 4),
                         "changed_pixels": int(np.count_nonzero(after != predictions))}
    result["evaluate_test_dice"] = round(unetpp_tf.evaluate(model, data.test)["metrics"]["dice"], 4)
    result["tried"] = [trial_summary(t) for t in spec["record"]["trials"]]
    # the same predictions with false specks added (1-4 px, ~5 per image), val and test alike
    rng = np.random.default_rng(seed + 1)
    (val_pred, val_truth), (test_pred, test_truth) = labels_of(model, data.val), labels_of(model, data.test)
    val_pred, test_pred = speckle(val_pred, num_classes, rng), speckle(test_pred, num_classes, rng)
    chosen = postprocess.choose_postprocessing(val_pred, val_truth, num_classes)
    speckled = {"steps": chosen["steps"], "tried": [trial_summary(t) for t in chosen["record"]["trials"]]}
    for split, pred, truth in (("val", val_pred, val_truth), ("test", test_pred, test_truth)):
        after = postprocess.apply_postprocessing(pred, chosen, batched=True)
        speckled[split] = {"dice_before": round(postprocess.dice_score(pred, truth, num_classes), 4),
                           "dice_after": round(postprocess.dice_score(after, truth, num_classes), 4)}
    result["speckled"] = speckled
    return result


def trial_summary(trial: dict) -> str:
    step = trial["step"]
    detail = ",".join(f"{k}={v}" for k, v in step.items() if k != "op")
    return f"{step['op']}({detail}) {trial['dice']:.4f}{' kept' if trial['kept'] else ''}"


def speckle(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels with false specks: ~5 seeds per 64x64 image, each grown to 1-4 px, of a random foreground class."""
    seeds = rng.random(labels.shape) < 5 / (64 * 64)
    grown = seeds | (np.roll(seeds, 1, axis=2) & (rng.random(labels.shape) < 0.6))
    grown |= np.roll(grown, 1, axis=1) & (rng.random(labels.shape) < 0.4)
    classes = rng.integers(1, max(num_classes, 2), labels.shape).astype(labels.dtype)
    return np.where(grown & (labels == 0), classes, labels)


def label_map(shape, classes: int, seed: int) -> np.ndarray:
    """Blobs with holes from smoothed noise, plus 0.05% scattered specks; classes 1..classes-1."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 6 if len(shape) == 2 else 4)
    field /= field.std()
    labels = (field > 0.8).astype(np.uint8)
    labels[np.abs(field - 1.6) < 0.05] = 0  # thin gaps: holes and broken rims
    if classes > 2:
        labels[(labels == 1) & (field > 1.3)] = 2
    labels[rng.random(shape, dtype=np.float32) < 5e-4] = 1
    return labels


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(volume_shape, repeats: int) -> list[dict]:
    from unetpp_tf import postprocess

    rows = []
    for name, shape, runs in (("map", (512, 512), repeats), ("volume", volume_shape, 1)):
        for classes in (2, 3):
            labels = label_map(shape, classes, seed=1)
            row = {"shape": "x".join(map(str, shape)), "foreground_classes": classes - 1,
                   "foreground_fraction": round(float(np.count_nonzero(labels)) / labels.size, 3)}
            for op, step in OPS.items():
                row[f"{op}_s"] = round(timed(lambda: postprocess.apply_postprocessing(labels, [step]), runs), 4)
            row["all_three_s"] = round(timed(lambda: postprocess.apply_postprocessing(labels, list(OPS.values())),
                                             runs), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "accuracy", "speed"), default="all")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small data, a small volume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    samples, epochs, image_size = (96, 3, 64) if args.quick else (384, 6, 64)
    volume = (64, 256, 256) if args.quick else (300, 512, 512)
    figures = {}
    if args.part in ("all", "accuracy"):
        figures["accuracy"] = []
        for task in ("binary", "multiclass"):
            row = accuracy(task, samples, epochs, image_size, args.seed)
            figures["accuracy"].append(row)
            print(json.dumps(row), flush=True)
    if args.part in ("all", "speed"):
        figures["speed"] = speed(volume, repeats=5)
    if args.json:
        from unetpp_tf.files import write_json

        write_json(args.json, figures)


if __name__ == "__main__":
    main()
