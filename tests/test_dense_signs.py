"""Dense sign scenes and the dense-signs recipe: pure, disjoint, masks that match the signs, a folder segmentation
tools read, every stage of the pipeline end to end with its evaluation (benchmarks/dense_signs.py, run by path),
and the shipped segmenter's floor on fresh scenes."""
import dataclasses
import json
import logging
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_lookwhere.scenes import (
    NUM_SIGNS_RANGE, SEGMENTATION_CLASSES, WIDE_AREA_RANGE, DenseSigns, generate_dense_scene, generate_scene,
    write_segmentation_folder,
)
from timm_lookwhere.recipes import dense_signs

# the evaluation is a script of the source tree, not a module: its globals, as running it by path defines them
EVALUATION = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'benchmarks' / 'dense_signs.py'))


def test_a_dense_scene_is_a_pure_function_of_seed_split_and_index():
    a, b = generate_dense_scene(7, 'train', 3), generate_dense_scene(7, 'train', 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask)
    assert (a.labels, a.boxes) == (b.labels, b.boxes)
    for other in (generate_dense_scene(7, 'train', 4), generate_dense_scene(7, 'val', 3)):
        assert not np.array_equal(np.asarray(a.image), np.asarray(other.image))
    # its own stream: the sparse scene of the same (seed, split, index) is another picture
    sparse = generate_scene(7, 'train', 3, img_size=512, area_range=WIDE_AREA_RANGE)
    assert not np.array_equal(np.asarray(a.image)[:64, :64], np.asarray(sparse.image)[:64, :64])


def test_the_mask_holds_each_sign_in_its_box_with_its_class_and_size():
    counts = []
    for index in range(12):
        scene = generate_dense_scene(0, 'val', index)
        assert scene.image.size == (512, 512) and scene.mask.shape == (512, 512) and scene.mask.dtype == np.uint8
        counts.append(len(scene.labels))
        outside = np.ones_like(scene.mask, dtype=bool)
        for label, (x0, y0, x1, y1) in zip(scene.labels, scene.boxes):
            inside = scene.mask[y0:y1, x0:x1]
            assert set(np.unique(inside)) <= {0, label + 1}  # signs do not touch: one class per box
            fraction = (inside == label + 1).sum() / 512 ** 2
            assert 0.9 * WIDE_AREA_RANGE[0] < fraction < 1.05 * WIDE_AREA_RANGE[1], fraction
            outside[y0:y1, x0:x1] = False
        assert (scene.mask[outside] == 0).all()  # nothing labelled outside the signs' boxes
    assert min(counts) >= NUM_SIGNS_RANGE[0] and max(counts) <= NUM_SIGNS_RANGE[1] and len(set(counts)) > 2


def test_segmentation_folder_has_the_ade20k_layout_and_resumes(tmp_path):
    root = write_segmentation_folder(str(tmp_path), 'val', 3, img_size=128, progress=False)
    assert (tmp_path / 'classes.txt').read_text().split() == list(SEGMENTATION_CLASSES)
    dense = DenseSigns('val', 3, img_size=128)
    for index in range(3):
        image, mask = dense[index]
        with Image.open(tmp_path / 'images' / 'val' / f'{index:06d}.png') as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
        with Image.open(tmp_path / 'annotations' / 'val' / f'{index:06d}.png') as written:
            assert written.mode == 'L' and np.array_equal(np.asarray(written), np.asarray(mask))
    stamp = os.path.getmtime(tmp_path / 'images' / 'val' / '000001.png')
    write_segmentation_folder(root, 'val', 3, img_size=128, progress=False)  # finds them written: keeps them
    assert os.path.getmtime(tmp_path / 'images' / 'val' / '000001.png') == stamp


