"""One model, every image at its own size: dynamic_img_size, dynamic_img_pad, set_input_size, and the
selector's low-res copy at large downscales."""
import pytest
import torch
import torch.nn.functional as F

import timm
from timm.layers import resample_abs_pos_embed
from timm.models import get_model_traits

from timm_lookwhere.layers import sample_abs_pos_embed
from timm_lookwhere.lookwhere import AUTHORS_SELECTOR_DOWNSCALE

from conftest import TINY, assert_same_selection, randomize_

# the tiny architecture with the authors' 518 px grid stored (37x37), as their weights have it
STORED = dict(TINY, img_size=518)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A flat state dict of random weights at 518 px, the file every model below is built from."""
    torch.manual_seed(0)
    model = randomize_(timm.create_model('lookwhere_vitb_518', **STORED))
    path = tmp_path_factory.mktemp('weights') / 'lookwhere.pth'
    torch.save(model.state_dict(), path)
    return str(path)


def build(weights, **kwargs):
    kwargs = dict(STORED, **kwargs)
    return timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=weights),
                             **kwargs).eval()


@pytest.mark.parametrize('size', [(518, 518), (700, 1036), (1036, 700), (2156, 3836)])
def test_one_dynamic_model_equals_fixed_size_models_built_at_each_size(weights, size):
    dynamic = build(weights, dynamic_img_size=True, k_ratio=0.01)
    fixed = build(weights, img_size=size, k_ratio=0.01)  # position embeddings resized once, at load
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        ours, theirs = dynamic.forward_all(x), fixed.forward_all(x)
    assert ours['grid_size'] == theirs['grid_size'] == (size[0] // 14, size[1] // 14)
    assert ours['indices'].shape[1] == fixed.k == max(1, int(0.01 * (size[0] // 14) * (size[1] // 14)))
    assert_same_selection(ours['indices'], ours['map'], theirs['indices'], theirs['map'])
    if not torch.equal(ours['indices'], theirs['indices']):
        return  # a near-tie traded places (another CPU's sums): the rest compares other patches
    torch.testing.assert_close(ours['tokens'], theirs['tokens'], rtol=0, atol=1e-5)
    if size[0] * size[1] < 2e6:  # the dense fill too, where it is cheap
        torch.testing.assert_close(dynamic.forward_dense(x), fixed.forward_dense(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('new_size', [(20, 20), (37, 37), (50, 74), (74, 50), (5, 90), (1, 1)])
def test_position_embeddings_of_the_chosen_patches_equal_resizing_the_whole_grid(new_size):
    g = torch.Generator().manual_seed(0)
    stored = torch.randn(1, 37 * 37, 24, generator=g)
    indices = torch.randint(0, new_size[0] * new_size[1], (3, 40), generator=g)
    whole = resample_abs_pos_embed(stored, new_size=new_size, old_size=(37, 37), num_prefix_tokens=0,
                                   interpolation='bicubic', antialias=False)  # checkpoint_filter_fn's resize
    torch.testing.assert_close(sample_abs_pos_embed(stored, (37, 37), new_size, indices), whole[0][indices],
                               rtol=0, atol=1e-5)


def test_position_embeddings_are_interpolated_for_the_k_chosen_patches_only(weights):
    model = build(weights, dynamic_img_size=True, k=8)
    seen = []
    original = torch.nn.functional.embedding_bag

    def spy(input, weight, *args, **kwargs):
        seen.append(tuple(input.shape))
        return original(input, weight, *args, **kwargs)
    torch.nn.functional.embedding_bag = spy
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 2156, 3836))
    finally:
        torch.nn.functional.embedding_bag = original
    assert seen == [(2 * 8, 16)]  # one bag of 4x4 bicubic taps per chosen patch, not the 42 196-cell grid


def test_fixed_size_model_reads_its_stored_position_embeddings_unchanged(weights):
    model = build(weights, img_size=(700, 1036))
    x = torch.randn(1, 3, 700, 1036)
    indices = torch.tensor([[0, 5, 73, 3699]])
    tokens = model.embed_patches(x, indices, model.grid_size)
    patches = x.unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5).reshape(1, -1, 3 * 14 * 14)
    plain = patches[:, indices[0]] @ model.patch_embed.proj.weight.flatten(1).T + model.patch_embed.proj.bias
    assert torch.allclose(tokens - plain, model.pos_embed[:, indices[0]], atol=1e-5)


def test_padding_takes_any_size_and_equals_a_fixed_model_on_the_padded_image(weights):
    dynamic = build(weights, dynamic_img_size=True, dynamic_img_pad=True, k_ratio=0.1)
    x = torch.randn(2, 3, 123, 200)
    padded = F.pad(x, (0, 210 - 200, 0, 126 - 123))  # right and bottom, to whole patches, as timm's ViT
    fixed = build(weights, img_size=(126, 210), k_ratio=0.1)
    with torch.no_grad():
        ours, theirs = dynamic.forward_all(x), fixed.forward_all(padded)
    assert ours['grid_size'] == (9, 15)
    assert_same_selection(ours['indices'], ours['map'], theirs['indices'], theirs['map'])
    if torch.equal(ours['indices'], theirs['indices']):  # (not where a near-tie traded places)
        torch.testing.assert_close(ours['tokens'], theirs['tokens'], rtol=0, atol=1e-5)
    # every chosen patch holds image pixels: padding is only ever part of the last row and column
    rows, cols = ours['indices'] // 15, ours['indices'] % 15
    assert (rows * 14 < 123).all() and (cols * 14 < 200).all()


def test_sizes_a_model_cannot_take_are_clear_errors(weights):
    dynamic = build(weights, dynamic_img_size=True)
    with pytest.raises(ValueError, match=r'multiples of the patch size 14, got 123x200.*dynamic_img_pad=True'):
        dynamic(torch.randn(1, 3, 123, 200))
    fixed_k = build(weights, dynamic_img_size=True, k=40)
    with pytest.raises(ValueError, match=r'k=40 is more than the 16 patches of a 4x4 grid \(56x56 px images\)'):
        fixed_k(torch.randn(1, 3, 56, 56))
    assert fixed_k(torch.randn(1, 3, 112, 112)).shape == (1, 32)  # 64 patches: enough
    fixed = build(weights)
    with pytest.raises(ValueError, match=r'built for 518x518 images, got 112x112.*dynamic_img_size=True'):
        fixed(torch.randn(1, 3, 112, 112))


def test_k_ratio_follows_each_images_grid(weights):
    model = build(weights, dynamic_img_size=True, k_ratio=0.25)
    assert model.k == int(0.25 * 37 * 37)  # at the model's own size
    for size, patches in (((112, 112), 64), ((112, 224), 128), ((56, 42), 12)):
        with torch.no_grad():
            assert model.forward_selection(torch.randn(1, 3, *size))['indices'].shape == (1, int(0.25 * patches))


def test_maps_follow_each_images_grid(weights):
    backbone = timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=weights),
                                 features_only=True, dynamic_img_size=True, out_indices=(0, 1), **STORED).eval()
    model = build(weights, dynamic_img_size=True)
    for size in ((112, 112), (98, 182)):
        x = torch.randn(2, 3, *size)
        grid = (size[0] // 14, size[1] // 14)
        with torch.no_grad():
            assert [f.shape for f in backbone(x)] == [(2, 32, *grid)] * 2
            assert model.forward_dense(x).shape == (2, 32, *grid)
            nlc = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
            assert [f.shape for f in nlc] == [(2, grid[0] * grid[1], 32)] * 2
            assert model.forward_selection(x)['map'].shape == (2, grid[0] * grid[1])


def test_set_input_size_resizes_as_loading_at_that_size_does(weights):
    model = build(weights, k_ratio=0.25)
    model.pos_embed.requires_grad_(False)
    model.set_input_size(img_size=(224, 336))
    reference = build(weights, img_size=(224, 336), k_ratio=0.25)
    assert model.grid_size == (16, 24) and model.k == int(0.25 * 16 * 24)
    assert not model.pos_embed.requires_grad  # a frozen embedding stays frozen, as in timm's ViT
    torch.testing.assert_close(model.pos_embed, reference.pos_embed, rtol=0, atol=1e-6)
    x = torch.randn(1, 3, 224, 336)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)
    assert get_model_traits(model)['img_size'] == (224, 336)
    with pytest.raises(ValueError, match='patch size of a LookWhere is fixed'):
        model.set_input_size(patch_size=16)
    counted = build(weights, k=500)
    with pytest.raises(ValueError, match='k=500 is more than the 64 patches'):
        counted.set_input_size(img_size=112)


def test_dynamic_model_says_it_takes_every_size_and_keeps_the_weights_data_config(weights):
    dynamic, fixed = build(weights, dynamic_img_size=True), build(weights)
    assert get_model_traits(dynamic)['fixed_input_size'] is False
    assert get_model_traits(fixed)['fixed_input_size'] is True
    # pretrained_cfg describes the weights: normalisation, interpolation and the size they were trained at
    config = timm.data.resolve_data_config(model=dynamic)
    assert config['input_size'] == (3, 518, 518) and config['mean'] == timm.data.IMAGENET_DEFAULT_MEAN


def selector_input(model, x):
    """The low-res copy the selector's ViT receives."""
    seen = []
    handle = model.selector.backbone.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model.forward_selection(x)
    handle.remove()
    return seen[0]


def test_selector_copy_is_the_authors_resize_at_their_scale_and_antialiased_beyond(weights):
    model = build(weights, dynamic_img_size=True)  # selector at 42 px: the authors' 3.4x is up to 142 px
    near = torch.randn(1, 3, 140, 140)  # 3.3x
    far = torch.randn(1, 3, 420, 280)  # 10x
    authors = F.interpolate(near, size=(42, 42), mode='bilinear', align_corners=False, antialias=False)
    assert 140 / 42 < AUTHORS_SELECTOR_DOWNSCALE < 420 / 42
    assert torch.equal(selector_input(model, near), authors)
    antialiased = F.interpolate(far, size=(42, 42), mode='bilinear', align_corners=False, antialias=True)
    assert torch.equal(selector_input(model, far), antialiased)
    # selector_antialias fixes the choice at every size
    authors_everywhere = build(weights, dynamic_img_size=True, selector_antialias=False)
    assert torch.equal(selector_input(authors_everywhere, far),
                       F.interpolate(far, size=(42, 42), mode='bilinear', align_corners=False, antialias=False))
