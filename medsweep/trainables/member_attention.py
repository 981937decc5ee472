"""Attention of a fused cohort's members' queries over keys and values they share, as one call (issue 14).

FPT's prompts (a member's parameters) attend to the frozen keys and values of
the stored tokens, which are the same for every member of a cohort. Under the
cohort's ``vmap`` over members, ``F.scaled_dot_product_attention`` has no
batching rule on CPU (torch runs it member by member through its slow fallback,
which also zero-fills a gradient for the shared keys and values of every
member); there the fused FPT+ step at the paper's scale took 1.41x the time of
its members' standalone steps, with the attention's backward alone 2.5x theirs
(profiled: 4 members of figure 11b's setting).

:class:`SharedKeyAttention` is that attention with a ``vmap`` rule: the members'
queries ``[K, N, H, P, d]`` become ``K x P`` query rows of one call over the
shared ``[N, H, T, d]`` keys, each member's key mask repeated over its own rows.
Attention rows are independent (one softmax per query), so every member's
output is the one its own call gives, to float rounding (the kernel may block a
longer query differently; ``test_shared_key_attention_equals_each_members_own_call``).
Outside ``vmap`` it is plain scaled dot-product attention; its backward
recomputes the forward (portable across the CPU and CUDA kernels, whose saved
statistics differ). Same 4 members after: the fused step 777 ms against 761 ms
for their standalone steps (from 1,076 ms), 640 ms against 616 ms with one keep
ratio (ad-hoc runs, not a benchmark).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


class SharedKeyAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)`` that vmaps over members as one call
    (see the module docstring). ``mask``: bool ``[1, T]`` (or ``[P, T]``) or None."""

    @staticmethod
    def forward(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        query, keys, values, mask = inputs
        ctx.save_for_backward(query, keys, values)
        ctx.mask = mask
        device = query.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The forward again (under the forward's autocast), differentiated for the inputs that need it."""
        device, autocast, dtype = ctx.autocast
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], strict=True)]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            query, keys, values = leaves
            output = F.scaled_dot_product_attention(query, keys, values, attn_mask=ctx.mask)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in leaves), None)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """Members' queries batched, keys and values shared: one call over ``K x P`` query rows."""
        query_dim, keys_dim, values_dim, mask_dim = in_dims
        if query_dim is None or keys_dim is not None or values_dim is not None:
            raise ValueError("SharedKeyAttention vmaps over the members' queries; the keys and values must be shared")
        members = info.batch_size
        query = query.movedim(query_dim, 0)  # [K, N, H, P, d]
        _, n, heads, prompts, head_dim = query.shape
        rows = query.permute(1, 2, 0, 3, 4).reshape(n, heads, members * prompts, head_dim)
        if mask is not None:  # each member's [1 or P, T] mask, repeated over its own P rows
            own = mask.movedim(mask_dim, 0) if mask_dim is not None else mask.expand(members, *mask.shape)
            mask = own.expand(members, prompts, own.shape[-1]).reshape(members * prompts, own.shape[-1])
        output = SharedKeyAttention.apply(rows, keys, values, mask)  # [N, H, K * P, d]
        return output.reshape(n, heads, members, prompts, head_dim).permute(2, 0, 1, 3, 4), 0
