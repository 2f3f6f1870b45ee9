"""FLOPs, latency and memory of a forward: the one place the benchmarks, the recipes and the demo measure them.

FLOPs come from torch's FlopCounterMode (2 per multiply-add). Its registry has formulas for the
CUDA attention kernels but none for the CPU one (`_scaled_dot_product_flash_attention_for_cpu`, torch
2.14), so on CPU it silently counts a ViT's attention as free; this module registers the same
formula for it, which matters most for the full-resolution models, whose attention grows with the
square of the patch count. On the meta device SDPA runs as two matmuls: counted alike, and free.

Models are timed in turns, one call each per round, so load from elsewhere on the machine falls on
all of them alike and their ratios stay meaningful on a busy or small machine. On a GPU the clock is
read once the queued work is done.

Peak memory is what one call adds at its peak: resident memory on the CPU, the caching allocator's
on a GPU. Measured in a fresh process (`peak_memory_in_fresh_process`), nothing an earlier call
allocated or freed blurs it.
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import (
    FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count,
)

__all__ = [
    'count_flops', 'flop_breakdown', 'SpanRecorder', 'synchronize', 'clock', 'time_call', 'time_in_turns',
    'median_latency_ms', 'peak_memory_growth_mb', 'peak_memory_in_fresh_process', 'report_peak_memory',
    'MEMORY_CHILD_FLAG',
]

Device = Union[str, torch.device, None]

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


# --------------------------------------------------------------------------------------------
# FLOPs


class SpanRecorder:
    """Reads `clock` as each of some submodules starts and ends its forward, by hooks, while the `with` block lasts:
    `spans[name]` is the difference for the latest call. With `clock` a timer it times the parts of a call, with a
    FlopCounterMode's running total it counts their FLOPs.

        with SpanRecorder(dict(selector=model.selector, blocks=model.blocks)) as parts:
            model(x)
        parts.spans  # {'selector': seconds, 'blocks': seconds}
    """

    def __init__(self, parts: Dict[str, nn.Module], clock: Callable[[], float] = time.perf_counter):
        self.parts = parts
        self.clock = clock
        self.spans: Dict[str, float] = {}
        self._handles: List[Any] = []

    def __enter__(self) -> 'SpanRecorder':
        for name, module in self.parts.items():
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start(self, name: str):
        def hook(module, args):
            self.spans[name] = -self.clock()
        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            self.spans[name] += self.clock()
        return hook


def flop_breakdown(call: Callable[[], Any], parts: Optional[Dict[str, nn.Module]] = None) -> Dict[str, int]:
    """FLOPs of `call()`, attention included: `total`, and those inside each of `parts` (name: submodule). Autograd
    stays as the caller set it, so a training step's backward is counted where the call runs one."""
    counter = FlopCounterMode(display=False)
    with counter, SpanRecorder(parts or {}, clock=counter.get_total_flops) as recorder:
        call()
    return dict(total=counter.get_total_flops(), **{name: int(flops) for name, flops in recorder.spans.items()})


def count_flops(model: Callable[[Any], Any], x: Any) -> int:
    """FLOPs of one forward of `model` on `x` without autograd, attention included. Free on the meta device: build
    the model under `torch.device('meta')` and pass `torch.empty(..., device='meta')` to count a large one."""
    with torch.no_grad():
        return flop_breakdown(lambda: model(x))['total']


# --------------------------------------------------------------------------------------------
# latency


