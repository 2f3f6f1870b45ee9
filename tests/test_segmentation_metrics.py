"""mmsegmentation's three numbers from a confusion matrix: aAcc, mIoU, mAcc, by hand and against mmsegmentation's
definitions (its IoUMetric: per-class areas from histograms, the means NaN-skipping)."""
import math

import pytest
import torch

from timm_lookwhere.segmentation import (
    IGNORE_INDEX, accuracy_per_class, confusion_matrix, iou_per_class, mean_accuracy, mean_iou, pixel_accuracy,
    segmentation_metrics,
)


def test_the_three_numbers_match_a_hand_count():
    target = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE_INDEX])
    prediction = torch.tensor([0, 0, 1, 1, 2, 2, 0])  # the ignored pixel's prediction counts for nothing
    confusion = confusion_matrix(prediction, target, 3)
    # 6 labelled pixels, 4 right; class 0: 2 of its 3 pixels, class 1: 1 of 2, class 2: 1 of 1
    assert pixel_accuracy(confusion) == pytest.approx(4 / 6)
    torch.testing.assert_close(accuracy_per_class(confusion), torch.tensor([2 / 3, 1 / 2, 1.], dtype=torch.float64))
    assert mean_accuracy(confusion) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # IoU: class 0 2 / (3 + 2 - 2), class 1 1 / (2 + 2 - 1), class 2 1 / (1 + 2 - 1)
    assert mean_iou(confusion) == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert segmentation_metrics(confusion) == pytest.approx(
        {'aAcc': 4 / 6, 'mIoU': (2 / 3 + 1 / 3 + 1 / 2) / 3, 'mAcc': (2 / 3 + 1 / 2 + 1) / 3})


def test_a_class_only_predicted_counts_in_miou_and_not_in_macc_and_an_unseen_class_in_neither():
    target = torch.tensor([0, 0, 1, 1])
    prediction = torch.tensor([0, 2, 1, 1])  # class 2 predicted, never present; class 3 neither
    confusion = confusion_matrix(prediction, target, 4)
    iou, accuracy = iou_per_class(confusion), accuracy_per_class(confusion)
    assert iou[2] == 0 and math.isnan(iou[3])  # a false alarm has IoU 0: it is in the mean
    assert math.isnan(accuracy[2]) and math.isnan(accuracy[3])  # accuracy is over the target's pixels only
    assert mean_iou(confusion) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert mean_accuracy(confusion) == pytest.approx((1 / 2 + 1) / 2)
    assert pixel_accuracy(confusion) == pytest.approx(3 / 4)


def test_classes_narrow_the_means_and_not_the_pixel_accuracy():
    # prediction, truth: 0 0, 0 0, 1 0, 2 2, 2 1: class 1 IoU 0 / 2, Acc 0 / 1; class 2 IoU 1 / 2, Acc 1 / 1
    confusion = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 0, 0, 2, 1]), 3)
    metrics = segmentation_metrics(confusion, classes=[1, 2])
    assert metrics['mIoU'] == pytest.approx(mean_iou(confusion, classes=[1, 2])) == pytest.approx((0 + 1 / 2) / 2)
    assert metrics['mAcc'] == pytest.approx(mean_accuracy(confusion, classes=[1, 2])) == pytest.approx((0 + 1) / 2)
    assert metrics['aAcc'] == pytest.approx(pixel_accuracy(confusion)) == pytest.approx(3 / 5)


def test_no_labelled_pixel_gives_nan_not_a_zero_division():
    confusion = confusion_matrix(torch.tensor([0, 1]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX]), 2)
    assert all(math.isnan(v) for v in segmentation_metrics(confusion).values())


