"""FLOP counts of the two paths a sweep runs, and the matmul rate they are compared with.

``torch.utils.flop_counter.FlopCounterMode`` knows matmuls, convolutions and
the CUDA attention kernels, but not the CPU fused attention
(``_scaled_dot_product_flash_attention_for_cpu``) that HF ViTs call through
``scaled_dot_product_attention`` here: without a formula for it every
attention layer would count as free. We register the same formula the
counter uses for the CUDA kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from medsweep.trainables.methods import Method


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) of everything ``fn`` runs."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        fn()
    return int(counter.get_total_flops())


def frozen_flops_per_image(method: Method, batch: int = 4) -> int:
    """Forward FLOPs of the frozen path (what the preload runs once per image)."""
    size = method.image_inputs()[method.frozen_input].size
    images = torch.randn(batch, 3, size, size)
    return count_flops(lambda: method.frozen_features(images)) // batch


def side_forward_flops_per_sample(method: Method, batch: int = 16) -> int:
    """Forward FLOPs of one training sample with preloaded features (the trial's model)."""
    frozen_size = method.image_inputs()[method.frozen_input].size
    shapes = {k: v.shape[1:] for k, v in method.frozen_features(torch.zeros(1, 3, frozen_size, frozen_size)).items()}
    inputs = {k: torch.randn(batch, *shape) for k, shape in shapes.items()}
    for name, spec in method.stored_inputs(preloaded=True).items():
        inputs[name] = torch.randn(batch, 3, spec.size, spec.size)
    method.train()
    return count_flops(lambda: method(inputs)) // batch


def cuda_matmul_rate(dtype: torch.dtype = torch.bfloat16, n: int = 8192, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an ``n x n`` matmul on the GPU in ``dtype`` (a trial's ``auto`` precision there):
    the floor of a sweep whose trials train on a GPU."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    a @ b  # warm-up: cuBLAS handles and kernel choice
    torch.cuda.synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def matmul_rate(threads: int, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an ``n x n`` fp32 matmul at ``threads`` torch threads (best of the repeats)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: thread pool and caches
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)
