"""Fused cohorts (trainables/cohort.py) without Ray: every member equals its standalone ``fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from medsweep.trainables.cohort import FusedMembers, Member, cohort_key, dropout_mask, fit_cohort, fusable, fused_model
from medsweep.trainables.loop import CHECKPOINT_FILE, Accumulation, batch_maker, device_for_trial, fit, load_trained
from medsweep.trainables.memory import resident_bytes
from medsweep.trainables.methods import build_method
from medsweep.trainables.preload import preload
from medsweep.trainables.store_io import StoreIO

BASE = {"backbone": "vit-tiny", "image_size": 32, "batch_size": 16, "seed": 0, "epochs": 3}
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear"},
    "cdtm": {"method": "cdtm", "num_centers": 4, "mlp_ratio": 2.0},
    "fpt_plus": {"method": "fpt_plus", "side_reduction": 2, "num_prompts": 4, "keep_ratio": 0.3, "preload_keep_ratio": 0.5},
}
# Members differ in everything their optimizer, schedule and loss own.
MEMBERS = [
    {"lr": 1e-2, "weight_decay": 0.0, "warmup_epochs": 0.0, "grad_clip": 1.0},
    {"lr": 3e-3, "weight_decay": 0.1, "warmup_epochs": 1.0, "grad_clip": 0.0, "class_weights": "balanced"},
    {"lr": 2e-2, "weight_decay": 0.05, "warmup_epochs": 0.5, "grad_clip": 0.5, "optimizer": "sgd"},
]
FPT_MEMBERS = [{"fusion_dropout": 0.5, "keep_ratio": 0.3}, {"fusion_dropout": 0.0, "keep_ratio": 0.5}, {"fusion_dropout": 0.2, "keep_ratio": 0.2}]
TIMINGS = ("epoch_seconds", "train_step_seconds")  # a member reports the cohort's
EXACT_KEYS = ("epoch", "best_epoch", "status", "learnable_params", "total_params", "best_collapsed")


class CohortStoreIO:
    """The cohort's IO over a preload store: one StoreIO per member keeps its reports and checkpoints."""

    def __init__(self, store, members: int, leaves: dict[int, int] | None = None) -> None:
        self.data = StoreIO(store)
        self.columns = self.data.columns
        self.members = [StoreIO(store) for _ in range(members)]
        self.leaves = leaves or {}  # member -> epochs after which it is no longer wanted

    def num_rows(self, split):
        return self.data.num_rows(split)

    def label_counts(self, split):
        return self.data.label_counts(split)

    def batches(self, split, batch_size, epoch, shuffle):
        return self.data.batches(split, batch_size, epoch, shuffle)

    def report(self, member, metrics, checkpoint_dir):
        self.members[member].report(metrics, checkpoint_dir)

    def wanted(self, member):
        return len(self.members[member].reports) < self.leaves.get(member, 10**6)

    def latest_checkpoint(self, member):
        return self.members[member].latest_checkpoint()


