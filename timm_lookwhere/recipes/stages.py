"""What every recipe shares: its command line, its run folder, stages that resume, and the training machinery.

A recipe (`Recipe`) is a list of stages, each writing its output into one run folder; a stage whose output
exists is skipped, a stopped one continues from its saved training state onto the same batches, and each
stage's wall time is added to OUTPUT/timings.json. The folder is the run's alone while it runs (its writer lock,
`timm_lookwhere.files.RunFolder`), and OUTPUT/run.json keeps the settings the run was started with: started
again with other settings, a run is refused, as every `--set` value outside what its setting takes is.
"""
import argparse
import ast
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from tqdm import tqdm

import timm
from ..cost import count_flops
from ..distillation import warmup_cosine_scheduler
from ..files import RunFolder, RunFolderError, replacing, setting_changes, writer_lock
from ..teachers import dense_counterpart_kwargs

__all__ = [
    'progress_bar', 'normalize', 'gflops', 'run_logged', 'write_json', 'save', 'load_training_state',
    'save_training_state', 'train_steps', 'fit', 'random_indices', 'cached_split', 'equal_cost_size', 'export_fp16',
    'Rule', 'count', 'step_count', 'number', 'share_range', 'int_range', 'choice', 'text', 'kwargs', 'lookwhere_model',
    'same_architecture', 'parse_settings',
    'Recipe', 'RUN_RECORD', 'read_run', 'run_stage', 'read_timings', 'run_stages', 'run_evaluation',
]

_logger = logging.getLogger('timm_lookwhere.recipes')

RUN_RECORD = 'run.json'  # in OUTPUT: --config, --tiny and the --set overrides the run was started with
LOG_FORMAT = '%(asctime)s %(message)s'
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------
# progress, files, costs


class _LogLines:
    """A file for tqdm that hands each refreshed bar to the recipe's log as a line: the console and OUTPUT/run.log
    show where a stage is, how fast it goes and how long it has left."""

    def write(self, text: str) -> None:
        text = text.strip('\r\n ')
        if text:
            _logger.info(text)

    def flush(self) -> None:
        pass


def progress_bar(stage: str, total: int, done: int = 0, every: float = 30.) -> tqdm:
    """tqdm's bar of a stage's `total` steps (`done` of them before this launch), logged at most every `every`
    seconds and at the end."""
    return tqdm(total=total, initial=done, desc=stage, unit='step', file=_LogLines(), mininterval=every,
                bar_format='{desc}: step {n}/{total} [{elapsed} so far, {remaining} left, {rate_fmt}{postfix}]')


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float."""
    return (x.float() / 255 - MEAN) / STD


def gflops(model: nn.Module, img_size: int) -> float:
    """Forward GFLOPs of one image, attention included."""
    return count_flops(model.eval(), torch.randn(1, 3, img_size, img_size)) / 1e9


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


def write_json(path: str, value: Any) -> None:
    with replacing(path) as tmp, open(tmp, 'w') as f:
        json.dump(value, f, indent=2)


def save(value: Any, path: str) -> None:
    """torch.save that leaves the previous file (or none) when stopped: a stage's output is whole or absent."""
    with replacing(path) as tmp:
        torch.save(value, tmp)


def export_fp16(state_path: str, path: str, metadata: Dict[str, str]) -> None:
    """A stage's saved state dict as fp16 safetensors (half the file; what the benchmark measures), whole or absent."""
    state = torch.load(state_path, map_location='cpu', weights_only=True)
    state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    _logger.info(f'exported {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.2f} MB')


def ship(files: Dict[str, str]) -> None:
    """Copy each export (source -> the package's weights file) into the package, whence its pretrained tag loads."""
    for source, target in files.items():
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        _logger.info(f'shipped {target}')


# --------------------------------------------------------------------------------------------
# cached scenes


