#!/usr/bin/env python
"""Images of many sizes through one LookWhere: list batches against one image per call, resized batches, timm's
ViT at each image's own size and NaFlexViT at the same token budget; images/s and peak memory, side by side.

The images (--images, default 64): 518 px squares up to 4K frames (3840x2160), landscape and portrait, about a
fifth with a side above 2000 px; random pixels (time does not depend on them), random weights. Methods, taking
turns pass by pass (--reps passes over all images), at a fixed k (--k) and at a k_ratio (--k-ratio):
  list16      model(a list of 16 images at their own sizes): one selector pass, one extractor pass
  per_image   model(image[None]) for each image, the way a dynamic model took them before lists
  resized518  the images resized to 518x518 beforehand (not timed), tensor batches of 16: what is usual
              today, and the share of the pixels that resize drops
  naflex      timm's naflexvit_base_patch16_gap, each image shrunk to k patches (aspect kept) and padded to
              k, batches of 16: NaFlex at LookWhere's token budget (fixed k only)
  small       list16 and per_image again with a ViT-Tiny-class LookWhere (lookwhere_vitt16_512's size, fixed k),
              where the work per call is small and batching pays most
  copies      the only per-pixel steps of a call alone: padding to whole patches and the low-res copy
  vit         timm's vit_base_patch14_reg4_dinov2 on every patch of each image, one per call: measured where
              a call costs at most --max-vit-tflop, estimated for the others from the seconds per TFLOP of
              the largest ones measured (the table says which)
and the limit: the first 16 images as a list against 16 images of 518x518 as one tensor batch at the same
B x k, ms per image. Peak memory of one pass per method comes from a fresh process (resident memory growth).
Writes mixed_sizes.{json,md,png} to --out.

    python benchmarks/mixed_sizes.py             # 64 images, 2 passes each, about 15 min on 2 cores
    python benchmarks/mixed_sizes.py --quick     # 16 images, 1 pass, no memory probes
    python benchmarks/mixed_sizes.py --tiny      # a tiny random architecture: checks the script only
"""
import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import timm
import timm_lookwhere  # noqa: F401  (registers the LookWhere models)
from timm_lookwhere.cost import (
    MEMORY_CHILD_FLAG, count_flops, peak_memory_in_fresh_process, report_peak_memory, time_call, time_in_turns,
)

from report import save_results
from speed import log, machine_info

