"""Fused trial cohorts in a sweep: cohort server actors train, thin Tune trials relay.

A trial of a method that trains on preloaded features (:func:`medsweep.trainables.cohort.fusable`)
stays a Tune trial, so Optuna (ask and tell per trial), ASHA, the trackers, the
leaderboard, ``final`` and ``medsweep resume`` see it as they see any trial. Its
Tune function is only a client (:func:`run_member`): it joins a
:class:`CohortServer` with its config (and, when restored, its checkpoint), then
relays the per-epoch metrics and checkpoints the server publishes for it through
``ray.tune.report``. The servers hold what a trial reserves today (``--cpus-per-trial``
and the method's GPU fraction); a client reserves :data:`CLIENT_CPUS`, so K clients
sit beside each server. A server groups waiting members by
:func:`~medsweep.trainables.cohort.cohort_key` and start epoch and trains each
group with :func:`~medsweep.trainables.cohort.fit_cohort` over the sweep's shared
store, reading the batches a standalone trial reads (:class:`~medsweep.search.trial.StoreBatches`).

Leaving. Tune reports synchronously: a client's ``ray.tune.report`` returns only
when the driver asks the trial for its next result, and a trial stopped by ASHA
(or ended by the time budget) never returns from it. So a client acknowledges
each result by coming back for the next one, and before its next epoch a member
trains only once its last result is acknowledged. A member Tune ends leaves at
once: the driver's :class:`~medsweep.search.tuning.CohortLeaves` callback tells
the router (found by its name, :func:`router_name`, so a resumed driver's
restored callback finds the new router), which tells the member's server. A
result still unacknowledged :data:`LEAVE_GRACE_S` after it was published
(a lost message, a driver that died) drops the member too; a live client that
was dropped only for being slow is told so and joins again from the checkpoint
it reported last.

Faults. Servers restart (``max_restarts=-1``) without their state; a client whose
server died raises, and Tune restarts its trial from its last checkpoint (the
sweep's ``FailureConfig``), which joins a server again. When a node goes, its
servers restart only where a node has room, which may be never while the live
servers hold the CPUs: the router passes over a server that does not answer
(:data:`~medsweep.search.router.ANSWER_TIMEOUT_S`), so the members join the live
ones. The router and the registry run on the driver's node, which a sweep cannot
outlive anyway: on a worker node that died they took every member's join with
them, each member's three tries (``max_failures=2``) failing within seconds
(``test_a_fused_sweep_spans_nodes_and_finishes_when_a_servers_node_dies``).

Checkpoints travel as bytes through Ray's object store (client to server on a
restore, server to client every epoch), so a client and its server may run on
different nodes; each side writes them to its own local temporary folder.

Routing. One :class:`~medsweep.search.router.CohortRouter` actor takes every
join in turn and sends the member to a server (see :mod:`medsweep.search.router`);
a server works out the member's group for it (:meth:`CohortServer.group`).

Imports. Ray makes every process handed an actor handle import the module of
the actor's class (measured: a task given a handle to an actor whose module
imports torch loads torch). The router and every member client hold handles
to the servers, so this module imports neither torch nor the model code at
import time (``test_layering``): the server loads them in its own process
(``__init__``; ``checkpoint_epoch``), and the driver where it needs
``fusable``. Before, each of 16 members of figure 11 imported them (~6 s of
CPU each), which kept a 2-core machine busy for a minute before any trained.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from medsweep.search.data import StoreBatches, StoreData
from medsweep.search.members import CLIENT_CPUS, Cohorts, Files, is_last_result, pack, unpack
from medsweep.search.router import CohortRegistry, CohortRouter, Group, router_name
from medsweep.search.settings import SweepSettings
from medsweep.search.study import COHORTS_FILE, RAY_DIR

# Cohort size on CPUs when --cohort-size is not given: 1, every trial alone. On 2 CPU cores BENCHMARKS.md measured
# figure 1's sweep x0.66 as fast fused (figure 11) and the paper's setting x0.56 (figure 11b): each member is a Tune
# trial actor of its own to start, which costs more than the fused steps save (a member's step costs 0.6x its
# standalone step at the toy scale, figure 10; its epoch 0.9x at the paper's, where the matmuls dominate).
# On GPUs the probe sizes cohorts (cohort_size_for).
CPU_COHORT_SIZE = 1
MAX_COHORT_SIZE = 16  # on a GPU, members that fit in the method's fraction, at most this many
# A group starts when full, or this long after its last member joined. 5 s, not 2: members' processes start one
# per trial slot at a time, and on a busy machine (2 cores, two worker nodes, a CI run beside) their joins came more
# than 2 s apart, so a sweep of 4 trials in cohorts of 2 trained every member alone. A cohort that does not fill
# waits this long once; a real trial runs for minutes.
FORM_WAIT_S = 5.0
# An unacknowledged result older than this before the next epoch, and no word from Tune: the member is dropped.
# 30 s, not 5: with W&B on (the default, offline) the driver starts one logging actor per trial, and on 2 cores that
# delayed acknowledgements past 5 s, so a live member was dropped, rejoined alone and trained unfused from then on.
# Tune's own ends reach the servers at once (CohortLeaves); the grace only bounds a lost message.
LEAVE_GRACE_S = 30.0
STOP_TIMEOUT_S = 10.0  # at the sweep's end, how long the servers have to tell their cohorts and clear up

def checkpoint_epoch(files: Files | None) -> int:
    """Epochs a packed ``fit`` checkpoint has done (0 without one): members resuming together start there."""
    if not files:
        return 0
    import torch

    from medsweep.trainables.loop import CHECKPOINT_FILE

    return int(torch.load(io.BytesIO(files[CHECKPOINT_FILE]), map_location="cpu", weights_only=False)["state"].epoch)


@dataclass
class _Member:
    """A member as its server sees it: what it was given, what it published, what its client took."""

    config: dict[str, Any]
    group: Group
    checkpoint: Path | None
    results: list[tuple[dict[str, Any], Files | None]] = field(default_factory=list)
    fetched: int = 0  # results handed to the client
    acked: int = 0  # results the client reported and came back after
    published_at: float = 0.0
    state: str = "waiting"  # waiting, running, done, left, error
    dropped: bool = False  # left because its result went unacknowledged past the grace, not because Tune ended it
    error: str = ""


class _ServerIO(StoreBatches):
    """The :class:`~medsweep.trainables.cohort.CohortIO` of one cohort: shared batches, per-member reports."""

    def __init__(self, server: CohortServer, data: StoreData, seed: int, trial_ids: list[str]) -> None:
        super().__init__(data, seed)
        self.server, self.trial_ids = server, trial_ids

    def report(self, member: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.server.publish(self.trial_ids[member], metrics, pack(checkpoint_dir) if checkpoint_dir else None)

    def wanted(self, member: int) -> bool:
        return self.server.wanted(self.trial_ids[member])

    def latest_checkpoint(self, member: int) -> Path | None:
        return self.server.members[self.trial_ids[member]].checkpoint


class CohortServer:
    """A Ray actor (threaded) that trains cohorts of members one after another on one trial's resources."""

    def __init__(self, stores: str, sizes: dict[str, int], cpus: float) -> None:
        """``stores``: the name of the sweep's :class:`~medsweep.search.router.CohortRegistry`, which hands this
        server the stores at every start, restarts included."""
        import torch

        from medsweep.trainables import cohort  # the model code: only a server's own process loads it

        torch.set_num_threads(max(1, int(cpus)))
        self.engine = cohort
        self.stores: dict[str, StoreData] = ray.get(ray.get_actor(stores).stores.remote())
        self.sizes = sizes
        self.members: dict[str, _Member] = {}
        self.queue: list[str] = []  # joined, not yet in a cohort, in arrival order
        self.last_join: dict[Group, float] = {}  # per group: when its latest member joined
        self.ran: list[dict[str, Any]] = []  # one entry per cohort started: method, start epoch, trial ids
        self.changed = threading.Condition()
        self.scratch = Path(tempfile.mkdtemp(prefix="medsweep-cohort-"))
        threading.Thread(target=self._serve, daemon=True, name="cohort-server").start()

    # -- called by the router and the clients --------------------------------------
    def group(self, config: dict[str, Any], checkpoint: Files | None) -> Group:
        """A joining member's group, for the router (which loads no model code): its cohort key and the
        epoch its checkpoint resumes from."""
        return self.engine.cohort_key(config), checkpoint_epoch(checkpoint)

    def join(self, trial_id: str, group: Group, config: dict[str, Any], checkpoint: Files | None) -> None:
        """Queue the member for a cohort of its group. A repeated join of a member still waiting in that group
        changes nothing: the router's calls are retried after it restarts, so a join may arrive twice."""
        with self.changed:
            known = self.members.get(trial_id)
            if known is not None and known.state == "waiting" and known.group == group:
                return
        folder = unpack(checkpoint, self.scratch / f"restore-{trial_id}-{group[1]}") if checkpoint else None
        with self.changed:
            self.members[trial_id] = _Member(config, group, folder)
            self.queue.append(trial_id)
            self.last_join[group] = time.monotonic()
            self.changed.notify_all()

    def status(self) -> dict[str, Any]:
        """Members waiting per group (the routing view) and whether a cohort is running."""
        with self.changed:
            waiting: dict[Group, int] = {}
            for trial_id in self.queue:
                group = self.members[trial_id].group
                waiting[group] = waiting.get(group, 0) + 1
            running = sum(m.state == "running" for m in self.members.values())
            return {"waiting": list(waiting.items()), "running": running}

    def next(self, trial_id: str, acked: int, timeout: float) -> tuple[str, dict[str, Any] | None, Files | None]:
        """The member's next result: ("result", metrics, checkpoint), or ("wait" | "done" | "left" | "error" | "unknown", ...).

        ``acked``: results the client has reported so far (each one returned from ``ray.tune.report``)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            member = self.members.get(trial_id)
            if member is None:
                return "unknown", None, None
            if acked > member.acked:
                member.acked = acked
                self.changed.notify_all()
            while member.fetched >= len(member.results) and member.state in ("waiting", "running"):
                if not self.changed.wait(deadline - time.monotonic()):
                    return "wait", None, None
            if member.fetched < len(member.results):
                metrics, files = member.results[member.fetched]
                member.results[member.fetched] = (metrics, None)  # the client holds it now
                member.fetched += 1
                return "result", metrics, files
            return member.state, {"error": member.error} if member.error else None, None

    def leave(self, trial_id: str) -> None:
        """Tune ended the member's trial (ASHA's stop, the time budget): it leaves its cohort or queue now."""
        with self.changed:
            member = self.members.get(trial_id)
            if member is None or member.state not in ("waiting", "running"):
                return
            if member.state == "waiting":
                self.queue.remove(trial_id)
                if member.checkpoint is not None:
                    shutil.rmtree(member.checkpoint, ignore_errors=True)
            member.state = "left"
            self.changed.notify_all()

    def cohorts(self) -> list[dict[str, Any]]:
        """The cohorts this server started (since its last restart), with the members that left each early
        (``dropped``: those of them that left by the grace, unacknowledged, rather than told by Tune)."""
        with self.changed:
            return [
                {
                    **cohort,
                    "left": [t for t in cohort["trials"] if self.members[t].state == "left"],
                    "dropped": [t for t in cohort["trials"] if self.members[t].dropped],
                }
                for cohort in self.ran
            ]

    def close(self) -> None:
        """Remove this server's scratch folder: the sweep is over (``ray.kill`` runs no cleanup of its own)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- called by the cohort's IO, in the training thread ----------------------------
    def publish(self, trial_id: str, metrics: dict[str, Any], checkpoint: Files | None) -> None:
        with self.changed:
            member = self.members[trial_id]
            member.results.append((metrics, checkpoint))
            member.published_at = time.monotonic()
            if member.state == "running" and is_last_result(member.config, metrics):
                # Ended now, not when the whole cohort's epoch is over: Tune may end the trial on this result (ASHA
                # stops a trial at max_t) before the cohort's other members have reported, and that is no leave.
                member.state = "done"
            self.changed.notify_all()

    def wanted(self, trial_id: str) -> bool:
        """Whether the member's client took and acknowledged its last result (waiting up to the grace period)."""
        with self.changed:
            member = self.members[trial_id]
            deadline = member.published_at + LEAVE_GRACE_S
            while member.state == "running" and member.acked < len(member.results):
                if not self.changed.wait(deadline - time.monotonic()):
                    member.state, member.dropped = "left", True
                    self.changed.notify_all()
            return member.state == "running"

    # -- the training thread --------------------------------------------------------
    def _serve(self) -> None:
        while True:
            trial_ids = self._next_cohort()
            members = [self.members[t] for t in trial_ids]
            configs = [m.config for m in members]
            root = self.scratch / f"cohort-{len(self.ran)}"
            io = _ServerIO(self, self.stores[configs[0]["store_key"]], int(configs[0].get("seed", 0)), trial_ids)
            try:
                self.engine.fit_cohort(configs, io, root)
                outcome, error = "done", ""
            except Exception as failure:  # noqa: BLE001 - any failure ends the cohort: its clients raise it, Tune restarts them
                outcome, error = "error", f"{type(failure).__name__}: {failure}"
            shutil.rmtree(root, ignore_errors=True)
            with self.changed:
                for member in members:
                    if member.state == "running":
                        member.state, member.error = outcome, error
                    if member.checkpoint is not None:
                        shutil.rmtree(member.checkpoint, ignore_errors=True)
                self.changed.notify_all()

    def _next_cohort(self) -> list[str]:
        """Take the oldest waiting group that is full or has had no new member for :data:`FORM_WAIT_S`
        (counted per group: members of other groups still arriving, as on a busy start, hold no group back);
        wait for one."""
        with self.changed:
            while True:
                now, wait = time.monotonic(), None
                for group in dict.fromkeys(self.members[t].group for t in self.queue):  # oldest first
                    ready = [t for t in self.queue if self.members[t].group == group]
                    size = self.sizes.get(self.members[ready[0]].config["method"], 1)
                    quiet = now - self.last_join[group]
                    if len(ready) >= size or quiet >= FORM_WAIT_S:
                        taken = ready[:size]
                        self.queue = [t for t in self.queue if t not in taken]
                        for trial_id in taken:
                            self.members[trial_id].state = "running"
                        self.ran.append({"method": group[0][0], "start_epoch": group[1], "trials": taken})
                        return taken
                    wait = min(wait if wait is not None else FORM_WAIT_S, FORM_WAIT_S - quiet)
                self.changed.wait(wait)  # None (nothing queued): until a member joins


