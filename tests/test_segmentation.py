"""LookWhere segmenters: pixel logits of every input form, a training step that learns, the selector kept frozen,
the loss and mIoU helpers and the bad input they refuse, the shipped segmenter, and the backbone under a library's
decoder. (Loading shipped segmenters and the dense teacher: test_segmentation_loading.py.)"""
import pytest
import torch
import torch.nn.functional as F

import timm
from timm.data import resolve_data_config
from timm.data.naflex_dataset import NaFlexCollator
from timm.data.naflex_transforms import patchify_image

from timm_lookwhere.segmentation import (
    IGNORE_INDEX, LookWhereSegmenter, confusion_matrix, create_segmenter, iou_per_class, mean_iou, pixel_logits,
    segmentation_loss,
)

from conftest import TINY, randomize_

NUM_CLASSES = 5


def tiny_segmenter(**kwargs):
    torch.manual_seed(0)
    model = create_segmenter('lookwhere_vitb_518', num_classes=NUM_CLASSES, **dict(TINY, k=20, **kwargs))
    randomize_(model.backbone)
    return model.eval()


def test_logits_cover_every_pixel_of_a_fixed_size_batch(images):
    model = tiny_segmenter()
    with torch.no_grad():
        logits = model(images(2))
        cells = model.forward_cells(images(2))
    assert logits.shape == (2, NUM_CLASSES, 112, 112) and cells.shape == (2, NUM_CLASSES, 8, 8)
    # the pixel logits are the cell logits upsampled bilinearly, each cell's value at its patch's centre
    torch.testing.assert_close(logits, pixel_logits(cells, 14, (112, 112)))
    torch.testing.assert_close(logits, F.interpolate(cells, size=(112, 112), mode='bilinear', align_corners=False))


def test_the_head_is_linear_on_each_cell_of_the_filled_grid(images):
    model = tiny_segmenter()
    x = images(2)
    with torch.no_grad():
        dense = model.backbone.forward_dense(x)  # (B, D, 8, 8)
        expected = torch.einsum('bdhw,cd->bchw', dense, model.head.weight[:, :, 0, 0]) + model.head.bias[:, None, None]
        torch.testing.assert_close(model.forward_cells(x), expected)


@pytest.mark.parametrize('size, pad', [((98, 140), False), ((100, 131), True)])
def test_dynamic_sizes_give_logits_of_the_images_own_size(images, size, pad):
    model = tiny_segmenter(dynamic_img_size=True, dynamic_img_pad=pad)
    with torch.no_grad():
        logits = model(images(2, size=size))
    assert logits.shape == (2, NUM_CLASSES, *size)


def test_a_list_of_sizes_gives_a_list_of_logits_each_its_images_size(images):
    model = tiny_segmenter(dynamic_img_size=True)
    pictures = [images(1, size=(112, 112), seed=1)[0], images(1, size=(84, 140), seed=2)[0]]
    with torch.no_grad():
        logits = model(pictures)
        alone = [model(p[None])[0] for p in pictures]
    assert [tuple(lg.shape) for lg in logits] == [(NUM_CLASSES, 112, 112), (NUM_CLASSES, 84, 140)]
    for together, single in zip(logits, alone):  # the same as each image by itself
        torch.testing.assert_close(together, single, atol=1e-4, rtol=1e-4)


def naflex_batch(pictures, patch_size=14):
    """timm's NaFlex batch of `pictures`, as its loader makes one: patchified, then collated with padding."""
    items = []
    for picture in pictures:
        patches, coord, valid = patchify_image(picture, (patch_size, patch_size))
        items.append((dict(patches=patches, patch_coord=coord, patch_valid=valid), 0))
    return NaFlexCollator()(items)[0]