def cached_split(
        files: Dict[str, Tuple[str, Tuple[int, ...]]],
        done: str,
        loader: Callable[[], Iterable[Sequence[torch.Tensor]]],
        kept: Sequence[str] = (),
        what: str = 'data',
) -> Dict[str, torch.Tensor]:
    """A split of generated scenes from its cache, written first if missing.

    Each batch of `loader()` holds the items of `files` (name -> (uint8 file, shape)), in that order, then those
    of `kept`. The first are memory-mapped files (20 000 scenes of 512 px are 16 GB: batches read only what they
    draw, and the page cache keeps what fits); the others (labels, boxes) are saved together in `done`, written
    last, so a split whose `done` exists is whole (an empty file when nothing is kept). The cache's folder is
    locked while it is written: runs may share it (--share-from), and taking the lock removes the partial files
    of a killed writer.
    """
    folder = os.path.dirname(done)
    if not os.path.exists(done):
        with writer_lock(folder):
            if not os.path.exists(done):  # not written meanwhile by the run that held the lock
                _write_split(files, done, loader, kept, what)
    # copy-on-write: torch wants a writable array; nothing writes to it, and the files never change
    split = {name: torch.from_numpy(np.memmap(path, dtype=np.uint8, mode='c', shape=shape))
             for name, (path, shape) in files.items()}
    if kept:
        split.update(torch.load(done, weights_only=True))
    return split


def _write_split(files: Dict[str, Tuple[str, Tuple[int, ...]]], done: str,
                 loader: Callable[[], Iterable[Sequence[torch.Tensor]]], kept: Sequence[str], what: str) -> None:
    batches = loader()
    progress = progress_bar(what, len(batches))
    small: Dict[str, List[torch.Tensor]] = {name: [] for name in kept}
    with contextlib.ExitStack() as stack:
        arrays = {name: np.memmap(stack.enter_context(replacing(path)), dtype=np.uint8, mode='w+', shape=shape)
                  for name, (path, shape) in files.items()}
        start = 0
        for step, batch in enumerate(batches, start=1):
            for array, items in zip(arrays.values(), batch):
                array[start:start + len(items)] = items.numpy()
            for name, items in zip(kept, batch[len(arrays):]):
                small[name].append(items)
            start += len(batch[0])
            progress.update(1)
        progress.close()
        for array in arrays.values():
            array.flush()
        del arrays  # closes the maps before the files are renamed
    with replacing(done) as tmp:
        if kept:
            torch.save({name: torch.cat(items) for name, items in small.items()}, tmp)
        else:
            open(tmp, 'w').close()


def random_indices(num: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless (batch_size,) indices of `num` items drawn at random with `generator`, in file order: the
    memory-mapped cache reads forward."""
    while True:
        yield torch.randint(num, (batch_size,), generator=generator).sort().values


# --------------------------------------------------------------------------------------------
# training


def load_training_state(state_path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        generators: Sequence[torch.Generator]) -> int:
    """A stopped stage's weights, optimiser and batch generators back in place; the steps it had done (0: none)."""
    if not os.path.exists(state_path):
        return 0
    state = torch.load(state_path, weights_only=True)
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    for generator, rng in zip(generators, state['generators']):
        generator.set_state(rng)
    return state['step']


def save_training_state(state_path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        generators: Sequence[torch.Generator], step: int) -> None:
    """What `load_training_state` reads, written whole: the stage continues onto the same batches."""
    save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
              generators=[g.get_state() for g in generators]), state_path)


