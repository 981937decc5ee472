"""``medsweep dashboard DIR``: browse a sweep's Optuna study in optuna-dashboard, during or after the sweep.

The searcher writes every trial (its parameters, each epoch's ``best_val_auc`` as
an intermediate value, the final value or FAIL) to the journal file
``<out>/optuna-study.log``; optuna-dashboard reads the same file, so the
dashboard needs no database, and it follows a running sweep as trials come
in (the journal is append-only and read under its lock). The server is bound
to 127.0.0.1 unless told otherwise: a dashboard can edit a study's notes.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from medsweep.errors import ConfigError, MedsweepError
from medsweep.search.study import STUDY_FILE, study_storage


def sweep_storage(out: Path):
    """The sweep's study storage; a folder without a study is bad input."""
    if not (Path(out) / STUDY_FILE).is_file():
        raise ConfigError(f"{out} has no {STUDY_FILE}; pass the --out folder of a sweep (the study is written once its search starts)")
    return study_storage(out)


def dashboard_url(host: str, port: int) -> str:
    """The address to open; a server on every address (0.0.0.0) is opened by this machine's name, not 0.0.0.0."""
    return f"http://{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}/dashboard"


def serve(out: Path, host: str, port: int) -> None:
    """Serve optuna-dashboard on the sweep's study until interrupted."""
    storage = sweep_storage(out)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ConfigError("optuna-dashboard is not installed; install it with `pip install 'medsweep[dashboard]'`") from None
    print(f"optuna-dashboard of {out}: {dashboard_url(host, port)} (Ctrl-C stops it)", flush=True)
    try:
        run_server(storage, host=host, port=port)
    except OSError as error:
        raise MedsweepError(f"cannot serve on {host}:{port} ({error.strerror or error}); pick another --port") from None


def port_number(text: str) -> int:
    """An ``--port`` value: a TCP port a server can listen on (0, "any free port", would leave the printed URL wrong)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``medsweep dashboard DIR [--port 8080] [--host 127.0.0.1]``."""
    parser = subparsers.add_parser("dashboard", help="browse a sweep's Optuna study in optuna-dashboard")
    parser.add_argument("dir", type=Path, help="the sweep's output folder")
    parser.add_argument("--port", type=port_number, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")


def run(args: argparse.Namespace) -> int:
    serve(args.dir, args.host, args.port)
    return 0
