"""The preload store under faults (issue 11): damaged metadata, unwritable and full caches, two builders at once.

Real files and real processes: a read-only and a full cache are real tmpfs
mounts (skipped, with the reason, where the test cannot mount), and the two
concurrent preloads are two ``medsweep preload`` processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsweep.cli import main
from medsweep.datasets import load_imagefolder, make_synthetic
from medsweep.datasets.store import LAYOUT_FILE, PreloadStore
from medsweep.errors import StoreError
from medsweep.trainables.methods import build_method
from medsweep.trainables.preload import preload, store_columns

TINY = {"backbone": "vit-tiny", "image_size": 32}
CLI_TINY = ["--method", "linear", "--backbone", "vit-tiny", "--image-size", "32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), seed=4, image_size=32, n_train=24, n_val=9, n_test=6)


@pytest.fixture(scope="module")
def spec(root):
    return load_imagefolder(root, name="syn")


def linear(spec):
    return build_method("linear", {**TINY, "num_classes": spec.num_classes, "task": spec.task})


def small_shards(spec) -> int:
    """A shard target of 4 rows (6 train shards, 3 val, 2 test)."""
    return 4 * sum(c.nbytes for c in store_columns(linear(spec), "float16"))


def checksums(store: PreloadStore) -> dict[str, str]:
    return {str(p.relative_to(store.root)): p.read_text() for p in store.root.rglob("*.sha256")}


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*.tmp")]


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory) -> PreloadStore:
    """The store one clean run writes: what every repaired or resumed store must equal."""
    return preload(spec, linear(spec), tmp_path_factory.mktemp("clean"), shard_target_bytes=small_shards(spec)).store


# -- damaged metadata --------------------------------------------------------------------------------------


def test_the_list_tells_stores_apart_and_says_how_to_free_one(reference, capsys) -> None:
    """What a user chooses that makes a new store (method, dataset, backbone, image size, precision) is on its line."""
    cache = reference.root.parent.parent
    assert main(["preload", "--list", "--cache-dir", str(cache)]) == 0
    line, advice = capsys.readouterr().out.splitlines()
    parts = reference.meta["key_parts"]
    assert line.startswith(f"{reference.key}  ") and f"linear on {reference.meta['dataset']} (manifest {parts['dataset']}, " in line
    assert f"{parts['backbone']} at {parts['method_frozen_path']['image_size']} px, fp32, " in line and ", written 20" in line
    assert advice.endswith(f"rm -r {cache / 'stores'}/KEY")


def test_truncated_store_json_is_repaired_and_listed_as_damaged(spec, reference, tmp_path, capsys) -> None:
    store = preload(spec, linear(spec), tmp_path, shard_target_bytes=small_shards(spec)).store
    store.meta_path.write_text(store.meta_path.read_text()[:40])
    assert store.is_damaged()
    assert main(["preload", "--list", "--cache-dir", str(tmp_path)]) == 0
    assert "damaged" in capsys.readouterr().out

    result = preload(spec, linear(spec), tmp_path)
    assert result.repairs == ["store.json was unreadable: checked every shard against its checksum"]
    assert result.shards_written == 0 and not result.store.is_damaged()  # every shard was still good
    assert checksums(result.store) == checksums(reference) and result.store.verify() == []


def test_truncated_layout_json_rebuilds_the_store(spec, reference, tmp_path) -> None:
    store = preload(spec, linear(spec), tmp_path, shard_target_bytes=small_shards(spec)).store
    (store.root / LAYOUT_FILE).write_text('{"rows_per')
    result = preload(spec, linear(spec), tmp_path, shard_target_bytes=small_shards(spec))
    assert result.repairs == ["layout.json was unreadable: rebuilt every shard"] and result.shards_written == 11
    assert checksums(result.store) == checksums(reference)


def test_corrupt_shards_are_reported_as_repaired(spec, tmp_path) -> None:
    store = preload(spec, linear(spec), tmp_path, shard_target_bytes=small_shards(spec)).store
    for shard in store.shard_paths("train")[:2]:
        shard.write_bytes(shard.read_bytes()[:-10])
    assert preload(spec, linear(spec), tmp_path).repairs == ["repaired 2 corrupt shards"]


# -- unwritable caches ---------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 48 KiB tmpfs at a fresh folder (root and a kernel that allows the mount, else skipped).

    tmpfs counts whole 4 KiB pages per file: the small-shard store (11 shards,
    11 checksums, layout, lock, store.json: ~100 KiB) fills it part way.
    """
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_one_line_and_the_next_run_with_space_resumes(spec, reference, tmpfs) -> None:
    """The tmpfs fills mid-preload: one line naming the fix, nothing marked complete, no temporary file left;
    after growing it the same call finishes the store, equal to a clean build."""
    with pytest.raises(StoreError) as error:
        preload(spec, linear(spec), tmpfs, shard_target_bytes=small_shards(spec))
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "--cache-dir on a larger disk" in message
    store = PreloadStore(next((tmpfs / "stores").glob("*/")))
    assert not store.is_complete() and leftovers(tmpfs) == []
    assert list(store.root.rglob("*.sha256"))  # some shards were finished before the disk filled

    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    resumed = preload(spec, linear(spec), tmpfs)
    assert not resumed.reused and 0 < resumed.shards_written < 11
    assert store.is_complete() and store.verify() == [] and checksums(store) == checksums(reference)


