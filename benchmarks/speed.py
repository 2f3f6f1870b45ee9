#!/usr/bin/env python
"""LookWhere's speed, FLOPs and memory against the ViT it replaces, measured side by side in one run.

    python benchmarks/speed.py           # the full run (about 15 min on a 2-core CPU)
    python benchmarks/speed.py --quick   # 518 px only, under 3 min
    python benchmarks/speed.py --device cuda --amp     # on a GPU, in bfloat16 autocast

Compared in each group (same resolution and batch, models alternated rep by rep):
  - `vit_base_patch14_reg4_dinov2` on the full image (LookWhere's extractor without selection);
  - `lookwhere_vitb_518` at each k_ratio (cls output, and dense output where asked);
  - the same ViT on a low-res copy with as many patch tokens as LookWhere keeps (the resize counted).
Weights are random (timm's init): speed does not depend on them, and nothing is downloaded.

Writes <out>/speed.json, <out>/speed.md and PNG plots, and prints the Markdown table.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import timm
import timm_lookwhere  # noqa: F401  (registers the LookWhere models)
from timm_lookwhere.cost import (
    SpanRecorder, clock, flop_breakdown, peak_memory_in_fresh_process, report_peak_memory, time_in_turns,
)

BASELINE = 'vit_base_patch14_reg4_dinov2'
LOOKWHERE = 'lookwhere_vitb_518'
PATCH = 14
NUM_CLASSES = 1000
# A randomised tiny architecture that checks the script end to end in seconds; its numbers mean nothing.
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
TINY_LOOKWHERE = dict(TINY_VIT, selector_img_size=42, selector_depth=1, map_grid=8)

# The targets, each checked against this run's measurements (never asserted in tests).
TARGETS = [
    dict(name='inference speed-up over the full ViT', task='infer', size=518, batch=4, k_ratio=0.1,
         metric='speedup', op='>=', limit=9.0),
    dict(name='inference speed-up over the full ViT', task='infer', size=1036, batch=1, k_ratio=0.05,
         metric='speedup', op='>=', limit=25.0),
    dict(name="share of LookWhere's time outside the extractor's blocks", task='infer', size=518, batch=4,
         k_ratio=0.1, metric='outside_blocks', op='<=', limit=0.10),
    dict(name='dense output time / cls output time', task='infer', size=1036, batch=1, k_ratio=0.1,
         metric='dense_over_cls', op='<=', limit=1.15),
    dict(name='training-step speed-up over the full ViT', task='train', size=518, batch=8, k_ratio=0.1,
         metric='speedup', op='>=', limit=7.0),
]


# ------------------------------------------------------------------------------------------------
# what to measure


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One model configuration in a group: `family` is 'vit' (full image), 'lookwhere' or 'lowres'."""
    family: str
    size: int
    k_ratio: Optional[float] = None
    output: str = 'cls'  # 'cls' or 'dense' (LookWhere only)

    @property
    def key(self) -> str:
        k = '' if self.k_ratio is None else f'@{self.k_ratio:g}'
        return f'{self.family}{"-dense" if self.output == "dense" else ""}{k}'


