"""Step-memory accounting: what the measuring step cannot see is counted from the parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsweep.trainables.memory import optimizer_state_bytes
from medsweep.trainables.optimizers import OPTIMIZER_KINDS


@pytest.mark.parametrize("name", sorted(OPTIMIZER_KINDS))
def test_optimizer_state_bytes_is_what_the_optimizer_allocates_at_its_first_step(name):
    """On a GPU the measuring step (forward and backward, no trace left) never allocates the optimizer's
    state, so a fresh trial's reading adds it from this count: it must be what torch really allocates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 3))
    model[0].requires_grad_(False)  # a frozen part holds no optimizer state
    optimizer = OPTIMIZER_KINDS[name].build([{"params": [p for p in model.parameters() if p.requires_grad]}], 1e-3)
    assert not optimizer.state
    model(torch.randn(8, 32)).sum().backward()
    optimizer.step()

    allocated = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    assert allocated == optimizer_state_bytes(model, name) == (64 * 3 + 3) * 4 * OPTIMIZER_KINDS[name].states
