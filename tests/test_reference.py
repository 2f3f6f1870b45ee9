"""Same numbers as the authors' method: selected patches identical, cls and dense within 1e-4 (fp32, CPU).

The reference makes the selector's low-res copy the authors' way (bilinear, no antialiasing) at every
size; the models get `selector_antialias=False` where their default would antialias (a downscale
beyond the authors' 518 -> 154).
"""
import pytest
import torch
import torch.nn as nn

import timm
from timm.layers import SwiGLUPacked

from conftest import TINY, assert_same_selection, authors_layout, tiny_model
from reference import build_reference, reference_fill, reference_forward

TINY_ARCH = dict(embed_dim=TINY['embed_dim'], depth=TINY['depth'], num_heads=TINY['num_heads'],
                 selector_img_size=TINY['selector_img_size'], selector_depth=TINY['selector_depth'],
                 map_grid=TINY['map_grid'])


def save_authors_checkpoint(tmp_path, source_model):
    path = tmp_path / 'lookwhere_dinov2.pt'
    ckpt = authors_layout(source_model)
    torch.save(ckpt, path)
    return path, ckpt


def assert_matches_reference(model, ref, x):
    ours = {}
    with torch.no_grad():
        out = model.forward_all(x)
        ours['dense'] = model.dense_from_tokens(out['tokens'], out['indices']).flatten(2).transpose(1, 2)
    expected = reference_forward(ref, x, model.k)
    torch.testing.assert_close(out['map'], expected['map'], atol=1e-4, rtol=0)
    # the maps may differ by the tolerance above: patches scored that close may trade places, no others
    assert_same_selection(out['indices'], out['map'], expected['indices'], expected['map'], near_tie=2e-4)
    if torch.equal(out['indices'], expected['indices']):
        torch.testing.assert_close(out['tokens'][:, 0], expected['cls'], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours['dense'], expected['dense'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('img_size', [(112, 112), (224, 224), (112, 168)])
def test_tiny_model_from_authors_checkpoint_matches_reference(tmp_path, images, img_size):
    source = tiny_model()
    path, ckpt = save_authors_checkpoint(tmp_path, source)
    model = timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              selector_antialias=False, **dict(TINY, img_size=img_size)).eval()
    ref = build_reference(ckpt, img_size, reg_tokens=4, **TINY_ARCH)
    assert_matches_reference(model, ref, images(3, img_size, seed=1))


def test_franca_variant_matches_reference(tmp_path, images):
    source = tiny_model('lookwhere_vitb_franca_518')
    path, ckpt = save_authors_checkpoint(tmp_path, source)
    model = timm.create_model('lookwhere_vitb_franca_518', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **TINY).eval()
    ref = build_reference(ckpt, (112, 112), reg_tokens=0, vit_kwargs=dict(
        mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU), **TINY_ARCH)
    assert model.num_prefix_tokens == 1
    assert_matches_reference(model, ref, images(2, 112, seed=2))


@pytest.mark.full_size
@pytest.mark.parametrize('img_size', [518, 1036])
def test_vitb_from_authors_checkpoint_matches_reference_at_full_size(tmp_path, images, img_size):
    torch.manual_seed(0)
    source = timm.create_model('lookwhere_vitb_518')
    from conftest import randomize_
    randomize_(source, scale=0.05)
    path, ckpt = save_authors_checkpoint(tmp_path, source)
    model = timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_size=img_size, selector_antialias=False).eval()
    assert model.k == int(0.1 * (img_size // 14) ** 2)
    ref = build_reference(ckpt, (img_size, img_size), embed_dim=768, depth=12, num_heads=12, reg_tokens=4,
                          selector_img_size=154, selector_depth=3)
    assert_matches_reference(model, ref, images(1, img_size, seed=3))


def test_dense_fill_breaks_ties_in_favour_of_the_higher_scored_patch():
    from timm_lookwhere import idw_fill
    values = torch.tensor([[[1.0], [2.0]]])  # (1, 2, 1)
    # on a 1x3 grid, the middle cell is equidistant from cells 0 and 2
    first = idw_fill(values, torch.tensor([[0, 2]]), (1, 3), num_neighbors=1)
    swapped = idw_fill(values, torch.tensor([[2, 0]]), (1, 3), num_neighbors=1)
    assert first[0, :, 0].tolist() == [1.0, 1.0, 2.0]
    assert swapped[0, :, 0].tolist() == [2.0, 1.0, 1.0]  # the earlier-ranked patch (now cell 2) wins


def test_dense_fill_keeps_chosen_values_and_mixes_the_rest_by_inverse_distance():
    from timm_lookwhere import idw_fill
    g = torch.Generator().manual_seed(0)
    grid = (6, 7)
    indices = torch.randperm(42, generator=g)[:9][None]
    values = torch.randn(1, 9, 4, generator=g)
    filled = idw_fill(values, indices, grid)
    torch.testing.assert_close(filled[0, indices[0]], values[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(filled, reference_fill(values, indices, grid), atol=1e-5, rtol=0)


def test_dense_fill_ties_match_a_stable_sort_on_a_symmetric_grid():
    # a regular lattice of chosen patches makes most cells have equidistant neighbours
    rows = cols = 9
    chosen = [r * cols + c for r in range(0, rows, 2) for c in range(0, cols, 2)]
    g = torch.Generator().manual_seed(1)
    indices = torch.tensor(chosen)[torch.randperm(len(chosen), generator=g)][None]
    values = torch.randn(1, len(chosen), 3, generator=g)
    from timm_lookwhere import idw_fill
    torch.testing.assert_close(idw_fill(values, indices, (rows, cols)),
                               reference_fill(values, indices, (rows, cols)), atol=1e-5, rtol=0)
