""" What-where distillation: pre-train a LookWhere selector and extractor from a frozen timm ViT.

The authors released pre-training only for JAX/TPU; this is the same objective in PyTorch
(LOOKWHERE.md, their `imagenet_dinov2.yaml` / `imagenet_franca.yaml`):

    teacher (frozen, eval, full high-res image)  -> cls token, N patch tokens,
                                                    last-block attention logits over the N patches
    selector (low-res copy)                      -> (B, N) map logits, prefix tokens
    extractor (top-k of the selector's own map)  -> cls token, k patch tokens -> all N by inverse-distance fill
    loss = 1.0 * MSE(cls) + 1.0 * MSE(filled patches) + 0.1 * KL(softmax(teacher attention) || softmax(map))

k is drawn per step from [k_min, k_max] (16..128 at 518 px). The student starts as a copy of the
teacher: the extractor is the teacher, the selector its first blocks at low resolution.

    python -m timm_lookwhere.distill --teacher vit_base_patch14_reg4_dinov2 --model lookwhere_vitb_518 \\
        --data-dir /data/imagenet --output runs/lw
    torchrun --nproc_per_node 8 -m timm_lookwhere.distill ...   # DDP, same code path
"""
import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from itertools import count
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from huggingface_hub.errors import LocalEntryNotFoundError
from tqdm import tqdm

import timm
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.dataset import IterableImageDataset
from timm.layers import Attention, resample_abs_pos_embed, to_2tuple
from timm.models import get_pretrained_cfg, named_apply
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler, ParseKwargs, unwrap_model
from timm.utils.distributed import init_distributed_device_so

from .augment import create_train_transform
from .dense import idw_fill
from .lookwhere import LookWhere

__all__ = [
    'LOSS_WEIGHTS', 'default_k_range', 'resolve_k_range', 'TeacherAttentionLogits', 'DistillTeacher',
    'check_teacher', 'init_student_from_teacher', 'distillation_losses', 'Distiller', 'train_step',
    'TeacherTargetCache', 'SeededImageDataset', 'ResumableSampler', 'image_batches', 'train', 'add_subcommand',
    'main',
]

_logger = logging.getLogger(__name__)

LOSS_WEIGHTS = dict(cls=1.0, patch=1.0, map=0.1)  # the authors' distillation_losses
REFERENCE_K_RANGE = (16, 128)  # the authors' top_k_range at 518 px ...
REFERENCE_NUM_PATCHES = 37 * 37  # ... i.e. on a 37x37 grid
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# k per step


def default_k_range(num_patches: int) -> Tuple[int, int]:
    """The authors' 16..128 of 1369 patches, scaled to a grid of `num_patches`."""
    scale = num_patches / REFERENCE_NUM_PATCHES
    k_min = min(num_patches, max(1, round(REFERENCE_K_RANGE[0] * scale)))
    k_max = min(num_patches, max(k_min, round(REFERENCE_K_RANGE[1] * scale)))
    return k_min, k_max


def resolve_k_range(num_patches: int, k_min: Optional[int] = None, k_max: Optional[int] = None) -> Tuple[int, int]:
    """Fill unset ends with the scaled defaults and check 1 <= k_min <= k_max <= num_patches."""
    default_min, default_max = default_k_range(num_patches)
    k_min = default_min if k_min is None else k_min
    k_max = max(default_max, k_min) if k_max is None else k_max
    if not 1 <= k_min <= k_max <= num_patches:
        raise ValueError(
            f'need 1 <= k_min <= k_max <= {num_patches} (the patches of the grid), got k_min={k_min}, k_max={k_max}')
    return k_min, k_max


# --------------------------------------------------------------------------------------------
# teacher


