"""LookWhere as a backbone: `forward_intermediates`, `prune_intermediate_layers` and `features_only=True`
with the contract of timm's VisionTransformer, maps dense over the full high-res grid."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.models._features import FeatureGetterNet

from conftest import TINY, tiny_model

GRID = (8, 8)  # TINY: 112 px / 14
DIM = TINY['embed_dim']


def block_outputs(model, x):
    """What each extractor block outputs in a plain forward, (B, P + k, D) each, read with hooks."""
    outputs = []
    handles = [blk.register_forward_hook(lambda m, args, out: outputs.append(out)) for blk in model.blocks]
    with torch.no_grad():
        selection = model.forward_all(x)
    for handle in handles:
        handle.remove()
    return outputs, selection


@pytest.fixture
def model():
    return tiny_model(depth=3, k=20)


def test_intermediates_are_each_blocks_tokens_filled_to_the_full_grid(model, images):
    x = images(2)
    expected, selection = block_outputs(model, x)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == 3
    for got, tokens in zip(intermediates, expected):
        assert got.shape == (2, DIM, *GRID)
        torch.testing.assert_close(got, model.dense_from_tokens(tokens, selection['indices']))
    torch.testing.assert_close(final, selection['tokens'])  # the sparse (B, P + k, D) features


def test_normed_last_intermediate_is_forward_dense(model, images):
    x = images(2)
    with torch.no_grad():
        last, = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(last, model.forward_dense(x))


@pytest.mark.parametrize('indices, taken', [(None, [0, 1, 2]), (2, [1, 2]), ([0, -1], [0, 2]), ((1,), [1])])
def test_indices_select_blocks_as_timm_does(model, images, indices, taken):
    x = images(1)
    expected, selection = block_outputs(model, x)
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert len(got) == len(taken)
    for g, i in zip(got, taken):
        torch.testing.assert_close(g, model.dense_from_tokens(expected[i], selection['indices']))


def test_nlc_is_the_same_grid_flattened_row_major(model, images):
    x = images(2)
    with torch.no_grad():
        nchw = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        nlc = model.forward_intermediates(x, indices=1, output_fmt='NLC', intermediates_only=True)[0]
    assert nlc.shape == (2, GRID[0] * GRID[1], DIM)
    torch.testing.assert_close(nlc, nchw.flatten(2).transpose(1, 2))


def test_prefix_tokens_and_dict_output(model, images):
    x = images(2)
    expected, _ = block_outputs(model, x)
    P = model.num_prefix_tokens
    with torch.no_grad():
        pairs = model.forward_intermediates(x, indices=[0, 2], return_prefix_tokens=True, intermediates_only=True)
        as_dict = model.forward_intermediates(x, indices=[0, 2], return_prefix_tokens=True, output_dict=True)
        only = model.forward_intermediates(x, indices=[0, 2], output_dict=True, intermediates_only=True)
    for (dense, prefix), tokens in zip(pairs, (expected[0], expected[2])):
        assert dense.shape == (2, DIM, *GRID) and prefix.shape == (2, P, DIM)
        torch.testing.assert_close(prefix, tokens[:, :P])
    assert set(as_dict) == {'image_intermediates', 'image_intermediates_prefix', 'image_features'}
    assert set(only) == {'image_intermediates'}
    torch.testing.assert_close(as_dict['image_intermediates'], [d for d, _ in pairs])
    torch.testing.assert_close(as_dict['image_intermediates_prefix'], [p for _, p in pairs])


def test_stop_early_skips_later_blocks_and_matches_a_pruned_model(model, images):
    x = images(2)
    calls = []
    model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        final, (first,) = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert calls == []
    pruned = tiny_model(depth=3, k=20)
    assert pruned.prune_intermediate_layers(indices=[0], prune_head=False) == [0]
    with torch.no_grad():
        torch.testing.assert_close(final, pruned.forward_features(x))
        torch.testing.assert_close(first, model.forward_intermediates(x, indices=[0], intermediates_only=True)[0])


def test_prune_drops_later_blocks_then_norm_and_head_when_asked(images):
    model = tiny_model(depth=3, num_classes=4)
    x = images(2)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers(indices=2, prune_norm=True) == [1, 2]
    assert len(model.blocks) == 3 and isinstance(model.norm, nn.Identity)
    assert model.num_classes == 0 and isinstance(model.head, nn.Identity)
    assert model.prune_intermediate_layers(indices=[0, -2]) == [0, 1]
    assert len(model.blocks) == 2
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model(x).shape == (2, model.num_prefix_tokens + model.k, DIM)  # no pooling, no head
    torch.testing.assert_close(after, before)


def test_bad_indices_and_format_are_value_errors(model, images):
    with pytest.raises(ValueError, match=r'block indices \[3\] do not fit 3 blocks'):
        model.forward_intermediates(images(1), indices=[3])
    with pytest.raises(ValueError, match='do not fit 3 blocks'):
        model.prune_intermediate_layers(indices=4)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(images(1), output_fmt='NHWC')
    with pytest.raises(ValueError, match='built for 112x112 images, got 98x98'):
        model.forward_intermediates(images(1, size=98))


def test_features_only_gives_dense_maps_and_feature_info(images):
    full = tiny_model(depth=3, k=20)
    features = timm.create_model('lookwhere_vitb_518', features_only=True, out_indices=(0, 2), depth=3, k=20,
                                 **{k: v for k, v in TINY.items() if k != 'depth'})
    assert isinstance(features, FeatureGetterNet)
    assert features.feature_info.channels() == [DIM, DIM] and features.feature_info.reduction() == [14, 14]
    assert features.feature_info.module_name() == ['blocks.0', 'blocks.2']
    # pruned for features: no final norm, no head; the same weights otherwise
    missing, unexpected = features.model.load_state_dict(full.state_dict(), strict=False)
    assert sorted(unexpected) == ['norm.bias', 'norm.weight'] and missing == []
    x = images(2)
    with torch.no_grad():
        maps = features.eval()(x)
        expected = full.forward_intermediates(x, indices=(0, 2), intermediates_only=True)
    assert [m.shape for m in maps] == [(2, DIM, *GRID)] * 2
    torch.testing.assert_close(maps, expected)


class DenseHead(nn.Module):
    """A small segmentation head over the backbone's maps: fuse, then a 3x3 conv to class scores."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.fuse = nn.Conv2d(sum(channels), 32, kernel_size=1)
        self.classify = nn.Conv2d(32, num_classes, kernel_size=3, padding=1)

    def forward(self, maps):
        return self.classify(F.gelu(self.fuse(torch.cat(maps, dim=1))))  # (B, classes, rows, cols)