@pytest.mark.slow
def test_tiny_run_goes_through_every_stage_and_writes_the_table_and_plot(tmp_path, restore_threads):
    argv = ['--output', str(tmp_path), '--tiny', '--workers', '0']
    evaluate = ['--output', str(tmp_path), '--workers', '0']
    assert dense_signs.main(argv) == 0 and EVALUATION['main'](evaluate) == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['config'] == 'lookwhere_vitt16_512.dense_signs'
    names = [row['model'] for row in results['rows']]
    assert names[0].startswith('full-res teacher') and names[1].startswith('low-res ViT')
    small_k = EVALUATION['SMALL_K']
    for prefix, count in (('LookWhere, selector-informed fill', len(dense_signs.K_RATIOS)),
                          ('random selection', len(small_k)), ('oracle selection', len(small_k))):
        assert sum(n.startswith(prefix) for n in names) == count, prefix
    seen = {(r['selection'], r['k_ratio']): r['sign_seen'] for r in results['rows'] if 'selection' in r}
    oracle = 'oracle selection (sign patches first)'
    assert all(seen[oracle, k] >= max(seen['LookWhere', k], seen['random selection', k]) for k in small_k)
    assert seen[oracle, 0.2] == 1.0  # 204 patches hold every sign of a scene
    assert set(results['claims']) == {'selector'}
    assert len(results['claims']['selector']['steps']) == len(dense_signs.K_RATIOS) - 1
    for row in results['rows']:
        assert 0 <= row['miou_signs'] <= 1 and 0 <= row['pixel_acc'] <= 1 and row['gflops'] > 0
        low, high = row['miou_signs_ci95']
        assert low <= row['miou_signs'] + 1e-9 and row['miou_signs'] <= high + 1e-9
        assert len(row['iou']) == len(SEGMENTATION_CLASSES)
    teacher = results['rows'][0]
    assert teacher['patches'] == 1024 and (teacher['of_teacher'] == 1 or teacher['miou_signs'] == 0)
    assert (tmp_path / 'results.md').read_text().startswith('| model |')
    with Image.open(tmp_path / 'results.png') as plot:
        assert plot.format == 'PNG'
    assert os.path.getsize(tmp_path / 'export' / 'lookwhere_vitt16_512_dense_signs.safetensors') > 0
    timings = json.loads((tmp_path / 'timings.json').read_text())
    assert set(timings) == {*dense_signs.STAGES, 'evaluate'}
    # a second run finds every stage done and redoes nothing
    assert dense_signs.main(argv) == 0 and EVALUATION['main'](evaluate) == 0
    assert json.loads((tmp_path / 'timings.json').read_text()) == timings