class TeacherAttentionLogits:
    """Forward pre-hook on a timm `Attention`: its attention logits q.k/sqrt(d), averaged over heads
    and over the chosen queries, at the patch keys: (B, N), kept in `.logits`.

    timm's fused attention never forms the logits, so they are recomputed from the block's input
    and its qkv weights. The mean over queries and heads commutes with the dot product, so the
    (B, heads, T, T) matrix is never built: mean_q(q) . k costs one (B, heads, N, d) product.
    """

    def __init__(self, attn: Attention, num_prefix_tokens: int, queries: str = 'patch'):
        if queries not in ('patch', 'cls'):
            raise ValueError(f"queries must be 'patch' (DINOv2 config) or 'cls' (Franca config), got {queries!r}")
        self.attn = attn
        self.num_prefix_tokens = num_prefix_tokens
        self.queries = queries
        self.logits: Optional[torch.Tensor] = None
        self.handle = attn.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()  # (B, T, D), the block's norm1 output, T = P + N
        B, T, _ = x.shape
        qk_dim = 2 * self.attn.attn_dim  # q and k only: the value rows are not needed
        weight = self.attn.qkv.weight[:qk_dim].float()
        bias = self.attn.qkv.bias[:qk_dim].float() if self.attn.qkv.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):  # the target in float32 under --amp too
            qk = F.linear(x, weight, bias)  # (B, T, 2 * H * d)
            q, k = qk.reshape(B, T, 2, self.attn.num_heads, self.attn.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
            P = self.num_prefix_tokens
            q = q[:, :, P:] if self.queries == 'patch' else q[:, :, :1]  # (B, H, Q, d)
            logits = torch.einsum('bhd,bhnd->bhn', q.mean(dim=2), k[:, :, P:])  # (B, H, N)
        self.logits = logits.mean(dim=1) * self.attn.scale  # (B, N)

    def remove(self) -> None:
        self.handle.remove()


class DistillTeacher(nn.Module):
    """A frozen timm ViT giving the distillation targets: `cls` (B, D), `patches` (B, N, D), both
    after the final norm, and `attn` (B, N), the last block's attention logits at the patch keys."""

    def __init__(self, vit: VisionTransformer, attn_queries: str = 'patch'):
        super().__init__()
        _check_teacher_type(vit)
        self.vit = vit.eval().requires_grad_(False)
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.attention = TeacherAttentionLogits(vit.blocks[-1].attn, vit.num_prefix_tokens, attn_queries)

    def train(self, mode: bool = True) -> 'DistillTeacher':
        return super().train(False)  # the teacher stays in eval

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.attention.logits = None
        tokens = self.vit.forward_features(x)  # (B, P + N, D)
        if self.attention.logits is None:
            raise RuntimeError('the teacher forward did not run its last block; cannot read its attention')
        return dict(
            cls=tokens[:, 0],  # (B, D)
            patches=tokens[:, self.num_prefix_tokens:],  # (B, N, D)
            attn=self.attention.logits,  # (B, N)
        )


class TeacherTargetCache:
    """The teacher's targets for every image of a fixed dataset, computed the first time an image comes
    and read back every time after: with un-augmented data (--no-aug) an image's targets never change,
    and the teacher's full-resolution forward is most of a distillation step.

    Rows live in `folder` as a memory-mapped float32 table, one row per dataset index (cls, patches,
    attention), with a byte per row saying it is filled, and `meta.json` describing the teacher and
    the data: a folder filled for another teacher or other data is refused, never silently reused.
    Called with (images, dataset indices), it returns what `DistillTeacher` returns.
    """

    def __init__(self, teacher: 'DistillTeacher', folder: str, num_images: int, num_patches: int,
                 embed_dim: int, description: Dict[str, Any]):
        self.teacher = teacher
        self.num_patches, self.embed_dim = num_patches, embed_dim
        meta = dict(description, num_images=num_images, num_patches=num_patches, embed_dim=embed_dim)
        meta_path = os.path.join(folder, 'meta.json')
        os.makedirs(folder, exist_ok=True)
        exists = os.path.exists(meta_path)
        if exists:
            with open(meta_path) as f:
                found = json.load(f)
            differ = sorted(k for k in set(found) | set(meta) if found.get(k) != meta.get(k))
            if differ:
                raise ValueError(
                    f'--teacher-cache {folder} holds the targets of another teacher or other data (differs in '
                    f'{", ".join(differ)}); give a new folder, or delete this one to recompute')
        width = embed_dim * (num_patches + 1) + num_patches  # cls, patches, attention logits
        mode = 'r+' if exists else 'w+'
        self.rows = np.memmap(os.path.join(folder, 'targets.f32'), dtype=np.float32, mode=mode,
                              shape=(num_images, width))
        self.filled = np.memmap(os.path.join(folder, 'filled.u8'), dtype=np.uint8, mode=mode, shape=(num_images,))
        if not exists:  # written last: a folder without meta.json is an unfinished start, made anew
            with open(meta_path, 'w') as f:
                json.dump(meta, f, indent=2)

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    def __call__(self, images: torch.Tensor, indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        ids = indices.cpu().numpy()
        missing = np.flatnonzero(self.filled[ids] == 0)
        if len(missing):
            fresh = self.teacher(images[torch.from_numpy(missing).to(images.device)])
            packed = torch.cat([fresh['cls'][:, None].float(), fresh['patches'].float()], dim=1).flatten(1)
            packed = torch.cat([packed, fresh['attn'].float()], dim=1)  # (m, width)
            self.rows[ids[missing]] = packed.cpu().numpy()
            self.filled[ids[missing]] = 1  # after the row: a row marked filled is whole
        rows = torch.from_numpy(np.ascontiguousarray(self.rows[ids])).to(images.device)  # (B, width)
        D, N = self.embed_dim, self.num_patches
        return dict(
            cls=rows[:, :D],  # (B, D)
            patches=rows[:, D:D * (N + 1)].view(len(ids), N, D),  # (B, N, D)
            attn=rows[:, D * (N + 1):],  # (B, N)
        )

    def flush(self) -> None:
        self.rows.flush()
        self.filled.flush()


def _check_teacher_type(vit: nn.Module) -> None:
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f'the teacher must be a timm VisionTransformer, got {type(vit).__name__}')
    if not vit.has_class_token:
        raise ValueError('the teacher has no class token; the cls distillation loss needs one')
    if vit.pos_embed is None:
        raise ValueError('the teacher has no learned position embedding to initialise the student from')
    if not isinstance(vit.blocks[-1].attn, Attention):
        raise TypeError(
            f"the teacher's last block uses {type(vit.blocks[-1].attn).__name__}; "
            'only timm.layers.Attention (q.k logits without rotary embeddings) is supported')
    if not isinstance(vit.norm_pre, nn.Identity):
        raise ValueError('the teacher normalises tokens before its blocks (norm_pre); a LookWhere extractor does not')


def check_teacher(teacher: VisionTransformer, student: LookWhere) -> None:
    """Raise a ValueError naming the mismatch when `teacher` cannot initialise and teach `student`."""
    _check_teacher_type(teacher)
    t_patch, s_patch = tuple(teacher.patch_embed.patch_size), tuple(student.patch_embed.patch_size)
    if t_patch != s_patch:
        raise ValueError(
            f'teacher patch size {t_patch} cannot serve a student with patch size {s_patch}: '
            'the patch tokens and the attention map must be on the same grid')
    if teacher.embed_dim != student.embed_dim:
        raise ValueError(
            f'teacher width {teacher.embed_dim} cannot serve a student of width {student.embed_dim}: '
            'the student is initialised as a copy of the teacher and regresses its tokens')
    if tuple(teacher.patch_embed.grid_size) != tuple(student.grid_size):
        raise ValueError(
            f'teacher grid {tuple(teacher.patch_embed.grid_size)} differs from the student grid '
            f'{tuple(student.grid_size)}; create the teacher at the student image size')
    checks = (
        ('blocks', len(teacher.blocks), len(student.blocks)),
        ('attention heads', teacher.blocks[0].attn.num_heads, student.blocks[0].attn.num_heads),
        ('register tokens', teacher.num_reg_tokens, student.num_reg_tokens),
    )
    for what, t_value, s_value in checks:
        if t_value != s_value:
            raise ValueError(f'teacher has {t_value} {what}, the student {s_value}; they must match')
    if len(student.selector.backbone.blocks) > len(teacher.blocks):
        raise ValueError(
            f'the selector has {len(student.selector.backbone.blocks)} blocks but the teacher only '
            f'{len(teacher.blocks)} to initialise them from')


# --------------------------------------------------------------------------------------------
# student initialisation


def _teacher_embeddings(teacher: VisionTransformer) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Patch position embeddings (1, N, D) and the cls (1, 1, D) / reg (1, R, D) tokens with any
    position embedding of theirs folded in, as a student without prefix slots needs them."""
    pos = teacher.pos_embed.detach()
    cls_token = teacher.cls_token.detach()
    reg_token = teacher.reg_token.detach() if teacher.reg_token is not None else None
    if not teacher.no_embed_class:  # pos_embed = [cls, reg..., patches]
        P = teacher.num_prefix_tokens
        cls_token = cls_token + pos[:, :1]
        if reg_token is not None:
            reg_token = reg_token + pos[:, 1:P]
        pos = pos[:, P:]
    return pos, cls_token, reg_token


def _student_targets(student: LookWhere, teacher: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Student state-dict key -> the teacher tensor it starts from (heads are not in it)."""
    t_sd = teacher.state_dict()
    pos, cls_token, reg_token = _teacher_embeddings(teacher)
    t_grid = teacher.patch_embed.grid_size
    resize = dict(num_prefix_tokens=0, old_size=t_grid, interpolation='bicubic', antialias=False)
    shared = {k: v for k, v in t_sd.items() if k.startswith(('patch_embed.', 'norm.'))}
    targets = dict(shared)
    targets.update({k: v for k, v in t_sd.items() if k.startswith('blocks.')})
    targets['pos_embed'] = resample_abs_pos_embed(pos, new_size=student.grid_size, **resize)
    selector_depth = len(student.selector.backbone.blocks)
    sel = dict(shared)
    sel.update({k: v for k, v in t_sd.items() if k.startswith('blocks.') and int(k.split('.')[1]) < selector_depth})
    sel['pos_embed'] = resample_abs_pos_embed(pos, new_size=student.selector.grid_size, **resize)
    sel['cls_token'] = cls_token
    if reg_token is not None:
        sel['reg_token'] = reg_token
    targets.update({f'selector.backbone.{k}': v for k, v in sel.items()})
    return targets


@torch.no_grad()
def init_student_from_teacher(student: LookWhere, teacher: VisionTransformer) -> None:
    """Extractor = copy of the teacher (patch embed, resized pos embed, blocks, norm); selector =
    the teacher's first blocks with its pos embed resized to the low-res grid and its cls/reg
    tokens; the selector's map head and any classifier head start random (timm's ViT init)."""
    check_teacher(teacher, student)
    targets = _student_targets(student, teacher)
    s_sd = student.state_dict()
    heads = ('selector.head.', 'head.', 'selector.backbone.head.', 'selector.backbone.fc_norm.')
    missing = [k for k in s_sd if k not in targets and not k.startswith(heads)]
    unused = [k for k in targets if k not in s_sd]
    shapes = [f'{k}: teacher {tuple(targets[k].shape)} vs student {tuple(s_sd[k].shape)}'
              for k in targets if k in s_sd and targets[k].shape != s_sd[k].shape]
    if missing or unused or shapes:
        raise ValueError(
            'teacher and student architectures differ: '
            + '; '.join(filter(None, (
                f'student parameters the teacher lacks: {missing}' if missing else '',
                f'teacher parameters the student lacks: {unused}' if unused else '',
                f'shape mismatches: {shapes}' if shapes else '',
            ))))
    for key, value in targets.items():
        s_sd[key].copy_(value)
    named_apply(init_weights_vit_timm, student.selector.head)
    if not isinstance(student.head, nn.Identity):
        named_apply(init_weights_vit_timm, student.head)


# --------------------------------------------------------------------------------------------
# objective


def distillation_losses(
        student: Dict[str, torch.Tensor],
        teacher: Dict[str, torch.Tensor],
        grid_size: Tuple[int, int],
        num_prefix_tokens: int,
        num_neighbors: int = 5,
        weights: Optional[Dict[str, float]] = None,
) -> Dict[str, torch.Tensor]:
    """The what-where losses, all in float32.

    Args:
        student: `LookWhere.forward_all` output: `map` (B, N), `indices` (B, k), `tokens` (B, P + k, D).
        teacher: `DistillTeacher` output: `cls` (B, D), `patches` (B, N, D), `attn` (B, N).
        grid_size: (rows, cols) of the high-res grid, rows * cols = N.
        num_prefix_tokens: P, the student's prefix tokens (its cls token is the first).
        num_neighbors: chosen patches mixed into each cell of the filled grid.
        weights: `cls`, `patch`, `map` weights; the authors' 1.0 / 1.0 / 0.1 by default.

    Returns:
        `loss` (the weighted sum), `loss_cls`, `loss_patch`, `loss_map`: scalars.
    """
    weights = dict(LOSS_WEIGHTS, **(weights or {}))
    tokens = student['tokens'].float()
    loss_cls = F.mse_loss(tokens[:, 0], teacher['cls'].float())  # mean over B, D
    filled = idw_fill(tokens[:, num_prefix_tokens:], student['indices'], grid_size, num_neighbors)  # (B, N, D)
    loss_patch = F.mse_loss(filled, teacher['patches'].float())  # mean over B, N, D
    log_p_student = F.log_softmax(student['map'].float(), dim=1)  # (B, N)
    log_p_teacher = F.log_softmax(teacher['attn'].float(), dim=1)  # (B, N)
    # KL(teacher || student) summed over patches, averaged over images, as the authors' optax call
    loss_map = F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True)
    loss = weights['cls'] * loss_cls + weights['patch'] * loss_patch + weights['map'] * loss_map
    return dict(loss=loss, loss_cls=loss_cls, loss_patch=loss_patch, loss_map=loss_map)


