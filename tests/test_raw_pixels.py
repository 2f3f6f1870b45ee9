"""uint8 pixels in: the model normalises, with its pretrained cfg's mean and std, only what it reads (the
selector's low-res copy and the k patches), and gives the float path's results on the same pixels."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import timm
from timm_lookwhere.layers import normalize_pixels
from timm_lookwhere.scenes import WIDE_AREA_RANGE, generate_scene

from conftest import TINY, assert_same_selection, tiny_model
from test_many_sizes import naflex_batch

CLOSE = dict(rtol=1e-5, atol=1e-5)


def scene_pixels(seed, size):
    """A generated test scene as (1, 3, size, size) uint8 pixels."""
    image = generate_scene(seed, 'test', 0, img_size=size, area_range=WIDE_AREA_RANGE).image.convert('RGB')
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()


def as_float(model, pixels):
    """What timm's ToTensor + Normalize with the model's pretrained cfg give for these pixels."""
    return normalize_pixels(pixels, model.pixel_mean, model.pixel_std, pixels.dim() - 3)


def results(model, x):
    with torch.no_grad():
        out = model.forward_all(x)
        return out, model.forward_head(out['tokens']), model.dense_from_tokens(out['tokens'], out['indices'])


@pytest.mark.parametrize('name', ['lookwhere_vitt16_256.sparse_signs', 'lookwhere_vitt16_512.sparse_signs'])
def test_uint8_pixels_give_the_float_paths_selection_logits_and_dense_map(name):
    """At the authors' downscale the low-res copy reads 2x2 pixels per cell: normalised there, it is the float
    path's copy within float rounding, and so is everything after it."""
    model = timm.create_model(name, pretrained=True, k_ratio=0.05).eval()
    size = model.patch_embed.img_size[0]
    pixels = torch.cat([scene_pixels(seed, size) for seed in (11, 12, 13)])
    (raw, raw_logits, raw_dense), (ref, ref_logits, ref_dense) = results(model, pixels), results(
        model, as_float(model, pixels))
    torch.testing.assert_close(raw['map'], ref['map'], **CLOSE)
    assert_same_selection(raw['indices'], raw['map'], ref['indices'], ref['map'], name)
    if torch.equal(raw['indices'], ref['indices']):
        torch.testing.assert_close(raw_logits, ref_logits, **CLOSE)
        torch.testing.assert_close(raw_dense, ref_dense, **CLOSE)


def test_beyond_the_authors_downscale_the_uint8_copy_is_rounded_and_keeps_nearly_every_patch():
    """A 1000 px scene to a 208 px copy (4.8x) is antialiased, made in uint8: rounding to whole pixel levels moves
    the map a little (measured: at most 0.07), a near-tied patch may trade places, the class stays."""
    model = timm.create_model('lookwhere_vitt16_512.sparse_signs', pretrained=True, k_ratio=0.05,
                              dynamic_img_size=True, dynamic_img_pad=True).eval()
    for seed in (1, 2, 3):
        pixels = scene_pixels(seed, 1000)[..., :993, :997]  # odd sides: padded
        (raw, raw_logits, _), (ref, ref_logits, _) = results(model, pixels), results(model, as_float(model, pixels))
        torch.testing.assert_close(raw['map'], ref['map'], rtol=0, atol=0.15)
        chosen, expected = set(raw['indices'][0].tolist()), set(ref['indices'][0].tolist())
        assert len(chosen & expected) >= 0.95 * len(expected)
        assert raw_logits.argmax() == ref_logits.argmax()


# the authors' bilinear copy at every size, which reads uint8 pixels exactly (the tiny selector's 42 px copy would
# be antialiased beyond 143 px, and rounded)
EXACT_COPY = dict(dynamic_img_size=True, dynamic_img_pad=True, selector_antialias=False)


@pytest.mark.parametrize('size', [(131, 157), (112, 112), (57, 300)])
def test_odd_sides_of_uint8_pixels_are_padded_with_what_normalises_to_zero(size):
    model = tiny_model(num_classes=5, k_ratio=0.3, **EXACT_COPY)
    pixels = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (raw, raw_logits, raw_dense), (ref, ref_logits, ref_dense) = results(model, pixels), results(
        model, as_float(model, pixels))  # the float path pads its normalised batch with zeros
    torch.testing.assert_close(raw['map'], ref['map'], **CLOSE)
    assert_same_selection(raw['indices'], raw['map'], ref['indices'], ref['map'], str(size))
    if torch.equal(raw['indices'], ref['indices']):
        torch.testing.assert_close(raw_logits, ref_logits, **CLOSE)
        torch.testing.assert_close(raw_dense, ref_dense, **CLOSE)