def synchronize(device: Device = None) -> None:
    """Wait for the work queued on a GPU, so a clock read after it times the work itself; nothing on a CPU."""
    if device is not None and torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def clock(device: Device = None) -> float:
    """time.perf_counter, read once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def time_call(call: Callable[[], Any], device: Device = None) -> float:
    """Seconds of one `call()` on `device`."""
    start = clock(device)
    call()
    return clock(device) - start


def time_in_turns(
        calls: Dict[str, Callable[[], Any]],
        reps: int,
        warmup: int = 1,
        alternate: bool = False,
        device: Device = None,
        report: Optional[Callable[[int, str, float], None]] = None,
) -> Dict[str, List[float]]:
    """Seconds of each of `reps` calls of each of `calls`, the calls taking turns round by round (in reverse order
    every other round with `alternate`, so none always follows the same one). `warmup` untimed calls of each come
    first: allocations and kernel choices are not timed. `report(rep, name, seconds)` hears of each timed call as
    it ends. Autograd and autocast stay as the caller set them, outside the timing."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names[::-1] if alternate and rep % 2 else names):
            seconds[name].append(time_call(calls[name], device))
            if report is not None:
                report(rep, name, seconds[name][-1])
    return seconds


def median_latency_ms(
        models: Dict[str, Callable[[Any], Any]], x: Any, runs: int = 20, warmup: int = 1) -> Dict[str, float]:
    """Median ms per forward of each model on `x`, without autograd; the models take turns in each round."""
    with torch.no_grad():
        seconds = time_in_turns({name: (lambda model=model: model(x)) for name, model in models.items()}, runs, warmup)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


# --------------------------------------------------------------------------------------------
# memory

MEMORY_CHILD_FLAG = '--memory-child'  # the argument a script's fresh process is started with, its spec after it


def _read_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_growth_mb(call: Callable[[], Any]) -> Dict[str, Any]:
    """Resident memory the call adds at its peak: VmHWM (reset first) minus VmRSS before it."""
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets the high-water mark (Linux)
        method = 'VmHWM - VmRSS (/proc, Linux)'
    except OSError:
        method = None
    before = _read_status_kib('VmRSS')
    if method is None or before is None:  # elsewhere: the process-wide peak, an upper bound
        import resource
        call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return dict(peak_mb=peak / 1024, method='ru_maxrss of the process (upper bound)')
    call()
    peak = _read_status_kib('VmHWM')
    # the process's own peak too: the model's parameters and the call's working memory together
    return dict(peak_mb=(peak - before) / 1024, process_peak_mb=peak / 1024, method=method)


def _cuda_peak_growth_mb(call: Callable[[], Any], device: Device) -> Dict[str, Any]:
    """GPU memory the call adds at its peak, from the CUDA caching allocator's statistics."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_mb=(peak - before) / 2 ** 20, process_peak_mb=peak / 2 ** 20,
                method='max_memory_allocated - memory_allocated (CUDA)')


def peak_memory_growth_mb(call: Callable[[], Any], device: Device = 'cpu') -> Dict[str, Any]:
    """Memory one `call()` adds at its peak: `peak_mb`, the process's (or the device's) own peak `process_peak_mb`
    where it can be read, and the `method`. Resident memory on a CPU, the allocator's on a GPU `device`. Anything
    freed earlier in the process may be reused by the call unseen: measure in a fresh process."""
    if device is not None and torch.device(device).type == 'cuda':
        return _cuda_peak_growth_mb(call, device)
    return _peak_rss_growth_mb(call)


def report_peak_memory(call: Callable[[], Any], device: Device = 'cpu') -> None:
    """The fresh process's side of `peak_memory_in_fresh_process`: measure one call and print it for the parent."""
    print(json.dumps(peak_memory_growth_mb(call, device)))


def peak_memory_in_fresh_process(script: Union[str, Path], spec: Dict[str, Any]) -> Dict[str, Any]:
    """`peak_memory_growth_mb` of one call, in a fresh Python process: runs `python SCRIPT --memory-child SPEC` (the
    spec as JSON), whose `--memory-child` path builds the call the spec describes and hands it to
    `report_peak_memory`. Raises RuntimeError, with the probe's last line of errors, where it fails."""
    proc = subprocess.run([sys.executable, str(script), MEMORY_CHILD_FLAG, json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f'exit status {proc.returncode}']
        raise RuntimeError(f'memory probe {Path(script).name} {MEMORY_CHILD_FLAG} failed: {last[0]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])
