#!/usr/bin/env python
"""One LookWhere for every image size, from 518 px to a 4K frame: time and memory, side by side.

At each size (H x W, multiples of 14), models taking turns call by call:
  - dynamic: one `lookwhere_vitb_518` built with dynamic_img_size=True for the whole run (position
    embeddings stored at 37x37, interpolated at the k chosen patches of each call);
  - fixed: `lookwhere_vitb_518` built for that size (position embeddings resized once, at creation);
  - timm's `vit_base_patch14_reg4_dinov2` with dynamic_img_size=True on every patch, where a call costs
    at most --max-vit-tflop (its attention grows with the square of the patches);
at each k_ratio, with the classification output (cls) and the dense one (forward_dense). Memory is
measured in a fresh process per configuration, the median of --memory-probes of them: the peak a
call adds, and the process's peak during it, the model's parameters included (resident memory on the
CPU, the allocator's on a GPU). Weights are random (speed does not depend on them). Writes
native_resolution.{json,md,png} to --out.

    python benchmarks/native_resolution.py                   # 5 sizes up to 2156x3836, about 40 min on 2 cores
    python benchmarks/native_resolution.py --quick           # 518 px and 4K at k_ratio 0.01, about 4 min
    python benchmarks/native_resolution.py --device cuda --amp
"""
import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import timm
import timm_lookwhere  # noqa: F401  (registers the LookWhere models)
from timm_lookwhere.cost import (
    MEMORY_CHILD_FLAG, count_flops, peak_memory_in_fresh_process, report_peak_memory, time_in_turns,
)

from report import save_results
from speed import add_device_arguments, autocast, log, machine_info, spread

LOOKWHERE = 'lookwhere_vitb_518'
VIT = 'vit_base_patch14_reg4_dinov2'
SIZES = [(518, 518), (1036, 1036), (1078, 1918), (1456, 2590), (2156, 3836)]  # (H, W): up to a 3836x2156 frame
TINY = dict(embed_dim=32, depth=2, num_heads=2, selector_img_size=42, selector_depth=1, map_grid=8)
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+', help='H x W sizes, e.g. 518x518 2156x3836 (default: five up to 4K)')
    parser.add_argument('--k-ratios', type=float, nargs='+', default=[0.01, 0.05, 0.1])
    parser.add_argument('--outputs', nargs='+', default=['cls', 'dense'], choices=['cls', 'dense'])
    parser.add_argument('--reps', type=int, default=3, help='timed calls per model and setting (default: 3)')
    parser.add_argument('--max-vit-tflop', type=float, default=1.5,
                        help="timm's full ViT only where a call costs at most this (default: %(default)s)")
    parser.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True,
                        help='probe the peak memory of each configuration (default: yes)')
    parser.add_argument('--memory-probes', type=int, default=3,
                        help='fresh processes per configuration whose median memory is reported (default: 3)')
    parser.add_argument('--quick', action='store_true', help='518x518 and 2156x3836 at k_ratio 0.01, cls, 2 reps')
    parser.add_argument('--tiny', action='store_true', help='a tiny random architecture: checks the script only')
    parser.add_argument('--threads', type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'results')
    parser.add_argument(MEMORY_CHILD_FLAG, help=argparse.SUPPRESS)  # internal: one memory probe
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or ['518x518', '2156x3836']
        args.k_ratios, args.outputs, args.reps = [0.01], ['cls'], 2
    args.sizes = [parse_size(s) for s in args.sizes] if args.sizes else list(SIZES)
    if args.reps < 1:
        parser.error('--reps must be at least 1')
    return args


def parse_size(text: str) -> Tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise SystemExit(f'sizes are HxW, e.g. 1078x1918; got {text!r}') from None
    if height % 14 or width % 14:
        raise SystemExit(f'sizes must be multiples of the patch size 14, got {text}')
    return height, width


def build(kind: str, size: Tuple[int, int], args: argparse.Namespace) -> torch.nn.Module:
    """`dynamic` (one model for every size), `fixed` (built for `size`) or `vit` (timm's, dynamic)."""
    lookwhere = TINY if args.tiny else {}
    with torch.device(args.device):
        if kind == 'vit':
            model = timm.create_model(VIT, dynamic_img_size=True, **(TINY_VIT if args.tiny else {}))
        elif kind == 'dynamic':
            model = timm.create_model(LOOKWHERE, dynamic_img_size=True, **lookwhere)
        else:
            model = timm.create_model(LOOKWHERE, img_size=size, **lookwhere)
    return model.eval()


def call_for(model: torch.nn.Module, kind: str, k_ratio: Optional[float], output: str) -> Callable:
    if kind == 'vit':
        return model
    model.set_k(k_ratio=k_ratio)
    return model.forward_dense if output == 'dense' else model


