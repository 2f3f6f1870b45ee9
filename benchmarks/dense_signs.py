#!/usr/bin/env python3
""" Dense traffic signs, evaluated: does a LookWhere segmenter keep the full-res teacher's masks from a few patches?

Reads the folder of a run of the dense-signs recipe (`python -m timm_lookwhere.recipes.dense_signs`), in the
configuration that run used (its run.json), or, with --shipped, the segmenter and the teacher that ship in the
package (no recipe run needed), and measures on fresh test scenes (seed `test_seed`, which no stage used):

- mean IoU of the 14 sign classes and with background, IoU of each class, pixel accuracy, the share of the
  patches holding a sign that were chosen;
- for the full-res teacher, the low-res ViT at equal cost (a recipe run's), and LookWhere at k = 2 to 100% of
  the patches with its own selection; with --ablation RUN, also the segmenter of that run (a lever of the
  same recipe: `--set fill=idw` trains the authors' inverse-distance fill alone), so the two fills compare;
- an oracle that takes the patches holding a sign first (what a perfect selector would give each extractor and
  fill) and random patches, at small k;
- GFLOPs (attention counted), CPU latency at batch 1 and 64 (the pixel logits included) and speed-ups against
  the teacher;
- the paper's dense claim in this regime: the smallest k at which LookWhere's mIoU reaches the teacher's (the
  paired interval of its share of the teacher's reaching 100%), and whether mIoU holds as k grows (the paired
  interval of each step's change reaching 0).

Intervals are 95% bootstrap percentiles over the scenes, the same resamples for every row (paired).

It writes OUTPUT/results.json, results.md and results.png; for a run, it adds the `evaluate` stage's time to
OUTPUT/timings.json and, done once, is skipped (`--redo` measures again).

    python -m timm_lookwhere.recipes.dense_signs --output runs/dense_signs --ship              # train first
    python -m timm_lookwhere.recipes.dense_signs --output runs/dense_idw --set fill=idw --stages data,teacher,lookwhere
    python benchmarks/dense_signs.py --output runs/dense_signs --ablation runs/dense_idw        # about 15 min
    python benchmarks/dense_signs.py --shipped --output runs/shipped --seed 7                   # the shipped models
"""
import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_lookwhere
from timm_lookwhere import PreferredSelection, RandomSelection, SelectionRecorder
from timm_lookwhere.cost import median_latency_ms
from timm_lookwhere.scenes import SEGMENTATION_CLASSES
from timm_lookwhere.segmentation import (
    SEGMENTER_ARGS, confusion_matrix, create_segmenter, iou_per_class, mean_iou, pixel_logits,
)
from timm_lookwhere.recipes.dense_signs import (
    CONFIGS, K_RATIOS, NUM_CLASSES, SIGN_CLASSES, RunConfig, confusions, export_path, load_lookwhere, load_lowres,
    load_split, load_teacher, run_config, sign_patches,
)
from timm_lookwhere.recipes.stages import gflops, normalize, run_evaluation, run_logging, write_json

_logger = logging.getLogger('dense_signs')
BOOTSTRAP = 1000  # resamples of the test scenes for the intervals
SMALL_K = (0.02, 0.05, 0.10, 0.20)  # where the oracle and random selections are measured
FILL_NAMES = {'selector': 'selector-informed fill', 'idw': 'inverse-distance fill'}


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
# what is evaluated


@dataclasses.dataclass
class Evaluated:
    """The models of one evaluation and where their numbers go."""
    cfg: RunConfig
    data_folder: str  # where the test scenes are cached
    teacher: nn.Module
    lowres: Optional[nn.Module]  # a recipe run's low-res ViT (none for the shipped models)
    segmenters: Dict[str, Callable[[float], nn.Module]]  # fill -> (k_ratio -> the segmenter at that k)


