"""How each optimizer of ``spaces.OPTIMIZERS`` is built, and the state it keeps per parameter.

The names are the vocabulary of :data:`medsweep.spaces.OPTIMIZERS` (which the
``optimizer`` rule accepts); this table is what each name means here, and
importing it fails if the two ever list different names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medsweep.spaces import OPTIMIZERS


@dataclass(frozen=True)
class Optimizer:
    """One optimizer: its constructor over param groups and its state tensors per learnable tensor."""

    build: Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]
    states: int


OPTIMIZER_KINDS: dict[str, Optimizer] = {
    "adamw": Optimizer(lambda groups, lr: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999)), states=2),
    "sgd": Optimizer(lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9), states=1),
    # L2 through weight_decay, as the cross-domain and TTL code
    "adam": Optimizer(lambda groups, lr: torch.optim.Adam(groups, lr=lr), states=2),
}
if set(OPTIMIZER_KINDS) != set(OPTIMIZERS):
    raise ImportError(f"optimizers built here {sorted(OPTIMIZER_KINDS)} differ from spaces.OPTIMIZERS {sorted(OPTIMIZERS)}")
