"""The one training loop, for every method, for a sweep trial and for `medsweep train`.

It reads top to bottom: build the method from the flat config, set up the
optimizer and a per-iteration cosine schedule, restore a checkpoint if there
is one, then per epoch: (stage hook) -> train -> validate -> checkpoint ->
report. Whoever runs it (a Ray Tune trial in Train local mode, Ray Train DDP
workers, a plain process) hands it a :class:`TrialIO`; the loop itself knows
nothing about Ray, so it is tested without a cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsweep.datasets.store import LABEL, ColumnSpec, decode_columns
from medsweep.trainables.backbones import backbone_normalisation, frozen_weights_unused
from medsweep.trainables.class_weights import balanced_weights
from medsweep.trainables.config import TrainConfig
from medsweep.trainables.inputs import model_inputs, steps_per_epoch
from medsweep.trainables.memory import device_of, step_memory_bytes
from medsweep.trainables.methods import Method, build_method, get_method
from medsweep.trainables.metrics import classification_metrics
from medsweep.trainables.optimizers import OPTIMIZER_KINDS
from medsweep.trainables.precision import allow_tf32, autocast, grad_scaler, resolve_precision

CHECKPOINT_FILE = "checkpoint.pt"
DIVERGENCE_LOSS = 1e4
EVAL_BATCH = 64  # images per batch in predict


class BatchOf(Protocol):
    """Turns a store batch into the model's inputs and the label tensor; ``train``: augmented."""

    def __call__(self, arrays: dict[str, np.ndarray], train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


class DataIO(Protocol):
    """The data side of a runner: what building a trial's training needs."""

    columns: list[ColumnSpec]

    def num_rows(self, split: str) -> int: ...

    def label_counts(self, split: str) -> list[int]:
        """Per-class (multi-class) or per-label positive (multi-label) counts of the whole ``split``."""


class TrialIO(DataIO, Protocol):
    """What the loop needs from its runner."""

    world_size: int
    rank: int

    def batches(self, split: str, batch_size: int, epoch: int, shuffle: bool) -> Iterable[dict[str, np.ndarray]]:
        """Numpy batches of this worker's rows of ``split`` (train: a disjoint shard per worker)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> Path | None:
        """A local folder holding the last reported checkpoint, if the trial is resuming."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Wrap for data parallelism (DDP) where there are several workers."""


@dataclass
class LoopState:
    """What a checkpoint restores."""

    epoch: int = 0
    best_auc: float = -math.inf
    best_epoch: int = -1
    best_collapsed: bool = False  # the best epoch's validation predictions fell in one class
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    lr_factor: float = 1.0
    stage_start: int = 0
    train_step_seconds: float = 0.0


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, task: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (multi-class) or BCE with logits (multi-label); ``weight``: per-class weights
    (multi-class) or ``pos_weight`` (multi-label), from :func:`balanced_weights`."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight)
    return F.cross_entropy(logits, labels.long(), weight=weight)


def loss_weights(cfg: TrainConfig, io: DataIO, method: Method, device: torch.device) -> torch.Tensor | None:
    """The training loss's class weights under ``cfg.class_weights`` (None: unweighted).

    Only the training loss is weighted: the reported validation loss stays the
    plain one, comparable between trials that weigh classes and trials that do not.
    """
    if cfg.class_weights == "none":
        return None
    counts = io.label_counts("train")
    return balanced_weights(counts, io.num_rows("train"), method.config.num_classes, method.config.task).to(device)


def precise_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, task: str, precision: str, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The training loss, forward under autocast to ``precision`` (the loss itself in float32); ``weight`` as in :func:`loss_fn`."""
    with autocast(precision, labels.device):
        logits = model(inputs)
    return loss_fn(logits.float(), labels, task, weight)


def make_optimizer(method: Method, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer over ``method``'s groups, each at ``lr`` x its ``lr_scale`` (the schedule scales each group's own lr)."""
    groups = method.param_groups(cfg.weight_decay, decay=cfg.decay, layer_decay=cfg.layer_decay)
    return OPTIMIZER_KINDS[cfg.optimizer].build([{**group, "lr": lr * group["lr_scale"]} for group in groups], lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then per-iteration cosine decay to 0 (FPT and LoRA-medical both do this)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def device_for_trial() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fit(config: dict[str, Any], io: TrialIO, checkpoint_root: Path) -> dict[str, Any]:
    """Train ``config["method"]`` with the flat ``config``; report every epoch through ``io``.

    Returns the last reported metrics. A loss that turns non-finite (or
    explodes past ``DIVERGENCE_LOSS``) ends the trial with ``status: diverged``.
    ``best_val_auc`` is the objective (what the searcher is told and the
    leaderboard ranks by), the AUC of the best epoch (:func:`is_better_epoch`);
    ``best_collapsed`` says whether that epoch's validation predictions
    collapsed to one class (see :func:`~medsweep.trainables.metrics.prediction_collapsed`).
    """
    device = device_for_trial()
    trainee = Trainee.start(config, io, io.world_size, device, io.latest_checkpoint())
    cfg, method, task, precision = trainee.cfg, trainee.method, trainee.task, trainee.precision
    model = io.prepare_model(method)
    if trainee.rng is not None:
        torch.set_rng_state(trainee.rng)
    if trainee.cuda_rng is not None and device.type == "cuda":  # dropout on a GPU draws from the CUDA generator
        torch.cuda.set_rng_state(trainee.cuda_rng, device)
    per_worker_batch = max(1, cfg.batch_size // io.world_size)
    micro_batch = cfg.micro_batch_size(io.world_size)
    generator = torch.Generator()  # augmentation draws, reseeded per epoch (see seed_epoch)
    batch_of = batch_maker(method, io.columns, device, generator)

    memory_bytes: int | None = None

    def measure(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:  # once, on the run's first batch
        nonlocal memory_bytes
        memory_bytes = trainee.memory_bytes(model, inputs, labels, device)

    metrics: dict[str, Any] = {}
    state = trainee.state
    for epoch in range(state.epoch, cfg.epochs):
        trainee.begin_epoch(epoch)
        epoch_start = time.perf_counter()
        seed_epoch(generator, cfg.seed, io.rank, epoch)
        model.train()
        trainee.optimizer.zero_grad(set_to_none=True)
        group = Accumulation(micro_batch, cfg.accumulate_steps)
        backward = partial(trainee.backward, model, group=group)
        batches = io.batches("train", micro_batch, epoch, shuffle=True)
        (losses,), seconds = train_epoch(batches, batch_of, group, backward, trainee.step, 1, measure if memory_bytes is None else None)
        state.train_step_seconds += seconds
        val = evaluate(model, io.batches("val", per_worker_batch, epoch, shuffle=False), batch_of, task, precision=precision)
        metrics = trainee.end_epoch(epoch, losses, val, memory_bytes, epoch_start)
        checkpoint_dir = None
        if io.rank == 0 and metrics["status"] != "diverged":
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            checkpoint_dir = trainee.save(checkpoint_root / epoch_folder(epoch), torch.get_rng_state(), cuda_rng)
        io.report(metrics, checkpoint_dir)
        if metrics["status"] == "diverged":
            break
    return metrics


def seed_epoch(generator: torch.Generator, seed: int, rank: int, epoch: int) -> None:
    """Reseed the augmentation draws from (seed, rank, epoch) alone, like the data order: a resumed
    trial draws what an uninterrupted one would, and trials sharing a seed draw the same."""
    generator.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))


def epoch_folder(epoch: int) -> str:
    """The checkpoint folder name of 0-based ``epoch``."""
    return f"epoch-{epoch + 1:04d}"


def train_epoch(
    batches: Iterable[dict[str, np.ndarray]],
    batch_of: BatchOf,
    group: Accumulation,
    backward: Callable[[dict[str, torch.Tensor], torch.Tensor], list[float]],
    step: Callable[[float], None],
    models: int,
    first: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
) -> tuple[list[list[float]], float]:
    """One epoch of training steps of ``models`` models on one stream of batches (``fit``: one; a cohort: its members).

    ``backward`` runs a micro-batch's forward and backward and returns each model's loss;
    ``step`` steps the optimizers with the gradient factor of a complete (or the trailing
    partial) group of ``group``; ``first`` sees the first batch before any step (the memory
    probe). Returns each model's losses and the seconds spent in steps (batch making excluded).
    """
    losses: list[list[float]] = [[] for _ in range(models)]
    seconds = 0.0
    for arrays in batches:
        inputs, labels = batch_of(arrays, train=True)
        if first is not None:  # outside the timed training steps
            first(inputs, labels)
            first = None
        start = time.perf_counter()
        for model_losses, loss in zip(losses, backward(inputs, labels), strict=True):
            model_losses.append(loss)
        factor = group.add(len(labels))
        if factor is not None:
            step(factor)
        seconds += time.perf_counter() - start
    factor = group.flush()
    if factor is not None:  # a trailing partial group steps too
        start = time.perf_counter()
        step(factor)
        seconds += time.perf_counter() - start
    return losses, seconds


class Accumulation:
    """Micro-batches (and their rows) whose gradients wait for the optimizer step.

    Each micro-batch's mean loss counts by its rows, so a group's gradient is the mean over the
    group's rows even where the epoch's last micro-batch is short or the last group partial: the
    update of one batch of batch_size. Without accumulation a batch is its own group: its mean
    loss as it is.
    """

    def __init__(self, micro_batch: int, accumulate: int) -> None:
        self.accumulate = accumulate
        self.group_rows = micro_batch * accumulate
        self.pending = self.pending_rows = 0

    def scaled(self, loss: torch.Tensor, rows: int) -> torch.Tensor:
        """The micro-batch loss to backpropagate."""
        return loss * (rows / self.group_rows) if self.accumulate > 1 else loss

    def add(self, rows: int) -> float | None:
        """Count one micro-batch; the gradient factor when the group is complete (step now), else None."""
        self.pending, self.pending_rows = self.pending + 1, self.pending_rows + rows
        return self.flush() if self.pending == self.accumulate else None

    def flush(self) -> float | None:
        """The gradient factor of the pending (possibly partial) group, None if there is none; starts a new group."""
        if not self.pending:
            return None
        factor = self.group_rows / self.pending_rows if self.accumulate > 1 else 1.0
        self.pending = self.pending_rows = 0
        return factor


@dataclass
class Trainee:
    """One trial's model and training state: what ``fit`` trains, and each member of a fused cohort
    (:mod:`medsweep.trainables.cohort`), built, restored, stepped, checkpointed by the same code."""

    cfg: TrainConfig
    method: Method
    precision: str
    steps: int  # optimizer steps per epoch
    scaler: torch.amp.GradScaler
    weight: torch.Tensor | None
    state: LoopState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: torch.Tensor | None  # the global random state a restored checkpoint holds (None: a fresh start)
    cuda_rng: torch.Tensor | None = None  # and the CUDA generator's, when it was saved on a GPU

    @property
    def task(self) -> str:
        return self.method.config.task

    @classmethod
    def start(cls, config: dict[str, Any], io: DataIO, world_size: int, device: torch.device, restored: Path | None) -> Trainee:
        """Seed, build ``config``'s method on ``device``, its optimizer and schedule; restore ``restored``'s checkpoint if any.

        The global random state after this is what the method's initialisation left (the
        caller sets ``rng`` where a checkpoint was restored).
        """
        cfg = TrainConfig.from_dict(config)
        torch.manual_seed(cfg.seed)
        stored_names = {c.name for c in io.columns}
        method_cls = get_method(config["method"]).model_cls
        # Every batch carries the frozen features: the frozen backbone never runs, so it is built
        # without weights (on the meta device). DDP broadcasts every tensor, so not under DDP.
        preloaded = method_cls.preloadable and method_cls.frozen_input not in stored_names and world_size == 1
        with frozen_weights_unused() if preloaded else nullcontext():
            method = build_method(config["method"], config)
        precision = resolve_precision(cfg.precision, device)
        if device.type == "cuda":
            allow_tf32()
        method.to_device(device)
        # batch_size is the effective batch: each worker runs accumulate_steps micro-batches per optimizer step,
        # and the schedule counts optimizer steps (a trailing partial group steps too).
        steps = math.ceil(steps_per_epoch(io.num_rows("train"), cfg.micro_batch_size(world_size), world_size) / cfg.accumulate_steps)
        scaler = grad_scaler(precision, device)
        weight = loss_weights(cfg, io, method, device)
        state = LoopState()
        blob = torch.load(restored / CHECKPOINT_FILE, map_location="cpu", weights_only=False) if restored else None
        if blob is not None:
            state = blob["state"]
            _replay_stages(method, state.epoch)
            method.load_state_dict(blob["model"], strict=False)
        optimizer, scheduler = _optimizer_for_stage(method, cfg, state, steps)
        if blob is not None:
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
            if "scaler" in blob:
                scaler.load_state_dict(blob["scaler"])
        rng = blob["rng"] if blob is not None else None
        cuda_rng = blob.get("cuda_rng") if blob is not None else None
        return cls(cfg, method, precision, steps, scaler, weight, state, optimizer, scheduler, rng, cuda_rng)

    def begin_epoch(self, epoch: int) -> None:
        """The method's stage hook: a new stage restarts from the best weights at a scaled lr."""
        factor = self.method.begin_epoch(epoch)
        if factor is not None:
            self.state.lr_factor *= factor
            self.state.stage_start = epoch
            if self.state.best_state:
                self.method.load_state_dict(self.state.best_state, strict=False)
            self.optimizer, self.scheduler = _optimizer_for_stage(self.method, self.cfg, self.state, self.steps)

    def memory_bytes(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, device: torch.device, resident: int | None = None
    ) -> int:
        """Peak memory of one training step of ``model`` (this trial's model, wrapped or not) on a batch; no trace left.
        ``resident``: see :func:`~medsweep.trainables.memory.step_memory_bytes` (a cohort member's)."""
        measured = step_memory_bytes(
            model,
            lambda: precise_loss(model, inputs, labels, self.task, self.precision, self.weight),
            self.cfg.optimizer,
            device,
            optimizer_state_allocated=bool(self.optimizer.state),  # a restored trial's state is on the device already
            resident=resident,
        )
        self.optimizer.zero_grad(set_to_none=True)
        return measured

    def backward(self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, group: Accumulation) -> list[float]:
        """Forward and backward of one micro-batch of ``model`` (this trial's, wrapped or not) in ``group``; its loss."""
        loss = precise_loss(model, inputs, labels, self.task, self.precision, self.weight)
        self.scaler.scale(group.scaled(loss, len(labels))).backward()
        return [loss.item()]

    def step(self, grad_factor: float) -> None:
        """One optimizer step over the accumulated gradients (see :func:`_optimizer_step`)."""
        _optimizer_step(self.method, self.optimizer, self.scheduler, self.scaler, self.cfg.grad_clip, grad_factor)

    def end_epoch(self, epoch: int, losses: list[float], val: dict[str, float], memory_bytes: int | None, epoch_start: float) -> dict[str, Any]:
        """Book 0-based ``epoch`` (its training losses, validation metrics): best epoch, divergence; the metrics to report."""
        state = self.state
        train_loss = float(np.mean(losses)) if losses else float("nan")
        diverged = not math.isfinite(train_loss) or train_loss > DIVERGENCE_LOSS
        if not diverged and is_better_epoch(val, state):
            state.best_auc, state.best_epoch, state.best_collapsed = val["auc"], epoch, val["collapsed"] == 1.0
            state.best_state = {k: v.detach().clone() for k, v in self.method.trainable_state_dict().items()}
        state.epoch = epoch + 1
        learnable, total = self.method.parameter_counts()  # a staged method changes them between stages
        return {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **{f"val_{k}": v for k, v in val.items()},
            "best_val_auc": state.best_auc if math.isfinite(state.best_auc) else float("nan"),
            "best_epoch": state.best_epoch + 1,
            "best_collapsed": float(state.best_collapsed),
            "learnable_params": learnable,
            "total_params": total,
            "learnable_pct": 100.0 * learnable / total,
            "peak_mem_mb": (memory_bytes or 0) / 2**20,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "train_step_seconds": state.train_step_seconds,
            "status": "diverged" if diverged else "running",
        }

    def save(self, folder: Path, rng: torch.Tensor, cuda_rng: torch.Tensor | None = None) -> Path:
        """Write the checkpoint ``fit`` resumes from into ``folder``; ``rng``: the global random state to restore
        (``cuda_rng``: the CUDA generator's, on a GPU, so dropout masks go on as in an uninterrupted run)."""
        folder.mkdir(parents=True, exist_ok=True)
        # Cloned: a fused cohort's members hold views into one stacked tensor (parameters and optimizer state),
        # whose whole storage torch.save would write.
        model = {k: v.clone() for k, v in self.method.trainable_state_dict().items()}
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in optimizer["state"].items()}
        torch.save(
            {
                "model": model,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": self.state,
                "rng": rng,
                **({"cuda_rng": cuda_rng} if cuda_rng is not None else {}),
            },
            folder / CHECKPOINT_FILE,
        )
        return folder


def is_better_epoch(val: dict[str, float], state: LoopState) -> bool:
    """Whether this epoch's validation metrics ``val`` make it the trial's best epoch.

    The best epoch has the highest validation AUC among the epochs whose predictions did not
    collapse to one class; only while every epoch so far collapsed is it the highest AUC of
    those. Short runs often rank well before they classify (an early epoch with the best AUC
    predicting one class for every image): keeping that checkpoint would hand the user a model
    that says one thing to everyone, so a later epoch that separates the classes replaces it.
    """
    if not math.isfinite(val["auc"]):
        return False
    collapsed = val["collapsed"] == 1.0
    if state.best_epoch < 0 or state.best_collapsed:
        return not collapsed or val["auc"] > state.best_auc
    return not collapsed and val["auc"] > state.best_auc


def _optimizer_step(method: Method, optimizer, scheduler, scaler: torch.amp.GradScaler, grad_clip: float, grad_factor: float) -> None:
    """One optimizer step over the accumulated gradients (times ``grad_factor``), unscaled before clipping."""
    learnable = [p for p in method.parameters() if p.requires_grad]
    if grad_factor != 1.0:
        for param in learnable:
            if param.grad is not None:
                param.grad.mul_(grad_factor)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(learnable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def batch_maker(method: Method, columns: list[ColumnSpec], device: torch.device, generator: torch.Generator | None) -> BatchOf:
    """The :class:`BatchOf` of ``method`` over a store with ``columns``: the inputs it has stored, normalised
    for its backbone, on ``device``; training batches augmented with draws from ``generator``."""
    stored = {c.name for c in columns}
    images = {k: v for k, v in method.image_inputs().items() if k in stored}
    features = tuple(k for k in method.feature_keys() if k in stored)
    mean, std = backbone_normalisation(method.config.backbone)

    def batch_of(arrays: dict[str, np.ndarray], train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        decoded = decode_columns(arrays, columns)
        inputs = model_inputs(decoded, images, features, mean, std, device, generator if train else None)
        return inputs, torch.tensor(arrays[LABEL], device=device)

    return batch_of


@overload
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    batch_of: BatchOf,
    task: str,
    *,
    outputs: Literal[False] = ...,
    precision: str = ...,
) -> dict[str, float]: ...


@overload
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    batch_of: BatchOf,
    task: str,
    *,
    outputs: Literal[True],
    precision: str = ...,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]: ...


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    batch_of: BatchOf,
    task: str,
    *,
    outputs: bool = False,
    precision: str = "fp32",
) -> dict[str, float] | tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Loss and classification metrics over every batch (eval mode, no augmentation), the forward
    under autocast to ``precision`` as in training.

    ``outputs=True`` also returns the logits [N, C] (float32) and labels in
    batch order, for whoever needs per-image scores (the final answer's bootstrap).
    """
    model.eval()
    device = device_of(model)
    scores = Scores()
    for arrays in batches:
        inputs, labels = batch_of(arrays, train=False)
        with autocast(precision, device):
            logits = model(inputs).float()
        scores.add(logits, labels, task)
    return scores.metrics(task, outputs)


class Scores:
    """Validation logits, labels and loss gathered batch by batch, then :func:`evaluate`'s metrics."""

    def __init__(self) -> None:
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.losses: list[float] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, task: str) -> None:
        """One batch: float32 ``logits`` [B, C] and its labels; the loss unweighted (see :func:`loss_weights`)."""
        self.losses.append(loss_fn(logits, labels, task).item() * len(labels))
        self.logits.append(logits.float().cpu().numpy())
        self.labels.append(labels.cpu().numpy())

    def metrics(self, task: str, outputs: bool = False) -> dict[str, float] | tuple[dict[str, float], np.ndarray, np.ndarray]:
        logits_np, labels_np = np.concatenate(self.logits), np.concatenate(self.labels)
        metrics = {"loss": float(np.sum(self.losses) / len(labels_np)), **classification_metrics(logits_np, labels_np, task)}
        return (metrics, logits_np, labels_np) if outputs else metrics


