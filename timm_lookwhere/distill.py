"""`lookwhere distill`: the command line that pre-trains a LookWhere model by what-where distillation.

The selector and extractor learn from a frozen timm ViT (the objective and its parts are in
`timm_lookwhere.distillation`, the authors' recipe in PyTorch):

    loss = 1.0 * MSE(cls) + 1.0 * MSE(filled patches) + 0.1 * KL(softmax(teacher attention) || softmax(map))

with k drawn per step from [k_min, k_max] (16..128 at 518 px), the student starting as a copy of the teacher.

    python -m timm_lookwhere.distill --teacher vit_base_patch14_reg4_dinov2 --model lookwhere_vitb_518 \\
        --data-dir /data/imagenet --output runs/lw
    torchrun --nproc_per_node 8 -m timm_lookwhere.distill ...   # DDP, same code path

A run writes OUTPUT/last.pth, metrics.jsonl and args.json, and holds OUTPUT/lock while it runs: a
second run on the same OUTPUT is refused. Stopped at any moment (even killed), it continues with
`--resume` exactly where its last save left it; a changed argument is either honoured from the
resumed step on (schedule, length, cadence, devices) or refused (model, teacher, objective, data).
Arguments that make no run end as argparse's errors do (`lookwhere distill: error: ...`, exit 2), and
write nothing into OUTPUT.
"""
import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from huggingface_hub.errors import LocalEntryNotFoundError
from tqdm import tqdm

import timm
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.layers import to_2tuple
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.utils import NativeScaler, ParseKwargs, unwrap_model
from timm.utils.distributed import init_distributed_device_so

from .augment import create_train_transform
from .distillation import (
    LOSS_WEIGHTS, DistillTeacher, Distiller, TeacherTargetCache, image_batches, init_student_from_teacher,
    resolve_k_range, train_step, warmup_cosine_scheduler,
)
from .checkpoints import read_weights_file
from .files import HONOURED, REFUSED, RunFolder, RunFolderError, replacing, setting_changes
from .lookwhere import LookWhere

