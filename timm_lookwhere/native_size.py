"""Data at each image's own size: a transform that keeps it, and a collate that batches images as a list.

A LookWhere made with `dynamic_img_size=True, dynamic_img_pad=True` takes a list of (C, H_i, W_i) images in one
call, each at its own size, at the cost of k patches each: nothing is resized to a common size or padded to it.

    model = timm.create_model('lookwhere_vitt16_512', pretrained=True, dynamic_img_size=True, dynamic_img_pad=True)
    dataset = timm.data.create_dataset('', root='photos/', input_img_mode=None,  # the file's own mode: see below
                                       transform=create_native_transform(model))
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate_native)
    for images, labels in loader:      # images: a list of (3, H_i, W_i) tensors
        logits = model(images)         # (16, num_classes)

The transform turns each image upright by its EXIF orientation and scales 16-bit images to 8 bits
(`timm_lookwhere.images.pil_as_8bit`); timm's dataset converts every image to RGB itself unless given
`input_img_mode=None`, and that conversion clips a 16-bit PNG at 255. `lookwhere predict` (timm_lookwhere.predict)
reads files the same way, into uint8 tensors.
"""
import functools
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torchvision import transforms

from timm.data import resolve_data_config, str_to_pil_interp

from .images import pil_as_8bit

__all__ = ['CapPixels', 'capped_size', 'create_native_transform', 'collate_native']


def capped_size(size: Tuple[int, int], max_pixels: int) -> Tuple[int, int]:
    """(width, height) shrunk, aspect kept, to at most about `max_pixels` pixels; unchanged when already within."""
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


class CapPixels:
    """Shrink a PIL image whose width x height exceeds `max_pixels` to about that many, aspect kept; smaller
    images pass unchanged."""

    def __init__(self, max_pixels: int, interpolation: str = 'bicubic'):
        if max_pixels < 1:
            raise ValueError(f'max_pixels must be at least 1, got {max_pixels}')
        self.max_pixels = max_pixels
        self.interpolation = str_to_pil_interp(interpolation)

    def __call__(self, image: Image.Image) -> Image.Image:
        size = capped_size(image.size, self.max_pixels)
        return image if size == image.size else image.resize(size, self.interpolation)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(max_pixels={self.max_pixels})'


def create_native_transform(
        model_or_config: Union[torch.nn.Module, dict],
        max_pixels: Optional[int] = None,
) -> transforms.Compose:
    """PIL image -> (C, H, W) float tensor at the image's own size, upright (EXIF orientation), 16-bit scaled to
    8 bits, normalised as the model's pretrained cfg says (mean, std); `max_pixels` shrinks only images larger than
    that, aspect kept, with the cfg's interpolation.

    `model_or_config`: a model (its pretrained cfg is read) or a data config from `timm.data.resolve_data_config`.
    """
    config = model_or_config if isinstance(model_or_config, dict) else resolve_data_config(model=model_or_config)
    # upright and at 8 bits before anything else (Image.convert would clip a 16-bit image at 255)
    steps: List[Any] = [transforms.Lambda(functools.partial(pil_as_8bit, mode='RGB' if config['input_size'][0] == 3
                                                            else 'L'))]
    if max_pixels is not None:
        steps.append(CapPixels(max_pixels, config.get('interpolation', 'bicubic')))
    steps += [
        transforms.ToTensor(),
        transforms.Normalize(mean=config['mean'], std=config['std']),
    ]
    return transforms.Compose(steps)


def collate_native(batch: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """[(image, label), ...] of images of many sizes -> (list of (C, H_i, W_i) images, (B,) labels)."""
    if not batch:
        raise ValueError('collate_native got an empty batch')
    images = [image for image, _ in batch]
    if not all(isinstance(image, torch.Tensor) and image.dim() == 3 for image in images):
        raise TypeError('collate_native expects (C, H, W) tensors: give the dataset create_native_transform(model)')
    return images, torch.as_tensor([label for _, label in batch])
