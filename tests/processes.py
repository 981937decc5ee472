"""Helpers for tests that start or kill real processes: whole process groups, local multi-node Ray clusters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process's group (it was started with ``start_new_session``), then any descendants in other groups (Ray workers)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for child in descendants:
        with suppress(psutil.NoSuchProcess):
            child.kill()


IDLE_WORKERS = 4  # worker processes a test cluster's node keeps, whatever its CPUs (see start_cluster)


def start_cluster(head_cpus: int, worker_cpus: list[int], object_store_bytes: int) -> tuple:
    """A ``ray.cluster_utils.Cluster``: a head offering ``head_cpus`` and one worker node per entry of ``worker_cpus``,
    all up; returns ``(cluster, worker nodes)``. No driver is connected.

    Each node keeps up to :data:`IDLE_WORKERS` worker processes, as a node of several cores would: Ray keeps as
    many as a node has CPUs and ends any idle one beyond that within a second, so on a one-CPU node whose CPU a
    Train worker holds, every zero-CPU shard read started a new process (~5 s each here; the multi-node data test
    took 76 s instead of 98 s with this). It changes how many processes Ray keeps, not what any test checks."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "object_store_memory": object_store_bytes,
            "include_dashboard": False,
            "_system_config": {"num_workers_soft_limit": IDLE_WORKERS},
        },
    )
    workers = [cluster.add_node(num_cpus=cpus, object_store_memory=object_store_bytes) for cpus in worker_cpus]
    cluster.wait_for_nodes()
    return cluster, workers


@contextmanager
def local_cluster(head_cpus: int, worker_cpus: list[int], object_store_bytes: int) -> Iterator[tuple]:
    """A ``ray.cluster_utils.Cluster`` (head + one worker node per entry of ``worker_cpus``), this driver connected.

    Yields ``(cluster, worker nodes)``; shuts Ray and the cluster down after. Run it in a child process:
    a driver is connected to one Ray at a time, and the test session keeps its own.
    """
    import ray

    cluster, workers = start_cluster(head_cpus, worker_cpus, object_store_bytes)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_child(script: str, *args: str, out: Path, timeout: float) -> dict:
    """Run ``python script args`` (a test file's own ``__main__``) outside any Ray the session joined;
    fail with its output if it fails; return the JSON it wrote to ``out``."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    child = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    return json.loads(out.read_text())


def hold_cluster(conn) -> None:
    """In its own process (Cluster changes Ray's process-wide state): a head without CPUs, so every
    trial runs on a worker, and two one-CPU workers; removes, without grace, the worker it is told to.

    It lives here, not in a test file: a spawned process imports the module of its target, and a test
    file's imports (torch, the model code) would cost the cluster ~9 s of start-up on 2 cores (0.1 s for this module)."""
    cluster, workers = start_cluster(0, [1, 1], 150 * 2**20)
    conn.send((cluster.address, [node.all_processes["raylet"][0].process.pid for node in workers]))
    while (message := conn.recv()) != "shutdown":
        cluster.remove_node(workers[message], allow_graceful=False)
        conn.send("removed")
    cluster.shutdown()
