"""What-where distillation, the library: teach a LookWhere selector and extractor from a frozen timm ViT.

Its parts: the teacher's targets (an attention hook, a target cache), the student's initialisation from
the teacher, the losses, the update step, the learning-rate schedule, and a seeded image stream that
resumes onto the very same batches.

The authors released pre-training only for JAX/TPU; this is the same objective in PyTorch
(LOOKWHERE.md, their `imagenet_dinov2.yaml` / `imagenet_franca.yaml`):

    teacher (frozen, eval, full high-res image)  -> cls token, N patch tokens,
                                                    last-block attention logits over the N patches
    selector (low-res copy)                      -> (B, N) map logits, prefix tokens
    extractor (top-k of the selector's own map)  -> cls token, k patch tokens -> all N by inverse-distance fill
    loss = 1.0 * MSE(cls) + 1.0 * MSE(filled patches) + 0.1 * KL(softmax(teacher attention) || softmax(map))

k is drawn per step from [k_min, k_max] (16..128 at 518 px). The student starts as a copy of the
teacher: the extractor is the teacher, the selector its first blocks at low resolution.
`timm_lookwhere.distill` is the command line (`lookwhere distill`) that runs it.
"""
import contextlib
import json
import logging
import os
import random
from itertools import count
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from timm.data.dataset import IterableImageDataset
from timm.layers import Attention, resample_abs_pos_embed
from timm.models import named_apply
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from timm.scheduler import CosineLRScheduler, create_scheduler_v2
from timm.utils import NativeScaler, unwrap_model

from .dense import idw_fill
from .files import replacing
from .lookwhere import LookWhere

__all__ = [
    'LOSS_WEIGHTS', 'default_k_range', 'resolve_k_range', 'TeacherAttentionLogits', 'DistillTeacher',
    'TeacherTargetCache', 'check_teacher', 'init_student_from_teacher', 'distillation_losses', 'Distiller',
    'train_step', 'warmup_cosine_scheduler', 'SeededImageDataset', 'ResumableSampler', 'image_batches',
]

_logger = logging.getLogger(__name__)

LOSS_WEIGHTS = dict(cls=1.0, patch=1.0, map=0.1)  # the authors' distillation_losses
REFERENCE_K_RANGE = (16, 128)  # the authors' top_k_range at 518 px ...
REFERENCE_NUM_PATCHES = 37 * 37  # ... i.e. on a 37x37 grid


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
            with replacing(meta_path) as tmp, open(tmp, 'w') as f:
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
# learning-rate schedule


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int, warmup_lr: float,
                            min_lr: float) -> CosineLRScheduler:
    """Linear warm-up from `warmup_lr` to each param group's lr over `warmup_steps` updates, then cosine decay
    to `min_lr` at update `steps`, as the authors' optax schedule: timm's CosineLRScheduler counted in updates.

    Call `scheduler.step_update(n)` before update n + 1 to set its lr. The peak lr is each group's `initial_lr`,
    set from its `lr` when the scheduler is created (and kept if already there).
    """
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=steps - warmup_steps, warmup_epochs=warmup_steps, warmup_prefix=True,
        warmup_lr=warmup_lr, min_lr=min_lr, step_on_epochs=False, updates_per_epoch=1)
    return scheduler


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
