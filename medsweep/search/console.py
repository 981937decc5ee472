"""What a person sees while a sweep runs: progress bars, a live table of running trials, the leaderboard.

On a terminal the search shows a table of the running trials (epoch, latest
and best validation AUC, loss, time) redrawn in place, with one line printed
above it as each trial ends. Piped into a file or a CI log, where a redrawn
table would be noise, every trial event is one line instead.
"""

from __future__ import annotations

import io
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medsweep.datasets.spec import DatasetSpec
from medsweep.search.study import BEST_YAML, LEADERBOARD_CSV, LEADERBOARD_PARQUET, MLFLOW_DB, PARETO_COLUMN, PARETO_CSV, WANDB_DIR

# (leaderboard column, header) shown in the terminal; the CSV has every column.
# What the leaderboard's last line names, those the sweep wrote: its tracker's runs only where it has them here
# (no W&B folder with --tracker mlflow or none, no mlflow.db with MLFLOW_TRACKING_URI set).
ANSWER_FILES = (LEADERBOARD_CSV, LEADERBOARD_PARQUET, BEST_YAML, PARETO_CSV, WANDB_DIR, MLFLOW_DB)
LEADERBOARD_COLUMNS = (
    ("method", "method"),
    ("best_val_auc", "val AUC"),
    ("epochs_run", "epochs"),
    ("learnable_pct", "params %"),
    ("peak_mem_mb", "mem MB"),
    ("ppe", "PPE"),
    ("status", "status"),
)


def _short(config: dict[str, Any]) -> str:
    keys = [
        k
        for k in ("lr", "rank", "keep_ratio", "num_prompts", "bottleneck", "weight_decay", "batch_size")
        if k in config and config[k] == config[k]  # NaN: a column of another method
    ]
    parts = [f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}" for k in keys]
    return " ".join(parts)


def one_class_note(result: dict[str, Any]) -> str:
    """`` (one class)`` after an epoch's AUC when its validation predictions fell in one class: such an epoch is
    never a trial's best (README: How the best is chosen), whatever its AUC."""
    return " (one class)" if result.get("val_collapsed") == 1.0 else ""


def best_epoch_note(result: dict[str, Any]) -> str:
    """`` (epoch N)`` after a trial's best AUC, which is not always the highest AUC its epochs showed."""
    if "best_epoch" not in result:
        return ""
    return f" (epoch {result['best_epoch']}{', every epoch one class' if result.get('best_collapsed') else ''})"


@contextmanager
def dropping(logger: logging.Logger, prefix: str) -> Iterator[None]:
    """While in the block, ``logger`` drops its records whose message starts with ``prefix``: a library's notice
    the console has no use for (Ray's, Tune's), the logger's other records kept."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _restored_console(quiet: bool) -> SweepConsole:
    """Unpickling target: the process's current console, else a new one (see ``__reduce__``)."""
    current = SweepConsole.current()
    return current if current is not None else SweepConsole(quiet=quiet)


