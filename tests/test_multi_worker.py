"""Multi-worker training: several `unetpp-tf train --strategy multi-worker` processes on this CPU.

Each process test starts worker processes on the JAX backend (whatever backend this session
runs), so those run once, in the TensorFlow session. The workers share a JAX compilation
cache, so only the first run compiles. How a global batch is split over workers is checked
directly for 2 and 4 workers; processes are started for 2 (killed and resumed: the
single-process weights).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from unetpp_tf.distributed import Cluster, check_backend

SETTINGS = [
    "--data", "synthetic", "--num-samples", "28", "--image-size", "32", "--depth", "2", "--filters", "4",
    "--batch-size", "8", "--min-steps", "1", "--seed", "3", "--no-export-saved-model", "--no-export-tflite",
    "--quiet",
]


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return {
        **os.environ, "KERAS_BACKEND": "jax", "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_PLATFORMS": "cpu",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _train(env, output, name, *extra, workers=1, port=None):
    """Start `workers` training processes (one plain run when 1); return them."""
    command = [sys.executable, "-m", "unetpp_tf", "train", *SETTINGS, "--output-dir", str(output), "--name", name,
               *extra]
    if workers == 1:
        return [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    cluster = ["--strategy", "multi-worker", "--coordinator", f"localhost:{port}", "--num-processes", str(workers)]
    return [
        subprocess.Popen([*command, *cluster, "--process-id", str(k)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for k in range(workers)
    ]


def _finish(processes, timeout=400):
    outputs = [p.communicate(timeout=timeout) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return outputs


def _weights(run):
    return keras.models.load_model(run / "model.keras", compile=False).get_weights()


def _assert_same_weights(expected, got):
    assert len(got) == len(expected) > 0
    for want, value in zip(expected, got):
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def single_run(jax_env, tmp_path_factory):
    """One process, 3 epochs: the run the workers must reproduce."""
    output = tmp_path_factory.mktemp("single")
    _finish(_train(jax_env, output, "one", "--epochs", "3"))
    return output / "one"


@pytest.mark.backend_independent
@pytest.mark.parametrize("workers", [2, 4])
def test_the_workers_slices_make_up_each_global_batch_in_order(workers):
    import tensorflow as tf

    from unetpp_tf.distributed import worker_slice

    images = np.arange(2 * 8 * 3, dtype="float32").reshape(2 * 8, 3)
    masks = np.arange(2 * 8, dtype="int32")
    batches = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    parts = [list(worker_slice(batches, k, workers).as_numpy_iterator()) for k in range(workers)]
    for step, (want_images, want_masks) in enumerate(batches.as_numpy_iterator()):
        assert all(len(part[step][0]) == 8 // workers for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[step][0] for part in parts]), want_images)
        np.testing.assert_array_equal(np.concatenate([part[step][1] for part in parts]), want_masks)


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_backup_with_two_workers(jax_env, tmp_path, single_run):
    port = _free_port()
    chief, worker = _train(jax_env, tmp_path, "two", "--epochs", "3", workers=2, port=port)
    state = tmp_path / "two" / "backup" / "state.json"
    deadline = time.monotonic() + 300
    while not (state.exists() and json.loads(state.read_text())["epoch"] >= 1):
        assert chief.poll() is None and worker.poll() is None, chief.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no backup within 300 s"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    try:  # the chief waits in a collective for its lost peer until JAX's heartbeat times out (over a minute
        chief.wait(timeout=5)  # here): it is stopped, as a scheduler stops the job, and both start again
    except subprocess.TimeoutExpired:
        chief.kill()
    chief.communicate()
    worker.communicate()
    backed_up = json.loads(state.read_text())["epoch"]
    assert 1 <= backed_up < 3
    _finish(_train(jax_env, tmp_path, "two", "--epochs", "3", "--resume", workers=2, port=_free_port()))
    run = tmp_path / "two"
    epochs = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]  # no epoch trained twice, none lost
    _assert_same_weights(_weights(single_run), _weights(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["backend"] == "jax"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # only the chief wrote: no worker folders


def test_a_worker_that_cannot_reach_the_coordinator_fails_in_time_with_one_line(jax_env, tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "unetpp_tf", "train", *SETTINGS, "--output-dir", str(tmp_path), "--name", "lost",
         "--strategy", "multi-worker", "--coordinator", f"localhost:{_free_port()}", "--num-processes", "2",
         "--process-id", "1", "--init-timeout", "3"],
        env=jax_env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("unetpp-tf")]
    assert len(lines) == 1 and "no coordinator answered within 3 s" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "lost").exists()


def test_multi_worker_on_tensorflow_is_refused_naming_the_flag():
    if keras.backend.backend() == "tensorflow":
        with pytest.raises(ValueError, match="--strategy multi-worker runs on the JAX backend.*--backend jax"):
            check_backend("multi-worker")
    with pytest.raises(ValueError, match="--process-id .* 2 is out of range for 2 processes"):
        Cluster.from_settings("localhost:1", 2, 2, environ={})
    with pytest.raises(ValueError, match="--coordinator .* must be HOST:PORT"):
        Cluster.from_settings("localhost", 2, 0, environ={})
    with pytest.raises(ValueError, match="missing --process-id"):
        Cluster.from_settings("localhost:1", 2, None, environ={})
    from_env = Cluster.from_settings(
        environ={"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    )
    assert from_env == Cluster("h:9", 4, 3) and not from_env.is_chief
    assert Cluster.from_settings("a:1", 2, 0, environ={"JAX_PROCESS_ID": "1"}).is_chief  # flags first


@pytest.mark.parametrize(
    "flags, message",
    [
        ([["--num-processes", "2"], ["--num-processes", "3"]], "--num-processes differs across workers: they were "
                                                               "given 2, 3"),
        ([["--num-processes", "2", "--batch-size", "3"]] * 2, "--batch-size 3 does not split over the 2 devices"),
    ],
)
def test_workers_that_disagree_all_stop_naming_the_flag(jax_env, tmp_path, flags, message):
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "unetpp_tf", "train", *SETTINGS, "--output-dir", str(tmp_path), "--name", "odd",
             "--strategy", "multi-worker", "--coordinator", f"localhost:{port}", "--process-id", str(k), *extra],
            env=jax_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k, extra in enumerate(flags)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=200)
        assert worker.returncode == 2, err[-2000:]
        assert message in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "odd").exists()
