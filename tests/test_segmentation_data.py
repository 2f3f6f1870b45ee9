"""ADE20K-layout folders: written from the dense scenes and read back as mmsegmentation reads ADE20K (0 "other"
ignored, ids - 1), the bad layouts named, resizing and torchvision transforms on the pair, and the path through
`create_segmenter` to aAcc, mIoU and mAcc, and a fine-tune that lowers the loss."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from timm_lookwhere.scenes import AREA_RANGE, DenseSceneTensors, DenseSigns
from timm_lookwhere.segmentation import (
    IGNORE_INDEX, confusion_matrix, create_segmenter, segmentation_loss, segmentation_metrics,
)
from timm_lookwhere.segmentation_data import ADE20KFolder, collate_segmentation, write_ade20k_folder

from conftest import TINY

NUM_CLASSES = 15  # the dense scenes' background and 14 signs
SCENE_SIZE = 256


def scenes(split='val', num=4, size=SCENE_SIZE):
    # the wide scenes' signs at 512 px, in pixels, in a 256 px scene: what the shipped segmenter was trained on
    return DenseSigns(split, num, img_size=size, area_range=AREA_RANGE)


@pytest.fixture(scope='module')
def scene_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('scenes')
    write_ade20k_folder(root, 'validation', scenes(), image_suffix='.png')
    return root


def write_pair(root, split, name, image_size=(6, 4), ids=None, image_suffix='.jpg'):
    """One image of `image_size` (width, height) and, unless `ids` is None, its annotation of those ids."""
    for kind in ('images', 'annotations'):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    Image.new('RGB', image_size, (10, 20, 30)).save(root / 'images' / split / f'{name}{image_suffix}')
    if ids is not None:
        Image.fromarray(np.asarray(ids, dtype=np.uint8)).save(root / 'annotations' / split / f'{name}.png')


def test_written_scenes_read_back_as_the_scenes_themselves(scene_root):
    folder = ADE20KFolder(scene_root, 'validation', num_classes=NUM_CLASSES, image_suffix='.png')
    truth = DenseSceneTensors(scenes())
    assert len(folder) == len(truth) == 4
    for (image, mask), (true_image, true_mask) in zip(folder, truth):
        assert image.dtype == torch.uint8 and image.shape == (3, SCENE_SIZE, SCENE_SIZE)
        assert mask.dtype == torch.int64 and mask.shape == (SCENE_SIZE, SCENE_SIZE)
        assert torch.equal(image, true_image) and torch.equal(mask, true_mask.long())
    # on disk, ADE20K's way: each class id + 1, so 0 stays free for "other"
    with Image.open(folder.annotations[0]) as written:
        assert torch.equal(torch.from_numpy(np.array(written)).long(), truth[0][1].long() + 1)


def test_a_jpeg_folder_keeps_the_masks_exact(tmp_path):
    write_ade20k_folder(tmp_path, 'training', scenes('train', 2, 128))  # ADE20K's .jpg by default
    folder = ADE20KFolder(tmp_path, 'training', num_classes=NUM_CLASSES)
    truth = DenseSceneTensors(scenes('train', 2, 128))
    for (image, mask), (true_image, true_mask) in zip(folder, truth):
        assert torch.equal(mask, true_mask.long())
        assert (image.float() - true_image.float()).abs().mean() < 5  # JPEG: close (3 levels here), not equal


def test_zero_is_ignored_and_ids_step_down_as_mmsegmentation_reduces_ade20k(tmp_path):
    write_pair(tmp_path, 'training', 'a', (3, 2), [[0, 1, 2], [150, 255, 3]])
    (image, mask), = ADE20KFolder(tmp_path)  # ADE20K's defaults: 150 classes, reduce_zero_label=True
    assert image.shape == (3, 2, 3)
    assert mask.tolist() == [[IGNORE_INDEX, 0, 1], [149, IGNORE_INDEX, 2]]
    (_, mask), = ADE20KFolder(tmp_path, num_classes=151, reduce_zero_label=False)
    assert mask.tolist() == [[0, 1, 2], [150, IGNORE_INDEX, 3]]


def test_an_image_without_its_annotation_is_named(tmp_path):
    write_pair(tmp_path, 'training', 'a', ids=np.ones((4, 6)))
    write_pair(tmp_path, 'training', 'b')
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 images .* no annotation: .*annotations/training/b\.png"):
        ADE20KFolder(tmp_path)


def test_ids_beyond_the_classes_are_named_with_their_file(tmp_path):
    write_pair(tmp_path, 'training', 'a', ids=[[0, 1, 4, 7], [255, 3, 3, 3]], image_size=(4, 2))
    folder = ADE20KFolder(tmp_path, num_classes=3)
    with pytest.raises(ValueError, match=r'annotations/training/a\.png holds ids 4, 7 beyond the 3 classes'):
        folder[0]
    # ids 1..num_classes read as the classes themselves: the message points at reduce_zero_label
    with pytest.raises(ValueError, match=r'holds ids 7 beyond the 7 classes.*reduce_zero_label=True'):
        ADE20KFolder(tmp_path, num_classes=7, reduce_zero_label=False)[0]


def test_an_empty_or_misnamed_folder_says_what_it_holds(tmp_path):
    (tmp_path / 'images' / 'training').mkdir(parents=True)
    (tmp_path / 'annotations' / 'training').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r'no \.jpg images under .*images/training: it is empty'):
        ADE20KFolder(tmp_path)
    write_pair(tmp_path, 'training', 'a', ids=np.ones((4, 6)), image_suffix='.png')
    with pytest.raises(FileNotFoundError, match=r"no \.jpg images .* it holds \['\.png'\] images: give "
                                                r"image_suffix='\.png'"):
        ADE20KFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"images/validation is not a folder \(.*images holds \['training'\]\)"):
        ADE20KFolder(tmp_path, 'validation', image_suffix='.png')
    with pytest.raises(FileNotFoundError, match=r'nowhere/images is not a folder'):
        ADE20KFolder(tmp_path / 'nowhere')


def test_a_colour_annotation_or_one_of_another_size_is_refused(tmp_path):
    write_pair(tmp_path, 'training', 'a', image_size=(6, 4))
    Image.new('RGB', (6, 4)).save(tmp_path / 'annotations' / 'training' / 'a.png')
    with pytest.raises(ValueError, match=r"a\.png is an image of mode 'RGB', not class ids"):
        ADE20KFolder(tmp_path)[0]
    Image.new('L', (4, 6), 1).save(tmp_path / 'annotations' / 'training' / 'a.png')
    with pytest.raises(ValueError, match=r'a\.jpg is 6x4 .* its annotation .*a\.png is 4x6'):
        ADE20KFolder(tmp_path)[0]


def test_annotations_without_an_image_are_left_out_and_said(tmp_path):
    write_pair(tmp_path, 'training', 'a', ids=np.ones((4, 6)))
    Image.new('L', (6, 4)).save(tmp_path / 'annotations' / 'training' / 'stray.png')
    with pytest.warns(UserWarning, match=r'1 files under .*annotations/training have no \.jpg image .*stray\.png'):
        folder = ADE20KFolder(tmp_path)
    assert len(folder) == 1


def test_img_size_resizes_the_image_and_takes_the_nearest_class_for_the_mask(scene_root):
    folder = ADE20KFolder(scene_root, 'validation', num_classes=NUM_CLASSES, img_size=(100, 140),
                          image_suffix='.png')
    image, mask = folder[0]
    assert image.shape == (3, 100, 140) and image.dtype == torch.uint8 and mask.shape == (100, 140)
    # nearest neighbour: only classes of the scene, never a blend of two ids
    assert set(mask.unique().tolist()) <= set(folder.read_mask(0).unique().tolist())
    assert len(mask.unique()) > 1


def test_a_torchvision_transform_treats_the_pair_together_and_the_float_path_changes_only_the_image(scene_root):
    flip_to_float = v2.Compose([v2.RandomHorizontalFlip(p=1.), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(mean=[0.5] * 3, std=[0.25] * 3)])
    plain = ADE20KFolder(scene_root, 'validation', num_classes=NUM_CLASSES, image_suffix='.png')
    flipped = ADE20KFolder(scene_root, 'validation', num_classes=NUM_CLASSES, image_suffix='.png',
                           transform=flip_to_float)
    (image, mask), (float_image, flipped_mask) = plain[1], flipped[1]
    assert type(float_image) is torch.Tensor and type(flipped_mask) is torch.Tensor  # tv_tensors unwrapped
    assert flipped_mask.dtype == torch.int64 and torch.equal(flipped_mask, mask.flip(-1))
    torch.testing.assert_close(float_image, (image.flip(-1) / 255. - 0.5) / 0.25)


def test_collate_keeps_each_pairs_size_and_refuses_what_is_not_a_pair():
    pairs = [(torch.zeros(3, 4, 6, dtype=torch.uint8), torch.zeros(4, 6)),
             (torch.zeros(3, 5, 3, dtype=torch.uint8), torch.zeros(5, 3))]
    images, masks = collate_segmentation(pairs)
    assert [i.shape[-2:] for i in images] == [m.shape for m in masks] == [(4, 6), (5, 3)]
    with pytest.raises(ValueError, match='empty batch'):
        collate_segmentation([])
    with pytest.raises(TypeError, match=r'of one size, got \[3, 4, 6\] and \[4, 5\]'):
        collate_segmentation([(torch.zeros(3, 4, 6), torch.zeros(4, 5))])


def test_the_writer_refuses_ids_it_cannot_store_and_unknown_formats(tmp_path):
    image = torch.zeros(3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r'pair 0: mask ids must be in \[0, 254\) or 255'):
        write_ade20k_folder(tmp_path, 'training', [(image, torch.tensor([[0, 254], [1, 2]]))])
    with pytest.raises(ValueError, match=r"image_suffix must be one of .*got '\.bmp'"):
        write_ade20k_folder(tmp_path, 'training', [(image, torch.zeros(2, 2))], image_suffix='.bmp')
    # an unlabelled pixel goes to disk as ADE20K's 0 and comes back ignored
    write_ade20k_folder(tmp_path, 'training', [(image, torch.tensor([[0, IGNORE_INDEX], [1, 2]]))])
    (_, mask), = ADE20KFolder(tmp_path, num_classes=3)
    assert mask.tolist() == [[0, IGNORE_INDEX], [1, 2]]


def test_the_shipped_segmenter_scores_the_folder_with_mmsegmentations_three_numbers(scene_root):
    seg = create_segmenter('lookwhere_vitt16_512.dense_signs', pretrained=True, dynamic_img_size=True,
                           dynamic_img_pad=True).eval()
    folder = ADE20KFolder(scene_root, 'validation', num_classes=seg.num_classes, image_suffix='.png')
    confusion = torch.zeros(seg.num_classes, seg.num_classes, dtype=torch.long)
    for images, masks in DataLoader(folder, batch_size=2, collate_fn=collate_segmentation):
        with torch.no_grad():
            logits = seg(images)  # uint8 pixels, each image at its own size: a list of (15, H, W)
        for pixel_logits, mask in zip(logits, masks):
            confusion += confusion_matrix(pixel_logits.argmax(0), mask, seg.num_classes)
    assert confusion.sum() == 4 * SCENE_SIZE ** 2
    metrics = segmentation_metrics(confusion)
    assert set(metrics) == {'aAcc', 'mIoU', 'mAcc'}
    assert metrics['aAcc'] > 0.9  # background is most pixels
    # its signs found: a mask one id off, or a scene out of place, scores about 0 over the sign classes
    assert segmentation_metrics(confusion, classes=range(1, NUM_CLASSES))['mIoU'] > 0.05


def test_fine_tuning_a_segmenter_through_the_folder_lowers_the_loss(tmp_path):
    write_ade20k_folder(tmp_path, 'training', scenes('train', 4, 128))
    loader = DataLoader(ADE20KFolder(tmp_path, 'training', num_classes=NUM_CLASSES), batch_size=4,
                        collate_fn=collate_segmentation)
    images, masks = next(iter(loader))
    torch.manual_seed(0)
    seg = create_segmenter('lookwhere_vitb_518', num_classes=NUM_CLASSES, dynamic_img_size=True,
                           dynamic_img_pad=True, **TINY)
    optimizer = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=3e-3)
    seg.train()
    losses = []
    for _ in range(5):
        loss = segmentation_loss(seg(images), masks)  # lists of (15, H, W) logits and (H, W) masks
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
