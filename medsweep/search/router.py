"""The cohort router: one Ray actor that sends each joining member of a fused sweep to a cohort server.

It takes every join in turn (:class:`CohortRouter`): a member goes to a server
already forming a cohort of its group with room left, else to an idle server,
else to the least loaded one, so members of one group meet. A member's group
(its :func:`~medsweep.trainables.cohort.cohort_key` and the epoch its
checkpoint resumes from) is worked out by a server, which has the method code
loaded anyway: this module imports Ray and nothing of torch or the model code,
so the router's process starts in about a second, not the ~8 s of CPU an import
of the model code costs on a small machine while every member of a sweep is
starting beside it (:mod:`medsweep.search.members` is light for the same reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from medsweep.search.members import Files

GROUP_TIMEOUT_S = 120.0  # no server answering a member's group for this long (all restarting): its join fails
# A server that does not answer within this is no candidate for a join now: it is restarting, or waiting for a
# node with room to restart on (its node died, and the live servers hold the CPUs it would need).
ANSWER_TIMEOUT_S = 5.0

Group = tuple[tuple, int]  # (cohort_key, start epoch)


def router_name(out: str | Path) -> str:
    """The name of a sweep's cohort router actor: the same for the sweep's folder in every driver that runs it."""
    return "medsweep-cohorts-" + hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:12]


class CohortRegistry:
    """A Ray actor holding what the sweep's restartable cohort actors need at every start: the stores (for the
    servers) and the servers' handles (for the router).

    Given to a restartable actor's constructor, object references (the stores' materialized blocks) and actor
    handles make Ray log an error line on the user's console at every sweep (such an argument may be gone when
    the actor restarts: ray-project/ray#53727). So the servers and the router fetch them from this registry,
    which is never restarted and whose stores the driver keeps alive for the sweep."""

    def __init__(self, stores: dict[str, Any]) -> None:
        self._stores = stores
        self._servers: list[Any] = []

    def add_servers(self, servers: list[Any]) -> None:
        self._servers = servers

    def stores(self) -> dict[str, Any]:
        return self._stores

    def servers(self) -> list[Any]:
        return self._servers


class CohortRouter:
    """A Ray actor that sends each joining member to a server, one join at a time (see the module docstring)."""

    def __init__(self, registry: str, sizes: dict[str, int]) -> None:
        """``registry``: the name of the sweep's :class:`CohortRegistry`, which hands over the servers at every
        start, restarts included."""
        self.servers: list[Any] = ray.get(ray.get_actor(registry).servers.remote())
        self.sizes = sizes
        self.placed: dict[str, int] = {}  # trial id -> the server it joined last

    def join(self, trial_id: str, config: dict[str, Any], checkpoint: Files | None) -> int:
        """The index of the server the member joined."""
        shared = ray.put(checkpoint)  # sent to two server calls: into the object store once
        group, answered = self._group(config, shared)
        size = self.sizes.get(config["method"], 1)
        asked = [server.status.remote() for server in self.servers]
        answered_in_time, _ = ray.wait(asked, num_returns=len(asked), timeout=ANSWER_TIMEOUT_S)
        states: dict[int, dict[str, Any]] = {}
        for index, reply in enumerate(asked):
            if reply in answered_in_time:  # the others are restarting: no candidates now
                with contextlib.suppress(RayActorError):
                    states[index] = ray.get(reply)
        load = {i: s["running"] + sum(n for _, n in s["waiting"]) for i, s in states.items()}
        forming = [i for i, s in states.items() if any(tuple(g) == group and n < size for g, n in s["waiting"])]
        idle = [i for i in states if load[i] == 0]
        candidates = forming or idle or sorted(states, key=load.__getitem__) or [answered]
        index = candidates[0]
        ray.get(self.servers[index].join.remote(trial_id, group, config, shared))
        self.placed[trial_id] = index
        return index

    def leave(self, trial_id: str) -> None:
        """Tune ended this trial: its member leaves the server it joined (no member of that id: nothing)."""
        index = self.placed.pop(trial_id, None)
        if index is not None:
            # The server died (its members are gone with it) or is restarting (it knows none of them then).
            with contextlib.suppress(RayActorError, GetTimeoutError):
                ray.get(self.servers[index].leave.remote(trial_id), timeout=ANSWER_TIMEOUT_S)

    def _group(self, config: dict[str, Any], checkpoint: ray.ObjectRef) -> tuple[Group, int]:
        """The member's group, from the first server that answers (servers restart after a failure), and that
        server's index."""
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while True:
            for index, server in enumerate(self.servers):
                try:
                    return ray.get(server.group.remote(config, checkpoint), timeout=ANSWER_TIMEOUT_S), index
                except (RayActorError, GetTimeoutError):
                    continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"no cohort server answered within {GROUP_TIMEOUT_S:.0f} s (all restarting)")
            time.sleep(1.0)