def train_steps(
        stage: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        batches: Iterator[tuple],
        steps: int,
        step_loss: Callable[[nn.Module, tuple], Tuple[torch.Tensor, Dict[str, float]]],
        state_path: str,
        generators: Sequence[torch.Generator] = (),
        before_step: Optional[Callable[[int], None]] = None,
        smoothing: float = 0.9,
        save_every_s: float = 300.,
) -> None:
    """`steps` updates of `model` on `step_loss(model, batch)` -> (loss, metrics to show), gradients clipped at
    norm 1; progress shows running averages (`smoothing`). Every `save_every_s` seconds and at the end the
    weights, the optimiser and the random `generators` that draw the batches go to `state_path`, from which a
    stopped stage continues onto the same batches; a finished one is only reloaded. A loss that is not finite
    stops the stage (FloatingPointError) before it updates or saves anything."""
    done = load_training_state(state_path, model, optimizer, generators)
    if done:
        _logger.info(f'{stage}: continuing after step {done} of {steps} ({state_path})')
    params = [p for p in model.parameters() if p.requires_grad]
    progress = progress_bar(stage, steps, done)
    averages: Dict[str, float] = {}
    last_save = time.perf_counter()
    model.train()
    for step in range(done + 1, steps + 1):
        batch = next(batches)
        scheduler.step_update(step - 1)
        if before_step is not None:
            before_step(step)
        loss, metrics = step_loss(model, batch)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f'{stage}: the training loss is {loss.item()} at step {step} of {steps} (lr '
                f"{optimizer.param_groups[0]['lr']:.3g}); the stage stopped and saved nothing of this step. Lower "
                f'its lr or check the settings (--set); {state_path} holds the last good state')
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in dict(loss=loss.item(), **metrics).items():
            averages[name] = value if name not in averages else smoothing * averages[name] + (1 - smoothing) * value
        progress.set_postfix({**{k: f'{v:.4g}' for k, v in averages.items()},
                              'lr': f"{optimizer.param_groups[0]['lr']:.3g}"}, refresh=False)
        progress.update(1)
        if step == steps or time.perf_counter() - last_save > save_every_s:
            save_training_state(state_path, model, optimizer, generators, step)
            last_save = time.perf_counter()
    progress.close()
    model.eval()


