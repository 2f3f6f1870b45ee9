"""RandomSelection and PreferredSelection: the ablation and the oracle that replace the selector's choice while a
`with` block lasts, on tensor batches and on lists of images of many sizes."""
import pytest
import torch

from conftest import TINY, tiny_model
from timm_lookwhere import PreferredSelection, RandomSelection, SelectionRecorder


def many_sizes_model(**kwargs):
    return tiny_model(dynamic_img_size=True, dynamic_img_pad=True, **kwargs)


def chosen(model, x, hook=None):
    """The ids the extractor got for `x` (a record per top-k call) and the selector's own map of each call."""
    with torch.no_grad():
        if hook is None:
            with SelectionRecorder(model) as rec:
                model(x)
        else:
            with hook, SelectionRecorder(model) as rec:  # entered after the hook: sees what replaced the choice
                model(x)
    return [r['indices'] for r in rec.records], [r['map'] for r in rec.records]


def test_random_selection_is_the_same_for_a_seed_and_another_for_another_seed(images):
    model, x = tiny_model(k=8), images(batch=3)
    own, _ = chosen(model, x)
    first, _ = chosen(model, x, RandomSelection(model, seed=0))
    hook = RandomSelection(model, seed=0)
    again, _ = chosen(model, x, hook)
    reused, _ = chosen(model, x, hook)  # each block starts the seed's sequence anew
    other, _ = chosen(model, x, RandomSelection(model, seed=1))
    assert first[0].shape == own[0].shape == (3, 8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[0], reused[0])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0].sort(1).values, own[0].sort(1).values)
    assert all(len(set(row.tolist())) == 8 for row in first[0])  # k distinct patches of the 64
    assert len(model.topk._forward_hooks) == 0  # gone after the block


def test_random_selection_changes_the_output_and_leaves_the_model_as_it_was(images):
    model, x = tiny_model(k=8, num_classes=5), images(batch=2)
    with torch.no_grad():
        before = model(x)
        with RandomSelection(model, seed=3):
            randomised = model(x)
        after = model(x)
    assert not torch.allclose(randomised, before, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_random_selection_draws_each_image_of_a_list_on_its_own_grid():
    model = many_sizes_model(k_ratio=0.25)
    x = [torch.randn(3, 56, 56), torch.randn(3, 112, 84)]
    first, _ = chosen(model, x, RandomSelection(model, seed=5))
    again, _ = chosen(model, x, RandomSelection(model, seed=5))
    other, _ = chosen(model, x, RandomSelection(model, seed=6))
    assert [tuple(ids.shape) for ids in first] == [(1, 4), (1, 12)]  # a quarter of 16 and of 48 patches
    assert all(int(ids.max()) < n for ids, n in zip(first, (16, 48)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def assert_preferred_first(ids, score, preferred, k):
    """`ids` (k,) are the preferred patches first (the best scored of them where more than k are), then the best
    scored of the rest, each part best first by `score` (N,), the map the hook saw (ties may fall either way)."""
    ids, preferred = ids.tolist(), set(preferred)
    assert len(ids) == k == len(set(ids))
    head = min(k, len(preferred))
    for part, pool in ((ids[:head], preferred), (ids[head:], set(range(len(score))) - preferred)):
        assert set(part) <= pool
        left = pool - set(part)
        if part and left:  # none left behind scores above one chosen
            assert min(score[i] for i in part) >= max(score[i] for i in left)
        assert all(score[a] >= score[b] for a, b in zip(part, part[1:]))


def test_preferred_selection_puts_the_given_patches_first_then_the_selectors_order(images):
    model, x = tiny_model(k=10), images(batch=2)
    _, maps = chosen(model, x)
    worst = maps[0].argsort(dim=1)[:, :3]  # (2, 3) patches the selector would never choose at k = 10
    preferred = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, worst, True)
    ids, seen = chosen(model, x, PreferredSelection(model, preferred))
    torch.testing.assert_close(seen[0], maps[0], rtol=0, atol=1e-5)  # the selector ran as before
    for b in range(2):
        assert_preferred_first(ids[0][b], seen[0][b], worst[b].tolist(), 10)


def test_preferred_selection_takes_the_best_scored_preferred_where_more_than_k_are(images):
    model, x = tiny_model(k=4), images(batch=1)
    preferred = [list(range(32, 64))]  # half the grid, as ids
    ids, seen = chosen(model, x, PreferredSelection(model, preferred))
    assert_preferred_first(ids[0][0], seen[0][0], preferred[0], 4)


def test_preferred_selection_follows_the_images_across_forwards_and_starts_again_in_each_block(images):
    model, x = tiny_model(k=6), images(batch=4)
    preferred = [{0, 1}, {62, 63}, {7}, {8, 16, 24}]
    hook = PreferredSelection(model, preferred)
    for _ in range(2):
        with torch.no_grad(), hook, SelectionRecorder(model) as rec:
            model(x[:3])
            model(x[3:])
        ids = torch.cat([r['indices'] for r in rec.records])
        maps = torch.cat([r['map'] for r in rec.records])
        for b in range(4):
            assert_preferred_first(ids[b], maps[b], preferred[b], 6)


def test_preferred_selection_serves_lists_of_images_of_many_sizes():
    model = many_sizes_model(k_ratio=0.25)
    x = [torch.randn(3, 56, 56), torch.randn(3, 112, 84)]  # 4x4 and 8x6 grids
    preferred = [[15, 0], torch.tensor([47, 46, 45, 44, 43])]
    ids, maps = chosen(model, x, PreferredSelection(model, preferred))
    assert [tuple(i.shape) for i in ids] == [(1, 4), (1, 12)]
    for i in range(2):
        assert_preferred_first(ids[i][0], maps[i][0], torch.as_tensor(preferred[i]).tolist(), ids[i].shape[1])


@pytest.mark.parametrize('preferred, batch, match', [
    (torch.zeros(2, 64, dtype=torch.bool), 3, 'names the patches of 2 images, and image 3 has come'),
    (torch.zeros(3, 16, dtype=torch.bool), 3, r'preferred patches are \(3, 16\) but the image has 64 patches'),
    ([[0], [64], [1]], 3, r'preferred patch ids of image 1 lie outside \[0, 64\).*\[64\]'),
])
def test_preferred_patches_that_do_not_fit_the_images_are_a_clear_error(preferred, batch, match, images):
    model = tiny_model(k=6)
    with pytest.raises(ValueError, match=match), torch.no_grad(), PreferredSelection(model, preferred):
        model(images(batch=batch))
    assert len(model.topk._forward_hooks) == 0


def test_preferred_patches_must_be_a_bool_mask_or_ids():
    with pytest.raises(ValueError, match=r'\(n, N\) bool tensor or n collections of patch ids, got a torch.int64'):
        PreferredSelection(tiny_model(), torch.zeros(2, 64, dtype=torch.long))


def test_hooks_work_on_a_segmenter_backbone(images):
    from timm_lookwhere import create_segmenter
    torch.manual_seed(0)
    segmenter = create_segmenter('lookwhere_vitb_518', num_classes=3, **TINY).eval()
    x = images(batch=2)
    preferred = torch.zeros(2, 64, dtype=torch.bool)
    preferred[:, :2] = True
    with torch.no_grad(), PreferredSelection(segmenter.backbone, preferred), \
            SelectionRecorder(segmenter.backbone) as rec:
        logits = segmenter(x)
    assert logits.shape == (2, 3, 112, 112)
    assert all(set(row[:2].tolist()) == {0, 1} for row in rec.records[0]['indices'])
