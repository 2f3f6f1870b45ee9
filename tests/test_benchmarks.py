"""What the benchmarks measure with (timm_lookwhere/cost.py: FLOPs, latency, memory), and the benchmarks: speed.py's
arguments and plan, and each one's tiny configuration end to end (numbers not checked)."""
import json
import runpy
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
from timm_lookwhere.cost import (
    count_flops, flop_breakdown, median_latency_ms, peak_memory_growth_mb, peak_memory_in_fresh_process,
    time_in_turns,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def script(name: str) -> types.ModuleType:
    """benchmarks/NAME.py's globals as a module object, as running it by path defines them (benchmarks/ is not a
    package and stays off sys.path)."""
    module = types.ModuleType(name)
    module.__dict__.update(runpy.run_path(str(BENCHMARKS / f'{name}.py'), run_name=name))
    return module


speed, report = script('speed'), script('report')


@pytest.fixture(autouse=True)
def sibling_scripts(monkeypatch):
    """Run by path, a script imports the scripts beside it (`from speed import ...`, `from report import ...`), its
    folder being first on sys.path; here it finds them, loaded by path, while each test runs."""
    monkeypatch.setitem(sys.modules, 'speed', speed)
    monkeypatch.setitem(sys.modules, 'report', report)


# --------------------------------------------------------------------------------------------
# cost.py


def test_flops_are_two_per_multiply_add_and_split_by_part():
    layers = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 8)
    assert count_flops(layers, x) == 2 * 3 * (8 * 4 + 4 * 2)
    assert flop_breakdown(lambda: layers(x), dict(first=layers[0], last=layers[2])) == dict(
        total=2 * 3 * 40, first=2 * 3 * 32, last=2 * 3 * 8)
    # autograd as the caller sets it: the backward of a call that runs one is counted too
    assert flop_breakdown(lambda: layers(x).sum().backward())['total'] > count_flops(layers, x)


def test_attention_is_counted_on_the_cpu_as_on_the_meta_device():
    """torch counts the CPU attention kernel as free unless cost.py registers its formula."""
    kwargs = dict(img_size=112, embed_dim=32, depth=2, num_heads=2)
    vit = timm.create_model('vit_base_patch14_reg4_dinov2', **kwargs).eval()
    with torch.device('meta'):
        meta_vit = timm.create_model('vit_base_patch14_reg4_dinov2', **kwargs).eval()
        on_meta = count_flops(meta_vit, torch.empty(1, 3, 112, 112))
    assert count_flops(vit, torch.randn(1, 3, 112, 112)) == on_meta
    tokens, dim = 64 + 5, 32
    attention = 2 * 2 * tokens ** 2 * dim  # q k^T and the weighted sum of v
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim)  # qkv, proj, the MLP's two layers
    blocks = flop_breakdown(lambda: vit(torch.randn(1, 3, 112, 112)), dict(blocks=vit.blocks))['blocks']
    assert blocks == 2 * (attention + linear)


def test_calls_are_timed_in_turns_after_their_warm_up():
    ran, heard = [], []
    calls = dict(a=lambda: ran.append('a'), b=lambda: (ran.append('b'), time.sleep(0.01)))
    seconds = time_in_turns(calls, reps=3, warmup=2, alternate=True, report=lambda *a: heard.append(a[:2]))
    assert ran == ['a', 'a', 'b', 'b'] + ['a', 'b', 'b', 'a', 'a', 'b']  # warm-ups, then turns reversed every other
    assert heard == [(0, 'a'), (0, 'b'), (1, 'b'), (1, 'a'), (2, 'a'), (2, 'b')]
    assert len(seconds['a']) == len(seconds['b']) == 3 and min(seconds['b']) >= 0.01 and min(seconds['a']) >= 0
    assert time_in_turns(calls, reps=1, warmup=0)['b'][0] >= 0.01
    latency = median_latency_ms(dict(slow=lambda x: time.sleep(x), fast=lambda x: None), 0.02, runs=3)
    assert latency['slow'] >= 20 > latency['fast']


def test_peak_memory_is_what_the_call_adds():
    def allocate():
        torch.ones(64, 2 ** 20, dtype=torch.uint8).add_(1)  # 64 MiB, written
    grown = peak_memory_growth_mb(allocate)
    assert grown['method'] and 60 < grown['peak_mb'] < 200
    if 'process_peak_mb' in grown:  # Linux: the process's own peak too
        assert grown['process_peak_mb'] > grown['peak_mb']
    assert peak_memory_growth_mb(lambda: None)['peak_mb'] < 30


