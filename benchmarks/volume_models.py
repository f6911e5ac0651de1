"""3D UNet++ against MONAI's BasicUNetPlusPlus, and its training memory with and without recomputation.

(a) Throughput: our 3D UNet++ (depth 4, BatchNorm, transposed-convolution upsampling, the
builder's defaults) and MONAI `BasicUNetPlusPlus(spatial_dims=3, ...)` (its defaults: instance
norm, LeakyReLU, "deconv" upsampling) at the same encoder widths, trained and run on 64^3
patches, batch 2, on this CPU, side by side in one run. For each: parameters, forward GFLOPs
per patch (a multiply-add counts 2; convolutions and transposed convolutions, as
`unetpp_tf.models.count_flops` counts them), training and inference patches/s, and patches/s
per forward GFLOP (throughput normalised by the work each network does, since the two graphs
differ: MONAI's upsampling keeps the deeper width, ours halves it as the paper does). The
MONAI half runs in a subprocess of the PyTorch interpreter given with --torch-python (the
package never imports torch); without it the MONAI columns are skipped with a note.

(b) Memory: peak resident memory (`ru_maxrss`) of a process that only trains the 3D UNet++
at the same patch size and batch, with and without `recompute=True`, each in its own process
(the method of benchmarks/recompute_memory.py): the floor (before the first step: TensorFlow,
model, weights, Adam slots), the peak, and the change. Its widths are --memory-features (the
paper's 32..512 by default, 26.2M parameters; the throughput widths are smaller so that
the slow side finishes in minutes).

Usage:
    python benchmarks/volume_models.py --torch-python PATH/TO/venv/bin/python
    python benchmarks/volume_models.py --quick      # 8..128 widths, 32^3, 1 timed step: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import time

import numpy as np

from isolated import answer_single, run_isolated  # benchmarks/isolated.py

# The MONAI half: run by the PyTorch interpreter with the spec as its one argument; prints one JSON line.
TORCH_SIDE = r'''
import json, resource, statistics, sys, time
import torch
from monai.networks.nets import BasicUNetPlusPlus

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(spec["threads"])
size, batch, features = spec["size"], spec["batch"], spec["features"]
model = BasicUNetPlusPlus(spatial_dims=3, in_channels=1, out_channels=1, features=(*features, features[0]))
params = sum(p.numel() for p in model.parameters())

flops = []
def count(module, inputs, output):
    kernel = module.weight.shape  # conv: (out, in/groups, k...); transposed: (in, out/groups, k...)
    if isinstance(module, torch.nn.ConvTranspose3d):  # each input position scatters the whole kernel
        flops.append(2 * inputs[0][0, 0].numel() * kernel.numel())
    else:  # each output position gathers the whole kernel
        flops.append(2 * output[0, 0].numel() * kernel.numel())
for module in model.modules():
    if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
        module.register_forward_hook(count)
with torch.no_grad():
    model.eval()
    model(torch.zeros(1, 1, size, size, size))
forward_flops = sum(flops)
for module in model.modules():
    module._forward_hooks.clear()

def rate(call, repeats):
    call(); call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); call(); times.append(time.perf_counter() - start)
    return statistics.median(times)

gen = torch.Generator().manual_seed(0)
images = torch.rand(batch, 1, size, size, size, generator=gen)
masks = (images > 0.5).float()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
def dice_bce(logits, target):
    probs = torch.sigmoid(logits)
    tp = (probs * target).sum(dim=(2, 3, 4))
    dice = 1 - (2 * tp + 1) / (probs.sum(dim=(2, 3, 4)) + target.sum(dim=(2, 3, 4)) + 1)
    return 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + dice.mean()
def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = dice_bce(model(images)[0], masks)
    loss.backward()
    optimizer.step()
model.train()
train_s = rate(train_step, spec["steps"])
model.eval()
def infer():
    with torch.inference_mode():
        model(images)
infer_s = rate(infer, spec["steps"])
print(json.dumps(dict(params=params, flops=forward_flops, train_s=train_s, infer_s=infer_s,
                      peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                      version=f"torch {torch.__version__}, monai " + __import__("monai").__version__)))
'''


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _rate(call, repeats: int) -> float:
    """Median seconds of `call` after two warm-up calls (tracing)."""
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(spec: dict) -> dict:
    """Train (and for "throughput" also run) our 3D UNet++ in this process; return its figures."""
    import keras

    import unetpp_tf
    from unetpp_tf.models import count_flops

    keras.utils.set_random_seed(0)
    size, batch = spec["size"], spec["batch"]
    model = unetpp_tf.build_unetpp((size, size, size, 1), depth=len(spec["features"]) - 1,
                                   filters=tuple(spec["features"]), recompute=spec["recompute"])
    model.compile(keras.optimizers.Adam(1e-4), loss=unetpp_tf.losses.BCEDiceLoss(), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, size, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    floor = _peak_gb()
    train_s = _rate(lambda: model.train_on_batch(images, masks), spec["steps"])
    peak = _peak_gb()
    result = dict(params=model.count_params(), flops=count_flops(model), train_s=train_s,
                  floor_gb=floor, peak_gb=peak, version=f"keras {keras.version()}")
    if spec["kind"] == "throughput":
        result["infer_s"] = _rate(lambda: model.predict_on_batch(images), spec["steps"])
    return result


def run_torch(python: str, spec: dict) -> dict:
    """Run the MONAI half with `python` (a PyTorch interpreter) and return its JSON result."""
    result = subprocess.run([python, "-c", TORCH_SIDE, json.dumps(spec)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the MONAI half failed ({python}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", help="a Python interpreter with torch and monai installed (the MONAI half)")
    parser.add_argument("--features", default="16,32,64,128,256", help="encoder widths, 5 levels (depth 4)")
    parser.add_argument("--size", type=int, default=64, help="patch side (voxels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    parser.add_argument("--memory-features", default="32,64,128,256,512", help="encoder widths of the memory part")
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--quick", action="store_true", help="8..128 widths, 32^3, 1 timed step: a smoke run")
    args = answer_single(parser, measure)
    if args is None:
        return
    features = [8, 16, 32, 64, 128] if args.quick else [int(f) for f in args.features.split(",")]
    size, steps = (32, 1) if args.quick else (args.size, args.steps)
    if len(features) != 5:
        parser.error("--features needs 5 widths: MONAI's BasicUNetPlusPlus has depth 4")
    spec = dict(size=size, batch=args.batch, features=features, steps=steps)
    threads = len(os.sched_getaffinity(0))

    ours = run_isolated(__file__, {**spec, "kind": "throughput", "recompute": False})
    rows = [("unetpp_tf build_unetpp 3D", ours)]
    if args.torch_python:
        rows.append(("MONAI BasicUNetPlusPlus", run_torch(args.torch_python, {**spec, "threads": threads})))
    print(f"3D UNet++ at {size}^3 patches, batch {args.batch}, widths {tuple(features)}, 1 input channel, "
          f"1 class, float32, {threads} CPU threads; {ours['version']}"
          + (f", {rows[1][1]['version']}" if len(rows) > 1 else ""))
    print("GFLOPs = forward FLOPs per patch (multiply-add = 2, convolutions); per GFLOP = patches/s x GFLOPs\n")
    header = (f"{'model':<27} | {'params':>7} | {'GFLOPs':>6} | {'train p/s':>9} {'x GFLOP':>8} | "
              f"{'infer p/s':>9} {'x GFLOP':>8}")
    print(header)
    print("-" * len(header))
    for name, r in rows:
        gflops = r["flops"] / 1e9
        train, infer = args.batch / r["train_s"], args.batch / r["infer_s"]
        print(f"{name:<27} | {r['params'] / 1e6:>6.2f}M | {gflops:>6.1f} | {train:>9.3f} {train * gflops:>8.1f} | "
              f"{infer:>9.3f} {infer * gflops:>8.1f}")
    if len(rows) > 1:
        monai = rows[1][1]

        def per_flop(r, key):
            return args.batch / r[key] * r["flops"]

        print(f"\nours / MONAI: patches/s training x{monai['train_s'] / ours['train_s']:.2f}, "
              f"inference x{monai['infer_s'] / ours['infer_s']:.2f}; per GFLOP training "
              f"x{per_flop(ours, 'train_s') / per_flop(monai, 'train_s'):.2f}, inference "
              f"x{per_flop(ours, 'infer_s') / per_flop(monai, 'infer_s'):.2f}")
    else:
        print("\nMONAI skipped: pass --torch-python PATH (an interpreter with torch and monai) to compare.")

    if args.skip_memory:
        return
    memory_features = features if args.quick else [int(f) for f in args.memory_features.split(",")]
    memory_spec = {**spec, "features": memory_features, "kind": "memory"}
    plain = ours if memory_features == features else run_isolated(__file__, {**memory_spec, "recompute": False})
    rec = run_isolated(__file__, {**memory_spec, "recompute": True})
    print(f"\nPeak training memory (ru_maxrss of a process training only that model), {size}^3 batch {args.batch}, "
          f"widths {tuple(memory_features)}, {plain['params'] / 1e6:.2f}M parameters, Adam, BCE+Dice, XLA off")
    header = f"{'build':<12} | {'floor':>7} | {'peak':>7} | {'above floor':>11} | {'train p/s':>9}"
    print(header)
    print("-" * len(header))
    for name, r in (("default", plain), ("recompute", rec)):
        print(f"{name:<12} | {r['floor_gb']:>4.2f} GB | {r['peak_gb']:>4.2f} GB | "
              f"{r['peak_gb'] - r['floor_gb']:>8.2f} GB | {args.batch / r['train_s']:>9.3f}")
    print(f"recompute: peak {rec['peak_gb'] / plain['peak_gb'] - 1:+.0%}, above floor "
          f"{(rec['peak_gb'] - rec['floor_gb']) / (plain['peak_gb'] - plain['floor_gb']) - 1:+.0%}, "
          f"speed x{plain['train_s'] / rec['train_s']:.2f}")


if __name__ == "__main__":
    main()