class Distiller(nn.Module):
    """The trained module (what DDP wraps): student forward plus losses against teacher targets."""

    def __init__(self, student: LookWhere, weights: Optional[Dict[str, float]] = None):
        super().__init__()
        self.student = student
        self.weights = dict(LOSS_WEIGHTS, **(weights or {}))

    def forward(self, images: torch.Tensor, targets: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = self.student.forward_all(images)  # map (B, N), indices (B, k), tokens (B, P + k, D)
        return distillation_losses(
            out, targets, self.student.grid_size, self.student.num_prefix_tokens,
            self.student.num_neighbors, self.weights,
        )


def train_step(
        distiller: nn.Module,
        teacher: Union[DistillTeacher, TeacherTargetCache],
        micro_batches: List[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]],
        optimizer: torch.optim.Optimizer,
        k: int,
        autocast: Any = contextlib.nullcontext,
        scaler: Optional[NativeScaler] = None,
        clip_grad: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """One optimiser update over `micro_batches` (gradient accumulation) with k patches.

    A micro-batch is a (B, C, H, W) image tensor, or (images, (B,) dataset indices) when `teacher`
    is a `TeacherTargetCache`, which reads the targets of images it has seen before.
    Returns the loss terms averaged over the micro-batches (detached tensors).
    """
    student = unwrap_model(distiller).student
    student.set_k(k=k)
    params = [p for p in student.parameters() if p.requires_grad]
    totals: Dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        images, indices = batch if isinstance(batch, (tuple, list)) else (batch, None)
        # DDP: all-reduce gradients only once, after the last micro-batch
        sync = distiller.no_sync() if isinstance(distiller, DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with autocast():
                losses = distiller(images, teacher(images) if indices is None else teacher(images, indices))
            loss = losses['loss'] / len(micro_batches)
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=clip_grad, parameters=params, need_update=last)
            else:
                loss.backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.) + value.detach() / len(micro_batches)
    if scaler is None:
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