def test_a_read_only_cache_is_one_line_naming_the_fix(root, tmpfs, capsys) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert main(["preload", "--dataset", str(root), *CLI_TINY, "--cache-dir", str(tmpfs)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "Read-only file system" in error[0] and "a --cache-dir you can write to" in error[0], error


def test_a_cache_dir_that_is_a_file_is_one_line(spec, tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    with pytest.raises(StoreError, match="--cache-dir must be a folder") as error:
        preload(spec, linear(spec), cache)
    assert "\n" not in str(error.value)


# -- two builders -----------------------------------------------------------------------------------------------


BUILDER = """
import sys, time
from pathlib import Path
import medsweep.datasets.shards as shards
import medsweep.trainables.preload as module
from medsweep.datasets import load_imagefolder
from medsweep.trainables.methods import build_method
spec = load_imagefolder(sys.argv[1], name="syn")
method = build_method("linear", {"backbone": "vit-tiny", "image_size": 32, "num_classes": spec.num_classes, "task": spec.task})
flag = Path(sys.argv[4])  # touched by the process that finds the lock taken
load, decoded = shards.load_image, []
def held(path):  # a real decode; after the first shard, hold the lock until the other process waits for it
    decoded.append(path)
    deadline = time.monotonic() + 120
    while len(decoded) > 4 and not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return load(path)
def waiting(line):
    print(line, flush=True)
    flag.touch()
shards.load_image = held
result = module.preload(spec, method, sys.argv[2], shard_target_bytes=int(sys.argv[3]), on_wait=waiting)
print("reused" if result.reused else f"wrote {result.shards_written} shards", flush=True)
"""


def test_two_preloads_of_one_store_at_once_end_with_one_valid_store(spec, root, reference, tmp_path) -> None:
    """Two processes build the same store at once: the second waits for the first's lock, then reuses its store."""
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", BUILDER, str(root), str(cache), str(small_shards(spec)), str(tmp_path / "waiting")]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob("stores/*/layout.json")) and time.monotonic() < deadline:  # the first holds the lock
        time.sleep(0.02)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    first_out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, first_out[-2000:] + second.stderr[-2000:]
    assert first_out.strip().splitlines()[-1] == "wrote 11 shards"
    waited, outcome = second.stdout.strip().splitlines()
    assert f"is being built by pid {first.pid}" in waited and "waiting for it" in waited and outcome == "reused"
    store = PreloadStore(next((cache / "stores").glob("*/")))
    assert store.verify() == [] and checksums(store) == checksums(reference) and leftovers(cache) == []


def test_an_output_folder_on_a_read_only_disk_is_one_line(root, tmpfs, capsys) -> None:
    """``medsweep train --out`` on a read-only mount: the command's own files, not the store, fail to write."""
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    argv = ["train", "--dataset", str(root), *CLI_TINY, "--epochs", "1", "--out", str(tmpfs / "run"), "--cache-dir", str(tmpfs.parent / "cache")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    # refused before the dataset is read or the store built (the cache, on the same mount, is not written either)
    assert len(error) == 1 and f"--out {tmpfs / 'run'} cannot be written: {tmpfs} is on a read-only file system" in error[0], error
    assert "pass a path you can write to" in error[0] and not (tmpfs.parent / "cache").exists()