def from_run(args: argparse.Namespace, cfg: RunConfig) -> Evaluated:
    """A recipe run's teacher, low-res ViT and exported segmenter; the --ablation run's segmenter beside it."""
    def segmenter_of(folder: str, run_cfg: RunConfig) -> Callable[[float], nn.Module]:
        exported = export_path(folder, run_cfg)
        path = exported if os.path.exists(exported) else os.path.join(folder, 'lookwhere', 'model.pth')
        return lambda ratio: load_lookwhere(path, run_cfg, k_ratio=ratio)

    segmenters = {cfg.fill: segmenter_of(args.output, cfg)}
    if args.ablation:
        ablation_cfg = run_config(args.ablation)
        if ablation_cfg.fill in segmenters:
            raise SystemExit(f'error: --ablation {args.ablation} has fill={ablation_cfg.fill!r} as {args.output} '
                             'does: give a run of the other fill')
        segmenters[ablation_cfg.fill] = segmenter_of(args.ablation, ablation_cfg)
    return Evaluated(cfg, args.output, load_teacher(args.output, cfg), load_lowres(args.output, cfg), segmenters)


def from_package(args: argparse.Namespace) -> Evaluated:
    """The shipped segmenter and its shipped teacher, on test scenes of --seed."""
    cfg = dataclasses.replace(CONFIGS['full'], test_seed=args.seed, test_scenes=args.scenes)
    teacher = timm_lookwhere.create_teacher(cfg.tag).eval()

    def shipped(ratio: float) -> nn.Module:
        return create_segmenter(cfg.tag, pretrained=True, k_ratio=ratio).eval()
    return Evaluated(cfg, args.output, teacher, None, {SEGMENTER_ARGS.get(cfg.tag, {}).get('fill', 'idw'): shipped})


# --------------------------------------------------------------------------------------------
# evaluation


class CellLogits(nn.Module):
    """A segmenter's forward to the logits of its patch cells, for timing without the upsampling."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter.forward_cells(x)


def evaluate_rows(run: Evaluated, args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, torch.Tensor],
                                                                     Dict[str, nn.Module], Dict[str, torch.Tensor]]:
    """Every row's (n, C, C) per-scene confusions; the models to time; the test scenes."""
    cfg = run.cfg
    test = load_split(run.data_folder, cfg, 'test', cfg.test_scenes, args.workers, seed=cfg.test_seed)
    patch = run.teacher.vit.patch_embed.patch_size[0]
    under_signs = sign_patches(test['masks'], patch)  # (n, N)
    rows, per_scene, timed = [], {}, {}

    def add(row: Dict[str, Any], model: nn.Module, confusion: torch.Tensor) -> None:
        row['gflops'] = gflops(model, cfg.img_size)
        rows.append(row)
        per_scene[row['model']] = confusion

    _logger.info('evaluating the teacher' + (' and the low-res ViT' if run.lowres is not None else ''))
    add(dict(model='full-res teacher (ViT, all patches)', patches=under_signs.shape[1], time='teacher'),
        run.teacher, confusions(run.teacher, test))
    timed['teacher'] = run.teacher
    if run.lowres is not None:
        add(dict(model=f'low-res ViT ({run.lowres.img_size} px copy)', patches=(run.lowres.img_size // patch) ** 2,
                 time='lowres'), run.lowres, confusions(run.lowres, test))
        timed['lowres'] = run.lowres
    selections = {  # row label: what makes the choice while the model runs (nullcontext: LookWhere's own)
        'LookWhere': lambda model: contextlib.nullcontext(),
        'oracle selection (sign patches first)': lambda model: PreferredSelection(model, under_signs),
        'random selection': RandomSelection,
    }
    for fill in sorted(run.segmenters, key=lambda f: f != 'selector'):
        for ratio in K_RATIOS:
            model = run.segmenters[fill](ratio)
            for label, select in selections.items():
                if label != 'LookWhere' and ratio not in SMALL_K:
                    continue
                _logger.info(f'evaluating {label}, {FILL_NAMES[fill]}, at k={ratio:.0%}')
                with select(model.backbone), SelectionRecorder(model.backbone) as rec:
                    confusion = confusions(model, test)
                chosen = torch.zeros_like(under_signs)  # (n, N)
                chosen.scatter_(1, torch.cat([r['indices'] for r in rec.records]), True)
                seen = (chosen & under_signs).sum(1) / under_signs.sum(1).clamp(min=1)  # (n,)
                time = f'{fill}, k={ratio:.0%}'
                add(dict(model=f'{label}, {FILL_NAMES[fill]}, k = {ratio:.0%}', selection=label, fill=fill,
                         k_ratio=ratio, patches=model.k, sign_seen=float(seen.mean()), time=time), model, confusion)
            timed[f'{fill}, k={ratio:.0%}'] = model
    return rows, per_scene, timed, test


@torch.no_grad()
def cell_costs(run: 'Evaluated', test: Dict[str, torch.Tensor], batch_size: int = 10) -> Dict[str, float]:
    """What the patch cell costs, as sign mIoU: perfect cells (each cell's class shares upsampled as the models'
    logits are; each cell's majority class, upsampled so and as blocks), and the teacher's and LookWhere's (its main
    fill at k = 20%) cell logits upsampled bilinearly (the segmenters' way) against as blocks."""
    patch = run.teacher.patch_size
    size = tuple(test['masks'].shape[-2:])
    main = next(iter(run.segmenters))
    lookwhere = run.segmenters[main](0.2)
    confusion = {name: torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long) for name in (
        'perfect cell shares, bilinear', 'perfect cell majority, bilinear', 'perfect cell majority, blocks',
        'teacher, bilinear', 'teacher, blocks', 'LookWhere k = 20%, bilinear', 'LookWhere k = 20%, blocks')}
    for start in range(0, len(test['masks']), batch_size):
        masks = test['masks'][start:start + batch_size].long()
        images = normalize(test['images'][start:start + batch_size])
        shares = F.avg_pool2d(F.one_hot(masks, NUM_CLASSES).permute(0, 3, 1, 2).float(), patch)  # (B, C, rows, cols)
        majority = F.one_hot(shares.argmax(1), NUM_CLASSES).permute(0, 3, 1, 2).float()
        cells = {'perfect cell shares': shares, 'perfect cell majority': majority,
                 'teacher': run.teacher.forward_cells(images), 'LookWhere k = 20%': lookwhere.forward_cells(images)}
        for name, logits in cells.items():
            for how, up in (('bilinear', pixel_logits(logits, patch, size)),
                            ('blocks', F.interpolate(logits, scale_factor=patch, mode='nearest'))):
                if f'{name}, {how}' in confusion:
                    confusion[f'{name}, {how}'] += confusion_matrix(list(up.argmax(1)), list(masks), NUM_CLASSES)
    return {name: mean_iou(value, SIGN_CLASSES) for name, value in confusion.items()}