# --------------------------------------------------------------------------------------------
# data: a resumable stream whose every sample's augmentation is a function of (seed, epoch, index)


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (what timm's transforms draw from), restoring them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also seeds devices
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededImageDataset(Dataset):
    """Map-style image dataset indexed by (index, seed): the image, transformed under that seed.

    The augmentation of a sample thus depends on the sampler's seed only, not on which worker
    loads it or what it loaded before: an interrupted run resumes onto the very same batches.
    With `with_indices`, an item is (image, index).
    """

    def __init__(self, dataset: Dataset, transform: Any, with_indices: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.with_indices = with_indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]) -> torch.Tensor:
        index, seed = item
        sample = self.dataset[index]
        image = sample[0] if isinstance(sample, (tuple, list)) else sample
        with _seeded_rngs(seed):
            image = self.transform(image)
        return (image, index) if self.with_indices else image


class ResumableSampler(Sampler):
    """Endless (index, seed) stream over epochs of a DistributedSampler (one process is world size 1),
    started `start` samples in, so resuming after s steps needs no data to be read twice."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, start: int = 0):
        if len(dataset) < num_replicas:
            raise ValueError(f'the dataset has {len(dataset)} images, fewer than the {num_replicas} processes')
        self.sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.seed = seed
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        per_epoch = len(self.sampler)
        first_epoch, offset = divmod(self.start, per_epoch)
        for epoch in count(first_epoch):
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[offset:]
            offset = 0
            for index in indices:
                # (seed, epoch, index) names the sample's augmentation on any number of processes
                yield index, int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])


def _iterable_batches(dataset: IterableImageDataset, transform: Any, loader_kwargs: Dict[str, Any],
                      start_epoch: int) -> Iterator[torch.Tensor]:
    """Streaming datasets (webdataset, tfds, hfids) shard themselves across processes and workers."""
    dataset.transform = transform
    dataset.set_loader_cfg(num_workers=loader_kwargs['num_workers'])
    loader = DataLoader(dataset, drop_last=True, **loader_kwargs)
    for epoch in count(start_epoch):
        dataset.set_epoch(epoch)
        for images, _ in loader:
            yield images


def image_batches(
        dataset: Dataset,
        transform: Any,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        start_batch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pin_memory: bool = False,
        with_indices: bool = False,
) -> Iterator[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
    """Endless (batch_size, C, H, W) batches of this process's share of `dataset`, skipping the first
    `start_batch` batches (exactly for map-style datasets, by whole epochs for streaming ones).
    With `with_indices` (map-style datasets), each batch is (images, (batch_size,) dataset indices)."""
    loader_kwargs = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if start_batch:
            _logger.warning('A streaming dataset resumes at the start of an epoch, not on the exact next batch.')
        per_epoch = max(1, len(dataset) // batch_size)
        yield from _iterable_batches(dataset, transform, loader_kwargs, start_batch // per_epoch)
        return
    if len(dataset) == 0:
        raise ValueError('the dataset is empty')
    sampler = ResumableSampler(dataset, num_replicas, rank, seed, start=start_batch * batch_size)
    yield from DataLoader(SeededImageDataset(dataset, transform, with_indices), sampler=sampler, drop_last=True,
                          **loader_kwargs)


# --------------------------------------------------------------------------------------------
# run set-up


def create_student(args: argparse.Namespace) -> LookWhere:
    kwargs = dict(args.model_kwargs or {})
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    kwargs.update(num_classes=0, freeze_selector=False, drop_path_rate=args.drop_path)
    student = timm.create_model(args.model, **kwargs)
    if not isinstance(student, LookWhere):
        raise TypeError(f'--model must name a LookWhere architecture, {args.model} builds {type(student).__name__}')
    return student


def create_teacher(args: argparse.Namespace, student: LookWhere) -> VisionTransformer:
    """The teacher at the student's image size (timm resizes its position embeddings on load)."""
    extra = dict(args.teacher_kwargs or {})
    size = tuple(student.patch_embed.img_size)
    if 'img_size' in extra and tuple(to_2tuple(extra['img_size'])) != size:
        raise ValueError(
            f'--teacher-kwargs img_size={extra["img_size"]} differs from the student\'s {size[0]}x{size[1]}: the '
            f'teacher sees the student\'s images on the same patch grid. Set both with --img-size')
    kwargs = dict(dict(num_classes=0, img_size=size), **extra)  # the classifier is never used: 0 unless asked
    if args.teacher_checkpoint:
        if not os.path.isfile(args.teacher_checkpoint):
            raise FileNotFoundError(f'--teacher-checkpoint {args.teacher_checkpoint} does not exist')
        kwargs['pretrained_cfg_overlay'] = dict(file=args.teacher_checkpoint)
    pretrained = not args.teacher_random_init
    if args.teacher_random_init:
        _logger.warning('The teacher is randomly initialised: use this for benchmarks only.')
    try:
        teacher = timm.create_model(args.teacher, pretrained=pretrained, **kwargs)
    except LocalEntryNotFoundError as err:
        cfg = get_pretrained_cfg(args.teacher)
        repo = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else args.teacher
        raise RuntimeError(
            f'could not get the teacher weights of {args.teacher} (Hugging Face Hub repo {repo}): no network and '
            f'nothing in the local Hugging Face cache. Download them where there is network (`hf download {repo}`) '
            f'and copy the cache, or pass a weights file: --teacher-checkpoint FILE (.pth or .safetensors)') from err
    if not isinstance(teacher, VisionTransformer):
        raise TypeError(f'--teacher must name a timm VisionTransformer, {args.teacher} builds {type(teacher).__name__}')
    return teacher