def test_a_naflex_batch_gives_a_list_of_logits_each_its_images_size(images):
    model = tiny_segmenter(dynamic_img_size=True)
    pictures = [images(1, size=(112, 112), seed=1)[0], images(1, size=(84, 140), seed=2)[0]]
    batch = naflex_batch(pictures)
    assert batch['patch_valid'].sum(1).tolist() == [64, 60] and batch['patches'].shape[1] > 64  # padded
    with torch.no_grad():
        logits = model(batch)
        cells = model.forward_cells(batch)
        as_list = model(pictures)
    assert [tuple(lg.shape) for lg in logits] == [(NUM_CLASSES, 112, 112), (NUM_CLASSES, 84, 140)]
    assert [tuple(c.shape) for c in cells] == [(NUM_CLASSES, 8, 8), (NUM_CLASSES, 6, 10)]
    for from_dict, from_list in zip(logits, as_list):  # the same images, the same logits
        torch.testing.assert_close(from_dict, from_list, atol=1e-5, rtol=1e-5)


def test_training_steps_lower_the_loss_and_leave_the_selector_frozen(images):
    model = tiny_segmenter()
    x = images(4)
    # the left half of each image is its own class, the right half background: learnable from the pixels seen
    target = torch.zeros(4, 112, 112, dtype=torch.long)
    target[:, :, :56] = torch.arange(1, 5)[:, None, None]
    target[:, :10] = IGNORE_INDEX  # unlabelled rows count for nothing
    selector_before = {k: v.clone() for k, v in model.backbone.selector.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = segmentation_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(v, selector_before[k]) for k, v in model.backbone.selector.state_dict().items())
    assert not any(p.requires_grad for p in model.backbone.selector.parameters())


def test_loss_ignores_the_ignore_index_and_reads_small_logits_at_the_masks_size():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ignored = target.clone()
    ignored[:, :4] = IGNORE_INDEX
    torch.testing.assert_close(segmentation_loss(logits, ignored),
                               F.cross_entropy(logits[:, :, 4:], target[:, 4:]))
    big = torch.randint(0, 3, (2, 32, 32))  # logits of a coarser grid are upsampled to the mask first
    up = F.interpolate(logits, size=(32, 32), mode='bilinear', align_corners=False)
    torch.testing.assert_close(segmentation_loss(logits, big), F.cross_entropy(up, big))


def test_loss_refuses_logits_of_another_aspect_ratio_and_upsamples_a_coarser_grid_of_the_same():
    target = torch.randint(0, 3, (1, 112, 50))
    with pytest.raises(ValueError, match='logits of 112x112 do not cover a 112x50 mask: another aspect ratio'):
        segmentation_loss(torch.randn(1, 3, 112, 112), target)
    logits = torch.randn(2, 3, 6, 10)  # a 6x10 cell grid of a 84x140 image, its mask read at every 4th pixel
    mask = torch.randint(0, 3, (2, 84, 140))[:, 2::4, 2::4]  # 21x35: the same aspect
    up = F.interpolate(logits, size=(21, 35), mode='bilinear', align_corners=False)
    torch.testing.assert_close(segmentation_loss(logits, mask), F.cross_entropy(up, mask))


