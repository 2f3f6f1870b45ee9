"""Segmentation datasets in ADE20K's layout: read as mmsegmentation's ADE20KDataset reads them, and written.

ADE20K lays a dataset out as

    ROOT/images/training/ADE_train_00000001.jpg     ROOT/annotations/training/ADE_train_00000001.png
    ROOT/images/validation/ADE_val_00000001.jpg     ROOT/annotations/validation/ADE_val_00000001.png

each annotation a one-channel PNG of class ids named as its image. ADE20K's id 0 is "other" (unlabelled): with
`reduce_zero_label=True` (mmsegmentation's setting for ADE20K) it becomes IGNORE_INDEX (255) and every other id
becomes id - 1, so ADE20K's 150 classes are 0..149, as a segmenter's head counts them.

    train = ADE20KFolder('ADEChallengeData2016', 'training')      # (uint8 (3, H, W), int64 (H, W)), own sizes
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate_segmentation)   # lists
    val = ADE20KFolder('ADEChallengeData2016', 'validation', img_size=512)   # resized: masks by nearest
    write_ade20k_folder('scenes', 'training', DenseSigns('train', 100))       # any (image, mask) pairs, written
"""
import numbers
import os
import warnings
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .files import replacing
from .images import IMAGE_EXTENSIONS, read_image
from .segmentation import IGNORE_INDEX, _check_num_classes

__all__ = ['ADE20K_NUM_CLASSES', 'ADE20K_SPLITS', 'ADE20KFolder', 'collate_segmentation', 'write_ade20k_folder']

ADE20K_NUM_CLASSES = 150  # ADEChallengeData2016 (SceneParsing): ids 1..150 in the files, 0 "other"
ADE20K_SPLITS = ('training', 'validation')  # its split folders; any other name is read the same way
_ID_MODES = ('L', 'P', 'I;16', 'I;16L', 'I;16B', 'I')  # one channel of ids (P: palette indices are the ids)
_SHOWN = 5  # files named in an error, before '...'


def _listed(paths: Sequence[str]) -> str:
    more = len(paths) - _SHOWN
    return ', '.join(paths[:_SHOWN]) + (f', ... ({more} more)' if more > 0 else '')