class SweepConsole:
    """Prints to stdout with rich; ``quiet=True`` (``--quiet``) prints only the answer (:meth:`result`): the
    leaderboard, the final test and where the files are."""

    _latest: weakref.ref[SweepConsole] | None = None

    def __init__(self, quiet: bool = False, record: bool = False, live: bool | None = None) -> None:
        """``record=True`` keeps everything printed (for :meth:`text`) instead of writing to the terminal;
        ``live``: the live table of running trials (default: on a terminal only)."""
        self.quiet = quiet
        # A terminal's own width: the live table is redrawn in place, and lines wider than the terminal wrap
        # and leave stale rows behind. A log file gets at least 120 columns (rich's default there is 80).
        probe = Console()
        terminal = probe.is_terminal and not record
        self.console = Console(
            highlight=False,
            quiet=quiet,
            width=probe.width if terminal else max(120, probe.width),
            record=record,
            file=io.StringIO() if record else None,
            # In a log, a longer line stays one line (grep finds it whole): rich broke them mid-sentence at 120
            # columns. Lines meant to fit (per-epoch lines, the leaderboard) are cut to the width themselves.
            soft_wrap=not terminal,
        )
        self.live = (self.console.is_terminal and not quiet) if live is None else live
        self._live: Live | None = None
        self._running: dict[str, dict[str, Any]] = {}
        self._reused_shown: set[tuple[str, str]] = set()  # (method, store key) whose reuse was printed
        self._finished = 0
        self._total: int | None = None
        SweepConsole._latest = weakref.ref(self)

    @classmethod
    def current(cls) -> SweepConsole | None:
        """The console this process made last (the one of the sweep it runs)."""
        return cls._latest() if cls._latest is not None else None

    def text(self) -> str:
        """What was printed so far (``record=True`` consoles)."""
        return self.console.export_text(clear=False)

    def __reduce__(self):
        # Ray Tune pickles its callbacks with the experiment (tuner.pkl) and unpickles them in
        # `medsweep resume`: the restored callback must print to the console of the resumed
        # sweep (the one showing the live table), not to a copy. A rich Console holds locks,
        # so only the setting travels.
        return (_restored_console, (self.quiet,))

    def result(self, *objects: Any) -> None:
        """Print a part of the sweep's answer, which ``quiet`` keeps."""
        quiet, self.console.quiet = self.console.quiet, False
        try:
            self.console.print(*objects)
        finally:
            self.console.quiet = quiet

    def dataset(self, spec: DatasetSpec) -> None:
        self.console.print(f"[bold]dataset[/] {spec.summary()}")
        for note in spec.auc_notes():
            self.console.print(f"  {note}")

    def progress(self, description: str, total: int) -> Callable[[int], None]:
        """A progress bar that closes itself when ``total`` is reached."""
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        task = bar.add_task(description, total=total)
        bar.start()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(task, advance=n)
            if done >= total:
                bar.stop()

        if total == 0:
            bar.stop()
        return advance

    def store_ready(self, method: str, result: Any) -> None:
        store = result.store
        if result.reused and (method, store.key) in self._reused_shown:
            return  # final retrains several candidates of one method on one store: one line says it is reused
        if result.reused:
            self._reused_shown.add((method, store.key))
        size_mb = store.size_bytes() / 2**20
        per_image = store.bytes_per_image() / 1024
        how = "reused" if result.reused else f"written in {result.seconds:.1f} s ({result.images_processed} images)"
        if getattr(result, "skipped_images", 0):
            how += f", {result.skipped_images} unreadable images skipped"
        for repair in getattr(result, "repairs", []):
            how += f", {repair}"
        self.console.print(
            f"[bold]preload[/] {method}: store {store.key} {how}; {size_mb:.1f} MB, {per_image:.1f} KiB per image"
        )
        if not result.reused:  # where the frozen pass ran: one line per node
            for node, done in store.meta.get("frozen_pass", {}).items():
                rate = done["images"] / done["seconds"] if done.get("seconds") else float("nan")
                where = f"{done['ip']} (node {node[:8]})" if done.get("ip") else node
                self.console.print(
                    f"  frozen pass on {where}: {done['images']} images in {done.get('seconds', float('nan')):.1f} s "
                    f"({rate:.2f} images/s) on {done['device']}" + (f", batch {done['batch_size']}" if done.get("batch_size") else "")
                )

    def preload_waiting(self, line: str) -> None:
        """Another process holds the store's build lock (see :func:`medsweep.datasets.store.store_lock`)."""
        self.console.print(f"[bold]preload[/] {line}")

    def data_ready(self, decisions: dict[str, str]) -> None:
        """One line per store: materialized once or streamed each epoch, and why."""
        for why in decisions.values():
            self.console.print(f"[bold]ray data[/] {why}")

    @contextmanager
    def live_trials(self, total: int | None = None) -> Iterator[None]:
        """While the search runs: the live table of running trials (when ``live``), closed on any exit.

        ``total``: the planned number of trials (None: bounded by time only)."""
        self._total = total
        if not self.live:
            yield
            return
        # get_renderable: each auto-refresh redraws the table, so the time column ticks between events.
        with Live(get_renderable=self._trials_table, console=self.console, refresh_per_second=2, transient=True) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def _trials_table(self) -> Table:
        total = f"/{self._total}" if self._total else ""
        table = Table(title=f"running trials ({self._finished}{total} done)", title_justify="left")
        for header in ("trial", "method", "epoch", "val AUC", "best", "loss", "time"):
            table.add_column(header, justify="left" if header in ("trial", "method") else "right")
        table.add_column("hyperparameters")
        now = time.monotonic()
        for trial_id, row in self._running.items():
            table.add_row(
                trial_id,
                str(row["method"]),
                f"{row['epoch']}/{row['epochs']}" if "epoch" in row else "-",
                f"{row['val_auc']:.3f}" if "val_auc" in row else "-",
                f"{row['best']:.3f}" if "best" in row else "-",
                f"{row['loss']:.3f}" if "loss" in row else "-",
                f"{now - row['started']:.0f} s",
                row["hyperparameters"],
            )
        return table

    def _row(self, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
        if trial_id not in self._running:
            self._running[trial_id] = {
                "method": config.get("method", "?"),
                "hyperparameters": _short(config),
                "epochs": config.get("epochs", "?"),
                "started": time.monotonic(),
            }
        return self._running[trial_id]

    def trial_start(self, trial_id: str, config: dict[str, Any]) -> None:
        self._row(trial_id, config)
        self._refresh()

    def trial_result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        row = self._row(trial_id, config)
        auc = result.get("val_auc", float("nan"))
        row.update(epoch=result.get("epoch", 0), val_auc=auc, loss=result.get("train_loss", float("nan")))
        if "best_val_auc" in result:  # the trial's own best: one-class epochs never count (as on the leaderboard)
            row["best"] = result["best_val_auc"]
        else:
            row["best"] = max(row.get("best", -1.0), auc) if auc == auc else row.get("best", float("nan"))
        if self._live is not None:
            self._refresh()
            return
        # One line per event whatever the hyperparameters: they come last, cut to the console's width.
        metrics = f"epoch {row['epoch']:>2}  val_auc {auc:.3f}{one_class_note(result)}  loss {row['loss']:.3f}"
        self.console.print(
            f"  {trial_id} {row['method']:>9}  {metrics}  {row['hyperparameters']}",
            no_wrap=True,
            overflow="ellipsis",
        )

    def trial_done(self, trial_id: str, config: dict[str, Any], result: dict[str, Any] | None, done: int, total: int | None) -> None:
        self._running.pop(trial_id, None)
        self._finished, self._total = done, total or self._total
        result = result or {}
        best = result.get("best_val_auc", float("nan"))
        count = f"{done}/{total}" if total else f"{done} done"
        self.console.print(f"[green]done[/] {trial_id} {config.get('method', '?')} best val_auc {best:.3f}{best_epoch_note(result)}  ({count})")
        self._refresh()

    def trial_error(self, trial_id: str, config: dict[str, Any], error_file: str) -> None:
        self._running.pop(trial_id, None)
        self.console.print(f"[red]error[/] {trial_id} {config.get('method', '?')}: see {error_file}")
        self._refresh()

    def leaderboard(self, board, out: Path, limit: int = 15, objectives: list[str] | None = None) -> None:
        """The best ``limit`` trials, one line each (a log read in a pager or a SLURM output file keeps its rows
        whole): the hyperparameters are cut with an ellipsis to the console's width; ``leaderboard.csv`` has them all.
        With several ``objectives``, a line names the trials on their Pareto front (in the board's order)."""
        top = [row for _, row in board.head(limit).iterrows()]
        rows = [[str(row["trial_id"]), *[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c, _ in LEADERBOARD_COLUMNS]] for row in top]
        table = Table(
            title="leaderboard (validation split; the test split is never used in a search)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),  # a space after each value, then the box's space between columns
        )
        widths = []
        for index, header in enumerate(["trial", *(header for _, header in LEADERBOARD_COLUMNS)]):
            table.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
            widths.append(max([len(header), *(len(cells[index]) for cells in rows)]))
        table.add_column("hyperparameters", no_wrap=True)
        # Each column: its values, a space of padding, and the box's space before the next column.
        room = max(len("hyperparameters"), self.console.width - sum(w + 2 for w in widths))
        for cells, row in zip(rows, top, strict=True):
            settings = _short(row.to_dict())
            table.add_row(*cells, settings if len(settings) <= room else settings[: room - 1] + "…")
        self.result(table)
        if objectives and len(objectives) > 1 and PARETO_COLUMN in board:
            front = board[board[PARETO_COLUMN].astype(bool)]
            trials = ", ".join(f"{row['trial_id']} {row['method']}" for _, row in front.iterrows())
            self.result(f"pareto front of {', '.join(objectives)}: {trials or 'no usable trial'} ({PARETO_CSV})")
        written = [name + ("/" if (out / name).is_dir() else "") for name in ANSWER_FILES if (out / name).exists()]
        self.result(f"results in {out}: {', '.join(written)}")
