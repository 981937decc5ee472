"""The order in which rows of a preload store are written and read: one definition for every runner.

Two permutations keep class-sorted datasets (an ImageFolder lists its images
class by class) from ever reaching training as class-sorted batches:

* **written order** (:func:`written_order`): the preload writes each split's
  rows in a seeded random order, so every shard is a random sample of its
  split and a store of many small shards (6-12 rows per 64 MB shard at
  384-512 px) holds no run of one class. The ``index`` column of every row
  records the sample it came from.
* **epoch order** (:class:`EpochOrder`): each training epoch visits the shards
  in a fresh permutation drawn from ``(seed, epoch)``, groups consecutive
  shards into windows of about :data:`WINDOW_BYTES` and permutes the rows of
  each window. Memory stays bounded by one window, and a row's neighbours
  change from epoch to epoch.

The epoch order is a pure function of the split's rows per shard, the seed
and the epoch: :func:`ordered_batches` turns the shard tables, fed in
:attr:`EpochOrder.shards` order by any reader (pyarrow files for ``medsweep
train`` and ``final``, pinned Ray object-store blocks or a Ray Data stream in a
sweep trial), into the same batches. A trial restored at epoch 5 therefore
reads epoch 5's order, whoever reads it. Under DDP, worker ``r`` of ``w``
takes rows ``r, r + w, r + 2w, ...`` of that one sequence, cut to the same
count on every worker (``rows // w``) so every worker takes the same number of
steps.

Why not Ray Data's own shuffles: ``randomize_block_order`` reseeds from a
count of executions the process has seen (not the epoch: a restored trial
would replay epoch 0's order), ``random_shuffle`` is an all-to-all exchange of
the whole split every epoch, and neither can be reproduced by a plain pyarrow
reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

WINDOW_BYTES = 256 << 20


def written_order(num_rows: int, seed: int, split: str) -> np.ndarray:
    """The sample index stored at each row of ``split``: a permutation seeded by the store's order seed."""
    return np.random.default_rng([seed, _split_code(split)]).permutation(num_rows)


def _split_code(split: str) -> int:
    """A stable integer per split name (``hash`` is salted per process)."""
    return int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")


def epoch_order(
    shard_rows: Sequence[int],
    row_bytes: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    window_bytes: int = WINDOW_BYTES,
) -> EpochOrder:
    """The order of one pass over a split whose shards hold ``shard_rows`` rows of ``row_bytes`` each.

    Shuffled (training): a window holds as many whole shards as fit in
    ``window_bytes`` (at least one). Fixed (validation, test): store order.
    """
    if not shuffle:
        return EpochOrder.fixed(shard_rows)
    largest = max(shard_rows, default=1) * max(1, row_bytes)
    return EpochOrder.shuffled(shard_rows, seed, epoch, per_window=max(1, window_bytes // max(1, largest)))


@dataclass(frozen=True)
class EpochOrder:
    """How one pass reads a split.

    ``shards``: shard indices in reading order; ``windows``: rows of each
    window (consecutive shards of ``shards``), whose rows are permuted with
    ``row_seed``; ``None`` for a fixed pass (validation, test): store order, no
    permutation.
    """

    shards: tuple[int, ...]
    windows: tuple[int, ...]
    row_seed: tuple[int, ...] | None

    @classmethod
    def fixed(cls, shard_rows: Sequence[int]) -> EpochOrder:
        """Store order: every shard in turn, rows as written (validation and test)."""
        return cls(tuple(range(len(shard_rows))), tuple(int(n) for n in shard_rows), None)

    @classmethod
    def shuffled(cls, shard_rows: Sequence[int], seed: int, epoch: int, per_window: int) -> EpochOrder:
        """Epoch ``epoch`` of a trial seeded ``seed``: shards permuted, rows permuted per window of ``per_window`` shards."""
        if per_window < 1:
            raise ValueError(f"a shuffle window holds at least one shard, got {per_window}")
        shards = tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(shard_rows)))
        windows = tuple(
            sum(int(shard_rows[i]) for i in shards[start : start + per_window]) for start in range(0, len(shards), per_window)
        )
        return cls(shards, windows, (seed, epoch))

    @property
    def rows(self) -> int:
        return sum(self.windows)


def ordered_batches(
    tables: Iterable[pa.Table],
    order: EpochOrder,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[pa.Table]:
    """Batches of ``order``'s sequence from shard ``tables`` fed in ``order.shards`` order (any chunking).

    Worker ``rank`` of ``world_size`` keeps every ``world_size``-th row of the
    sequence, starting at ``rank``, and at most ``rows // world_size`` of
    them; the last batch may be short.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    rng = np.random.default_rng(order.row_seed) if order.row_seed is not None else None
    quota = order.rows // world_size if world_size > 1 else order.rows
    kept = 0
    position = 0  # of the window's first row in the whole sequence
    pending: list[pa.Table] = []
    for window in _windows(tables, order.windows):
        rows = np.arange(window.num_rows)
        if rng is not None:
            rows = rng.permutation(window.num_rows)
        mine = rows[(position + np.arange(window.num_rows)) % world_size == rank][: quota - kept]
        position += window.num_rows
        kept += len(mine)
        pending.append(window.take(mine) if rng is not None or world_size > 1 else window)
        buffered = pa.concat_tables(pending)
        start = 0
        while buffered.num_rows - start >= batch_size:
            yield buffered.slice(start, batch_size)
            start += batch_size
        pending = [buffered.slice(start)] if start < buffered.num_rows else []
    if pending and pending[0].num_rows:
        yield pending[0]


def _windows(tables: Iterable[pa.Table], sizes: Sequence[int]) -> Iterator[pa.Table]:
    """Regroup a stream of tables into consecutive tables of ``sizes`` rows each."""
    tables = iter(tables)
    carry: list[pa.Table] = []
    held = 0
    for size in sizes:
        while held < size:
            table = next(tables, None)
            if table is None:
                raise ValueError(f"the shards gave {held} rows where the order expects {size} more in this window")
            carry.append(table)
            held += table.num_rows
        whole = pa.concat_tables(carry)
        yield whole.slice(0, size)
        rest = whole.slice(size)
        carry, held = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if held or next(tables, None) is not None:
        raise ValueError("the shards hold more rows than the order expects")
