"""What every recipe shares: stages that resume, progress with time left, training state saved whole, run settings.

A recipe is a list of stages, each writing its output into one run folder; a stage whose output exists is
skipped, a stopped one continues from its saved training state onto the same batches, and each stage's wall
time is added to OUTPUT/timings.json. OUTPUT/run.json keeps the settings the run was started with.
"""
import argparse
import ast
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..cost import count_flops
from ..files import replacing

__all__ = [
    'Progress', 'gflops', 'run_logged', 'write_json', 'save', 'load_training_state', 'save_training_state',
    'train_steps', 'apply_overrides', 'start_run', 'read_run', 'run_stage', 'read_timings', 'run_stages',
    'check_stage_arguments', 'run_evaluation',
]

_logger = logging.getLogger('timm_lookwhere.recipes')


class Progress:
    """Logs a stage's step, loss, speed and time left at most every `every` seconds (and at the end)."""

    def __init__(self, stage: str, total: int, first: int = 1, every: float = 30.):
        self.stage, self.total, self.first, self.every = stage, total, first, every
        self.start = self.last = time.perf_counter()

    def update(self, step: int, **values: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and step != self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(1, step - self.first + 1) * (self.total - step)
        shown = ' '.join(f'{k} {v:.4g}' for k, v in values.items())
        _logger.info(f'{self.stage}: step {step}/{self.total} {shown} | {elapsed / 60:.1f} min, '
                     f'{eta / 60:.1f} min left')


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
    stopped stage continues onto the same batches; a finished one is only reloaded."""
    done = load_training_state(state_path, model, optimizer, generators)
    if done:
        _logger.info(f'{stage}: continuing after step {done} of {steps} ({state_path})')
    params = [p for p in model.parameters() if p.requires_grad]
    progress = Progress(stage, steps, first=done + 1)
    averages: Dict[str, float] = {}
    last_save = time.perf_counter()
    model.train()
    for step in range(done + 1, steps + 1):
        batch = next(batches)
        scheduler.step_update(step - 1)
        if before_step is not None:
            before_step(step)
        loss, metrics = step_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in dict(loss=loss.item(), **metrics).items():
            averages[name] = value if name not in averages else smoothing * averages[name] + (1 - smoothing) * value
        progress.update(step, **averages, lr=optimizer.param_groups[0]['lr'])
        if step == steps or time.perf_counter() - last_save > save_every_s:
            save_training_state(state_path, model, optimizer, generators, step)
            last_save = time.perf_counter()
    model.eval()


def apply_overrides(cfg: Any, pairs: Sequence[str]) -> Tuple[Any, Dict[str, Any]]:
    """`key=value` pairs (python literals) -> the configuration (any recipe's dataclass) with those fields
    replaced."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or key not in fields:
            raise ValueError(f'--set takes key=value with a key of {sorted(fields)}, got {pair!r}')
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a plain string
    return dataclasses.replace(cfg, **overrides), overrides


def start_run(output: str, threads: int) -> None:
    """Create the folder, log to the console and OUTPUT/run.log, and set the torch threads (subprocesses too)."""
    os.makedirs(output, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(output, 'run.log'))])
    torch.set_num_threads(threads)
    os.environ['OMP_NUM_THREADS'] = str(threads)  # the distillation subprocess too


def read_run(output: str, recipe: str) -> Dict[str, Any]:
    """What a recipe run in `output` was started with (run.json: --config, --tiny, the --set overrides as the
    configuration holds them)."""
    path = os.path.join(output, 'run.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{output} holds no run of `{recipe}` ({path} is missing): train one with '
                                f'{recipe} --output {output}')
    with open(path) as f:
        run = json.load(f)

    def tuples(value):  # JSON gives lists where the configuration holds tuples
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value
    run['overrides'] = {key: tuples(value) for key, value in run['overrides'].items()}
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


def run_stages(args: argparse.Namespace, cfg: Any, stages: Sequence[str], outputs: Dict[str, Callable],
               runners: Dict[str, Callable]) -> None:
    """The stages `args.stages` names, in the recipe's order, each skipped where its output exists (unless
    --redo); then the wall time of all of them."""
    wanted = args.stages.split(',')
    for stage in stages:
        if stage in wanted:
            run_stage(args.output, stage, outputs[stage](args.output, cfg), lambda: runners[stage](args, cfg),
                      args.redo)
    _logger.info(f'wall time of the stages run here: {sum(read_timings(args.output).values()) / 60:.1f} min '
                 f"({os.path.join(args.output, 'timings.json')})")


def check_stage_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, stages: Sequence[str],
                          benchmark: str) -> None:
    """--stages must name the recipe's stages (the evaluation is `benchmark`, a script of the source tree), and
    --ship only copies the weights of a full run of a configuration as it is."""
    unknown = set(args.stages.split(',')) - set(stages)
    if unknown:
        parser.error(f'unknown stages {sorted(unknown)}; choose from {tuple(stages)} (the evaluation is '
                     f'{benchmark} in the source tree)')
    if args.ship and (args.tiny or args.set):
        parser.error('--ship copies weights into the package: only from a full run of a configuration as it is')


def run_evaluation(args: argparse.Namespace, run_config: Callable[[str], Any], evaluate: Callable) -> None:
    """A benchmark's evaluation of the recipe run in `args.output`, timed as one more stage (skipped once its
    results.json exists, unless --redo)."""
    try:
        cfg = run_config(args.output)
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e}') from None
    start_run(args.output, args.threads)
    run_stage(args.output, 'evaluate', os.path.join(args.output, 'results.json'), lambda: evaluate(args, cfg),
              args.redo)