@pytest.mark.slow
def test_a_stopped_stage_continues_from_its_saved_state(tmp_path, restore_threads, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    argv = ['--output', str(tmp_path), '--tiny', '--workers', '0', '--stages', 'data,teacher', '--set',
            'teacher_steps=4']
    monkeypatch.setattr(dense_signs, 'SAVE_EVERY_S', 0)  # a state after every step
    cell_loss, calls = dense_signs.cell_loss, []

    def stopped_at_step_3(cfg):  # the scenes phase, stopped in its third step
        loss = cell_loss(cfg)

        def stopping(model, batch):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return loss(model, batch)
        return stopping
    monkeypatch.setattr(dense_signs, 'cell_loss', stopped_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dense_signs.main(argv)
    assert torch.load(tmp_path / 'teacher' / 'state.pth', weights_only=True)['step'] == 2
    assert not (tmp_path / 'teacher' / 'model.pth').exists()
    # launched again with the same settings: the stage goes on from step 2 instead of starting again
    monkeypatch.setattr(dense_signs, 'cell_loss', cell_loss)
    assert dense_signs.main(argv) == 0
    assert torch.load(tmp_path / 'teacher' / 'state.pth', weights_only=True)['step'] == 4
    assert 'teacher (scenes): continuing after step 2 of 4' in caplog.text


def test_cached_split_holds_the_generators_scenes_and_masks(tmp_path):
    cfg = dense_signs.CONFIGS['tiny']
    data = dense_signs.load_split(str(tmp_path), cfg, 'test', 2, workers=0, seed=cfg.test_seed)
    again = dense_signs.load_split(str(tmp_path), cfg, 'test', 2, workers=0, seed=cfg.test_seed)  # from the cache
    for i in range(2):
        scene = generate_dense_scene(cfg.test_seed, 'test', i)
        assert torch.equal(data['images'][i], torch.from_numpy(np.array(scene.image)).permute(2, 0, 1))
        assert torch.equal(data['masks'][i], torch.from_numpy(scene.mask))
        assert torch.equal(again['masks'][i], data['masks'][i])
    holding = dense_signs.sign_patches(data['masks'], 16)  # (2, 1024)
    assert holding.shape == (2, 1024) and all(h.any() for h in holding)


# The shipped segmenter (the selector-informed fill) at k = 10% on these 48 scenes measured 62.5% mIoU of the sign
# classes; resampling the 48 scenes (bootstrap, 1000 draws) gives a standard error of 2.0 points. The floor sits 4
# of them below, so a model that still works fails this about once in 30000 runs, while a broken one cannot pass
# (the authors' inverse-distance fill trained the same way scores 27%, the low-res ViT at equal cost 6%).
SHIPPED_SEED = 2027  # a seed no stage used (training and validation 0, the benchmark's test scenes 2026)
SHIPPED_MIOU = 0.625
SHIPPED_FLOOR = 0.545


@pytest.mark.slow
def test_shipped_segmenter_keeps_its_miou_on_fresh_scenes():
    from timm_lookwhere.segmentation import confusion_matrix, create_segmenter, mean_iou
    model = create_segmenter('lookwhere_vitt16_512.dense_signs', pretrained=True, k_ratio=0.1).eval()
    confusion = torch.zeros(len(SEGMENTATION_CLASSES), len(SEGMENTATION_CLASSES), dtype=torch.long)
    for start in range(0, 48, 16):
        scenes = [generate_dense_scene(SHIPPED_SEED, 'test', i) for i in range(start, start + 16)]
        images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes])
        with torch.no_grad():
            prediction = model(dense_signs.normalize(images)).argmax(1)
        for p, s in zip(prediction, scenes):
            confusion += confusion_matrix(p, torch.from_numpy(s.mask), len(SEGMENTATION_CLASSES))
    miou = mean_iou(confusion, range(1, len(SEGMENTATION_CLASSES)))
    assert miou >= SHIPPED_FLOOR, f'{miou:.3f} < floor {SHIPPED_FLOOR} (measured {SHIPPED_MIOU})'


def test_dense_demo_draws_the_chosen_patches_the_predicted_and_the_true_mask(tmp_path, capsys):
    from timm_lookwhere import cli
    out = tmp_path / 'dense.png'
    assert cli.main(['demo', '--dense', '--runs', '1', '--index', '2', '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'generated dense test scene 2' in printed and 'patches holding a sign' in printed
    with Image.open(out) as figure:
        assert figure.width == 3 * (512 + 8) + 8  # three 512 px panels and their margins


@pytest.mark.parametrize('draw', ['uniform', 'log-uniform', 'mixed'])
def test_k_is_drawn_over_the_whole_range_as_the_setting_says(draw):
    cfg = dataclasses.replace(dense_signs.CONFIGS['full'], k_range=(0.02, 1.0), k_draw=draw)
    generator = torch.Generator().manual_seed(0)
    ks = torch.tensor([dense_signs.draw_k_count(cfg, 1024, generator) for _ in range(4000)]).float()
    assert ks.min() >= 20 and ks.max() <= 1024 and ks.max() > 950 and ks.min() < 25  # 2% to every patch
    below_10_percent = (ks < 102).float().mean().item()
    # uniform: 8% of the draws below 10%; log-uniform: ln(5) / ln(50) = 41%; mixed: half of each
    expected = {'uniform': 0.084, 'log-uniform': 0.411, 'mixed': 0.248}[draw]
    assert abs(below_10_percent - expected) < 0.03, (draw, below_10_percent)
