"""Stopping and resuming `lookwhere distill` (timm_lookwhere.distill): changed arguments on --resume, one run
per output folder, damaged checkpoints and logs, kills at any moment, and the flags a user can get wrong."""
import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import test_distill
from test_distill import RESULT_KEYS, TINY_MODEL_KWARGS, assert_refused, cli_args, read_metrics, refusal, tiny_teacher
from test_files import hold, kill
from timm_lookwhere import cli, distill
from timm_lookwhere.distill import RESUME_POLICY, main

run_files = test_distill.run_files  # the image folder and tiny teacher of the other distillation tests
one_thread = test_distill.one_thread  # autouse there, and here: tiny models on one thread


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_identical(a, b, where='state'):
    """Bit for bit: tensors equal in dtype, shape and every value; everything else equal."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


def cosine_lr(n, lr, steps, warmup, warmup_lr=1e-7, min_lr=1e-6):
    """The lr of update n + 1: linear warm-up over `warmup` updates, then cosine to min_lr at `steps`."""
    if n < warmup:
        return warmup_lr + n * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (n - warmup) / (steps - warmup)))


@pytest.fixture(scope='module')
def two_steps(run_files, tmp_path_factory):
    """A finished 2-step run, with checkpoint-1.pth and checkpoint-2.pth kept."""
    output = tmp_path_factory.mktemp('two_steps')
    main(cli_args(run_files, output, '--steps', '2', '--save-every', '1', '--keep-every', '1'))
    return output


# --------------------------------------------------------------------------------------------
# changed arguments on --resume


def test_every_argument_has_a_resume_policy_for_the_docs():
    parser = distill.add_arguments(argparse.ArgumentParser())
    assert {a.dest for a in parser._actions if a.dest != 'help'} == set(RESUME_POLICY)
    assert {verdict for verdict, _ in RESUME_POLICY.values()} == {'honoured', 'refused'}


def test_resume_honours_a_new_lr_schedule_length_and_weight_decay(run_files, two_steps, tmp_path):
    output = tmp_path / 'run'
    shutil.copytree(two_steps, output)
    # the run had lr 1e-3 over 2 steps (1 of warm-up); it goes on to step 5 at a peak of 2e-3
    main(cli_args(run_files, output, '--steps', '5', '--lr', '2e-3', '--weight-decay', '0.1', '--resume'))
    records = read_metrics(output)
    assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
    for record in records[2:]:
        assert record['lr'] == pytest.approx(cosine_lr(record['step'] - 1, 2e-3, 5, 1), rel=1e-9), record['step']
    state = load(output / 'last.pth')
    assert state['step'] == 5 and state['args']['lr'] == 2e-3
    assert json.loads((output / 'args.json').read_text())['lr'] == 2e-3  # what the run now uses
    assert {g['weight_decay'] for g in state['optimizer']['param_groups']} == {0.1, 0.}  # the no-decay group keeps 0
    [change] = state['argument_changes']  # recorded with the step they apply after
    assert change['step'] == 2 and change['changed']['lr'] == [1e-3, 2e-3] and change['changed']['steps'] == [2, 5]
    # and what else differs from the first launch: the folder was copied, the cadence left at its defaults
    assert set(change['changed']) == {'steps', 'lr', 'weight_decay', 'output', 'save_every', 'keep_every'}


@pytest.mark.parametrize('extra, name, old, new', [
    (['--img-size', '126'], '--img-size', '112', '126'),
    (['--model-kwargs', *TINY_MODEL_KWARGS[:-1], 'map_grid=4'], '--model-kwargs', "'map_grid': 8", "'map_grid': 4"),
    (['--k-max', '5'], '--k-max', 'None', '5'),
    (['--map-weight', '0.5'], '--map-weight', '0.1', '0.5'),
    (['--batch-size', '2'], '--batch-size', '4', '2'),
    (['--seed', '1'], '--seed', '0', '1'),
    (['--attn-queries', 'cls'], '--attn-queries', "'patch'", "'cls'"),
    (['--drop-path', '0.1'], '--drop-path', '0.0', '0.1'),
])
def test_resume_refuses_changes_that_define_the_run(run_files, two_steps, extra, name, old, new):
    before = (two_steps / 'metrics.jsonl').read_text()
    message = assert_refused(cli_args(run_files, two_steps, '--steps', '4', *extra, '--resume'),
                             'cannot change within a run')
    assert name in message and old in message and new in message and 'another --output' in message, message
    assert (two_steps / 'metrics.jsonl').read_text() == before


def test_resume_refuses_another_data_folder_and_names_every_refused_change(run_files, two_steps, tmp_path):
    shutil.copytree(run_files / 'images', tmp_path / 'images')  # the same images elsewhere: still another stream
    args = cli_args(run_files, two_steps, '--steps', '4', '--map-weight', '0.2', '--resume')
    args[args.index('--data-dir') + 1] = str(tmp_path / 'images')
    assert_refused(args, '--data-dir .*--map-weight')


def test_resume_compares_the_teachers_weights_not_its_file_name(run_files, two_steps, tmp_path):
    output = tmp_path / 'run'
    shutil.copytree(two_steps, output)
    other = tmp_path / 'other_teacher.pth'
    torch.save(tiny_teacher(seed=1).state_dict(), other)
    args = cli_args(run_files, output, '--steps', '3', '--resume')
    args[args.index('--teacher-checkpoint') + 1] = str(other)
    assert_refused(args, "teacher's weights differ")
    moved = tmp_path / 'moved_teacher.pth'
    shutil.copy(run_files / 'teacher.pth', moved)
    args[args.index('--teacher-checkpoint') + 1] = str(moved)
    main(args)  # the same weights under another name
    assert [r['step'] for r in read_metrics(output)] == [1, 2, 3]


def test_resume_below_the_checkpoints_step_is_refused(run_files, two_steps):
    assert_refused(cli_args(run_files, two_steps, '--steps', '1', '--warmup-steps', '0', '--resume'),
                   '--steps 1 is below the 2 steps')


# --------------------------------------------------------------------------------------------
# damaged checkpoints and logs


@pytest.mark.parametrize('damage', ['cut', 'python objects'])
def test_a_damaged_checkpoint_is_named_with_the_kept_ones_to_resume_from(run_files, two_steps, tmp_path, damage):
    output = tmp_path / 'run'
    shutil.copytree(two_steps, output)
    last = output / 'last.pth'
    if damage == 'cut':  # as a full disk or an interrupted copy leaves it
        last.write_bytes(last.read_bytes()[:1000])
    else:
        torch.save(argparse.Namespace(step=2), last)
    message = refusal(cli_args(run_files, output, '--steps', '2', '--resume'))
    assert str(last) in message and 'weights_only' not in message
    assert ('corrupt' if damage == 'cut' else 'not a distillation checkpoint') in message
    assert f"{output / 'checkpoint-2.pth'}, {output / 'checkpoint-1.pth'}" in message and '--resume PATH' in message


def test_metrics_are_cut_back_to_the_checkpoint_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / 'metrics.jsonl'
    lines = [json.dumps(dict(step=s, loss=1.)) + '\n' for s in (1, 2, 3)]
    path.write_text(''.join(lines) + '{"step": 4, "lo')  # the last line cut by a kill mid-write
    distill._truncate_metrics(str(path), 2)
    assert path.read_text() == ''.join(lines[:2])

    class Killed(BaseException):
        pass

    class KilledAfterOneLine:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def writelines(self, kept):
            self.file.write(kept[0])
            self.file.flush()
            raise Killed

    def killed_midway(file, mode='r'):
        return KilledAfterOneLine(open(file, mode)) if 'w' in mode else open(file, mode)

    monkeypatch.setattr(distill, 'open', killed_midway, raising=False)
    with pytest.raises(Killed):
        distill._truncate_metrics(str(path), 1)
    assert path.read_text() == ''.join(lines[:2])  # the log as it was
    assert os.listdir(tmp_path) == ['metrics.jsonl']


# --------------------------------------------------------------------------------------------
# kills at any moment, and a second process on the same output


# `lookwhere distill` on one torch thread, as the tests run it in-process: set by the process itself, whatever
# threading variables (OMP_NUM_THREADS, MKL_NUM_THREADS, ...) the caller's shell exports
ONE_THREAD_DISTILL = ('import sys, torch; torch.set_num_threads(1); from timm_lookwhere.distill import main; '
                      'sys.exit(main())')


def launch(files, output, steps, log):
    resume = ['--resume'] if (output / 'last.pth').exists() else []
    args = cli_args(files, output, '--steps', str(steps), '--save-every', '1', *resume)
    return subprocess.Popen([sys.executable, '-c', ONE_THREAD_DISTILL, *args], stdout=subprocess.DEVNULL,
                            stderr=log)


def tail(log):
    log.seek(0)
    return log.read()[-3000:]


def logged_steps(output):
    try:
        return len((output / 'metrics.jsonl').read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_killed_at_any_moment_and_resumed_a_run_ends_bit_identical(run_files, tmp_path, monkeypatch):
    """The done-when point of issue 14: a distillation killed with SIGKILL at arbitrary moments and resumed
    ends bit-identical to an uninterrupted run, with one metrics record per step; a second process on the
    same output is refused while the first runs. The launches hold whatever threading the caller's shell asks for."""
    for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        monkeypatch.setenv(name, '2')
    steps, kills = 24, 3
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    main(cli_args(run_files, whole, '--steps', str(steps), '--save-every', '1'))

    rng = random.Random(0)
    with open(tmp_path / 'stderr.log', 'w+') as log:
        for launch_number in range(kills + 1):
            logged = logged_steps(killed)
            proc = launch(run_files, killed, steps, log)
            if launch_number == kills:
                break
            # a step or three past the last launch's records, then any moment within a step: mid-update,
            # mid-save, between a record and its save
            target = logged + rng.randint(1, 3)
            while proc.poll() is None and logged_steps(killed) < target:
                time.sleep(0.005)
            assert proc.poll() is None, f'the run ended before its kill:\n{tail(log)}'
            if launch_number == 0:
                assert_refused(cli_args(run_files, killed, '--steps', str(steps), '--save-every', '1', '--resume'),
                               f'process {proc.pid} on host')
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.wait() == 0, f'the last launch failed:\n{tail(log)}'

    final, expected = load(killed / 'last.pth'), load(whole / 'last.pth')
    assert final['step'] == steps
    for key in ('state_dict', 'optimizer', 'k_rng_state'):
        assert_identical(final[key], expected[key], key)
    records, expected_records = read_metrics(killed), read_metrics(whole)
    assert [r['step'] for r in records] == list(range(1, steps + 1))  # one record per step
    for record, reference in zip(records, expected_records):
        assert {k: record[k] for k in RESULT_KEYS} == {k: reference[k] for k in RESULT_KEYS}
    assert not [name for name in os.listdir(killed) if name.endswith('.tmp')]  # kills mid-save left nothing


