"""``medsweep sweep --warm-start OTHER``: begin a new study from the finished trials of an earlier sweep.

Before the new search starts, every COMPLETE trial of ``OTHER``'s study is added
to the new study as a completed trial (Optuna ``add_trials``: its params, their
distributions and its values), tagged with :data:`WARM_START_ATTR`. TPE counts
them as history from its first suggestion (they also count towards its random
start-up trials), so the new search begins where the earlier one left off.

They are not Tune trials: they have no row on the new leaderboard, no
checkpoint and cannot be retrained by ``final`` from the new folder; they only
inform the sampler. The recommended points the earlier sweep already ran are
not enqueued again (:func:`medsweep.search.tuning.points_to_enqueue`).

Only a sweep on the same dataset, with the same methods and objectives, is
accepted: another dataset's AUCs would mislead TPE, and another method list or
objective count gives trials the new study cannot hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medsweep.errors import ConfigError
from medsweep.search.settings import SweepSettings, load_settings
from medsweep.search.study import STUDY_FILE, STUDY_NAME, load_study, study_storage

if TYPE_CHECKING:
    import optuna

# optuna is imported inside the functions: the CLI imports this module's constant through tuning only.

WARM_START_ATTR = "warm_start_from"  # user attribute of a warm-started trial: the folder it came from


def check_warm_start(settings: SweepSettings) -> SweepSettings | None:
    """The earlier sweep's settings, once checked against ``settings`` (None without ``--warm-start``);
    a one-line :class:`ConfigError` naming what differs. Writes nothing."""
    if settings.warm_start is None:
        return None
    other_dir = Path(settings.warm_start)
    other = load_settings(other_dir)
    if not (other_dir / STUDY_FILE).is_file():
        raise ConfigError(f"--warm-start {other_dir} has no {STUDY_FILE}; pass the folder of a sweep that ran trials")
    if other_dir.resolve() == Path(settings.out).resolve():
        raise ConfigError(f"--warm-start {other_dir} is the new sweep's own --out; pass the earlier sweep's folder")
    for what, mine, theirs in (
        ("dataset", settings.dataset, other.dataset),
        ("methods", sorted(settings.methods), sorted(other.methods)),
        ("objectives", settings.objective, other.objective),
    ):
        if mine != theirs:
            raise ConfigError(
                f"--warm-start {other_dir} swept {what} {theirs}, this sweep {mine}; "
                "warm-start only from a sweep on the same dataset, methods and objectives"
            )
    return other


def add_earlier_trials(settings: SweepSettings) -> int:
    """Add the earlier sweep's COMPLETE trials to the new (still empty) study; returns how many."""
    import optuna
    from optuna.trial import TrialState

    assert settings.warm_start is not None
    earlier = load_study(Path(settings.warm_start))
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=study_storage(settings.out), directions=list(earlier.directions), load_if_exists=True
    )
    source = str(Path(settings.warm_start).resolve())
    trials = [_copy(trial, source) for trial in earlier.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    study.add_trials(trials)
    return len(trials)


def _copy(trial: optuna.trial.FrozenTrial, source: str) -> optuna.trial.FrozenTrial:
    from optuna.trial import TrialState, create_trial

    return create_trial(
        state=TrialState.COMPLETE,
        params=trial.params,
        distributions=trial.distributions,
        values=trial.values,
        intermediate_values=trial.intermediate_values,
        user_attrs={**trial.user_attrs, WARM_START_ATTR: source, "warm_start_number": trial.number},
    )
