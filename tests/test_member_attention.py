"""MemberAttention: a fused cohort's members attend in one call, over keys they share or keys of their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from medsweep.trainables.member_attention import MemberAttention

MEMBERS, BATCH, HEADS, PROMPTS, TOKENS, HEAD_DIM = 3, 6, 2, 4, 9, 8


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(MEMBERS, BATCH, HEADS, PROMPTS, HEAD_DIM, generator=generator, requires_grad=True)
    keys, values = (torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, generator=generator) for _ in range(2))
    masks = torch.stack([(torch.arange(TOKENS) < keep).unsqueeze(0) for keep in (3, 9, 6)])  # [K, 1, T]: keep ratios
    weights = torch.randn(MEMBERS, BATCH, HEADS, PROMPTS, HEAD_DIM, generator=generator)
    return queries, keys, values, masks, weights


def _vmapped(queries, keys, values, masks):
    return vmap(lambda query, mask: MemberAttention.apply(query, keys, values, mask, None))(queries, masks)


def _one_call_per_member(queries, keys, values, masks):
    return torch.stack([F.scaled_dot_product_attention(queries[k], keys, values, masks[k]) for k in range(MEMBERS)])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_member_attention_equals_each_members_own_call(precision):
    """Outputs and the queries' gradients under vmap equal each member's own attention call (in fp32 to float
    rounding: the kernel blocks a longer query differently; under bf16 autocast to bf16 rounding), and a member's
    masked keys get no attention."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    results = []
    for fused_call in (True, False):
        queries, keys, values, masks, weights = _inputs()
        with autocast:
            output = _vmapped(queries, keys, values, masks) if fused_call else _one_call_per_member(queries, keys, values, masks)
        (output.float() * weights).sum().backward()
        results.append((output.detach().float(), queries.grad))
    (fused, fused_grad), (alone, alone_grad) = results
    torch.testing.assert_close(fused, alone, **tolerance)
    torch.testing.assert_close(fused_grad, alone_grad, **tolerance)
    queries, keys, values, masks, _ = _inputs()
    changed = values.clone()
    changed[:, :, 3:] += 100.0  # beyond the first member's 3 kept keys
    with autocast:
        moved = _vmapped(queries, keys, changed, masks).detach().float()
    torch.testing.assert_close(moved[0], fused[0], **tolerance)
    assert not torch.allclose(moved[1], fused[1], atol=1e-2)  # the second member keeps all 9: it sees the change


def test_members_with_keys_of_their_own_attend_as_more_batch_entries():
    """The side ViT's self-attention: each member's own queries, keys and values; one call, each member's output
    and gradients its own call's."""
    generator = torch.Generator().manual_seed(1)
    per_member = [torch.randn(MEMBERS, BATCH, HEADS, TOKENS, HEAD_DIM, generator=generator, requires_grad=True) for _ in range(3)]
    weights = torch.randn(MEMBERS, BATCH, HEADS, TOKENS, HEAD_DIM, generator=generator)
    fused = vmap(lambda q, k, v: MemberAttention.apply(q, k, v, None, HEAD_DIM**-0.5))(*per_member)
    (fused * weights).sum().backward()
    fused_grads = [t.grad.clone() for t in per_member]
    for t in per_member:
        t.grad = None
    alone = torch.stack([F.scaled_dot_product_attention(*(t[k] for t in per_member), scale=HEAD_DIM**-0.5) for k in range(MEMBERS)])
    (alone * weights).sum().backward()
    torch.testing.assert_close(fused, alone, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, (t.grad for t in per_member), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_member_attention_refuses_what_it_cannot_batch_as_one_call():
    queries, keys, values, masks, _ = _inputs()
    per_member_keys = keys.expand(MEMBERS, *keys.shape).clone()
    with pytest.raises(ValueError, match="both shared or both per member"):
        vmap(lambda q, k, m: MemberAttention.apply(q, k, values, m, None))(queries, per_member_keys, masks)
    per_member_values = values.expand(MEMBERS, *values.shape).clone()
    with pytest.raises(ValueError, match="one mask for all members"):
        vmap(lambda q, k, v, m: MemberAttention.apply(q, k, v, m, None))(queries, per_member_keys, per_member_values, masks)
