"""The recipes' run folder and command line (timm_lookwhere.recipes.stages): one run per folder, held from before
its first write; the settings it was started with, refused when they change; every --set value checked before
the first stage; argument errors as argparse gives them; a diverged loss stops its stage."""
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_files import hold, kill
from timm_lookwhere.recipes import dense_signs, sparse_signs, stages

DENSE = dense_signs.RECIPE.prog
SPARSE = sparse_signs.RECIPE.prog


def refusal(main, argv, prog):
    """The message a recipe refuses ARGV with: argparse's form (PROG: error: ...), exit code 2, no traceback."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
        main(argv)
    text = stderr.getvalue()
    assert exit_info.value.code == 2 and f'{prog}: error: ' in text and 'Traceback' not in text, text
    return text.split(f'{prog}: error: ', 1)[1].strip()


# --------------------------------------------------------------------------------------------
# --set: every value checked before the first stage


@pytest.mark.parametrize('recipe, pair, message', [
    # the cases of issue 20: a NaN loss exported with exit 0, or errors of another stage, after the earlier ones
    (dense_signs, 'lookwhere_batch=0', 'lookwhere_batch must be an integer >= 1, got 0'),
    (dense_signs, 'background_weight=abc', "background_weight must be a number >= 0, got 'abc'"),
    (dense_signs, 'lookwhere_steps=-3', 'lookwhere_steps must be an integer >= 2'),
    (dense_signs, 'k_range=5', r'k_range must be \(LOW, HIGH\) with 0 < LOW <= HIGH <= 1, got 5'),
    (dense_signs, 'img_size=100', 'img_size must be a multiple of the 16 px patch of lookwhere_vitt16_512'),
    (sparse_signs, 'map_weight=abc', "map_weight must be a number >= 0, got 'abc'"),
    # and the other kinds of each recipe
    (dense_signs, 'img_size=256', "img_size must be the side lookwhere_vitt16_512 takes, 512: change both"),
    (dense_signs, 'k_range=(0.2,0.1)', r'k_range must be \(LOW, HIGH\)'),
    (dense_signs, 'num_signs=(3,1)', r'num_signs must be \(LOW, HIGH\) integers with 1 <= LOW <= HIGH'),
    (dense_signs, 'distill_steps=1', r'distill_steps must be 0 \(none\) or an integer >= 2'),
    (dense_signs, 'teacher_window=33', 'teacher_window must be at most the grid of 32 patches a side'),
    (dense_signs, 'loss_stride=32', 'loss_stride must be at most the 16 px patch'),
    (dense_signs, 'lowres_match_k=0', 'lowres_match_k must be a number > 0 and <= 1'),
    (dense_signs, 'head_lr_scale=0', 'head_lr_scale must be a number > 0'),
    (dense_signs, 'teacher_lr=nan', 'teacher_lr must be a number > 0'),
    (dense_signs, 'train_scenes=2.5', 'train_scenes must be an integer >= 1, got 2.5'),
    (dense_signs, 'test_seed=-1', 'test_seed must be an integer >= 0'),
    (dense_signs, 'init_tag=sparse_sign', "init_tag must be '' or the tag of a shipped lookwhere_vitt16_512 with its "
                                          'teacher: sparse_signs'),
    (dense_signs, 'init_tag=sparse_signs', 'init_tag must be a shipped model with the blocks trained here; '
                                           r'lookwhere_vitt16_512.sparse_signs has embed_dim=128 \(here 32\), depth=6'),
    (dense_signs, 'model=vit_small', 'model must be a LookWhere architecture: lookwhere_'),
    (dense_signs, "model_kwargs={'depth':'x'}", 'model_kwargs must be arguments lookwhere_vitt16_512 takes'),
    (dense_signs, 'model_kwargs=3', 'model_kwargs must be a dict of keyword arguments'),
    (sparse_signs, 'teacher_phases=((4,1,8),)', r'teacher_phases must be a non-empty tuple of \(window'),
    (sparse_signs, 'teacher_phases=()', r'teacher_phases must be a non-empty tuple'),
    (sparse_signs, 'area_range=(0.3,0.4)', r'area_range must be \(LOW, HIGH\) with 0 < LOW <= HIGH <= 0.25'),
    (sparse_signs, 'attn_queries=keys', "attn_queries must be one of 'cls', 'patch', got 'keys'"),
    (sparse_signs, 'teacher_init=lookwhere_vitt16_512', "teacher_init must be one of '', "),
    (sparse_signs, 'distill_images=3', r'distill_images must be at least distill_batch \(4\)'),
    (sparse_signs, 'distill_steps=1', 'distill_steps must be an integer >= 2'),
    (sparse_signs, 'not_a_setting=1', '--set takes KEY=VALUE with a KEY of model, img_size, '),
    (sparse_signs, 'map_weight', '--set map_weight: give it a value, map_weight=VALUE'),
])
def test_each_set_value_is_checked_before_the_first_stage(recipe, pair, message, tmp_path):
    output = tmp_path / 'run'
    text = refusal(recipe.main, ['--output', str(output), '--tiny', '--set', pair], recipe.RECIPE.prog)
    key, given, _ = pair.partition('=')
    if given and key in recipe.RULES:
        assert text.startswith(f'--set {key}='), text  # the key and its value first
    assert re.search(message, text), text
    assert not output.exists()  # refused before anything is written


def test_every_setting_of_both_recipes_has_a_check_that_their_configurations_pass():
    for recipe, configs in ((sparse_signs, [c for pair in sparse_signs.CONFIGS.values() for c in pair.values()]),
                            (dense_signs, list(dense_signs.CONFIGS.values()))):
        assert list(recipe.RULES) == [f.name for f in dataclasses.fields(recipe.RunConfig)]
        for cfg in configs:
            # each value as --set gives it passes its own check and comes back the same
            pairs = [f'{f.name}={getattr(cfg, f.name)!r}' for f in dataclasses.fields(cfg)]
            again, _ = stages.parse_settings(cfg, pairs, recipe.RULES)
            assert again == cfg
            assert recipe.RECIPE.check_settings(cfg) == [], cfg


def test_a_checked_value_is_recorded_as_the_configuration_holds_it(tmp_path):
    cfg, overrides = stages.parse_settings(dense_signs.CONFIGS['tiny'], ['k_range=[0.05, 0.5]', 'teacher_lr=1'],
                                           dense_signs.RULES)
    assert cfg.k_range == (0.05, 0.5) and overrides == dict(k_range=(0.05, 0.5), teacher_lr=1.0)
    assert isinstance(cfg.teacher_lr, float)


# --------------------------------------------------------------------------------------------
# the run folder: a file, a second run, other settings


def test_an_output_that_is_a_file_is_an_argument_error(tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('kept')
    for recipe in (dense_signs, sparse_signs):
        text = refusal(recipe.main, ['--output', str(a_file), '--tiny'], recipe.RECIPE.prog)
        assert text == f'--output {a_file} is a file; give a folder (made if missing)'
    assert a_file.read_text() == 'kept'


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder_before_writing(tmp_path):
    output = tmp_path / 'run'
    holder, _ = hold(output)
    try:
        for recipe in (dense_signs, sparse_signs):
            text = refusal(recipe.main, ['--output', str(output), '--tiny'], recipe.RECIPE.prog)
            assert text.startswith(f'{output} is in use: process {holder.pid} on host'), text
    finally:
        kill(holder)
    assert os.listdir(output) == ['lock']  # no run.json, no run.log


def record_of_todays_code(output, **record):
    """A run folder as the recipes of early December left it: run.json (no `config` for the dense recipe) and the
    data stage done."""
    output.mkdir()
    (output / 'run.json').write_text(json.dumps(record, indent=2))
    (output / 'data.done').touch()
    return (output / 'run.json').read_text()


@pytest.mark.parametrize('argv, changed', [
    (['--set', 'background_weight=0.9'], '--set background_weight=0.9 (the run has --set background_weight=0.3)'),
    (['--tiny'], '--tiny (the run has no --tiny)'),
    (['--tiny', '--set', 'teacher_steps=5'],
     '--tiny (the run has no --tiny)\n  --set teacher_steps=5 (the run has --set teacher_steps=40)'),
])
def test_other_settings_on_an_existing_run_are_refused_naming_old_and_new(argv, changed, tmp_path):
    output = tmp_path / 'run'
    record = record_of_todays_code(output, tiny=False, overrides={})  # the background run's own run.json
    text = refusal(dense_signs.main, ['--output', str(output), '--stages', 'data', *argv], DENSE)
    assert text.startswith(f'{output} holds a run started with other settings (run.json); they cannot change')
    assert f':\n  {changed}\nRun it again with its settings' in text, text
    assert 'start a new run in another --output' in text
    assert (output / 'run.json').read_text() == record and not (output / 'run.log').exists()


def test_the_same_settings_continue_the_run_and_keep_its_record(tmp_path, capsys):
    output = tmp_path / 'run'
    record = record_of_todays_code(output, tiny=True, overrides=dict(teacher_steps=2, k_range=[0.02, 1.0]))
    # the same configuration, however written: the overrides given again, or left out where they are the tiny's own
    for argv in ([], ['--set', 'teacher_steps=2'], ['--set', 'k_range=(0.02, 1.0)', 'background_weight=0.5']):
        assert dense_signs.main(['--output', str(output), '--tiny', '--stages', 'data', *argv]) == 0
        assert (output / 'run.json').read_text() == record
    assert 'data: done before' in (output / 'run.log').read_text()
    assert dense_signs.run_config(str(output)) == dataclasses.replace(
        dense_signs.CONFIGS['tiny'], teacher_steps=2, k_range=(0.02, 1.0))


def test_another_config_of_the_sparse_recipe_is_refused(tmp_path):
    output = tmp_path / 'run'
    record = record_of_todays_code(output, config='512', tiny=True, overrides={})
    text = refusal(sparse_signs.main, ['--output', str(output), '--config', '256', '--tiny'], SPARSE)
    assert '\n  --config 256 (the run has --config 512)\n' in text, text
    assert (output / 'run.json').read_text() == record


def test_a_new_run_records_its_settings_as_todays_code_did(tmp_path):
    output = tmp_path / 'run'
    (output / 'data').mkdir(parents=True)  # the data stage done: nothing to generate
    (output / 'data' / 'train').mkdir()
    (output / 'data' / 'train' / 'done').touch()
    argv = ['--output', str(output), '--config', '256', '--tiny', '--stages', 'data', '--set', 'map_weight=0.25']
    assert sparse_signs.main(argv) == 0
    assert json.loads((output / 'run.json').read_text()) == dict(config='256', tiny=True,
                                                                 overrides=dict(map_weight=0.25))


# --------------------------------------------------------------------------------------------
# a loss that is not finite


def test_a_loss_that_is_not_finite_stops_the_stage_before_it_updates_or_saves(tmp_path):
    model = torch.nn.Linear(4, 2)
    batches = iter([torch.ones(2, 4)] * 5)
    losses = iter([torch.tensor(1.), torch.tensor(float('nan'))])
    weights = []

    def step_loss(model, batch):
        weights.append(model.weight.detach().clone())
        return model(batch).sum() * next(losses), {}
    with pytest.raises(FloatingPointError, match=r'probe: the training loss is nan at step 2 of 5'):
        stages.fit('probe', model, batches, 5, 1e-3, step_loss, str(tmp_path / 'state.pth'))
    assert not (tmp_path / 'state.pth').exists()
    assert not torch.equal(weights[1], weights[0]) and torch.equal(model.weight, weights[1])  # step 2 changed nothing


def test_a_recipe_whose_loss_diverges_exits_with_the_error_and_runs_no_later_stage(tmp_path, monkeypatch):
    def diverged(args, cfg):
        model = torch.nn.Linear(2, 1)
        stages.fit('teacher (scenes)', model, iter([torch.ones(1, 2)] * 2), 2, 1.,
                   lambda m, b: ((m(b).sum().abs() + 1) * float('inf'), {}),  # +inf whatever the init
                   os.path.join(args.output, 'teacher.state.pth'))
    output = tmp_path / 'run'
    output.mkdir()
    (output / 'data.done').touch()
    monkeypatch.setitem(dense_signs.RECIPE.runners, 'teacher', diverged)
    with pytest.raises(SystemExit) as exit_info:
        dense_signs.main(['--output', str(output), '--tiny', '--stages', 'data,teacher,export'])
    assert str(exit_info.value.code).startswith(f'{DENSE}: error: teacher (scenes): the training loss is inf at step 1')
    assert not (output / 'export').exists() and not (output / 'timings.json').exists()  # no stage ran to its end
    assert 'the training loss is inf' in (output / 'run.log').read_text()


# --------------------------------------------------------------------------------------------
# killed and launched again; a second launch meanwhile


def launch(output, log):
    argv = ['--output', str(output), '--tiny', '--workers', '0', '--threads', '1']
    return subprocess.Popen([sys.executable, '-m', 'timm_lookwhere.recipes.dense_signs', *argv],
                            stdout=subprocess.DEVNULL, stderr=log)


def wait_for(proc, path, log):
    while proc.poll() is None and not path.exists():
        time.sleep(0.01)
    assert proc.poll() is None, f'the run ended before its kill:\n{log.read_text()[-3000:]}'


def tensors(output):
    """Every tensor the run wrote (checkpoints, exports), by file and key."""
    from safetensors.torch import load_file
    out = {}
    for path in sorted(output.rglob('*')):
        if path.suffix == '.pth':
            state = torch.load(path, weights_only=True)
            items = state.get('model', state.get('state_dict', state)).items()
        elif path.suffix == '.safetensors':
            items = load_file(path).items()
        else:
            continue
        out.update({f'{path.relative_to(output)}:{k}': v for k, v in items if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.slow
def test_a_recipe_killed_at_any_moment_and_launched_again_ends_as_an_uninterrupted_run(tmp_path):
    """Issue 20's done-when: a tiny dense-signs run killed (SIGKILL) at two moments and launched again finishes
    with the weights of a run never stopped; a second launch while it runs is refused, naming the holder, and
    rewrites nothing."""
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    rng = random.Random(0)
    with open(tmp_path / 'log', 'w') as log:
        assert launch(whole, log).wait() == 0
        proc = launch(killed, log)
        wait_for(proc, killed / 'run.log', tmp_path / 'log')
        before = {name: (killed / name).read_bytes() for name in ('run.json', 'run.log')}
        text = refusal(dense_signs.main, ['--output', str(killed), '--tiny', '--workers', '0'], DENSE)
        assert text.startswith(f'{killed} is in use: process {proc.pid} on host'), text
        assert (killed / 'run.json').read_bytes() == before['run.json']
        assert (killed / 'run.log').read_bytes().startswith(before['run.log'])  # only the first run's lines added
        for moment in (killed / 'data.done', killed / 'teacher' / 'model.pth'):  # then any moment after
            wait_for(proc, moment, tmp_path / 'log')
            time.sleep(rng.uniform(0, 1.))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = launch(killed, log)
        assert proc.wait() == 0, (tmp_path / 'log').read_text()[-3000:]
    expected, got = tensors(whole), tensors(killed)
    assert got.keys() == expected.keys() and len(got) > 100
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert json.loads((killed / 'run.json').read_text()) == dict(tiny=True, overrides={})
    log = (killed / 'run.log').read_text()
    assert 'data: done before' in log and 'teacher: done before' in log  # the launches after the kills went on
    assert not [p for p in killed.rglob('*.tmp')]  # kills mid-write left nothing behind