def vit_tflop(size: Tuple[int, int], args: argparse.Namespace) -> float:
    """A full ViT call's TFLOPs, counted on the meta device (attention included)."""
    with torch.device('meta'):
        model = timm.create_model(VIT, dynamic_img_size=True, **(TINY_VIT if args.tiny else {})).eval()
        return count_flops(model, torch.empty(1, 3, *size)) / 1e12


def parameter_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20


def memory_child(spec: str) -> None:
    """One memory probe in a fresh process: build the model, make the input, measure one call."""
    spec = json.loads(spec)
    args = argparse.Namespace(**spec['args'])
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(spec['size'])
    model = build(spec['kind'], size, args)
    call = call_for(model, spec['kind'], spec['k_ratio'], spec['output'])
    x = torch.randn(1, 3, *size, device=args.device)
    with torch.inference_mode(), autocast(args):
        report_peak_memory(lambda: call(x), args.device)


def measure_memory(kind: str, size, k_ratio, output: str, args: argparse.Namespace) -> Optional[Dict[str, float]]:
    """Median over --memory-probes fresh processes: `call` (MB one call adds) and `process` (its peak)."""
    child_args = dict(device=args.device, amp=args.amp, tiny=args.tiny, threads=args.threads)
    spec = dict(kind=kind, size=list(size), k_ratio=k_ratio, output=output, args=child_args)
    try:
        probes = [peak_memory_in_fresh_process(__file__, spec) for _ in range(args.memory_probes)]
    except RuntimeError as e:
        log(f'{kind} {size}: {e}')
        return None
    return dict(call=statistics.median(p['peak_mb'] for p in probes),
                process=statistics.median(p['process_peak_mb'] for p in probes))


def timed_in_turns(calls: Dict[str, Callable], x: torch.Tensor, args: argparse.Namespace) -> Dict[str, List[float]]:
    """Seconds of --reps calls of each on `x`, taking turns (order reversed every other rep), after a warm-up."""
    with torch.inference_mode(), autocast(args):
        return time_in_turns({name: functools.partial(call, x) for name, call in calls.items()}, args.reps,
                             alternate=True, device=args.device)