def fit(
        stage: str,
        model: nn.Module,
        batches: Iterator[tuple],
        steps: int,
        lr: float,
        step_loss: Callable[[nn.Module, tuple], Tuple[torch.Tensor, Dict[str, float]]],
        state_path: str,
        generators: Sequence[torch.Generator] = (),
        before_step: Optional[Callable[[int], None]] = None,
        param_groups: Optional[List[Dict[str, Any]]] = None,
        weight_decay: float = 0.05,
        smoothing: float = 0.9,
        save_every_s: float = 300.,
) -> None:
    """AdamW with a warm-up of a tenth of the steps then cosine to lr / 100 (timm's optimizer, the project's
    scheduler), on `step_loss`, resumable (`train_steps`). `param_groups` (e.g. a new head at a larger lr) are
    decayed as given; without them timm leaves biases and norms undecayed."""
    optimizer = create_optimizer_v2(model if param_groups is None else param_groups, 'adamw', lr=lr,
                                    weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    scheduler = warmup_cosine_scheduler(optimizer, steps, warmup, warmup_lr=lr / 100, min_lr=lr / 100)
    train_steps(stage, model, optimizer, scheduler, batches, steps, step_loss, state_path, generators, before_step,
                smoothing=smoothing, save_every_s=save_every_s)


def equal_cost_size(lookwhere: nn.Module, img_size: int, patch: int, max_size: int,
                    low_res_model: Callable[[int], nn.Module], at_k: str) -> int:
    """The low-res side (a multiple of the patch, 2 patches to `max_size`) whose model, `low_res_model(side)` on a
    full-size image, costs about what `lookwhere` costs (at k `at_k`): the baseline at equal cost."""
    target = gflops(lookwhere, img_size)
    sizes = list(range(2 * patch, max_size + 1, patch))
    costs = [gflops(low_res_model(s), img_size) for s in sizes]
    best = min(range(len(sizes)), key=lambda i: abs(math.log(costs[i] / target)))
    _logger.info(f'low-res ViT: {sizes[best]} px costs {costs[best]:.4f} GFLOPs, LookWhere at {at_k} {target:.4f}')
    return sizes[best]


# --------------------------------------------------------------------------------------------
# settings: what each field of a recipe's configuration takes


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a setting takes: `convert(value)` gives the setting (a list as a tuple, an int as a float where a
    number is wanted) or raises ValueError; `must` says it in words for the message."""
    must: str
    convert: Callable[[Any], Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _checked(ok: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(value)
        return convert(value)
    return check


def count(low: int = 1) -> Rule:
    """An integer of at least `low` (scenes, images, batch sizes, runs, seeds)."""
    return Rule(f'an integer >= {low}', _checked(lambda v: _is_int(v) and v >= low))


def step_count(none: bool = False) -> Rule:
    """Optimiser steps: at least 2, as the schedule warms up for max(1, a tenth) of them; 0 too with `none`."""
    return Rule('0 (none) or an integer >= 2' if none else 'an integer >= 2 (a tenth of the steps, at least one, '
                'warms up)', _checked(lambda v: _is_int(v) and (v >= 2 or (none and v == 0))))


def number(low: float = 0., high: Optional[float] = None, above: bool = False) -> Rule:
    """A finite number of at least `low` (above it with `above`) and at most `high`."""
    must = f'a number {">" if above else ">="} {low:g}' + (f' and <= {high:g}' if high is not None else '')
    return Rule(must, _checked(lambda v: _is_number(v) and (v > low if above else v >= low)
                               and (high is None or v <= high), float))


def _pair(value: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(item(v) for v in value)


def share_range(high: float = 1.) -> Rule:
    """(LOW, HIGH) shares with 0 < LOW <= HIGH <= `high`."""
    return Rule(f'(LOW, HIGH) with 0 < LOW <= HIGH <= {high:g}', _checked(
        lambda v: _pair(v, _is_number) and 0 < v[0] <= v[1] <= high, lambda v: tuple(float(x) for x in v)))


def int_range(low: int = 1) -> Rule:
    """(LOW, HIGH) integers with `low` <= LOW <= HIGH."""
    return Rule(f'(LOW, HIGH) integers with {low} <= LOW <= HIGH', _checked(
        lambda v: _pair(v, _is_int) and low <= v[0] <= v[1], tuple))


def choice(*values: Any) -> Rule:
    return Rule('one of ' + ', '.join(repr(v) for v in values), _checked(lambda v: v in values))


def text() -> Rule:
    return Rule('a string', _checked(lambda v: isinstance(v, str)))


def kwargs() -> Rule:
    """Keyword arguments, e.g. {'embed_dim': 32} (the architecture's own check follows, see Recipe.check_config)."""
    return Rule("a dict of keyword arguments, e.g. {'depth': 2}",
                _checked(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)))


def lookwhere_model() -> Rule:
    names = timm.list_models('lookwhere_*')
    return Rule('a LookWhere architecture: ' + ', '.join(names), _checked(lambda v: v in names))


def same_architecture(model: nn.Module, shipped: str) -> Optional[str]:
    """Why the shipped model `shipped` (NAME.TAG) cannot start `model` (a LookWhere), or None when it can: its
    blocks must have the same sizes."""
    def kept(m: nn.Module) -> Dict[str, Any]:
        return {k: v for k, v in dense_counterpart_kwargs(m).items() if k not in ('img_size', 'num_classes')}
    theirs = kept(timm.create_model(shipped.split('.')[0], weight_init='skip'))
    ours = kept(model)
    differ = [f'{k}={theirs[k]!r} (here {ours.get(k)!r})' for k in theirs if theirs[k] != ours.get(k)]
    if differ:
        return f'a shipped model with the blocks trained here; {shipped} has ' + ', '.join(differ)
    return None


def parse_settings(cfg: Any, pairs: Sequence[str], rules: Dict[str, Rule]) -> Tuple[Any, Dict[str, Any]]:
    """`key=value` pairs (python literals, else plain strings) -> the configuration (any recipe's dataclass) with
    those fields replaced, and the overrides as given; a ValueError naming the key, the value and what the key
    takes for the first that does not fit."""
    fields = [f.name for f in dataclasses.fields(cfg)]
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep and key in fields:
            raise ValueError(f'--set {pair}: give it a value, {key}=VALUE')
        if key not in fields:
            raise ValueError(f'--set takes KEY=VALUE with a KEY of {", ".join(fields)}; got {pair!r}')
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        try:
            overrides[key] = rules[key].convert(value)
        except ValueError:
            raise ValueError(f'--set {pair}: {key} must be {rules[key].must}, got {value!r}') from None
    return dataclasses.replace(cfg, **overrides), overrides


# --------------------------------------------------------------------------------------------
# a recipe: command line, run folder, stages


@dataclasses.dataclass
class Recipe:
    """A recipe's command line and run: its configurations, its stages in order, and what checks its settings.

    `main(argv)` checks the arguments and every setting (an error is argparse's: PROG: error: ..., exit 2), takes
    the run folder (refused while another run writes there, or when it holds a run with other settings), then
    runs the stages asked for, skipping those done, and ships the exports with --ship.
    """
    prog: str  # the command that runs it
    description: str
    configs: Dict[str, Dict[str, Any]]  # --config NAME -> {'full': RunConfig, 'tiny': RunConfig}; one NAME: no --config
    outputs: Dict[str, Callable[[str, Any], str]]  # each stage, in its order: (OUTPUT, cfg) -> the file it ends with
    runners: Dict[str, Callable[[argparse.Namespace, Any], None]]  # each stage: (args, cfg) -> None
    rules: Dict[str, Rule]  # what each field of the RunConfig takes
    create_model: Callable[[Any], nn.Module]  # the LookWhere a configuration trains (initialisation skipped)
    check_config: Callable[[Any, nn.Module], List[Tuple[str, str]]]  # (cfg, model) -> [(setting, what it must be)]
    shipped: Callable[[str, Any], Dict[str, str]]  # (OUTPUT, cfg) -> {export: the package file --ship copies it to}
    benchmark: str  # the evaluation, a script of the source tree
    set_example: str  # a lever, for --help
    default: Optional[str] = None  # the --config without one (default: the first)
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None  # the recipe's own arguments
    check_arguments: Callable[[argparse.ArgumentParser, argparse.Namespace], None] = lambda parser, args: None
    before_stages: Callable[[argparse.Namespace, Any], None] = lambda args, cfg: None  # in the held folder

    @property
    def stages(self) -> Tuple[str, ...]:
        return tuple(self.outputs)

    @property
    def default_config(self) -> str:
        return self.default or next(iter(self.configs))

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        group = parser.add_argument_group('run')
        group.add_argument('--output', required=True, metavar='DIR',
                           help='folder for every stage output, run.log and timings.json')
        if len(self.configs) > 1:
            group.add_argument('--config', default=self.default_config, choices=sorted(self.configs),
                               help='scene size (default: %(default)s)')
        group.add_argument('--tiny', action='store_true', help='a tiny model and a few steps: checks the code only')
        group.add_argument('--stages', default=','.join(self.stages),
                           help='comma-separated subset of ' + ','.join(self.stages))
        group.add_argument('--redo', action='store_true', help='run the stages given even when their output exists')
        group.add_argument('--ship', action='store_true',
                           help='copy the exported weights into timm_lookwhere/weights (the pretrained tag loads them)')
        group = parser.add_argument_group('levers')
        group.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                           help='change settings of the configuration (a lever, in a folder of its own), e.g. '
                                + self.set_example)
        self.add_arguments(group)
        group = parser.add_argument_group('machine')
        group.add_argument('--workers', type=int, default=2, help='scene-generating processes (default: 2)')
        group.add_argument('--threads', type=int, default=2,
                           help='torch threads (default: 2; training reads cached scenes, so the cores are free)')
        return parser

    def parse_args(self, argv: Optional[Sequence[str]] = None,
                   parser: Optional[argparse.ArgumentParser] = None) -> Tuple[argparse.Namespace, Any, Dict[str, Any]]:
        """The arguments, the configuration they give and the run's record (run.json), every setting checked."""
        parser = parser or self.parser()
        args = parser.parse_args(argv)
        unknown = set(args.stages.split(',')) - set(self.stages)
        if unknown:
            parser.error(f'unknown stages {sorted(unknown)}; choose from {self.stages} (the evaluation is '
                         f'{self.benchmark} in the source tree)')
        if args.ship and (args.tiny or args.set):
            parser.error('--ship copies weights into the package: only from a full run of a configuration as it is')
        if args.workers < 0:
            parser.error(f'--workers must be >= 0, got {args.workers}')
        if args.threads < 1:
            parser.error(f'--threads must be >= 1, got {args.threads}')
        self.check_arguments(parser, args)
        config = getattr(args, 'config', self.default_config)
        try:
            cfg, overrides = parse_settings(self.configs[config]['tiny' if args.tiny else 'full'], args.set, self.rules)
        except ValueError as err:
            parser.error(str(err))
        with torch.random.fork_rng(devices=[]):  # the checks build models: the stages' random numbers stay as they were
            misfits = self.check_settings(cfg)
        for key, must in misfits:
            parser.error(f'--set {key}={getattr(cfg, key)!r}: {key} must be {must}')
        record = dict(tiny=args.tiny, overrides=overrides)
        if len(self.configs) > 1:
            record = dict(config=config, **record)
        return args, cfg, record

    def check_settings(self, cfg: Any) -> List[Tuple[str, str]]:
        """The settings of `cfg` that do not fit the others, [(setting, what it must be)]: the model must build from
        them and take `img_size` images, then the recipe's own checks (`check_config`)."""
        try:
            model = self.create_model(cfg)
        except Exception as err:  # the architecture's own checks, whatever they raise
            return [('model_kwargs', f'arguments {cfg.model} takes ({type(err).__name__}: {err})')]
        patch, side = model.patch_embed.patch_size[0], tuple(model.patch_embed.img_size)
        if cfg.img_size % patch:
            return [('img_size', f'a multiple of the {patch} px patch of {cfg.model}')]
        if side != (cfg.img_size, cfg.img_size):
            return [('img_size', f"the side {cfg.model} takes, {side[0]}: change both, e.g. img_size=N "
                                 f"model_kwargs={{'img_size': N}}")]
        return self.check_config(cfg, model)

    def config_of(self, record: Dict[str, Any]) -> Any:
        """The configuration a run's record (run.json) names: its --config, --tiny and --set."""
        config = self.configs[record.get('config', self.default_config)]['tiny' if record['tiny'] else 'full']
        return dataclasses.replace(config, **record['overrides'])

    def run_config(self, output: str) -> Any:
        """The configuration the recipe run in `output` used."""
        return self.config_of(read_run(output, self.prog))

    def check_record(self, output: str, recorded: Dict[str, Any], record: Dict[str, Any]) -> None:
        """Refuse a run whose settings differ from those its folder's run was started with: --config, --tiny, and
        each setting either run's --set names, as the two configurations hold it."""
        recorded = dict(recorded, overrides=_tuples(recorded.get('overrides', {})))
        old, new = self.config_of(recorded), self.config_of(record)
        names = [f.name for f in dataclasses.fields(old) if f.name in {*recorded['overrides'], *record['overrides']}]

        def compared(rec: Dict[str, Any], cfg: Any) -> Dict[str, Any]:
            fixed = dict(config=rec.get('config', self.default_config), tiny=rec['tiny'])
            return dict(fixed, **{name: getattr(cfg, name) for name in names})

        setting_changes(
            compared(recorded, old), compared(record, new), show=_show_setting,
            refusal=f'{output} holds a run started with other settings ({RUN_RECORD}); they cannot change within a '
                    'run',
            way_out=f'Run it again with its settings ({os.path.join(output, RUN_RECORD)} lists them), or start a new '
                    'run in another --output.')

    def main(self, argv: Optional[Sequence[str]] = None) -> int:
        parser = self.parser()
        args, cfg, record = self.parse_args(argv, parser)
        with contextlib.ExitStack() as stack:
            try:  # before anything is written: the folder is this run's alone, and holds this run or none
                folder = stack.enter_context(RunFolder(args.output, RUN_RECORD))
                recorded = folder.read_record()
                if recorded is None:
                    folder.write_record(record)
                else:
                    self.check_record(args.output, recorded, record)
            except RunFolderError as err:
                parser.error(str(err))
            stack.enter_context(run_logging(args.output, args.threads))
            self.before_stages(args, cfg)
            try:
                run_stages(args, cfg, self.outputs, self.runners)
            except FloatingPointError as err:  # a diverged stage: its state stays, nothing is exported
                _logger.error(str(err))
                sys.exit(f'{self.prog}: error: {err}')
            if args.ship:
                ship(self.shipped(args.output, cfg))
        return 0


