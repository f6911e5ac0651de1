"""Input-pipeline throughput and the cost of on-device augmentation.

Writes 512 synthetic PNG pairs at 256x256 to a temporary folder, then measures in one run:
0. the seconds `from_directory` takes before it returns: the inspection pass that opens,
   checks and decodes every file once (PIL, and tf.io for the PNGs the pipeline decodes with it);
1. images/s that `from_directory` delivers (decode, resize to 96x96, batch 16), without
   cache, with and without host-side augmentation (stateless, seeded per batch);
2. images/s that training the paper-width UNet++ consumes at 96x96, batch 16;
3. the training step time with and without on-device augmentation (`AugmentedModel`),
   timed in alternating rounds so that load from other processes hits both alike.
It prints the figures and the ratios the targets are stated in.

Usage:
    python benchmarks/data_pipeline.py            # full: 512 pairs, paper widths
    python benchmarks/data_pipeline.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from PIL import Image

import unetpp_tf
from unetpp_tf.data import AugmentedModel, SegmentationAugmenter, from_directory, synthetic_sample
from unetpp_tf.training import use_xla

AUGMENTATION = dict(rotation=0.05, zoom=0.1, translation=0.05, brightness=0.1, contrast=0.1, noise=0.02)


def write_pairs(root: Path, count: int, size: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image, mask = synthetic_sample(i, image_size=(size, size))
        Image.fromarray((image.numpy()[..., 0] * 255).astype(np.uint8)).save(root / "images" / f"{i:04d}.png")
        Image.fromarray((mask.numpy()[..., 0] * 255).astype(np.uint8)).save(root / "masks" / f"{i:04d}.png")


def inspection_seconds(root: Path, repeats: int = 3) -> float:
    """Median seconds `from_directory` takes to find, inspect and validate every pair."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        from_directory(root, image_size=(96, 96), batch_size=16, split=(1.0, 0.0, 0.0), cache=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def pipeline_rate(root: Path, augment, epochs: int = 2) -> float:
    data = from_directory(root, image_size=(96, 96), batch_size=16, split=(1.0, 0.0, 0.0), cache=False, augment=augment)
    for _ in data.train.take(2):  # warm-up: graph tracing, thread pools
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _ in data.train:
            count += int(images.shape[0])
    return count / (time.perf_counter() - start)


def step_times(models, images, masks, steps: int, rounds: int = 5) -> list[float]:
    """Median seconds per train step of each model, timed in alternating rounds (fair under noise)."""
    for model in models:  # trace and warm up
        model.train_on_batch(images, masks)
        model.train_on_batch(images, masks)
    samples = [[] for _ in models]
    for _ in range(rounds):
        for model, times in zip(models, samples):
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(images, masks)
            times.append((time.perf_counter() - start) / steps)
    return [float(np.median(times)) for times in samples]


def compiled(model):
    model.compile(keras.optimizers.Adam(1e-4), loss=unetpp_tf.losses.BCEDiceLoss(), jit_compile=use_xla("auto"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 pairs, 16 filters, 2 steps per round")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="train steps per timed round (5 rounds)")
    args = parser.parse_args()
    pairs, steps, filters = (64, 2, 16) if args.quick else (args.pairs, args.steps, 32)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pairs(root, pairs, 256)
        inspection = inspection_seconds(root)
        plain_rate = pipeline_rate(root, None)
        augmented_rate = pipeline_rate(root, SegmentationAugmenter(**AUGMENTATION, seed=0))

    batch = [synthetic_sample(i, image_size=(96, 96)) for i in range(16)]
    images = np.stack([b[0].numpy() for b in batch])
    masks = np.stack([b[1].numpy() for b in batch])
    widths = tuple(filters * 2**i for i in range(5))
    keras.utils.set_random_seed(0)
    model = unetpp_tf.from_preset("paper", input_shape=(96, 96, 1), filters=widths, deep_supervision=False)
    wrapper = compiled(AugmentedModel(model, SegmentationAugmenter(**AUGMENTATION, seed=0)))
    plain, augmented = step_times([compiled(model), wrapper], images, masks, steps)
    train_rate = 16 / plain

    print(f"inspection pass before from_directory returns ({pairs} pairs, {2 * pairs} files)")
    print(f"  {inspection:.2f} s                        {2 * pairs / inspection:8.1f} files/s")
    print(f"input pipeline, 256x256 PNG -> 96x96, batch 16, no cache ({pairs} pairs)")
    print(f"  without augmentation          {plain_rate:8.1f} images/s")
    print(f"  with host augmentation        {augmented_rate:8.1f} images/s")
    print(f"training consumes (UNet++ {widths}, 96x96, batch 16)")
    print(f"  step {plain * 1000:.0f} ms               {train_rate:8.1f} images/s")
    print(f"  pipeline / training           {plain_rate / train_rate:8.1f}x   (target >= 5x)")
    print(f"  augmented pipeline / training {augmented_rate / train_rate:8.1f}x")
    print("on-device augmentation inside the train step")
    print(f"  step with augmentation        {augmented * 1000:8.0f} ms")
    print(f"  added cost                    {(augmented / plain - 1) * 100:8.1f} %   (target < 15%)")


if __name__ == "__main__":
    main()
