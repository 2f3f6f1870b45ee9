"""The selector-informed fill: the authors' inverse-distance fill refined, in a segmenter, by a small learned module
that reads the selector's own low-res view of every cell."""
import pytest
import torch

from timm_lookwhere.dense import SelectorInformedFill
from timm_lookwhere.segmentation import create_segmenter, segmentation_loss

from conftest import TINY, randomize_

CLOSE = dict(rtol=1e-5, atol=1e-5)


def tiny_segmenter(fill, seed=0, **kwargs):
    torch.manual_seed(seed)
    seg = create_segmenter('lookwhere_vitb_518', num_classes=4, fill=fill, **dict(TINY, k_ratio=0.25), **kwargs)
    randomize_(seg.backbone)
    return seg.eval()


def test_before_training_the_fill_is_the_authors():
    authors, learned = tiny_segmenter('idw'), tiny_segmenter('selector')
    learned.load_state_dict(authors.state_dict(), strict=False)  # the same backbone and head; the fill at its init
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(learned(x), authors(x), **CLOSE)
        torch.testing.assert_close(authors.forward_dense(x), authors.backbone.forward_dense(x), **CLOSE)


def test_the_fill_learns_and_the_frozen_selector_stays():
    seg = tiny_segmenter('selector').train()
    selector = {k: v.clone() for k, v in seg.backbone.selector.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 112, 112, generator=generator)
    masks = (x[:, 0] > 0.5).long()  # a class per pixel the image shows
    losses = []
    for _ in range(30):
        loss = segmentation_loss(seg(x), masks)
        loss.backward()
        assert all(p.grad is not None for p in seg.fill.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert seg.fill.out.weight.abs().sum() > 0  # it moved off its zero start
    for key, value in seg.backbone.selector.state_dict().items():
        assert torch.equal(value, selector[key]), key


def test_without_refine_chosen_the_cells_the_extractor_saw_keep_their_tokens():
    fill = SelectorInformedFill(embed_dim=8, selector_dim=6, hidden_dim=4, refine_chosen=False)
    torch.nn.init.normal_(fill.out.weight)
    filled, indices = torch.randn(2, 8, 5, 6), torch.tensor([[0, 7, 29], [3, 4, 5]])
    out = fill(filled, indices, torch.randn(2, 9, 6), (3, 3), torch.randn(2, 30))
    chosen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, indices, True).view(2, 1, 5, 6).expand_as(out)
    assert torch.equal(out[chosen], filled[chosen]) and not torch.allclose(out[~chosen], filled[~chosen])


def test_a_list_of_images_gives_each_what_it_gives_alone():
    seg = tiny_segmenter('selector', dynamic_img_size=True, dynamic_img_pad=True)
    torch.nn.init.normal_(seg.fill.out.weight, std=0.1)
    images = [torch.randn(3, h, w) for h, w in [(112, 112), (131, 157), (60, 200)]]
    with torch.no_grad():
        for logits, image in zip(seg(images), images):
            torch.testing.assert_close(logits, seg(image[None])[0], **CLOSE)


def test_an_unknown_fill_or_another_than_a_shipped_segmenter_was_trained_with_is_refused():
    with pytest.raises(ValueError, match="fill must be one of \\('idw', 'selector'\\), got 'nearest'"):
        tiny_segmenter('nearest')


def test_the_learned_fill_of_an_empty_batch_is_empty():
    # its reshape of the selector's view could not infer the channels of zero images (a RuntimeError)
    fill = SelectorInformedFill(embed_dim=8, selector_dim=6)
    out = fill(torch.zeros(0, 8, 4, 5), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 9, 6), (3, 3),
               torch.zeros(0, 20))
    assert out.shape == (0, 8, 4, 5)
    seg = tiny_segmenter('selector')
    with torch.no_grad():
        assert seg(torch.zeros(0, 3, 112, 112)).shape == (0, 4, 112, 112)
