""" The sparse-signs recipe: trains, exports and ships a LookWhere and its teacher on the generated sign scenes.

The paper's pipeline on `timm_lookwhere.scenes`'s procedural scenes (one sign in a cluttered image,
14 classes), with the project's own tools, on a CPU. Two configurations:

    --config 512  (default) the paper's regime: 512 px scenes (1024 patches of 16 px), the sign 0.25-0.5%
                  of the image (the pixels it has in a 256 px scene, in a 4x larger field of view);
                  ships lookwhere_vitt16_512.sparse_signs
    --config 256  256 px scenes, the sign 1-2% of the image; ships lookwhere_vitt16_256.sparse_signs

Stages:

    data      the training scenes as a memory-mapped uint8 cache, and the distillation images as an
              ImageFolder (train split, other seeds)
    teacher   a full-resolution ViT (the LookWhere extractor's size, every patch), trained on the labels
              plus a patch-level loss from the generator's sign boxes (each patch token names the sign
              under it, or background), in phases of growing windows around the sign at their true
              positions: a 4x4-patch window teaches what signs look like at a 64th of a 512 px scene's
              cost, larger windows and whole scenes teach finding them among clutter; the patch head is
              dropped afterwards. `teacher_init` starts it from another shipped sign teacher.
    distill   `python -m timm_lookwhere.distill`: selector and extractor from the frozen teacher, whose
              targets are computed once per image (--teacher-cache); then the distilled selector's share
              of the sign's patches on the validation scenes
    finetune  LookWhere with the selector frozen (the paper's recipe), k drawn per step from
              `finetune_k_range`; the classifier starts from the teacher's (the extractor's cls token was
              distilled to match the teacher's)
    lowres    the baseline at equal cost: the teacher fine-tuned on a low-res copy of the image, at the
              resolution whose FLOPs match LookWhere at k = 5%
    export    fp16 safetensors of LookWhere and of the teacher (`--ship` copies them into the package)

Every stage keeps its output in --output and is skipped when it is there, and the long ones save
their state every few minutes, so a stopped run goes on where it stopped. Progress goes to the console
and OUTPUT/run.log, each stage's time to OUTPUT/timings.json. The folder holds one run: OUTPUT/run.json
keeps its --config, --tiny and --set, a launch with other settings is refused, and so is a second launch
while one runs. A lever (one setting changed, see `--set`, each value checked before the first stage)
runs in its own folder and only the stages it affects, sharing the other stages' outputs with a first
run (`--share-from`).

The evaluation on the held-out test scenes (accuracy, GFLOPs, latency, random and oracle selection) is
a benchmark of the source tree, `python benchmarks/sparse_signs.py --output DIR`, which reads the
folder this recipe wrote; its `--lever-table` compares lever runs.

    python -m timm_lookwhere.recipes.sparse_signs --output runs/sparse_signs_512 --ship   # about 2 h on 2 cores
    python -m timm_lookwhere.recipes.sparse_signs --config 256 --output runs/sparse_signs --ship   # about 1 h
    python -m timm_lookwhere.recipes.sparse_signs --output runs/ss512_map03 --share-from runs/sparse_signs_512 \\
        --stages distill --set map_weight=0.3                                             # one lever
    python -m timm_lookwhere.recipes.sparse_signs --output /tmp/ss_tiny --tiny             # every stage, a tiny model
"""
import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import timm
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import get_pretrained_cfg

from ..scenes import AREA_RANGE, CLASS_NAMES, WIDE_AREA_RANGE, SceneTensors, SparseSigns, sign_patches_seen, \
    write_image_folder
from ..distillation import DistillTeacher
from ..lookwhere import SIGNS_RECIPE
from ..teachers import SHIPPED_TEACHER_FILES, TEACHER_BASE, create_dense_counterpart, create_teacher, \
    dense_counterpart_kwargs, window_features
from .stages import (
    Recipe, Rule, cached_split, choice, count, equal_cost_size, export_fp16, fit, kwargs, lookwhere_model, normalize,
    number, random_indices, run_logged, same_architecture, save, share_range, step_count, write_json,
)

