"""One optimizer step for every member of a fused cohort at once, over their stacked parameters (issue 14).

Each member of a cohort owns an optimizer (AdamW, Adam or SGD, as
:data:`~medsweep.trainables.optimizers.OPTIMIZER_KINDS` builds them), a schedule
and a gradient clip. Stepped one member at a time, as ``fit`` steps a trial, a
step costs K members x P parameter tensors x a handful of small ops: on a GPU
tens of thousands of kernel launches per step at K = 64 FPT+ members, more than
the fused forward and backward; on these CPUs 36 ms of a 16-member FPT+ step of
~170 ms (figure 10's setting, profiled), almost all of it per-tensor overhead.
HFTA (MLSys 2021) fuses the optimizers of its fused models for the same reason.

Here every stacked parameter ``[K, ...]`` takes one update for all members,
each member's learning rate (its group's, as its schedule set it), weight decay
and clip coefficient a ``[K]`` vector broadcast over the rest: the formulas of
torch's single-tensor implementations, in their order, so a member's update is
its own optimizer's to float rounding
(``test_members_of_one_optimizer_step_together_and_equal_their_standalone_fits``).
The members' optimizers stay the owners of their state: their ``exp_avg``,
``exp_avg_sq``, ``step`` and ``momentum_buffer`` become views into the stacked
state, as their parameters are views into the stacked parameters, so a member's
checkpoint, its schedule and a standalone ``fit`` resuming from it see an
ordinary torch optimizer (``Trainee.save`` clones the views).

Where one batched update would not be every member's own, :meth:`StackedStep.build`
returns None and the cohort steps its members one by one: a GradScaler that
scales (fp16), optimizers of different kinds or with different betas, eps or
momentum, and torch options medsweep never sets (amsgrad, nesterov, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from medsweep.trainables.loop import Trainee

ADAM_KINDS = (torch.optim.Adam, torch.optim.AdamW)  # AdamW is Adam with decoupled weight decay
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient max_norm / (total_norm + 1e-6), at most 1


@dataclass
class _Stacked:
    """One stacked parameter ``[K, ...]``, each member's param group index for it, and its stacked optimizer state."""

    param: torch.Tensor
    groups: torch.Tensor  # [K] long
    state: dict[str, torch.Tensor]

    @property
    def grad(self) -> torch.Tensor:
        """Its stacked gradient (a parameter without one is not stepped)."""
        assert self.param.grad is not None
        return self.param.grad