# --------------------------------------------------------------------------------------------
# flags a user can get wrong


@pytest.mark.parametrize('extra, message', [
    (['--clip-grad', '-1'], '--clip-grad must be positive'),  # would flip the gradients
    (['--lr', 'nan'], '--lr must be positive'),
    (['--warmup-lr', '-1'], '--warmup-lr must be >= 0'),  # a negative lr climbs the loss
    (['--min-lr', '-1'], '--min-lr must be >= 0'),  # was a bare AssertionError in timm's scheduler
    (['--weight-decay', '-0.1'], '--weight-decay must be >= 0'),
    (['--betas', '1.5', '0.9'], r'--betas must be in \[0, 1\)'),
    (['--drop-path', '1.5'], r'--drop-path is a probability in \[0, 1\)'),  # failed at the first step
    (['--scale', '0.5', '0.1'], '--scale MIN MAX'),  # was a warning, then crops of a reversed range
    (['--keep-every', '-1'], '--keep-every must be >= 0'),  # kept a checkpoint every step
    (['--data-dir', '/nonexistent'], '--data-dir /nonexistent does not exist'),  # a bare AssertionError
])
def test_bad_flag_values_are_refused_by_name(run_files, tmp_path, extra, message):
    assert_refused(cli_args(run_files, tmp_path / 'out', '--steps', '2', *extra), message)
    assert not (tmp_path / 'out').exists()


