"""The authors' augmentation keeps its meaning on every Pillow: a 0-bit posterize is a black image."""
import argparse
import random

import numpy as np
import torch
from PIL import Image, ImageOps

from timm.data import auto_augment

from timm_lookwhere import augment, distill


def noise_image(size=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_zero_bit_posterize_is_a_black_image_as_timm_intends():
    image = noise_image()
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # the level that keeps 0 bits
    assert op.level_fn(10, op.hparams) == (0,)
    assert augment.repair_posterize(op) == 1
    assert np.asarray(op(image)).max() == 0
    # every other bit count is Pillow's own posterize
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(augment.posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert augment.posterize(image, 8) is image


def test_authors_augmentation_survives_its_zero_bit_draws():
    transform = augment.create_train_transform((3, 32, 32))
    ops = [op for op in transform.transforms[2].ops if op.name == 'PosterizeIncreasing']
    assert ops and all(op.aug_fn is augment.posterize for op in ops)
    bits_drawn = []
    repaired = ops[0].aug_fn
    ops[0].aug_fn = lambda img, bits, **kw: bits_drawn.append(bits) or repaired(img, bits, **kw)
    image = noise_image(40)
    random.seed(0)  # RandAugment draws from python's random
    for _ in range(3000):
        transform(image)
    assert 0 in bits_drawn  # magnitude noise reaches the 0-bit posterize, and nothing raised


def test_distillation_transform_has_the_repaired_posterize(tmp_path):
    args = argparse.Namespace(dataset='', data_dir=str(tmp_path), train_split='', batch_size=2, seed=0,
                              no_aug=False, scale=(0.08, 1.0))
    (tmp_path / 'a').mkdir()
    noise_image().save(tmp_path / 'a' / '0.png')
    student = torch.nn.Module()
    student.patch_embed = argparse.Namespace(img_size=(56, 56))
    student.pretrained_cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    _, transform = distill.create_data(args, student)
    assert augment.repair_posterize(transform) == 0  # nothing left to repair
    rand_augment = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)][0]
    assert any(op.aug_fn is augment.posterize for op in rand_augment.ops)
