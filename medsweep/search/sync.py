"""``medsweep sync DIR``: upload a sweep's offline W&B runs once a network and an API key are at hand.

Trials log to W&B offline unless a key is set (``--wandb auto``), so a sweep
on an air-gapped cluster leaves ``<out>/wandb/offline-run-*``; this runs
``wandb sync`` on them. Two ways it could hang are cut short: without an API
key ``wandb sync`` would ask for one, so the key is checked first; and with a
key but no route to the server it retries for ever (measured with wandb 0.31
against a closed port), so it runs under a timeout in its own process group,
which is killed whole when the time is up. The offline files are kept either
way, so a failed sync can simply be run again.
"""

from __future__ import annotations

import argparse
import netrc
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from medsweep.errors import ConfigError, MedsweepError
from medsweep.search.study import WANDB_DIR

DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_TIMEOUT_S = 600


def offline_runs(out: Path) -> list[Path]:
    """The sweep's W&B run folders written in offline mode, oldest first."""
    return sorted((Path(out) / WANDB_DIR).glob("offline-run-*"))


def wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname or ""


def has_api_key() -> bool:
    """A key in ``WANDB_API_KEY`` or where ``wandb login`` stores it (the netrc entry of the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def sync_runs(out: Path, timeout_s: float) -> str:
    """Upload every offline run of the sweep in ``out``; returns what ``wandb sync`` printed."""
    if timeout_s <= 0:
        raise ConfigError(f"--timeout must be more than 0 seconds, got {timeout_s:g}")
    runs = offline_runs(out)
    if not runs:
        raise ConfigError(f"{out} has no offline W&B runs under wandb/; pass the --out folder of a sweep run with --wandb offline or auto")
    if not has_api_key():
        raise ConfigError("no W&B API key: set WANDB_API_KEY (or run `wandb login`) and run `medsweep sync` again")
    command = [sys.executable, "-m", "wandb", "sync", "--no-include-synced", *map(str, runs)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise MedsweepError(
            f"wandb sync did not finish in {timeout_s:g} s (is {wandb_host()} reachable?); "
            f"the offline runs stay in {Path(out) / 'wandb'}: run `medsweep sync` again, or raise --timeout"
        ) from None
    if proc.returncode != 0:
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
        raise MedsweepError(f"wandb sync failed with exit code {proc.returncode}: {last.strip()}")
    return output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``medsweep sync DIR [--timeout S]``."""
    parser = subparsers.add_parser("sync", help="upload a sweep's offline W&B runs (needs WANDB_API_KEY and a network)")
    parser.add_argument("dir", type=Path, help="the sweep's output folder")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="give up after this many seconds")


def run(args: argparse.Namespace) -> int:
    output = sync_runs(args.dir, args.timeout)
    print(output, end="")
    print(f"synced {len(offline_runs(args.dir))} offline W&B run(s) of {args.dir}")
    return 0