def run(args: argparse.Namespace) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(args)  # before the first model, so its load average is the machine's, not ours
    dynamic = build('dynamic', args.sizes[0], args)
    vit = None
    rows = []
    for size in args.sizes:
        x = torch.randn(1, 3, *size, device=args.device)
        fixed = build('fixed', size, args)
        patches = (size[0] // 14) * (size[1] // 14)
        for k_ratio in args.k_ratios:
            for output in args.outputs:
                calls = {kind: call_for(model, kind, k_ratio, output) for kind, model in
                         (('dynamic', dynamic), ('fixed', fixed))}
                samples = timed_in_turns(calls, x, args)
                row = dict(size=list(size), megapixels=size[0] * size[1] / 1e6, patches=patches, k_ratio=k_ratio,
                           k=dynamic.topk.num_keep(patches), output=output,
                           dynamic=spread(samples['dynamic']), fixed=spread(samples['fixed']),
                           dynamic_over_fixed=spread([d / f for d, f in zip(samples['dynamic'], samples['fixed'])]),
                           params_mb=dict(dynamic=parameter_mb(dynamic), fixed=parameter_mb(fixed)))
                if args.memory:
                    row['memory_mb'] = {kind: measure_memory(kind, size, k_ratio, output, args) for kind in calls}
                log(f"{size[0]}x{size[1]} k_ratio {k_ratio:g} {output}: dynamic {row['dynamic']['median']:.3f} s, "
                    f"fixed {row['fixed']['median']:.3f} s, ratio {row['dynamic_over_fixed']['median']:.3f}"
                    + (f", memory MB {row['memory_mb']}" if args.memory else ''))
                rows.append(row)
        del fixed
        cost = vit_tflop(size, args)
        if cost <= args.max_vit_tflop:
            vit = vit or build('vit', size, args)
            seconds = timed_in_turns(dict(vit=vit), x, args)['vit']
            row = dict(size=list(size), megapixels=size[0] * size[1] / 1e6, patches=patches, model='vit',
                       tflop=cost, seconds=spread(seconds), params_mb=parameter_mb(vit))
            if args.memory:
                row['memory_mb'] = measure_memory('vit', size, None, 'cls', args)
            log(f"{size[0]}x{size[1]} timm ViT-B: {row['seconds']['median']:.2f} s")
        else:
            row = dict(size=list(size), megapixels=size[0] * size[1] / 1e6, patches=patches, model='vit',
                       tflop=cost, skipped=f'{cost:.1f} TFLOP per call, over --max-vit-tflop {args.max_vit_tflop:g}')
        rows.append(row)
    info['load_average_end'] = list(os.getloadavg())
    return dict(machine=info, command='python benchmarks/native_resolution.py ' + ' '.join(sys.argv[1:]), rows=rows)


# ------------------------------------------------------------------------------------------------
# report


def to_markdown(results: Dict[str, object]) -> str:
    m = results['machine']
    lines = [
        f"Command: `{results['command']}`",
        '',
        f"Machine: {m.get('gpu') or m['cpu']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"{'bfloat16 autocast' if m.get('amp') else 'float32'}; load average {m['load_average_start'][0]:.1f} at "
        f"the start, {m['load_average_end'][0]:.1f} at the end. Batch 1, median of the timed calls (min-max).",
        '',
        '| size (H x W) | MP | patches | k_ratio (k) | output | dynamic model | fixed-size model | dynamic / fixed '
        '| process peak MB, dynamic / fixed | of which the call, dynamic / fixed | parameters MB, dynamic / fixed |',
        '|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in results['rows']:
        if row.get('model') == 'vit':
            continue
        memory = row.get('memory_mb') or {}
        ratio = row['dynamic_over_fixed']
        lines.append(
            f"| {row['size'][0]} x {row['size'][1]} | {row['megapixels']:.2f} | {row['patches']} "
            f"| {row['k_ratio']:g} ({row['k']}) | {row['output']} | {seconds(row['dynamic'])} "
            f"| {seconds(row['fixed'])} "
            f"| {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) "
            f"| {megabytes(memory.get('dynamic'), 'process')} / {megabytes(memory.get('fixed'), 'process')} "
            f"| {megabytes(memory.get('dynamic'), 'call')} / {megabytes(memory.get('fixed'), 'call')} "
            f"| {row['params_mb']['dynamic']:.0f} / {row['params_mb']['fixed']:.0f} |")
    lines += ['', "timm's ViT-B/14 (dynamic_img_size=True) on every patch:", '',
              '| size (H x W) | patches | TFLOP / call | time | process peak MB | of which the call |',
              '|---|---:|---:|---:|---:|---:|']
    for row in results['rows']:
        if row.get('model') != 'vit':
            continue
        time_cell = seconds(row['seconds']) if 'seconds' in row else f"skipped: {row['skipped']}"
        lines.append(f"| {row['size'][0]} x {row['size'][1]} | {row['patches']} | {row['tflop']:.2f} | {time_cell} "
                     f"| {megabytes(row.get('memory_mb'), 'process')} | {megabytes(row.get('memory_mb'), 'call')} |")
    return '\n'.join(lines) + '\n'


def megabytes(memory: Optional[Dict[str, float]], which: str) -> str:
    return '' if memory is None else f'{memory[which]:.0f}'


def seconds(value: Dict[str, float]) -> str:
    if value['median'] < 1:
        return f"{1e3 * value['median']:.0f} ms ({1e3 * value['min']:.0f}-{1e3 * value['max']:.0f})"
    return f"{value['median']:.2f} s ({value['min']:.2f}-{value['max']:.2f})"


def plot(results: Dict[str, object], path: Path) -> None:
    """Time per image against megapixels, log-log: the dynamic model per k (cls solid, dense dashed),
    the fixed-size models as crosses, timm's ViT-B as the line it would follow."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (the tick formats below)
    rows = results['rows']
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    ratios = sorted({r['k_ratio'] for r in rows if 'k_ratio' in r})
    colours = dict(zip(ratios, plt.rcParams['axes.prop_cycle'].by_key()['color']))
    for k_ratio in ratios:
        for output, style in (('cls', '-'), ('dense', '--')):
            sel = [r for r in rows if r.get('k_ratio') == k_ratio and r['output'] == output]
            if not sel:
                continue
            mp = [r['megapixels'] for r in sel]
            ax.plot(mp, [r['dynamic']['median'] for r in sel], style + 'o', color=colours[k_ratio], markersize=4,
                    label=f'LookWhere, one dynamic model, k_ratio {k_ratio:g} ({output})')
            ax.plot(mp, [r['fixed']['median'] for r in sel], 'x', color=colours[k_ratio], markersize=7)
    vit = [r for r in rows if r.get('model') == 'vit' and 'seconds' in r]
    if vit:
        ax.plot([r['megapixels'] for r in vit], [r['seconds']['median'] for r in vit], 'k-s', markersize=5,
                label="timm ViT-B/14, every patch")
    ax.plot([], [], 'x', color='grey', label='LookWhere built for that size (fixed)')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xticks([0.25, 0.5, 1, 2, 4, 8])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.set_xlabel('megapixels per image')
    ax.set_ylabel('seconds per image (batch 1)')
    where = results['machine'].get('gpu') or f"{results['machine']['torch_threads']}-thread CPU"
    ax.set_title(f'One LookWhere for every size, 518 px to 4K ({where})')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return {}
    results = run(args)
    save_results(results, args.out, 'native_resolution', to_markdown, plot)
    return results


if __name__ == '__main__':
    main()
