"""Run the benchmarks and write BENCHMARKS.md: ``python -m bench.run [--quick] [--only NAME,...] [--out FILE]``.

Each figure's JSON lands in ``bench/results/MODE/NAME.json`` as soon as it is
measured, so an interrupted run keeps what it finished, ``--only`` can redo one
figure and a quick run never overwrites a full one; the markdown is always
rebuilt from every JSON present (``python -m bench.report`` rebuilds it
without measuring), each figure from its full run where there is one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import traceback
from pathlib import Path

from bench.context import FULL, QUICK, Context, machine_info, save_json
from bench.figures import FIGURES
from bench.report import write_report

DEFAULT_WORK = Path("/tmp/medsweep-bench")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for every figure (< 5 min)")
    parser.add_argument("--only", default="", help=f"comma-separated figures: {', '.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="caches and sweep outputs (not kept in git)")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    unknown = [name for name in args.only if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    return args


def run_figure(ctx: Context, name: str) -> bool:
    """Measure one figure and save its JSON; an error is recorded (and reported) instead of stopping the run."""
    module = FIGURES[name]
    load_before = os.getloadavg()
    start = time.perf_counter()
    print(f"[bench] {name}: {module.TITLE}", flush=True)
    try:
        result = module.run(ctx)
        ok = True
    except Exception:  # noqa: BLE001 - one broken figure must not lose the others
        result = {"status": "ERROR", "data": {"traceback": traceback.format_exc()}}
        ok = False
    result.update(
        {
            "name": name,
            "mode": ctx.plan.name,
            "command": ctx.command,
            "seconds": time.perf_counter() - start,
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        }
    )
    save_json(ctx.results / f"{name}.json", result)
    print(f"[bench] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    ctx = Context(plan, args.work.resolve(), command=" ".join(["python -m bench.run", *argv]))
    ctx.work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    start = time.perf_counter()
    names = args.only or list(FIGURES)
    ok = all([run_figure(ctx, name) for name in names])
    # A run of some figures (--only) gets its own record, so the record of the run that measured the rest stays.
    record = "run.json" if not args.only else f"run-{'-'.join(names)}.json"
    save_json(
        ctx.results / record,
        {
            "command": ctx.command,
            "mode": plan.name,
            "figures": names,
            "machine": machine,
            "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - start,
            "ray_start_s": ctx.ray_start_seconds,
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
        },
    )
    if ctx.ray_start_seconds is not None:
        import ray

        ray.shutdown()
    write_report(args.out)
    print(f"[bench] wrote {args.out} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
