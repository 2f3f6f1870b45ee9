#!/usr/bin/env python3
""" Dense traffic signs, evaluated: does a LookWhere segmenter keep the full-res teacher's masks from a few patches?

Reads the folder of a run of the dense-signs recipe (`python -m timm_lookwhere.recipes.dense_signs`), in
the configuration that run used (its run.json), and measures on fresh test scenes (seed `test_seed`, which
no stage used): mean IoU of the 14 sign classes and with background, IoU of each sign class, pixel
accuracy, the share of the patches holding a sign that were chosen, GFLOPs (attention counted), CPU
latency at batch 1 and 64 (the pixel logits included) and speed-ups against the teacher; for the
full-res teacher, the low-res ViT at equal cost, and LookWhere at k = 2 / 5 / 10 / 20% with its own
selection, random selection, and an oracle that takes the patches holding a sign first (both forward hooks
on `model.topk`): what a perfect selector would give this extractor. Intervals are 95% bootstrap
percentiles over the scenes, the same resamples for every row (so "% of teacher" is paired).

It writes OUTPUT/results.json, results.md and results.png, and adds the `evaluate` stage's time to
OUTPUT/timings.json; done once, it is skipped (`--redo` measures again).

    python -m timm_lookwhere.recipes.dense_signs --output runs/dense_signs --ship   # train first
    python benchmarks/dense_signs.py --output runs/dense_signs                     # about 6 min on 2 cores
"""
import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import sys
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn as nn

from timm_lookwhere import PreferredSelection, RandomSelection, SelectionRecorder
from timm_lookwhere.cost import median_latency_ms
from timm_lookwhere.scenes import SEGMENTATION_CLASSES
from timm_lookwhere.segmentation import iou_per_class
from timm_lookwhere.recipes.dense_signs import (
    K_RATIOS, NUM_CLASSES, SIGN_CLASSES, RunConfig, confusions, export_path, load_lookwhere, load_lowres, load_split,
    load_teacher, run_config, sign_patches,
)
from timm_lookwhere.recipes.stages import gflops, run_evaluation, write_json

_logger = logging.getLogger('dense_signs')
BOOTSTRAP = 1000  # resamples of the test scenes for the intervals


# --------------------------------------------------------------------------------------------
# metrics with intervals


def scene_metrics(confusion: torch.Tensor) -> Dict[str, Any]:
    """Metrics of summed (C, C) pixel counts."""
    iou = iou_per_class(confusion)
    return dict(miou_signs=float(iou[list(SIGN_CLASSES)].nanmean()), miou_all=float(iou.nanmean()),
                pixel_acc=float(confusion.diagonal().sum() / confusion.sum()), iou=iou.tolist())


def bootstrap_draws(num_scenes: int, seed: int = 0) -> torch.Tensor:
    """(BOOTSTRAP, n) how often each scene is drawn in each resample: the same for every row (paired)."""
    counts = np.random.default_rng(seed).multinomial(num_scenes, np.full(num_scenes, 1 / num_scenes), size=BOOTSTRAP)
    return torch.from_numpy(counts).double()


def resampled(per_scene: torch.Tensor, draws: torch.Tensor) -> Dict[str, np.ndarray]:
    """mIoU (signs, all) and pixel accuracy of every resample: (n, C, C) confusions -> (BOOTSTRAP,) each."""
    summed = (draws @ per_scene.flatten(1).double()).view(-1, NUM_CLASSES, NUM_CLASSES)  # (R, C, C)
    hits = summed.diagonal(dim1=1, dim2=2)  # (R, C)
    union = summed.sum(1) + summed.sum(2) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float('nan')))
    return dict(miou_signs=iou[:, list(SIGN_CLASSES)].nanmean(1).numpy(), miou_all=iou.nanmean(1).numpy(),
                pixel_acc=(hits.sum(1) / summed.sum((1, 2))).numpy())


