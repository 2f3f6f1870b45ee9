"""What a model costs: wall-clock time side by side, and FLOPs with attention counted.

Models are timed in turns, one forward each per round, so load from elsewhere on the machine falls
on all of them alike and their ratios stay meaningful on a busy or small machine.

FLOPs come from torch's FlopCounterMode (2 per multiply-add). Its registry has formulas for the
CUDA attention kernels but none for the CPU one (`_scaled_dot_product_flash_attention_for_cpu`, torch
2.14), so on CPU it silently counts a ViT's attention as free; this module registers the same
formula for it, which matters most for the full-resolution models, whose attention grows with the
square of the patch count.
"""
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import (
    FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count,
)

__all__ = ['median_latency_ms', 'count_flops']

_aten = torch.ops.aten
if hasattr(_aten, '_scaled_dot_product_flash_attention_for_cpu'):
    if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if _aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
        @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                    **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of `model` on `x` without autograd, attention included."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def median_latency_ms(
        models: Dict[str, nn.Module], x: torch.Tensor, runs: int = 20, warmup: int = 1) -> Dict[str, float]:
    """Median ms per forward of each model on `x`, without autograd; the models take turns in each round."""
    times: Dict[str, List[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for _ in range(runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}