def spread(sizes: dict[str, int], trials: int | None, servers: int) -> dict[str, int]:
    """Cohort sizes no larger than a server's share of the sweep's trials, so every server trains.

    With pinned runs (:mod:`medsweep.search.cohort_pins`) K trials fill one cohort: 8 trials at K = 8 made one
    cohort of 8 on one server while the other idled (measured at the paper's scale on 2 cores: its 3 epochs
    took as long as the 8 trials alone on both cores). At K = 4 they train as two cohorts side by side.
    A sweep bounded by time (no trial count) keeps ``sizes``."""
    if trials is None or servers < 1:
        return sizes
    share = math.ceil(trials / servers)
    return {method: min(size, share) for method, size in sizes.items()}


def slot_split(cpus_per_trial: float, size: int) -> tuple[float, float]:
    """A trial slot's CPUs split into (server, each of ``size`` clients): the clients' share is taken
    from the slot, so servers and their members fit where the slots' trials did (else servers holding
    every CPU would leave no room to place a single client). :data:`CLIENT_CPUS` each, less for tiny slots."""
    client = min(CLIENT_CPUS, cpus_per_trial / (2 * size))
    return cpus_per_trial - size * client, client


def fused_methods(settings: SweepSettings, stores: dict[str, StoreData], store_keys: dict[str, str]) -> list[str]:
    """The sweep's methods whose trials a server may fuse: preloadable, with their features in their store."""
    from medsweep.trainables.cohort import fusable

    fused = []
    for method in settings.methods:
        config = {"method": method, "backbone": settings.backbone, "image_size": settings.image_size}
        if fusable(config, stores[store_keys[method]].columns):
            fused.append(method)
    return fused


