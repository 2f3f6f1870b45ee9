"""Markdown, JSON and PNG plots from the results of `speed.py`, and the files every benchmark writes."""
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

GROUP_TITLE = {'infer': 'inference', 'train': 'training step (forward + backward + AdamW)'}
TIME_PLOT, SPEEDUP_PLOT, BREAKDOWN_PLOT = 'time_vs_resolution.png', 'speedup_vs_k.png', 'time_breakdown.png'


def write_report(results: Dict[str, object], out: Path, plots: bool = True) -> str:
    """Writes speed.json, speed.md and (with matplotlib) the plots into `out`; returns the Markdown."""
    (out / 'speed.json').write_text(json.dumps(results, indent=1))
    written = draw_plots(results, out) if plots else []
    markdown = to_markdown(results, written)
    (out / 'speed.md').write_text(markdown)
    return markdown


# ------------------------------------------------------------------------------------------------
# Markdown


def save_results(results: Dict[str, object], out: Path, name: str, to_markdown: Callable[[Dict[str, object]], str],
                 plot: Callable[[Dict[str, object], Path], None]) -> str:
    """Write NAME.json, NAME.md and NAME.png into `out`; print and return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(json.dumps(results, indent=1))
    markdown = to_markdown(results)
    (out / f'{name}.md').write_text(markdown)
    plot(results, out / f'{name}.png')
    print(markdown)
    return markdown


def fmt_spread(value: Optional[Dict[str, float]], scale: float = 1.0, digits: int = 2, suffix: str = '') -> str:
    if not value:
        return ''
    med, lo, hi = (value[k] * scale for k in ('median', 'min', 'max'))
    return f'{med:.{digits}f}{suffix} ({lo:.{digits}f}-{hi:.{digits}f})'


def fmt_seconds(value: Dict[str, float]) -> str:
    """Seconds per call, in ms below one second, median (min-max)."""
    if value['median'] < 1:
        return fmt_spread(value, 1e3, 1, ' ms')
    return fmt_spread(value, 1.0, 2, ' s')


def fmt_shares(row: Dict[str, object]) -> str:
    if 'outside_blocks' not in row:
        return ''
    outside, selector = row['outside_blocks']['median'], row['selector_share']['median']
    flop_outside = 1 - row['flop_share']['blocks']
    return f'{outside:.0%} ({selector:.0%} + {outside - selector:.0%}); of FLOPs {flop_outside:.0%}'


def group_table(rows: List[Dict[str, object]]) -> List[str]:
    lines = [
        '| model | GFLOP / image | time / call, median (min-max) | images / s | GFLOP/s achieved '
        '| speed-up over full ViT, median (min-max) | FLOP ratio | time outside extractor blocks (selector + rest) '
        '| peak RSS growth |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        peak = row.get('peak_mb')
        peak = f"{peak['peak_mb']:.0f} MB" if peak else ''
        if 'skipped' in row:
            lines.append(f"| {row['label']} | {row['gflop_per_image']:.3g} | skipped ({row['skipped']}) "
                         f'| | | | | | |')
            continue
        speedup = fmt_spread(row.get('speedup'), digits=1, suffix='x')
        if 'dense_over_cls' in row:
            speedup += f" (dense / cls: {fmt_spread(row['dense_over_cls'], digits=3)})"
        flop_ratio = f"{row['flop_ratio']:.1f}x" if 'flop_ratio' in row else ''
        achieved = row['gflop_per_image'] * row['images_per_s']  # how well the CPU's cores are used
        lines.append(f"| {row['label']} | {row['gflop_per_image']:.3g} | {fmt_seconds(row['seconds'])} "
                     f"| {row['images_per_s']:.2f} | {achieved:.0f} | {speedup} | {flop_ratio} | {fmt_shares(row)} "
                     f"| {peak} |")
    return lines


def targets_table(targets: List[Dict[str, object]]) -> List[str]:
    lines = ['| target | configuration | measured, median (min-max) | limit | holds | if time followed FLOPs |',
             '|---|---|---:|---:|:---:|---:|']
    for t in targets:
        config = f"{t['task']}, {t['size']} px, batch {t['batch']}, k_ratio {t['k_ratio']:g}"
        measured = fmt_spread(t['measured'], digits=3) if t['measured'] else 'not measured in this run'
        holds = {True: 'yes', False: '**no**', None: ''}[t['holds']]
        bound = '' if t['flop_bound'] is None else f"{t['flop_bound']:.3f}"
        lines.append(f"| {t['name']} | {config} | {measured} | {t['op']} {t['limit']:g} | {holds} | {bound} |")
    return lines


def to_markdown(results: Dict[str, object], plots: List[str]) -> str:
    m = results['machine']
    lines = [
        f"Command: `{results['command']}`",
        '',
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"timm {m['timm']}, Python {m['python']}; load average {m['load_average_start'][0]:.1f} at the start, "
        f"{m['load_average_end'][0]:.1f} at the end. Models on {m.get('gpu') or m.get('device', 'cpu')}"
        f"{', bfloat16 autocast' if m.get('amp') else ', float32'}.",
        '',
        '### Targets',
        '',
        *targets_table(results['targets']),
    ]
    for key in dict.fromkeys((r['task'], r['size'], r['batch']) for r in results['rows']):
        rows = [r for r in results['rows'] if (r['task'], r['size'], r['batch']) == key]
        lines += ['', f'### {GROUP_TITLE[key[0]]}, {key[1]} px, batch {key[2]}', '', *group_table(rows)]
    if plots:
        lines += [''] + [f'![{Path(p).stem}]({Path(p).name})' for p in plots]
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------
# plots


def draw_plots(results: Dict[str, object], out: Path) -> List[str]:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plots (pip install -e ".[bench]")')
        return []
    rows = [r for r in results['rows'] if 'seconds' in r]
    written = []
    for name, draw in ((SPEEDUP_PLOT, plot_speedup), (TIME_PLOT, plot_time), (BREAKDOWN_PLOT, plot_breakdown)):
        fig = draw(plt, rows)
        if fig is not None:
            fig.savefig(out / name, dpi=110, bbox_inches='tight')
            plt.close(fig)
            written.append(str(out / name))
    return written


def plot_speedup(plt, rows):
    """Speed-up over the full ViT against k_ratio, with LookWhere's FLOP ratio (its limit) dashed."""
    configs = sorted({(r['size'], r['batch']) for r in rows if r['task'] == 'infer' and 'speedup' in r})
    if not configs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (size, batch) in enumerate(configs):
        color = f'C{i}'
        for family, style, name in (('lookwhere', '-o', 'LookWhere'), ('lowres', ':s', 'low-res ViT, same tokens')):
            pts = sorted((r['k_ratio'], r) for r in rows if r['task'] == 'infer' and r['size'] == size
                         and r['batch'] == batch and r['family'] == family and r['output'] == 'cls'
                         and 'speedup' in r)
            if not pts:
                continue
            ks = [k for k, _ in pts]
            med = [r['speedup']['median'] for _, r in pts]
            err = [[m - r['speedup']['min'] for m, (_, r) in zip(med, pts)],
                   [r['speedup']['max'] - m for m, (_, r) in zip(med, pts)]]
            ax.errorbar(ks, med, yerr=err, fmt=style, color=color, capsize=3, label=f'{name}, {size} px, batch {batch}')
            if family == 'lookwhere':
                ax.plot(ks, [r['flop_ratio'] for _, r in pts], '--', color=color, alpha=0.6,
                        label=f'LookWhere FLOP ratio (the limit), {size} px')
    ax.set(xscale='log', yscale='log', xlabel='k_ratio (share of high-res patches kept)',
           ylabel='speed-up over the full-image ViT-B/14', title='Inference speed-up against k')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_time(plt, rows):
    """Time per image against resolution (log-log), one panel per batch size."""
    infer = [r for r in rows if r['task'] == 'infer' and r['output'] == 'cls']
    batches = sorted({r['batch'] for r in infer})
    if not batches or len({r['size'] for r in infer}) < 2:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        lines = sorted({(r['family'], r['k_ratio']) for r in infer if r['batch'] == batch},
                       key=lambda fk: (fk[0], fk[1] or 0))
        for family, k in lines:
            pts = sorted((r['size'], r['seconds']['median'] / batch) for r in infer
                         if r['batch'] == batch and r['family'] == family and r['k_ratio'] == k)
            name = {'vit': 'ViT-B/14 full image', 'lookwhere': f'LookWhere k_ratio {k}',
                    'lowres': f'ViT-B/14 low-res, tokens of k_ratio {k}'}[family]
            style = {'vit': 'k-o', 'lookwhere': '-o', 'lowres': ':s'}[family]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set(xscale='log', yscale='log', xlabel='image side (px)', ylabel='seconds per image',
               title=f'Inference time against resolution, batch {batch}')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_breakdown(plt, rows):
    """Where LookWhere's time goes: selector, extractor blocks, the rest (top-k, gather, fill, head)."""
    lw = [r for r in rows if r['family'] == 'lookwhere' and 'outside_blocks' in r]
    if not lw:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(lw) + 1.2))
    names = [f"{r['size']} px, b{r['batch']}, k {r['k_ratio']:g}{', dense' if r['output'] == 'dense' else ''}"
             for r in lw]
    selector = [r['selector_share']['median'] for r in lw]
    rest = [r['overhead_share']['median'] for r in lw]
    blocks = [1 - r['outside_blocks']['median'] for r in lw]
    ax.barh(names, selector, color='C1', label='selector (low-res ViT + map head)')
    ax.barh(names, blocks, left=selector, color='C0', label="extractor's blocks")
    ax.barh(names, rest, left=[s + b for s, b in zip(selector, blocks)], color='C3',
            label='rest: resize, top-k, gather + embed, norm, head, dense fill')
    ax.set(xlim=(0, 1), xlabel="share of LookWhere's time (median)", title="Where LookWhere's time goes")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc='lower right')
    return fig