@dataclasses.dataclass
class Group:
    """Candidates timed against each other: same task ('infer' or 'train'), resolution and batch."""
    task: str
    size: int
    batch: int
    candidates: List[Candidate]

    @property
    def title(self) -> str:
        task = 'inference' if self.task == 'infer' else 'training step (forward + backward + AdamW)'
        return f'{task}, {self.size} px, batch {self.batch}'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='518 px, batch 1 and the batch-4 target, 2 reps')
    parser.add_argument('--sizes', type=int, nargs='+', help='resolutions compared with the full ViT')
    parser.add_argument('--lookwhere-only-sizes', type=int, nargs='*',
                        help='resolutions where LookWhere runs alone (the full ViT is too slow there)')
    parser.add_argument('--lookwhere-only-k-ratios', type=float, nargs='+', default=[0.05, 0.1])
    parser.add_argument('--batches', type=int, nargs='+', help='inference batch sizes')
    parser.add_argument('--k-ratios', type=float, nargs='+', default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument('--target-batch', type=int, default=4,
                        help='extra inference batch at the first size, k_ratio 0.1 only (0: none)')
    parser.add_argument('--dense-sizes', type=int, nargs='*',
                        help='sizes where forward_dense is timed too (smallest and target batch only)')
    parser.add_argument('--dense-k-ratio', type=float, default=0.1)
    parser.add_argument('--train-batch', type=int, help='training-step batch at the first size (0: none)')
    parser.add_argument('--train-k-ratio', type=float, default=0.1)
    parser.add_argument('--reps', type=int, help='timed repetitions per model (after one warm-up)')
    parser.add_argument('--max-tflop', type=float, default=2.45,
                        help='skip inference calls (and memory probes) costing more, to keep the full run near '
                             '15 min; a low-res ViT goes with the LookWhere of its k')
    parser.add_argument('--warmup-below-tflop', type=float, default=0.5,
                        help='warm-up call only for calls cheaper than this; longer ones amortise one-time costs')
    parser.add_argument('--memory', choices=['all', 'k0.1', 'none'],
                        help='peak memory (a fresh process per configuration) for every model, for the full ViT '
                             'and k_ratio 0.1 only (the default), or none (the default with --quick)')
    parser.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch\'s own)')
    add_device_arguments(parser)
    parser.add_argument('--tiny', action='store_true',
                        help='a tiny random architecture (embed 32, 2 blocks) to check the script quickly')
    parser.add_argument('--out', type=Path, help='output folder (default benchmarks/results[/quick])')
    parser.add_argument('--no-plots', action='store_true')
    parser.add_argument('--dry-run', action='store_true', help='print the plan and its FLOPs, run nothing')
    parser.add_argument('--memory-child', help=argparse.SUPPRESS)  # internal: one memory probe
    args = parser.parse_args(argv)
    return fill_defaults(args)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where the models run: cpu, cuda, cuda:1, ... (default: cuda when there is one)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast (CPU and GPU)')