def interval(values: np.ndarray) -> List[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# --------------------------------------------------------------------------------------------
# evaluation


class CellLogits(nn.Module):
    """A segmenter's forward to the logits of its patch cells, for timing without the upsampling."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter.forward_cells(x)


def stage_evaluate(args, cfg: RunConfig) -> Dict[str, Any]:
    test = load_split(args.output, cfg, 'test', cfg.test_scenes, args.workers, seed=cfg.test_seed)
    teacher, lowres = load_teacher(args.output, cfg), load_lowres(args.output, cfg)
    patch = teacher.vit.patch_embed.patch_size[0]
    under_signs = sign_patches(test['masks'], patch)  # (n, N)
    draws = bootstrap_draws(len(test['masks']))
    per_scene = {}  # row label: (n, C, C)

    _logger.info('evaluating the teacher and the low-res ViT')
    rows = [dict(model='full-res teacher (ViT, all patches)', patches=under_signs.shape[1],
                 gflops=gflops(teacher, cfg.img_size), time='teacher'),
            dict(model=f'low-res ViT ({lowres.img_size} px copy)', patches=(lowres.img_size // patch) ** 2,
                 gflops=gflops(lowres, cfg.img_size), time='lowres')]
    per_scene[rows[0]['model']], per_scene[rows[1]['model']] = confusions(teacher, test), confusions(lowres, test)
    timed = dict(teacher=teacher, lowres=lowres)
    selections = {  # row label: what makes the choice while the model runs (nullcontext: LookWhere's own)
        'LookWhere selection': lambda model: contextlib.nullcontext(),
        'random selection': RandomSelection,
        'oracle selection (sign patches first)': lambda model: PreferredSelection(model, under_signs),
    }
    for ratio in K_RATIOS:
        model = load_lookwhere(export_path(args.output, cfg), cfg, k_ratio=ratio)
        for label, select in selections.items():
            _logger.info(f'evaluating {label} at k={ratio:.0%}')
            with select(model.backbone), SelectionRecorder(model.backbone) as rec:
                per_row = confusions(model, test)
            chosen = torch.zeros_like(under_signs)  # (n, N)
            chosen.scatter_(1, torch.cat([r['indices'] for r in rec.records]), True)
            seen = (chosen & under_signs).sum(1) / under_signs.sum(1).clamp(min=1)  # (n,)
            row = dict(model=f'{label}, k = {ratio:.0%}', patches=model.k, gflops=gflops(model, cfg.img_size),
                       sign_seen=float(seen.mean()), time=f'k={ratio:.0%}')
            rows.append(row)
            per_scene[row['model']] = per_row
        timed[f'k={ratio:.0%}'] = model

    teacher_draws = resampled(per_scene[rows[0]['model']], draws)
    for row in rows:
        row.update(scene_metrics(per_scene[row['model']].sum(0)))
        draws_of_row = resampled(per_scene[row['model']], draws)
        for key in ('miou_signs', 'miou_all', 'pixel_acc'):
            row[key + '_ci95'] = interval(draws_of_row[key])
        with np.errstate(invalid='ignore', divide='ignore'):  # a teacher at 0 (tiny runs) has no ratio
            row['of_teacher'] = row['miou_signs'] / rows[0]['miou_signs'] if rows[0]['miou_signs'] else float('nan')
            row['of_teacher_ci95'] = interval(draws_of_row['miou_signs'] / teacher_draws['miou_signs'])

    _logger.info(f'timing on {torch.get_num_threads()} thread(s)')
    lat1 = median_latency_ms(timed, torch.randn(1, 3, cfg.img_size, cfg.img_size), cfg.latency_runs, warmup=3)
    big = cfg.latency_batch
    lat64 = median_latency_ms(timed, torch.randn(big, 3, cfg.img_size, cfg.img_size), max(3, cfg.latency_runs // 5),
                              warmup=1)
    # the same models to their cell logits, before the upsampling to every pixel (a cost all of them pay alike)
    cells = median_latency_ms({name: CellLogits(model) for name, model in timed.items()},
                              torch.randn(big, 3, cfg.img_size, cfg.img_size), max(3, cfg.latency_runs // 5), warmup=1)
    for row in rows:
        row['ms_b1'], row['ms_per_img_b64'] = lat1[row['time']], lat64[row['time']] / big
        row['cells_ms_per_img_b64'] = cells[row['time']] / big
    results = dict(
        config=cfg.tag, rows=rows, test_scenes=len(test['masks']), test_seed=cfg.test_seed, latency_batch=big,
        classes=list(SEGMENTATION_CLASSES), bootstrap=BOOTSTRAP, threads=torch.get_num_threads(),
        machine=f'{platform.processor() or platform.machine()}', cpu_count=os.cpu_count(),
        load_average=os.getloadavg(), settings=dataclasses.asdict(cfg),
    )
    write_json(os.path.join(args.output, 'results.json'), results)
    table = results_table(results) + '\n\n' + class_table(results)
    with open(os.path.join(args.output, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    plot_results(results, os.path.join(args.output, 'results.png'))
    return results


def _pm(value: float, ci: List[float]) -> str:
    return f'{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]'


def results_table(results: Dict[str, Any]) -> str:
    teacher = results['rows'][0]
    lines = [
        '| model | patches seen | mIoU, signs (%) | % of teacher | mIoU with background (%) | pixel acc. (%) '
        '| sign patches seen (%) | GFLOPs | FLOPs vs teacher | ms, batch 1 | speed-up, batch 1 | ms / image, batch 64 '
        '| speed-up, batch 64 | speed-up, batch 64, cell logits |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in results['rows']:
        seen = f"{100 * row['sign_seen']:.1f}" if 'sign_seen' in row else '-'
        lines.append(
            f"| {row['model']} | {row['patches']} | {_pm(row['miou_signs'], row['miou_signs_ci95'])} "
            f"| {_pm(row['of_teacher'], row['of_teacher_ci95'])} | {_pm(row['miou_all'], row['miou_all_ci95'])} "
            f"| {100 * row['pixel_acc']:.2f} | {seen} | {row['gflops']:.3f} | {teacher['gflops'] / row['gflops']:.1f}x "
            f"| {row['ms_b1']:.2f} | {teacher['ms_b1'] / row['ms_b1']:.1f}x | {row['ms_per_img_b64']:.2f} "
            f"| {teacher['ms_per_img_b64'] / row['ms_per_img_b64']:.1f}x "
            f"| {teacher['cells_ms_per_img_b64'] / row['cells_ms_per_img_b64']:.1f}x |")
    return '\n'.join(lines)


def class_table(results: Dict[str, Any]) -> str:
    """IoU of each class for the teacher, the low-res ViT and LookWhere's own selection at each k."""
    rows = [r for r in results['rows'] if not r['model'].startswith(('random', 'oracle'))]
    short = lambda name: name.split(' (')[0].replace('LookWhere selection', 'LookWhere')  # noqa: E731
    lines = ['| class | ' + ' | '.join(short(r['model']) for r in rows) + ' |', '|---' * (len(rows) + 1) + '|']
    for c, name in enumerate(results['classes']):
        lines.append(f'| {name} | ' + ' | '.join('-' if np.isnan(r['iou'][c]) else f"{100 * r['iou'][c]:.1f}"
                                                 for r in rows) + ' |')
    return '\n'.join(lines)


def plot_results(results: Dict[str, Any], path: str) -> None:
    """mIoU of the sign classes against GFLOPs: one line per selection as k grows, the teacher, the low-res ViT."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    rows = results['rows']
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ks = ', '.join(f'{100 * k:g}' for k in K_RATIOS)
    for prefix, style, label in (('LookWhere', 'o-', f'LookWhere (k = {ks}%)'),
                                 ('random', 's--', 'random patches'),
                                 ('oracle', '^:', 'sign patches first (oracle)')):
        sel = [r for r in rows if r['model'].startswith(prefix)]
        ax.plot([r['gflops'] for r in sel], [100 * r['miou_signs'] for r in sel], style, label=label)
        lows = [100 * (r['miou_signs'] - r['miou_signs_ci95'][0]) for r in sel]
        highs = [100 * (r['miou_signs_ci95'][1] - r['miou_signs']) for r in sel]
        ax.errorbar([r['gflops'] for r in sel], [100 * r['miou_signs'] for r in sel], yerr=[lows, highs], fmt='none',
                    ecolor=ax.lines[-1].get_color(), capsize=2, lw=0.8)
    for row, style in ((rows[0], '*'), (rows[1], 'D')):
        ax.plot(row['gflops'], 100 * row['miou_signs'], style, markersize=14 if style == '*' else 8,
                label=row['model'])
    ax.axhline(95 * rows[0]['miou_signs'], color='grey', lw=0.8, ls=':', label="95% of the teacher's")
    ax.set_xscale('log')
    costs = [r['gflops'] for r in rows]
    ticks = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20)
    ax.set_xticks([t for t in ticks if min(costs) / 1.3 <= t <= max(costs) * 1.3])
    ax.xaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel('GFLOPs per image (log scale, attention counted)')
    ax.set_ylabel(f"mIoU of the 14 sign classes (%), {results['test_scenes']} scenes")
    ax.set_title(f"Dense traffic signs, {results['settings']['img_size']} px scenes: mIoU against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', required=True, metavar='DIR',
                        help="a recipe run's folder: results.{json,md,png} go there too")
    parser.add_argument('--redo', action='store_true', help='evaluate again when results.json exists')
    parser.add_argument('--workers', type=int, default=2, help='test-scene-generating processes (default: 2)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads, timing included (default: 2)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run_evaluation(args, run_config, stage_evaluate)
    return 0


if __name__ == '__main__':
    sys.exit(main())