def half_split_batch(batch, seed):
    """Images bright left of a random column and dark right of it; the label of each patch cell is its side."""
    g = torch.Generator().manual_seed(seed)
    cut = torch.randint(2, 7, (batch,), generator=g)  # in patch columns
    labels = (torch.arange(8)[None, None, :] >= cut[:, None, None]).long().expand(batch, 8, 8)  # (B, 8, 8)
    pixels = labels.repeat_interleave(14, 1).repeat_interleave(14, 2).float()  # (B, 112, 112)
    images = (1 - 2 * pixels)[:, None].expand(batch, 3, 112, 112) + 0.3 * torch.randn(batch, 3, 112, 112, generator=g)
    return images.contiguous(), labels.contiguous()


def test_dense_head_trains_on_features_only_maps(images):
    torch.manual_seed(0)
    backbone = timm.create_model('lookwhere_vitb_518', features_only=True, out_indices=(0, 1), **TINY)
    head = DenseHead(backbone.feature_info.channels(), num_classes=2)
    trainable = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    x, labels = half_split_batch(8, seed=0)
    selector_before = [p.clone() for p in backbone.model.selector.parameters()]
    backbone.train()
    losses = []
    for _ in range(30):
        logits = head(backbone(x))  # (B, 2, 8, 8) over every patch, though the extractor saw 6 of 64
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0  # the extractor learns too
    assert all(torch.equal(a, b) for a, b in zip(selector_before, backbone.model.selector.parameters()))
    held_out, held_labels = half_split_batch(8, seed=1)
    with torch.no_grad():
        accuracy = (head(backbone.eval()(held_out)).argmax(1) == held_labels).float().mean()
    assert accuracy > 0.75  # chance is 0.5