class StackedStep:
    """Steps every member's optimizer at once (see the module docstring); build it with :meth:`build`."""

    def __init__(
        self,
        trainable: dict[str, torch.Tensor],
        trainees: list[Trainee],
        hyper: dict[str, Any],
        named: list[dict[str, torch.nn.Parameter]],
        group_of: list[dict[int, int]],
    ) -> None:
        """``named``: each member's parameters by name; ``group_of``: each member's param group index by parameter id."""
        self.trainees = trainees
        self.kind = type(trainees[0].optimizer)
        self.hyper = hyper  # betas and eps (Adam kinds) or momentum (SGD): one value for all members
        self.decoupled = bool(trainees[0].optimizer.param_groups[0].get("decoupled_weight_decay", False))
        self.members = torch.arange(len(trainees))
        self.clips = torch.tensor([t.cfg.grad_clip for t in trainees], dtype=torch.float64)
        self.stacked = [self._stack(param, [n[name] for n in named], group_of) for name, param in trainable.items()]

    @classmethod
    def build(cls, trainable: dict[str, torch.Tensor], trainees: list[Trainee]) -> StackedStep | None:
        """The stacked step of these members (whose parameters are views into ``trainable``), or None where
        one batched update would not equal each member's own optimizer step (see the module docstring)."""
        kinds = {type(t.optimizer) for t in trainees}
        if len(kinds) != 1 or any(t.scaler.is_enabled() for t in trainees):
            return None
        kind = kinds.pop()
        groups = [group for t in trainees for group in t.optimizer.param_groups]
        shared: tuple[str, ...]
        off: tuple[str, ...]
        if kind in ADAM_KINDS:
            shared = ("betas", "eps", "decoupled_weight_decay")
            off = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
        elif kind is torch.optim.SGD:
            shared, off = ("momentum",), ("nesterov", "maximize", "dampening", "differentiable", "fused")
        else:
            return None
        if any(group.get(key) for group in groups for key in off) or any(isinstance(g["lr"], torch.Tensor) for g in groups):
            return None
        values = {key: {repr(group.get(key)) for group in groups} for key in shared}
        if any(len(seen) != 1 for seen in values.values()):
            return None
        named = [dict(t.method.named_parameters()) for t in trainees]
        group_of = [{id(p): i for i, g in enumerate(t.optimizer.param_groups) for p in g["params"]} for t in trainees]
        if any(name not in own or id(own[name]) not in index for own, index in zip(named, group_of, strict=True) for name in trainable):
            return None
        hyper = {key: groups[0][key] for key in shared if key != "decoupled_weight_decay"}
        return cls(trainable, trainees, hyper, named, group_of)

    def _stack(self, param: torch.Tensor, members: list[torch.Tensor], group_of: list[dict[int, int]]) -> _Stacked:
        """Stack the optimizer state of the members' parameters ``members`` (views into ``param``; made as torch
        makes it at a first step where there is none) and make each member's state views into it. ``group_of``:
        each member's param group index by parameter id."""
        groups = torch.tensor([index[id(p)] for index, p in zip(group_of, members, strict=True)])
        states = [t.optimizer.state[p] for t, p in zip(self.trainees, members, strict=True)]
        fresh: dict[str, Any] = (
            {"step": lambda p: torch.tensor(0.0), "exp_avg": torch.zeros_like, "exp_avg_sq": torch.zeros_like}
            if self.kind in ADAM_KINDS
            else {"momentum_buffer": torch.zeros_like}  # SGD's first buffer is the first gradient: 0 x momentum + g
        )
        stacked: dict[str, torch.Tensor] = {}
        for key, make in fresh.items():
            stacked[key] = torch.stack([state[key] if state.get(key) is not None else make(p) for state, p in zip(states, members, strict=True)])
            for k, state in enumerate(states):
                state[key] = stacked[key][k]
        return _Stacked(param, groups, stacked)

    @torch.no_grad()
    def __call__(self, grad_factor: float) -> None:
        """Every member's ``_optimizer_step``: gradients times ``grad_factor``, each member's clip, its optimizer's
        update and its schedule's step. The stacked gradients are left for the caller to clear."""
        work = [s for s in self.stacked if s.param.grad is not None]  # torch skips a parameter without a gradient
        if work:
            if grad_factor != 1.0:
                for s in work:
                    s.grad.mul_(grad_factor)
            if bool((self.clips > 0).any()):
                self._clip(work)
            update = self._adam if self.kind in ADAM_KINDS else self._sgd
            # Each member's coefficients per stacked parameter, worked out on the CPU in float64 as torch works out
            # its Python scalars, then moved to the device at once: [parameters, coefficients, K].
            for s, coefficients in zip(work, self._coefficients(work).to(work[0].param.device, work[0].param.dtype), strict=True):
                update(s, *coefficients)
        for trainee in self.trainees:
            trainee.optimizer._opt_called = True  # type: ignore[attr-defined]  # as torch's own step marks it: no schedule warning
            trainee.scheduler.step()

    def _coefficients(self, work: list[_Stacked]) -> torch.Tensor:
        """Per stacked parameter: Adam's ``1 - lr x decay`` (or the decay), ``-step size`` and bias correction
        (its step counts advanced here); SGD's decay and ``-lr``."""
        lr, decay = (self._per_group(key)[self.members, torch.stack([s.groups for s in work])] for key in ("lr", "weight_decay"))
        if self.kind not in ADAM_KINDS:
            return torch.stack([decay, -lr], dim=1)
        beta1, beta2 = self.hyper["betas"]
        for s in work:
            s.state["step"] += 1
        step = torch.stack([s.state["step"] for s in work]).to(torch.float64)
        first = 1 - lr * decay if self.decoupled else decay
        return torch.stack([first, -lr / (1 - beta1**step), (1 - beta2**step) ** 0.5], dim=1)

    def _per_group(self, key: str) -> torch.Tensor:
        """``[K, groups]``: each member's value of ``key`` per param group (float64, as torch's Python scalars)."""
        rows = [[float(group[key]) for group in t.optimizer.param_groups] for t in self.trainees]
        width = max(len(row) for row in rows)
        return torch.tensor([row + [0.0] * (width - len(row)) for row in rows], dtype=torch.float64)

    def _clip(self, work: list[_Stacked]) -> None:
        """``clip_grad_norm_`` per member over its own gradients: the norm of the per-tensor norms."""
        norms = torch.stack([torch.linalg.vector_norm(s.grad.reshape(len(self.trainees), -1), 2.0, dim=1) for s in work])
        total = torch.linalg.vector_norm(norms, 2.0, dim=0)
        clips = self.clips.to(total.device, total.dtype)
        coef = torch.where(clips > 0, torch.clamp(clips / (total + CLIP_EPS), max=1.0), torch.ones_like(total))
        for s in work:
            s.grad.mul_(_each(coef, s.param))

    def _adam(self, s: _Stacked, first: torch.Tensor, neg_step_size: torch.Tensor, correction: torch.Tensor) -> None:
        """torch's ``_single_tensor_adam`` (not capturable), with per-member coefficients."""
        param, grad, state = s.param, s.grad, s.state
        beta1, beta2 = self.hyper["betas"]
        if self.decoupled:
            param.mul_(_each(first, param))
        else:
            grad = grad.add(_each(first, param) * param)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / _each(correction, param)).add_(self.hyper["eps"])
        param.addcdiv_(_each(neg_step_size, param) * state["exp_avg"], denom)

    def _sgd(self, s: _Stacked, decay: torch.Tensor, neg_lr: torch.Tensor) -> None:
        """torch's ``_single_tensor_sgd`` with momentum (no dampening, not Nesterov), with per-member coefficients."""
        param, grad, buffer = s.param, s.grad, s.state["momentum_buffer"]
        grad = grad.add(_each(decay, param) * param)
        buffer.mul_(self.hyper["momentum"]).add_(grad)
        param.add_(_each(neg_lr, param) * buffer)


def _each(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-member values ``[K]`` shaped ``[K, 1, ...]`` to broadcast over ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))