def create_data(args: argparse.Namespace, student: LookWhere) -> Tuple[Dataset, Any]:
    dataset = create_dataset(
        args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
        batch_size=args.batch_size, seed=args.seed,
    )
    data_config = resolve_data_config(model=student)  # the student's normalisation and interpolation
    input_size = (3, *student.patch_embed.img_size)
    norm = dict(mean=data_config['mean'], std=data_config['std'])
    if args.no_aug:
        return dataset, create_transform(input_size, is_training=False, crop_pct=1.0, **norm)
    # the authors' augmentation, posterize kept black at 0 bits on Pillow >= 13 (see timm_lookwhere.augment)
    return dataset, create_train_transform(input_size, augment=dict(scale=tuple(args.scale)), **norm)


def _distributed(device: str) -> Dict[str, Any]:
    info = init_distributed_device_so(device=device)
    if info['distributed']:
        _logger.info(f"Process {info['global_rank']} of {info['world_size']} on {info['device']}.")
    return info


def _autocast(args: argparse.Namespace, device: torch.device) -> Tuple[Any, Optional[NativeScaler]]:
    if not args.amp:
        return contextlib.nullcontext, None
    dtype = dict(bfloat16=torch.bfloat16, float16=torch.float16)[args.amp_dtype]
    if dtype == torch.float16 and device.type != 'cuda':
        raise ValueError('--amp-dtype float16 needs a CUDA device; use bfloat16 on CPU')
    autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    return autocast, (NativeScaler(device.type) if dtype == torch.float16 else None)


