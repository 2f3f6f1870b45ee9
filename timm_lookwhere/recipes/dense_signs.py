""" The dense-signs recipe: trains and ships a LookWhere segmenter, its full-res teacher and the low-res baseline.

Dense recognition, the paper's second claim (ADE20K), on `timm_lookwhere.scenes`'s dense scenes: 512 px
street scenes with 1 to 6 signs (14 classes, each 0.25-0.5% of the image) among sign-like clutter, a
mask per pixel (background + 14 classes). The segmenter is `timm_lookwhere.segmentation`'s: LookWhere's
filled patch grid, a linear head per cell, logits upsampled to the pixels.

Stages:

    data       training and validation scenes with their masks, as memory-mapped uint8 caches
    teacher    a full-res ViT segmenter (every patch, the same head), starting from the shipped 512 px
               sign teacher, whose patch tokens already name the sign under them (it was patch-supervised);
               first on windows of `teacher_window` patches around a sign at their true positions (a
               quarter of the tokens, a 16th of the attention), then on whole scenes
    lookwhere  starts from the shipped `lookwhere_vitt16_512.sparse_signs`: its selector was distilled to
               find signs in these very scenes (33 min of this CPU) and its extractor from the teacher the
               stage above starts from, so the teacher's head fits its tokens and starts the head here;
               then fine-tuned for segmentation, the selector frozen, k drawn per step from `k_range` (2% to
               every patch, so that more patches never hurt), the cells it did not see filled by `fill` (the
               learned selector-informed fill, trained here with the head; 'idw' is the authors' fill).
               `distill_steps` > 0 first matches its filled grid to the trained teacher's (MSE)
    lowres     the baseline at equal cost: the teacher on a low-res copy of the image, at the resolution
               whose FLOPs match LookWhere's at k = `lowres_match_k`, fine-tuned the same way
    export     fp16 safetensors of the segmenter and the teacher (`--ship` copies both into the package)

The loss is pixel cross-entropy at every `loss_stride`-th pixel (the logits come from a 32x32 grid: a
quarter of the pixels in each direction loses nothing they hold, at a 16th of the memory), background
weighted by `background_weight` (signs are ~1% of the pixels).

Every stage keeps its output in --output and is skipped when it is there; the training stages save their
state every few minutes, so a stopped run goes on where it stopped. Progress (with time left) goes to the
console and OUTPUT/run.log, each stage's wall time to OUTPUT/timings.json. The folder holds one run:
OUTPUT/run.json keeps its --tiny and --set (each value checked before the first stage), a launch with other
settings is refused, and so is a second launch while one runs. The evaluation on fresh test scenes is a
benchmark of the source tree: `python benchmarks/dense_signs.py --output DIR`.

    python -m timm_lookwhere.recipes.dense_signs --output runs/dense_signs --ship   # about 1 h 20 min on 2 cores
    python -m timm_lookwhere.recipes.dense_signs --output /tmp/ds_tiny --tiny       # every stage, a tiny model
"""
import dataclasses
import logging
import math
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import timm
from timm.layers import resample_abs_pos_embed

from ..scenes import NUM_SIGNS_RANGE, SEGMENTATION_CLASSES, WIDE_AREA_RANGE, DenseSceneTensors, DenseSigns
from ..segmentation import (
    SHIPPED_DENSE_TEACHERS, SHIPPED_SEGMENTERS, LookWhereSegmenter, ViTSegmenter, confusion_matrix, create_segmenter,
    mean_iou, segmentation_loss,
)
from ..teachers import SHIPPED_TEACHER_FILES, create_dense_counterpart, create_teacher
from .stages import (
    Recipe, cached_split, choice, count, equal_cost_size, export_fp16, fit, int_range, kwargs,
    lookwhere_model, normalize, number, random_indices, same_architecture, save, share_range, step_count, text,
    write_json,
)

__all__ = ['RunConfig', 'CONFIGS', 'STAGES', 'K_RATIOS', 'RECIPE', 'main']

_logger = logging.getLogger('dense_signs')