def _image_files(folder: str) -> List[str]:
    """Paths under `folder`, relative to it, of every file: sorted, subfolders included (as mmsegmentation lists)."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, name), folder) for name in names]
    return sorted(found)


def _split_folder(root: str, kind: str, split: str) -> str:
    folder = os.path.join(root, kind, split)
    if not os.path.isdir(folder):
        parent = os.path.join(root, kind)
        there = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
        holds = f'{parent} holds {there}' if there is not None else f'{parent} is not a folder'
        raise FileNotFoundError(
            f'{folder} is not a folder ({holds}): an ADE20K-layout root holds images/<split>/ and '
            f'annotations/<split>/, the split e.g. {ADE20K_SPLITS[0]!r} or {ADE20K_SPLITS[1]!r}')
    return folder


def _mask_ids(mask: Any) -> np.ndarray:
    """A PIL image, array or tensor of class ids -> an (H, W) int64 array."""
    if isinstance(mask, Image.Image):
        if mask.mode not in _ID_MODES:
            raise ValueError(f'a mask of mode {mask.mode!r} holds colours, not class ids: give one channel of ids '
                             f'(mode {_ID_MODES[0]} or {_ID_MODES[1]}), a colour-coded mask mapped to its ids first')
        mask = np.asarray(mask)
    mask = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f'a mask is (H, W) class ids, got shape {list(mask.shape)}')
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
        if not np.issubdtype(mask.dtype, np.floating) or not np.array_equal(mask, np.round(mask)):
            shown = np.unique(mask[np.isfinite(mask) & (mask != np.round(mask))])[:3].tolist() if np.issubdtype(
                mask.dtype, np.floating) else mask.dtype
            raise ValueError(f'a mask holds whole class ids; got {mask.dtype} values such as {shown}: a mask resized '
                             'bilinearly, or probabilities? Resize masks by nearest neighbour, take argmax of scores')
    return mask.astype(np.int64)


def _image_size(img_size: Any) -> Optional[Tuple[int, int]]:
    """img_size as (H, W): an int for a square, or two ints; each at least 1 pixel."""
    if img_size is None:
        return None
    size = (img_size, img_size) if isinstance(img_size, numbers.Integral) else img_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in size)):
        raise ValueError(f'img_size must be an int (a square side) or (H, W), whole pixels of at least 1; '
                         f'got {img_size!r}')
    return int(size[0]), int(size[1])


class ADE20KFolder(Dataset):
    """(image, mask) pairs of an ADE20K-layout folder: `root/images/<split>/**/*<image_suffix>` and, of the same
    name, `root/annotations/<split>/**/*.png`, sorted by name.

    An image is a uint8 (3, H, W) tensor (upright by its EXIF orientation, 8 bits, RGB: `images.read_image`),
    which LookWhere models normalise themselves; a mask is an (H, W) int64 tensor of class ids in
    [0, num_classes), IGNORE_INDEX (255) where a pixel has no label. Images keep their own sizes unless
    `img_size` is given: batch them with `collate_segmentation` (lists, which a segmenter, `segmentation_loss`
    and `confusion_matrix` per image take).

    Args:
        root: the folder holding images/ and annotations/.
        split: the split's folder name under both ('training', 'validation' in ADE20K).
        num_classes: classes after `reduce_zero_label` (150 for ADE20K); an annotation holding an id beyond them
            is refused, named, when read.
        reduce_zero_label: the files' 0 means "other" (unlabelled, ADE20K's way): it becomes IGNORE_INDEX and
            every other id id - 1 (255 stays ignored), as mmsegmentation's ADE20KDataset does. False: the ids
            are the classes as they are, 255 ignored.
        img_size: resize every pair to this (int: square, or (H, W)), the image bilinearly (antialiased), the
            mask by nearest neighbour; None keeps each image's own size.
        transform: called as `transform(image, mask)` after that, on torchvision's `tv_tensors.Image` and
            `tv_tensors.Mask`: torchvision.transforms.v2 transforms treat the pair together (a crop cuts both,
            a resize takes the nearest class for the mask; `v2.ToDtype(torch.float32, scale=True)` and
            `v2.Normalize` change only the image, the classic float path).
        image_suffix: how image names end (ADE20K's are '.jpg'; compared without case).
        annotation_suffix: how annotation names end, replacing the image's suffix.
    """

    def __init__(
            self,
            root: Union[str, os.PathLike],
            split: str = 'training',
            num_classes: int = ADE20K_NUM_CLASSES,
            reduce_zero_label: bool = True,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            transform: Optional[Callable] = None,
            image_suffix: str = '.jpg',
            annotation_suffix: str = '.png',
    ):
        self.root, self.split = os.fspath(root), split
        self.num_classes = _check_num_classes(num_classes)
        if self.num_classes > IGNORE_INDEX:
            raise ValueError(f'num_classes must be at most {IGNORE_INDEX}: class ids stop below IGNORE_INDEX '
                             f'({IGNORE_INDEX}), got {num_classes}')
        self.reduce_zero_label = bool(reduce_zero_label)
        self.img_size = _image_size(img_size)
        self.resize = None if img_size is None else v2.Resize(self.img_size, antialias=True)
        self.transform = transform
        image_folder = _split_folder(self.root, 'images', split)
        annotation_folder = _split_folder(self.root, 'annotations', split)

        files = _image_files(image_folder)
        names = [f for f in files if f.lower().endswith(image_suffix.lower())]
        if not names:
            others = sorted({os.path.splitext(f)[1].lower() for f in files} & IMAGE_EXTENSIONS)
            hint = (f'it holds {others} images: give image_suffix={others[0]!r}' if others
                    else f'it holds {len(files)} files and no image' if files else 'it is empty')
            raise FileNotFoundError(f'no {image_suffix} images under {image_folder}: {hint}')
        stems = [name[:-len(image_suffix)] for name in names]
        self.images = [os.path.join(image_folder, name) for name in names]
        self.annotations = [os.path.join(annotation_folder, stem + annotation_suffix) for stem in stems]
        missing = [path for path in self.annotations if not os.path.isfile(path)]
        if missing:
            there = _image_files(annotation_folder)
            holds = f'{annotation_folder} holds {_listed(there)}' if there else f'{annotation_folder} is empty'
            raise FileNotFoundError(
                f'{len(missing)} of the {len(names)} images under {image_folder} have no annotation: '
                f'{_listed(missing)} missing ({holds}). Each image needs annotations/{split}/<its name>'
                f'{annotation_suffix}, its name the image\'s less image_suffix={image_suffix!r}; are the two '
                'suffixes right?')
        # annotations without an image are left out, as mmsegmentation does, but said
        unpaired = sorted(set(_image_files(annotation_folder)) - {stem + annotation_suffix for stem in stems})
        if unpaired:
            warnings.warn(f'{len(unpaired)} files under {annotation_folder} have no {image_suffix} image in '
                          f'{image_folder} and are left out: {_listed(unpaired)}')

    def __len__(self) -> int:
        return len(self.images)

    def read_mask(self, index: int) -> torch.Tensor:
        """The annotation of pair `index` as (H, W) int64 class ids, IGNORE_INDEX unlabelled (no resize)."""
        path = self.annotations[index]
        with Image.open(path) as annotation:
            if annotation.mode not in _ID_MODES:
                raise ValueError(f'{path} is an image of mode {annotation.mode!r}, not class ids: an annotation is '
                                 f'one channel of ids (mode {_ID_MODES[0]} or {_ID_MODES[1]}); map a '
                                 'colour-coded mask to its ids first')
            ids = _mask_ids(annotation)
        if self.reduce_zero_label:
            known = (ids == IGNORE_INDEX) | ((ids >= 0) & (ids <= self.num_classes))
            meaning = (f'0 (other: ignored), 1..{self.num_classes} (classes 0..{self.num_classes - 1}) and '
                       f'{IGNORE_INDEX} (ignored), as reduce_zero_label=True reads them')
        else:
            known = (ids == IGNORE_INDEX) | ((ids >= 0) & (ids < self.num_classes))
            meaning = f'0..{self.num_classes - 1} and {IGNORE_INDEX} (ignored)'
        if not known.all():
            beyond = np.unique(ids[~known])
            hint = ('; ids 1..num_classes with 0 for "other" read with reduce_zero_label=True'
                    if not self.reduce_zero_label and beyond.max() == self.num_classes else '')
            raise ValueError(f'{path} holds ids {_listed([str(v) for v in beyond.tolist()])} beyond the '
                             f'{self.num_classes} classes: an annotation holds {meaning}. Give num_classes= '
                             f'the classes of the dataset{hint}')
        if self.reduce_zero_label:
            ids = np.where((ids == 0) | (ids == IGNORE_INDEX), IGNORE_INDEX, ids - 1)
        return torch.from_numpy(ids)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        image, mask = read_image(self.images[index]), self.read_mask(index)  # (3, H, W) uint8, (H, W) int64
        if image.shape[-2:] != mask.shape:
            raise ValueError(f'{self.images[index]} is {image.shape[-1]}x{image.shape[-2]} (upright, by its EXIF '
                             f'orientation) but its annotation {self.annotations[index]} is '
                             f'{mask.shape[1]}x{mask.shape[0]}: a mask labels its image pixel for pixel')
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.resize is not None:
            image, mask = self.resize(image, mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        # plain tensors out: torch ops on tv_tensors keep their type only in some cases
        return tuple(t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t for t in (image, mask))

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={self.root!r}, split={self.split!r}, {len(self)} pairs, '
                f'num_classes={self.num_classes}, reduce_zero_label={self.reduce_zero_label}, '
                f'img_size={self.img_size})')


def collate_segmentation(
        batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """[(image, mask), ...] of many sizes -> (list of (C, H_i, W_i) images, list of (H_i, W_i) masks): what a
    segmenter takes and `segmentation_loss` pairs with its list of logits."""
    if not batch:
        raise ValueError('collate_segmentation got an empty batch')
    images, masks = [image for image, _ in batch], [mask for _, mask in batch]
    for image, mask in zip(images, masks):
        if not (isinstance(image, torch.Tensor) and image.dim() == 3 and isinstance(mask, torch.Tensor)
                and mask.shape == image.shape[-2:]):
            got = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (image, mask)]
            raise TypeError(f'collate_segmentation takes (C, H, W) image and (H, W) mask tensors of one size, '
                            f'got {got[0]} and {got[1]}')
    return images, masks


def write_ade20k_folder(
        root: Union[str, os.PathLike],
        split: str,
        pairs: Sequence[Tuple[Any, Any]],
        reduce_zero_label: bool = True,
        image_suffix: str = '.jpg',
        progress: bool = False,
) -> str:
    """Write (image, mask) pairs as an ADE20K-layout split: `root/images/<split>/NNNNNN<image_suffix>` and
    `root/annotations/<split>/NNNNNN.png`, which `ADE20KFolder(root, split, num_classes, reduce_zero_label)`
    reads back as they were.

    `pairs` is any sequence of (image, mask): PIL RGB images or uint8 (3, H, W) tensors, and masks of class ids
    (PIL mode L or P, arrays, tensors) with IGNORE_INDEX where unlabelled, e.g. `scenes.DenseSigns`' (image,
    mask) scenes. With `reduce_zero_label` (ADE20K's way) a file holds id + 1 and 0 for an unlabelled pixel;
    without, the ids as they are. Images are JPEG for '.jpg' (ADE20K's; quality 95, colour not subsampled),
    lossless for '.png'.
    A pair whose two files exist is kept, so an interrupted export resumes. Returns `root`.
    """
    # JPEG at full colour resolution (no 4:2:0 subsampling): small objects' colours survive
    jpeg = dict(format='JPEG', quality=95, subsampling=0)
    formats = {'.jpg': jpeg, '.jpeg': jpeg, '.png': dict(format='PNG', compress_level=1)}
    if image_suffix.lower() not in formats:
        raise ValueError(f'image_suffix must be one of {sorted(formats)}, got {image_suffix!r}')
    root = os.fspath(root)
    folders = [os.path.join(root, kind, split) for kind in ('images', 'annotations')]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    indices: Iterable[int] = range(len(pairs))
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f'writing {split}', unit='img', mininterval=5)
    for index in indices:
        image_path = os.path.join(folders[0], f'{index:06d}{image_suffix}')
        mask_path = os.path.join(folders[1], f'{index:06d}.png')
        if os.path.exists(image_path) and os.path.exists(mask_path):
            continue
        image, mask = pairs[index]
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f'pair {index}: an image tensor must be uint8 (3, H, W), got {image.dtype} '
                                 f'{list(image.shape)}')
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        elif not isinstance(image, Image.Image):
            raise TypeError(f'pair {index}: an image is a PIL image or a uint8 (3, H, W) tensor, got '
                            f'{type(image).__name__}' + (' (for an (H, W, 3) uint8 array: PIL.Image.fromarray(it))'
                                                         if isinstance(image, np.ndarray) else ''))
        ids = _mask_ids(mask)
        if (image.height, image.width) != ids.shape:
            raise ValueError(f'pair {index}: a {image.width}x{image.height} image with a {ids.shape[1]}x'
                             f'{ids.shape[0]} mask')
        labelled = ids != IGNORE_INDEX
        top = IGNORE_INDEX - 1 if reduce_zero_label else IGNORE_INDEX  # the largest id a file can hold
        if ((ids[labelled] < 0) | (ids[labelled] >= top)).any():
            raise ValueError(f'pair {index}: mask ids must be in [0, {top}) or {IGNORE_INDEX} (unlabelled) to be '
                             f'written as 8-bit ids{" + 1" if reduce_zero_label else ""}')
        if reduce_zero_label:
            ids = np.where(labelled, ids + 1, 0)
        # the mask last: an image with its mask is a whole pair, and a half-written one is redone
        with replacing(image_path) as tmp:
            image.convert('RGB').save(tmp, **formats[image_suffix.lower()])
        with replacing(mask_path) as tmp:
            Image.fromarray(ids.astype(np.uint8)).save(tmp, format='PNG')
    return root