def add_intervals(rows: List[Dict[str, Any]], per_scene: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, np.ndarray]]:
    """Each row's metrics, their intervals and its share of the teacher's mIoU (paired); the resamples by row."""
    draws = bootstrap_draws(len(next(iter(per_scene.values()))))
    resamples = {row['model']: resampled(per_scene[row['model']], draws) for row in rows}
    teacher = rows[0]
    for row in rows:
        row.update(scene_metrics(per_scene[row['model']].sum(0)))
        for key in ('miou_signs', 'miou_all', 'pixel_acc'):
            row[key + '_ci95'] = interval(resamples[row['model']][key])
        with np.errstate(invalid='ignore', divide='ignore'):  # a teacher at 0 (tiny runs) has no ratio
            row['of_teacher'] = row['miou_signs'] / teacher['miou_signs'] if teacher['miou_signs'] else float('nan')
            row['of_teacher_ci95'] = interval(resamples[row['model']]['miou_signs']
                                              / resamples[teacher['model']]['miou_signs'])
    return resamples


def claims(rows: List[Dict[str, Any]], resamples: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, Any]:
    """Per fill: the smallest k whose mIoU reaches the teacher's (its paired share-of-teacher interval reaching
    100%), and each step up in k with the paired interval of the change in mIoU (holds: its upper end >= 0)."""
    out = {}
    for fill in FILL_NAMES:
        own = sorted((r for r in rows if r.get('fill') == fill and r['selection'] == 'LookWhere'),
                     key=lambda r: r['k_ratio'])
        if not own:
            continue
        reaching = [r for r in own if r['of_teacher_ci95'][1] >= 1.0]
        steps = []
        for low, high in zip(own, own[1:]):
            change = resamples[high['model']]['miou_signs'] - resamples[low['model']]['miou_signs']
            steps.append(dict(k_from=low['k_ratio'], k_to=high['k_ratio'], change_ci95=interval(change),
                              change=high['miou_signs'] - low['miou_signs'], holds=bool(interval(change)[1] >= 0)))
        out[fill] = dict(reaches_teacher_at=reaching[0]['k_ratio'] if reaching else None,
                         reaching_row=reaching[0]['model'] if reaching else None, steps=steps,
                         holds_as_k_grows=all(step['holds'] for step in steps))
    return out