def configs_of(spec, method: str, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    extra = FPT_MEMBERS if method == "fpt_plus" else [{}] * len(members)
    common = {**BASE, **METHODS[method], "num_classes": spec.num_classes, "task": spec.task}
    return [{**common, **member, **more} for member, more in zip(members, extra, strict=False)]


@pytest.fixture(scope="module")
def stores(synthetic_spec, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {
        name: preload(synthetic_spec, build_method(name, configs_of(synthetic_spec, name, MEMBERS[:1])[0]), cache).store for name in METHODS
    }


def standalone(store, config: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    io = StoreIO(store)
    fit(config, io, folder)
    return io.reports


def assert_same_run(mine: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """Per-epoch metrics within the module's stated tolerance (batched vs single matmul rounding); timings aside."""
    assert len(mine) == len(reference)
    for got, want in zip(mine, reference, strict=True):
        assert set(got) == set(want)
        assert {k: got[k] for k in EXACT_KEYS} == {k: want[k] for k in EXACT_KEYS}
        for key, value in want.items():
            if key not in TIMINGS and isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize("method", list(METHODS))
def test_every_member_equals_its_standalone_fit(synthetic_spec, stores, method, tmp_path):
    configs = configs_of(synthetic_spec, method, MEMBERS)
    assert len({cohort_key(c) for c in configs}) == 1
    assert all(fusable(c, stores[method].columns) for c in configs)
    io = CohortStoreIO(stores[method], len(configs))
    last = fit_cohort(configs, io, tmp_path / "cohort")
    for i, config in enumerate(configs):
        reference = standalone(stores[method], config, tmp_path / f"alone-{i}")
        assert_same_run(io.members[i].reports, reference)
        assert last[i] == io.members[i].reports[-1]
    # A member's checkpoint is fit's: load_trained reads it and it holds that member's weights alone.
    checkpoint = io.members[1].checkpoints[-1]
    assert checkpoint == tmp_path / "cohort" / "member-001" / "epoch-0003"
    trained = load_trained(method, configs[1], checkpoint)
    reference = load_trained(method, configs[1], tmp_path / "alone-1" / "epoch-0003")
    for name, value in reference.trainable_state_dict().items():
        # Adam divides by sqrt(v): near-zero gradients amplify rounding, so weights agree to 1e-4, not the losses' 1e-5.
        torch.testing.assert_close(trained.trainable_state_dict()[name], value, rtol=1e-3, atol=1e-4)


def test_linear_members_whose_epoch_ends_in_a_one_image_batch_equal_their_standalone_fits(synthetic_spec, stores, tmp_path):
    """The probe's norm standardises a one-image training batch with its running statistics, inside vmap too."""
    rows = stores["linear"].meta["splits"]["train"]["rows"]
    configs = [{**config, "batch_size": rows - 1, "epochs": 2} for config in configs_of(synthetic_spec, "linear", MEMBERS)]
    io = CohortStoreIO(stores["linear"], len(configs))
    fit_cohort(configs, io, tmp_path / "cohort")
    for i, config in enumerate(configs):
        assert_same_run(io.members[i].reports, standalone(stores["linear"], config, tmp_path / f"alone-{i}"))


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("method", ["linear", "fpt_plus"])
def test_members_of_one_optimizer_step_together_and_equal_their_standalone_fits(synthetic_spec, stores, method, optimizer, tmp_path, monkeypatch):
    """Members that share their optimizer's kind take one stacked update per step (stacked_step.py), each with its
    own lr, weight decay, warm-up and clip (two of the three clip), and still reproduce their standalone fits; their
    checkpoints hold their own optimizer state, not the stacked state (a checkpoint the size of a standalone one)."""
    from medsweep.trainables.stacked_step import StackedStep

    stacked_steps = []
    real_call = StackedStep.__call__
    monkeypatch.setattr(StackedStep, "__call__", lambda self, factor: stacked_steps.append(factor) or real_call(self, factor))
    configs = [{**c, "optimizer": optimizer} for c in configs_of(synthetic_spec, method, MEMBERS)]
    io = CohortStoreIO(stores[method], len(configs))
    fit_cohort(configs, io, tmp_path / "cohort")
    assert stacked_steps, "the members stepped one by one"
    for i, config in enumerate(configs):
        assert_same_run(io.members[i].reports, standalone(stores[method], config, tmp_path / f"alone-{i}"))
    fused, alone = (folder / CHECKPOINT_FILE for folder in (io.members[2].checkpoints[-1], tmp_path / "alone-2" / "epoch-0003"))
    assert fused.stat().st_size == pytest.approx(alone.stat().st_size, rel=0.05)
    saved, reference = (torch.load(path, weights_only=False)["optimizer"]["state"] for path in (fused, alone))
    for index, state in reference.items():
        for key, value in state.items():
            torch.testing.assert_close(saved[index][key], value, rtol=1e-3, atol=1e-5)


def test_fused_fpt_members_run_no_attention_member_by_member(synthetic_spec, stores):
    """Every attention of a fused FPT+ step (the prompts' over the stored keys, the side ViT's self-attention) is one
    call for all members: torch warns when vmap falls back to running an op member by member, and here it does not."""
    import warnings

    configs = configs_of(synthetic_spec, "fpt_plus", MEMBERS[:2])
    configs = [{**c, "optimizer": "adamw"} for c in configs]
    io = StoreIO(stores["fpt_plus"])
    members = [Member.start(i, config, io, torch.device("cpu"), None) for i, config in enumerate(configs)]
    model, dropouts = fused_model(members[0].trainee.method)
    fused = FusedMembers(model, dropouts, members, torch.device("cpu"))
    batch_of = batch_maker(members[0].trainee.method, io.columns, torch.device("cpu"), torch.Generator().manual_seed(0))
    inputs, labels = batch_of(next(iter(io.batches("train", 8, 0, shuffle=True))), train=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.backward(inputs, labels, "fp32", Accumulation(len(labels), 1))
        fused.step(1.0)
    assert not [str(w.message) for w in caught if "batching rule" in str(w.message)]


def test_members_accumulating_micro_batches_equal_their_standalone_fits(synthetic_spec, stores, tmp_path):
    configs = [{**c, "accumulate_steps": 2} for c in configs_of(synthetic_spec, "linear", MEMBERS[:2])]
    io = CohortStoreIO(stores["linear"], len(configs))
    fit_cohort(configs, io, tmp_path / "cohort")
    for i, config in enumerate(configs):
        assert_same_run(io.members[i].reports, standalone(stores["linear"], config, tmp_path / f"alone-{i}"))


def test_the_last_member_left_trains_alone_as_its_standalone_fit(synthetic_spec, stores, tmp_path):
    """Once the others leave (ASHA stopped them), the last FPT+ member runs without vmap, on its slices of the
    stacked weights and state, with its own dropout draws (fusion dropout 0.5): its epochs still equal its fit's."""
    configs = configs_of(synthetic_spec, "fpt_plus", MEMBERS)
    io = CohortStoreIO(stores["fpt_plus"], len(configs), leaves={1: 1, 2: 1})
    fit_cohort(configs, io, tmp_path / "cohort")
    assert [len(member.reports) for member in io.members] == [3, 1, 1]
    assert configs[0]["fusion_dropout"] == 0.5
    assert_same_run(io.members[0].reports, standalone(stores["fpt_plus"], configs[0], tmp_path / "alone-0"))


def test_a_diverging_member_leaves_and_the_others_are_unaffected(synthetic_spec, stores, tmp_path):
    configs = configs_of(synthetic_spec, "linear", MEMBERS)
    configs[1] = {**configs[1], "lr": 1e12, "optimizer": "sgd", "grad_clip": 0.0, "class_weights": "none"}
    io = CohortStoreIO(stores["linear"], len(configs))
    fit_cohort(configs, io, tmp_path / "cohort")
    diverged = io.members[1].reports
    assert diverged[-1]["status"] == "diverged" and len(diverged) < 3
    for i in (0, 2):
        assert_same_run(io.members[i].reports, standalone(stores["linear"], configs[i], tmp_path / f"alone-{i}"))


def test_a_member_that_is_no_longer_wanted_leaves_without_changing_the_others(synthetic_spec, stores, tmp_path):
    configs = configs_of(synthetic_spec, "fpt_plus", MEMBERS)
    io = CohortStoreIO(stores["fpt_plus"], len(configs), leaves={0: 1})
    fit_cohort(configs, io, tmp_path / "cohort")
    assert [r["epoch"] for r in io.members[0].reports] == [1]
    for i in (1, 2):
        assert_same_run(io.members[i].reports, standalone(stores["fpt_plus"], configs[i], tmp_path / f"alone-{i}"))


def test_a_resumed_cohort_equals_an_uninterrupted_one(synthetic_spec, stores, tmp_path):
    configs = configs_of(synthetic_spec, "fpt_plus", MEMBERS)
    straight = CohortStoreIO(stores["fpt_plus"], len(configs))
    fit_cohort(configs, straight, tmp_path / "a")
    first = CohortStoreIO(stores["fpt_plus"], len(configs))
    fit_cohort(configs, _Stop(first, epochs=2), tmp_path / "b")
    resumed = CohortStoreIO(stores["fpt_plus"], len(configs))
    for i in range(len(configs)):
        resumed.members[i].checkpoints = list(first.members[i].checkpoints)  # what Tune hands each restarted trial
    fit_cohort(configs, resumed, tmp_path / "c")
    for i in range(len(configs)):
        assert [r["epoch"] for r in resumed.members[i].reports] == [3]
        assert_same_run(resumed.members[i].reports, straight.members[i].reports[2:])
    # On a GPU the dropout masks come from each member's CUDA generator, whose state the checkpoint must keep
    # (or a resumed member replays its first masks); on a CPU they come from the saved CPU state alone.
    blob = torch.load(first.members[0].checkpoints[-1] / CHECKPOINT_FILE, weights_only=False)
    assert ("cuda_rng" in blob) == (device_for_trial().type == "cuda")


class _Stop:
    """Wraps a cohort IO so that every member leaves after ``epochs`` epochs (as a killed process would stop)."""

    def __init__(self, io: CohortStoreIO, epochs: int) -> None:
        self.io, self.epochs = io, epochs
        self.columns = io.columns

    def __getattr__(self, name):
        return getattr(self.io, name)

    def wanted(self, member):
        return len(self.io.members[member].reports) < self.epochs


def test_a_member_checkpoint_resumes_a_standalone_fit(synthetic_spec, stores, tmp_path):
    configs = configs_of(synthetic_spec, "fpt_plus", MEMBERS)
    cohort = CohortStoreIO(stores["fpt_plus"], len(configs), leaves={0: 2, 1: 2, 2: 2})
    fit_cohort(configs, cohort, tmp_path / "cohort")
    resumed = StoreIO(stores["fpt_plus"])
    resumed.checkpoints = list(cohort.members[0].checkpoints)
    fit(configs[0], resumed, tmp_path / "alone-resumed")
    assert_same_run(resumed.reports, standalone(stores["fpt_plus"], configs[0], tmp_path / "alone")[2:])


def test_cohort_key_groups_shapes_apart_and_keeps_keep_ratios_together(synthetic_spec):
    config = configs_of(synthetic_spec, "fpt_plus", MEMBERS)[0]
    key = cohort_key(config)
    assert cohort_key({**config, "keep_ratio": 0.5, "fusion_dropout": 0.1, "lr": 0.5, "optimizer": "sgd"}) == key
    for change in ({"num_prompts": 8}, {"side_reduction": 4}, {"seed": 1}, {"batch_size": 8}, {"epochs": 4}, {"store_key": "x"}):
        assert cohort_key({**config, **change}) != key, change
    linear = configs_of(synthetic_spec, "linear", MEMBERS)[0]
    assert cohort_key(linear) != key
    assert cohort_key({**linear, "lr": 0.5, "class_weights": "balanced", "grad_clip": 0.0}) == cohort_key(linear)


def test_only_preloadable_methods_on_their_stored_features_fuse(synthetic_spec, stores):
    linear = configs_of(synthetic_spec, "linear", MEMBERS)[0]
    assert fusable(linear, stores["linear"].columns)
    assert not fusable(linear, stores["cdtm"].columns)  # a store of other features
    assert not fusable({**linear, "method": "bitfit"}, stores["linear"].columns)  # trains through the backbone: not preloadable


def test_a_member_dropout_mask_is_the_one_f_dropout_draws():
    x = torch.randn(4, 3, 5, 7)
    for p in (0.0, 0.2, 0.5):
        torch.manual_seed(3)
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        expected = F.dropout(x, p, training=True)
        assert torch.equal(x * dropout_mask(x, p, generator), expected)
        assert torch.equal(generator.get_state(), torch.get_rng_state())  # and it consumed what F.dropout consumed


def test_a_fused_member_holds_as_many_bytes_as_its_standalone_model(synthetic_spec, stores):
    """Its GPU memory reading counts what it would hold alone (memory.resident_bytes), not its cohort's stack:
    a member's parameters are views of one slice of the stacked tensors, and count that slice only."""
    configs = configs_of(synthetic_spec, "fpt_plus", MEMBERS)
    io = StoreIO(stores["fpt_plus"])
    cpu = torch.device("cpu")
    members = [Member.start(i, config, io, cpu, None) for i, config in enumerate(configs)]
    alone = [resident_bytes(member.trainee.method, []) for member in members]
    model, dropouts = fused_model(members[0].trainee.method)
    FusedMembers(model, dropouts, members, cpu)
    assert [resident_bytes(member.trainee.method, []) for member in members] == alone
    batch = [torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)]
    assert resident_bytes(members[0].trainee.method, batch) == alone[0] + 4 * 8 * 4 + 4 * 8
