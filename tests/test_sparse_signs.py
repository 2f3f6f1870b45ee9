"""The sparse-signs recipe: the teacher's patch supervision, its sign windows, and every stage end to end,
its evaluation (benchmarks/sparse_signs.py, run by path) included."""
import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image

import timm
from torchvision.transforms.functional import pil_to_tensor

from test_recipe_guard import refusal
from timm_lookwhere.scenes import WIDE_AREA_RANGE, generate_scene
from timm_lookwhere.recipes import sparse_signs
from timm_lookwhere.teachers import TEACHER_BASE, window_features

# the evaluation is a script of the source tree, not a module: its globals, as running it by path defines them
EVALUATION = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'benchmarks' / 'sparse_signs.py'))


def test_patch_targets_name_the_sign_where_its_box_covers_a_fifth_of_the_patch():
    # a 16 px grid; the box covers columns 16..40 (patch 1 fully, patch 2 for 8 of 16 px) and rows 30..34
    boxes = torch.tensor([[16, 30, 40, 34]])
    targets = sparse_signs.patch_targets(boxes, torch.tensor([7]), torch.tensor([0]), torch.tensor([0]),
                                         window=4, patch=16, background=14).view(4, 4)
    # row 1 (px 16-32) holds 2 px of the box, row 2 (32-48) 2 px: 2/16 < 1/5 of a patch on both
    assert (targets == 14).all()
    boxes = torch.tensor([[16, 20, 40, 40]])  # rows: 12 px of row 1, 8 px of row 2
    targets = sparse_signs.patch_targets(boxes, torch.tensor([7]), torch.tensor([0]), torch.tensor([0]),
                                         window=4, patch=16, background=14).view(4, 4)
    expected = torch.full((4, 4), 14)
    expected[1:3, 1:3] = 7  # 12*16, 12*8, 8*16, 8*8 px of 256: all at least a fifth
    assert torch.equal(targets, expected)
    # a window starting at patch (1, 1) sees the same sign patches at its own (0, 0)..(1, 1)
    shifted = sparse_signs.patch_targets(boxes, torch.tensor([7]), torch.tensor([1]), torch.tensor([1]),
                                         window=2, patch=16, background=14).view(2, 2)
    assert (shifted == 7).all()


def test_sign_windows_hold_the_whole_sign_and_stay_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 220, (500,), generator=generator)
    y0 = torch.randint(0, 220, (500,), generator=generator)
    side = torch.randint(8, 37, (500,), generator=generator)
    boxes = torch.stack([x0, y0, (x0 + side).clamp(max=256), (y0 + side).clamp(max=256)], dim=1)
    rows, cols = sparse_signs.sign_windows(boxes, window=4, patch=16, grid=16, generator=generator)
    assert rows.min() >= 0 and cols.min() >= 0 and rows.max() <= 12 and cols.max() <= 12
    assert (cols * 16 <= boxes[:, 0]).all() and ((cols + 4) * 16 >= boxes[:, 2]).all()
    assert (rows * 16 <= boxes[:, 1]).all() and ((rows + 4) * 16 >= boxes[:, 3]).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 100  # placed at random, not always the same