def test_a_file_where_a_folder_belongs_is_refused_by_name(run_files, tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    assert_refused(cli_args(run_files, a_file, '--steps', '2'), f'--output {a_file} is a file')
    assert_refused(cli_args(run_files, tmp_path / 'out', '--steps', '2', '--no-aug', '--teacher-cache', str(a_file)),
                   f'--teacher-cache {a_file} is a file')
    args = cli_args(run_files, tmp_path / 'out', '--steps', '2')
    args[args.index('--teacher-checkpoint') + 1] = str(tmp_path)
    assert_refused(args, f'--teacher-checkpoint {tmp_path} is a folder')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('payload', [b'', b'not a checkpoint at all'])
def test_an_empty_or_foreign_teacher_checkpoint_is_named(run_files, tmp_path, payload):
    bad = tmp_path / 'teacher.pth'
    bad.write_bytes(payload)
    args = cli_args(run_files, tmp_path / 'out', '--steps', '2')
    args[args.index('--teacher-checkpoint') + 1] = str(bad)
    assert_refused(args, f'--teacher-checkpoint: {bad} is (empty|not a readable PyTorch checkpoint)')


def test_resume_from_a_folder_names_the_checkpoint_to_give(run_files, two_steps):
    assert_refused(cli_args(run_files, two_steps, '--steps', '2', '--resume', str(two_steps)),
                   f"--resume {two_steps} is a folder.*{two_steps / 'last.pth'}")


# --------------------------------------------------------------------------------------------
# argument errors read as argparse's, from both command lines; a refused start leaves nothing behind


# `lookwhere distill ARGS` and `python -m timm_lookwhere.distill ARGS`, each with its program name
COMMAND_LINES = [(lambda argv: cli.main(['distill', *argv]), 'lookwhere distill'),
                 (main, 'python -m timm_lookwhere.distill')]


def test_steps_below_the_default_warm_up_is_an_argument_error(run_files, tmp_path):
    args = cli_args(run_files, tmp_path / 'out', '--steps', '1')
    del args[args.index('--warmup-steps'):args.index('--warmup-steps') + 2]  # the default, 50000
    for command, prog in COMMAND_LINES:
        message = refusal(args, command, prog)
        assert message.startswith('--warmup-steps must be in [0, --steps), got 50000 with --steps 1'), message
    assert not (tmp_path / 'out').exists()


def test_an_output_that_is_a_file_is_an_argument_error(run_files, tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('kept')
    for command, prog in COMMAND_LINES:
        assert refusal(cli_args(run_files, a_file, '--steps', '2'), command, prog).startswith(
            f'--output {a_file} is a file; give a folder')
    assert a_file.read_text() == 'kept'


def test_a_second_run_on_a_held_output_is_refused_naming_the_holder(run_files, tmp_path):
    output = tmp_path / 'out'
    holder, _ = hold(output)
    try:
        for command, prog in COMMAND_LINES:
            message = refusal(cli_args(run_files, output, '--steps', '2'), command, prog)
            assert f'{output} is in use: process {holder.pid} on host' in message, message
    finally:
        kill(holder)
    assert os.listdir(output) == ['lock']  # nothing written by the refused runs


def test_a_data_folder_without_images_is_refused_and_leaves_no_lock_behind(run_files, tmp_path):
    empty = tmp_path / 'no_images'
    (empty / 'a').mkdir(parents=True)
    (empty / 'a' / 'notes.txt').write_text('not an image')
    args = cli_args(run_files, tmp_path / 'out', '--steps', '2')
    args[args.index('--data-dir') + 1] = str(empty)
    assert refusal(args).startswith(f'--data-dir {empty}: Found 0 images')
    assert not (tmp_path / 'out').exists()  # the folder the run made is gone again
    (tmp_path / 'out').mkdir()  # a folder the user made stays, without the lock file of the refused run
    refusal(args)
    assert os.listdir(tmp_path / 'out') == []
