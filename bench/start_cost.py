"""What starting K Tune trials costs on this Ray, apart from medsweep (figure 11's bound on CPUs).

This module imports nothing but the standard library at import time: each Tune
trial's process imports the module of its function (:func:`_report_time`), and
the measurement is of Tune's own start, not of what a figure module imports.
"""

from __future__ import annotations

import os
import time
from typing import Any
from unittest import mock

STARTED = 16  # trivial trials and actors started at once (figure 1's trial count)


def _report_time(config: dict[str, Any]) -> None:
    """A trial that does nothing but report when it began."""
    from ray import tune

    tune.report({"began": time.time()})


def start_cost(ctx, paced: int, count: int = STARTED) -> dict[str, float]:
    """Seconds from asking to the first and last of ``count`` trivial Tune trials (one slot each: 0.01 CPU)
    reporting, started all at once (Tune's default for a grid) and ``paced`` at a time (at most that many
    pending, as a sweep starts its members: one per trial slot, ``trials_pending_at_once``); and to the last of
    ``count`` plain actors of 0.01 CPU running ``__init__``, on the sweeps' Ray."""
    import ray
    from ray import tune

    from medsweep.search.tuning import PENDING_TRIALS_ENV

    ctx.ray()

    @ray.remote(num_cpus=0.01)
    class Began:
        def __init__(self) -> None:
            self.began = time.time()

        def when(self) -> float:
            return self.began

    asked = time.time()
    actors = [Began.remote() for _ in range(count)]
    actors_s = max(ray.get([actor.when.remote() for actor in actors])) - asked
    for actor in actors:
        ray.kill(actor)
    cost = {"actors_s": actors_s, "count": count, "paced": paced}
    for name, pending in (("tune", None), ("paced", paced)):
        env = {} if pending is None else {PENDING_TRIALS_ENV: str(pending)}
        with mock.patch.dict(os.environ, env):
            asked = time.time()
            grid = tune.Tuner(
                tune.with_resources(_report_time, tune.PlacementGroupFactory([{"CPU": 0.01}])),
                param_space={"index": tune.grid_search(list(range(count)))},
                tune_config=tune.TuneConfig(max_concurrent_trials=count),
                run_config=tune.RunConfig(storage_path=str(ctx.work / "start-cost"), name=f"start-{time.time_ns()}", verbose=0),
            ).fit()
        began = sorted(result.metrics["began"] for result in grid)
        cost |= {f"{name}_first_s": began[0] - asked, f"{name}_last_s": began[-1] - asked}
    return cost