def test_window_features_of_the_whole_image_are_the_vits_own_tokens():
    vit = timm.create_model(TEACHER_BASE, img_size=64, patch_size=16, embed_dim=32, depth=2,
                            num_heads=2, reg_tokens=0, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    zeros = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(window_features(vit, x, zeros, zeros), vit.forward_features(x))
        # a window is the same computation on its own patches, at their place in the image
        crop = x[:, :, 16:48, 32:64]
        ones, twos = torch.ones(2, dtype=torch.long), torch.full((2,), 2)
        window = window_features(vit, crop, ones, twos)
        model = sparse_signs.PatchSupervisedViT(vit, 3)
        logits, patch_logits = model(crop, ones, twos)
    assert window.shape == (2, 1 + 4, 32) and logits.shape == (2, 3) and patch_logits.shape == (2, 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize('config', ['512', '256'])
def test_tiny_run_goes_through_every_stage_and_writes_the_table_and_plot(config, tmp_path, restore_threads):
    argv = ['--config', config, '--output', str(tmp_path), '--tiny', '--workers', '0']
    evaluate = ['--output', str(tmp_path), '--workers', '0']
    assert sparse_signs.main(argv) == 0 and EVALUATION['main'](evaluate) == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['config'] == f'lookwhere_vitt16_{config}.sparse_signs'
    names = [row['model'] for row in results['rows']]
    assert names[0].startswith('full-res teacher') and names[1].startswith('low-res ViT')
    assert sum(n.startswith('LookWhere selection') for n in names) == 3
    assert sum(n.startswith('random selection') for n in names) == 3
    by_k = lambda prefix: [row['sign_seen'] for row in results['rows'] if row['model'].startswith(prefix)]  # noqa
    oracle, chosen, random = by_k('oracle selection'), by_k('LookWhere selection'), by_k('random selection')
    assert len(oracle) == 3 and all(o >= max(c, r) for o, c, r in zip(oracle, chosen, random))
    if config == '512':
        assert oracle[1:] == [1.0, 1.0]  # 51 patches hold every sign box of a 512 px scene (at most 20)
    assert results['rows'][0]['patches'] == (int(config) // 16) ** 2
    assert all(0 <= row['acc'] <= 1 and row['gflops'] > 0 for row in results['rows'])
    assert (tmp_path / 'results.md').read_text().count('\n') == len(names) + 2
    with Image.open(tmp_path / 'results.png') as plot:
        assert plot.format == 'PNG'
    distilled = json.loads((tmp_path / 'distill' / 'val.json').read_text())
    for shares in (distilled['sign_patches_seen'], distilled['target_sign_patches_seen']):  # selector, its target
        assert set(shares) == {'k=2%', 'k=5%', 'k=10%'} and all(0 <= v <= 1 for v in shares.values())
    timings = json.loads((tmp_path / 'timings.json').read_text())
    assert set(timings) == {*sparse_signs.STAGES, 'evaluate'}
    # a second run finds every stage done and redoes nothing
    assert sparse_signs.main(argv) == 0 and EVALUATION['main'](evaluate) == 0
    assert json.loads((tmp_path / 'timings.json').read_text()) == timings


def test_cached_split_holds_the_generators_scenes(tmp_path):
    cfg = sparse_signs.CONFIGS['512']['tiny']
    data = sparse_signs.load_split(str(tmp_path), cfg, 'test', 3, workers=0, seed=cfg.test_seed)
    again = sparse_signs.load_split(str(tmp_path), cfg, 'test', 3, workers=0, seed=cfg.test_seed)  # from the cache
    for i in range(3):
        scene = generate_scene(cfg.test_seed, 'test', i, img_size=512, area_range=WIDE_AREA_RANGE)
        assert torch.equal(data['images'][i], pil_to_tensor(scene.image))
        assert torch.equal(again['images'][i], data['images'][i])
        assert data['labels'][i] == scene.label and tuple(data['boxes'][i].tolist()) == scene.box


def test_stopped_training_continues_onto_the_same_batches(tmp_path, monkeypatch):
    data = dict(images=torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), labels=torch.arange(20) % 3,
                boxes=torch.zeros(20, 4, dtype=torch.long))

    def run(steps, state_path, stop_after=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
        generator = torch.Generator().manual_seed(5)
        batches = sparse_signs.cached_batches(data, 4, generator)
        seen = []

        def forward(m, batch):
            seen.append(batch[1].tolist())
            if stop_after is not None and len(seen) > stop_after:
                raise KeyboardInterrupt
            return m(batch[0]), 0.
        try:
            sparse_signs.fit_classifier('test', model, batches, steps, 1e-2, forward, str(state_path),
                                        generators=(generator,))
        except KeyboardInterrupt:
            pass
        return model, seen

    whole, whole_seen = run(6, tmp_path / 'whole.pth')
    monkeypatch.setattr(sparse_signs, 'SAVE_EVERY_S', 0)  # save after every step
    run(6, tmp_path / 'stopped.pth', stop_after=3)
    resumed, resumed_seen = run(6, tmp_path / 'stopped.pth')
    assert resumed_seen == whole_seen[3:]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    finished, none_seen = run(6, tmp_path / 'stopped.pth')  # a finished fit only reloads
    assert none_seen == []
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), finished.state_dict().values()))


@pytest.mark.slow
def test_a_lever_runs_in_its_own_folder_on_shared_data_and_teacher(tmp_path, restore_threads, capsys):
    base, lever = tmp_path / 'base', tmp_path / 'lever'
    common = ['--config', '256', '--tiny', '--workers', '0']
    assert sparse_signs.main(common + ['--output', str(base), '--stages', 'data,teacher,distill']) == 0
    assert sparse_signs.main(common + ['--output', str(lever), '--share-from', str(base), '--stages', 'distill',
                                       '--set', 'map_weight=0.25', 'distill_steps=2']) == 0
    assert (lever / 'teacher').is_symlink() and (lever / 'data').is_symlink() and (lever / 'cache').is_symlink()
    assert not (lever / 'distill').is_symlink() and (lever / 'distill' / 'val.json').exists()  # its own
    assert json.loads((lever / 'distill' / 'args.json').read_text())['map_weight'] == 0.25
    assert json.loads((lever / 'run.json').read_text())['overrides'] == dict(map_weight=0.25, distill_steps=2)
    capsys.readouterr()
    assert EVALUATION['main'](['--lever-table', str(base), str(lever)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and 'the configuration as is' in table[2] and 'map_weight=0.25' in table[3]
    # the lever's folder holds its own settings: another lever goes to another folder
    message = refusal(sparse_signs.main, common + ['--output', str(lever), '--stages', 'distill', '--set',
                                                   'map_weight=0.5', 'distill_steps=2'], sparse_signs.RECIPE.prog)
    assert '--set map_weight=0.5 (the run has --set map_weight=0.25)' in message
    assert json.loads((lever / 'run.json').read_text())['overrides'] == dict(map_weight=0.25, distill_steps=2)


def test_the_command_the_package_names_is_the_recipe_and_its_usage(capsys):
    from importlib.util import find_spec

    from timm_lookwhere.lookwhere import SIGNS_RECIPE
    assert SIGNS_RECIPE.startswith('python -m ') and find_spec(SIGNS_RECIPE.split()[-1]) is not None
    with pytest.raises(SystemExit):
        sparse_signs.main(['--help'])
    assert capsys.readouterr().out.startswith(f'usage: {SIGNS_RECIPE} [-h] --output DIR')