PROBE = '''\
import json, sys
import torch
from timm_lookwhere.cost import report_peak_memory
spec = json.loads(sys.argv[sys.argv.index('--memory-child') + 1])
if spec['fail']:
    raise SystemExit('no such model: ' + spec['model'])
report_peak_memory(lambda: torch.ones(spec['mib'], 2 ** 20, dtype=torch.uint8).add_(1))
'''


@pytest.mark.slow
def test_a_fresh_process_reports_its_peak_or_names_its_error(tmp_path):
    probe = tmp_path / 'probe.py'
    probe.write_text(PROBE)
    grown = peak_memory_in_fresh_process(probe, dict(fail=False, mib=48, model='x'))
    assert 40 < grown['peak_mb'] < 150
    with pytest.raises(RuntimeError, match='memory probe probe.py --memory-child failed: no such model: vit_z'):
        peak_memory_in_fresh_process(probe, dict(fail=True, mib=0, model='vit_z'))


# --------------------------------------------------------------------------------------------
# speed.py


def test_quick_and_full_runs_get_their_documented_defaults():
    quick = speed.parse_args(['--quick'])
    assert (quick.sizes, quick.lookwhere_only_sizes, quick.batches, quick.reps) == ([518], [], [1], 2)
    assert quick.out == BENCHMARKS / 'results' / 'quick'
    full = speed.parse_args([])
    assert (full.sizes, full.lookwhere_only_sizes, full.batches, full.reps) == ([518, 1036], [2072], [1, 8], 3)
    assert (full.train_batch, full.target_batch, full.k_ratios) == (8, 4, [0.05, 0.1, 0.25, 0.5])
    assert full.out == BENCHMARKS / 'results'


def test_explicit_arguments_override_the_quick_defaults():
    args = speed.parse_args(['--quick', '--sizes', '112', '224', '--reps', '5', '--batches', '2', '--out', 'x'])
    assert (args.sizes, args.reps, args.batches, args.out) == ([112, 224], 5, [2], Path('x'))


@pytest.mark.parametrize('argv', [['--sizes', '500'], ['--lookwhere-only-sizes', '100'], ['--reps', '0']])
def test_bad_arguments_stop_with_a_message(argv):
    with pytest.raises(SystemExit):
        speed.parse_args(argv)


def test_the_full_plan_measures_every_target_of_the_issue():
    groups = speed.plan_groups(speed.parse_args([]))
    for target in speed.TARGETS:
        output = 'dense' if target['metric'] == 'dense_over_cls' else 'cls'
        where = (target['task'], target['size'], target['batch'])
        group = next(g for g in groups if (g.task, g.size, g.batch) == where)
        keys = {c.key for c in group.candidates}
        assert speed.Candidate('lookwhere', target['size'], target['k_ratio'], output).key in keys
        if target['metric'] in ('speedup', 'dense_over_cls'):
            assert speed.Candidate('vit', target['size']).key in keys
        if output == 'dense':
            assert speed.Candidate('lookwhere', target['size'], target['k_ratio']).key in keys


def test_lookwhere_only_sizes_have_no_full_vit():
    groups = speed.plan_groups(speed.parse_args(['--lookwhere-only-sizes', '2072']))
    at_2072 = [g for g in groups if g.size == 2072]
    assert at_2072 and all(c.family == 'lookwhere' for g in at_2072 for c in g.candidates)


def test_low_res_baseline_keeps_as_many_patches_as_lookwhere():
    zoo = speed.ModelZoo()
    assert zoo.kept_tokens(518, 0.1) == 136
    assert zoo.lowres_size(518, 0.1) == 14 * 12  # 144 patches, the square closest to 136