def _validate_args(args: argparse.Namespace) -> None:
    positive = ('batch_size', 'steps', 'grad_accum', 'log_every', 'save_every')
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        raise ValueError(f'--warmup-steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}')
    if args.lr <= 0:
        raise ValueError(f'--lr must be positive, got {args.lr}')
    if args.workers < 0:
        raise ValueError(f'--workers must be >= 0, got {args.workers}')
    if args.teacher_checkpoint and args.teacher_random_init:
        raise ValueError('give --teacher-checkpoint or --teacher-random-init, not both')
    if not args.data_dir and not args.dataset:
        raise ValueError('give --data-dir (an image folder) or --dataset (e.g. hfds/NAME, wds/NAME)')
    if args.teacher_cache and not args.no_aug:
        raise ValueError('--teacher-cache keeps one set of targets per image, so it needs fixed inputs: add --no-aug')


# --------------------------------------------------------------------------------------------
# checkpoints and metrics (rank 0 writes)


def _checkpoint(step, student, optimizer, scaler, k_generator, args, world_size) -> Dict[str, Any]:
    """Tensors and plain python only, so timm's weights_only loader reads it."""
    return dict(
        state_dict={k: v.detach().cpu() for k, v in student.state_dict().items()},
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        step=step,
        k_rng_state=k_generator.get_state(),
        arch=args.model,
        world_size=world_size,
        args={k: v for k, v in vars(args).items() if k != 'func'},
        version=CHECKPOINT_VERSION,
    )


def _save(state: Dict[str, Any], path: str) -> None:
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint intact


def _load_resume(path: str, args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume: no checkpoint at {path}')
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or 'optimizer' not in state or 'step' not in state:
        raise ValueError(f'{path} is not a distillation checkpoint (no optimizer state or step)')
    if state['arch'] != args.model:
        raise ValueError(f"{path} was trained as {state['arch']}, not --model {args.model}")
    saved = state['args']
    for name in ('batch_size', 'grad_accum', 'seed', 'steps', 'teacher'):
        if saved.get(name) != getattr(args, name):
            _logger.warning(f'Resuming with --{name.replace("_", "-")} {getattr(args, name)} '
                            f'(the run was started with {saved.get(name)}): it will not repeat the original run.')
    if state['world_size'] != world_size:
        _logger.warning(f"Resuming on {world_size} processes, the run used {state['world_size']}: "
                        'the data order will differ from the original run.')
    return state


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records past the resumed step (logged after the checkpoint, before a crash)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(path, 'w') as f:
        f.writelines(lines)


def _reduce_mean(values: Dict[str, torch.Tensor], world_size: int) -> Dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].float() for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)  # gloo has no AVG: sum, then divide
        stacked = stacked / world_size
    return dict(zip(names, stacked.tolist()))


# --------------------------------------------------------------------------------------------
# the run


def _build_student(args: argparse.Namespace, device: torch.device) -> Tuple[LookWhere, VisionTransformer]:
    torch.manual_seed(args.seed)  # the random map head: the same on every process
    student = create_student(args)
    teacher = create_teacher(args, student)
    init_student_from_teacher(student, teacher)
    student.set_selector_trainable(True, head=True)
    if args.grad_checkpointing:
        student.set_grad_checkpointing()
    student.to(device).train()  # before the optimiser: its loaded state follows the parameters' device
    return student, teacher


def _restore(path: str, args: argparse.Namespace, world_size: int, student: LookWhere, optimizer, scaler,
             k_generator: torch.Generator) -> int:
    """Load a checkpoint into the run; returns the number of updates it had done."""
    state = _load_resume(path, args, world_size)
    student.load_state_dict(state['state_dict'])
    optimizer.load_state_dict(state['optimizer'])
    if scaler is not None and state['scaler'] is not None:
        scaler.load_state_dict(state['scaler'])
    k_generator.set_state(state['k_rng_state'])
    return state['step']


def _to_device(batch, device: torch.device):
    if isinstance(batch, (tuple, list)):  # (images, dataset indices): the indices stay on the CPU for the cache
        return batch[0].to(device, non_blocking=True), batch[1]
    return batch.to(device, non_blocking=True)


def _cache_description(args: argparse.Namespace, student: LookWhere) -> Dict[str, Any]:
    """What the cached targets depend on: a cache whose description differs is refused."""
    checkpoint = None
    if args.teacher_checkpoint:
        stat = os.stat(args.teacher_checkpoint)
        checkpoint = dict(path=os.path.realpath(args.teacher_checkpoint), bytes=stat.st_size, mtime=stat.st_mtime)
    return dict(
        teacher=args.teacher, teacher_checkpoint=checkpoint, teacher_kwargs=dict(args.teacher_kwargs or {}),
        img_size=list(student.patch_embed.img_size), attn_queries=args.attn_queries,
        data=os.path.realpath(args.data_dir) if args.data_dir else None, dataset=args.dataset, split=args.train_split,
        amp=args.amp_dtype if args.amp else None,
    )