LOOKWHERE = 'lookwhere_vitb_518'
SMALL = 'lookwhere_vitt16_512'  # a ViT-Tiny-class LookWhere (the shipped sign model's size): little work per call
VIT = 'vit_base_patch14_reg4_dinov2'
NAFLEX = 'naflexvit_base_patch16_gap'
BATCH = 16
RESIZED = 518
TINY = dict(embed_dim=32, depth=2, num_heads=2, selector_img_size=42, selector_depth=1, map_grid=8)
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
TINY_SMALL = dict(embed_dim=32, depth=2, num_heads=2, selector_img_size=48, map_grid=8)
TINY_NAFLEX = dict(embed_dim=32, depth=2, num_heads=2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=64, help='images of mixed sizes (default: %(default)s)')
    parser.add_argument('--k', type=int, default=256, help='fixed patches per image (default: %(default)s)')
    parser.add_argument('--k-ratio', type=float, default=0.02,
                        help='or that share of each image (default: %(default)s)')
    parser.add_argument('--reps', type=int, default=2, help='timed passes per method (default: %(default)s)')
    parser.add_argument('--max-vit-tflop', type=float, default=0.6,
                        help="measure timm's ViT where a call costs at most this, estimate the rest "
                             '(default: %(default)s)')
    parser.add_argument('--max-vit-measured', type=int, default=6,
                        help="at most this many images measured with timm's ViT (default: %(default)s)")
    parser.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True,
                        help='probe each method\'s peak memory in a fresh process (default: yes)')
    parser.add_argument('--seed', type=int, default=0, help='image sizes and pixels (default: %(default)s)')
    parser.add_argument('--quick', action='store_true', help='16 images, 1 pass, no memory probes')
    parser.add_argument('--tiny', action='store_true', help='a tiny random architecture on small images')
    parser.add_argument('--threads', type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'results')
    parser.add_argument(MEMORY_CHILD_FLAG, help=argparse.SUPPRESS)  # internal: one memory probe
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.reps, args.memory = 16, 1, False
    for name in ('images', 'k', 'reps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if not 0 < args.k_ratio <= 1:
        parser.error(f'--k-ratio must be in (0, 1], got {args.k_ratio}')
    args.device = 'cpu'  # speed.machine_info reads it
    args.amp = False
    return args


# --------------------------------------------------------------------------------------------
# images and models


def image_sizes(count: int, seed: int, tiny: bool = False) -> List[Tuple[int, int]]:
    """(H, W) of `count` images: a quarter squares of 518-1036 px, a fifth with a long side of 2001-3840 px
    (16:9, 4:3 and 3:2 frames), the rest 600-2000 px at aspect ratios 1.2-2; a third of the non-squares
    portrait. Tiny: the same shapes at a tenth of the size."""
    rng = random.Random(seed)
    squares, large = round(count / 4), round(count / 5)
    sizes = []
    for i in range(count):
        if i < squares:
            side = rng.randint(518, 1036)
            height, width = side, side
        else:
            if i < squares + large:
                long_side, aspect = rng.randint(2001, 3840), rng.choice([16 / 9, 4 / 3, 3 / 2])
            else:
                long_side, aspect = rng.randint(600, 2000), rng.uniform(1.2, 2.0)
            height, width = round(long_side / aspect), long_side
            if rng.random() < 1 / 3:
                height, width = width, height
        sizes.append((max(60, height // 10), max(60, width // 10)) if tiny else (height, width))
    rng.shuffle(sizes)
    return sizes


def make_images(sizes: Sequence[Tuple[int, int]], seed: int) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


def build_models(args: argparse.Namespace) -> Dict[str, torch.nn.Module]:
    """The LookWhere at each k setting, timm's ViT and NaFlexViT; random weights."""
    torch.manual_seed(0)
    small = TINY if args.tiny else {}
    lookwhere = dict(dynamic_img_size=True, dynamic_img_pad=True, num_classes=1000, **small)
    models = dict(
        fixed_k=timm.create_model(LOOKWHERE, k=tiny_k(args), **lookwhere),
        k_ratio=timm.create_model(LOOKWHERE, k_ratio=args.k_ratio, **lookwhere),
        vit=create_vit(args),
        naflex=timm.create_model(NAFLEX, num_classes=1000, **(TINY_NAFLEX if args.tiny else {})),
        small_fixed_k=timm.create_model(SMALL, k=tiny_k(args), **dict(lookwhere, **(TINY_SMALL if args.tiny else {}))),
    )
    return {name: model.eval() for name, model in models.items()}


def tiny_k(args: argparse.Namespace) -> int:
    """--k, or for --tiny a k that fits its smallest images (60 px: 16 patches)."""
    return 16 if args.tiny else args.k


def create_vit(args: argparse.Namespace) -> torch.nn.Module:
    """timm's ViT on every patch of an image of any size (padded to whole patches)."""
    return timm.create_model(VIT, dynamic_img_size=True, dynamic_img_pad=True, num_classes=1000,
                             **(TINY_VIT if args.tiny else {}))


def vit_tflop(meta_vit: torch.nn.Module, size: Tuple[int, int]) -> float:
    """TFLOPs of one call of timm's ViT (built on the meta device, where counting is free) on an image of `size`,
    attention included."""
    return count_flops(meta_vit, torch.empty(1, 3, *size, device='meta')) / 1e12


def resize_to(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size=size, mode='bilinear', antialias=True, align_corners=False)[0]


def naflex_batch(images: Sequence[torch.Tensor], budget: int, patch: int = 16) -> Dict[str, torch.Tensor]:
    """timm's NaFlex batch of `images`, each shrunk (aspect kept) to at most `budget` patches and padded to it, as
    NaFlex's loader would give it: patches (B, budget, p * p * C), patch_coord, patch_valid."""
    patches = torch.zeros(len(images), budget, patch * patch * 3)
    coord = torch.zeros(len(images), budget, 2, dtype=torch.long)
    valid = torch.zeros(len(images), budget, dtype=torch.bool)
    for b, image in enumerate(images):
        height, width = image.shape[1:]
        scale = math.sqrt(budget / ((height / patch) * (width / patch)))
        rows, cols = max(1, math.floor(height * scale / patch)), max(1, math.floor(width * scale / patch))
        while rows * cols > budget:
            rows, cols = (rows - 1, cols) if rows >= cols else (rows, cols - 1)
        small = resize_to(image, (rows * patch, cols * patch))  # (3, rows * p, cols * p)
        cells = small.view(3, rows, patch, cols, patch).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)  # (p, p, C)
        patches[b, :rows * cols] = cells
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij'), -1).view(-1, 2)
        coord[b, :rows * cols] = grid
        valid[b, :rows * cols] = True
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)


# --------------------------------------------------------------------------------------------
# one pass of each method


def batches(items: Sequence, size: int) -> List[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def passes(models: Dict[str, torch.nn.Module], images: List[torch.Tensor], args) -> Dict[str, Callable[[], None]]:
    """name -> a function that runs the method over every image once (inputs prepared outside the timing)."""
    resized = [torch.stack([resize_to(x, (RESIZED, RESIZED)) for x in group]) for group in batches(images, BATCH)]
    naflex = [naflex_batch(group, tiny_k(args)) for group in batches(images, BATCH)]
    out = {}
    for mode in ('fixed_k', 'k_ratio'):
        model = models[mode]
        out[f'list16/{mode}'] = lambda model=model: [model(list(group)) for group in batches(images, BATCH)]
        out[f'per_image/{mode}'] = lambda model=model: [model(x[None]) for x in images]
        out[f'resized518/{mode}'] = lambda model=model: [model(group) for group in resized]
    out['naflex/fixed_k'] = lambda: [models['naflex'](batch) for batch in naflex]
    small = models['small_fixed_k']
    out['list16/small_fixed_k'] = lambda: [small(list(group)) for group in batches(images, BATCH)]
    out['per_image/small_fixed_k'] = lambda: [small(x[None]) for x in images]
    out['copies/small_fixed_k'] = lambda: [low_res_copy(small, x) for x in images]
    return out


def low_res_copy(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """What every LookWhere call does once per image whatever k: pad to whole patches and make the selector's
    low-res copy (antialiased beyond the authors' downscale). The only steps that read every pixel."""
    padded, grid = model._image_on_grid(image[None])
    return model.selector.low_res_copy(padded, grid, model.pixel_mean, model.pixel_std)


def time_passes(runs: Dict[str, Callable[[], None]], reps: int) -> Dict[str, List[float]]:
    """Seconds per pass of each method after a warm-up pass; the methods take turns, so load from elsewhere falls
    on all alike."""
    with torch.inference_mode():
        return time_in_turns(runs, reps, report=lambda rep, name, seconds: log(
            f'pass {rep + 1}/{reps} {name}: {seconds:.1f} s'))


def same_size_limit(models: Dict[str, torch.nn.Module], images: List[torch.Tensor], reps: int) -> Dict[str, object]:
    """ms per image of the first 16 images as a list against 16 images of 518x518 as one tensor batch, at the same
    fixed k (the same B x k extractor tokens)."""
    model = models['fixed_k']
    mixed = list(images[:BATCH])
    square = torch.randn(len(mixed), 3, RESIZED, RESIZED, generator=torch.Generator().manual_seed(1))
    runs = dict(mixed=lambda: model(mixed), same_size=lambda: model(square))
    seconds = time_passes(runs, max(reps, 3))
    per_image = {name: [1e3 * s / len(mixed) for s in values] for name, values in seconds.items()}
    ratios = [m / s for m, s in zip(per_image['mixed'], per_image['same_size'])]
    return dict(ms_per_image={name: statistics.median(v) for name, v in per_image.items()},
                ratio=statistics.median(ratios), ratios=ratios, images=len(mixed))


def vit_times(vit: torch.nn.Module, images: List[torch.Tensor], args) -> List[Dict[str, object]]:
    """timm's ViT on each image at its own size: measured where a call costs at most --max-vit-tflop (the cheapest
    --max-vit-measured), estimated for the rest at the seconds per TFLOP of the largest measured ones."""
    with torch.device('meta'):
        meta_vit = create_vit(args).eval()
    rows = [dict(index=i, size=tuple(x.shape[1:]), tflop=vit_tflop(meta_vit, tuple(x.shape[1:])))
            for i, x in enumerate(images)]
    cheap = sorted((r for r in rows if r['tflop'] <= args.max_vit_tflop), key=lambda r: r['tflop'])
    measured = cheap[:args.max_vit_measured] if args.max_vit_measured else []
    with torch.inference_mode():
        for row in measured:
            x = images[row['index']][None]
            vit(x)  # warm-up at this size
            row['seconds'], row['measured'] = time_call(lambda: vit(x)), True
            log(f"vit {row['size'][0]}x{row['size'][1]}: {row['seconds']:.2f} s ({row['tflop']:.3f} TFLOP)")
    if not measured:
        raise SystemExit('no image is cheap enough to measure timm\'s ViT on: raise --max-vit-tflop')
    largest = measured[-max(1, len(measured) // 2):]  # the rate of big calls, closest to the estimated ones
    rate = statistics.median(r['seconds'] / r['tflop'] for r in largest)  # seconds per TFLOP
    for row in rows:
        if 'seconds' not in row:
            row['seconds'], row['measured'] = rate * row['tflop'], False
    return rows


# --------------------------------------------------------------------------------------------
# memory, in a fresh process per method


def memory_child(spec: str) -> None:
    spec = json.loads(spec)
    args = parse_args(spec['argv'])
    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_images(image_sizes(args.images, args.seed, args.tiny), args.seed)
    runs = passes(build_models(args), images, args)
    with torch.inference_mode():
        report_peak_memory(runs[spec['method']])


def measure_memory(method: str, argv: Sequence[str]) -> Dict[str, object]:
    return peak_memory_in_fresh_process(__file__, dict(method=method, argv=list(argv)))


# --------------------------------------------------------------------------------------------
# the run and its report


def run(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = image_sizes(args.images, args.seed, args.tiny)
    images = make_images(sizes, args.seed)
    models = build_models(args)
    pixels = [h * w for h, w in sizes]
    log(f'{len(images)} images, {min(pixels) / 1e6:.2f}-{max(pixels) / 1e6:.2f} MP, '
        f'{sum(max(s) > 2000 for s in sizes)} with a side above 2000 px')
    seconds = time_passes(passes(models, images, args), args.reps)
    methods = {}
    for name, values in seconds.items():
        methods[name] = dict(images_per_s=len(images) / statistics.median(values), seconds=values)
    limit = same_size_limit(models, images, args.reps)
    vit = vit_times(models['vit'], images, args)
    methods['vit/own_size'] = dict(images_per_s=len(images) / sum(r['seconds'] for r in vit),
                                   measured=sum(r['measured'] for r in vit))
    if args.memory:
        for name in seconds:
            methods[name]['memory'] = measure_memory(name, argv)
            log(f"memory {name}: {methods[name]['memory']['peak_mb']:.0f} MB")
    patches = [math.ceil(h / 14) * math.ceil(w / 14) for h, w in sizes]
    k_ratio_counts = [max(1, int(args.k_ratio * n)) for n in patches]
    return dict(
        machine=machine_info(args), command='python benchmarks/mixed_sizes.py ' + ' '.join(argv), sizes=sizes,
        k=tiny_k(args), k_ratio=args.k_ratio, k_ratio_counts=k_ratio_counts, methods=methods, same_size=limit, vit=vit,
        resized_pixels_kept=statistics.mean(min(1.0, RESIZED ** 2 / p) for p in pixels),
    )


def to_markdown(results: Dict[str, object]) -> str:
    methods, k, k_ratio = results['methods'], results['k'], results['k_ratio']
    counts = results['k_ratio_counts']
    base = {mode: methods[f'per_image/{mode}']['images_per_s'] for mode in ('fixed_k', 'k_ratio', 'small_fixed_k')}
    described = {
        'list16/fixed_k': f'LookWhere, lists of {BATCH} at their own sizes, k = {k}',
        'per_image/fixed_k': f'LookWhere, one image per call, k = {k}',
        'resized518/fixed_k': f'LookWhere, resized to {RESIZED} px, tensor batches of {BATCH}, k = {k}',
        'list16/k_ratio': f'LookWhere, lists of {BATCH}, k_ratio = {k_ratio} (k {min(counts)}-{max(counts)})',
        'per_image/k_ratio': f'LookWhere, one image per call, k_ratio = {k_ratio}',
        'resized518/k_ratio': f'LookWhere, resized to {RESIZED} px, batches of {BATCH}, k_ratio = {k_ratio}',
        'naflex/fixed_k': f'NaFlexViT-B/16, each image shrunk to {k} patches, batches of {BATCH}',
        'list16/small_fixed_k': f'LookWhere ViT-Tiny-class /16, lists of {BATCH}, k = {k}',
        'per_image/small_fixed_k': f'LookWhere ViT-Tiny-class /16, one image per call, k = {k}',
        'copies/small_fixed_k': 'of which: padding and the selector\'s low-res copy alone (every pixel, once)',
        'vit/own_size': "timm's ViT-B/14 on every patch of each image, one per call",
    }
    lines = [
        f"{len(results['sizes'])} images, {results['machine']['cpu']}, {results['machine']['torch_threads']} threads, "
        f"torch {results['machine']['torch']}; `{results['command']}`", '',
        '| method | images/s | vs one per call | peak memory (MB) |', '|---|---|---|---|']
    for name, text in described.items():
        row = methods[name]
        mode = name.split('/')[1]
        versus = f"{row['images_per_s'] / base[mode]:.2f}x" if mode in base else '-'
        memory = f"{row['memory']['peak_mb']:.0f}" if 'memory' in row else '-'
        if name == 'vit/own_size':
            text += f" ({row['measured']} measured, {len(results['vit']) - row['measured']} estimated)"
            versus = f"{row['images_per_s'] / base['fixed_k']:.3f}x"
        lines.append(f"| {text} | {row['images_per_s']:.2f} | {versus} | {memory} |")
    same = results['same_size']
    kept = 100 * results['resized_pixels_kept']
    lines += ['', f'Resized to {RESIZED} px, the images keep {kept:.0f}% of their pixels on average.', '',
              f"Cost per image at the same B x k ({same['images']} images, k = {k}): mixed sizes as a list "
              f"{same['ms_per_image']['mixed']:.1f} ms, {RESIZED}x{RESIZED} as one tensor batch "
              f"{same['ms_per_image']['same_size']:.1f} ms: **{same['ratio']:.2f}x** "
              f"(paired passes {min(same['ratios']):.2f}-{max(same['ratios']):.2f}x)."]
    return '\n'.join(lines) + '\n'


def plot(results: Dict[str, object], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    methods = results['methods']
    names = [n for n in methods if n != 'vit/own_size'] + ['vit/own_size']
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    left.barh(range(len(names)), [methods[n]['images_per_s'] for n in names], color='tab:green')
    left.set_yticks(range(len(names)), names)
    left.set_xscale('log')
    left.set_xlabel('images / s (log)')
    left.set_title(f"{len(results['sizes'])} images of mixed sizes")
    left.invert_yaxis()
    vit = results['vit']
    megapixels = [h * w / 1e6 for h, w in (tuple(r['size']) for r in vit)]
    measured = [r['measured'] for r in vit]
    seconds = [r['seconds'] for r in vit]
    right.scatter([m for m, ok in zip(megapixels, measured) if ok], [s for s, ok in zip(seconds, measured) if ok],
                  color='tab:red', label="timm ViT-B/14, measured")
    right.scatter([m for m, ok in zip(megapixels, measured) if not ok],
                  [s for s, ok in zip(seconds, measured) if not ok], color='tab:red', marker='x',
                  label='timm ViT-B/14, estimated')
    for mode, colour in (('fixed_k', 'tab:green'), ('k_ratio', 'tab:blue')):
        per_call = 1 / methods[f'list16/{mode}']['images_per_s']
        label = f"LookWhere k = {results['k']}" if mode == 'fixed_k' else f"LookWhere k_ratio = {results['k_ratio']}"
        right.axhline(per_call, color=colour, linestyle='--', label=f'{label}: mean s per image in lists')
    right.set_xscale('log')
    right.set_yscale('log')
    right.set_xlabel('image size (megapixels)')
    right.set_ylabel('seconds per image')
    right.set_title('Cost follows k, not the image')
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return {}
    results = run(args, argv)
    save_results(results, args.out, 'mixed_sizes', to_markdown, plot)
    return results


if __name__ == '__main__':
    main()
