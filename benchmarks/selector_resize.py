#!/usr/bin/env python3
""" How the selector's low-res copy is made, at downscales beyond the authors' 3.4x.

The authors resize 518 -> 154 px bilinearly without antialiasing. At 4K the same op is a 25x
downscale that reads about one pixel in 600, so the selector sees aliasing. This measures what that
costs: the shipped sign model (`lookwhere_vitt16_256.sparse_signs`, selector at 128 px), built with
`dynamic_img_size=True`, on the same test scenes rendered at 1x, 2x and 4x its size (the sign keeps
its share of the image), its low-res copy made three ways:

    bilinear       the authors' op (F.interpolate bilinear, antialias=False)
    antialiased    bilinear with antialias=True (a triangle filter as wide as the downscale)
    area           F.interpolate(mode='area'): the mean of each block of pixels

and reports, for each, the share of the sign's patches among the k chosen (k = k_ratio of the
scene's patches), its paired difference from the authors' op on the same scenes with a 95% interval,
and the model's accuracy.

    python benchmarks/selector_resize.py                      # 500 scenes at 256-2048 px, about 12 min on 2 cores
    python benchmarks/selector_resize.py --scenes 50 --sizes 256 512 --output /tmp/resize
"""
import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import timm
import timm_lookwhere  # noqa: F401  (registers the models)
from timm_lookwhere.cost import median_latency_ms
from timm_lookwhere.scenes import SceneTensors, SparseSigns, sign_patches_seen

MODEL = 'lookwhere_vitt16_256.sparse_signs'
MODES = ('bilinear', 'antialiased', 'area')
SEED = 11  # a test-scene seed of its own


@contextlib.contextmanager
def low_res_mode(model: torch.nn.Module, mode: str):
    """The selector's low-res copy made with `mode` while the block lasts (the scenes are whole patches and
    normalised floats, so the copy is a plain resize of them)."""
    selector = model.selector
    antialias = selector.antialias
    selector.antialias = mode == 'antialiased'
    if mode == 'area':  # an instance attribute: it shadows the method until popped
        selector.low_res_copy = lambda x, grid_size, mean, std: F.interpolate(x, size=selector.img_size, mode='area')
    try:
        yield
    finally:
        selector.antialias = antialias
        selector.__dict__.pop('low_res_copy', None)


def normalize(images: torch.Tensor, cfg: Dict) -> torch.Tensor:
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def measure(model, size: int, args) -> Dict[str, Dict[str, float]]:
    signs = SparseSigns('test', args.scenes, img_size=size, seed=SEED)
    loader = DataLoader(SceneTensors(signs), batch_size=args.batch_size, num_workers=args.workers)
    patch = model.patch_embed.patch_size[0]
    grid = (size // patch, size // patch)
    seen: Dict[str, List[torch.Tensor]] = {m: [] for m in MODES}
    correct: Dict[str, int] = {m: 0 for m in MODES}
    for images, labels, boxes in tqdm(loader, desc=f'{size} px scenes', unit='batch', file=sys.stdout):
        x = normalize(images, model.pretrained_cfg)
        for mode in MODES:
            with low_res_mode(model, mode):
                out = model.forward_all(x)
                logits = model.forward_head(out['tokens'])
            seen[mode].append(sign_patches_seen(out['indices'], boxes, grid, patch))
            correct[mode] += int((logits.argmax(1) == labels).sum())
    n = args.scenes
    seen = {mode: torch.cat(values) for mode, values in seen.items()}
    out = {}
    for mode in MODES:
        gain = seen[mode] - seen[MODES[0]]  # paired with the authors' op, scene by scene
        out[mode] = dict(sign_patches_seen=float(seen[mode].mean()), accuracy=correct[mode] / n,
                         gain=float(gain.mean()), gain_ci95=float(1.96 * gain.std() / n ** 0.5),
                         k=model.topk.num_keep(grid[0] * grid[1]), patches=grid[0] * grid[1],
                         downscale=size / model.selector.img_size[0])
    return out


@torch.no_grad()
def selector_ms_on_4k(model, runs: int = 5) -> Dict[str, float]:
    """Median ms of the selector (resize included) on one 3836x2156 frame, per mode."""
    x = torch.randn(1, 3, 2160, 3840)
    out = {}
    for mode in MODES:
        with low_res_mode(model, mode):
            out[mode] = median_latency_ms({mode: model.forward_selection}, x, runs)[mode]  # after one warm-up call
    return out


def table(results: Dict, args) -> str:
    lines = [
        f'Shipped sign model `{MODEL}`, dynamic_img_size, k_ratio {args.k_ratio}; {args.scenes} test scenes '
        f'(seed {SEED}) per size. Cells: sign patches chosen (%), its gain over bilinear on the same scenes '
        f'(points, 95% interval) / accuracy (%).',
        '',
        '| scene | downscale to the 128 px copy | k of patches | ' + ' | '.join(MODES) + ' |',
        '|---|---|---|' + '---|' * len(MODES),
    ]
    for size, row in results['sizes'].items():
        first = row[MODES[0]]
        cells = ' | '.join(
            f"{100 * row[m]['sign_patches_seen']:.1f}"
            + (f" ({100 * row[m]['gain']:+.1f} ± {100 * row[m]['gain_ci95']:.1f})" if m != MODES[0] else '')
            + f" / {100 * row[m]['accuracy']:.1f}" for m in MODES)
        lines.append(f"| {size} px | {first['downscale']:.0f}x | {first['k']} of {first['patches']} | {cells} |")
    ms = results['selector_ms_4k']
    lines += ['', 'Selector time on one 3840x2160 frame (median ms, resize included): '
              + ', '.join(f'{m} {ms[m]:.1f}' for m in MODES) + '.']
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--scenes', type=int, default=500, help='test scenes per size (default: %(default)s)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[256, 512, 1024, 2048],
                        help='scene sides in px, multiples of 16 (default: %(default)s)')
    parser.add_argument('--k-ratio', type=float, default=0.05,
                        help='share of the patches chosen (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=25)
    parser.add_argument('--workers', type=int, default=2, help='scene-generating processes (default: %(default)s)')
    parser.add_argument('--output', default='benchmarks/results', help='folder for selector_resize.{md,json}')
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if s % 16]
    if bad:
        parser.error(f'--sizes must be multiples of the patch size 16, got {bad}')
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=True, dynamic_img_size=True, k_ratio=args.k_ratio).eval()
    results = dict(model=MODEL, k_ratio=args.k_ratio, scenes=args.scenes, seed=SEED, threads=torch.get_num_threads(),
                   sizes={size: measure(model, size, args) for size in args.sizes},
                   selector_ms_4k=selector_ms_on_4k(model))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, 'selector_resize.json'), 'w') as f:
        json.dump(results, f, indent=2)
    text = table(results, args)
    with open(os.path.join(args.output, 'selector_resize.md'), 'w') as f:
        f.write(text + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
