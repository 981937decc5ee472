"""Fused training of K member trials in one process over one stream of batches (issue 14), without Ray.

A trial on preloaded features trains a tiny network: per step, reading, decoding,
augmenting and moving its batch cost more than its forward. Trials that share
the batch stream (the same store, seed, batch size, epochs and precision) and
the same parameter shapes are fused into a *cohort*: one batch serves every
member, and one forward/backward runs all members' networks together,
``torch.func.vmap`` over their stacked parameters with the batch shared.

Each member is still a whole trial: its own :class:`~medsweep.trainables.loop.Trainee`
(the method, optimizer, cosine schedule, grad clip, GradScaler, class weights,
best-epoch bookkeeping) built, stepped and checkpointed by the code ``fit`` uses,
so member ``k`` reproduces ``fit(configs[k], StoreIO(...), ...)`` and its
checkpoints resume a standalone ``fit`` (and ``load_trained`` reads them).
Members' parameters live as views into one stacked tensor per parameter; one
backward of the sum of the members' losses fills the stacked gradient. Members
whose optimizers are of one kind (AdamW, Adam or SGD) then take one update per
stacked parameter, with each member's own lr, weight decay, clip and schedule
(:mod:`~medsweep.trainables.stacked_step`: their optimizer state becomes views
into stacked state too); otherwise each member's slice becomes its ``.grad`` and
its own optimizer steps it. A member's loss never touches another member's
parameters, so a NaN in one slice stays there.

Exactness. On CPU in fp32 a member's per-epoch losses equal its standalone
run's to about 1e-6 relative (tests allow 1e-5), its AUCs to 1e-6, and its best
epoch is the same: batched matmuls round differently from single ones (another
blocking and summation order), and padded keys (below) add exact zeros in a
different order. On CUDA bitwise reproduction is not possible either way
(kernel choice depends on shapes; dropout masks come from the CUDA generator);
expect agreement to training noise there.

Randomness. Initialisation is ``torch.manual_seed(seed)`` then ``build_method``
per member, as ``fit`` does. Augmentation draws come from the generator ``fit``
reseeds per (seed, rank 0, epoch): members share a seed (it also fixes the data
order), so one augmented batch is every member's batch. Dropout: ``fit`` draws
masks from the global random state; here each member holds a generator with the
state its standalone run would have (after its build, or its checkpoint's
``rng``), and every ``nn.Dropout`` of the fused model draws the member's mask
from it exactly as CPU ``F.dropout`` does, outside the batched computation.
A member's checkpoint stores that generator's state as ``rng``. On CUDA the masks
come from a per-member CUDA generator, seeded from that state at the member's
start and saved as the checkpoint's ``cuda_rng``, so a resumed member's masks go
on where they stopped rather than repeat its first epochs' (the CPU state does
not advance there).

What may differ between members. Everything an optimizer or loss owns (lr,
weight_decay, optimizer, warmup, grad_clip, class_weights, layer_decay, decay)
and a method's :attr:`~medsweep.trainables.methods.Method.member_fields`: dropout
rates (each member's own mask) and FPT's ``keep_ratio``. A keep ratio only
decides how many of the stored tokens the prompts read, so the fused model pads
every member to the cohort's largest count and masks each member's keys beyond
its own: the same attention, and keep ratios are one of the most searched keys.
Every other method field is grouped on (:func:`cohort_key`): most change
parameter shapes (``num_prompts``, ``side_reduction``, cdtm's centres) or the
stored features (``preload_key``), and grouping on all of them is exact by
construction, with no per-method list of structural names to keep up to date.

Timings. ``train_step_seconds`` and ``epoch_seconds`` of a member are the
cohort's: the fused steps serve every member at once. ``peak_mem_mb`` is the
member's own standalone step, measured as ``fit`` measures it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from medsweep.datasets.store import ColumnSpec
from medsweep.trainables.backbones import frozen_weights_unused
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.loop import (
    Accumulation,
    BatchOf,
    DataIO,
    Scores,
    Trainee,
    batch_maker,
    device_for_trial,
    epoch_folder,
    loss_fn,
    seed_epoch,
    train_epoch,
)
from medsweep.trainables.memory import resident_bytes
from medsweep.trainables.methods import Method, build_method, get_method, make_config
from medsweep.trainables.precision import autocast
from medsweep.trainables.stacked_step import StackedStep

# Training keys every member shares: they fix the batch stream (the seed fixes order and augmentation),
# the number of steps and the compute.
STREAM_KEYS = ("seed", "batch_size", "accumulate_steps", "epochs", "precision")


class CohortIO(Protocol):
    """A runner's data side for a cohort (one process, rank 0, the members' one seed), reports per member."""

    columns: list[ColumnSpec]

    def num_rows(self, split: str) -> int: ...

    def label_counts(self, split: str) -> list[int]: ...

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterable[dict[str, np.ndarray]]: ...

    def report(self, member: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def wanted(self, member: int) -> bool:
        """Checked before each epoch: False = the member left (early-stopped); it is dropped."""

    def latest_checkpoint(self, member: int) -> Path | None:
        """A fit-format checkpoint folder to resume ``member`` from."""


def fusable(config: dict[str, Any], columns: list[ColumnSpec]) -> bool:
    """Whether ``config`` trains on preloaded features a store with ``columns`` holds (what fusing needs)."""
    method_cls = get_method(config["method"]).model_cls
    stored = {c.name for c in columns}
    if not method_cls.preloadable or method_cls.frozen_input in stored:
        return False
    with torch.device("meta"), frozen_weights_unused():  # only its feature keys are asked: allocate nothing
        method = build_method(config["method"], config)
    return all(key in stored for key in method.feature_keys())


def shape_keys(method: str) -> frozenset[str]:
    """The config keys whose values must agree for trials of ``method`` to fuse (beside its store): the batch
    stream's (:data:`STREAM_KEYS`) and every method field but the method's ``member_fields``."""
    entry = get_method(method)
    return frozenset(STREAM_KEYS) | (entry.config_cls.field_names() - set(entry.model_cls.member_fields))


def cohort_key(config: dict[str, Any]) -> tuple:
    """Members with equal keys can be fused: the same method, store and values of its :func:`shape_keys`
    (see the module docstring)."""
    values = {**make_config(config["method"], config).to_dict(), **TrainConfig.from_dict(config).to_dict()}
    shape = {key: values[key] for key in sorted(shape_keys(config["method"]))}
    return (config["method"], config.get("store_key", ""), json.dumps(shape, sort_keys=True))


def dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """The mask ``F.dropout(x, p)`` multiplies ``x`` by in training, drawn from ``generator`` as CPU
    ``F.dropout`` draws it from the global random state (no draw at all for ``p`` 0 or 1)."""
    if p == 0:
        return torch.ones(x.shape, dtype=x.dtype, device=x.device)
    if p == 1:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=generator).div_(1 - p)


@dataclass
class Member:
    """One member trial: its index in the cohort's configs, its training, its random state."""

    index: int
    trainee: Trainee
    state: torch.Generator  # the global random state its standalone fit would hold (CPU), saved as a checkpoint's rng
    generator: torch.Generator  # draws its dropout masks: ``state`` itself on CPU
    memory_bytes: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, index: int, config: dict[str, Any], io: DataIO, device: torch.device, restored: Path | None) -> Member:
        """Build (or restore from ``restored``) the member as ``fit`` would, with its random state."""
        trainee = Trainee.start(config, io, 1, device, restored)
        state = torch.Generator()
        state.set_state(trainee.rng if trainee.rng is not None else torch.get_rng_state())
        if device.type == "cpu":
            return cls(index, trainee, state, state)
        generator = torch.Generator(device)  # no bitwise reproduction on CUDA: a per-member stream seeded from its state
        if trainee.cuda_rng is not None:  # restored: the stream goes on from its checkpoint
            generator.set_state(trainee.cuda_rng)
        else:
            generator.manual_seed(int(torch.randint(2**62, (1,), generator=torch.Generator().set_state(state.get_state()))))
        return cls(index, trainee, state, generator)

    def random_states(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a checkpoint keeps of the member's randomness: ``rng`` (its CPU state) and, on CUDA, ``cuda_rng``."""
        return self.state.get_state(), None if self.generator is self.state else self.generator.get_state()


class _MemberDropout(nn.Module):
    """Stands in for an ``nn.Dropout`` of the fused model: each member's mask from its own generator."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []
        self.generators: list[torch.Generator] = []
        self.member: torch.Tensor | None = None  # inside the batched forward: the member's index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.rates):
            return x
        assert self.member is not None, "a member dropout runs inside the cohort's batched forward"
        # x has one member's shape here; the masks are plain tensors, one per member, indexed by the member.
        masks = torch.stack([dropout_mask(x, p, g) for p, g in zip(self.rates, self.generators, strict=True)])
        return x * masks[self.member]


class FusedMembers:
    """The active members' parameters and buffers stacked along a leading member axis, and the fused model
    (a copy of one member) that ``vmap`` runs over them."""

    def __init__(self, model: Method, dropouts: dict[str, _MemberDropout], members: list[Member], device: torch.device) -> None:
        self.model, self.dropouts, self.members = model, dropouts, members
        methods = [m.trainee.method for m in members]
        self.trainable: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}  # buffers (norm statistics) and frozen tensors that hold values
        named = [dict(method.named_parameters()) | dict(method.named_buffers()) for method in methods]
        for name, tensor in named[0].items():
            if tensor.is_meta:
                continue
            stacked = torch.stack([n[name].detach() for n in named])
            for i, n in enumerate(named):  # each member's tensor becomes a view of its slice: optimizers step in place
                n[name].data = stacked[i]
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                self.trainable[name] = stacked.requires_grad_()
            else:
                self.fixed[name] = stacked
        self.per_member = {path: t.to(device) for path, t in model.fuse_members(methods).items()}
        for path, dropout in dropouts.items():
            dropout.rates = [cast(nn.Dropout, method.get_submodule(path)).p for method in methods]
            dropout.generators = [m.generator for m in members]
        self.index = torch.arange(len(members), device=device)
        # One update for all members where it equals each one's own optimizer step; else one member at a time.
        self.stacked_step = StackedStep.build(self.trainable, [m.trainee for m in members])

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every member's logits ``[K, B, C]`` on one shared batch."""

        def one(trainable: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], per_member: dict[str, torch.Tensor], index: torch.Tensor):
            self._set(per_member, index)
            try:
                return functional_call(self.model, {**trainable, **fixed}, (inputs,))
            finally:  # the batched values mean nothing outside this call
                self._set(dict.fromkeys(per_member), None)

        if len(self.members) == 1:  # one member left (the others stopped or diverged): its slices run as a plain
            # model, since vmap over one member only costs (figure 10 at K = 1: 1.5x a standalone step, 1.2x without).
            def first(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return {name: tensor[0] for name, tensor in tensors.items()}

            return one(first(self.trainable), first(self.fixed), first(self.per_member), self.index[0]).unsqueeze(0)
        # randomness "same": the dropout masks are drawn on plain tensors from each member's own generator.
        return vmap(one, randomness="same")(self.trainable, self.fixed, self.per_member, self.index)

    def _set(self, per_member: Mapping[str, torch.Tensor | None], index: torch.Tensor | None) -> None:
        """Put one member's values (inside vmap) on the fused model's attributes, or clear them (None)."""
        for path, value in per_member.items():
            module, _, attribute = path.rpartition(".")
            setattr(self.model.get_submodule(module), attribute, value)
        for dropout in self.dropouts.values():
            dropout.member = index

    def backward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, precision: str, group: Accumulation) -> list[float]:
        """Forward and backward of one micro-batch for every member; their losses (as ``fit`` records them)."""
        self.model.train()
        with autocast(precision, labels.device):
            logits = self.logits(inputs)
        losses = [loss_fn(logits[i].float(), labels, m.trainee.task, m.trainee.weight) for i, m in enumerate(self.members)]
        # One backward of the sum: member i's slice of each stacked gradient is its own loss's gradient.
        total = sum(m.trainee.scaler.scale(group.scaled(loss, len(labels))) for m, loss in zip(self.members, losses, strict=True))
        assert isinstance(total, torch.Tensor)
        total.backward()
        return torch.stack([loss.detach() for loss in losses]).cpu().tolist()

    def measure(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Each member's peak step memory as ``fit`` measures it: its own step, standalone. On CUDA the
        device also holds the other members' stacked tensors, which a standalone trial would not: each reading
        counts the member's own step over what is allocated, plus what it would hold alone (``resident``)."""
        for member in self.members:
            method = member.trainee.method.train()
            resident = resident_bytes(method, [*inputs.values(), labels]) if labels.device.type == "cuda" else None
            member.memory_bytes = member.trainee.memory_bytes(method, inputs, labels, labels.device, resident)

    def step(self, grad_factor: float) -> None:
        """Each member's optimizer step over its slice of the accumulated gradients: all at once
        (:mod:`~medsweep.trainables.stacked_step`), or each member's own ``Trainee.step`` in turn."""
        if self.stacked_step is not None:
            self.stacked_step(grad_factor)
        else:
            for i, member in enumerate(self.members):
                params = dict(member.trainee.method.named_parameters())
                for name, stacked in self.trainable.items():
                    params[name].grad = stacked.grad[i] if stacked.grad is not None else None
                member.trainee.step(grad_factor)
        for stacked in self.trainable.values():
            stacked.grad = None

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, np.ndarray]], batch_of: BatchOf, precision: str) -> list[dict[str, float]]:
        """Every member's validation metrics, as :func:`~medsweep.trainables.loop.evaluate` gives them, over one pass."""
        self.model.eval()
        scores = [Scores() for _ in self.members]
        for arrays in batches:
            inputs, labels = batch_of(arrays, train=False)
            with autocast(precision, labels.device):
                logits = self.logits(inputs).float()
            for i, member in enumerate(self.members):
                scores[i].add(logits[i], labels, member.trainee.task)
        return [cast(dict[str, float], s.metrics(m.trainee.task)) for s, m in zip(scores, self.members, strict=True)]