__all__ = ['RunConfig', 'CONFIGS', 'STAGES', 'K_RATIOS', 'RECIPE', 'main']

_logger = logging.getLogger('sparse_signs')

TAG = 'sparse_signs'
K_RATIOS = (0.02, 0.05, 0.10)
STAGES = ('data', 'teacher', 'distill', 'finetune', 'lowres', 'export')  # the evaluation is a benchmark's
SAVE_EVERY_S = 300  # a long stage saves its state this often


@dataclasses.dataclass
class RunConfig:
    """Sizes and settings of every stage; `--set key=value` changes one for a lever."""
    model: str  # the registered LookWhere architecture trained, and shipped with the `sparse_signs` tag
    img_size: int  # scene side in px
    area_range: Tuple[float, float]  # share of the scene the sign covers
    model_kwargs: Dict[str, Any]  # overrides of the registered architecture (tiny runs, levers)
    train_scenes: int  # cached training scenes for the teacher, fine-tuning and the low-res ViT
    distill_images: int  # ImageFolder size for distillation
    teacher_phases: Tuple[Tuple[int, int, int], ...]  # (window side in patches, steps, batch); lr halves per phase
    teacher_lr: float
    patch_loss_weight: float  # the teacher's patch-level loss, relative to its image-level one
    distill_steps: int
    distill_batch: int
    distill_lr: float
    map_weight: float  # the selector's share of the distillation loss
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    lowres_steps: int
    lowres_lr: float
    val_images: int
    test_images: int
    latency_runs: int
    teacher_init: str = ''  # a shipped sign model whose teacher starts this one ('' = from scratch)
    attn_queries: str = 'cls'  # the teacher attention the map learns: a supervised teacher's cls looks at the sign
    finetune_k_range: Tuple[float, float] = (K_RATIOS[0], K_RATIOS[-1])  # k per fine-tuning step, share of patches
    test_seed: int = 0  # seed of the test scenes (their split is never trained on either way)

    @property
    def tag(self) -> str:
        return f'{self.model}.{TAG}'