@pytest.mark.slow
def test_tiny_configuration_runs_end_to_end(tmp_path):
    results = speed.main([
        '--tiny', '--sizes', '112', '--lookwhere-only-sizes', '224', '--lookwhere-only-k-ratios', '0.25',
        '--batches', '1', '--k-ratios', '0.25', '--target-batch', '2', '--dense-sizes', '112',
        '--dense-k-ratio', '0.25', '--train-batch', '1', '--train-k-ratio', '0.25', '--reps', '2',
        '--memory', 'none', '--out', str(tmp_path),
    ])
    rows = {(r['task'], r['size'], r['batch'], r['key']): r for r in results['rows']}
    assert set(rows) == {
        ('infer', 112, 1, 'vit'), ('infer', 112, 1, 'lookwhere@0.25'), ('infer', 112, 1, 'lookwhere-dense@0.25'),
        ('infer', 112, 1, 'lowres@0.25'), ('infer', 112, 2, 'vit'), ('infer', 112, 2, 'lookwhere@0.1'),
        ('infer', 112, 2, 'lowres@0.1'), ('train', 112, 1, 'vit'), ('train', 112, 1, 'lookwhere@0.25'),
        ('train', 112, 1, 'lowres@0.25'), ('infer', 224, 1, 'lookwhere@0.25'),
    }
    for row in rows.values():
        assert len(row['raw']) == 2 and row['seconds']['min'] > 0 and row['gflop_per_image'] > 0
    lookwhere = rows['infer', 112, 1, 'lookwhere@0.25']
    assert lookwhere['flop_ratio'] > 1 and lookwhere['speedup']['median'] > 0
    assert 0 < lookwhere['outside_blocks']['median'] < 1 and 0 < lookwhere['flop_share']['selector'] < 1
    assert rows['infer', 112, 1, 'lookwhere-dense@0.25']['dense_over_cls']['median'] > 0
    assert 'speedup' not in rows['infer', 224, 1, 'lookwhere@0.25']  # no full ViT there

    saved = json.loads((tmp_path / 'speed.json').read_text())
    assert saved['rows'] == json.loads(json.dumps(results['rows']))
    assert [t['measured'] for t in saved['targets']] == [None] * len(speed.TARGETS)  # no target config ran
    markdown = (tmp_path / 'speed.md').read_text()
    assert '### inference, 112 px, batch 2' in markdown and '### Targets' in markdown
    pytest.importorskip('matplotlib')
    for plot in ('speedup_vs_k.png', 'time_vs_resolution.png', 'time_breakdown.png'):
        assert (tmp_path / plot).read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_memory_probe_measures_one_call_in_a_fresh_process():
    args = speed.parse_args(['--tiny', '--reps', '1'])
    cand = speed.Candidate('lookwhere', 112, 0.25)
    result = speed.measure_memory(cand, speed.Group('infer', 112, 2, [cand]), args)
    assert result is not None and result['peak_mb'] > 0 and result['method']


@pytest.mark.slow
def test_bfloat16_autocast_runs_the_models_in_bfloat16(tmp_path):
    args = speed.parse_args(['--tiny', '--amp', '--device', 'cpu', '--reps', '2'])
    zoo = speed.ModelZoo(tiny=True, device=args.device)
    group = speed.Group('infer', 112, 1, [speed.Candidate('lookwhere', 112, 0.25), speed.Candidate('vit', 112)])
    flops, skip = speed.plan_flops(group, speed.ModelZoo(tiny=True, device='meta'), args)
    dtypes = {}
    for name, model in (('lookwhere', zoo.lookwhere(112)), ('vit', zoo.vit(112))):
        model.blocks[0].attn.qkv.register_forward_hook(
            lambda m, a, out, name=name: dtypes.setdefault(name, set()).add(out.dtype))
    samples = speed.time_group(group, zoo, skip, args, flops)
    assert dtypes == dict(lookwhere={torch.bfloat16}, vit={torch.bfloat16})
    lookwhere = samples['lookwhere@0.25']  # with the selector's and the blocks' time inside each call
    assert len(lookwhere['seconds']) == len(lookwhere['selector']) == len(lookwhere['blocks']) == 2
    assert all(0 < s + b < t for s, b, t in zip(lookwhere['selector'], lookwhere['blocks'], lookwhere['seconds']))
    assert len(samples['vit']['seconds']) == 2 and not samples['vit']['blocks']
    results = speed.main(['--tiny', '--amp', '--sizes', '112', '--lookwhere-only-sizes', '--batches', '1',
                          '--k-ratios', '0.25', '--target-batch', '0', '--dense-sizes', '--train-batch', '1',
                          '--train-k-ratio', '0.25', '--reps', '1', '--memory', 'all', '--no-plots',
                          '--out', str(tmp_path)])
    assert results['machine']['amp'] == 'bfloat16' and results['machine']['device'] == 'cpu'
    assert all(row['peak_mb']['peak_mb'] > 0 for row in results['rows'])
    assert 'bfloat16 autocast' in (tmp_path / 'speed.md').read_text()