def fused_model(method: Method) -> tuple[Method, dict[str, _MemberDropout]]:
    """A copy of ``method`` to run every member with, its dropouts replaced by member dropouts (by path)."""
    model = copy.deepcopy(method)
    dropouts: dict[str, _MemberDropout] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Dropout):
            parent, _, name = path.rpartition(".")
            dropouts[path] = _MemberDropout()
            setattr(model.get_submodule(parent), name, dropouts[path])
    return model, dropouts


def fit_cohort(configs: list[dict[str, Any]], io: CohortIO, checkpoint_root: Path) -> list[dict[str, Any]]:
    """Train the member ``configs`` together, each as ``fit`` would train it alone; report every member's
    epochs through ``io`` (checkpoints under ``checkpoint_root / member-KKK``).

    The configs must have one :func:`cohort_key` and resume (if at all) from the same epoch. Returns
    each member's last reported metrics (empty for a member that left before its first epoch).
    """
    if len({cohort_key(config) for config in configs}) != 1:
        raise ValueError("fit_cohort needs members with one cohort_key")
    device = device_for_trial()
    members = [Member.start(i, config, io, device, io.latest_checkpoint(i)) for i, config in enumerate(configs)]
    first = members[0].trainee
    cfg = first.cfg
    if len({m.trainee.state.epoch for m in members}) != 1:
        raise ValueError("fit_cohort members must resume from the same epoch")
    model, dropouts = fused_model(first.method)
    generator = torch.Generator()  # augmentation draws, shared by every member
    batch_of = batch_maker(first.method, io.columns, device, generator)
    micro_batch = cfg.micro_batch_size(1)
    active = members
    start = first.state.epoch
    for epoch in range(start, cfg.epochs):
        active = [m for m in active if io.wanted(m.index)]
        if not active:
            break
        fused = FusedMembers(model, dropouts, active, device)
        epoch_start = time.perf_counter()
        seed_epoch(generator, cfg.seed, 0, epoch)
        group = Accumulation(micro_batch, cfg.accumulate_steps)
        backward = partial(fused.backward, precision=first.precision, group=group)
        batches = io.batches("train", micro_batch, epoch, shuffle=True)
        losses, seconds = train_epoch(batches, batch_of, group, backward, fused.step, len(active), fused.measure if epoch == start else None)
        vals = fused.evaluate(io.batches("val", cfg.batch_size, epoch, shuffle=False), batch_of, first.precision)
        for member, member_losses, val in zip(active, losses, vals, strict=True):
            member.trainee.state.train_step_seconds += seconds
            member.metrics = member.trainee.end_epoch(epoch, member_losses, val, member.memory_bytes, epoch_start)
            checkpoint_dir = None
            if member.metrics["status"] != "diverged":
                folder = checkpoint_root / f"member-{member.index:03d}" / epoch_folder(epoch)
                checkpoint_dir = member.trainee.save(folder, *member.random_states())
            io.report(member.index, member.metrics, checkpoint_dir)
        active = [m for m in active if m.metrics["status"] != "diverged"]  # a diverged member leaves the batched computation
    return [m.metrics for m in members]