def predict(
    method: Method, io: TrialIO, split: str, batch_size: int = EVAL_BATCH, precision: str = "fp32"
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """:func:`evaluate` of a trained ``method`` on every image of ``split``, in ``io``'s unshuffled order,
    under the trial's ``precision`` (``auto`` resolves on this device).

    Returns its metrics (``loss`` included), logits and labels. On the val
    split with the trial's batch size, the metrics are what ``fit`` reported
    as ``val_*`` for the same weights.
    """
    device = device_for_trial()
    method.to_device(device)
    batches = io.batches(split, batch_size, epoch=0, shuffle=False)
    precision = resolve_precision(precision, device)
    return evaluate(method, batches, batch_maker(method, io.columns, device, None), method.config.task, outputs=True, precision=precision)


def _optimizer_for_stage(method: Method, cfg: TrainConfig, state: LoopState, steps: int):
    """Optimizer and schedule of the current stage (warm-up only in the first)."""
    optimizer = make_optimizer(method, cfg, cfg.lr * state.lr_factor)
    warmup = int(cfg.warmup_epochs * steps) if state.stage_start == 0 else 0
    return optimizer, cosine_schedule(optimizer, warmup, (cfg.epochs - state.stage_start) * steps)


def _replay_stages(method: Method, epochs_done: int) -> None:
    """Put a staged method into the stage it was in after ``epochs_done`` epochs."""
    for epoch in range(epochs_done):
        method.begin_epoch(epoch)


def load_trained(method_name: str, config: dict[str, Any], checkpoint: Path) -> Method:
    """A method rebuilt from its flat config with a checkpoint's learnable weights."""
    method = build_method(method_name, config)
    blob = torch.load(Path(checkpoint) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    _replay_stages(method, blob["state"].epoch)
    method.load_state_dict(blob["model"], strict=False)
    return method