def mmseg_style_metrics(pairs, num_classes):
    """aAcc, mIoU and mAcc as mmsegmentation's IoUMetric defines them: per image the areas of intersection,
    prediction and target per class (histograms of the labelled pixels), summed over images, then
    aAcc = intersection.sum() / target.sum(), IoU = intersection / union, Acc = intersection / target, each mean
    NaN-skipping. Written from its definitions, independently of the confusion matrix."""
    areas = torch.zeros(3, num_classes, dtype=torch.float64)  # intersection, prediction, target
    for prediction, target in pairs:
        labelled = target != IGNORE_INDEX
        prediction, target = prediction[labelled].double(), target[labelled].double()
        hits = prediction[prediction == target]
        for row, values in enumerate((hits, prediction, target)):
            areas[row] += torch.histc(values, bins=num_classes, min=0, max=num_classes - 1)
    intersection, predicted, present = areas
    union = predicted + present - intersection
    return {'aAcc': float(intersection.sum() / present.sum()), 'mIoU': float((intersection / union).nanmean()),
            'mAcc': float((intersection / present).nanmean())}


def test_metrics_of_a_summed_confusion_equal_mmsegmentations_over_images():
    num_classes = 6
    g = torch.Generator().manual_seed(0)
    pairs = []
    for size in ((7, 9), (12, 5), (4, 4)):
        target = torch.randint(0, 4, size, generator=g)  # classes 4 and 5 never present
        target[torch.rand(size, generator=g) < 0.2] = IGNORE_INDEX
        noisy = torch.randint(0, 5, size, generator=g)  # class 4 only predicted, class 5 neither
        prediction = torch.where(torch.rand(size, generator=g) < 0.6, target.clamp(max=num_classes - 1), noisy)
        pairs.append((prediction, target))
    confusion = sum(confusion_matrix(p, t, num_classes) for p, t in pairs)
    assert segmentation_metrics(confusion) == pytest.approx(mmseg_style_metrics(pairs, num_classes), abs=1e-6)


# --------------------------------------------------------------------------------------------
# bad input (issue 20, third round)


def test_a_normalised_float_confusion_gives_the_iou_and_accuracy_of_its_counts():
    # the denominators were clamped to 1, which turned every fraction of a pixel into a whole one
    counts = confusion_matrix(torch.tensor([0, 1, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 1]), 3)  # no class 2
    normalised = counts / counts.sum()
    close = dict(rtol=1e-5, atol=1e-6, equal_nan=True)  # the normalised matrix is float32
    torch.testing.assert_close(iou_per_class(normalised), iou_per_class(counts), **close)
    torch.testing.assert_close(accuracy_per_class(normalised), accuracy_per_class(counts), **close)
    assert segmentation_metrics(normalised) == pytest.approx(segmentation_metrics(counts), abs=1e-6)
    # four equal cells: IoU 0.25 / (0.5 + 0.5 - 0.25) = 1/3 per class, accuracy 0.25 / 0.5
    assert mean_iou(torch.full((2, 2), 0.25)) == pytest.approx(1 / 3)
    assert mean_accuracy(torch.full((2, 2), 0.25)) == pytest.approx(1 / 2)
    assert math.isnan(iou_per_class(normalised)[2]) and math.isnan(accuracy_per_class(normalised)[2])


@pytest.mark.parametrize('classes, error, match', [
    ([-1], ValueError, r'ids of the 3 classes \[0, 3\) of the confusion matrix; not: \[-1\] \(ids do not count from'),
    ([1, 5], ValueError, r'ids of the 3 classes \[0, 3\) of the confusion matrix; not: \[5\]'),
    (torch.tensor([True, False, True]), TypeError, r'got a bool mask; its ids: mask.nonzero\(\)'),
    ([True, False, True], TypeError, 'got bools'),
    ([1, 1], ValueError, r'names \[1\] more than once'),
    ([], ValueError, 'classes is empty'),
    ([0.0, 1.0], TypeError, r'class ids \(ints\)'),
    (torch.tensor([0.0, 1.0]), TypeError, r'class ids \(ints\), got torch.float32'),
    (2, TypeError, r'a sequence of class ids, e.g. \[1, 2\], got 2'),
], ids=['negative', 'out_of_range', 'bool_tensor', 'bool_list', 'repeated', 'empty', 'floats', 'float_tensor', 'int'])
@pytest.mark.parametrize('metric', [mean_iou, mean_accuracy, segmentation_metrics])
def test_classes_of_the_means_must_be_ids_of_the_matrix_each_once(metric, classes, error, match):
    # -1 took the last class, a bool mask was read as the ids 0 and 1, 5 raised a bare IndexError
    confusion = confusion_matrix(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]), 3)
    with pytest.raises(error, match=match):
        metric(confusion, classes)


