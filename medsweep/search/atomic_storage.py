"""The sweep's Tune storage: the local filesystem, where every file appears whole or not at all.

Tune writes its experiment snapshot (``experiment_state-*.json``, the searcher's
and the search generator's pickles, the callbacks' states) into a staging folder
under Ray's session directory, then copies that folder to the sweep's
``<out>/ray/tune`` with ``pyarrow.fs.copy_files``, which creates each destination
file and fills it in place. A driver killed (SIGKILL, a lost head node) inside
that copy left empty or truncated files there (seen in ``tests/test_faults.py``:
a zero-byte ``search_gen_state-*.json``). ``Tuner.restore`` then fails to load
the search, logs "Restarting experiment" and runs the whole search again
without the finished trials: ``medsweep resume`` ended with one trial of three.

:func:`atomic_local_filesystem` is the same local filesystem, except that a
file written through it goes to a hidden temporary name beside its target and
is renamed over the target once it is closed, so the old version stays until
the new one is whole. Temporary files are hidden from directory listings, so a
restore (which copies the experiment folder back) never sees one left by a kill.

A whole copy of a torn source is still torn: Tune rewrites ``experiment_state-*.json`` in its
staging folder in place (``open(path, "w")``) at each snapshot, while the copy of the previous
snapshot may still be reading it, so the sweep's folder could hold the start of one snapshot and
the end of the next ("Extra data", or an empty state). :func:`snapshots_wait_for_their_copy` makes
each snapshot wait for the previous copy first; the copy of a few small local files takes
milliseconds, and a snapshot is taken every few seconds at most.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow
import pyarrow.fs

PARTIAL_SUFFIX = ".partial"  # ".<name>.<random>.partial": a file being written (or left by a killed writer)

logger = logging.getLogger(__name__)


def atomic_local_filesystem() -> pyarrow.fs.FileSystem:
    """The local filesystem with whole-file writes, for ``RunConfig(storage_filesystem=...)``."""
    return pyarrow.fs.PyFileSystem(AtomicLocalHandler())


def snapshots_wait_for_their_copy() -> None:
    """Make Tune's experiment snapshot wait until the copy of the previous one to storage has ended.

    Tune starts that copy in a background thread and, at its next snapshot, rewrites the staged files
    in place whether or not the copy is still reading them (``TuneController.save_to_dir`` after
    ``_ExperimentCheckpointManager`` skipped the wait). Waiting on the controller's own syncer first
    keeps writer and reader apart; the copy's failure is logged as Ray logs it where it waits itself.
    Idempotent: the wrapper is installed once per process."""
    from ray.tune.execution.tune_controller import TuneController

    if getattr(TuneController.save_to_dir, "waits_for_the_copy", False):
        return
    TuneController.save_to_dir = _after_the_copy(TuneController.save_to_dir)  # type: ignore[method-assign]


def _after_the_copy(save_to_dir: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(save_to_dir)
    def save_after_the_copy(controller: Any) -> None:
        storage = controller._storage
        try:
            storage.syncer.wait()
        except Exception:
            logger.error("Copying the sweep's snapshot to %s failed:", storage.experiment_fs_path, exc_info=True)
        save_to_dir(controller)

    save_after_the_copy.waits_for_the_copy = True  # type: ignore[attr-defined]
    return save_after_the_copy


def _partial_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")


def _is_partial(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


class _RenameOnClose(io.FileIO):
    """A file opened under a temporary name that takes its target's name when closed."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.partial = _partial_path(target)
        super().__init__(self.partial, "wb")

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.replace(self.partial, self.target)


class AtomicLocalHandler(pyarrow.fs.FileSystemHandler):
    """``pyarrow.fs.LocalFileSystem`` with writes (``open_output_stream``, ``copy_file``) that replace
    their target in one rename, and listings that hide the temporary files of writes in progress."""

    def __init__(self) -> None:
        self.local = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __hash__(self) -> int:
        return hash(AtomicLocalHandler)

    def __reduce__(self) -> tuple:
        return AtomicLocalHandler, ()  # trial actors get the handler with Tune's storage context

    def equals(self, other: Any) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return "atomic-local"

    def normalize_path(self, path: str) -> str:
        return self.local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return [info for info in self.local.get_file_info(selector) if not _is_partial(info.path)]

    def create_dir(self, path: str, recursive: bool) -> None:
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        partial = _partial_path(dest)
        self.local.copy_file(src, partial)
        os.replace(partial, dest)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_RenameOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata: dict | None) -> pyarrow.NativeFile:
        return self.local.open_append_stream(path)