def autocast(args: argparse.Namespace):
    """bfloat16 autocast on the run's device with --amp, else nothing."""
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = dict(
        sizes=[518] if quick else [518, 1036],
        lookwhere_only_sizes=[] if quick else [2072],
        batches=[1] if quick else [1, 8],
        dense_sizes=[518] if quick else [518, 1036],
        train_batch=2 if quick else 8,
        reps=2 if quick else 3,
        memory='none' if quick else 'k0.1',
        out=Path(__file__).resolve().parent / 'results' / ('quick' if quick else ''),
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for size in args.sizes + args.lookwhere_only_sizes:
        if size % PATCH:
            raise SystemExit(f'sizes must be multiples of {PATCH}, got {size}')
    if args.reps < 1:
        raise SystemExit('--reps must be at least 1')
    return args


def plan_groups(args: argparse.Namespace) -> List[Group]:
    """The groups of the run, ordered by size so models built for one are reused by the next."""
    groups = []
    for size in args.sizes:
        batches = list(args.batches)
        if size == args.sizes[0] and args.target_batch and args.target_batch not in batches:
            batches.insert(1 if batches[0] < args.target_batch else 0, args.target_batch)
        for batch in batches:
            ratios = [0.1] if batch == args.target_batch and batch not in args.batches else args.k_ratios
            dense = size in args.dense_sizes and batch in (min(args.batches), args.target_batch)
            groups.append(Group('infer', size, batch, inference_candidates(size, ratios, args, dense)))
        if size == args.sizes[0] and args.train_batch:
            k = args.train_k_ratio
            groups.append(Group('train', size, args.train_batch,
                                [Candidate('vit', size), Candidate('lookwhere', size, k),
                                 Candidate('lowres', size, k)]))
    for size in args.lookwhere_only_sizes:
        for batch in args.batches:
            cands = [Candidate('lookwhere', size, k) for k in args.lookwhere_only_k_ratios]
            groups.append(Group('infer', size, batch, cands))
    return groups


def inference_candidates(size: int, ratios: Sequence[float], args: argparse.Namespace,
                         dense: bool) -> List[Candidate]:
    cands = [Candidate('vit', size)]
    cands += [Candidate('lookwhere', size, k) for k in ratios]
    if dense and args.dense_k_ratio in ratios:
        cands.append(Candidate('lookwhere', size, args.dense_k_ratio, output='dense'))
    cands += [Candidate('lowres', size, k) for k in ratios]
    return cands


# ------------------------------------------------------------------------------------------------
# models


class ModelZoo:
    """Builds the models a group needs, on `device` ('cpu' to run, 'meta' to count FLOPs for free)."""

    def __init__(self, tiny: bool = False, device: str = 'cpu'):
        self.vit_arch = TINY_VIT if tiny else {}
        self.lookwhere_arch = TINY_LOOKWHERE if tiny else {}
        self.device = device
        self._cache: Dict[tuple, torch.nn.Module] = {}
        self._kept: Dict[tuple, int] = {}

    def lookwhere(self, size: int) -> torch.nn.Module:
        return self._get(('lookwhere', size), lambda: timm.create_model(
            LOOKWHERE, img_size=size, num_classes=NUM_CLASSES, **self.lookwhere_arch))

    def vit(self, size: int) -> torch.nn.Module:
        return self._get(('vit', size), lambda: timm.create_model(
            BASELINE, img_size=size, num_classes=NUM_CLASSES, **self.vit_arch))

    def kept_tokens(self, size: int, k_ratio: float) -> int:
        """Patches LookWhere keeps at this size and ratio (its own rule, read off a meta-device model)."""
        if (size, k_ratio) not in self._kept:
            with torch.device('meta'):
                model = timm.create_model(LOOKWHERE, img_size=size, k_ratio=k_ratio, **self.lookwhere_arch)
            self._kept[size, k_ratio] = model.k
        return self._kept[size, k_ratio]

    def lowres_size(self, size: int, k_ratio: float) -> int:
        """Side of the low-res copy whose patch grid is closest to the k LookWhere keeps."""
        return PATCH * max(1, round(math.sqrt(self.kept_tokens(size, k_ratio))))

    def keep_only(self, groups: Sequence[Group]) -> None:
        """Drop cached models no remaining group needs (a ViT-B is 350 MB)."""
        needed = set()
        for group in groups:
            for cand in group.candidates:
                needed.add(('lookwhere', cand.size) if cand.family == 'lookwhere' else
                           ('vit', cand.size if cand.family == 'vit' else self.lowres_size(cand.size, cand.k_ratio)))
        for key in list(self._cache):
            if key not in needed:
                del self._cache[key]

    def _get(self, key: tuple, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if key not in self._cache:
            with torch.device(self.device):
                self._cache[key] = build().eval()
        return self._cache[key]


def inference_call(cand: Candidate, zoo: ModelZoo) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward a user of this model runs, from the high-res batch."""
    if cand.family == 'vit':
        return zoo.vit(cand.size)
    if cand.family == 'lowres':
        side = zoo.lowres_size(cand.size, cand.k_ratio)
        vit = zoo.vit(side)
        return lambda x: vit(F.interpolate(x, size=(side, side), mode='bilinear', antialias=True))
    model = zoo.lookwhere(cand.size)

    def call(x):
        model.set_k(k_ratio=cand.k_ratio)  # one model per size, shared by the ratios
        return model.forward_dense(x) if cand.output == 'dense' else model(x)
    return call


class TrainStep:
    """One optimiser step: forward, cross-entropy on random labels, backward, AdamW."""

    def __init__(self, cand: Candidate, zoo: ModelZoo):
        if cand.family == 'lookwhere':
            self.model = zoo.lookwhere(cand.size)
            self.model.set_k(k_ratio=cand.k_ratio)
            self.forward = self.model
        else:
            side = cand.size if cand.family == 'vit' else zoo.lowres_size(cand.size, cand.k_ratio)
            self.model = zoo.vit(side)
            self.forward = self.model if side == cand.size else (
                lambda x: self.model(F.interpolate(x, size=(side, side), mode='bilinear', antialias=True)))
        self.model.train()  # LookWhere keeps its frozen selector in eval and out of the optimiser
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x), labels)
        loss.backward()
        self.optimizer.step()
        return loss


# ------------------------------------------------------------------------------------------------
# FLOPs (meta device: nothing is computed) and peak memory (a fresh process per configuration), by cost.py


def count_flops(cand: Candidate, task: str, batch: int, meta_zoo: ModelZoo) -> Dict[str, int]:
    """FLOPs of one call at this batch, attention included (on meta, SDPA runs as two matmuls):
    `total`, and for LookWhere inference the FLOPs inside the `selector` and the extractor's `blocks`.
    Counted for one image (every op here is per image) and scaled."""
    return {part: batch * flops for part, flops in _count_flops_per_image(cand, task, meta_zoo).items()}


@functools.lru_cache(maxsize=None)
def _count_flops_per_image(cand: Candidate, task: str, meta_zoo: ModelZoo) -> Dict[str, int]:
    x = torch.empty(1, 3, cand.size, cand.size, device='meta')
    if task == 'train':
        step = TrainStep(cand, meta_zoo)
        flops = flop_breakdown(
            lambda: F.cross_entropy(step.forward(x), torch.zeros(1, dtype=torch.long, device='meta')).backward())
        step.model.eval()
        return flops
    call = inference_call(cand, meta_zoo)
    return flop_breakdown(lambda: call(x), lookwhere_parts(meta_zoo.lookwhere(cand.size))
                          if cand.family == 'lookwhere' else None)


def lookwhere_parts(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The parts of a LookWhere call whose time and FLOPs are reported: the selector and the extractor's blocks."""
    return dict(selector=model.selector, blocks=model.blocks)


def memory_child(spec: str) -> None:
    """Entry point of one memory probe: build, make the input, then measure one call."""
    spec = json.loads(spec)
    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    args = argparse.Namespace(device=spec['device'], amp=spec['amp'])
    cand = Candidate(**spec['candidate'])
    zoo = ModelZoo(tiny=spec['tiny'], device=args.device)
    x = torch.randn(spec['batch'], 3, cand.size, cand.size, device=args.device)
    if spec['task'] == 'train':
        step = TrainStep(cand, zoo)
        labels = torch.randint(0, NUM_CLASSES, (spec['batch'],), device=args.device)
        with autocast(args):
            report_peak_memory(lambda: step(x, labels), args.device)
    else:
        call = inference_call(cand, zoo)
        with torch.inference_mode(), autocast(args):
            report_peak_memory(lambda: call(x), args.device)


def measure_memory(cand: Candidate, group: Group, args: argparse.Namespace) -> Optional[Dict[str, object]]:
    spec = dict(candidate=dataclasses.asdict(cand), task=group.task, batch=group.batch, tiny=args.tiny,
                threads=args.threads, device=args.device, amp=args.amp)
    try:
        return peak_memory_in_fresh_process(__file__, spec)
    except RuntimeError as e:
        log(f'{cand.key}: {e}')
        return None


def wants_memory(cand: Candidate, args: argparse.Namespace, flops_per_call: float) -> bool:
    """Memory probes cost one more call each: only for calls within --max-tflop."""
    if args.memory == 'none' or flops_per_call > args.max_tflop * 1e12:
        return False
    return args.memory == 'all' or cand.family == 'vit' or cand.k_ratio == 0.1


# ------------------------------------------------------------------------------------------------
# timing


_START = time.perf_counter()


def log(message: str) -> None:
    print(f'[{time.perf_counter() - _START:7.1f}s] {message}', file=sys.stderr, flush=True)


def time_group(group: Group, zoo: ModelZoo, skip: Dict[str, str], args: argparse.Namespace,
               flops: Dict[str, int]) -> Dict[str, Dict[str, List[float]]]:
    """Times every candidate `reps` times, taking turns (order reversed every other rep); for LookWhere inference
    also the selector's and the extractor blocks' share of each call."""
    torch.manual_seed(0)
    x = torch.randn(group.batch, 3, group.size, group.size, device=args.device)
    labels = torch.randint(0, NUM_CLASSES, (group.batch,), device=args.device)
    active = {c.key: c for c in group.candidates if c.key not in skip}
    calls = {key: make_call(cand, group, zoo, x, labels) for key, cand in active.items()}
    samples = {key: dict(seconds=[], selector=[], blocks=[]) for key in active}
    spanned = {key for key, c in active.items() if group.task == 'infer' and c.family == 'lookwhere'}
    spans = SpanRecorder(lookwhere_parts(zoo.lookwhere(group.size)) if spanned else {},  # one model per size
                         clock=lambda: clock(args.device))

    def record(rep: int, key: str, seconds: float) -> None:
        samples[key]['seconds'].append(seconds)
        if key in spanned:
            for name, value in spans.spans.items():
                samples[key][name].append(value)
        log(f'{group.title}: rep {rep + 1}/{args.reps} {label(active[key], zoo)}: {seconds:.3f} s')

    grad = torch.inference_mode() if group.task == 'infer' else contextlib.nullcontext()
    with grad, autocast(args), spans:
        for key in active:  # warm-up: first-call costs (allocations, kernel selection) are not timed
            if flops[key]['total'] < args.warmup_below_tflop * 1e12:
                calls[key]()
        time_in_turns(calls, args.reps, warmup=0, alternate=True, device=args.device, report=record)
    if group.task == 'train':
        zoo.keep_only([])  # the trained models are not reused for inference
    return samples


def make_call(cand: Candidate, group: Group, zoo: ModelZoo, x: torch.Tensor,
              labels: torch.Tensor) -> Callable[[], object]:
    """A closure that runs the candidate once: a training step, or the forward a user runs (the caller sets
    inference mode and autocast)."""
    if group.task == 'train':
        step = TrainStep(cand, zoo)
        return lambda: step(x, labels)
    call = inference_call(cand, zoo)
    return lambda: call(x)


# ------------------------------------------------------------------------------------------------
# summary


def label(cand: Candidate, zoo: ModelZoo) -> str:
    if cand.family == 'vit':
        return f'ViT-B/14 full image ({cand.size} px)'
    if cand.family == 'lowres':
        side = zoo.lowres_size(cand.size, cand.k_ratio)
        return f'ViT-B/14 low-res copy ({side} px, {(side // PATCH) ** 2} patches)'
    dense = ', dense' if cand.output == 'dense' else ''
    return f'LookWhere k_ratio {cand.k_ratio:g} (k={zoo.kept_tokens(cand.size, cand.k_ratio)}{dense})'


def spread(values: Sequence[float]) -> Dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Dict[str, float]:
    """Rep-by-rep ratios: both models ran in the same rep, under the same machine load."""
    return spread([n / d for n, d in zip(numerators, denominators)])


def summarize_group(group: Group, samples, flops, memory, skip, zoo) -> List[Dict[str, object]]:
    rows = []
    base = samples.get(Candidate('vit', group.size).key)
    for cand in group.candidates:
        row = dict(task=group.task, size=group.size, batch=group.batch, key=cand.key, family=cand.family,
                   k_ratio=cand.k_ratio, output=cand.output, label=label(cand, zoo),
                   gflop_per_image=flops[cand.key]['total'] / group.batch / 1e9, peak_mb=memory.get(cand.key))
        if 'blocks' in flops[cand.key]:
            row['flop_share'] = {part: flops[cand.key][part] / flops[cand.key]['total']
                                 for part in ('selector', 'blocks')}
        if cand.key in skip:
            rows.append(dict(row, skipped=skip[cand.key]))
            continue
        seconds = samples[cand.key]['seconds']
        row.update(seconds=spread(seconds), images_per_s=group.batch / statistics.median(seconds), raw=seconds)
        if base and cand.family != 'vit':
            row['speedup'] = paired_ratios(base['seconds'], seconds)
            row['flop_ratio'] = flops[Candidate('vit', group.size).key]['total'] / flops[cand.key]['total']
        if cand.family == 'lookwhere' and samples[cand.key]['blocks']:
            row.update(time_shares(samples[cand.key]))
        if cand.output == 'dense':
            cls = samples.get(dataclasses.replace(cand, output='cls').key)
            if cls:
                row['dense_over_cls'] = paired_ratios(seconds, cls['seconds'])
        rows.append(row)
    return rows


def time_shares(sample: Dict[str, List[float]]) -> Dict[str, Dict[str, float]]:
    """Shares of the call: selector, extractor blocks, and everything else (top-k, gather, fill...)."""
    total, sel, blocks = sample['seconds'], sample['selector'], sample['blocks']
    return dict(
        selector_share=spread([s / t for s, t in zip(sel, total)]),
        outside_blocks=spread([1 - b / t for b, t in zip(blocks, total)]),
        overhead_share=spread([1 - (b + s) / t for s, b, t in zip(sel, blocks, total)]),
    )


def flop_bound(row: Dict[str, object], metric: str) -> Optional[float]:
    """What the metric would be if time followed FLOPs exactly (None where FLOPs say nothing)."""
    if metric == 'speedup':
        return row.get('flop_ratio')
    if metric == 'outside_blocks':
        return 1 - row['flop_share']['blocks']
    return None


def check_targets(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    results = []
    for target in TARGETS:
        output = 'dense' if target['metric'] == 'dense_over_cls' else 'cls'
        match = [r for r in rows if r['task'] == target['task'] and r['size'] == target['size']
                 and r['batch'] == target['batch'] and r['family'] == 'lookwhere'
                 and r['k_ratio'] == target['k_ratio'] and r['output'] == output and target['metric'] in r]
        result = dict(target, measured=None, holds=None, flop_bound=None)
        if match:
            value = match[0][target['metric']]
            result['measured'] = value
            result['flop_bound'] = flop_bound(match[0], target['metric'])
            median = value['median']
            result['holds'] = median >= target['limit'] if target['op'] == '>=' else median <= target['limit']
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------------
# main


def machine_info(args: argparse.Namespace) -> Dict[str, object]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                   if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                timm=timm.__version__, python=platform.python_version(), platform=platform.platform(),
                load_average_start=os.getloadavg(), device=args.device, amp='bfloat16' if args.amp else None)
    if torch.device(args.device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(args.device)
    return info


def plan_flops(group: Group, meta_zoo: ModelZoo, args: argparse.Namespace):
    """FLOPs of each candidate's call, and the candidates skipped for costing over --max-tflop."""
    flops = {c.key: count_flops(c, group.task, group.batch, meta_zoo) for c in group.candidates}

    def over_cap(cand: Candidate) -> bool:
        # a low-res ViT goes with the LookWhere of its k, so the k sweep stays paired
        partner = Candidate('lookwhere', cand.size, cand.k_ratio) if cand.family == 'lowres' else cand
        cost = max(flops[cand.key]['total'], flops.get(partner.key, flops[cand.key])['total'])
        return cost > args.max_tflop * 1e12
    skip = {c.key: f'over --max-tflop {args.max_tflop:g}' for c in group.candidates
            if group.task == 'infer' and over_cap(c)}
    return flops, skip


def planned_tflop(group: Group, flops, skip, args: argparse.Namespace) -> float:
    """TFLOPs the group will run: warm-ups, timed reps and memory probes."""
    total = 0
    for cand in group.candidates:
        if cand.key in skip:
            continue
        per_call = flops[cand.key]['total']
        calls = args.reps + (per_call < args.warmup_below_tflop * 1e12) + wants_memory(cand, args, per_call)
        total += calls * per_call
    return total / 1e12


def run(args: argparse.Namespace, command: str) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(args)
    groups = plan_groups(args)
    zoo, meta_zoo = ModelZoo(args.tiny, device=args.device), ModelZoo(args.tiny, device='meta')
    where = info.get('gpu', f'{info["torch_threads"]} threads on {info["cpu"]}')
    log(f'{len(groups)} groups, {args.reps} reps, {where}' + (', bfloat16 autocast' if args.amp else ''))
    rows = []
    for i, group in enumerate(groups):
        flops, skip = plan_flops(group, meta_zoo, args)
        log(f'{group.title}: {len(group.candidates) - len(skip)} models, '
            f'{planned_tflop(group, flops, skip, args):.1f} TFLOP to run'
            + (f', skipped: {sorted(skip)}' if skip else ''))
        for cand in group.candidates:
            log(f'    {cand.key}: {flops[cand.key]["total"] / 1e12:.2f} TFLOP per call')
        if args.dry_run:
            continue
        zoo.keep_only(groups[i:])
        samples = time_group(group, zoo, skip, args, flops)
        memory = {}
        for cand in group.candidates:
            if cand.key not in skip and wants_memory(cand, args, flops[cand.key]['total']):
                memory[cand.key] = measure_memory(cand, group, args)
                log(f'{group.title}: memory {label(cand, zoo)}: {memory[cand.key]}')
        rows += summarize_group(group, samples, flops, memory, skip, zoo)
    info['load_average_end'] = os.getloadavg()
    return dict(machine=info, command=command, rows=rows, targets=check_targets(rows),
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return {}
    from report import write_report  # next to this file
    results = run(args, command=' '.join(['python benchmarks/speed.py'] + argv))
    if args.dry_run:
        return results
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = write_report(results, args.out, plots=not args.no_plots)
    print(markdown)
    return results


if __name__ == '__main__':
    main()