def test_a_mask_without_labels_gives_a_zero_loss_that_backpropagates():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    unlabelled = torch.full((2, 8, 8), IGNORE_INDEX)
    for loss in (segmentation_loss(logits, unlabelled),
                 segmentation_loss(logits, unlabelled, class_weight=torch.tensor([0.3, 1., 1.])),
                 segmentation_loss(list(logits), list(unlabelled))):
        assert loss.item() == 0 and loss.grad_fn is not None
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_loss_of_lists_is_the_mean_over_every_labelled_pixel_of_the_images():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 8, 8, generator=g), torch.randn(3, 6, 10, generator=g)]  # two images' pixel logits
    masks = [torch.randint(0, 3, (8, 8), generator=g), torch.randint(0, 3, (6, 10), generator=g)]
    masks[1][:2] = IGNORE_INDEX
    weight = torch.tensor([0.3, 1., 2.])
    pixels = torch.cat([lg.flatten(1).T for lg in logits])  # (124, 3): every pixel of both, as one batch
    labels = torch.cat([m.flatten() for m in masks])
    for class_weight in (None, weight):
        expected = F.cross_entropy(pixels, labels, weight=class_weight, ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(segmentation_loss(logits, masks, class_weight=class_weight), expected)
    same_size = [torch.randn(3, 8, 8, generator=g) for _ in range(2)]  # a list of logits, the masks one batch
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    torch.testing.assert_close(segmentation_loss(same_size, target), segmentation_loss(torch.stack(same_size), target))
    cells = [lg[:, ::2, ::2] for lg in same_size]  # a list of cell logits, upsampled to each mask
    assert torch.isfinite(segmentation_loss(cells, target))
    with pytest.raises(ValueError, match='2 logits for 1 masks'):
        segmentation_loss(logits, masks[:1])


def test_the_manuals_training_step_on_a_list_of_images_lowers_the_loss(images):
    model = tiny_segmenter(dynamic_img_size=True)
    pictures = [images(1, size=(112, 112), seed=1)[0], images(1, size=(84, 140), seed=2)[0]]
    masks = [torch.zeros(112, 112, dtype=torch.long), torch.zeros(84, 140, dtype=torch.long)]
    masks[0][:, :56], masks[1][:, :70] = 1, 2  # the left half of each image its own class
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = segmentation_loss(model(pictures), masks)  # docs/segmentation.md's step, on a list
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_class_ids_outside_the_classes_are_named_not_counted_in_a_wrong_cell():
    target = torch.tensor([[0, 1, 2, IGNORE_INDEX]])
    with pytest.raises(ValueError, match=r'the prediction holds values outside the 4 classes \[0, 4\): 4'):
        confusion_matrix(torch.tensor([[0, 4, 2, 1]]), target, 4)  # a 4 would land in row 1
    with pytest.raises(ValueError, match=r'the prediction holds values outside the 4 classes \[0, 4\): -1'):
        confusion_matrix(torch.tensor([[0, -1, 2, 1]]), target, 4)
    with pytest.raises(ValueError, match=r'the target holds values outside the 4 classes \[0, 4\): 7, 9'):
        confusion_matrix(torch.tensor([[0, 1, 2, 1]]), torch.tensor([[0, 9, 7, IGNORE_INDEX]]), 4)
    with pytest.raises(ValueError, match='differ in shape'):
        confusion_matrix(torch.randn(1, 4, 1, 4), target, 4)
    # a prediction under an ignored pixel counts for nothing, whatever it is
    assert confusion_matrix(torch.tensor([[0, 1, 2, 200]]), target, 4).trace() == 3
    with pytest.raises(ValueError, match=r'the mask holds values outside the 3 classes \[0, 3\): 5'):
        segmentation_loss(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 5], [1, IGNORE_INDEX]]]))


