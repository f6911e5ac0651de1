"""Sliding-window inference of a CT-sized volume (512 x 512 x 300) in bounded memory.

A small 3D UNet++ (patches 64^3) predicts a whole 300 x 512 x 512 volume with
`unetpp_tf.volume_inference.sliding_window_predict` (Gaussian blending, overlap 0.5, batch 2)
in a process of its own, and the script prints the seconds it took and the peak resident
memory of that process (VmHWM, the high-water mark of its resident set) next to:
- the floor: the peak before the volume exists (TensorFlow, the model, one warm-up batch);
- the volume [D, H, W, 1] float32 and the accumulator [D, H, W, K] float32 (the result), the
  only volume-sized arrays the function makes, so peak - floor should be about their sum;
- what holding every patch at once would need (inputs and outputs of all windows), the
  memory a non-batched implementation would take.

Usage:
    python benchmarks/sliding_window.py                  # 300 x 512 x 512, depth 3, filters 8 (~6 min on 2 cores)
    python benchmarks/sliding_window.py --quick          # 96 x 128 x 128: a smoke run
    python benchmarks/sliding_window.py --overlap 0.25 --batch-size 4
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np

from isolated import answer_single, run_isolated  # benchmarks/isolated.py

MIB = 1024**2


def _peak_bytes() -> int:
    """The process's resident high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(spec: dict) -> dict:
    """Build the model, predict one volume with sliding windows in this process, return the figures."""
    import keras

    import unetpp_tf
    from unetpp_tf.volume_inference import sliding_window_predict, window_starts

    keras.utils.set_random_seed(0)
    patch = spec["patch"]
    model = unetpp_tf.models.build_unetpp(
        input_shape=(patch, patch, patch, 1), depth=spec["depth"], filters=spec["filters"], num_classes=spec["classes"]
    )
    rng = np.random.default_rng(0)
    model.predict_on_batch(rng.random((spec["batch_size"], patch, patch, patch, 1), dtype=np.float32))  # trace
    floor = _peak_bytes()
    shape = tuple(spec["shape"])  # (D, H, W)
    volume = rng.random((*shape, 1), dtype=np.float32)
    start = time.perf_counter()
    probs = sliding_window_predict(model, volume, overlap=spec["overlap"], batch_size=spec["batch_size"])
    seconds = time.perf_counter() - start
    stride = max(1, round(patch * (1 - spec["overlap"])))
    windows = math.prod(len(window_starts(n, patch, stride)) for n in shape)
    return {
        **spec, "seconds": seconds, "windows": windows, "floor": floor, "peak": _peak_bytes(),
        "volume_bytes": volume.nbytes, "accumulator_bytes": probs.nbytes, "finite": bool(np.isfinite(probs).all()),
        "params": model.count_params(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 96 x 128 x 128 volume: a smoke run")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1)
    args = answer_single(parser, measure)
    if args is None:
        return
    shape = (96, 128, 128) if args.quick else (300, 512, 512)
    spec = dict(shape=shape, patch=64, overlap=args.overlap, batch_size=args.batch_size, depth=args.depth,
                filters=args.filters, classes=args.classes)
    r = run_isolated(__file__, spec)
    patch_voxels = r["patch"] ** 3
    batch_bytes = 4 * r["batch_size"] * patch_voxels * (1 + r["classes"])
    all_patches = 4 * r["windows"] * patch_voxels * (1 + r["classes"])
    expected = r["volume_bytes"] + r["accumulator_bytes"] + batch_bytes
    print(f"sliding-window inference, volume {' x '.join(map(str, shape))} (D x H x W), 3D UNet++ depth {r['depth']} "
          f"filters {r['filters']} ({r['params']:,} parameters), patches {r['patch']}^3, overlap {r['overlap']}, "
          f"batch {r['batch_size']}, Gaussian blending")
    print(f"windows                 {r['windows']}")
    print(f"seconds                 {r['seconds']:.1f}  ({r['windows'] / r['seconds']:.2f} windows/s)")
    print(f"volume (input)          {r['volume_bytes'] / MIB:8.0f} MiB")
    print(f"accumulator (= result)  {r['accumulator_bytes'] / MIB:8.0f} MiB")
    print(f"one batch of patches    {batch_bytes / MIB:8.1f} MiB (inputs + outputs)")
    print(f"floor (before volume)   {r['floor'] / MIB:8.0f} MiB  (TensorFlow, model, one warm-up batch)")
    print(f"peak resident (VmHWM)   {r['peak'] / MIB:8.0f} MiB")
    print(f"peak - floor            {(r['peak'] - r['floor']) / MIB:8.0f} MiB  vs volume + accumulator + batch "
          f"{expected / MIB:.0f} MiB ({(r['peak'] - r['floor']) / expected:.2f}x)")
    print(f"all patches at once     {all_patches / MIB:8.0f} MiB  would be needed by a non-batched version "
          f"({all_patches / r['peak']:.1f}x this peak)")
    print(f"result finite           {r['finite']}")


if __name__ == "__main__":
    main()
