"""The authors' augmentation on timm's transforms, made to keep its meaning on every Pillow.

timm's RandAugment and AutoAugment ask for a posterize that keeps 0 bits at their strongest (the
authors' `rand-m9-mstd0.5-inc1`: 'PosterizeIncreasing' at magnitude 10, which magnitude noise
reaches). Pillow up to 12 answers with a black image, which is what timm intends; Pillow 13 raises
`ValueError: bits must be between or equal to 1 and 8`, so a run dies at a random step.

The fix lives here, not as a version bound: a bound would hold every user of the package at an old
Pillow until timm changes, and patching timm on import would change its augmentation for every
model in every process that imports timm (this package's start-up hook loads it there). Instead,
the transforms this project builds get a posterize with Pillow 12's meaning; `repair_posterize`
does the same for any timm transform, e.g. one a training script built.
"""
from typing import Any, Dict, Optional, Tuple

from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform

__all__ = ['AUTHORS_AUGMENT', 'posterize', 'repair_posterize', 'create_train_transform']

# the authors' distillation augmentation (their configs), as timm.data.create_transform arguments
AUTHORS_AUGMENT = dict(auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', interpolation='bicubic')


def posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize, with Pillow 12's answer to 0 bits on every Pillow: a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point([0] * 256 * len(img.getbands()))  # what Pillow 12's 0-bit lookup table gives
    return ImageOps.posterize(img, bits_to_keep)


def repair_posterize(transform: Any) -> int:
    """Give every posterize op of timm's auto-augmentation inside `transform` (a Compose, RandAugment,
    AutoAugment or AugMix, nested as timm builds them) the posterize above. Returns how many ops changed."""
    if isinstance(transform, auto_augment.AugmentOp):
        if transform.aug_fn is auto_augment.posterize:
            transform.aug_fn = posterize
            return 1
        return 0
    if isinstance(transform, (list, tuple)):
        return sum(repair_posterize(t) for t in transform)
    children = (getattr(transform, name, None) for name in ('transforms', 'ops', 'policy'))
    return sum(repair_posterize(child) for child in children if child is not None)


def create_train_transform(
        input_size: Tuple[int, int, int],
        augment: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> Any:
    """timm's training transform with the authors' augmentation (or `augment`), its posterize repaired."""
    transform = create_transform(input_size, is_training=True, **dict(AUTHORS_AUGMENT, **(augment or {})), **kwargs)
    repair_posterize(transform)
    return transform
