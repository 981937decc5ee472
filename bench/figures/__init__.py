"""One module per figure of the issue; each has ``NAME``, ``TITLE``, ``run(ctx)`` and ``render(result)``.

``FIGURES`` is the order they run in (figures that share a sweep run next to
each other) and ``REPORT_ORDER`` the order BENCHMARKS.md lists them in (the
issue's numbering).
"""

from __future__ import annotations

from bench.figures import cohort_paper, cohort_step, cohort_sweep, datapath, floor, frozen, memory, overhead, packing, precision, preload, scaling, search

FIGURES = {
    m.NAME: m for m in (floor, cohort_sweep, overhead, search, datapath, preload, scaling, memory, packing, frozen, precision, cohort_step, cohort_paper)
}
REPORT_ORDER = (
    "floor",
    "preload",
    "overhead",
    "memory",
    "packing",
    "search",
    "datapath",
    "scaling",
    "frozen",
    "precision",
    "cohort_step",
    "cohort_sweep",
    "cohort_paper",
)
