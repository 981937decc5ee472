"""One driver per sweep folder: an exclusive lock on ``<out>/sweep.lock`` while a sweep, a resume or an extension runs.

``medsweep extend`` (and ``medsweep resume``) on a folder whose sweep is still
running would add a second searcher to the same study and a second writer to
its leaderboard. The lock is an ``flock`` held on an open file for as long as
the driver lives: the kernel drops it when the process ends, however it ends
(a SIGKILLed driver leaves no stale lock for ``resume`` to clear), and the
file itself stays, empty but for the holder's pid, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from medsweep.errors import ConfigError
from medsweep.search.study import LOCK_FILE


class SweepLock:
    """The held lock of one sweep folder; :meth:`release` (or the process's end) frees it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def acquire(out: Path) -> SweepLock:
    """Take ``out``'s lock, or raise a one-line :class:`ConfigError` if a live process holds it."""
    path = Path(out) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"a sweep is still running in {out} (process {holder}); wait for it to end, or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return SweepLock(fd)
