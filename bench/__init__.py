"""medsweep's performance goals, measured side by side: ``python -m bench.run [--quick]``.

Each figure lives in its own module under :mod:`bench.figures` with a
``run(ctx)`` that measures and returns plain JSON, and a ``render(result)``
that turns that JSON into its BENCHMARKS.md section, so the markdown can be
regenerated from ``bench/results/`` without measuring again
(``python -m bench.report``).
"""
