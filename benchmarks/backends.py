"""Training speed on TensorFlow vs JAX, and data-parallel scaling over worker processes.

Part 1 trains the paper-width UNet++ (`from_preset("paper")`, 96x96x1, batch 16, Adam,
BCE+Dice) for `--steps` steps after `--warmup` steps in one child process per backend and
prints images/s side by side (the same machine, one after the other).

Part 2 runs the same model with `unetpp_tf.distributed` (Keras' DataParallel over
jax.distributed) on 1, 2 and 4 local worker processes, each held to `--threads` threads
(XLA_FLAGS), with the global batch fixed: the images/s of the global batch and the speed-up
over one worker. On a machine with fewer cores than workers x threads the workers share cores.

    python benchmarks/backends.py                      # both parts
    python benchmarks/backends.py --workers 1 2 --steps 10 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import numpy as np
settings = json.loads(sys.argv[1])
import keras, unetpp_tf
from unetpp_tf import distributed
workers = settings["workers"]
if workers:
    cluster = distributed.Cluster(settings["coordinator"], workers, settings["process_id"])
    distributed.start(cluster, settings["batch"], timeout=120)
keras.utils.set_random_seed(0)
size, batch = settings["size"], settings["batch"]
model = unetpp_tf.from_preset("paper", input_shape=(size, size, 1))
model.compile(keras.optimizers.Adam(1e-3), loss=unetpp_tf.losses.BCEDiceLoss(),
              jit_compile=keras.backend.backend() == "jax")
rng = np.random.default_rng(0)
local = batch // (workers or 1)
import tensorflow as tf
x = rng.random((local, size, size, 1), dtype=np.float32)
y = (x > 0.5).astype(np.float32)
data = tf.data.Dataset.from_tensors((x, y)).repeat()
model.fit(data, steps_per_epoch=settings["warmup"], epochs=1, verbose=0)
start = time.perf_counter()
model.fit(data, steps_per_epoch=settings["steps"], epochs=1, verbose=0)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"images_per_s": batch * settings["steps"] / seconds,
                              "backend": keras.backend.backend()}), flush=True)
"""


def _child_env(backend: str, threads: int | None) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        env["OMP_NUM_THREADS"] = env["TF_NUM_INTRAOP_THREADS"] = str(threads)
    return env


def _result(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise SystemExit(f"a child failed (status {process.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _run(backend: str, settings: dict, threads: int | None = None) -> dict:
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings)], env=_child_env(backend, threads),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _result(child)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _workers(count: int, settings: dict, threads: int) -> dict:
    coordinator = f"localhost:{_free_port()}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD,
             json.dumps({**settings, "workers": count, "coordinator": coordinator, "process_id": k})],
            env=_child_env("jax", threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k in range(count)
    ]
    return [_result(child) for child in children][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="threads per worker process in part 2")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    settings = dict(size=args.size, batch=args.batch, steps=args.steps, warmup=args.warmup, workers=0)
    print(f"paper UNet++ {args.size}x{args.size}x1, batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup} warm-up steps")
    if args.backends:
        speeds = {}
        for backend in args.backends:
            started = time.perf_counter()
            speeds[backend] = _run(backend, settings)["images_per_s"]
            print(f"  {backend:<10} {speeds[backend]:7.2f} images/s  (child {time.perf_counter() - started:.0f} s)")
        if "tensorflow" in speeds:
            for backend, speed in speeds.items():
                print(f"  {backend:<10} {speed / speeds['tensorflow']:.2f}x TensorFlow")
    if args.workers:
        print(f"data parallel on JAX, {args.threads} thread(s) per worker, global batch {args.batch}:")
        base = None
        for count in args.workers:
            speed = _workers(count, settings, args.threads)["images_per_s"]
            base = base or speed
            print(f"  {count} worker(s) {speed:7.2f} images/s  {speed / base:.2f}x one worker")


if __name__ == "__main__":
    main()
