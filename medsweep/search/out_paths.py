"""A command's ``--out``: refused before any work when it cannot be made, one line when writing it fails.

A sweep, an export or a prediction run writes its output last, after minutes
to hours of work; an ``--out`` under a file or in a folder without write
permission is known at once, so it is refused before anything starts. The
file system may still refuse what permissions allow (``/proc``, a read-only
mount, a full disk; root passes every permission check): :func:`write_error`
turns that into the one line the CLI prints.
"""

from __future__ import annotations

import os
from pathlib import Path

from medsweep.errors import ConfigError


def check_out_path(path: Path, flag: str = "--out", folder: bool = True) -> None:
    """Refuse an output ``path`` (a folder, or with ``folder=False`` a file) that cannot be created or written."""
    path = Path(path)
    absolute = path.absolute()
    if folder and absolute.is_file():
        raise ConfigError(f"{flag} {path} is a file, not a folder; pass a new or empty folder")
    if not folder and absolute.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; pass the name of the file to write")
    # The folder that must take the new entries: the nearest that exists (a file is replaced in its own folder).
    existing = next(parent for parent in (absolute if folder else absolute.parent, *absolute.parents) if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {existing} is a file, not a folder; pass another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "gives you no write permission"
        raise ConfigError(f"{flag} {path} cannot be written: {existing} {why}; pass a path you can write to")


def write_error(error: OSError, path: Path, flag: str = "--out") -> ConfigError:
    """The one line for an OS error while writing ``path``: what the system said, and the fix."""
    return ConfigError(f"cannot write {flag} {path} ({error.strerror or error}); pass a path you can write to, with free space")
