"""Multi-host data-parallel training on Keras' JAX backend (`--strategy multi-worker`).

Every worker process runs the same `unetpp_tf.train` call. `start` joins the workers through
`jax.distributed` (one coordinator, the chief, process 0) and sets Keras' distribution to
`keras.distribution.DataParallel` over every device of every worker: the weights are
replicated, each global batch is split over the devices and the gradients are averaged by
JAX's collectives (gloo on CPU, NCCL on GPU). Nothing here sums a gradient itself.

Each worker runs the input pipeline with the run's seed, so all of them see the same global
batches, and keeps its slice of every batch (`worker_slice`): the global batch the model
trains on is the one a single-process run trains on, so a run on N workers ends with the
weights of a single-process run (tested). Only the chief writes the run directory; the
other workers read it (splits, the backup to resume from) and write into a scratch folder.

Where the cluster comes from, first match wins: the arguments (`--coordinator`,
`--num-processes`, `--process-id`), then JAX's variables `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, then JAX's own detection (SLURM, Open MPI).

Example:
    >>> cluster = Cluster.from_settings("10.0.0.1:1234", 2, 0)
    >>> start(cluster, batch_size=16)  # on each worker, before building the model
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

ENVIRONMENT = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Who this worker is: the coordinator's HOST:PORT, the number of worker processes, its id.

    None in a field means "let JAX detect it" (SLURM, Open MPI).

    Example:
        >>> Cluster.from_settings("localhost:1234", 2, 1).is_chief
        False
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def is_chief(self) -> bool:
        """Process 0 hosts the coordinator and alone writes the run directory."""
        return not self.process_id

    @classmethod
    def from_settings(cls, coordinator=None, num_processes=None, process_id=None, environ=None) -> Cluster:
        """The cluster from arguments, else from JAX's environment variables; checked.

        Raises:
            ValueError: naming the flag (and its variable) whose value is wrong.

        Example:
            >>> Cluster.from_settings(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
            ...                                "JAX_PROCESS_ID": "0"})
            Cluster(coordinator='h:1', num_processes=2, process_id=0)
        """
        environ = os.environ if environ is None else environ
        given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
        for key, variable in ENVIRONMENT.items():
            if given[key] is None and environ.get(variable, "") != "":
                given[key] = environ[variable]
        for key in ("num_processes", "process_id"):
            value = given[key]
            if value is None:
                continue
            try:
                given[key] = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{_flag(key)} must be an integer, got {value!r}.") from None
        cluster = cls(**given)
        cluster.check()
        return cluster

    def check(self) -> None:
        """Refuse settings that cannot describe a cluster, naming the flag."""
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"{_flag('num_processes')} must be 1 or more, got {self.num_processes}.")
        if self.process_id is not None:
            if self.process_id < 0:
                raise ValueError(f"{_flag('process_id')} must be 0 or more, got {self.process_id}.")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(
                    f"{_flag('process_id')} {self.process_id} is out of range for {self.num_processes} processes; "
                    f"use 0 to {self.num_processes - 1} (0 is the chief, which hosts the coordinator)."
                )
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"{_flag('coordinator')} must be HOST:PORT (the chief's address and a free port), "
                    f"got {self.coordinator!r}."
                )
        named = [key for key in ENVIRONMENT if getattr(self, key) is not None]
        if named and len(named) != len(ENVIRONMENT):
            missing = ", ".join(_flag(key) for key in ENVIRONMENT if key not in named)
            raise ValueError(
                f"--strategy multi-worker: give all of --coordinator, --num-processes and --process-id (or their "
                f"JAX_* variables); missing {missing}. Leave all three out on SLURM or Open MPI."
            )


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')} ({ENVIRONMENT[key]})"


def check_backend(strategy: str = "multi-worker") -> None:
    """Refuse a strategy the running Keras backend cannot run, saying what would work.

    Example:
        >>> check_backend("multi-worker")  # KERAS_BACKEND=jax
    """
    import keras

    backend = keras.backend.backend()
    if strategy == "multi-worker" and backend != "jax":
        raise ValueError(
            f"--strategy multi-worker runs on the JAX backend (Keras' DataParallel over jax.distributed), but Keras "
            f"runs on {backend}; add --backend jax (or set KERAS_BACKEND=jax before Keras is imported)."
        )
    if strategy in ("one-device", "mirrored", "tpu") and backend != "tensorflow":
        raise ValueError(
            f"--strategy {strategy} is a tf.distribute strategy and needs the TensorFlow backend, but Keras runs on "
            f"{backend}; use --strategy auto (all local devices) or multi-worker on {backend}."
        )


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Wait until something listens at `address` (HOST:PORT); raise after `timeout` seconds.

    JAX aborts the whole process when its coordinator cannot be reached, with a native stack
    trace; asking first turns that into one clear error.

    Raises:
        ConnectionError: nothing answered in time, naming the address and what to check.

    Example:
        >>> wait_for_coordinator("10.0.0.1:1234", timeout=60)
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"--coordinator {address}: no coordinator answered within {timeout:g} s "
                    f"({error.strerror or error}); start worker 0 (it hosts the coordinator) with the same "
                    "--coordinator, check the host and port, or raise --init-timeout."
                ) from None
            time.sleep(0.25)


def start(cluster: Cluster, batch_size: int, settings: dict | None = None, timeout: float = 300.0):
    """Join the workers and set Keras' distribution to DataParallel over all their devices.

    Call it on every worker before any model is built. Afterwards the workers compare their
    settings (`settings`, a dict of what must agree, and the number of processes each was
    given) and all refuse to go on when they differ.

    Args:
        cluster: Cluster. This worker's place.
        batch_size: int. The global batch size; it must split evenly over the devices.
        settings: dict or None. What every worker must have alike (the training config).
        timeout: float. Seconds to wait for the coordinator and for all workers.

    Returns:
        keras.distribution.DataParallel: the distribution now in force.

    Raises:
        ValueError: a wrong backend, workers that disagree, or a batch size that does not
            divide over the devices.
        ConnectionError: the coordinator did not answer within `timeout`.

    Example:
        >>> start(Cluster.from_settings("localhost:1234", 2, 0), batch_size=16, settings=config.to_dict())
    """
    check_backend("multi-worker")
    import jax
    import keras
    import numpy as np
    from jax.experimental import multihost_utils

    # CPU devices exchange gradients over gloo (GPUs use NCCL whatever this says); set before JAX starts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not cluster.is_chief and cluster.coordinator:
        wait_for_coordinator(cluster.coordinator, timeout)
    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(
                cluster.coordinator, cluster.num_processes, cluster.process_id, initialization_timeout=int(timeout)
            )
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"--strategy multi-worker: could not join the workers ({str(error).splitlines()[0]}); give "
                "--coordinator, --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                "JAX_PROCESS_ID) on every worker."
            ) from None
    digest = hashlib.sha256(json.dumps(settings or {}, sort_keys=True, default=str).encode()).digest()[:8]
    mine = np.array([cluster.num_processes or jax.process_count(), batch_size, *digest], dtype=np.int64)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    counts = sorted({int(row[0]) for row in everyone} | {jax.process_count()})
    if len(counts) > 1:
        raise ValueError(
            f"--num-processes differs across workers: they were given {', '.join(map(str, counts))} (the coordinator "
            f"runs {jax.process_count()}); give every worker the same --num-processes."
        )
    if len({row[2:].tobytes() for row in everyone}) > 1:
        raise ValueError(
            "the workers were started with different training settings; start every worker with the same flags "
            "(or config file), changing only --process-id."
        )
    devices = jax.device_count()
    if batch_size % devices:
        raise ValueError(
            f"--batch-size {batch_size} does not split over the {devices} devices of {jax.process_count()} "
            f"worker(s); use a multiple of {devices}."
        )
    distribution = keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    logger.info(
        f"worker {jax.process_index()} of {jax.process_count()}: data parallel over {devices} device(s), "
        f"{batch_size // jax.process_count()} of every {batch_size} images per worker"
    )
    return distribution


def worker_slice(dataset, process_id: int, num_processes: int):
    """Keep this worker's contiguous slice of every batch of a tf.data dataset of global batches.

    The slices of workers 0..N-1, in order, make up the global batch again, which is how
    JAX assembles the global batch from each process's part. Every batch size must be a
    multiple of `num_processes` (`training.replica_batches` sees to it).

    Example:
        >>> local = worker_slice(train_batches, process_id=1, num_processes=2)
    """
    import tensorflow as tf

    if num_processes == 1:
        return dataset

    def part(tensor):
        size = tf.shape(tensor)[0] // num_processes
        return tensor[process_id * size:(process_id + 1) * size]

    return dataset.map(lambda *batch: tf.nest.map_structure(part, batch if len(batch) > 1 else batch[0]))


@contextlib.contextmanager
def outside_distribution():
    """Run the block with no Keras distribution (on this worker alone); put it back after.

    Example:
        >>> with outside_distribution():
        ...     scores = evaluate(local_model, data.val)
    """
    import keras

    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def local_copy(model):
    """A copy of `model` outside the distribution, for scoring and saving on one worker.

    Under a multi-process distribution a model's predictions are spread over the workers;
    validation scoring runs on a local copy whose weights `sync_weights` refreshes.

    Example:
        >>> scorer = local_copy(model); sync_weights(model, scorer)
    """
    import keras

    with outside_distribution():
        copy = keras.models.clone_model(model)
        sync_weights(model, copy)
    return copy


def sync_weights(source, target) -> None:
    """Copy `source`'s weights into `target` (host arrays, so any distribution to none)."""
    target.set_weights([np_value(v) for v in source.weights])


def np_value(variable):
    """A variable's value as a numpy array, also when it is replicated over several processes."""
    import numpy as np

    value = variable.value
    if hasattr(value, "is_fully_addressable") and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return np.asarray(value)