TAG = 'dense_signs'
RECIPE_COMMAND = 'python -m timm_lookwhere.recipes.dense_signs'
K_RATIOS = (0.02, 0.05, 0.10, 0.20, 0.30, 0.40, 0.60, 1.0)  # the table's k
STAGES = ('data', 'teacher', 'lookwhere', 'lowres', 'export')  # the evaluation is a benchmark's
NUM_CLASSES = len(SEGMENTATION_CLASSES)
SIGN_CLASSES = tuple(range(1, NUM_CLASSES))  # mask values of the signs (0 is background)
SAVE_EVERY_S = 180  # a training stage saves its state this often


@dataclasses.dataclass
class RunConfig:
    """Sizes and settings of every stage; `--set key=value` changes one for a lever."""
    model: str  # the LookWhere architecture; the segmenter ships as `{model}.dense_signs`
    init_tag: str  # the shipped sign models LookWhere and the teacher start from ('' = random init)
    model_kwargs: Dict[str, Any]  # overrides of the registered architecture (tiny runs)
    img_size: int  # scene side in px
    train_scenes: int  # cached training scenes, shared by every training stage
    val_scenes: int
    test_scenes: int  # for the benchmark, from `test_seed`
    teacher_window_steps: int  # first phase: windows around a sign, at their true positions (a fraction of the cost)
    teacher_window_batch: int
    teacher_steps: int  # then whole scenes
    teacher_batch: int
    teacher_lr: float
    lookwhere_steps: int
    lookwhere_batch: int
    lookwhere_lr: float
    lowres_steps: int
    lowres_batch: int
    lowres_lr: float
    latency_runs: int
    latency_batch: int = 64  # the large batch of the timing (the small one is 1)
    k_range: Tuple[float, float] = (0.02, 0.20)  # LookWhere's k per training step, share of patches
    k_draw: str = 'uniform'  # how k is drawn from k_range: 'uniform', 'log-uniform', or 'mixed' (half the steps each)
    fill: str = 'idw'  # how the segmenter fills unseen cells: the authors' 'idw', or the learned 'selector' fill
    fill_lr_scale: float = 4.  # the selector-informed fill's lr, relative to the stage's
    distill_steps: int = 0  # LookWhere's filled grid matched to the teacher's before fine-tuning (0: none)
    lowres_match_k: float = 0.10  # the low-res ViT costs what LookWhere costs at this k
    loss_stride: int = 4  # the loss reads every loss_stride-th pixel in each direction
    teacher_window: int = 16  # side of the teacher's first-phase windows in patches (a 16th of the attention)
    background_weight: float = 0.5  # cross-entropy weight of background pixels (the signs' is 1)
    head_lr_scale: float = 20.  # the segmentation head's lr, relative to the stage's (see `fit`)
    num_signs: Tuple[int, int] = NUM_SIGNS_RANGE
    test_seed: int = 2026  # seed of the test scenes; training and validation use seed 0

    @property
    def tag(self) -> str:
        return f'{self.model}.{TAG}'


TINY_MODEL = dict(embed_dim=32, depth=2, num_heads=2)
CONFIGS: Dict[str, RunConfig] = dict(
    full=RunConfig(
        model='lookwhere_vitt16_512', init_tag='sparse_signs', model_kwargs={}, img_size=512,
        train_scenes=3000, val_scenes=100, test_scenes=300,
        teacher_window_steps=160, teacher_window_batch=32, teacher_steps=40, teacher_batch=16, teacher_lr=5e-4,
        lookwhere_steps=600, lookwhere_batch=32, lookwhere_lr=5e-4,
        lowres_steps=100, lowres_batch=32, lowres_lr=5e-4, latency_runs=20, background_weight=0.3,
        # every k from 2% to all patches (half the steps log-uniform, where small k lies, half uniform, so the large
        # k where a segmenter trained at small k lost its way are seen too); the learned fill
        k_range=(0.02, 1.0), k_draw='mixed', fill='selector',
    ),
    tiny=RunConfig(
        model='lookwhere_vitt16_512', init_tag='', model_kwargs=TINY_MODEL, img_size=512,
        train_scenes=12, val_scenes=4, test_scenes=8,
        teacher_window_steps=2, teacher_window_batch=2, teacher_steps=2, teacher_batch=2, teacher_lr=1e-3,
        lookwhere_steps=2, lookwhere_batch=2, lookwhere_lr=1e-3,
        lowres_steps=2, lowres_batch=2, lowres_lr=1e-3, latency_runs=2, latency_batch=4, distill_steps=2,
        k_range=(0.02, 1.0), k_draw='mixed', fill='selector',
    ),
)


