"""Build BENCHMARKS.md from ``bench/results/*.json``: ``python -m bench.report [--out FILE]``.

Nothing here measures: every number comes from the JSON a run wrote, so the
markdown can be rebuilt (or restyled) without running anything again.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from bench.common import table
from bench.context import MODES, RESULTS, load_json
from bench.figures import FIGURES, REPORT_ORDER

HEADER = """# Benchmarks

medsweep's performance goals, measured side by side by `python -m bench.run` (the bench/ package;
`--quick` for a smoke run of every figure, `--only NAME,...` for some). Every number below was written
by a run into `bench/results/MODE/*.json`; `python -m bench.report` rebuilds this file from them, each
figure from the full run where there is one. Each figure says which command and mode produced it: a
figure from `--quick` is a smaller setting than the issue asks for and is labelled so.
"""


def _machine(runs: list[dict[str, Any]]) -> str:
    lines = ["## Machine", ""]
    for run in runs:
        m = run["machine"]
        ray = (
            f"Ray started once (`ray.init(num_cpus=2)`) in {run['ray_start_s']:.1f} s"
            if run["ray_start_s"] is not None
            else "no Ray"
        )
        lines.append(
            f"- `{run['command']}` ({run['mode']}, finished {run['finished']}, {run['seconds'] / 60:.1f} min): "
            f"{m['nproc']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, GPU: {m['cuda'] or 'none'}, "
            f"torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}; load average "
            f"{m['loadavg'][0]:.1f} at the start, {run['loadavg_end'][0]:.1f} at the end; {ray}."
        )
    lines += [
        "",
        "The machine is shared with other jobs (load averages above 2 mean the 2 cores were oversubscribed):",
        "absolute seconds are noisy, so each figure compares numbers taken side by side in one run.",
    ]
    return "\n".join(lines)


def _section(module, result: dict[str, Any]) -> str:
    doc = inspect.getdoc(module).split("\n", 1)
    what = doc[1].strip() if len(doc) > 1 else doc[0]
    meta = (
        f"*Command:* `{result['command']}` ({result['mode']} mode, {result['finished']}, took "
        f"{result['seconds']:.0f} s, load average {result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f}). "
        f"*Status:* **{result['status']}**."
    )
    if result["status"] == "ERROR":
        body = "The run failed:\n\n```\n" + result["data"]["traceback"].strip() + "\n```"
    else:
        body = module.render(result)
    return "\n\n".join([f"## {module.TITLE}", f"*What it measures.* {what}", meta, body])


def _summary(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name in REPORT_ORDER:
        if name not in results:
            continue
        module, result = FIGURES[name], results[name]
        target, measured = module.summary(result) if result["status"] != "ERROR" else ("-", "run failed")
        rows.append((module.TITLE, target, measured, f"**{result['status']}**", result["mode"]))
    return "## Summary\n\n" + table(("figure", "target", "measured", "status", "mode"), rows)


def write_report(out: Path) -> None:
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        for path in sorted((RESULTS / mode).glob("*.json")):
            if path.stem in FIGURES:
                results.setdefault(path.stem, load_json(path))
    runs = [
        load_json(path)
        for mode in MODES
        for path in sorted((RESULTS / mode).glob("run*.json"), key=lambda p: (p.name != "run.json", p.name))
    ]
    parts = [HEADER, _machine(runs), _summary(results)]
    parts += [_section(FIGURES[name], results[name]) for name in REPORT_ORDER if name in results]
    Path(out).write_text("\n\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    write_report(parser.parse_args().out)


if __name__ == "__main__":
    main()
