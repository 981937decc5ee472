"""The sweep's Tune storage writes whole files: a writer killed mid-file leaves the old file as it was."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pyarrow
import pyarrow.fs
import ray.cloudpickle
from ray import tune

from medsweep.search.atomic_storage import AtomicLocalHandler, _RenameOnClose, atomic_local_filesystem, snapshots_wait_for_their_copy

# A writer that copies a large snapshot over the old one through the storage, says so half-way, and waits.
_KILLED_WRITER = """
import sys, time
from medsweep.search.atomic_storage import atomic_local_filesystem
stream = atomic_local_filesystem().open_output_stream(sys.argv[1])
stream.write(b"new" * 100_000)
print("half-written", flush=True)
time.sleep(60)
"""


def _listed(storage: pyarrow.fs.FileSystem, folder: Path) -> list[str]:
    return sorted(Path(info.path).name for info in storage.get_file_info(pyarrow.fs.FileSelector(str(folder), recursive=True)))


def test_a_writer_killed_mid_file_leaves_the_old_file_whole_and_no_visible_leftover(tmp_path):
    target = tmp_path / "search_gen_state-1.json"
    target.write_bytes(b"old snapshot")
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "half-written"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL

    assert target.read_bytes() == b"old snapshot"
    assert len(list(tmp_path.iterdir())) == 2  # the killed writer's temporary file is on disk ...
    assert _listed(atomic_local_filesystem(), tmp_path) == [target.name]  # ... and hidden from listings and restores


def test_tunes_copy_replaces_each_file_only_once_it_is_whole(tmp_path):
    staging, storage_dir = tmp_path / "staging", tmp_path / "storage"
    (staging / "trial-1").mkdir(parents=True)
    (staging / "experiment_state-1.json").write_text('{"trials": 2}')
    (staging / "trial-1" / "result.json").write_text('{"epoch": 2}')
    storage_dir.mkdir()
    (storage_dir / "experiment_state-1.json").write_text('{"trials": 1}')
    storage = atomic_local_filesystem()

    stream = storage.open_output_stream(str(storage_dir / "experiment_state-1.json"))
    stream.write(b'{"tri')
    assert (storage_dir / "experiment_state-1.json").read_text() == '{"trials": 1}'  # unchanged while written
    stream.close()
    assert (storage_dir / "experiment_state-1.json").read_text() == '{"tri'  # replaced when closed

    pyarrow.fs.copy_files(str(staging), str(storage_dir), destination_filesystem=storage)  # how Tune uploads
    assert (storage_dir / "experiment_state-1.json").read_text() == '{"trials": 2}'
    assert (storage_dir / "trial-1" / "result.json").read_text() == '{"epoch": 2}'
    assert sorted(p.name for p in storage_dir.rglob("*")) == ["experiment_state-1.json", "result.json", "trial-1"]

    back = tmp_path / "restored"  # how Tune downloads on restore, through the unpickled filesystem trial actors get
    pyarrow.fs.copy_files(str(storage_dir), str(back), source_filesystem=pickle.loads(pickle.dumps(storage)))
    assert (back / "trial-1" / "result.json").read_text() == '{"epoch": 2}'


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trial actors get this test's trainable and storage


class _SlowSnapshotCopy(AtomicLocalHandler):
    """The sweep's storage, with a copy of ``experiment_state-*.json`` that opens its source, pauses before it reads
    (a busy disk), and records each copy that is not one whole JSON document."""

    torn: ClassVar[list[str]] = []

    def open_output_stream(self, path: str, metadata: dict | None) -> pyarrow.NativeFile:
        if not Path(path).name.startswith("experiment_state"):
            return super().open_output_stream(path, metadata)
        time.sleep(0.02)  # pyarrow opened the source before this stream and reads it after
        return pyarrow.PythonFile(_CheckedOnClose(path), mode="w")

    def __reduce__(self) -> tuple:
        return _SlowSnapshotCopy, ()


class _CheckedOnClose(_RenameOnClose):
    def close(self) -> None:
        if not self.closed:
            self.flush()
            try:
                json.loads(Path(self.partial).read_text())
            except ValueError as torn:
                _SlowSnapshotCopy.torn.append(str(torn))
        super().close()


def _report_often(config: dict) -> None:
    for step in range(60):
        time.sleep(0.005)  # a result, and a snapshot, every few milliseconds
        tune.report({"step": step, "padding": "x" * (step % 5) * 200})  # snapshots of changing length


def test_no_snapshot_is_copied_while_tune_rewrites_it(tmp_path, ray_session, monkeypatch):
    """Tune rewrites its staged snapshot in place at every step here; without waiting for the previous copy, some
    copy read an emptied or half-rewritten file ("Expecting value: line 1 column 1") in each of three runs."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    snapshots_wait_for_their_copy()
    snapshots_wait_for_their_copy()  # installed once however often it is called
    _SlowSnapshotCopy.torn.clear()
    run = tune.RunConfig(storage_path=str(tmp_path), name="sweep", storage_filesystem=pyarrow.fs.PyFileSystem(_SlowSnapshotCopy()), verbose=0)
    grid = tune.Tuner(_report_often, run_config=run).fit()

    assert grid[0].metrics["step"] == 59
    assert _SlowSnapshotCopy.torn == []
    assert [json.loads(state.read_text())["trial_data"] for state in (tmp_path / "sweep").glob("experiment_state-*.json")]