# --------------------------------------------------------------------------------------------
# data


def load_split(out: str, cfg: RunConfig, split: str, num: int, workers: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A split as uint8 images (N, 3, H, W) and masks (N, H, W), memory-mapped from OUTPUT/cache (3000 scenes
    of 512 px are 3.1 GB: batches read only what they draw)."""
    name = f'dense_{split}_s{seed}_{num}_{cfg.img_size}px_signs{cfg.num_signs[0]}-{cfg.num_signs[1]}'
    folder = os.path.join(out, 'cache')

    def loader() -> DataLoader:
        _logger.info(f'generating {num} dense {split} scenes of {cfg.img_size} px')
        dense = DenseSigns(split, num, cfg.img_size, seed=seed, num_signs=cfg.num_signs, area_range=WIDE_AREA_RANGE)
        return DataLoader(DenseSceneTensors(dense), batch_size=32, num_workers=workers)
    files = dict(images=(os.path.join(folder, f'{name}.images.u8'), (num, 3, cfg.img_size, cfg.img_size)),
                 masks=(os.path.join(folder, f'{name}.masks.u8'), (num, cfg.img_size, cfg.img_size)))
    return cached_split(files, os.path.join(folder, name + '.done'), loader, what=f'data ({split})')


def cached_batches(data: Dict[str, torch.Tensor], batch_size: int, stride: int,
                   generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless (normalised images (B, 3, H, W), masks (B, H / stride, W / stride)) drawn at random with
    `generator`; the mask keeps the pixel at the centre of each stride x stride block."""
    for index in random_indices(len(data['masks']), batch_size, generator):
        yield normalize(data['images'][index]), data['masks'][index][:, stride // 2::stride, stride // 2::stride]


def window_batches(data: Dict[str, torch.Tensor], batch_size: int, stride: int, window: int, patch: int,
                   generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Endless (normalised windows (B, 3, w*p, w*p), strided masks, rows (B,), cols (B,)): a window of `window`
    patches around a random sign pixel of each drawn scene, placed at random, with its top-left patch."""
    grid = data['masks'].shape[-1] // patch
    side = window * patch
    for index in random_indices(len(data['masks']), batch_size, generator):
        crops, masks, rows, cols = [], [], [], []
        for i in index.tolist():
            mask = data['masks'][i]
            ys, xs = torch.nonzero(mask, as_tuple=True)
            pick = int(torch.randint(len(ys), (1,), generator=generator)) if len(ys) else None
            centre = (int(ys[pick]) // patch, int(xs[pick]) // patch) if pick is not None else (grid // 2, grid // 2)
            r, c = (min(max(0, v - int(torch.randint(window, (1,), generator=generator))), grid - window)
                    for v in centre)
            crops.append(data['images'][i, :, r * patch:r * patch + side, c * patch:c * patch + side])
            masks.append(mask[r * patch:r * patch + side, c * patch:c * patch + side])
            rows.append(r)
            cols.append(c)
        masks = torch.stack(masks)[:, stride // 2::stride, stride // 2::stride]
        yield normalize(torch.stack(crops)), masks, torch.tensor(rows), torch.tensor(cols)


def sign_patches(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, H, W) masks -> (N, rows * cols) bool: the patches that hold any sign pixel."""
    n, h, w = masks.shape
    cells = masks.view(n, h // patch, patch, w // patch, patch).amax(dim=(2, 4))  # (N, rows, cols)
    return (cells > 0).flatten(1)


# --------------------------------------------------------------------------------------------
# models


def lookwhere_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    return dict(cfg.model_kwargs)


def teacher_vit(cfg: RunConfig, img_size: Optional[int] = None) -> nn.Module:
    """The full-res ViT: the shipped sign teacher of `cfg.init_tag` (its position embeddings resized to
    `img_size`), or the LookWhere extractor's architecture at random."""
    size = {'img_size': img_size} if img_size else {}
    if cfg.init_tag:
        return create_teacher(f'{cfg.model}.{cfg.init_tag}', **size)
    lookwhere = timm.create_model(cfg.model, num_classes=0, **cfg.model_kwargs)
    return create_dense_counterpart(lookwhere, init_values=1.0, **size)


def load_teacher(out: str, cfg: RunConfig) -> ViTSegmenter:
    model = ViTSegmenter(teacher_vit(cfg), NUM_CLASSES)
    model.load_state_dict(torch.load(os.path.join(out, 'teacher', 'model.pth'), weights_only=True))
    return model.eval()


def load_lowres(out: str, cfg: RunConfig) -> ViTSegmenter:
    saved = torch.load(os.path.join(out, 'lowres', 'model.pth'), weights_only=True)
    model = ViTSegmenter(teacher_vit(cfg, saved['img_size']), NUM_CLASSES, saved['img_size'])
    model.load_state_dict(saved['state_dict'])
    return model.eval()


def initial_lookwhere(cfg: RunConfig) -> LookWhereSegmenter:
    name = f'{cfg.model}.{cfg.init_tag}' if cfg.init_tag else cfg.model
    return create_segmenter(name, pretrained=bool(cfg.init_tag), num_classes=NUM_CLASSES, fill=cfg.fill,
                            **lookwhere_kwargs(cfg))


def load_lookwhere(path: str, cfg: RunConfig, **kwargs) -> LookWhereSegmenter:
    """A LookWhere segmenter of this run from a state dict file (.pth or .safetensors)."""
    model = create_segmenter(cfg.model, num_classes=NUM_CLASSES, fill=cfg.fill,
                             **dict(lookwhere_kwargs(cfg), **kwargs))
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# training and validation


def fit_segmenter(
        stage: str,
        model: nn.Module,
        batches: Iterator[tuple],
        steps: int,
        lr: float,
        loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
        state_path: str,
        generators: Sequence[torch.Generator] = (),
        before_step: Optional[Callable[[int], None]] = None,
        head_lr_scale: float = 1.,
        fill_lr_scale: float = 1.,
) -> None:
    """`stages.fit` on `loss_fn(model, batch)`, the new linear head (`model.head`) at `head_lr_scale` times the lr:
    Adam moves a weight by about the lr per step, so a head from its init needs a larger one than a pretrained
    backbone can take; a learned fill (`model.fill`), new too, at `fill_lr_scale` times."""
    head = list(model.head.parameters())
    fill = list(model.fill.parameters()) if getattr(model, 'fill', None) is not None else []
    new = {id(p) for p in head + fill}
    groups = [dict(params=[p for p in model.parameters() if p.requires_grad and id(p) not in new]),
              dict(params=head, lr=lr * head_lr_scale)]
    if fill:
        groups.append(dict(params=fill, lr=lr * fill_lr_scale))
    fit(stage, model, batches, steps, lr, lambda m, batch: (loss_fn(m, batch), {}), state_path, generators,
        before_step, param_groups=groups, save_every_s=SAVE_EVERY_S)


def class_weight(cfg: RunConfig) -> torch.Tensor:
    weight = torch.ones(NUM_CLASSES)
    weight[0] = cfg.background_weight
    return weight


def cell_loss(cfg: RunConfig) -> Callable[[nn.Module, tuple], torch.Tensor]:
    """Pixel cross-entropy of a segmenter's cell logits against a batch's strided masks."""
    weight = class_weight(cfg)
    return lambda model, batch: segmentation_loss(model.forward_cells(batch[0]), batch[1], class_weight=weight)


@torch.no_grad()
def confusions(model: nn.Module, data: Dict[str, torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """(N, C, C) confusion matrix of each scene at full resolution."""
    model.eval()
    out = []
    for i in range(0, len(data['masks']), batch_size):
        prediction = model(normalize(data['images'][i:i + batch_size])).argmax(1)  # (B, H, W)
        masks = data['masks'][i:i + batch_size]
        out.extend(confusion_matrix(p, m, NUM_CLASSES) for p, m in zip(prediction, masks))
    return torch.stack(out)


def sign_miou(model: nn.Module, data: Dict[str, torch.Tensor]) -> float:
    """Mean IoU of the sign classes over a split's pixels."""
    return mean_iou(confusions(model, data).sum(0), SIGN_CLASSES)


# --------------------------------------------------------------------------------------------
# stages


def stage_data(args, cfg: RunConfig) -> None:
    load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    load_split(args.output, cfg, 'val', cfg.val_scenes, args.workers)


def stage_teacher(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'teacher')
    os.makedirs(folder, exist_ok=True)
    model = ViTSegmenter(teacher_vit(cfg), NUM_CLASSES)
    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    weight = class_weight(cfg)
    generator = torch.Generator().manual_seed(5)
    windows = window_batches(train, cfg.teacher_window_batch, cfg.loss_stride, cfg.teacher_window,
                             model.vit.patch_embed.patch_size[0], generator)
    fit_segmenter(
        f'teacher ({cfg.teacher_window}x{cfg.teacher_window}-patch windows)', model, windows,
        cfg.teacher_window_steps, cfg.teacher_lr,
        lambda m, b: segmentation_loss(m.forward_window(b[0], b[2], b[3]), b[1], class_weight=weight),
        os.path.join(folder, 'windows.state.pth'), generators=(generator,), head_lr_scale=cfg.head_lr_scale)
    generator = torch.Generator().manual_seed(1)
    fit_segmenter(
        'teacher (scenes)', model, cached_batches(train, cfg.teacher_batch, cfg.loss_stride, generator),
        cfg.teacher_steps, cfg.teacher_lr, cell_loss(cfg), os.path.join(folder, 'state.pth'), generators=(generator,),
        head_lr_scale=cfg.head_lr_scale)
    val = load_split(args.output, cfg, 'val', cfg.val_scenes, args.workers)
    miou = sign_miou(model, val)
    _logger.info(f'teacher: val mIoU of the sign classes {100 * miou:.1f}')
    write_json(os.path.join(folder, 'val.json'), dict(val_sign_miou=miou))
    save(model.state_dict(), os.path.join(folder, 'model.pth'))


def stage_lookwhere(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'lookwhere')
    os.makedirs(folder, exist_ok=True)
    model = initial_lookwhere(cfg)
    teacher = load_teacher(args.output, cfg)
    model.head.load_state_dict(teacher.head.state_dict())  # the extractor was distilled to speak the teacher's tokens
    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    k_generator = torch.Generator().manual_seed(0)

    def draw_k(step: int) -> None:  # one model for every k of the table
        model.set_k(k=draw_k_count(cfg, model.backbone.num_patches, k_generator))

    if cfg.distill_steps:
        for p in teacher.parameters():
            p.requires_grad_(False)

        def match_teacher(model, batch):  # the filled grid against the teacher's patch tokens, before the head
            with torch.no_grad():
                target = teacher.vit.forward_features(batch[0])[:, teacher.vit.num_prefix_tokens:]  # (B, N, D)
            return F.mse_loss(model.backbone.forward_dense(batch[0]).flatten(2).transpose(1, 2), target)

        generator = torch.Generator().manual_seed(4)
        fit_segmenter(
            'lookwhere (distil from the teacher)', model,
            cached_batches(train, cfg.lookwhere_batch, cfg.loss_stride, generator), cfg.distill_steps,
            cfg.lookwhere_lr, match_teacher, os.path.join(folder, 'distill.state.pth'),
            generators=(generator, k_generator), before_step=draw_k)
    generator = torch.Generator().manual_seed(2)
    fit_segmenter(
        'lookwhere', model, cached_batches(train, cfg.lookwhere_batch, cfg.loss_stride, generator),
        cfg.lookwhere_steps, cfg.lookwhere_lr, cell_loss(cfg), os.path.join(folder, 'state.pth'),
        generators=(generator, k_generator), before_step=draw_k, head_lr_scale=cfg.head_lr_scale,
        fill_lr_scale=cfg.fill_lr_scale)
    val = load_split(args.output, cfg, 'val', cfg.val_scenes, args.workers)
    val_miou = {}
    for ratio in K_RATIOS:
        model.set_k(k_ratio=ratio)
        val_miou[f'k={ratio:.0%}'] = sign_miou(model, val)
    _logger.info('LookWhere, val mIoU of the sign classes: '
                 + ', '.join(f'{k} {100 * v:.1f}' for k, v in val_miou.items()))
    write_json(os.path.join(folder, 'val.json'), dict(val_sign_miou=val_miou))
    model.set_k(k_ratio=0.1)
    save(model.state_dict(), os.path.join(folder, 'model.pth'))


def draw_k_count(cfg: RunConfig, num_patches: int, generator: torch.Generator) -> int:
    """A training step's k: a share of `num_patches` in `cfg.k_range`, drawn as `cfg.k_draw` says."""
    low, high = (max(1, int(share * num_patches)) for share in cfg.k_range)
    where, log_uniform = torch.rand(2, generator=generator).tolist()
    if cfg.k_draw == 'log-uniform' or (cfg.k_draw == 'mixed' and log_uniform < 0.5):
        return min(high, int(math.exp(math.log(low) + where * (math.log(high + 1) - math.log(low)))))
    return min(high, low + int(where * (high - low + 1)))


def lowres_size(cfg: RunConfig) -> int:
    """The low-res side (a multiple of the patch) whose ViT segmenter costs about what LookWhere costs at
    k = `lowres_match_k` (both on a full-size image, the pixel logits included)."""
    lookwhere = create_segmenter(cfg.model, num_classes=NUM_CLASSES, k_ratio=cfg.lowres_match_k, fill=cfg.fill,
                                 **lookwhere_kwargs(cfg))
    return equal_cost_size(lookwhere, cfg.img_size, lookwhere.patch_size, cfg.img_size // 2,
                           lambda side: ViTSegmenter(teacher_vit(cfg, side), NUM_CLASSES, side),
                           f'{cfg.lowres_match_k:.0%}')


def stage_lowres(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'lowres')
    os.makedirs(folder, exist_ok=True)
    size = lowres_size(cfg)
    model = ViTSegmenter(teacher_vit(cfg, size), NUM_CLASSES, size)
    teacher = load_teacher(args.output, cfg).state_dict()  # the trained teacher, its grid resized to the copy's
    teacher['vit.pos_embed'] = resample_abs_pos_embed(
        teacher['vit.pos_embed'], new_size=model.vit.patch_embed.grid_size, num_prefix_tokens=0, antialias=False)
    model.load_state_dict(teacher)
    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    generator = torch.Generator().manual_seed(3)
    fit_segmenter(
        'lowres', model, cached_batches(train, cfg.lowres_batch, cfg.loss_stride, generator), cfg.lowres_steps,
        cfg.lowres_lr, cell_loss(cfg), os.path.join(folder, 'state.pth'), generators=(generator,),
        head_lr_scale=cfg.head_lr_scale)
    val = load_split(args.output, cfg, 'val', cfg.val_scenes, args.workers)
    miou = sign_miou(model, val)
    _logger.info(f'low-res ViT ({size} px): val mIoU of the sign classes {100 * miou:.1f}')
    write_json(os.path.join(folder, 'val.json'), dict(val_sign_miou=miou, img_size=size))
    save(dict(img_size=size, state_dict=model.state_dict()), os.path.join(folder, 'model.pth'))


def export_path(out: str, cfg: RunConfig, part: str = 'lookwhere') -> str:
    """Where the export stage writes the segmenter (`part` 'lookwhere') or its full-res teacher ('teacher')."""
    package_file = SHIPPED_SEGMENTERS[cfg.tag][2] if part == 'lookwhere' else SHIPPED_DENSE_TEACHERS[cfg.tag][1].file
    return os.path.join(out, 'export', os.path.basename(package_file))


def stage_export(args, cfg: RunConfig) -> None:
    for part in ('teacher', 'lookwhere'):  # the segmenter last: its file marks the stage done
        export_fp16(os.path.join(args.output, part, 'model.pth'), export_path(args.output, cfg, part),
                    dict(source=RECIPE_COMMAND, config=cfg.tag if part == 'lookwhere' else f'{cfg.tag} teacher',
                         classes=','.join(SEGMENTATION_CLASSES)))


def shipped(out: str, cfg: RunConfig) -> Dict[str, str]:
    """The exports --ship copies into the package: the segmenter and the teacher it is compared with."""
    return {export_path(out, cfg): SHIPPED_SEGMENTERS[cfg.tag][2],
            export_path(out, cfg, 'teacher'): SHIPPED_DENSE_TEACHERS[cfg.tag][1].file}


# --------------------------------------------------------------------------------------------
# settings


RULES = dict(
    model=lookwhere_model(), init_tag=text(), model_kwargs=kwargs(), img_size=count(), train_scenes=count(),
    val_scenes=count(), test_scenes=count(), teacher_window_steps=step_count(), teacher_window_batch=count(),
    teacher_steps=step_count(), teacher_batch=count(), teacher_lr=number(above=True), lookwhere_steps=step_count(),
    lookwhere_batch=count(), lookwhere_lr=number(above=True), lowres_steps=step_count(), lowres_batch=count(),
    lowres_lr=number(above=True), latency_runs=count(), latency_batch=count(), k_range=share_range(),
    k_draw=choice('uniform', 'log-uniform', 'mixed'), fill=choice('idw', 'selector'), fill_lr_scale=number(above=True),
    distill_steps=step_count(none=True), lowres_match_k=number(0, 1, above=True), loss_stride=count(),
    teacher_window=count(), background_weight=number(), head_lr_scale=number(above=True), num_signs=int_range(1),
    test_seed=count(0),
)


def check_config(cfg: RunConfig, model: nn.Module) -> List[Tuple[str, str]]:
    """The settings that do not fit the others (`model` is the LookWhere they make): [(setting, what it must be)]."""
    patch = model.patch_embed.patch_size[0]
    grid = cfg.img_size // patch
    if cfg.teacher_window > grid:
        return [('teacher_window', f'at most the grid of {grid} patches a side')]
    if cfg.loss_stride > patch:
        return [('loss_stride', f'at most the {patch} px patch: the logits hold one value per patch')]
    if cfg.init_tag:
        shipped_with_teacher = sorted(name.split('.')[1] for name in SHIPPED_TEACHER_FILES
                                      if name.startswith(f'{cfg.model}.'))
        if cfg.init_tag not in shipped_with_teacher:
            return [('init_tag', f"'' or the tag of a shipped {cfg.model} with its teacher: "
                                 f'{", ".join(shipped_with_teacher) or "none ships"}')]
        misfit = same_architecture(model, f'{cfg.model}.{cfg.init_tag}')
        if misfit:
            return [('init_tag', misfit)]
    return []


# --------------------------------------------------------------------------------------------
# main


STAGE_OUTPUTS = {
    'data': lambda out, cfg: os.path.join(out, 'data.done'),
    'teacher': lambda out, cfg: os.path.join(out, 'teacher', 'model.pth'),
    'lookwhere': lambda out, cfg: os.path.join(out, 'lookwhere', 'model.pth'),
    'lowres': lambda out, cfg: os.path.join(out, 'lowres', 'model.pth'),
    'export': lambda out, cfg: export_path(out, cfg),
}
RUNNERS = dict(data=stage_data, teacher=stage_teacher, lookwhere=stage_lookwhere, lowres=stage_lowres,
               export=stage_export)
RECIPE = Recipe(
    prog=RECIPE_COMMAND, description=__doc__, configs={'512': CONFIGS}, outputs=STAGE_OUTPUTS, runners=RUNNERS,
    rules=RULES, create_model=lambda cfg: timm.create_model(cfg.model, num_classes=0, weight_init='skip',
                                                            **cfg.model_kwargs),
    check_config=check_config, shipped=shipped, benchmark='benchmarks/dense_signs.py',
    set_example='background_weight=0.3',
)


run_config = RECIPE.run_config  # what a run folder holds, for the benchmark
main = RECIPE.main

if __name__ == '__main__':
    sys.exit(main())