def _tuples(value: Any) -> Any:
    """JSON gives lists where a configuration holds tuples."""
    if isinstance(value, dict):
        return {key: _tuples(v) for key, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _show_setting(name: str, value: Any) -> str:
    if name == 'tiny':
        return '--tiny' if value else 'no --tiny'
    if name == 'config':
        return f'--config {value}'
    return f'--set {name}={value!r}'


@contextlib.contextmanager
def run_logging(output: str, threads: int) -> Iterator[None]:
    """While a run lasts: its log on the console and in OUTPUT/run.log, and `threads` torch threads (its
    subprocesses too, through OMP_NUM_THREADS); all as it was afterwards."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=LOG_FORMAT, stream=sys.stdout)
    level, saved_threads, saved_omp = root.level, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS')
    handler = logging.FileHandler(os.path.join(output, 'run.log'))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    if level > logging.INFO:  # the stages' progress is INFO
        root.setLevel(logging.INFO)
    torch.set_num_threads(threads)
    os.environ['OMP_NUM_THREADS'] = str(threads)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        torch.set_num_threads(saved_threads)
        if saved_omp is None:
            os.environ.pop('OMP_NUM_THREADS', None)
        else:
            os.environ['OMP_NUM_THREADS'] = saved_omp


def read_run(output: str, recipe: str) -> Dict[str, Any]:
    """What a recipe run in `output` was started with (run.json: --config, --tiny, the --set overrides as the
    configuration holds them)."""
    path = os.path.join(output, RUN_RECORD)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{output} holds no run of `{recipe}` ({path} is missing): train one with '
                                f'{recipe} --output {output}')
    with open(path) as f:
        run = json.load(f)
    run['overrides'] = _tuples(run['overrides'])
    return run


def run_stage(output: str, stage: str, done: str, runner: Callable[[], Any], redo: bool = False) -> None:
    """Run a stage unless its output `done` exists (or `redo`), and add its wall time to OUTPUT/timings.json."""
    if os.path.exists(done) and not redo:
        _logger.info(f'{stage}: done before ({done})')
        return
    _logger.info(f'{stage}: starting')
    start = time.perf_counter()
    runner()
    if done.endswith('done'):
        open(done, 'w').close()
    timings = read_timings(output)
    timings[stage] = timings.get(stage, 0) + time.perf_counter() - start
    write_json(os.path.join(output, 'timings.json'), timings)
    _logger.info(f'{stage}: finished in {timings[stage] / 60:.1f} min')


def read_timings(output: str) -> Dict[str, float]:
    """Seconds of wall time of each stage run in `output` so far (OUTPUT/timings.json)."""
    path = os.path.join(output, 'timings.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_stages(args: argparse.Namespace, cfg: Any, outputs: Dict[str, Callable], runners: Dict[str, Callable]) -> None:
    """The stages `args.stages` names, in the recipe's order, each skipped where its output exists (unless
    --redo); then the wall time of all of them."""
    wanted = args.stages.split(',')
    for stage in outputs:
        if stage in wanted:
            run_stage(args.output, stage, outputs[stage](args.output, cfg), lambda: runners[stage](args, cfg),
                      args.redo)
    _logger.info(f'wall time of the stages run here: {sum(read_timings(args.output).values()) / 60:.1f} min '
                 f"({os.path.join(args.output, 'timings.json')})")


def run_evaluation(args: argparse.Namespace, run_config: Callable[[str], Any], evaluate: Callable) -> None:
    """A benchmark's evaluation of the recipe run in `args.output`, timed as one more stage (skipped once its
    results.json exists, unless --redo), in the held run folder."""
    try:
        cfg = run_config(args.output)
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e}') from None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(RunFolder(args.output, RUN_RECORD))
        except RunFolderError as e:
            raise SystemExit(f'error: {e}') from None
        stack.enter_context(run_logging(args.output, args.threads))
        run_stage(args.output, 'evaluate', os.path.join(args.output, 'results.json'), lambda: evaluate(args, cfg),
                  args.redo)