TINY_MODEL = dict(embed_dim=32, depth=2, num_heads=2)
CONFIGS: Dict[str, Dict[str, RunConfig]] = {
    '256': dict(
        full=RunConfig(
            model='lookwhere_vitt16_256', img_size=256, area_range=AREA_RANGE, model_kwargs={},
            train_scenes=20000, distill_images=4000, teacher_phases=((4, 3000, 128), (16, 1000, 32)),
            teacher_lr=1e-3, patch_loss_weight=1.0, distill_steps=1600, distill_batch=32, distill_lr=3e-4,
            map_weight=1.0, finetune_steps=3000, finetune_batch=32, finetune_lr=3e-4, lowres_steps=3000,
            lowres_lr=3e-4, val_images=500, test_images=2000, latency_runs=60,
        ),
        tiny=RunConfig(
            model='lookwhere_vitt16_256', img_size=256, area_range=AREA_RANGE, model_kwargs=TINY_MODEL,
            train_scenes=24, distill_images=28, teacher_phases=((4, 3, 8), (16, 3, 4)), teacher_lr=1e-3,
            patch_loss_weight=1.0, distill_steps=3, distill_batch=4, distill_lr=3e-4, map_weight=0.5,
            finetune_steps=3, finetune_batch=4, finetune_lr=3e-4, lowres_steps=3, lowres_lr=3e-4,
            val_images=8, test_images=16, latency_runs=3,
        ),
    ),
    '512': dict(
        full=RunConfig(
            model='lookwhere_vitt16_512', img_size=512, area_range=WIDE_AREA_RANGE, model_kwargs={},
            train_scenes=20000, distill_images=6000,
            teacher_phases=((4, 1500, 128), (16, 1000, 32), (32, 150, 16)), teacher_lr=1e-3,
            teacher_init='lookwhere_vitt16_256.sparse_signs', patch_loss_weight=1.0,
            distill_steps=3000, distill_batch=32, distill_lr=3e-4, map_weight=1.0,
            finetune_steps=3000, finetune_batch=32, finetune_lr=3e-4, lowres_steps=2000, lowres_lr=3e-4,
            val_images=500, test_images=2000, latency_runs=30, test_seed=2026,
        ),
        tiny=RunConfig(
            model='lookwhere_vitt16_512', img_size=512, area_range=WIDE_AREA_RANGE, model_kwargs=TINY_MODEL,
            train_scenes=24, distill_images=28, teacher_phases=((4, 3, 8), (16, 2, 4), (32, 2, 2)),
            teacher_lr=1e-3, patch_loss_weight=1.0, distill_steps=3, distill_batch=4, distill_lr=3e-4,
            map_weight=0.5, finetune_steps=3, finetune_batch=4, finetune_lr=3e-4, lowres_steps=3, lowres_lr=3e-4,
            val_images=8, test_images=16, latency_runs=3, test_seed=2026,
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# helpers


def load_split(out: str, cfg: RunConfig, split: str, num: int, workers: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A split as uint8 images (N, 3, H, W), memory-mapped, labels (N,) and boxes (N, 4), cached in OUTPUT/cache."""
    name = f'{split}_s{seed}_{num}_{cfg.img_size}px_area{cfg.area_range[0]:g}-{cfg.area_range[1]:g}'
    folder = os.path.join(out, 'cache')

    def loader() -> DataLoader:
        _logger.info(f'generating {num} {split} scenes of {cfg.img_size} px')
        signs = SparseSigns(split, num, cfg.img_size, seed=seed, area_range=cfg.area_range)
        return DataLoader(SceneTensors(signs), batch_size=64, num_workers=workers)
    images = (os.path.join(folder, name + '.u8'), (num, 3, cfg.img_size, cfg.img_size))
    return cached_split(dict(images=images), os.path.join(folder, name + '.pt'), loader, kept=('labels', 'boxes'),
                        what=f'data ({split})')


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(images[i:i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, data: Dict[str, torch.Tensor]) -> float:
    return (predict(model, data['images']) == data['labels']).float().mean().item()


# --------------------------------------------------------------------------------------------
# models


def create_lookwhere(cfg: RunConfig, **kwargs) -> nn.Module:
    return timm.create_model(cfg.model, **dict(cfg.model_kwargs, **kwargs))


def build_teacher(cfg: RunConfig, img_size: Optional[int] = None, file: Optional[str] = None) -> nn.Module:
    """The full-res ViT: the architecture of the LookWhere extractor, every patch, its own cls token; from `file`
    (its position embeddings resized to `img_size`) or new."""
    lookwhere = create_lookwhere(cfg, num_classes=len(CLASS_NAMES))
    if file is None:
        # layer scale starting at 1: a plain ViT at init, which trains from scratch faster than DINOv2's 1e-5
        return create_dense_counterpart(lookwhere, img_size=img_size or cfg.img_size, init_values=1.0)
    return create_dense_counterpart(lookwhere, file, img_size=img_size or cfg.img_size)


def initial_teacher(cfg: RunConfig) -> nn.Module:
    """A new teacher, or `cfg.teacher_init`'s shipped teacher, its position embeddings resized to this grid."""
    if not cfg.teacher_init:
        return build_teacher(cfg)
    source = create_teacher(cfg.teacher_init)
    teacher = build_teacher(cfg)
    state = source.state_dict()
    state['pos_embed'] = resample_abs_pos_embed(
        state['pos_embed'], new_size=teacher.patch_embed.grid_size, num_prefix_tokens=0, antialias=False)
    teacher.load_state_dict(state)
    _logger.info(f'teacher starts from the shipped teacher of {cfg.teacher_init}')
    return teacher


class LowResViT(nn.Module):
    """A ViT on a low-res copy of the high-res input (bilinear with antialiasing: a proper downscale)."""

    def __init__(self, vit: nn.Module, img_size: int):
        super().__init__()
        self.vit = vit
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode='bilinear', antialias=True, align_corners=False)
        return self.vit(x)


class PatchSupervisedViT(nn.Module):
    """The teacher while it trains: its ViT plus a linear head on every patch token that names the
    sign under the patch, or background. The generator knows where each sign is; this dense signal
    teaches a ViT trained from scratch what signs look like far sooner than one label per image does.
    Only `vit` is kept."""

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        self.vit = vit
        self.patch_head = nn.Linear(vit.embed_dim, num_classes + 1)  # the last class is background

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None):
        feats = self.vit.forward_features(x) if rows is None else window_features(self.vit, x, rows, cols)
        patches = feats[:, self.vit.num_prefix_tokens:]
        return self.vit.forward_head(feats), self.patch_head(patches)  # (B, C), (B, N, C+1)


def patch_targets(boxes: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  window: int, patch: int, background: int) -> torch.Tensor:
    """(B, window*window) class of each patch of a window: the sign's label where its box covers at
    least a fifth of the patch, else `background`."""
    cols_px = (cols[:, None] + torch.arange(window)) * patch  # (B, w) left edge of each patch column
    rows_px = (rows[:, None] + torch.arange(window)) * patch
    overlap_x = (torch.minimum(cols_px + patch, boxes[:, 2:3]) - torch.maximum(cols_px, boxes[:, 0:1])).clamp(min=0)
    overlap_y = (torch.minimum(rows_px + patch, boxes[:, 3:4]) - torch.maximum(rows_px, boxes[:, 1:2])).clamp(min=0)
    cover = overlap_y[:, :, None] * overlap_x[:, None, :] / patch ** 2  # (B, w, w)
    return torch.where(cover >= 0.2, labels[:, None, None], background).flatten(1)


def sign_windows(boxes: torch.Tensor, window: int, patch: int, grid: int, generator: torch.Generator):
    """Top-left patch (rows, cols) of a random window of `window` x `window` patches that holds each
    whole sign and stays inside the image."""
    first = boxes[:, :2] // patch  # (B, 2) x, y of the sign's first patch
    last = (boxes[:, 2:] - 1) // patch
    low = (last - window + 1).clamp(min=0)
    high = torch.minimum(first, torch.tensor(grid - window)).clamp(min=low)
    start = low + (torch.rand(low.shape, generator=generator) * (high - low + 1)).long().clamp(max=high - low)
    return start[:, 1], start[:, 0]


def crop_windows(images: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, window: int,
                 patch: int) -> torch.Tensor:
    """The windows of images[index], read one by one: from the memory-mapped cache, only their pixels."""
    side = window * patch
    return torch.stack([images[i, :, r * patch:r * patch + side, c * patch:c * patch + side]
                        for i, r, c in zip(index.tolist(), rows.tolist(), cols.tolist())])


def cached_batches(data: Dict[str, torch.Tensor], batch_size: int, generator: torch.Generator,
                   crop: Optional[Callable] = None) -> Iterator[tuple]:
    """Endless batches (normalised images, labels, boxes) drawn at random from a cached split with
    `generator`; `crop(images, index, boxes)` cuts the drawn uint8 images itself (a window needs a
    fraction of a scene's pixels) and returns them with extra items for the batch."""
    for index in random_indices(len(data['labels']), batch_size, generator):
        labels, boxes = data['labels'][index], data['boxes'][index]
        if crop is None:
            yield normalize(data['images'][index]), labels, boxes
        else:
            images, *where = crop(data['images'], index, boxes)
            yield normalize(images), labels, boxes, *where


def fit_classifier(
        stage: str,
        model: nn.Module,
        batches: Iterator[tuple],
        steps: int,
        lr: float,
        forward: Callable,
        state_path: str,
        generators: Sequence[torch.Generator] = (),
        before_step: Optional[Callable[[int], None]] = None,
) -> None:
    """Supervised training (`stages.fit`), label smoothing 0.1: `batches` yields tuples whose first two items are
    inputs and labels; `forward(model, batch)` gives logits and a loss added to the label loss (0. for none)."""
    criterion = LabelSmoothingCrossEntropy(0.1)

    def step_loss(model: nn.Module, batch: tuple) -> Tuple[torch.Tensor, Dict[str, float]]:
        logits, extra_loss = forward(model, batch)
        accuracy = (logits.argmax(1) == batch[1]).float().mean().item()
        return criterion(logits, batch[1]) + extra_loss, dict(train_acc=accuracy)

    fit(stage, model, batches, steps, lr, step_loss, state_path, generators, before_step, smoothing=0.95,
        save_every_s=SAVE_EVERY_S)


# --------------------------------------------------------------------------------------------
# stages


def stage_data(args, cfg: RunConfig) -> None:
    load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    load_split(args.output, cfg, 'val', cfg.val_images, args.workers)
    write_image_folder(os.path.join(args.output, 'data'), 'train', cfg.distill_images, img_size=cfg.img_size,
                       seed=100, area_range=cfg.area_range)


def stage_teacher(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'teacher')
    os.makedirs(folder, exist_ok=True)
    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    model = PatchSupervisedViT(initial_teacher(cfg), len(CLASS_NAMES))
    patch, grid = model.vit.patch_embed.patch_size[0], model.vit.patch_embed.grid_size[0]
    weights = torch.ones(len(CLASS_NAMES) + 1)
    weights[-1] = 0.2  # background patches outnumber sign patches ~50 to 1

    for phase, (window, steps, batch_size) in enumerate(cfg.teacher_phases):
        window = min(window, grid)
        batch_generator, window_generator = torch.Generator().manual_seed(phase), torch.Generator().manual_seed(phase)

        def windows(images, index, boxes, window=window, generator=window_generator):
            if window == grid:  # the whole scene
                zeros = torch.zeros(len(index), dtype=torch.long)
                return images[index], zeros, zeros
            rows, cols = sign_windows(boxes, window, patch, grid, generator)
            return crop_windows(images, index, rows, cols, window, patch), rows, cols

        def forward(model, batch, window=window):
            images, labels, boxes, rows, cols = batch
            logits, patch_logits = model(images, rows, cols) if window < grid else model(images)
            targets = patch_targets(boxes, labels, rows, cols, window, patch, background=len(CLASS_NAMES))
            patch_loss = F.cross_entropy(patch_logits.flatten(0, 1), targets.flatten(), weight=weights)
            return logits, cfg.patch_loss_weight * patch_loss

        what = 'scenes' if window == grid else f'{window}x{window}-patch windows'
        fit_classifier(f'teacher ({what})', model, cached_batches(train, batch_size, batch_generator, crop=windows),
                       steps, cfg.teacher_lr / 2 ** phase, forward, os.path.join(folder, f'phase{phase}.state.pth'),
                       generators=(batch_generator, window_generator))
    teacher = model.vit
    val = load_split(args.output, cfg, 'val', cfg.val_images, args.workers)
    val_acc = accuracy(teacher, val)
    _logger.info(f'teacher: val accuracy {val_acc:.4f}')
    write_json(os.path.join(folder, 'val.json'), dict(val_accuracy=val_acc))
    state = teacher.state_dict()
    # distillation builds the teacher without a classifier: give it the backbone alone
    save({k: v for k, v in state.items() if not k.startswith('head.')}, os.path.join(folder, 'backbone.pth'))
    save(state, os.path.join(folder, 'model.pth'))


def stage_distill(args, cfg: RunConfig) -> None:
    folder = os.path.join(args.output, 'distill')
    last = os.path.join(folder, 'last.pth')
    teacher_kwargs = dense_counterpart_kwargs(create_lookwhere(cfg, num_classes=0))
    teacher_kwargs.pop('img_size')  # the student's, which distill gives the teacher
    cmd = [
        sys.executable, '-m', 'timm_lookwhere.distill',
        '--teacher', TEACHER_BASE, '--teacher-checkpoint', os.path.join(args.output, 'teacher', 'backbone.pth'),
        '--teacher-kwargs', *[f'{k}={v}' for k, v in teacher_kwargs.items()],
        '--attn-queries', cfg.attn_queries,
        '--model', cfg.model, '--model-kwargs', *[f'{k}={v}' for k, v in cfg.model_kwargs.items()],
        '--data-dir', os.path.join(args.output, 'data'), '--no-aug', '--workers', str(min(args.workers, 1)),
        '--teacher-cache', os.path.join(args.output, 'teacher', f'targets_{cfg.attn_queries}'),
        '--batch-size', str(cfg.distill_batch), '--steps', str(cfg.distill_steps), '--lr', str(cfg.distill_lr),
        '--warmup-steps', str(max(1, cfg.distill_steps // 10)), '--min-lr', str(cfg.distill_lr / 100),
        '--map-weight', str(cfg.map_weight), '--clip-grad', '1.0',
        '--log-every', '10', '--save-every', '50', '--device', 'cpu', '--output', folder,
    ]
    # k per step: distill's default range, the authors' 16..128 of 1369 patches scaled to this grid
    if os.path.exists(last):
        cmd.append('--resume')
    run_logged(cmd, os.path.join(args.output, 'run.log'))
    model = create_lookwhere(cfg, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=last)).eval()
    val = load_split(args.output, cfg, 'val', cfg.val_images, args.workers)
    seen = selector_sign_patches_seen(model, val)
    target = target_sign_patches_seen(cfg, args.output, val)
    _logger.info('distilled selector, sign patches chosen on val: '
                 + ', '.join(f'{k} {100 * v:.1f}%' for k, v in seen.items())
                 + '; by the teacher attention it learned from: '
                 + ', '.join(f'{k} {100 * v:.1f}%' for k, v in target.items()))
    write_json(os.path.join(folder, 'val.json'), dict(sign_patches_seen=seen, target_sign_patches_seen=target))


def selector_sign_patches_seen(model: nn.Module, data: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Share of the sign's patches the selector chooses at each k of K_RATIOS (its own map, no extractor)."""
    grid, patch = model.grid_size, model.patch_embed.patch_size[0]
    out = {}
    with torch.no_grad():
        for ratio in K_RATIOS:
            model.set_k(k_ratio=ratio)
            chosen = torch.cat([model.forward_selection(normalize(data['images'][i:i + 64]))['indices']
                                for i in range(0, len(data['labels']), 64)])
            out[f'k={ratio:.0%}'] = sign_patches_seen(chosen, data['boxes'], grid, patch).mean().item()
    return out


def target_sign_patches_seen(cfg: RunConfig, out: str, data: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The same share for the top k of the selector's target, the teacher's attention (`attn_queries`):
    what a selector that learned its target perfectly would choose."""
    teacher = DistillTeacher(build_teacher(cfg, file=os.path.join(out, 'teacher', 'model.pth')), cfg.attn_queries)
    grid, patch = teacher.vit.patch_embed.grid_size, teacher.vit.patch_embed.patch_size[0]
    with torch.no_grad():
        logits = torch.cat([teacher(normalize(data['images'][i:i + 64]))['attn']
                            for i in range(0, len(data['labels']), 64)])  # (B, N)
    shares = {}
    for ratio in K_RATIOS:
        chosen = logits.topk(max(1, int(ratio * logits.shape[1])), dim=1).indices  # (B, k)
        shares[f'k={ratio:.0%}'] = sign_patches_seen(chosen, data['boxes'], grid, patch).mean().item()
    return shares


def _distilled(cfg: RunConfig, out: str) -> nn.Module:
    return create_lookwhere(cfg, pretrained=True, num_classes=len(CLASS_NAMES),
                            pretrained_cfg_overlay=dict(file=os.path.join(out, 'distill', 'last.pth')))


def stage_finetune(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'finetune')
    os.makedirs(folder, exist_ok=True)
    model = _distilled(cfg, args.output)
    teacher = build_teacher(cfg, file=os.path.join(args.output, 'teacher', 'model.pth'))
    model.head.load_state_dict(teacher.head.state_dict())  # the distilled cls token speaks the teacher's language
    k_lo, k_hi = (max(1, int(r * model.num_patches)) for r in cfg.finetune_k_range)
    k_generator, batch_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(2)

    def draw_k(step: int) -> None:  # one model for every k of the table
        model.set_k(k=int(torch.randint(k_lo, k_hi + 1, (1,), generator=k_generator)))

    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    fit_classifier('finetune', model, cached_batches(train, cfg.finetune_batch, batch_generator), cfg.finetune_steps,
                   cfg.finetune_lr, lambda m, b: (m(b[0]), 0.), os.path.join(folder, 'state.pth'),
                   generators=(batch_generator, k_generator), before_step=draw_k)
    val = load_split(args.output, cfg, 'val', cfg.val_images, args.workers)
    val_acc = {}
    for ratio in K_RATIOS:
        model.set_k(k_ratio=ratio)
        val_acc[f'k={ratio:.0%}'] = accuracy(model, val)
    _logger.info('finetuned LookWhere, val accuracy: ' + ', '.join(f'{k} {100 * v:.1f}%' for k, v in val_acc.items()))
    write_json(os.path.join(folder, 'val.json'), dict(val_accuracy=val_acc))
    model.set_k(k_ratio=0.1)
    save(model.state_dict(), os.path.join(folder, 'model.pth'))


def lowres_size(cfg: RunConfig) -> int:
    """The low-res side (a multiple of the patch) whose ViT costs about what LookWhere costs at k = 5%."""
    model = create_lookwhere(cfg, num_classes=len(CLASS_NAMES), k_ratio=0.05)
    return equal_cost_size(model, cfg.img_size, model.patch_embed.patch_size[0], cfg.img_size,
                           lambda side: LowResViT(build_teacher(cfg, img_size=side), side), '5%')


def stage_lowres(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'lowres')
    os.makedirs(folder, exist_ok=True)
    size = lowres_size(cfg)
    model = LowResViT(build_teacher(cfg, img_size=size, file=os.path.join(args.output, 'teacher', 'model.pth')), size)
    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    batch_generator = torch.Generator().manual_seed(3)
    fit_classifier('lowres', model, cached_batches(train, cfg.finetune_batch, batch_generator), cfg.lowres_steps,
                   cfg.lowres_lr, lambda m, b: (m(b[0]), 0.), os.path.join(folder, 'state.pth'),
                   generators=(batch_generator,))
    save(dict(img_size=size, state_dict=model.vit.state_dict()), os.path.join(folder, 'model.pth'))


def shipped_files(cfg: RunConfig) -> Dict[str, str]:
    """Where `--ship` puts each stage's export: the registered tag's weights and its teacher's."""
    return dict(finetune=get_pretrained_cfg(cfg.tag).file, teacher=SHIPPED_TEACHER_FILES[cfg.tag])


def export_path(out: str, cfg: RunConfig, stage: str) -> str:
    return os.path.join(out, 'export', os.path.basename(shipped_files(cfg)[stage]))


def stage_export(args, cfg: RunConfig) -> None:
    for stage in ('finetune', 'teacher'):
        export_fp16(os.path.join(args.output, stage, 'model.pth'), export_path(args.output, cfg, stage),
                    dict(source=SIGNS_RECIPE, stage=stage, config=cfg.tag))


def shipped(out: str, cfg: RunConfig) -> Dict[str, str]:
    return {export_path(out, cfg, stage): target for stage, target in shipped_files(cfg).items()}

# --------------------------------------------------------------------------------------------
# levers


def shared_folders(source: str, stages: Sequence[str]) -> List[str]:
    """The folders of another run that this one links in: the outputs of the stages before the first one it runs
    (a lever changes one setting and redoes only what it affects), the scene caches with the data."""
    first = min(STAGES.index(stage) for stage in stages)
    needed = [name for name in ('data', 'teacher', 'distill', 'finetune', 'lowres') if STAGES.index(name) < first]
    names = ['cache'] * ('data' in needed) + needed
    for name in names:
        if not os.path.isdir(os.path.join(source, name)):
            raise ValueError(f'--share-from {source} has no {name}/: run its {name} stage first')
    return names


def add_share_from(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--share-from', default=None, metavar='DIR',
                       help="use DIR's outputs (symlinks) of the stages before the first one this run runs")


def check_share_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.share_from:
        try:
            shared_folders(args.share_from, args.stages.split(','))
        except ValueError as err:
            parser.error(str(err))


def share_stages(args: argparse.Namespace, cfg: RunConfig) -> None:
    """Link the --share-from run's folders into this one (those already there stay)."""
    if not args.share_from:
        return
    for name in shared_folders(args.share_from, args.stages.split(',')):
        dst = os.path.join(args.output, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(os.path.join(args.share_from, name)), dst)


# --------------------------------------------------------------------------------------------
# settings


def _phases(value: Any) -> Tuple[Tuple[int, int, int], ...]:
    ints = lambda p: all(isinstance(x, int) and not isinstance(x, bool) for x in p)  # noqa: E731
    if not (isinstance(value, (tuple, list)) and value and all(
            isinstance(p, (tuple, list)) and len(p) == 3 and ints(p) and p[0] >= 1 and p[1] >= 2 and p[2] >= 1
            for p in value)):
        raise ValueError(value)
    return tuple(tuple(p) for p in value)


PHASES = Rule('a non-empty tuple of (window side in patches >= 1, steps >= 2, batch >= 1), e.g. ((4, 3, 8),)',
              _phases)
RULES: Dict[str, Rule] = dict(
    model=lookwhere_model(), img_size=count(), area_range=share_range(0.25), model_kwargs=kwargs(),
    train_scenes=count(), distill_images=count(), teacher_phases=PHASES, teacher_lr=number(above=True),
    patch_loss_weight=number(), distill_steps=step_count(), distill_batch=count(), distill_lr=number(above=True),
    map_weight=number(), finetune_steps=step_count(), finetune_batch=count(), finetune_lr=number(above=True),
    lowres_steps=step_count(), lowres_lr=number(above=True), val_images=count(), test_images=count(),
    latency_runs=count(), teacher_init=choice('', *SHIPPED_TEACHER_FILES), attn_queries=choice('cls', 'patch'),
    finetune_k_range=share_range(), test_seed=count(0),
)


def check_config(cfg: RunConfig, model: nn.Module) -> List[Tuple[str, str]]:
    """The settings that do not fit the others (`model` is the LookWhere they make): [(setting, what it must be)]."""
    if cfg.distill_images < cfg.distill_batch:
        return [('distill_images', f'at least distill_batch ({cfg.distill_batch}): distillation draws whole batches')]
    if cfg.teacher_init:
        misfit = same_architecture(model, cfg.teacher_init)
        if misfit:
            return [('teacher_init', misfit)]
    return []


# --------------------------------------------------------------------------------------------
# the recipe


STAGE_OUTPUTS = {
    'data': lambda out, cfg: os.path.join(out, 'data', 'train', 'done'),  # after the caches and the folder
    'teacher': lambda out, cfg: os.path.join(out, 'teacher', 'model.pth'),
    'distill': lambda out, cfg: os.path.join(out, 'distill', 'val.json'),
    'finetune': lambda out, cfg: os.path.join(out, 'finetune', 'model.pth'),
    'lowres': lambda out, cfg: os.path.join(out, 'lowres', 'model.pth'),
    'export': lambda out, cfg: export_path(out, cfg, 'teacher'),
}
RUNNERS = dict(data=stage_data, teacher=stage_teacher, distill=stage_distill, finetune=stage_finetune,
               lowres=stage_lowres, export=stage_export)
RECIPE = Recipe(
    prog=SIGNS_RECIPE, description=__doc__, configs=CONFIGS, default='512', outputs=STAGE_OUTPUTS, runners=RUNNERS,
    rules=RULES, create_model=lambda cfg: create_lookwhere(cfg, num_classes=len(CLASS_NAMES), weight_init='skip'),
    check_config=check_config, shipped=shipped, benchmark='benchmarks/sparse_signs.py',
    set_example='map_weight=0.3', add_arguments=add_share_from, check_arguments=check_share_from,
    before_stages=share_stages,
)


run_config = RECIPE.run_config  # what a run folder holds, for the benchmark
main = RECIPE.main

if __name__ == '__main__':
    sys.exit(main())
