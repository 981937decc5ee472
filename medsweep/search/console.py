"""What a person sees while a sweep runs: rich progress bars, one line per trial event, the leaderboard."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medsweep.datasets.spec import DatasetSpec

# (leaderboard column, header) shown in the terminal; the CSV has every column.
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


class SweepConsole:
    """Prints to stderr-free stdout with rich; quiet=True keeps only the final table (tests)."""

    def __init__(self, quiet: bool = False, record: bool = False) -> None:
        """``record=True`` keeps everything printed (for :meth:`text`) instead of writing to the terminal."""
        self.quiet = quiet
        self.console = Console(
            highlight=False,
            quiet=quiet,
            width=max(120, Console().width),
            record=record,
            file=io.StringIO() if record else None,
        )

    def text(self) -> str:
        """What was printed so far (``record=True`` consoles)."""
        return self.console.export_text(clear=False)

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles its callbacks with the experiment state (for resume); a
        # rich Console holds locks, so only the setting travels.
        return {"quiet": self.quiet}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def dataset(self, spec: DatasetSpec) -> None:
        self.console.print(f"[bold]dataset[/] {spec.summary()}")

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
        size_mb = store.size_bytes() / 2**20
        per_image = store.bytes_per_image() / 1024
        how = "reused" if result.reused else f"written in {result.seconds:.1f} s ({result.images_processed} images)"
        if getattr(result, "skipped_images", 0):
            how += f", {result.skipped_images} unreadable images skipped"
        self.console.print(
            f"[bold]preload[/] {method}: store {store.key} {how}; {size_mb:.1f} MB, {per_image:.1f} KiB per image"
        )

    def data_ready(self, decisions: dict[str, str]) -> None:
        """One line per store: materialized once or streamed each epoch, and why."""
        for why in decisions.values():
            self.console.print(f"[bold]ray data[/] {why}")

    def trial_result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        self.console.print(
            f"  {trial_id} {config.get('method', '?'):>9} {_short(config):<40} "
            f"epoch {result.get('epoch', 0):>2}  val_auc {result.get('val_auc', float('nan')):.3f}  "
            f"loss {result.get('train_loss', float('nan')):.3f}"
        )

    def trial_done(self, trial_id: str, config: dict[str, Any], result: dict[str, Any] | None, done: int, total: int | None) -> None:
        """``total`` None: an unbounded search (``--budget-hours`` without ``--trials``), counted without a total."""
        best = (result or {}).get("best_val_auc", float("nan"))
        count = f"{done}/{total}" if total else f"{done}"
        self.console.print(f"[green]done[/] {trial_id} {config.get('method', '?')} best val_auc {best:.3f}  ({count})")

    def trial_error(self, trial_id: str, config: dict[str, Any], error_file: str) -> None:
        self.console.print(f"[red]error[/] {trial_id} {config.get('method', '?')}: see {error_file}")

    def leaderboard(self, board, out: Path, limit: int = 15) -> None:
        table = Table(title="leaderboard (validation split; the test split is never used in a search)")
        table.add_column("trial")
        for _, header in LEADERBOARD_COLUMNS:
            table.add_column(header, justify="right")
        table.add_column("hyperparameters")
        for _, row in board.head(limit).iterrows():
            cells = [row[c] for c, _ in LEADERBOARD_COLUMNS]
            table.add_row(
                str(row["trial_id"]),
                *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells],
                _short(row.to_dict()),
            )
        self.console.print(table)
        self.console.print(f"results in {out}: leaderboard.csv, leaderboard.parquet, best.yaml, {out / 'wandb'}")