@contextmanager
def cohort_servers(
    settings: SweepSettings, stores: dict[str, StoreData], sizes: dict[str, int], slots: int, gpus: float
) -> Iterator[Cohorts | None]:
    """Start the cohort servers for ``sizes`` (fused method -> cohort size) before the search, stop them after.

    None (no servers; every trial runs alone) when no method fuses with more than one member (after
    :func:`spread` caps the sizes at a server's share of ``--trials``).
    One server per concurrent slot when every method of the sweep fuses; half the slots
    otherwise, so trials that run alone keep slots of their own. Each server reserves
    ``--cpus-per-trial`` less its clients' share (:func:`slot_split`) and ``gpus`` (the largest GPU
    fraction of the fused methods).
    At the end the cohorts the servers ran are added to ``<out>/ray/cohorts.json`` and kept as ``Cohorts.ran``.
    """
    sizes = {method: size for method, size in sizes.items() if size > 1}
    count = slots if set(sizes) == set(settings.methods) else slots // 2
    sizes = {method: size for method, size in spread(sizes, settings.trials, count).items() if size > 1}
    if not sizes or count < 1:
        yield None
        return
    server_cpus, client_cpus = slot_split(settings.cpus_per_trial, max(sizes.values()))
    # Threaded (max_concurrency): clients' long polls wait beside the training thread.
    server = ray.remote(CohortServer).options(max_restarts=-1, max_concurrency=64, num_cpus=server_cpus, num_gpus=gpus)
    registry_name = router_name(settings.out) + "-registry"
    # The registry and the router live on the driver's node: a worker node that dies takes neither with it (the
    # registry is never restarted, and a restarted router, or server, fetches what it needs from it). Found by the
    # node-loss test: a registry on the removed node left a restarted router unable to start, and every member's
    # join failed. The router still restarts after a crash of its own process, and its calls made meanwhile wait
    # for it (max_task_retries). Server calls fail at once instead (no retries): a server whose node died may not
    # find room to restart, and its members' trials then restart and join the live servers.
    on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    registry: Any = ray.remote(CohortRegistry).options(name=registry_name, num_cpus=0, scheduling_strategy=on_driver_node).remote(stores)
    servers: list[Any] = [server.remote(registry_name, sizes, settings.cpus_per_trial) for _ in range(count)]
    ray.get(registry.add_servers.remote(servers))
    router: Any = (
        ray.remote(CohortRouter)
        .options(name=router_name(settings.out), max_restarts=-1, max_task_retries=-1, num_cpus=0, scheduling_strategy=on_driver_node)
        .remote(registry_name, sizes)
    )
    cohorts = Cohorts(router, servers, sizes, client_cpus)
    try:
        yield cohorts
    finally:
        ran = _stop(servers)
        ray.kill(router)
        ray.kill(registry)
        _record(Path(settings.out) / RAY_DIR / COHORTS_FILE, ran)
        cohorts.ran = ran


def _stop(servers: list[Any]) -> list[dict[str, Any]]:
    """The cohorts the servers ran; their scratch folders removed, the servers killed. All are asked at once and
    given :data:`STOP_TIMEOUT_S`: a live server answers at once, and one restarting (or waiting for a node with
    room to restart on, its own gone) has nothing to tell. One by one, a server that could not restart held the
    end of the sweep for 30 s."""
    asked = [handle.cohorts.remote() for handle in servers]
    answered, _ = ray.wait(asked, num_returns=len(asked), timeout=STOP_TIMEOUT_S)
    ran: list[dict[str, Any]] = []
    closing = []
    for handle, reply in zip(servers, asked, strict=True):
        if reply in answered:
            with suppress(RayActorError):
                ran.extend(ray.get(reply))
                closing.append(handle.close.remote())
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=STOP_TIMEOUT_S)
    for handle in servers:
        ray.kill(handle)
    return ran


def _record(path: Path, ran: list[dict[str, Any]]) -> None:
    """Append the cohorts of this run (a resumed sweep adds to the file)."""
    earlier = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(earlier + ran, indent=2))