@pytest.mark.slow
def test_native_resolution_times_one_dynamic_model_beside_fixed_ones_and_plots_it(tmp_path):
    native_resolution = script('native_resolution')
    results = native_resolution.main(['--tiny', '--sizes', '112x112', '140x252', '--k-ratios', '0.25', '--outputs',
                                      'cls', 'dense', '--reps', '1', '--no-memory', '--out', str(tmp_path)])
    rows = [r for r in results['rows'] if r.get('model') != 'vit']
    assert [(tuple(r['size']), r['output']) for r in rows] == [
        ((112, 112), 'cls'), ((112, 112), 'dense'), ((140, 252), 'cls'), ((140, 252), 'dense')]
    assert [r['k'] for r in rows] == [16, 16, 45, 45]  # k_ratio of each size's own patches
    assert all(r['dynamic']['median'] > 0 and r['dynamic_over_fixed']['median'] > 0 for r in rows)
    vit = [r for r in results['rows'] if r.get('model') == 'vit']
    assert len(vit) == 2 and all('seconds' in r for r in vit)
    assert (tmp_path / 'native_resolution.png').read_bytes()[:4] == b'\x89PNG'
    assert '| 140 x 252 | 0.04 | 180 | 0.25 (45) | dense |' in (tmp_path / 'native_resolution.md').read_text()
    args = native_resolution.parse_args(['--tiny', '--memory-probes', '2'])
    memory = native_resolution.measure_memory('dynamic', (140, 252), 0.25, 'dense', args)
    assert 0 < memory['call'] < memory['process']  # the process holds the model, and torch, besides the call


def test_native_resolution_sizes_must_be_whole_patches():
    native_resolution = script('native_resolution')
    with pytest.raises(SystemExit, match='multiples of the patch size 14'):
        native_resolution.parse_args(['--sizes', '500x500'])


@pytest.mark.slow
def test_mixed_sizes_times_every_method_over_the_same_images_and_plots_them(tmp_path):
    mixed_sizes = script('mixed_sizes')
    sizes = mixed_sizes.image_sizes(64, seed=0)
    assert sum(max(s) > 2000 for s in sizes) == 13 and max(max(s) for s in sizes) <= 3840  # a fifth above 2000 px
    assert min(min(s) for s in sizes) >= 300 and sum(h == w for h, w in sizes) == 16
    results = mixed_sizes.main(['--tiny', '--images', '6', '--reps', '1', '--no-memory', '--out', str(tmp_path)])
    assert set(results['methods']) == {
        'list16/fixed_k', 'per_image/fixed_k', 'resized518/fixed_k', 'list16/k_ratio', 'per_image/k_ratio',
        'resized518/k_ratio', 'naflex/fixed_k', 'list16/small_fixed_k', 'per_image/small_fixed_k',
        'copies/small_fixed_k', 'vit/own_size'}
    assert all(row['images_per_s'] > 0 for row in results['methods'].values())
    assert results['same_size']['ratio'] > 0 and len(results['vit']) == 6
    assert (tmp_path / 'mixed_sizes.png').read_bytes()[:4] == b'\x89PNG'
    assert 'Cost per image at the same B x k' in (tmp_path / 'mixed_sizes.md').read_text()
    memory = mixed_sizes.measure_memory('list16/fixed_k', ['--tiny', '--images', '4'])
    assert memory['peak_mb'] > 0


def test_mixed_sizes_refuses_counts_below_one():
    mixed_sizes = script('mixed_sizes')
    with pytest.raises(SystemExit):
        mixed_sizes.parse_args(['--images', '0'])


def test_pipeline_folder_spans_the_issues_sizes_with_a_third_above_8_megapixels():
    pipeline = script('pipeline')
    megapixels = [w * h / 1e6 for w, h in pipeline.SIZES]
    assert round(min(megapixels), 1) == 0.3 and max(megapixels) == 12
    assert sum(mp > 8 for mp in megapixels) == len(megapixels) // 3


@pytest.mark.slow
def test_pipeline_times_every_pipeline_the_command_under_torchrun_and_its_memory(tmp_path):
    pipeline = script('pipeline')
    results = pipeline.main(['--tiny', '--work', str(tmp_path)])
    assert set(results['models']) == {'sign', 'sign_2mp', 'sign_k256', 'vitb'}
    for model in results['models'].values():
        assert set(model['rows']) == {'predict', 'float', 'timm', 'decode', 'model'}
        assert all(row['images_per_s'] > 0 for row in model['rows'].values())
        assert model['steps']['predict']['preprocess'] < model['steps']['float']['preprocess']
    assert results['models']['sign_2mp']['rows']['predict']['images'] < results['images']
    assert set(results['torchrun']['runs']) == {'1', '2'} and set(results['memory']) == {'6', '12'}
    out = tmp_path / 'tiny' / 'results'
    assert (out / 'pipeline.png').read_bytes()[:4] == b'\x89PNG'
    assert 'under torchrun' in (out / 'pipeline.md').read_text()
