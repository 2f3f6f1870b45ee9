#!/usr/bin/env python3
""" Sparse traffic signs, evaluated: does LookWhere learn where to look, and does it pay at high resolution?

Reads the folder of a run of the sparse-signs recipe (`python -m timm_lookwhere.recipes.sparse_signs`,
which trains the teacher, distils, fine-tunes, trains the low-res baseline and exports), in the
configuration that run used (its run.json), and measures on the held-out test scenes, from the exported
files: accuracy, GFLOPs (attention counted), CPU latency at batch 1 and 64, random selection at the same
k (`RandomSelection`, a forward hook on `model.topk`, replaces LookWhere's choice), and an oracle that takes
the patches under the sign first (`PreferredSelection`: what the extractor could do with a perfect
selector). It writes OUTPUT/results.json, results.md and results.png, and adds the `evaluate` stage's
time to OUTPUT/timings.json; done once, it is skipped (`--redo` measures again). `--lever-table` compares
lever runs by their validation figures.

    python -m timm_lookwhere.recipes.sparse_signs --output runs/sparse_signs_512 --ship   # train first
    python benchmarks/sparse_signs.py --output runs/sparse_signs_512                     # about 5 min on 2 cores
    python benchmarks/sparse_signs.py --lever-table runs/sparse_signs_512 runs/ss512_*
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import sys
from typing import Any, Dict, Sequence

import torch
import torch.nn as nn

from timm_lookwhere import PreferredSelection, RandomSelection, SelectionRecorder
from timm_lookwhere.cost import median_latency_ms
from timm_lookwhere.scenes import CLASS_NAMES, patches_under_box, sign_patches_seen
from timm_lookwhere.recipes.sparse_signs import K_RATIOS, LowResViT, RunConfig, accuracy, build_teacher, \
    create_lookwhere, export_path, load_split, run_config
from timm_lookwhere.recipes.stages import gflops, run_evaluation, write_json

_logger = logging.getLogger('sparse_signs')  # the recipe's: one run.log

# --------------------------------------------------------------------------------------------
# evaluation


def latencies(models: Dict[str, nn.Module], runs: int, batch_size: int, img_size: int) -> Dict[str, float]:
    """Median ms per forward of each model on the same random batch, the models taking turns."""
    for model in models.values():
        model.eval()
    return median_latency_ms(models, torch.randn(batch_size, 3, img_size, img_size), runs, warmup=3)


def stage_evaluate(args, cfg: RunConfig) -> Dict[str, Any]:
    test = load_split(args.output, cfg, 'test', cfg.test_images, args.workers, seed=cfg.test_seed)
    num_classes = len(CLASS_NAMES)
    teacher = build_teacher(cfg, file=export_path(args.output, cfg, 'teacher')).eval()
    low = torch.load(os.path.join(args.output, 'lowres', 'model.pth'), map_location='cpu', weights_only=True)
    lowres = LowResViT(build_teacher(cfg, img_size=low['img_size']), low['img_size'])
    lowres.vit.load_state_dict(low['state_dict'])
    lowres.eval()
    patch = lowres.vit.patch_embed.patch_size[0]

    rows = []
    _logger.info('evaluating the teacher and the low-res ViT')
    rows.append(dict(model='full-res teacher (ViT, all patches)', patches=(cfg.img_size // patch) ** 2,
                     acc=accuracy(teacher, test), gflops=gflops(teacher, cfg.img_size)))
    rows.append(dict(model=f'low-res ViT ({lowres.img_size} px copy)', patches=(lowres.img_size // patch) ** 2,
                     acc=accuracy(lowres, test), gflops=gflops(lowres, cfg.img_size)))
    timed = dict(teacher=teacher, lowres=lowres)
    selections = {  # row label: what makes the choice while the model runs (nullcontext: LookWhere's own)
        'LookWhere selection': lambda model: contextlib.nullcontext(),
        'random selection': RandomSelection,
        "oracle selection (the sign's patches first)": lambda model: PreferredSelection(
            model, [patches_under_box(box, model.grid_size, patch) for box in test['boxes'].tolist()]),
    }
    for ratio in K_RATIOS:
        overlay = dict(file=export_path(args.output, cfg, 'finetune'))
        model = create_lookwhere(cfg, pretrained=True, num_classes=num_classes, k_ratio=ratio,
                                 pretrained_cfg_overlay=overlay).eval()
        for label, select in selections.items():
            _logger.info(f'evaluating {label} at k={ratio:.0%}')
            with select(model), SelectionRecorder(model) as rec:
                acc = accuracy(model, test)
            indices = torch.cat([r['indices'] for r in rec.records])
            rows.append(dict(model=f'{label}, k = {ratio:.0%}', patches=model.k, acc=acc,
                             gflops=gflops(model, cfg.img_size),
                             sign_seen=sign_patches_seen(indices, test['boxes'], model.grid_size, patch).mean().item()))
        timed[f'k={ratio:.0%}'] = model
    _logger.info(f'timing on {torch.get_num_threads()} thread(s)')
    lat1 = latencies(timed, cfg.latency_runs, 1, cfg.img_size)
    lat64 = latencies(timed, max(3, cfg.latency_runs // 10), 64, cfg.img_size)
    for row in rows:
        key = 'teacher' if row['model'].startswith('full') else 'lowres' if row['model'].startswith('low') \
            else 'k=' + row['model'].rsplit('= ', 1)[1]
        row['ms_b1'], row['ms_per_img_b64'] = lat1[key], lat64[key] / 64
    n = len(test['labels'])
    for row in rows:  # 95% interval of an accuracy measured on n scenes (normal approximation)
        row['acc_ci95'] = 1.96 * math.sqrt(max(row['acc'] * (1 - row['acc']), 1e-12) / n)
    results = dict(
        config=cfg.tag, rows=rows, test_images=n, test_seed=cfg.test_seed, threads=torch.get_num_threads(),
        machine=f'{platform.processor() or platform.machine()}', cpu_count=os.cpu_count(),
        load_average=os.getloadavg(), settings=dataclasses.asdict(cfg),
    )
    write_json(os.path.join(args.output, 'results.json'), results)
    table = results_table(results)
    with open(os.path.join(args.output, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    plot_results(results, os.path.join(args.output, 'results.png'))
    return results


def results_table(results: Dict[str, Any]) -> str:
    teacher = results['rows'][0]
    lines = [
        '| model | patches seen | test accuracy (%) | sign patches seen (%) | GFLOPs | FLOPs vs teacher '
        '| latency, batch 1 (ms) | speed-up, batch 1 | ms / image, batch 64 | speed-up, batch 64 |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in results['rows']:
        seen = f"{100 * row['sign_seen']:.1f}" if 'sign_seen' in row else '-'
        lines.append(
            f"| {row['model']} | {row['patches']} | {100 * row['acc']:.1f} ± {100 * row['acc_ci95']:.1f} | {seen} "
            f"| {row['gflops']:.3f} | {teacher['gflops'] / row['gflops']:.1f}x | {row['ms_b1']:.2f} "
            f"| {teacher['ms_b1'] / row['ms_b1']:.1f}x | {row['ms_per_img_b64']:.2f} "
            f"| {teacher['ms_per_img_b64'] / row['ms_per_img_b64']:.1f}x |")
    return '\n'.join(lines)


def plot_results(results: Dict[str, Any], path: str) -> None:
    """Accuracy against GFLOPs: LookWhere, random and oracle selection as k grows, the teacher, the low-res ViT."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    rows = results['rows']
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for prefix, style, label in (('LookWhere', 'o-', 'LookWhere (k = 2, 5, 10%)'),
                                 ('random', 's--', 'random patches (k = 2, 5, 10%)'),
                                 ('oracle', '^:', "the sign's patches first (oracle)")):
        sel = [r for r in rows if r['model'].startswith(prefix)]
        if not sel:  # results from before the oracle rows
            continue
        ax.plot([r['gflops'] for r in sel], [100 * r['acc'] for r in sel], style, label=label)
    ax.plot(rows[0]['gflops'], 100 * rows[0]['acc'], '*', markersize=14, label=rows[0]['model'])
    ax.plot(rows[1]['gflops'], 100 * rows[1]['acc'], 'D', markersize=8, label=rows[1]['model'])
    ax.axhline(100 / len(CLASS_NAMES), color='grey', lw=0.8, ls=':', label='chance')
    ax.set_xscale('log')
    costs = [r['gflops'] for r in rows]
    ticks = (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20)
    ax.set_xticks([t for t in ticks if min(costs) / 1.3 <= t <= max(costs) * 1.3])
    ax.xaxis.set_major_formatter(FormatStrFormatter('%g'))  # 0.2, not 2x10^-1
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
    ax.set_xlabel('GFLOPs per image (log scale, attention counted)')
    ax.set_ylabel(f"test accuracy (%), {results['test_images']} scenes")
    ax.set_title(f"Sparse traffic signs, {results['settings']['img_size']} px scenes: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# levers


def lever_table(folders: Sequence[str]) -> str:
    """One row per run folder: the settings it changed (`--set`) and the validation figures of its stages."""
    def read(path: str) -> Dict[str, Any]:
        return json.load(open(path)) if os.path.exists(path) else {}

    lines = ['| run | changed | sign patches chosen at 2 / 5 / 10%: selector | by its target | '
             'LookWhere val acc at 2 / 5 / 10% |',
             '|---|---|---|---|---|']
    for folder in folders:
        run = read(os.path.join(folder, 'run.json'))
        changed = ', '.join(f'{k}={v}' for k, v in run.get('overrides', {}).items()) or 'the configuration as is'
        distilled = read(os.path.join(folder, 'distill', 'val.json'))
        seen, target = distilled.get('sign_patches_seen', {}), distilled.get('target_sign_patches_seen', {})
        acc = read(os.path.join(folder, 'finetune', 'val.json')).get('val_accuracy', {})
        fmt = lambda d: ' / '.join(f'{100 * d[k]:.1f}' for k in sorted(d, key=lambda k: float(k[2:-1]))) or '-'  # noqa
        lines.append(f'| {os.path.basename(os.path.normpath(folder))} | {changed} | {fmt(seen)} | {fmt(target)} '
                     f'| {fmt(acc)} |')
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', metavar='DIR', help="a recipe run's folder: results.{json,md,png} go there too")
    parser.add_argument('--redo', action='store_true', help='evaluate again when results.json exists')
    parser.add_argument('--lever-table', nargs='+', default=None, metavar='DIR',
                        help='print the validation figures of these runs side by side, and stop')
    parser.add_argument('--workers', type=int, default=2, help='test-scene-generating processes (default: 2)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads, timing included (default: 2)')
    args = parser.parse_args(argv)
    if args.lever_table is None and not args.output:
        parser.error('--output is required')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.lever_table is not None:
        print(lever_table(args.lever_table))
        return 0
    run_evaluation(args, run_config, stage_evaluate)
    return 0


if __name__ == '__main__':
    sys.exit(main())