def add_timings(rows: List[Dict[str, Any]], timed: Dict[str, nn.Module], cfg: RunConfig) -> None:
    _logger.info(f'timing on {torch.get_num_threads()} thread(s)')
    big = cfg.latency_batch
    lat1 = median_latency_ms(timed, torch.randn(1, 3, cfg.img_size, cfg.img_size), cfg.latency_runs, warmup=3)
    lat64 = median_latency_ms(timed, torch.randn(big, 3, cfg.img_size, cfg.img_size), max(3, cfg.latency_runs // 5),
                              warmup=1)
    # the same models to their cell logits, before the upsampling to every pixel (a cost all of them pay alike)
    cells = median_latency_ms({name: CellLogits(model) for name, model in timed.items()},
                              torch.randn(big, 3, cfg.img_size, cfg.img_size), max(3, cfg.latency_runs // 5), warmup=1)
    for row in rows:
        row['ms_b1'], row['ms_per_img_b64'] = lat1[row['time']], lat64[row['time']] / big
        row['cells_ms_per_img_b64'] = cells[row['time']] / big


def evaluate(args: argparse.Namespace, run: Evaluated, folder: str) -> Dict[str, Any]:
    rows, per_scene, timed, test = evaluate_rows(run, args)
    resamples = add_intervals(rows, per_scene)
    cells = cell_costs(run, test)
    add_timings(rows, timed, run.cfg)
    results = dict(
        config=run.cfg.tag, source='shipped' if args.shipped else 'recipe run', rows=rows,
        claims=claims(rows, resamples), cell_costs=cells, test_scenes=len(test['masks']), test_seed=run.cfg.test_seed,
        latency_batch=run.cfg.latency_batch, classes=list(SEGMENTATION_CLASSES), bootstrap=BOOTSTRAP,
        threads=torch.get_num_threads(), machine=f'{platform.processor() or platform.machine()}',
        cpu_count=os.cpu_count(), load_average=os.getloadavg(), settings=dataclasses.asdict(run.cfg),
    )
    write_json(os.path.join(folder, 'results.json'), results)
    tables = (results_table, claims_text, ablation_table, cell_table, class_table)
    text = '\n\n'.join(table(results) for table in tables)
    with open(os.path.join(folder, 'results.md'), 'w') as f:
        f.write(text + '\n')
    print(text)
    plot_results(results, os.path.join(folder, 'results.png'))
    return results


# --------------------------------------------------------------------------------------------
# tables and plot


def _pm(value: float, ci: List[float]) -> str:
    return f'{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]'


def _own_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [r for r in results['rows'] if r.get('selection', 'LookWhere') == 'LookWhere']


def results_table(results: Dict[str, Any]) -> str:
    """The teacher, the low-res ViT and each fill with its own selection at every k: quality and cost."""
    teacher = results['rows'][0]
    lines = [
        '| model | patches seen | mIoU, signs (%) | % of teacher | mIoU with background (%) | pixel acc. (%) '
        '| sign patches seen (%) | GFLOPs | FLOPs vs teacher | ms, batch 1 | speed-up, batch 1 | ms / image, batch '
        f"{results['latency_batch']} | speed-up, batch {results['latency_batch']} | speed-up, cell logits |",
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in _own_rows(results):
        seen = f"{100 * row['sign_seen']:.1f}" if 'sign_seen' in row else '-'
        lines.append(
            f"| {row['model']} | {row['patches']} | {_pm(row['miou_signs'], row['miou_signs_ci95'])} "
            f"| {_pm(row['of_teacher'], row['of_teacher_ci95'])} | {_pm(row['miou_all'], row['miou_all_ci95'])} "
            f"| {100 * row['pixel_acc']:.2f} | {seen} | {row['gflops']:.3f} | {teacher['gflops'] / row['gflops']:.1f}x "
            f"| {row['ms_b1']:.2f} | {teacher['ms_b1'] / row['ms_b1']:.1f}x | {row['ms_per_img_b64']:.2f} "
            f"| {teacher['ms_per_img_b64'] / row['ms_per_img_b64']:.2f}x "
            f"| {teacher['cells_ms_per_img_b64'] / row['cells_ms_per_img_b64']:.1f}x |")
    return '\n'.join(lines)


def claims_text(results: Dict[str, Any]) -> str:
    rows = {r['model']: r for r in results['rows']}
    teacher = results['rows'][0]
    lines = []
    for fill, claim in results['claims'].items():
        name = FILL_NAMES[fill]
        if claim['reaches_teacher_at'] is None:
            lines.append(f"- {name}: no k reaches the teacher's mIoU ({100 * teacher['miou_signs']:.1f}).")
        else:
            row = rows[claim['reaching_row']]
            lines.append(
                f"- {name}: reaches the teacher's mIoU from k = {100 * claim['reaches_teacher_at']:g}% "
                f"({_pm(row['miou_signs'], row['miou_signs_ci95'])} against {100 * teacher['miou_signs']:.1f}; "
                f"{_pm(row['of_teacher'], row['of_teacher_ci95'])}% of it) at {teacher['gflops'] / row['gflops']:.1f}x "
                f"fewer FLOPs, {teacher['ms_b1'] / row['ms_b1']:.2f}x less time at batch 1 and "
                f"{teacher['ms_per_img_b64'] / row['ms_per_img_b64']:.2f}x at batch {results['latency_batch']}.")
        steps = ', '.join(f"{100 * s['k_from']:g}->{100 * s['k_to']:g}%: {100 * s['change']:+.1f} "
                          f"[{100 * s['change_ci95'][0]:+.1f}, {100 * s['change_ci95'][1]:+.1f}]"
                          for s in claim['steps'])
        verdict = 'holds or rises at every step' if claim['holds_as_k_grows'] else 'falls at some step'
        lines.append(f'  mIoU as k grows ({verdict}; change, paired 95% interval): {steps}.')
    return '\n'.join(lines)


def ablation_table(results: Dict[str, Any]) -> str:
    """Each fill with its own selection, with the oracle's (every sign patch first) and with random patches."""
    rows = [r for r in results['rows'] if 'fill' in r and r['k_ratio'] in SMALL_K]
    fills = [f for f in FILL_NAMES if any(r['fill'] == f for r in rows)]
    selections = ('LookWhere', 'oracle selection (sign patches first)', 'random selection')
    header = ' | '.join(f'{s.split(" (")[0]}, {FILL_NAMES[f]}' for f in fills for s in selections)
    lines = [f'| k | {header} |', '|---' * (1 + len(fills) * len(selections)) + '|']
    for ratio in SMALL_K:
        cells = []
        for fill in fills:
            for selection in selections:
                row = next(r for r in rows if r['fill'] == fill and r['selection'] == selection
                           and r['k_ratio'] == ratio)
                cells.append(_pm(row['miou_signs'], row['miou_signs_ci95']))
        lines.append(f'| {100 * ratio:g}% | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def cell_table(results: Dict[str, Any]) -> str:
    """What the patch cell costs (see `cell_costs`)."""
    lines = ['| what the 16 px cell costs | mIoU, signs (%) |', '|---|---|']
    lines += [f'| {name} | {100 * value:.1f} |' for name, value in results['cell_costs'].items()]
    return '\n'.join(lines)


def class_table(results: Dict[str, Any]) -> str:
    """IoU of each class for the teacher, the low-res ViT and the main fill's own selection at each k."""
    main = next((r['fill'] for r in results['rows'] if 'fill' in r), None)
    rows = [r for r in _own_rows(results) if r.get('fill', main) == main]
    short = lambda row: (f"k = {100 * row['k_ratio']:g}%" if 'k_ratio' in row else row['model'].split(' (')[0])  # noqa
    lines = ['| class | ' + ' | '.join(short(r) for r in rows) + ' |', '|---' * (len(rows) + 1) + '|']
    for c, name in enumerate(results['classes']):
        lines.append(f'| {name} | ' + ' | '.join('-' if np.isnan(r['iou'][c]) else f"{100 * r['iou'][c]:.1f}"
                                                 for r in rows) + ' |')
    return '\n'.join(lines)


def plot_results(results: Dict[str, Any], path: str) -> None:
    """Left: mIoU of the sign classes against GFLOPs, a line per fill and selection as k grows, the teacher and
    the low-res ViT. Right: mIoU against k, with the teacher's band."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    rows = results['rows']
    teacher = rows[0]
    fig, (cost_ax, k_ax) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    styles = {('LookWhere', 'selector'): 'o-', ('LookWhere', 'idw'): 'o--',
              ('oracle selection (sign patches first)', 'selector'): '^:',
              ('oracle selection (sign patches first)', 'idw'): 'v:',
              ('random selection', 'selector'): 's-.', ('random selection', 'idw'): 'x-.'}
    for (selection, fill), style in styles.items():
        line = sorted((r for r in rows if r.get('selection') == selection and r.get('fill') == fill),
                      key=lambda r: r['k_ratio'])
        if not line:
            continue
        label = f"{selection.split(' (')[0]}, {FILL_NAMES[fill]}"
        for ax, xs in ((cost_ax, [r['gflops'] for r in line]), (k_ax, [100 * r['k_ratio'] for r in line])):
            ys = [100 * r['miou_signs'] for r in line]
            ax.plot(xs, ys, style, label=label, markersize=4)
            ax.errorbar(xs, ys, yerr=[[y - 100 * r['miou_signs_ci95'][0] for y, r in zip(ys, line)],
                                      [100 * r['miou_signs_ci95'][1] - y for y, r in zip(ys, line)]],
                        fmt='none', ecolor=ax.lines[-1].get_color(), capsize=2, lw=0.8)
    for row, style in zip(rows[:2], ('*', 'D')):
        if 'fill' not in row:
            cost_ax.plot(row['gflops'], 100 * row['miou_signs'], style, markersize=14 if style == '*' else 8,
                         label=row['model'])
    k_ax.axhspan(100 * teacher['miou_signs_ci95'][0], 100 * teacher['miou_signs_ci95'][1], color='grey', alpha=0.2,
                 label="the teacher's mIoU (95% interval)")
    cost_ax.set_xscale('log')
    costs = [r['gflops'] for r in rows]
    cost_ax.set_xticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if min(costs) / 1.3 <= t <= max(costs) * 1.3])
    cost_ax.xaxis.set_major_formatter(FormatStrFormatter('%g'))
    cost_ax.xaxis.set_minor_formatter(NullFormatter())
    cost_ax.set_xlabel('GFLOPs per image (log scale, attention counted)')
    k_ax.set_xscale('log')
    k_ax.set_xticks([100 * k for k in K_RATIOS])
    k_ax.xaxis.set_major_formatter(FormatStrFormatter('%g'))
    k_ax.xaxis.set_minor_formatter(NullFormatter())
    k_ax.set_xlabel('k, % of the patches the extractor sees (log scale)')
    for ax in (cost_ax, k_ax):
        ax.set_ylabel(f"mIoU of the 14 sign classes (%), {results['test_scenes']} scenes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='lower right')
    fig.suptitle(f"Dense traffic signs, {results['settings']['img_size']} px scenes ({results['source']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', required=True, metavar='DIR',
                        help="a recipe run's folder (results.{json,md,png} go there too); with --shipped, any folder")
    parser.add_argument('--ablation', default=None, metavar='DIR',
                        help='a run of the same recipe with the other fill (e.g. --set fill=idw): its rows beside')
    parser.add_argument('--shipped', action='store_true',
                        help='evaluate the segmenter and the teacher that ship in the package (no recipe run)')
    parser.add_argument('--seed', type=int, default=CONFIGS['full'].test_seed,
                        help='with --shipped: the seed of the test scenes (default: %(default)s)')
    parser.add_argument('--scenes', type=int, default=CONFIGS['full'].test_scenes,
                        help='with --shipped: how many test scenes (default: %(default)s)')
    parser.add_argument('--redo', action='store_true', help='evaluate again when results.json exists')
    parser.add_argument('--workers', type=int, default=2, help='test-scene-generating processes (default: 2)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads, timing included (default: 2)')
    args = parser.parse_args(argv)
    if args.shipped and args.ablation:
        parser.error('--ablation compares recipe runs; --shipped evaluates the package\'s models')
    if args.scenes < 2:
        parser.error(f'--scenes must be at least 2 (the intervals resample them), got {args.scenes}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.shipped:
        os.makedirs(args.output, exist_ok=True)
        with run_logging(args.output, args.threads):
            evaluate(args, from_package(args), args.output)
        return 0
    run_evaluation(args, run_config, lambda args, cfg: evaluate(args, from_run(args, cfg), args.output))
    return 0


if __name__ == '__main__':
    sys.exit(main())