def test_classes_of_the_means_may_be_any_sequence_of_ids():
    confusion = confusion_matrix(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]), 3)
    expected = mean_iou(confusion, [1, 2])
    for classes in (range(1, 3), (2, 1), torch.tensor([1, 2]), torch.tensor([1, 2]).numpy()):
        assert mean_iou(confusion, classes) == pytest.approx(expected)
        assert mean_accuracy(confusion, classes) == pytest.approx(mean_accuracy(confusion, [1, 2]))


@pytest.mark.parametrize('confusion, match', [
    (torch.ones(2, 3), r'got shape \[2, 3\]$'),
    (torch.ones(3), r'got shape \[3\]$'),
    (torch.ones(4, 3, 3), r'got shape \[4, 3, 3\]; a stack of per-image matrices sums to one: confusion.sum\(0\)'),
], ids=['non_square', 'one_d', 'stack'])
@pytest.mark.parametrize('metric', [iou_per_class, accuracy_per_class, mean_iou, mean_accuracy, pixel_accuracy,
                                    segmentation_metrics])
def test_the_metrics_take_a_square_confusion_matrix_and_say_so(metric, confusion, match):
    with pytest.raises(ValueError, match=r'expected a \(C, C\) confusion matrix .*' + match):
        metric(confusion)


def test_the_metrics_name_a_confusion_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r'confusion matrix tensor .*got a list \(torch.as_tensor'):
        mean_iou([[1, 0], [0, 1]])


def test_confusion_matrix_refuses_float_class_ids_which_it_would_truncate():
    # 1.4 was counted as class 1
    with pytest.raises(TypeError, match=r'the prediction is torch.float32, not class ids; .*logits.argmax\(1\)'):
        confusion_matrix(torch.tensor([1.4, 0.]), torch.tensor([1, 0]), 2)
    with pytest.raises(TypeError, match=r'the target is torch.float64, not class ids; .*mask.long\(\)'):
        confusion_matrix(torch.tensor([1, 0]), torch.tensor([1.0, 0.0], dtype=torch.float64), 2)
    with pytest.raises(TypeError, match=r'tensors of class ids \(or lists of them\); the prediction is a ndarray'):
        confusion_matrix(torch.tensor([1, 0]).numpy(), torch.tensor([1, 0]), 2)
    # integer and bool ids of every width count as before
    for dtype in (torch.uint8, torch.int32, torch.bool):
        assert confusion_matrix(torch.tensor([1, 0]).to(dtype), torch.tensor([1, 1], dtype=torch.uint8), 2).tolist() \
            == [[0, 0], [1, 1]]


def test_confusion_matrix_sums_lists_of_predictions_of_their_own_sizes():
    # what a segmenter gives for a list of images: (H_i, W_i) predictions, each with its mask (an AttributeError before)
    g = torch.Generator().manual_seed(0)
    sizes = [(5, 7), (3, 3), (8, 2)]
    predictions = [torch.randint(0, 4, size, generator=g) for size in sizes]
    masks = [torch.randint(0, 4, size, generator=g) for size in sizes]
    masks[1][0, 0] = IGNORE_INDEX
    expected = sum(confusion_matrix(p, m, 4) for p, m in zip(predictions, masks))
    assert torch.equal(confusion_matrix(predictions, masks, 4), expected)
    assert torch.equal(confusion_matrix(tuple(predictions), masks, 4), expected)
    assert confusion_matrix(predictions, masks, 4).sum() == sum(h * w for h, w in sizes) - 1
    # a batch's masks beside a list of its predictions, and an empty list: no pixels
    batch = torch.randint(0, 4, (2, 5, 5), generator=g)
    assert torch.equal(confusion_matrix(list(batch), batch, 4), confusion_matrix(batch, batch, 4))
    assert torch.equal(confusion_matrix([], [], 4), torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match='confusion_matrix: 3 predictions for 2 masks'):
        confusion_matrix(predictions, masks[:2], 4)
    with pytest.raises(TypeError, match=r'the prediction is torch.float32, not class ids'):
        confusion_matrix([p.float() for p in predictions], masks, 4)
