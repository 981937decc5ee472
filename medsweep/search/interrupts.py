"""Ctrl-C (SIGINT) and SIGTERM during a sweep: stop it resumable, with no answer written.

Left to itself, Ray Tune catches SIGINT inside ``Tuner.fit()``, saves its
experiment and returns normally: the sweep could not tell an interrupted
search from a finished one, wrote a leaderboard of half-run trials and
marked the study's running trials FAIL, after which ``medsweep resume``
failed on Optuna's ``UpdateFinishedTrialError``. SIGTERM (what a scheduler
sends) went to Ray's driver handler, which exits at once.

:class:`InterruptGuard` owns both signals for the whole sweep instead. It
records the first signal; while the Tuner runs it hands that signal to
Tune's graceful stop (the SIGUSR1 handler Tune installs for exactly that),
which stops the trials and snapshots the experiment and the searcher
(Optuna trials of unfinished Tune trials stay RUNNING in the study and are
told their values when ``medsweep resume`` finishes them); when ``fit``
returns, the guard raises :class:`SweepInterrupted` so no answer is
written. Outside the Tuner (preload, Ray start, export), and for a second
signal, it raises at once: what is saved is what a killed driver leaves,
and ``medsweep resume`` handles that too.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from medsweep.search.lock import SweepLock, acquire
from medsweep.search.study import SETTINGS_FILE

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What Tune logs on its graceful stop, the guard's one line replaces: warnings (the stop, Tune's own restore
# API, unfetched metrics of unstarted trials), silenced by raising the level, and this one error.
_TUNE_LOGGER = "ray.tune"
_TUNE_STOP_ERROR = "Trials did not complete"
LOCAL_RAY_EXIT_S = 0.3  # how long a signal's handler watches the local Ray's processes (see _local_ray_stopping)


class SweepInterrupted(KeyboardInterrupt):
    """A signal ended the sweep in ``out``; a KeyboardInterrupt so that ``except Exception`` in
    libraries does not swallow it. The CLI prints it as one line and exits with :attr:`exit_code`."""

    def __init__(self, signum: int, out: Path, ray_lost: bool = False) -> None:
        """``ray_lost``: the signal also stopped the Ray this process started (:func:`_local_ray_stopping`): the
        CLI then leaves without Ray's own shutdown, which waits 60 s on the lost GCS and ends in an error."""
        super().__init__(signum, out)
        self.signum = signum
        self.out = Path(out)
        self.ray_lost = ray_lost

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum

    def __str__(self) -> str:
        if not (self.out / SETTINGS_FILE).is_file():
            return "interrupted before the sweep started; nothing to resume"
        return f"interrupted: `medsweep resume {shlex.quote(str(self.out))}` continues"


class InterruptGuard:
    """Handles SIGINT and SIGTERM for one sweep; see the module docstring."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._tune_before: Any = None
        self._in_tune = False
        self._lock: SweepLock | None = None
        self.ray_lost = False  # the signal reached the local Ray's processes too

    def lock_out(self) -> None:
        """Hold the sweep folder's lock (:mod:`medsweep.search.lock`) until the guard exits: a second
        driver on the same folder (``extend``, ``resume``) is refused while this one runs."""
        self._lock = acquire(self.out)

    def __enter__(self) -> InterruptGuard:
        self._saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune must not take SIGINT from the guard
        self.install()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        """Restore the handlers; a plain KeyboardInterrupt becomes :class:`SweepInterrupted`: Ray
        re-raises a signal handler's exception met in a blocking ``ray.get`` as a new KeyboardInterrupt."""
        self._restore()
        if self._lock is not None:
            self._lock.release()
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, SweepInterrupted):
            raise SweepInterrupted(self.signum or signal.SIGINT, self.out, self.ray_lost) from None

    def _restore(self) -> None:
        if self._saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._saved_env
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def install(self) -> None:
        """(Re)take both signals: ``ray.init`` replaces any SIGTERM handler with its own exit."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set there; a sweep run from a thread keeps the defaults
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    @contextmanager
    def tune_stops_gracefully(self) -> Iterator[None]:
        """Around the Tuner: a first signal stops Tune gracefully; raises once ``fit`` has returned."""
        from medsweep.search.console import dropping  # rich: not for `medsweep --help`, which imports this module

        self._tune_before, self._in_tune = signal.getsignal(signal.SIGUSR1), True
        tune_logger = logging.getLogger(_TUNE_LOGGER)
        level = tune_logger.level
        try:
            with dropping(logging.getLogger(f"{_TUNE_LOGGER}.tune"), _TUNE_STOP_ERROR):
                yield
        finally:
            self._in_tune = False
            tune_logger.setLevel(level)
        self.raise_if_interrupted()

    def raise_if_interrupted(self) -> None:
        if self.signum is not None:
            raise SweepInterrupted(self.signum, self.out, self.ray_lost)

    def _tune_stop(self) -> Any:
        """Tune's graceful-stop handler, if a running ``fit`` has installed it (else None)."""
        handler = signal.getsignal(signal.SIGUSR1)
        if self._in_tune and callable(handler) and handler is not self._tune_before:
            return handler
        return None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            # Ray shields its own processes from SIGINT (a terminal's Ctrl-C reaches the whole group), not from SIGTERM.
            self.ray_lost = signum != signal.SIGINT and _local_ray_stopping()
        stop = self._tune_stop()
        if first and stop is not None and not self.ray_lost:
            logging.getLogger(_TUNE_LOGGER).setLevel(logging.ERROR)
            stop(signum, frame)
            return
        assert self.signum is not None  # set above by the first signal
        raise SweepInterrupted(self.signum, self.out, self.ray_lost)


def _local_ray_stopping(within_s: float = LOCAL_RAY_EXIT_S) -> bool:
    """Whether the Ray this process started is going down with it: some of its processes exit within ``within_s``.

    A SIGTERM sent to the driver's whole process group (``timeout``, SLURM's ``scancel``, systemd's stop) reaches
    Ray's own processes too (Ray shields them from SIGINT only): Tune's graceful stop would then wait on a
    GCS that is going away, and Ray ends the driver after 60 s with an error (seen: exit 1, no resumable line).
    Such a sweep is stopped at once instead, as by a second signal; ``medsweep resume`` continues it from Tune's
    last snapshot, as after a killed driver. Ray's dashboard and log monitor exit within ~25 ms of a SIGTERM."""
    node = getattr(sys.modules.get("ray._private.worker"), "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return False  # a Ray this process joined: its processes are not ours to watch
    processes = [info.process for infos in node.all_processes.values() for info in infos if info.process is not None]
    deadline = time.monotonic() + within_s
    while True:
        if any(process.poll() is not None for process in processes):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