@pytest.mark.parametrize('antialias', [False, None], ids=['exact_copy', 'rounded_copy_beyond_the_downscale'])
@pytest.mark.parametrize('k_mode', [dict(k=6), dict(k_ratio=0.2)], ids=['fixed_k', 'k_ratio'])
def test_a_uint8_list_gives_each_image_what_it_gives_alone_and_what_floats_give(k_mode, antialias):
    model = tiny_model(num_classes=5, global_pool='avg', **dict(EXACT_COPY, selector_antialias=antialias), **k_mode)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in [(112, 112), (131, 157), (420, 266), (60, 61)]]
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(logits, torch.cat([model(image[None]) for image in images]), **CLOSE)
        if antialias is False:
            torch.testing.assert_close(logits, model([as_float(model, image) for image in images]), **CLOSE)
        for dense, image in zip(model.forward_dense(images), images):
            torch.testing.assert_close(dense, model.forward_dense(image[None])[0], **CLOSE)


@pytest.mark.parametrize('size', [(300, 331), (420, 448)], ids=['padded', 'whole_patches'])
def test_a_decoders_height_width_channel_view_gives_what_contiguous_pixels_give(size):
    """read_image hands (C, H, W) views of (H, W, C) memory; the copy and the patches read them in place."""
    model = tiny_model(num_classes=5, dynamic_img_size=True, dynamic_img_pad=True, k_ratio=0.2)
    decoded = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    view = decoded.permute(2, 0, 1)
    assert not view.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model([view]), model([view.contiguous()]), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_dense(view[None]), model.forward_dense(view.contiguous()[None]),
                                   rtol=0, atol=0)


def test_uint8_naflex_patches_are_normalised_as_the_loaders_floats():
    model = tiny_model(num_classes=5, dynamic_img_size=True, dynamic_img_pad=True, k=5)
    generator = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in [(56, 70), (84, 84)]]
    with torch.no_grad():
        floats = naflex_batch([as_float(model, image) for image in images])
        torch.testing.assert_close(model(naflex_batch(images)), model(floats), **CLOSE)


def test_uint8_pixels_are_normalised_with_the_pretrained_cfgs_mean_and_std():
    cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = timm.create_model('lookwhere_vitt16_256', pretrained_cfg_overlay=cfg, embed_dim=32, depth=1,
                              num_heads=2).eval()
    assert model.pixel_mean.tolist() == [0.5] * 3 and model.pixel_std.tolist() == [0.25] * 3
    assert 'pixel_mean' not in model.state_dict()  # the weights files do not change
    pixels = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), model((pixels / 255 - 0.5) / 0.25), **CLOSE)
    half = tiny_model().half()  # a half model takes uint8 in and computes in half
    with torch.no_grad():
        assert half(torch.zeros(1, 3, 112, 112, dtype=torch.uint8)).dtype == torch.float16


class LargestFloatTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize('side', [300, 900])  # the authors' resize and the antialiased one
def test_no_float_copy_of_a_uint8_frame_is_ever_made(side):
    """Cost follows k: the frame's pixels are read where the copy and the k patches need them, never converted
    whole (the float path's ToTensor + Normalize make 3 x H x W floats)."""
    model = tiny_model(num_classes=5, dynamic_img_size=True, dynamic_img_pad=True, k=8)
    pixels = torch.randint(0, 256, (1, 3, side + 3, side + 5), dtype=torch.uint8)
    with torch.no_grad(), LargestFloatTensor() as probe:
        model(pixels)
    frame = pixels.numel()
    assert probe.largest < frame / 4, f'a float tensor of {probe.largest} values for a frame of {frame} pixels'
    with torch.no_grad(), LargestFloatTensor() as probe:
        model(as_float(model, pixels))
    assert probe.largest >= frame  # the probe sees the float path's full-frame work


def test_a_full_size_uint8_batch_on_a_fixed_model_and_the_models_own_size_agree():
    model = tiny_model(num_classes=5)
    pixels = torch.randint(0, 256, (3, 3, TINY['img_size'], TINY['img_size']), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), model(as_float(model, pixels)), **CLOSE)
        torch.testing.assert_close(model(list(pixels)), model(pixels), **CLOSE)
