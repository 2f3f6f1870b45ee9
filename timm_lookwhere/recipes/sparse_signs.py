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
and OUTPUT/run.log, each stage's time to OUTPUT/timings.json. A lever (one setting changed, see `--set`)
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
import math
import os
import shutil
import sys
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2

from ..scenes import AREA_RANGE, CLASS_NAMES, WIDE_AREA_RANGE, SceneTensors, SparseSigns, sign_patches_seen, \
    write_image_folder
from ..distillation import DistillTeacher, warmup_cosine_scheduler
from ..files import replacing, writer_lock
from ..lookwhere import SIGNS_RECIPE
from ..teachers import SHIPPED_TEACHER_FILES, TEACHER_BASE, create_teacher, dense_counterpart_kwargs
from .stages import (
    Progress, apply_overrides, check_stage_arguments, gflops, read_run, run_logged, run_stages, save, start_run,
    train_steps, write_json,
)

__all__ = ['RunConfig', 'CONFIGS', 'STAGES', 'K_RATIOS', 'main']

_logger = logging.getLogger('sparse_signs')

TAG = 'sparse_signs'
K_RATIOS = (0.02, 0.05, 0.10)
STAGES = ('data', 'teacher', 'distill', 'finetune', 'lowres', 'export')  # the evaluation is a benchmark's
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
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


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float."""
    return (x.float() / 255 - MEAN) / STD


def load_split(out: str, cfg: RunConfig, split: str, num: int, workers: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A split as uint8 images (N, 3, H, W), labels (N,), boxes (N, 4), cached in OUTPUT/cache.

    The images are a memory-mapped file (20 000 scenes of 512 px are 16 GB): batches read only
    what they draw, and the page cache keeps what fits.
    """
    name = f'{split}_s{seed}_{num}_{cfg.img_size}px_area{cfg.area_range[0]:g}-{cfg.area_range[1]:g}'
    folder = os.path.join(out, 'cache')
    images_path, meta_path = os.path.join(folder, name + '.u8'), os.path.join(folder, name + '.pt')
    shape = (num, 3, cfg.img_size, cfg.img_size)
    if not os.path.exists(meta_path):
        _logger.info(f'generating {num} {split} scenes of {cfg.img_size} px')
        signs = SparseSigns(split, num, cfg.img_size, seed=seed, area_range=cfg.area_range)
        loader = DataLoader(SceneTensors(signs), batch_size=64, num_workers=workers)
        labels, boxes, start = [], [], 0
        progress = Progress(f'data ({split})', math.ceil(num / 64))
        with writer_lock(folder):  # the cache's only writer; it removes the (16 GB) partial file a killed one left
            with replacing(images_path) as tmp:
                images = np.memmap(tmp, dtype=np.uint8, mode='w+', shape=shape)
                for step, (batch, label, box) in enumerate(loader, start=1):
                    images[start:start + len(batch)] = batch.numpy()
                    start += len(batch)
                    labels.append(label)
                    boxes.append(box)
                    progress.update(step)
                images.flush()
                del images
            # written last: a split with its meta file is whole
            with replacing(meta_path) as tmp:
                torch.save(dict(labels=torch.cat(labels), boxes=torch.cat(boxes)), tmp)
    meta = torch.load(meta_path)
    # copy-on-write: torch wants a writable array; nothing writes to it, and the file never changes
    images = torch.from_numpy(np.memmap(images_path, dtype=np.uint8, mode='c', shape=shape))
    return dict(images=images, **meta)


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
    """The full-res ViT: the architecture of the LookWhere extractor, every patch, its own cls token."""
    kwargs = dense_counterpart_kwargs(create_lookwhere(cfg, num_classes=len(CLASS_NAMES)))
    kwargs['img_size'] = img_size or cfg.img_size
    if file is None:
        # layer scale starting at 1: a plain ViT at init, which trains from scratch faster than DINOv2's 1e-5
        return timm.create_model(TEACHER_BASE, **dict(kwargs, init_values=1.0))
    # timm resizes the position embedding to img_size; num_classes in the overlay keeps the head
    overlay = dict(file=file, num_classes=len(CLASS_NAMES))
    return timm.create_model(TEACHER_BASE, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


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


def window_features(vit: nn.Module, crops: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Tokens of a full-res timm ViT (no_embed_class) on windows of the image at their true positions.

    crops (B, 3, w*p, w*p) are the windows, rows/cols (B,) their top-left patch; the patches get the
    position embeddings they have in the whole image, exactly as when the ViT sees all of it.
    """
    proj = vit.patch_embed.proj
    p, grid_cols = proj.stride[0], vit.patch_embed.grid_size[1]
    x = F.conv2d(crops, proj.weight, proj.bias, stride=p).flatten(2).transpose(1, 2)  # (B, w*w, D)
    w = crops.shape[-1] // p
    r, c = torch.meshgrid(torch.arange(w), torch.arange(w), indexing='ij')
    index = (rows[:, None] + r.flatten()) * grid_cols + cols[:, None] + c.flatten()  # (B, w*w)
    x = x + vit.pos_embed[0][index]
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + w*w, D)
    return vit.norm(vit.blocks(vit.norm_pre(x)))


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
    while True:
        index = torch.randint(len(data['labels']), (batch_size,), generator=generator)
        index = index.sort().values  # in file order: the memory-mapped cache reads forward
        labels, boxes = data['labels'][index], data['boxes'][index]
        if crop is None:
            yield normalize(data['images'][index]), labels, boxes
        else:
            images, *where = crop(data['images'], index, boxes)
            yield normalize(images), labels, boxes, *where


def fit(
        stage: str,
        model: nn.Module,
        batches: Iterator[tuple],
        steps: int,
        lr: float,
        forward: Callable,
        state_path: str,
        generators: Sequence[torch.Generator] = (),
        before_step: Optional[Callable[[int], None]] = None,
        weight_decay: float = 0.05,
) -> None:
    """Supervised training: AdamW, warm-up then cosine (timm's optimizer and scheduler), label smoothing 0.1.

    `batches` yields tuples whose first two items are inputs and labels; `forward(model, batch)` gives
    logits and a loss added to the label loss (0. for none). Every SAVE_EVERY_S seconds and at the end
    the weights, the optimiser and the random `generators` that draw the batches go to `state_path`,
    from which a stopped run continues onto the same batches; a finished one is only reloaded.
    """
    optimizer = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    scheduler = warmup_cosine_scheduler(optimizer, steps, warmup, warmup_lr=lr / 100, min_lr=lr / 100)
    criterion = LabelSmoothingCrossEntropy(0.1)

    def step_loss(model: nn.Module, batch: tuple) -> Tuple[torch.Tensor, Dict[str, float]]:
        logits, extra_loss = forward(model, batch)
        accuracy = (logits.argmax(1) == batch[1]).float().mean().item()
        return criterion(logits, batch[1]) + extra_loss, dict(train_acc=accuracy)

    train_steps(stage, model, optimizer, scheduler, batches, steps, step_loss, state_path, generators, before_step,
                smoothing=0.95, save_every_s=SAVE_EVERY_S)

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
        fit(f'teacher ({what})', model, cached_batches(train, batch_size, batch_generator, crop=windows), steps,
            cfg.teacher_lr / 2 ** phase, forward, os.path.join(folder, f'phase{phase}.state.pth'),
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
    fit('finetune', model, cached_batches(train, cfg.finetune_batch, batch_generator), cfg.finetune_steps,
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
    target = gflops(model, cfg.img_size)
    patch = model.patch_embed.patch_size[0]
    sizes = list(range(2 * patch, cfg.img_size + 1, patch))
    costs = [gflops(LowResViT(build_teacher(cfg, img_size=s), s), cfg.img_size) for s in sizes]
    best = min(range(len(sizes)), key=lambda i: abs(math.log(costs[i] / target)))
    _logger.info(f'low-res ViT: {sizes[best]} px costs {costs[best]:.4f} GFLOPs, LookWhere at 5% {target:.4f}')
    return sizes[best]


def stage_lowres(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    folder = os.path.join(args.output, 'lowres')
    os.makedirs(folder, exist_ok=True)
    size = lowres_size(cfg)
    model = LowResViT(build_teacher(cfg, img_size=size, file=os.path.join(args.output, 'teacher', 'model.pth')), size)
    train = load_split(args.output, cfg, 'train', cfg.train_scenes, args.workers)
    batch_generator = torch.Generator().manual_seed(3)
    fit('lowres', model, cached_batches(train, cfg.finetune_batch, batch_generator), cfg.lowres_steps, cfg.lowres_lr,
        lambda m, b: (m(b[0]), 0.), os.path.join(folder, 'state.pth'), generators=(batch_generator,))
    save(dict(img_size=size, state_dict=model.vit.state_dict()), os.path.join(folder, 'model.pth'))


def shipped_files(cfg: RunConfig) -> Dict[str, str]:
    """Where `--ship` puts each stage's export: the registered tag's weights and its teacher's."""
    return dict(finetune=get_pretrained_cfg(cfg.tag).file, teacher=SHIPPED_TEACHER_FILES[cfg.tag])


def export_path(out: str, cfg: RunConfig, stage: str) -> str:
    return os.path.join(out, 'export', os.path.basename(shipped_files(cfg)[stage]))


def stage_export(args, cfg: RunConfig) -> None:
    os.makedirs(os.path.join(args.output, 'export'), exist_ok=True)
    for stage in ('finetune', 'teacher'):
        state = torch.load(os.path.join(args.output, stage, 'model.pth'), map_location='cpu', weights_only=True)
        # fp16 halves the files; the evaluation below runs on these rounded weights
        state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
        path = export_path(args.output, cfg, stage)
        with replacing(path) as tmp:
            save_file(state, tmp, metadata=dict(source=SIGNS_RECIPE, stage=stage, config=cfg.tag))
        _logger.info(f'exported {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.2f} MB')


def ship(args, cfg: RunConfig) -> None:
    for stage, target in shipped_files(cfg).items():
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(export_path(args.output, cfg, stage), target)
        _logger.info(f'shipped {target}')

# --------------------------------------------------------------------------------------------
# levers


def share_stages(out: str, source: str, stages: Sequence[str]) -> None:
    """Link into this run the outputs of another run's stages before the first one this run runs (a
    lever changes one setting and redoes only what it affects); the scene caches go with the data."""
    first = min(STAGES.index(stage) for stage in stages)
    needed = [name for name in ('data', 'teacher', 'distill', 'finetune', 'lowres') if STAGES.index(name) < first]
    for name in ['cache'] * ('data' in needed) + needed:
        src, dst = os.path.abspath(os.path.join(source, name)), os.path.join(out, name)
        if not os.path.exists(src):
            raise FileNotFoundError(f'--share-from {source} has no {name}/: run its {name} stage first')
        if not os.path.lexists(dst):
            os.symlink(src, dst)


# --------------------------------------------------------------------------------------------
# a run folder


def run_config(output: str) -> RunConfig:
    """The configuration a recipe run in `output` last used: its --config, --tiny and --set."""
    run = read_run(output, SIGNS_RECIPE)
    return dataclasses.replace(CONFIGS[run['config']]['tiny' if run['tiny'] else 'full'], **run['overrides'])


# --------------------------------------------------------------------------------------------
# main


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SIGNS_RECIPE, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group('run')
    group.add_argument('--output', required=True, metavar='DIR',
                       help='folder for every stage output, run.log and timings.json')
    group.add_argument('--config', default='512', choices=sorted(CONFIGS), help='scene size (default: %(default)s)')
    group.add_argument('--tiny', action='store_true', help='a tiny model and a few steps: checks the code only')
    group.add_argument('--stages', default=','.join(STAGES), help='comma-separated subset of ' + ','.join(STAGES))
    group.add_argument('--redo', action='store_true', help='run the stages given even when their output exists')
    group.add_argument('--ship', action='store_true',
                       help='copy the exported weights into timm_lookwhere/weights (the pretrained tag)')
    group = parser.add_argument_group('levers')
    group.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                       help='change settings of the configuration (a lever), e.g. map_weight=0.3')
    group.add_argument('--share-from', default=None, metavar='DIR',
                       help="use DIR's outputs (symlinks) of the stages before the first one this run runs")
    group = parser.add_argument_group('machine')
    group.add_argument('--workers', type=int, default=2, help='scene-generating processes (default: 2)')
    group.add_argument('--threads', type=int, default=2,
                       help='torch threads (default: 2; training reads cached scenes, so the cores are free)')
    args = parser.parse_args(argv)
    check_stage_arguments(parser, args, STAGES, 'benchmarks/sparse_signs.py')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start_run(args.output, args.threads)
    cfg, overrides = apply_overrides(CONFIGS[args.config]['tiny' if args.tiny else 'full'], args.set)
    write_json(os.path.join(args.output, 'run.json'), dict(config=args.config, tiny=args.tiny, overrides=overrides))
    if args.share_from:
        share_stages(args.output, args.share_from, args.stages.split(','))
    run_stages(args, cfg, STAGES, STAGE_OUTPUTS, RUNNERS)
    if args.ship:
        ship(args, cfg)
    return 0


if __name__ == '__main__':
    sys.exit(main())
