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