__all__ = [
    'RESUME_POLICY', 'UsageError', 'create_student', 'create_teacher_for_student', 'create_data', 'train',
    'add_arguments', 'add_subcommand', 'main',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1

# What `--resume` does with an argument given a value other than the run's. Honoured: applied from the
# resumed step on, and recorded (args.json, the checkpoint's `argument_changes`). Refused: an error,
# as the run would turn into another experiment under the same name, or could not continue at all.
RESUME_POLICY: Dict[str, Tuple[str, str]] = dict(
    teacher=(REFUSED, "the teacher's tokens and attention are what the student learns"),
    teacher_checkpoint=(HONOURED, "a moved file is fine: the teacher's weights themselves are compared "
                                  "(sha256), and other weights are refused"),
    teacher_random_init=(HONOURED, "as --teacher-checkpoint: refused unless the teacher's weights are the same"),
    teacher_kwargs=(REFUSED, "the teacher's architecture, hence its targets"),
    attn_queries=(REFUSED, "the selector's target map"),
    model=(REFUSED, "the student's architecture: the checkpoint's tensors fit it only"),
    model_kwargs=(REFUSED, "the student's architecture: the checkpoint's tensors fit it only"),
    img_size=(REFUSED, "the student's and the teacher's grid: the checkpoint's tensors fit it only"),
    drop_path=(REFUSED, "part of the student's definition (stochastic depth)"),
    grad_checkpointing=(HONOURED, 'memory only: the same results'),
    data_dir=(REFUSED, 'the data stream: a resumed run continues on the exact next batch of the same images '
                       '(a moved folder resumes through a link at the old path)'),
    dataset=(REFUSED, 'the data stream'),
    train_split=(REFUSED, 'the data stream'),
    no_aug=(REFUSED, "every sample's augmentation"),
    scale=(REFUSED, "every sample's augmentation"),
    teacher_cache=(HONOURED, 'where the targets are kept, not what they are (a cache refuses another '
                             'teacher or other data itself)'),
    workers=(HONOURED, "a sample's augmentation depends on its seed only: any number of workers gives the "
                       'same batches'),
    k_min=(REFUSED, 'the objective: how many patches the student sees per step'),
    k_max=(REFUSED, 'the objective: how many patches the student sees per step'),
    cls_weight=(REFUSED, 'the objective: the logged losses would change meaning mid-run'),
    patch_weight=(REFUSED, 'the objective: the logged losses would change meaning mid-run'),
    map_weight=(REFUSED, 'the objective: the logged losses would change meaning mid-run'),
    batch_size=(REFUSED, "the images per step and the run's place in the data stream"),
    grad_accum=(REFUSED, "the images per step and the run's place in the data stream"),
    seed=(REFUSED, "the data order, every sample's augmentation and every step's k"),
    steps=(HONOURED, 'train longer (or shorter, not below the checkpoint): the schedule is rebuilt for the '
                     'new length, so the lr moves to where the new cosine is'),
    lr=(HONOURED, 'the schedule is rebuilt from the new values; metrics.jsonl logs every step\'s lr'),
    warmup_steps=(HONOURED, 'the schedule is rebuilt from the new values'),
    warmup_lr=(HONOURED, 'the schedule is rebuilt from the new values'),
    min_lr=(HONOURED, 'the schedule is rebuilt from the new values'),
    weight_decay=(HONOURED, "set on the optimiser after its state (moments, step counts) is restored"),
    betas=(HONOURED, "set on the optimiser after its state (moments, step counts) is restored"),
    opt_eps=(HONOURED, "set on the optimiser after its state (moments, step counts) is restored"),
    clip_grad=(HONOURED, 'applies to the updates from the resumed step on'),
    amp=(HONOURED, 'numerics from the resumed step on (a --teacher-cache refuses other numerics itself)'),
    amp_dtype=(HONOURED, 'numerics from the resumed step on; a float16 loss scaler starts afresh if the run '
                         'had none'),
    output=(HONOURED, 'where the run writes: a copied run folder resumes in its new place'),
    resume=(HONOURED, 'how the run continues, not what it is'),
    log_every=(HONOURED, 'when to log'),
    save_every=(HONOURED, 'when to save'),
    keep_every=(HONOURED, 'when to save'),
    device=(HONOURED, 'checkpoints hold CPU tensors; another device may differ in the last bits'),
)
_PATH_ARGUMENTS = ('data_dir', 'teacher_checkpoint', 'teacher_cache', 'output')  # compared as absolute paths
ARGS_RECORD = 'args.json'  # in --output: the arguments the run now uses


class UsageError(ValueError):
    """Arguments that do not make a run (values, files, a checkpoint to resume): the command line reports it as
    argparse reports its own errors, `PROG: error: ...` with exit 2."""


# --------------------------------------------------------------------------------------------
# the run's parts, from its arguments


def create_student(args: argparse.Namespace) -> LookWhere:
    kwargs = dict(args.model_kwargs or {})
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    kwargs.update(num_classes=0, freeze_selector=False, drop_path_rate=args.drop_path)
    student = timm.create_model(args.model, **kwargs)
    if not isinstance(student, LookWhere):
        raise TypeError(f'--model must name a LookWhere architecture, {args.model} builds {type(student).__name__}')
    return student


def create_teacher_for_student(args: argparse.Namespace, student: LookWhere) -> VisionTransformer:
    """The run's teacher ViT (--teacher, --teacher-checkpoint, --teacher-kwargs) at the student's image size
    (timm resizes its position embeddings on load). `timm_lookwhere.create_teacher(name)` is another thing:
    the teacher a shipped LookWhere model was distilled from."""
    extra = dict(args.teacher_kwargs or {})
    size = tuple(student.patch_embed.img_size)
    if 'img_size' in extra and tuple(to_2tuple(extra['img_size'])) != size:
        raise ValueError(
            f'--teacher-kwargs img_size={extra["img_size"]} differs from the student\'s {size[0]}x{size[1]}: the '
            f'teacher sees the student\'s images on the same patch grid. Set both with --img-size')
    kwargs = dict(dict(num_classes=0, img_size=size), **extra)  # the classifier is never used: 0 unless asked
    if args.teacher_checkpoint:
        if not os.path.isfile(args.teacher_checkpoint):
            what = 'is a folder, not a weights file' if os.path.isdir(args.teacher_checkpoint) else 'does not exist'
            raise FileNotFoundError(f'--teacher-checkpoint {args.teacher_checkpoint} {what}')
        try:  # an empty, cut or foreign file is named here, not by a bare error from deep inside timm
            read_weights_file(args.teacher_checkpoint, mmap=True)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f'--teacher-checkpoint: {err}') from None
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
    try:
        dataset = create_dataset(
            args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
            batch_size=args.batch_size, seed=args.seed,
        )
    except RuntimeError as err:  # timm's image folder reader: 'Found 0 images in subfolders of ...'
        if args.dataset:
            raise
        raise ValueError(f'--data-dir {args.data_dir}: {err}') from None
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
    def flag(name: str) -> str:
        return '--' + name.replace('_', '-')

    at_least = dict(batch_size=1, steps=1, grad_accum=1, log_every=1, save_every=1, keep_every=0, workers=0)
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise UsageError(f'{flag(name)} must be >= {low}, got {getattr(args, name)}')
    if args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        raise UsageError(f'--warmup-steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}: '
                         f'give --warmup-steps below it (e.g. {args.steps // 10})')
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f'--lr must be positive, got {args.lr}')
    # a negative lr or decay would climb the loss, a clip at or below 0 would zero or flip the gradients
    for name in ('warmup_lr', 'min_lr', 'weight_decay', 'opt_eps'):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise UsageError(f'{flag(name)} must be >= 0, got {getattr(args, name)}')
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise UsageError(f'--clip-grad must be positive (leave it out for no clipping), got {args.clip_grad}')
    if not all(0 <= beta < 1 for beta in args.betas):
        raise UsageError(f'--betas must be in [0, 1), got {list(args.betas)}')
    if not 0 <= args.drop_path < 1:
        raise UsageError(f'--drop-path is a probability in [0, 1), got {args.drop_path}')
    if not 0 < args.scale[0] <= args.scale[1] <= 1:
        raise UsageError(f'--scale MIN MAX must be areas with 0 < MIN <= MAX <= 1, got {list(args.scale)}')
    if args.teacher_checkpoint and args.teacher_random_init:
        raise UsageError('give --teacher-checkpoint or --teacher-random-init, not both')
    if not args.data_dir and not args.dataset:
        raise UsageError('give --data-dir (an image folder) or --dataset (e.g. hfds/NAME, wds/NAME)')
    if args.data_dir and not args.dataset and not os.path.exists(args.data_dir):
        raise UsageError(f'--data-dir {args.data_dir} does not exist')
    if args.teacher_cache and not args.no_aug:
        raise UsageError('--teacher-cache keeps one set of targets per image, so it needs fixed inputs: add --no-aug')
    for name in ('output', 'teacher_cache'):
        path = getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f'{flag(name)} {path} is a file; give a folder (made if missing)')


