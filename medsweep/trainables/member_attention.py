"""Attention of a fused cohort's members as one call under its vmap (issue 14).

FPT's prompts (a member's parameters) attend to the frozen keys and values of
the stored tokens, which are the same for every member of a cohort. Under the
cohort's ``vmap`` over members, ``F.scaled_dot_product_attention`` has no
batching rule on CPU (torch runs it member by member through its slow fallback,
which also zero-fills a gradient for the shared keys and values of every
member); there the fused FPT+ step at the paper's scale took 1.41x the time of
its members' standalone steps, with the attention's backward alone 2.5x theirs
(profiled: 4 members of figure 11b's setting).

:class:`MemberAttention` is that attention with a ``vmap`` rule. Over shared keys
(FPT's prompts), the members' queries ``[K, N, H, P, d]`` become ``K x P`` query
rows of one call over the ``[N, H, T, d]`` keys, each member's key mask repeated
over its own rows. Over keys of their own (the side ViT's self-attention, through
transformers' attention interface :data:`MEMBERS_ATTENTION`), the members become
``K x N`` batch entries of one call. Attention rows and batch entries are
independent (one softmax per query), so every member's output is the one its own
call gives, to float rounding (the kernel may block a longer query differently;
``test_member_attention_equals_each_members_own_call``). Outside ``vmap`` it is
plain scaled dot-product attention; its backward recomputes the forward (portable
across the CPU and CUDA kernels, whose saved statistics differ). On a GPU one call
instead of K also means K times fewer kernel launches.

Same 4 members with the prompts' attention as one call: the fused step 777 ms
against 761 ms for their standalone steps (from 1,076 ms), 640 ms against 616 ms
with one keep ratio (ad-hoc runs, not a benchmark).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import AttentionInterface


class MemberAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)`` that vmaps over a
    cohort's members as one call (see the module docstring)."""

    @staticmethod
    def forward(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        query, keys, values, mask, scale = inputs
        ctx.save_for_backward(query, keys, values)
        ctx.mask, ctx.scale = mask, scale
        device = query.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The forward again (under the forward's autocast), differentiated for the inputs that need it."""
        device, autocast, dtype = ctx.autocast
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], strict=True)]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            query, keys, values = leaves
            output = F.scaled_dot_product_attention(query, keys, values, attn_mask=ctx.mask, scale=ctx.scale)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in leaves), None, None)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
    ) -> tuple[torch.Tensor, int]:
        """One call for all members: their queries as more query rows over shared keys and values, or, where each
        member has its own keys and values, the members as more batch entries."""
        query_dim, keys_dim, values_dim, mask_dim = in_dims[:4]
        members = info.batch_size
        if query_dim is None or (keys_dim is None) != (values_dim is None):
            raise ValueError("MemberAttention vmaps over the members' queries, with keys and values both shared or both per member")
        query = query.movedim(query_dim, 0)  # [K, N, H, P, d]
        _, n, heads, rows, head_dim = query.shape
        if keys_dim is None:  # shared keys: K x P query rows, each member's [1 or P, T] mask over its own rows
            stacked = query.permute(1, 2, 0, 3, 4).reshape(n, heads, members * rows, head_dim)
            if mask is not None:
                own = mask.movedim(mask_dim, 0) if mask_dim is not None else mask.expand(members, *mask.shape)
                mask = own.expand(members, rows, own.shape[-1]).reshape(members * rows, own.shape[-1])
            output = MemberAttention.apply(stacked, keys, values, mask, scale)  # [N, H, K * P, d]
            return output.reshape(n, heads, members, rows, head_dim).permute(2, 0, 1, 3, 4), 0
        if mask_dim is not None:
            raise ValueError("MemberAttention over per-member keys takes one mask for all members")
        assert keys_dim is not None and values_dim is not None
        keys, values = keys.movedim(keys_dim, 0).flatten(0, 1), values.movedim(values_dim, 0).flatten(0, 1)
        output = MemberAttention.apply(query.flatten(0, 1), keys, values, mask, scale)  # [K * N, H, P, d]
        return output.unflatten(0, (members, n)), 0


def members_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention of a ViT layer (no causal mask, no grouped keys, no dropout: the side
    network's) through :class:`MemberAttention`: a fused cohort's side ViT runs every member's self-attention of a
    layer in one call."""
    if dropout or kwargs.get("is_causal") or getattr(module, "num_key_value_groups", 1) > 1:
        raise ValueError("members' attention covers ViT self-attention without dropout, causal masks or grouped keys")
    return MemberAttention.apply(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


MEMBERS_ATTENTION = "medsweep_members"  # the attn_implementation name a fused cohort's side ViT uses
AttentionInterface.register(MEMBERS_ATTENTION, members_attention_forward)