def _prepare_output(args: argparse.Namespace, start_step: int) -> None:
    os.makedirs(args.output, exist_ok=True)
    _truncate_metrics(os.path.join(args.output, 'metrics.jsonl'), start_step)
    with open(os.path.join(args.output, 'args.json'), 'w') as f:
        json.dump({k: v for k, v in vars(args).items() if k != 'func'}, f, indent=2)


def train(args: argparse.Namespace) -> int:
    _validate_args(args)
    info = _distributed(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    device, rank, world_size = torch.device(info['device']), info['global_rank'], info['world_size']
    last_path = os.path.join(args.output, 'last.pth')
    resume_path = last_path if args.resume == 'auto' else args.resume
    if not resume_path and os.path.exists(last_path):
        raise ValueError(f'{last_path} exists: pass --resume to continue that run, or choose another --output')

    student, teacher = _build_student(args, device)
    k_range = resolve_k_range(student.num_patches, args.k_min, args.k_max)
    optimizer = create_optimizer_v2(
        student, opt='adamw', lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.opt_eps)
    autocast, scaler = _autocast(args, device)
    k_generator = torch.Generator().manual_seed(args.seed)  # the same k on every process
    start_step = _restore(resume_path, args, world_size, student, optimizer, scaler, k_generator) if resume_path else 0
    # warm-up then cosine to min_lr over --steps updates, as the authors' optax schedule
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=args.steps - args.warmup_steps, warmup_epochs=args.warmup_steps,
        warmup_prefix=True, warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=1)

    distill_teacher = DistillTeacher(teacher, args.attn_queries).to(device)
    distiller = Distiller(student, dict(cls=args.cls_weight, patch=args.patch_weight, map=args.map_weight))
    if info['distributed']:
        # a zero loss weight leaves some parameters (e.g. the map head) without gradient
        unused = min(args.cls_weight, args.patch_weight, args.map_weight) == 0
        distiller = DistributedDataParallel(distiller, find_unused_parameters=unused)
    dataset, transform = create_data(args, student)
    targets = distill_teacher
    if args.teacher_cache:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError('--teacher-cache needs a map-style dataset (an image folder), not a streaming one')
        if info['distributed'] and rank != 0:
            dist.barrier()  # rank 0 creates the files, the others then open them
        targets = TeacherTargetCache(distill_teacher, args.teacher_cache, len(dataset), student.num_patches,
                                     student.embed_dim, _cache_description(args, student))
        if info['distributed'] and rank == 0:
            dist.barrier()
    batches = image_batches(
        dataset, transform, args.batch_size, args.workers, args.seed, start_step * args.grad_accum,
        world_size, rank, pin_memory=device.type == 'cuda', with_indices=bool(args.teacher_cache))

    if rank == 0:
        _prepare_output(args, start_step)
        _logger.info(
            f'Distilling {args.teacher} into {args.model}: {student.num_patches} patches, k in {list(k_range)}, '
            f'{args.batch_size * args.grad_accum * world_size} images per step on {world_size} process(es).')
    _run(args, distiller, targets, optimizer, scheduler, scaler, autocast, batches, k_generator,
         k_range, start_step, device, rank, world_size)
    if info['distributed']:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _run(args, distiller, teacher, optimizer, scheduler, scaler, autocast, batches, k_generator, k_range,
         start_step, device, rank, world_size) -> None:
    is_main = rank == 0
    student = unwrap_model(distiller).student
    metrics_path = os.path.join(args.output, 'metrics.jsonl')
    images_per_step = args.batch_size * args.grad_accum * world_size
    progress = tqdm(total=args.steps, initial=start_step, disable=not is_main, unit='step', dynamic_ncols=True)
    tic, tic_step = time.perf_counter(), start_step
    for step in range(start_step + 1, args.steps + 1):
        scheduler.step_update(step - 1)  # sets this update's lr
        k = int(torch.randint(k_range[0], k_range[1] + 1, (1,), generator=k_generator))
        micro_batches = [_to_device(next(batches), device) for _ in range(args.grad_accum)]
        losses = train_step(distiller, teacher, micro_batches, optimizer, k, autocast, scaler, args.clip_grad)
        progress.update(1)
        if step % args.log_every == 0 or step == args.steps:
            values = _reduce_mean(losses, world_size)  # every process takes part
            toc = time.perf_counter()
            record = dict(step=step, **values, lr=optimizer.param_groups[0]['lr'], k=k,
                          images_per_sec=images_per_step * (step - tic_step) / (toc - tic))
            tic, tic_step = toc, step
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f'non-finite loss at step {step}: {values}')
            if is_main:
                with open(metrics_path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                progress.set_postfix(
                    loss=f"{values['loss']:.4f}", cls=f"{values['loss_cls']:.4f}", patch=f"{values['loss_patch']:.4f}",
                    map=f"{values['loss_map']:.4f}", k=k, img_s=f"{record['images_per_sec']:.1f}")
        if isinstance(teacher, TeacherTargetCache) and (step % args.save_every == 0 or step == args.steps):
            teacher.flush()
        if is_main and (step % args.save_every == 0 or step == args.steps):
            state = _checkpoint(step, student, optimizer, scaler, k_generator, args, world_size)
            _save(state, os.path.join(args.output, 'last.pth'))
            if args.keep_every and step % args.keep_every == 0:
                _save(state, os.path.join(args.output, f'checkpoint-{step}.pth'))
    progress.close()


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group('models')
    group.add_argument('--teacher', default='vit_base_patch14_reg4_dinov2',
                       help='timm ViT to distil from (default: %(default)s)')
    group.add_argument('--teacher-checkpoint', default=None, metavar='FILE',
                       help="teacher weights (.pth / .safetensors); default: the teacher's timm weights from the Hub")
    group.add_argument('--teacher-random-init', action='store_true',
                       help='random teacher, for benchmarking the step time only')
    group.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra timm.create_model arguments for the teacher, key=value')
    group.add_argument('--attn-queries', default='patch', choices=('patch', 'cls'),
                       help="teacher attention queries averaged for the map target: 'patch' (DINOv2 config) "
                            "or 'cls' (Franca config)")
    group.add_argument('--model', default='lookwhere_vitb_518', help='LookWhere architecture (default: %(default)s)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra timm.create_model arguments for the student, key=value')
    group.add_argument('--img-size', type=int, default=None, help="high-res image side (default: the model's, 518)")
    group.add_argument('--drop-path', type=float, default=0., help='student drop-path rate (default: 0)')
    group.add_argument('--grad-checkpointing', action='store_true', help="checkpoint the extractor's blocks")

    group = parser.add_argument_group('data')
    group.add_argument('--data-dir', default=None, help='dataset root, e.g. an ImageNet folder')
    group.add_argument('--dataset', default='', help="timm create_dataset name: '' (image folder), hfds/NAME, "
                                                     'wds/NAME, tfds/NAME, hfids/NAME')
    group.add_argument('--train-split', default='train', help='dataset split (default: %(default)s)')
    group.add_argument('--no-aug', action='store_true', help='resize only: no crop, RandAugment, flips or erasing')
    group.add_argument('--teacher-cache', default=None, metavar='DIR',
                       help="with --no-aug: keep each image's teacher targets in DIR (float32, about "
                            "4 * (patches + 1) * width bytes per image) and compute them only once")
    group.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('MIN', 'MAX'),
                       help='RandomResizedCrop area range (default: 0.08 1.0)')
    group.add_argument('--workers', type=int, default=4, help='data loading processes per process (default: 4)')

    group = parser.add_argument_group('objective')
    group.add_argument('--k-min', type=int, default=None, help='fewest patches per step (default: 16 at 518 px, '
                                                               'scaled with the grid)')
    group.add_argument('--k-max', type=int, default=None, help='most patches per step (default: 128 at 518 px, '
                                                               'scaled with the grid)')
    group.add_argument('--cls-weight', type=float, default=LOSS_WEIGHTS['cls'])
    group.add_argument('--patch-weight', type=float, default=LOSS_WEIGHTS['patch'])
    group.add_argument('--map-weight', type=float, default=LOSS_WEIGHTS['map'])

    group = parser.add_argument_group('optimisation')
    group.add_argument('--batch-size', type=int, default=64, help='images per process per micro-step (default: 64)')
    group.add_argument('--grad-accum', type=int, default=1, help='micro-steps per update (default: 1)')
    group.add_argument('--steps', type=int, default=500_000, help='optimiser updates (default: 500000)')
    group.add_argument('--lr', type=float, default=1e-4, help='peak learning rate (default: 1e-4)')
    group.add_argument('--warmup-steps', type=int, default=50_000, help='linear warm-up updates (default: 50000)')
    group.add_argument('--warmup-lr', type=float, default=1e-7, help='learning rate at step 0 (default: 1e-7)')
    group.add_argument('--min-lr', type=float, default=1e-6, help='learning rate at the end (default: 1e-6)')
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999))
    group.add_argument('--opt-eps', type=float, default=1e-8)
    group.add_argument('--clip-grad', type=float, default=None, help='gradient norm clip (default: none)')
    group.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 by default, also on CPU)')
    group.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))

    group = parser.add_argument_group('run')
    group.add_argument('--output', required=True, help='folder for last.pth, metrics.jsonl, args.json')
    group.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                       help='continue from CHECKPOINT (default: OUTPUT/last.pth) exactly where it stopped')
    group.add_argument('--log-every', type=int, default=10, help='steps between metrics records (default: 10)')
    group.add_argument('--save-every', type=int, default=1000, help='steps between saves of last.pth (default: 1000)')
    group.add_argument('--keep-every', type=int, default=0,
                       help='also keep OUTPUT/checkpoint-STEP.pth every this many steps (default: 0, never)')
    group.add_argument('--device', default=None, help='cpu, cuda, ... (default: cuda if available)')
    group.add_argument('--seed', type=int, default=0)
    return parser


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'distill', help='pre-train a LookWhere model by what-where distillation from a timm ViT',
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=train)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m timm_lookwhere.distill', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    return train(args)


if __name__ == '__main__':
    sys.exit(main())