# --------------------------------------------------------------------------------------------
# checkpoints, resuming and metrics (rank 0 writes)


def _args_record(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != 'func'}


def _kept_checkpoints(folder: str) -> List[str]:
    """OUTPUT/checkpoint-STEP.pth (--keep-every), newest first."""
    if not os.path.isdir(folder or '.'):
        return []
    kept = []
    for name in os.listdir(folder or '.'):
        match = re.fullmatch(r'checkpoint-(\d+)\.pth', name)
        if match:
            kept.append((int(match.group(1)), os.path.join(folder, name)))
    return [path for _, path in sorted(kept, reverse=True)]


def _other_checkpoints_hint(path: str) -> str:
    folder = os.path.dirname(path)
    kept = [p for p in _kept_checkpoints(folder) if os.path.abspath(p) != os.path.abspath(path)]
    where = folder or '.'
    if kept:
        return f'Resume from a checkpoint kept in {where} (newest first: {", ".join(kept)}) with --resume PATH.'
    return f'No checkpoint-STEP.pth is kept in {where} (--keep-every keeps them): start again in a new --output.'


def _load_checkpoint(path: str) -> Dict[str, Any]:
    if os.path.isdir(path):
        raise ValueError(
            f'--resume {path} is a folder; give a checkpoint in it (e.g. {os.path.join(path, "last.pth")}), '
            'or --resume alone for OUTPUT/last.pth')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume: no checkpoint at {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # its objects would run code; torch's advice to load them anyway is not ours
        raise ValueError(
            f'{path} is not a distillation checkpoint: it holds python objects besides tensors and plain values, '
            f'and was not loaded, since that would run code from the file. {_other_checkpoints_hint(path)}') from None
    except Exception as err:  # torch reports a cut or damaged file as any of several errors
        raise ValueError(
            f'checkpoint {path} is corrupt: torch cannot read it ({type(err).__name__}: '
            f'{str(err).split(". ")[0][:120] or "empty"}). {_other_checkpoints_hint(path)}') from None
    if not isinstance(state, dict) or 'optimizer' not in state or 'step' not in state:
        raise ValueError(f'{path} is not a distillation checkpoint (no optimizer state or step)')
    return state


def _comparable(name: str, value: Any) -> Any:
    if name in _PATH_ARGUMENTS and value:
        return os.path.abspath(value)
    return json.loads(json.dumps(value))  # (0.9, 0.999) from a default equals [0.9, 0.999] from the command line


def _resume_changes(state: Dict[str, Any], args: argparse.Namespace, path: str) -> Dict[str, List[Any]]:
    """The run's arguments that differ in `args`, as {name: [old, new]}: all honoured ones, or an error naming
    every refused one (RESUME_POLICY)."""
    names = [name for name in RESUME_POLICY if name != 'resume']
    changed = setting_changes(
        {name: state['args'][name] for name in names if name in state['args']},
        {name: getattr(args, name) for name in names}, RESUME_POLICY,
        show=lambda name, value: f'--{name.replace("_", "-")} {value!r}',
        same=lambda name, old, new: _comparable(name, old) == _comparable(name, new),
        refusal=f'--resume {path}: these arguments cannot change within a run',
        way_out=f"Resume with the run's values (its {ARGS_RECORD} lists them), or start a new run in another --output.")
    if args.steps < state['step']:
        raise ValueError(f"--steps {args.steps} is below the {state['step']} steps {path} has done")
    return changed


def _teacher_sha256(teacher: nn.Module) -> str:
    """A fingerprint of the teacher's weights: --resume refuses other ones under any file name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(f'{name} {tensor.dtype} {tuple(tensor.shape)}'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """The run's moments and step counts, under this invocation's lr, weight decay, betas and eps."""
    fresh = [{k: group[k] for k in ('lr', 'weight_decay', 'betas', 'eps') if k in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
        group.pop('initial_lr', None)  # the scheduler's peak lr: made anew from this --lr


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the records up to the resumed step: later ones were logged after the checkpoint, before a crash,
    and the resumed run logs those steps again. A line cut short by a kill mid-write goes too."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)['step'] <= step:
                kept.append(line.rstrip('\n') + '\n')
    with replacing(path) as tmp, open(tmp, 'w') as f:  # a kill mid-rewrite leaves the whole old log
        f.writelines(kept)


def _prepare_output(folder: RunFolder, args: argparse.Namespace, start_step: int) -> None:
    _truncate_metrics(os.path.join(args.output, 'metrics.jsonl'), start_step)
    folder.write_record(_args_record(args))


def _reduce_mean(values: Dict[str, torch.Tensor], world_size: int) -> Dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].float() for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)  # gloo has no AVG: sum, then divide
        stacked = stacked / world_size
    return dict(zip(names, stacked.tolist()))


@contextlib.contextmanager
def _output_folder(output: str, rank: int, distributed: bool, device: torch.device) -> Iterator[Optional[RunFolder]]:
    """Rank 0, the only writer, holds the output folder for the run's life (yielded; None on the other ranks);
    every rank stops if it is refused."""
    with contextlib.ExitStack() as stack:
        refusal, folder = None, None
        if rank == 0:
            try:
                folder = stack.enter_context(RunFolder(output, ARGS_RECORD))
            except RunFolderError as err:
                refusal = err
        if distributed:
            refused = torch.tensor([int(refusal is not None)], device=device)
            dist.broadcast(refused, src=0)
            if refused.item() and refusal is None:
                raise RunFolderError(f'{output}: rank 0 could not take it as the run folder (its error says why)')
        if refusal is not None:
            raise refusal
        yield folder


# --------------------------------------------------------------------------------------------
# the run


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


@dataclass
class DistillRun:
    """A distillation run's parts, and its loop from `start_step` to `--steps`: update, log, save."""
    args: argparse.Namespace
    distiller: nn.Module  # the student's forward and losses; DDP-wrapped on several processes
    targets: Union[DistillTeacher, TeacherTargetCache]  # the teacher's targets of a micro-batch
    optimizer: torch.optim.Optimizer
    scheduler: Any  # warmup_cosine_scheduler: step_update(n) sets the lr of update n + 1
    scaler: Optional[NativeScaler]  # float16 autocast only
    autocast: Callable[[], Any]  # a new autocast (or null) context per micro-batch
    batches: Iterator  # this process's micro-batches, from the resumed place in the stream on
    k_generator: torch.Generator  # each step's k, the same on every process
    k_range: Tuple[int, int]
    start_step: int  # updates done before this process started
    device: torch.device
    rank: int
    world_size: int
    teacher_sha256: str  # saved, so that --resume refuses another teacher
    argument_changes: List[Dict[str, Any]]  # each resume with honoured changes: its step, {name: [old, new]}
    _tic: Tuple[float, int] = field(default=(0., 0), init=False)  # (time, step) of the last record

    @property
    def student(self) -> LookWhere:
        return unwrap_model(self.distiller).student

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def images_per_step(self) -> int:
        return self.args.batch_size * self.args.grad_accum * self.world_size

    def run(self) -> None:
        steps = self.args.steps
        progress = tqdm(total=steps, initial=self.start_step, disable=not self.is_main, unit='step',
                        dynamic_ncols=True)
        self._tic = time.perf_counter(), self.start_step
        for step in range(self.start_step + 1, steps + 1):
            k, losses = self.update(step)
            progress.update(1)
            if step % self.args.log_every == 0 or step == steps:
                self.log(step, k, losses, progress)
            if step % self.args.save_every == 0 or step == steps:
                self.save(step)
        progress.close()

    def update(self, step: int) -> Tuple[int, Dict[str, torch.Tensor]]:
        self.scheduler.step_update(step - 1)  # sets this update's lr
        k = int(torch.randint(self.k_range[0], self.k_range[1] + 1, (1,), generator=self.k_generator))
        micro_batches = [_to_device(next(self.batches), self.device) for _ in range(self.args.grad_accum)]
        losses = train_step(self.distiller, self.targets, micro_batches, self.optimizer, k, self.autocast,
                            self.scaler, self.args.clip_grad)
        return k, losses

    def log(self, step: int, k: int, losses: Dict[str, torch.Tensor], progress: tqdm) -> None:
        values = _reduce_mean(losses, self.world_size)  # every process takes part
        toc = time.perf_counter()
        tic, tic_step = self._tic
        record = dict(step=step, **values, lr=self.optimizer.param_groups[0]['lr'], k=k,
                      images_per_sec=self.images_per_step * (step - tic_step) / (toc - tic))
        self._tic = toc, step
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f'non-finite loss at step {step}: {values}')
        if self.is_main:
            with open(os.path.join(self.args.output, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
            progress.set_postfix(
                loss=f"{values['loss']:.4f}", cls=f"{values['loss_cls']:.4f}", patch=f"{values['loss_patch']:.4f}",
                map=f"{values['loss_map']:.4f}", k=k, img_s=f"{record['images_per_sec']:.1f}")

    def save(self, step: int) -> None:
        if isinstance(self.targets, TeacherTargetCache):
            self.targets.flush()
        if not self.is_main:
            return
        state = self.checkpoint(step)
        paths = [os.path.join(self.args.output, 'last.pth')]
        if self.args.keep_every and step % self.args.keep_every == 0:
            paths.append(os.path.join(self.args.output, f'checkpoint-{step}.pth'))
        for path in paths:
            with replacing(path) as tmp:  # a kill mid-save leaves the previous checkpoint whole
                torch.save(state, tmp)

    def checkpoint(self, step: int) -> Dict[str, Any]:
        """Tensors and plain python only, so timm's weights_only loader reads it."""
        return dict(
            state_dict={k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            step=step,
            k_rng_state=self.k_generator.get_state(),
            arch=self.args.model,
            world_size=self.world_size,
            args=_args_record(self.args),
            teacher_sha256=self.teacher_sha256,
            argument_changes=self.argument_changes,
            version=CHECKPOINT_VERSION,
        )


def _resume_state(args: argparse.Namespace, world_size: int) -> Optional[Dict[str, Any]]:
    """The checkpoint to continue from, its arguments checked against `args`; None for a new run."""
    last_path = os.path.join(args.output, 'last.pth')
    if args.resume is None:
        if os.path.exists(last_path):
            raise ValueError(f'{last_path} exists: pass --resume to continue that run, or choose another --output')
        return None
    path = last_path if args.resume == 'auto' else args.resume
    state = _load_checkpoint(path)
    changed = _resume_changes(state, args, path)
    state['argument_changes'] = list(state.get('argument_changes', []))
    if changed:
        state['argument_changes'].append(dict(step=state['step'], changed=changed))
        listed = ', '.join(f'--{name.replace("_", "-")} {new!r} (was {old!r})' for name, (old, new) in changed.items())
        _logger.warning(f"Resuming after step {state['step']} with changed arguments, applied from here on: {listed}")
    if state['world_size'] != world_size:
        _logger.warning(f"Resuming on {world_size} processes, the run used {state['world_size']}: "
                        'the data order will differ from the original run.')
    return state


def _build_run(args: argparse.Namespace, device: torch.device, rank: int, world_size: int, distributed: bool,
               state: Optional[Dict[str, Any]]) -> DistillRun:
    """The student, teacher, optimiser, schedule and data of the run, restored from `state` if given."""
    torch.manual_seed(args.seed)  # the random map head: the same on every process
    student = create_student(args)
    k_range = resolve_k_range(student.num_patches, args.k_min, args.k_max)
    teacher = create_teacher_for_student(args, student)
    teacher_sha256 = _teacher_sha256(teacher)
    if state is not None and state.get('teacher_sha256', teacher_sha256) != teacher_sha256:
        raise ValueError(
            f"the teacher's weights differ from the run's (sha256 {teacher_sha256[:12]}..., the run had "
            f"{state['teacher_sha256'][:12]}...): they define what the student learns. Resume with the run's teacher "
            '(its args.json names it), or start a new run in another --output.')
    init_student_from_teacher(student, teacher)
    student.set_selector_trainable(True, head=True)
    if args.grad_checkpointing:
        student.set_grad_checkpointing()
    student.to(device).train()  # before the optimiser: its loaded state follows the parameters' device

    optimizer = create_optimizer_v2(
        student, opt='adamw', lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.opt_eps)
    autocast, scaler = _autocast(args, device)
    k_generator = torch.Generator().manual_seed(args.seed)  # the same k on every process
    start_step = 0
    if state is not None:
        student.load_state_dict(state['state_dict'])
        _load_optimizer_state(optimizer, state['optimizer'])
        if scaler is not None and state['scaler'] is not None:
            scaler.load_state_dict(state['scaler'])
        k_generator.set_state(state['k_rng_state'])
        start_step = state['step']
    scheduler = warmup_cosine_scheduler(optimizer, args.steps, args.warmup_steps, args.warmup_lr, args.min_lr)

    distill_teacher = DistillTeacher(teacher, args.attn_queries).to(device)
    distiller = Distiller(student, dict(cls=args.cls_weight, patch=args.patch_weight, map=args.map_weight))
    if distributed:
        # a zero loss weight leaves some parameters (e.g. the map head) without gradient
        unused = min(args.cls_weight, args.patch_weight, args.map_weight) == 0
        distiller = DistributedDataParallel(distiller, find_unused_parameters=unused)
    dataset, transform = create_data(args, student)
    targets = distill_teacher
    if args.teacher_cache:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError('--teacher-cache needs a map-style dataset (an image folder), not a streaming one')
        if distributed and rank != 0:
            dist.barrier()  # rank 0 creates the files, the others then open them
        targets = TeacherTargetCache(distill_teacher, args.teacher_cache, len(dataset), student.num_patches,
                                     student.embed_dim, _cache_description(args, student))
        if distributed and rank == 0:
            dist.barrier()
    batches = image_batches(
        dataset, transform, args.batch_size, args.workers, args.seed, start_step * args.grad_accum,
        world_size, rank, pin_memory=device.type == 'cuda', with_indices=bool(args.teacher_cache))
    return DistillRun(
        args=args, distiller=distiller, targets=targets, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        autocast=autocast, batches=batches, k_generator=k_generator, k_range=k_range, start_step=start_step,
        device=device, rank=rank, world_size=world_size, teacher_sha256=teacher_sha256,
        argument_changes=state['argument_changes'] if state is not None else [],
    )


def train(args: argparse.Namespace) -> int:
    """Run `lookwhere distill` with parsed arguments: check them, hold the output folder, resume or start, train.

    Arguments that do not make a run raise `UsageError` (or `files.RunFolderError` for the output folder: a file,
    or in use) before the first step; what fails later is a fault or a bug.
    """
    _validate_args(args)
    info = _distributed(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    device, rank, world_size = torch.device(info['device']), info['global_rank'], info['world_size']
    with _output_folder(args.output, rank, info['distributed'], device) as folder:
        try:  # the set-up reads every argument: its checks' errors name the argument
            state = _resume_state(args, world_size)
            run = _build_run(args, device, rank, world_size, info['distributed'], state)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from err
        del state  # the run holds copies of its tensors: free the memory
        if rank == 0 and run.start_step < args.steps:  # a finished run resumed has nothing to change there
            _prepare_output(folder, args, run.start_step)
            _logger.info(
                f'Distilling {args.teacher} into {args.model}: {run.student.num_patches} patches, k in '
                f'{list(run.k_range)}, {run.images_per_step} images per step on {world_size} process(es).')
        run.run()
        if info['distributed']:
            dist.barrier()
    if info['distributed']:
        dist.destroy_process_group()
    return 0


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
    group.add_argument('--output', required=True,
                       help='folder for last.pth, metrics.jsonl, args.json; its lock file keeps a second run out')
    group.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                       help='continue from CHECKPOINT (default: OUTPUT/last.pth) exactly where it stopped; '
                            'arguments that define the run (model, teacher, objective, data) must not change')
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
    parser.set_defaults(func=_command(parser))


def _command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """`train`, its argument errors reported as `parser` reports its own (PROG: error: ..., exit 2)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return train(args)
        except (UsageError, RunFolderError) as err:
            parser.error(str(err))
    return run


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m timm_lookwhere.distill', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    return _command(parser)(args)


if __name__ == '__main__':
    sys.exit(main())
