"""Procedural sparse traffic-sign scenes: deterministic, disjoint splits, sparse signs, timm-readable."""
import numpy as np
import pytest
import torch

from timm.data import create_dataset, create_loader

from timm_lookwhere.scenes import (
    AREA_RANGE, CLASS_NAMES, SIGN_CLASSES, SPLITS, SceneTensors, SparseSigns, folder_names, generate_scene, scene_label,
    scene_rng, write_image_folder,
)


def pixels(scene):
    return np.asarray(scene.image)


def test_a_scene_is_a_pure_function_of_seed_split_and_index():
    a, b = generate_scene(7, 'train', 3), generate_scene(7, 'train', 3)
    assert np.array_equal(pixels(a), pixels(b))
    assert (a.label, a.box, a.area_fraction) == (b.label, b.box, b.area_fraction)
    assert not np.array_equal(pixels(a), pixels(generate_scene(7, 'train', 4)))
    assert not np.array_equal(pixels(a), pixels(generate_scene(8, 'train', 3)))


def test_splits_draw_from_disjoint_seed_streams():
    # the same (seed, index) in each split is a different scene, down to the first random number
    first_draws = {split: scene_rng(0, split, 5).random(4).tolist() for split in SPLITS}
    assert len({tuple(v) for v in first_draws.values()}) == len(SPLITS)
    images = [pixels(generate_scene(0, split, 5)) for split in SPLITS]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_the_sign_covers_one_to_two_percent_of_the_image():
    scenes = [generate_scene(1, 'val', i) for i in range(40)]
    fractions = np.array([s.area_fraction for s in scenes])
    # the silhouette is sized to AREA_RANGE; rotation and antialiasing move it by a hair
    assert fractions.min() > 0.95 * AREA_RANGE[0] and fractions.max() < 1.02 * AREA_RANGE[1], fractions
    for scene in scenes:
        x0, y0, x1, y1 = scene.box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        assert (x1 - x0) * (y1 - y0) < 0.05 * 256 ** 2  # the whole box is small too


def test_the_sign_is_drawn_inside_its_box():
    # the same scene with another class forced: only the sign changes, so pixels differ only near the box
    a = generate_scene(2, 'test', 11, label=8)  # ahead_only: blue circle, arrow up
    b = generate_scene(2, 'test', 11, label=9)  # turn_left: the same circle, arrow left
    assert a.box == b.box
    changed = np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max(-1) > 40  # (H, W)
    ys, xs = np.nonzero(changed)
    assert len(ys) > 10, 'the arrow direction must change the image'
    x0, y0, x1, y1 = a.box
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


def test_every_class_is_drawn_about_equally_often():
    labels = [scene_label(0, 'train', i) for i in range(1400)]
    assert labels[:20] == [generate_scene(0, 'train', i, img_size=64).label for i in range(20)]
    counts = np.bincount(labels, minlength=len(SIGN_CLASSES))
    assert len(CLASS_NAMES) >= 10 and counts.min() >= 70 and counts.max() <= 130, counts  # 100 expected


def test_classes_differ_by_shape_colour_or_symbol():
    keys = {(c.shape, c.fill, c.border, c.symbol) for c in SIGN_CLASSES}
    assert len(keys) == len(SIGN_CLASSES)
    assert len({c.shape for c in SIGN_CLASSES}) >= 5 and len({c.symbol for c in SIGN_CLASSES}) >= 8


def test_dataset_gives_images_and_labels_through_timm_loader():
    dataset = SparseSigns('test', num_samples=6, img_size=128, seed=3)
    loader = create_loader(dataset, (3, 128, 128), batch_size=3, use_prefetcher=False, num_workers=0, crop_pct=1.0)
    images, labels = next(iter(loader))
    assert images.shape == (3, 3, 128, 128) and images.dtype == torch.float32
    assert labels.tolist() == [generate_scene(3, 'test', i, img_size=128).label for i in range(3)]


def test_scene_tensors_give_each_scenes_pixels_label_and_sign_box_in_batches():
    signs = SparseSigns('val', num_samples=4, img_size=96, seed=2)
    images, labels, boxes = next(iter(torch.utils.data.DataLoader(SceneTensors(signs), batch_size=4)))
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.uint8 and len(SceneTensors(signs)) == 4
    for i in range(4):
        scene = signs.scene(i)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), pixels(scene))
        assert labels[i] == scene.label and tuple(boxes[i].tolist()) == scene.box


def test_image_folder_export_reads_back_in_timm_with_the_same_labels(tmp_path):
    folder = write_image_folder(str(tmp_path), 'val', 10, img_size=96, seed=4, progress=False)
    dataset = create_dataset('', root=str(tmp_path), split='val', class_map=str(tmp_path / 'class_map.txt'))
    assert len(dataset) == 10
    expected = sorted((i, generate_scene(4, 'val', i, img_size=96).label) for i in range(10))
    got = sorted((int(path.rsplit('/', 1)[1][:-4]), label) for path, label in dataset.reader.samples)
    assert got == expected
    image, label = dataset[0]
    assert image.size == (96, 96)
    # a second call keeps what is there and writes nothing twice
    assert write_image_folder(str(tmp_path), 'val', 10, img_size=96, seed=4, progress=False) == folder
    assert sorted(dataset.reader.class_to_idx) == list(folder_names())


@pytest.mark.parametrize('kwargs, message', [
    (dict(split='training'), 'split must be one of'),
    (dict(index=-1), 'must be >= 0'),
    (dict(img_size=32), 'img_size must be an int >= 64'),
    (dict(label=len(CLASS_NAMES)), 'label must be in'),
])
def test_bad_scene_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_scene(**kwargs)


def test_bad_dataset_arguments_name_the_problem():
    with pytest.raises(ValueError, match='num_samples'):
        SparseSigns('train', num_samples=0)
    with pytest.raises(ValueError, match='split'):
        SparseSigns('dev')
    with pytest.raises(IndexError, match='out of range'):
        SparseSigns('train', num_samples=2)[2]
