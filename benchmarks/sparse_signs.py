#!/usr/bin/env python3
""" Sparse traffic signs, end to end: does LookWhere learn where to look?

The paper's pipeline on `timm_lookwhere.data`'s procedural scenes (one sign covering 1-2% of a
cluttered 256 px image, 14 classes), with the project's own tools, on a CPU:

    data      the training scenes as a uint8 tensor cache, and the distillation images as an ImageFolder
              (train split, other seeds)
    teacher   a full-resolution ViT (the LookWhere extractor's size, all 256 patches), trained from
              scratch on the labels plus a patch-level loss from the generator's sign boxes (each patch
              token names the sign under it, or background): first on 64 px windows around the sign at
              their true positions (16x cheaper per image: it learns what signs look like), then on
              whole scenes (it learns to find them); the patch head is dropped afterwards
    distill   `python -m timm_lookwhere.distill`: selector and extractor from the frozen teacher
    finetune  LookWhere with the selector frozen (the paper's recipe), k drawn per step from 2-10%;
              the classifier starts from the teacher's (the extractor's cls token was distilled to
              match the teacher's)
    lowres    the baseline at equal cost: the teacher fine-tuned on a low-res copy of the image, at
              the resolution whose FLOPs match LookWhere at k = 5%
    export    fp16 safetensors of LookWhere and of the teacher (`--ship` copies them into the package)
    evaluate  on the test split, from the exported files: accuracy, GFLOPs, CPU latency, and random
              selection at the same k (a forward hook on `model.topk` replaces LookWhere's choice)

Every stage keeps its output in --output and is skipped when it is there, so a stopped run goes on
where it stopped (distillation resumes mid-run). Progress goes to the console and OUTPUT/run.log.

    python benchmarks/sparse_signs.py --output runs/sparse_signs --ship    # the full run, about 1 hour on 2 cores
    python benchmarks/sparse_signs.py --output /tmp/ss_tiny --tiny        # every stage on a tiny model, ~15 s
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import timm_lookwhere  # noqa: F401  (registers the models)
from timm_lookwhere import SelectionRecorder
from timm_lookwhere.data import CLASS_NAMES, SparseSigns, write_image_folder
from timm_lookwhere.demo import (
    SIGNS_MODEL, SIGNS_TEACHER_FILE, SIGNS_WEIGHTS_FILE, TEACHER_BASE, dense_counterpart_kwargs, median_latency_ms,
    patches_under_box,
)

_logger = logging.getLogger('sparse_signs')

K_RATIOS = (0.02, 0.05, 0.10)
STAGES = ('data', 'teacher', 'distill', 'finetune', 'lowres', 'export', 'evaluate')
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


@dataclasses.dataclass
class RunConfig:
    """Sizes of every stage. FULL is the run of the results table, TINY a smoke test of the code."""
    model_kwargs: Dict[str, Any]  # overrides of the lookwhere_vitt16_256 architecture
    train_scenes: int  # cached training scenes for the teacher, fine-tuning and the low-res ViT
    distill_images: int  # ImageFolder size for distillation
    window_steps: int  # teacher phase 1: windows around the sign
    window_batch: int
    teacher_steps: int  # teacher phase 2: whole scenes
    teacher_batch: int
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
    window: int = 4  # side of the teacher's phase-1 windows, in patches (a sign spans at most 3)


FULL = RunConfig(
    model_kwargs={}, train_scenes=20000, distill_images=4000,
    window_steps=3000, window_batch=128, teacher_steps=1000, teacher_batch=32, teacher_lr=1e-3, patch_loss_weight=1.0,
    distill_steps=1600, distill_batch=32, distill_lr=3e-4, map_weight=1.0,
    finetune_steps=3000, finetune_batch=32, finetune_lr=3e-4, lowres_steps=3000, lowres_lr=3e-4,
    val_images=500, test_images=2000, latency_runs=60,
)
TINY = RunConfig(
    model_kwargs=dict(embed_dim=32, depth=2, num_heads=2), train_scenes=24, distill_images=28,
    window_steps=3, window_batch=8, teacher_steps=3, teacher_batch=4, teacher_lr=1e-3, patch_loss_weight=1.0,
    distill_steps=3, distill_batch=4, distill_lr=3e-4, map_weight=0.5,
    finetune_steps=3, finetune_batch=4, finetune_lr=3e-4, lowres_steps=3, lowres_lr=3e-4,
    val_images=8, test_images=16, latency_runs=3,
)


# --------------------------------------------------------------------------------------------
# helpers


class Progress:
    """Logs a stage's step, loss, speed and time left at most every `every` seconds (and at the end)."""

    def __init__(self, stage: str, total: int, every: float = 30.):
        self.stage, self.total, self.every = stage, total, every
        self.start = self.last = time.perf_counter()

    def update(self, step: int, **values: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and step != self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step)
        shown = ' '.join(f'{k} {v:.4g}' for k, v in values.items())
        _logger.info(f'{self.stage}: step {step}/{self.total} {shown} | {elapsed / 60:.1f} min, '
                     f'{eta / 60:.1f} min left')


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float."""
    return (x.float() / 255 - MEAN) / STD


def to_uint8_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


class _SceneTensors(Dataset):
    """Scenes as uint8 tensors with their label and sign box, for caching an evaluation split."""

    def __init__(self, signs: SparseSigns):
        self.signs = signs

    def __len__(self) -> int:
        return len(self.signs)

    def __getitem__(self, index: int):
        scene = self.signs.scene(index)
        return to_uint8_tensor(scene.image), scene.label, torch.tensor(scene.box)


def load_split(out: str, split: str, num: int, img_size: int, workers: int) -> Dict[str, torch.Tensor]:
    """A val/test split as uint8 images (N, 3, H, W), labels (N,), boxes (N, 4); cached in OUTPUT/cache."""
    path = os.path.join(out, 'cache', f'{split}_{num}_{img_size}.pt')
    if os.path.exists(path):
        return torch.load(path)
    _logger.info(f'generating {num} {split} scenes')
    loader = DataLoader(_SceneTensors(SparseSigns(split, num, img_size)), batch_size=64, num_workers=workers)
    images, labels, boxes = zip(*loader)
    data = dict(images=torch.cat(images), labels=torch.cat(labels), boxes=torch.cat(boxes))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(data, path)
    return data


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(images[i:i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, data: Dict[str, torch.Tensor]) -> float:
    return (predict(model, data['images']) == data['labels']).float().mean().item()


def gflops(model: nn.Module, img_size: int) -> float:
    """Forward FLOPs of one image (torch's counter: 2 per multiply-add; matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 1e9


def run_logged(cmd: List[str], log_path: str) -> None:
    """Run a command, its output streamed to the console and appended to `log_path`."""
    _logger.info('running: ' + ' '.join(cmd))
    with open(log_path, 'a') as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            log.flush()
    if proc.returncode:
        raise RuntimeError(f'command failed with exit code {proc.returncode}: {" ".join(cmd)}')


# --------------------------------------------------------------------------------------------
# models


def create_lookwhere(cfg: RunConfig, **kwargs) -> nn.Module:
    return timm.create_model(SIGNS_MODEL, **dict(cfg.model_kwargs, **kwargs))


def create_teacher(cfg: RunConfig, img_size: int = 256, file: Optional[str] = None) -> nn.Module:
    """The full-res ViT: the architecture of the LookWhere extractor, every patch, its own cls token."""
    kwargs = dense_counterpart_kwargs(create_lookwhere(cfg, num_classes=len(CLASS_NAMES)))
    kwargs['img_size'] = img_size
    if file is None:
        # layer scale starting at 1: a plain ViT at init, which trains from scratch faster than DINOv2's 1e-5
        return timm.create_model(TEACHER_BASE, **dict(kwargs, init_values=1.0))
    # timm resizes the position embedding to img_size; num_classes in the overlay keeps the head
    overlay = dict(file=file, num_classes=len(CLASS_NAMES))
    return timm.create_model(TEACHER_BASE, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


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
        return self.vit.forward_head(feats), self.patch_head(feats[:, self.vit.num_prefix_tokens:])  # (B, C), (B, N, C+1)


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


def crop_windows(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, window: int, patch: int) -> torch.Tensor:
    side = window * patch
    return torch.stack([img[:, r * patch:r * patch + side, c * patch:c * patch + side]
                        for img, r, c in zip(images, rows.tolist(), cols.tolist())])


def cached_batches(data: Dict[str, torch.Tensor], batch_size: int, seed: int, crop: Optional[Callable] = None):
    """Endless batches (normalised images, labels, boxes) drawn at random from a cached split;
    `crop(images, boxes)` cuts the uint8 images first (normalising only what is kept)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randint(len(data['labels']), (batch_size,), generator=generator)
        images, labels, boxes = data['images'][index], data['labels'][index], data['boxes'][index]
        if crop is None:
            yield normalize(images), labels, boxes
        else:
            images, *where = crop(images, boxes)
            yield normalize(images), labels, boxes, *where


def fit(
        stage: str,
        model: nn.Module,
        batches,
        steps: int,
        lr: float,
        forward: Callable,
        before_step: Optional[Callable[[int], None]] = None,
        weight_decay: float = 0.05,
) -> None:
    """Supervised training: AdamW, warm-up then cosine (timm's optimizer and scheduler), label smoothing 0.1.

    `batches` yields tuples whose first two items are inputs and labels; `forward(model, batch)` gives
    logits and a loss added to the label loss (0. for none).
    """
    optimizer = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    scheduler, _ = create_scheduler_v2(
        optimizer, 'cosine', num_epochs=steps - warmup, warmup_epochs=warmup, warmup_prefix=True,
        warmup_lr=lr / 100, min_lr=lr / 100, step_on_epochs=False, updates_per_epoch=1)
    criterion = LabelSmoothingCrossEntropy(0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(stage, steps)
    loss_avg = acc_avg = None
    model.train()
    for step, batch in enumerate(batches, start=1):
        if step > steps:
            break
        scheduler.step_update(step - 1)
        if before_step is not None:
            before_step(step)
        logits, extra_loss = forward(model, batch)
        loss = criterion(logits, batch[1]) + extra_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acc = (logits.argmax(1) == batch[1]).float().mean().item()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        acc_avg = acc if acc_avg is None else 0.95 * acc_avg + 0.05 * acc
        progress.update(step, loss=loss_avg, train_acc=acc_avg, lr=optimizer.param_groups[0]['lr'])
    model.eval()


# --------------------------------------------------------------------------------------------
# stages


def stage_data(args, cfg: RunConfig) -> None:
    load_split(args.output, 'train', cfg.train_scenes, 256, args.workers)
    write_image_folder(os.path.join(args.output, 'data'), 'train', cfg.distill_images, seed=100)


def stage_teacher(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    train = load_split(args.output, 'train', cfg.train_scenes, 256, args.workers)
    model = PatchSupervisedViT(create_teacher(cfg), len(CLASS_NAMES))
    patch, grid = model.vit.patch_embed.patch_size[0], model.vit.patch_embed.grid_size[0]
    weights = torch.ones(len(CLASS_NAMES) + 1)
    weights[-1] = 0.2  # background patches outnumber sign patches ~50 to 1
    generator = torch.Generator().manual_seed(0)

    def windows(images, boxes):
        rows, cols = sign_windows(boxes, cfg.window, patch, grid, generator)
        return crop_windows(images, rows, cols, cfg.window, patch), rows, cols

    def forward(model, batch, window):
        images, labels, boxes, rows, cols = batch
        logits, patch_logits = model(images, rows, cols) if window < grid else model(images)
        targets = patch_targets(boxes, labels, rows, cols, window, patch, background=len(CLASS_NAMES))
        patch_loss = F.cross_entropy(patch_logits.flatten(0, 1), targets.flatten(), weight=weights)
        return logits, cfg.patch_loss_weight * patch_loss

    whole = torch.zeros(cfg.teacher_batch, dtype=torch.long)
    fit('teacher (windows)', model, cached_batches(train, cfg.window_batch, seed=0, crop=windows), cfg.window_steps,
        cfg.teacher_lr, lambda m, b: forward(m, b, cfg.window))
    fit('teacher (scenes)', model, ((*b, whole, whole) for b in cached_batches(train, cfg.teacher_batch, seed=1)),
        cfg.teacher_steps, cfg.teacher_lr / 2, lambda m, b: forward(m, b, grid))
    teacher = model.vit
    val = load_split(args.output, 'val', cfg.val_images, 256, args.workers)
    _logger.info(f'teacher: val accuracy {accuracy(teacher, val):.4f}')
    folder = os.path.join(args.output, 'teacher')
    os.makedirs(folder, exist_ok=True)
    state = teacher.state_dict()
    # distillation builds the teacher without a classifier: give it the backbone alone
    torch.save({k: v for k, v in state.items() if not k.startswith('head.')}, os.path.join(folder, 'backbone.pth'))
    torch.save(state, os.path.join(folder, 'model.pth'))


def stage_distill(args, cfg: RunConfig) -> None:
    folder = os.path.join(args.output, 'distill')
    last = os.path.join(folder, 'last.pth')
    teacher_kwargs = dense_counterpart_kwargs(create_lookwhere(cfg, num_classes=0))
    teacher_kwargs.pop('img_size')
    teacher_kwargs.pop('num_classes')
    cmd = [
        sys.executable, '-m', 'timm_lookwhere.distill',
        '--teacher', TEACHER_BASE, '--teacher-checkpoint', os.path.join(args.output, 'teacher', 'backbone.pth'),
        '--teacher-kwargs', *[f'{k}={v}' for k, v in teacher_kwargs.items()],
        '--attn-queries', 'cls',  # a supervised teacher's cls token is the one that looks at the sign
        '--model', SIGNS_MODEL, '--model-kwargs', *[f'{k}={v}' for k, v in cfg.model_kwargs.items()],
        '--data-dir', os.path.join(args.output, 'data'), '--no-aug', '--workers', str(min(args.workers, 1)),
        '--batch-size', str(cfg.distill_batch), '--steps', str(cfg.distill_steps), '--lr', str(cfg.distill_lr),
        '--warmup-steps', str(max(1, cfg.distill_steps // 10)), '--min-lr', str(cfg.distill_lr / 100),
        '--map-weight', str(cfg.map_weight), '--clip-grad', '1.0',
        '--log-every', '10', '--save-every', '50', '--device', 'cpu', '--output', folder,
    ]
    # k per step: distill's default range, the authors' 16..128 of 1369 patches scaled to this grid
    if os.path.exists(last):
        cmd.append('--resume')
    run_logged(cmd, os.path.join(args.output, 'run.log'))


def _distilled(cfg: RunConfig, out: str) -> nn.Module:
    return create_lookwhere(cfg, pretrained=True, num_classes=len(CLASS_NAMES),
                            pretrained_cfg_overlay=dict(file=os.path.join(out, 'distill', 'last.pth')))


def stage_finetune(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    model = _distilled(cfg, args.output)
    teacher = create_teacher(cfg, file=os.path.join(args.output, 'teacher', 'model.pth'))
    model.head.load_state_dict(teacher.head.state_dict())  # the distilled cls token speaks the teacher's language
    k_lo, k_hi = (max(1, int(r * model.num_patches)) for r in (K_RATIOS[0], K_RATIOS[-1]))
    k_generator = torch.Generator().manual_seed(0)

    def draw_k(step: int) -> None:  # one model for every k of the table
        model.set_k(k=int(torch.randint(k_lo, k_hi + 1, (1,), generator=k_generator)))

    train = load_split(args.output, 'train', cfg.train_scenes, 256, args.workers)
    fit('finetune', model, cached_batches(train, cfg.finetune_batch, seed=2), cfg.finetune_steps, cfg.finetune_lr,
        lambda m, b: (m(b[0]), 0.), before_step=draw_k)
    model.set_k(k_ratio=0.1)
    val = load_split(args.output, 'val', cfg.val_images, 256, args.workers)
    _logger.info(f'finetuned LookWhere: val accuracy at k=10% {accuracy(model, val):.4f}')
    os.makedirs(os.path.join(args.output, 'finetune'), exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.output, 'finetune', 'model.pth'))


def lowres_size(cfg: RunConfig, out: str) -> int:
    """The low-res side (a multiple of the patch) whose ViT costs about what LookWhere costs at k = 5%."""
    model = create_lookwhere(cfg, num_classes=len(CLASS_NAMES), k_ratio=0.05)
    target = gflops(model, 256)
    patch = model.patch_embed.patch_size[0]
    sizes = list(range(2 * patch, 256 + 1, patch))
    costs = [gflops(LowResViT(create_teacher(cfg, img_size=s), s), 256) for s in sizes]
    best = min(range(len(sizes)), key=lambda i: abs(math.log(costs[i] / target)))
    _logger.info(f'low-res ViT: {sizes[best]} px costs {costs[best]:.4f} GFLOPs, LookWhere at 5% {target:.4f}')
    return sizes[best]


def stage_lowres(args, cfg: RunConfig) -> None:
    torch.manual_seed(0)
    size = lowres_size(cfg, args.output)
    model = LowResViT(create_teacher(cfg, img_size=size, file=os.path.join(args.output, 'teacher', 'model.pth')), size)
    train = load_split(args.output, 'train', cfg.train_scenes, 256, args.workers)
    fit('lowres', model, cached_batches(train, cfg.finetune_batch, seed=3), cfg.lowres_steps, cfg.lowres_lr,
        lambda m, b: (m(b[0]), 0.))
    os.makedirs(os.path.join(args.output, 'lowres'), exist_ok=True)
    torch.save(dict(img_size=size, state_dict=model.vit.state_dict()), os.path.join(args.output, 'lowres', 'model.pth'))


def stage_export(args, cfg: RunConfig) -> None:
    folder = os.path.join(args.output, 'export')
    os.makedirs(folder, exist_ok=True)
    sources = (
        ('finetune', os.path.basename(SIGNS_WEIGHTS_FILE)),
        ('teacher', os.path.basename(SIGNS_TEACHER_FILE)),
    )
    for stage, name in sources:
        state = torch.load(os.path.join(args.output, stage, 'model.pth'), map_location='cpu', weights_only=True)
        # fp16 halves the files; the evaluation below runs on these rounded weights
        state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
        save_file(state, os.path.join(folder, name), metadata=dict(source='benchmarks/sparse_signs.py', stage=stage))
        _logger.info(f'exported {name}: {os.path.getsize(os.path.join(folder, name)) / 1e6:.2f} MB')


def ship(args) -> None:
    for target in (SIGNS_WEIGHTS_FILE, SIGNS_TEACHER_FILE):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(args.output, 'export', os.path.basename(target)), target)
        _logger.info(f'shipped {target}')


# --------------------------------------------------------------------------------------------
# evaluation


def random_selection(model: nn.Module, seed: int = 0):
    """A forward hook on `model.topk` that replaces the selector's choice by k random patches."""
    generator = torch.Generator().manual_seed(seed)

    def hook(topk, args, indices):
        scores = torch.rand(args[0].shape, generator=generator)  # (B, N)
        return scores.topk(topk.k, dim=1).indices
    return model.topk.register_forward_hook(hook)


def sign_patches_seen(indices: torch.Tensor, boxes: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Fraction of the patches under each sign's box that were chosen: (B,) in [0, 1]."""
    seen = []
    for chosen, box in zip(indices.tolist(), boxes.tolist()):
        under = patches_under_box(box, (grid, grid), patch)
        seen.append(len(under & set(chosen)) / len(under))
    return torch.tensor(seen)


def latencies(models: Dict[str, nn.Module], runs: int, batch_size: int, img_size: int = 256) -> Dict[str, float]:
    """Median ms per forward of each model on the same random batch, the models taking turns."""
    for model in models.values():
        model.eval()
    return median_latency_ms(models, torch.randn(batch_size, 3, img_size, img_size), runs, warmup=3)


def stage_evaluate(args, cfg: RunConfig) -> Dict[str, Any]:
    folder = os.path.join(args.output, 'export')
    test = load_split(args.output, 'test', cfg.test_images, 256, args.workers)
    num_classes = len(CLASS_NAMES)
    teacher = create_teacher(cfg, file=os.path.join(folder, os.path.basename(SIGNS_TEACHER_FILE))).eval()
    lookwhere = create_lookwhere(cfg, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(
        file=os.path.join(folder, os.path.basename(SIGNS_WEIGHTS_FILE)))).eval()
    low = torch.load(os.path.join(args.output, 'lowres', 'model.pth'), map_location='cpu', weights_only=True)
    lowres = LowResViT(create_teacher(cfg, img_size=low['img_size']), low['img_size'])
    lowres.vit.load_state_dict(low['state_dict'])
    lowres.eval()
    grid, patch = lookwhere.grid_size[0], lookwhere.patch_embed.patch_size[0]

    rows = []
    _logger.info('evaluating the teacher and the low-res ViT')
    rows.append(dict(model='full-res teacher (ViT, all patches)', patches=lookwhere.num_patches,
                     acc=accuracy(teacher, test), gflops=gflops(teacher, 256)))
    rows.append(dict(model=f'low-res ViT ({lowres.img_size} px copy)', patches=(lowres.img_size // patch) ** 2,
                     acc=accuracy(lowres, test), gflops=gflops(lowres, 256)))
    timed = dict(teacher=teacher, lowres=lowres)
    for ratio in K_RATIOS:
        model = create_lookwhere(cfg, pretrained=True, num_classes=num_classes, k_ratio=ratio, pretrained_cfg_overlay=dict(
            file=os.path.join(folder, os.path.basename(SIGNS_WEIGHTS_FILE)))).eval()
        for selection in ('LookWhere', 'random'):
            _logger.info(f'evaluating {selection} selection at k={ratio:.0%}')
            handle = random_selection(model) if selection == 'random' else None
            with SelectionRecorder(model) as rec:
                acc = accuracy(model, test)
            if handle is not None:
                handle.remove()
            indices = torch.cat([r['indices'] for r in rec.records])
            rows.append(dict(model=f'{selection} selection, k = {ratio:.0%}', patches=model.k, acc=acc,
                             gflops=gflops(model, 256),
                             sign_seen=sign_patches_seen(indices, test['boxes'], grid, patch).mean().item()))
        timed[f'k={ratio:.0%}'] = model
    _logger.info(f'timing on {torch.get_num_threads()} thread(s)')
    lat1 = latencies(timed, cfg.latency_runs, 1)
    lat64 = latencies(timed, max(3, cfg.latency_runs // 10), 64)
    for row in rows:
        key = 'teacher' if row['model'].startswith('full') else 'lowres' if row['model'].startswith('low') \
            else 'k=' + row['model'].rsplit('= ', 1)[1]
        row['ms_b1'], row['ms_per_img_b64'] = lat1[key], lat64[key] / 64
    n = len(test['labels'])
    for row in rows:  # 95% interval of an accuracy measured on n scenes (normal approximation)
        row['acc_ci95'] = 1.96 * math.sqrt(max(row['acc'] * (1 - row['acc']), 1e-12) / n)
    results = dict(
        rows=rows, test_images=n, threads=torch.get_num_threads(), machine=f'{platform.processor() or platform.machine()}',
        cpu_count=os.cpu_count(), load_average=os.getloadavg(), config=dataclasses.asdict(cfg),
    )
    with open(os.path.join(args.output, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    table = results_table(results)
    with open(os.path.join(args.output, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    plot_results(results, os.path.join(args.output, 'results.png'))
    return results


def results_table(results: Dict[str, Any]) -> str:
    teacher = results['rows'][0]
    lines = [
        '| model | patches seen | test accuracy (%) | sign patches seen (%) | GFLOPs | latency, batch 1 (ms) '
        '| speed-up vs teacher, batch 1 | ms / image, batch 64 | speed-up, batch 64 |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for row in results['rows']:
        seen = f"{100 * row['sign_seen']:.1f}" if 'sign_seen' in row else '-'
        lines.append(
            f"| {row['model']} | {row['patches']} | {100 * row['acc']:.1f} ± {100 * row['acc_ci95']:.1f} | {seen} "
            f"| {row['gflops']:.3f} | {row['ms_b1']:.2f} | {teacher['ms_b1'] / row['ms_b1']:.1f}x "
            f"| {row['ms_per_img_b64']:.2f} | {teacher['ms_per_img_b64'] / row['ms_per_img_b64']:.1f}x |")
    return '\n'.join(lines)


def plot_results(results: Dict[str, Any], path: str) -> None:
    """Accuracy against GFLOPs: LookWhere and random selection as k grows, the teacher, the low-res ViT."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = results['rows']
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for prefix, style, label in (('LookWhere', 'o-', 'LookWhere (k = 2, 5, 10%)'),
                                 ('random', 's--', 'random patches (k = 2, 5, 10%)')):
        sel = [r for r in rows if r['model'].startswith(prefix)]
        ax.plot([r['gflops'] for r in sel], [100 * r['acc'] for r in sel], style, label=label)
    ax.plot(rows[0]['gflops'], 100 * rows[0]['acc'], '*', markersize=14, label=rows[0]['model'])
    ax.plot(rows[1]['gflops'], 100 * rows[1]['acc'], 'D', markersize=8, label=rows[1]['model'])
    ax.axhline(100 / len(CLASS_NAMES), color='grey', lw=0.8, ls=':', label='chance')
    ax.set_xscale('log')
    ax.set_xlabel('GFLOPs per image (log scale)')
    ax.set_ylabel(f"test accuracy (%), {results['test_images']} scenes")
    ax.set_title('Sparse traffic signs: accuracy against compute')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main


STAGE_OUTPUTS = {
    'data': lambda out, cfg: os.path.join(out, 'data', 'train', 'done'),  # after the cache and the folder
    'teacher': lambda out, cfg: os.path.join(out, 'teacher', 'model.pth'),
    'distill': lambda out, cfg: os.path.join(out, 'distill', 'done'),
    'finetune': lambda out, cfg: os.path.join(out, 'finetune', 'model.pth'),
    'lowres': lambda out, cfg: os.path.join(out, 'lowres', 'model.pth'),
    'export': lambda out, cfg: os.path.join(out, 'export', os.path.basename(SIGNS_TEACHER_FILE)),
    'evaluate': lambda out, cfg: os.path.join(out, 'results.json'),
}
RUNNERS = dict(data=stage_data, teacher=stage_teacher, distill=stage_distill, finetune=stage_finetune,
               lowres=stage_lowres, export=stage_export, evaluate=stage_evaluate)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', required=True, help='folder for every stage output, run.log and results')
    parser.add_argument('--tiny', action='store_true', help='a tiny model and a few steps: checks the code only')
    parser.add_argument('--stages', default=','.join(STAGES), help='comma-separated subset of ' + ','.join(STAGES))
    parser.add_argument('--redo', action='store_true', help='run the stages given even when their output exists')
    parser.add_argument('--ship', action='store_true',
                        help='copy the exported weights into timm_lookwhere/weights (the pretrained tag)')
    parser.add_argument('--workers', type=int, default=2, help='scene-generating processes (default: 2)')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch threads (default: 2; training reads cached scenes, so the cores are free)')
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(',')) - set(STAGES)
    if unknown:
        parser.error(f'unknown stages {sorted(unknown)}; choose from {STAGES}')
    if args.ship and args.tiny:
        parser.error('--ship copies weights into the package: not from a --tiny run')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(args.output, 'run.log'))])
    cfg = TINY if args.tiny else FULL
    torch.set_num_threads(args.threads)
    os.environ['OMP_NUM_THREADS'] = str(args.threads)  # the distillation subprocess too
    timings_path = os.path.join(args.output, 'timings.json')
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    wanted = args.stages.split(',')
    for stage in STAGES:
        if stage not in wanted:
            continue
        done = STAGE_OUTPUTS[stage](args.output, cfg)
        if os.path.exists(done) and not args.redo:
            _logger.info(f'{stage}: done before ({done})')
            continue
        _logger.info(f'{stage}: starting')
        start = time.perf_counter()
        RUNNERS[stage](args, cfg)
        if done.endswith('done'):
            open(done, 'w').close()
        timings[stage] = timings.get(stage, 0) + time.perf_counter() - start
        with open(timings_path, 'w') as f:
            json.dump(timings, f, indent=2)
        _logger.info(f'{stage}: finished in {timings[stage] / 60:.1f} min')
    _logger.info(f'wall time of all stages: {sum(timings.values()) / 60:.1f} min ({timings_path})')
    if args.ship:
        ship(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
