"""A fused trial's Tune function: a thin client of a cohort server (:mod:`medsweep.search.cohorts`).

Every member of a cohort is a Tune trial, so a sweep runs as many of these
clients as members train at once. A client only relays (joins a server, then
hands each result the server publishes for it to ``ray.tune.report``), so this
module, home of the sweep's Tune function (:func:`run_trial_or_member`), imports
Ray and nothing of torch or the model code: each client process starts in about
a second instead of importing torch and transformers (~6 s of CPU each: 16
members starting at once kept a 2-core machine busy for a minute).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.tune
from ray.train import Checkpoint

from medsweep.search.space import trial_config

if TYPE_CHECKING:
    from medsweep.search.data import StoreData

CLIENT_CPUS = 0.01  # a client only relays: what it reserves, taken from its slot's CPUs (see Cohorts.client_cpus)
POLL_S = 5.0  # a client's long poll for its next result

Files = dict[str, bytes]


def pack(folder: Path) -> Files:
    """A checkpoint folder as bytes per relative path (sent through the object store)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def unpack(files: Files, folder: Path) -> Path:
    """Write :func:`pack`'s bytes under ``folder``; returns it."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def is_last_result(config: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """Whether ``metrics`` end the member's trial: its last epoch, or a diverged one (no epoch follows either)."""
    return metrics.get("status") == "diverged" or int(metrics["epoch"]) >= int(config["epochs"])


@dataclass
class Cohorts:
    """The sweep's cohort servers, their router, and which methods run fused at what cohort size."""

    router: Any
    servers: list[Any]
    sizes: dict[str, int]  # fused method -> members per cohort
    client_cpus: float  # what each member's Tune trial reserves
    ran: list[dict[str, Any]] = field(default_factory=list)  # the cohorts the servers trained, once they stopped

    @property
    def max_concurrent_trials(self) -> int:
        return len(self.servers) * max(self.sizes.values())


def run_member(config: dict[str, Any], *, cohorts: Cohorts) -> None:
    """The Tune function of a fused trial: join a server, relay its results until the member ends.

    Raises when the server died or its cohort failed, so Tune restarts the trial from its checkpoint."""
    config = trial_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    restored = ray.tune.get_checkpoint()
    files: Files | None = None
    if restored is not None:
        with restored.as_directory() as folder:
            files = pack(Path(folder))
    with tempfile.TemporaryDirectory(prefix="medsweep-member-") as scratch:
        while True:  # once, or again after the server dropped this (live) member for being slow
            server = cohorts.servers[ray.get(cohorts.router.join.remote(trial_id, config, files))]
            acked = 0
            while True:
                kind, metrics, checkpoint = ray.get(server.next.remote(trial_id, acked, POLL_S))
                if kind == "wait":
                    continue
                if kind != "result":
                    break
                assert metrics is not None
                report = Checkpoint.from_directory(str(unpack(checkpoint, Path(scratch) / f"epoch-{metrics['epoch']}"))) if checkpoint else None
                ray.tune.report(metrics, checkpoint=report)
                acked += 1
                files = checkpoint or files
                if is_last_result(config, metrics):
                    return
            if kind == "done":
                return
            if kind != "left":
                why = f"{kind}: {metrics['error']}" if metrics else kind
                raise RuntimeError(f"the cohort server lost trial {trial_id} ({why}); Tune restarts it from its checkpoint")


def run_trial_or_member(config: dict[str, Any], *, stores: dict[str, StoreData], storage_path: str, cohorts: Cohorts) -> None:
    """The sweep's Tune function when cohorts are on: a fused method's trial is a member (its process never
    imports torch), any other a :func:`~medsweep.search.trial.run_trial`, imported only in a process that trains."""
    if config.get("method") in cohorts.sizes:
        run_member(config, cohorts=cohorts)
        return
    from medsweep.search.trial import run_trial

    run_trial(config, stores=stores, storage_path=storage_path)