def test_confusion_and_iou_count_pixels_as_written_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, IGNORE_INDEX]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    confusion = confusion_matrix(prediction, target, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    iou = iou_per_class(confusion)
    # class 0: 1 hit, union 2 + 2 - 1; class 1: 2 / (2 + 3 - 2); class 2: 2 / 3; class 3 absent: NaN
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
    assert torch.isnan(iou[3])
    assert mean_iou(confusion) == pytest.approx(5 / 9) and mean_iou(confusion, [1, 2]) == pytest.approx(2 / 3)


def test_create_segmenter_names_what_is_missing():
    with pytest.raises(ValueError, match='give num_classes'):
        create_segmenter('lookwhere_vitt16_256')
    with pytest.raises(ValueError, match='is not a LookWhere model'):
        create_segmenter('resnet18', num_classes=3)
    with pytest.raises(ValueError, match='segments 15 classes'):
        create_segmenter('lookwhere_vitt16_512.dense_signs', pretrained=True, num_classes=3)
    with pytest.raises(TypeError, match='must be a LookWhere model'):
        LookWhereSegmenter(timm.create_model('resnet18'), 3)


@pytest.mark.parametrize('num_classes', [None, 3])
def test_a_mistyped_tag_is_named_with_the_shipped_segmenters_and_the_models_tags(num_classes):
    with pytest.raises(ValueError, match=r"no shipped segmenter and no pretrained tag 'dense_sign'") as err:
        create_segmenter('lookwhere_vitt16_512.dense_sign', num_classes=num_classes)
    assert "shipped segmenters: ['lookwhere_vitt16_512.dense_signs']" in str(err.value)
    assert "its tags: ['lookwhere_vitt16_512.sparse_signs']" in str(err.value)
    with pytest.raises(ValueError, match="'lookwhere_vitt16_513' is not a LookWhere model; shipped segmenters"):
        create_segmenter('lookwhere_vitt16_513', num_classes=3)


@pytest.mark.parametrize('name, num_classes, error, message', [
    ('lookwhere_vitt16_512.dense_signs', 0, ValueError, 'num_classes must be at least 1'),
    ('lookwhere_vitt16_512.dense_signs', -2, ValueError, 'num_classes must be at least 1'),
    ('lookwhere_vitt16_256', 0, ValueError, 'num_classes must be at least 1'),
    ('lookwhere_vitt16_256', 2.5, TypeError, 'num_classes must be an int'),
    ('lookwhere_vitt16_256', '3', TypeError, 'num_classes must be an int'),
    ('lookwhere_vitt16_512.dense_signs', True, TypeError, 'num_classes must be an int'),
])
def test_num_classes_below_one_or_not_an_int_is_refused(name, num_classes, error, message):
    with pytest.raises(error, match=message):
        create_segmenter(name, num_classes=num_classes)


def test_a_backbones_pretrained_tag_loads_its_weights_under_a_new_head():
    model = create_segmenter('lookwhere_vitt16_256.sparse_signs', pretrained=True, num_classes=NUM_CLASSES)
    shipped = timm.create_model('lookwhere_vitt16_256.sparse_signs', pretrained=True, num_classes=0)
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    assert model.head.out_channels == NUM_CLASSES and model.num_classes == NUM_CLASSES


def test_the_shipped_segmenter_loads_offline_and_segments_a_512_px_scene():
    from safetensors.torch import load_file
    from timm_lookwhere.segmentation import SHIPPED_SEGMENTERS
    model = create_segmenter('lookwhere_vitt16_512.dense_signs', pretrained=True).eval()
    stored = load_file(SHIPPED_SEGMENTERS['lookwhere_vitt16_512.dense_signs'][2])
    assert all(torch.equal(v, stored[k].float()) for k, v in model.state_dict().items())
    assert model.num_classes == 15 and not model.backbone.selector_trainable
    with torch.no_grad():
        assert model(torch.randn(1, 3, 512, 512)).shape == (1, 15, 512, 512)
    # the data config of timm's helpers comes from the backbone's
    assert resolve_data_config(model=model)['input_size'] == (3, 512, 512)


def test_features_only_backbone_under_transformers_upernet_decoder_trains(images):
    """timm's `features_only` LookWhere (maps over the full grid from three blocks) under the UperNet decoder of
    Hugging Face transformers, as any timm backbone goes under it: a few steps lower the loss."""
    upernet = pytest.importorskip('transformers.models.upernet.modeling_upernet')
    from transformers import UperNetConfig
    torch.manual_seed(0)
    backbone = timm.create_model('lookwhere_vitb_518', features_only=True, out_indices=(0, 1), **dict(TINY, k=20))
    randomize_(backbone)
    config = UperNetConfig(num_labels=NUM_CLASSES, hidden_size=32, pool_scales=(1, 2, 4))
    decoder = upernet.UperNetHead(config, in_channels=backbone.feature_info.channels())
    x = images(2)
    target = torch.randint(0, NUM_CLASSES, (2, 112, 112), generator=torch.Generator().manual_seed(1))
    params = [p for p in [*backbone.parameters(), *decoder.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(6):
        features = backbone(x)  # [(B, D, 8, 8)] * 2: every cell of the grid, filled from the k chosen patches
        logits = F.interpolate(decoder(features), size=x.shape[-2:], mode='bilinear', align_corners=False)
        loss = segmentation_loss(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert [tuple(f.shape) for f in features] == [(2, TINY['embed_dim'], 8, 8)] * 2
    assert losses[-1] < losses[0], losses
