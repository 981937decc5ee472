"""Layer-wise learning-rate decay for ViT backbones (``layer_decay``), as MAE fine-tuning does it.

LoRA-medical fine-tunes with the MAE code, whose ``param_groups_lrd`` gives
block ``i`` (0-based) of an ``L``-block ViT the lr scale ``decay ** (L - i)``,
the patch, position and class embeddings ``decay ** (L + 1)``, and everything
after the blocks (final norm, head) scale 1: layers near the input, which
hold the most general features, move least.

Blocks are found by parameter name, as Hugging Face names them whatever the
wrapper: ``<root>layers.<i>.`` or ``<root>layer.<i>.`` with the embeddings at
``<root>embeddings.`` (ViT, DINO) or, when ``root`` ends with ``encoder.``,
beside that encoder (CLIP's ``vision_model.encoder.layers`` and
``vision_model.embeddings``). A model with several ViTs (FPT's frozen model
and side network) decays each over its own depth. Parameters of no such
stack (a side network's fusion, adapters, prompts, heads) keep scale 1.
ResNet and ConvNeXt stages also hold ``layers.<i>`` but no ``embeddings``
beside them, so they are no ViT stack here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from medsweep.errors import ConfigError

_BLOCK = re.compile(r"^(.*?)layers?\.(\d+)\.")
EMBEDDINGS = "embeddings."


def _embedding_root(root: str, names: set[str]) -> str | None:
    """Where the embeddings of the blocks under ``root`` live, or None (not a ViT stack)."""
    candidates = (root, root[: -len("encoder.")]) if root.endswith("encoder.") else (root,)
    for candidate in candidates:
        if any(name.startswith(candidate + EMBEDDINGS) for name in names):
            return candidate
    return None


def layer_scales(names: Iterable[str], decay: float, owner: str) -> dict[str, float]:
    """The lr scale of every parameter name (all of a model's, frozen ones included, so depths are whole).

    ``decay`` 1 gives 1 everywhere. Otherwise a model without any ViT stack is
    refused (``owner`` names it in the message): the setting would do nothing.
    """
    names = list(names)
    if decay == 1:
        return dict.fromkeys(names, 1.0)
    name_set = set(names)
    depth: dict[str, int] = {}  # block root -> number of blocks
    embeddings: dict[str, str] = {}  # embedding root -> its block root
    roots: dict[str, str | None] = {}  # block root -> its embedding root, once per root
    for name in names:
        match = _BLOCK.match(name)
        if match is None:
            continue
        root = match.group(1)
        if root not in roots:
            roots[root] = _embedding_root(root, name_set)
        embedding_root = roots[root]
        if embedding_root is not None:
            depth[root] = max(depth.get(root, 0), int(match.group(2)) + 1)
            embeddings[embedding_root] = root
    if not depth:
        raise ConfigError(f"layer_decay {decay:g} needs a ViT backbone (blocks and embeddings); {owner} has none: set layer_decay 1")
    scales: dict[str, float] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match is not None and match.group(1) in depth:
            scales[name] = decay ** (depth[match.group(1)] - int(match.group(2)))
            continue
        embedded = next((root for root in embeddings if name.startswith(root + EMBEDDINGS)), None)
        scales[name] = decay ** (depth[embeddings[embedded]] + 1) if embedded is not None else 1.0
    return scales
