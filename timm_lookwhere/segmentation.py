"""Semantic segmentation with LookWhere: the authors' per-cell linear head on the filled patch grid, pixel logits.

LookWhere's extractor sees k of the high-res patches; `forward_dense` fills every cell of the patch grid
from those k tokens (inverse-distance weighting of the nearest chosen patches, as the authors do), and
the authors' segmentation head is a linear layer on each cell. Its logits, one per patch, are upsampled
bilinearly to the image's pixels. The selector stays frozen (the paper's fine-tuning): it was trained,
without labels, to find what matters.

    seg = create_segmenter('lookwhere_vitt16_512.dense_signs', pretrained=True)   # shipped: loads offline
    logits = seg(x)                                  # (B, 3, 512, 512) normalised -> (B, 15, 512, 512)
    seg = create_segmenter('lookwhere_vitb_518.dinov2', pretrained=True, num_classes=150)  # a new task
    loss = segmentation_loss(seg(x), masks)          # cross-entropy, IGNORE_INDEX pixels left out
    confusion += confusion_matrix(logits.argmax(1), masks, 150); mean_iou(confusion)

Also the loss and the metrics (a confusion matrix of pixel counts, IoU per class, mean IoU).
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import timm

from .lookwhere import WEIGHTS_DIR, LookWhere

__all__ = [
    'IGNORE_INDEX', 'SHIPPED_SEGMENTERS', 'LookWhereSegmenter', 'create_segmenter', 'pixel_logits',
    'segmentation_loss', 'confusion_matrix', 'iou_per_class', 'mean_iou',
]

IGNORE_INDEX = 255  # mask value of pixels without a label (ADE20K's and mmsegmentation's convention)
# segmenters that ship inside the package: name -> (backbone architecture, classes, weights file)
SHIPPED_SEGMENTERS: Dict[str, Tuple[str, int, str]] = {
    'lookwhere_vitt16_512.dense_signs': (
        'lookwhere_vitt16_512', 15, os.path.join(WEIGHTS_DIR, 'lookwhere_vitt16_512_dense_signs.safetensors')),
}
DENSE_SIGNS_RECIPE = 'python -m timm_lookwhere.recipes.dense_signs'

Images = Union[torch.Tensor, List[torch.Tensor]]


def pixel_logits(cell_logits: torch.Tensor, patch_size: int, image_size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, rows, cols) logits of the patch cells -> (B, C, H, W) logits of the pixels: bilinear, each cell's
    value at its patch's centre (align_corners=False), cropped to the image where the grid was padded."""
    rows, cols = cell_logits.shape[-2:]
    up = F.interpolate(cell_logits, size=(rows * patch_size, cols * patch_size), mode='bilinear',
                       align_corners=False)  # (B, C, rows * p, cols * p)
    return up[..., :image_size[0], :image_size[1]]


class LookWhereSegmenter(nn.Module):
    """A LookWhere backbone and a linear head on every cell of its filled patch grid: pixel logits.

    Takes what the backbone takes: a (B, C, H, W) batch at the model's size (any size, each side a multiple
    of the patch, with `dynamic_img_size=True`; any size at all with `dynamic_img_pad=True` too), or a list
    of (C, H_i, W_i) images, which gives a list of (num_classes, H_i, W_i) logits.
    """

    def __init__(self, backbone: LookWhere, num_classes: int, drop_rate: float = 0.):
        super().__init__()
        if not isinstance(backbone, LookWhere):
            raise TypeError(f'backbone must be a LookWhere model, got {type(backbone).__name__}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be at least 1, got {num_classes}')
        backbone.reset_classifier(0)  # the image classifier is not used
        self.backbone = backbone
        self.num_classes = num_classes
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.head_drop = nn.Dropout2d(drop_rate)
        self.head = nn.Conv2d(backbone.embed_dim, num_classes, kernel_size=1)  # the authors' per-cell linear head
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # timm's data helpers (resolve_data_config(model=...)) read the backbone's mean, std and size here
        self.pretrained_cfg = getattr(backbone, 'pretrained_cfg', {})

    def set_k(self, k: Optional[int] = None, k_ratio: Optional[float] = None) -> None:
        """Patches the extractor sees: k, or a fraction of the grid (see `LookWhere.set_k`)."""
        self.backbone.set_k(k=k, k_ratio=k_ratio)

    @property
    def k(self) -> int:
        return self.backbone.k

    def forward_cells(self, x: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Logits of the patch cells: (B, num_classes, rows, cols), or a list of (num_classes, rows_i, cols_i)."""
        dense = self.backbone.forward_dense(x)  # (B, D, rows, cols) or a list of (D, rows_i, cols_i)
        if isinstance(dense, list):
            return [self.head(self.head_drop(d[None]))[0] for d in dense]
        return self.head(self.head_drop(dense))  # (B, num_classes, rows, cols)

    def forward(self, x: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Images -> (B, num_classes, H, W) pixel logits, or a list of (num_classes, H_i, W_i) for a list."""
        cells = self.forward_cells(x)
        if isinstance(cells, list):
            return [pixel_logits(c[None], self.patch_size, image.shape[-2:])[0] for c, image in zip(cells, x)]
        return pixel_logits(cells, self.patch_size, x.shape[-2:])


def create_segmenter(
        model_name: str,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        drop_rate: float = 0.,
        **kwargs,
) -> LookWhereSegmenter:
    """A LookWhere segmenter from any `lookwhere_*` name, e.g. `create_segmenter('lookwhere_vitt16_512.dense_signs',
    pretrained=True)` (shipped in the package: loads offline), or `create_segmenter('lookwhere_vitb_518.dinov2',
    pretrained=True, num_classes=150)` (the backbone's weights, a new head).

    Args:
        model_name: a shipped segmenter (SHIPPED_SEGMENTERS), or a LookWhere name with optional pretrained tag:
            the backbone.
        pretrained: load the shipped segmenter's weights, or the backbone's pretrained tag (the head starts new).
        num_classes: classes of the head (mask values 0..num_classes - 1); a shipped segmenter's own by default.
        drop_rate: dropout on the grid features before the head.
        **kwargs: more `timm.create_model` arguments of the backbone (k, k_ratio, dynamic_img_size, img_size, ...).
    """
    if model_name in SHIPPED_SEGMENTERS:
        architecture, shipped_classes, file = SHIPPED_SEGMENTERS[model_name]
        if num_classes is not None and num_classes != shipped_classes and pretrained:
            raise ValueError(f'{model_name} segments {shipped_classes} classes; for {num_classes}, start from its '
                             f"backbone: create_segmenter('{architecture}.<tag>', pretrained=True, num_classes=...)")
        backbone = timm.create_model(architecture, num_classes=0, **kwargs)
        model = LookWhereSegmenter(backbone, num_classes or shipped_classes, drop_rate)
        if pretrained:
            if not os.path.isfile(file):
                raise FileNotFoundError(f'the shipped weights {file} are missing: reinstall timm-lookwhere, or train '
                                        f'and ship them with {DENSE_SIGNS_RECIPE} --ship')
            state = load_file(file)
            state['backbone.pos_embed'] = _pos_embed_for(backbone, state['backbone.pos_embed'])
            model.load_state_dict(state)  # fp16 on disk, copied into the float parameters
        return model
    if not model_name.startswith('lookwhere_'):
        raise ValueError(f'{model_name!r} is not a LookWhere model; choose one of {timm.list_models("lookwhere_*")} '
                         f'or a shipped segmenter {sorted(SHIPPED_SEGMENTERS)}')
    if num_classes is None:
        raise ValueError(f'give num_classes: {model_name} is a backbone, its segmentation head starts new')
    backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    return LookWhereSegmenter(backbone, num_classes, drop_rate)


def _pos_embed_for(backbone: LookWhere, pos_embed: torch.Tensor) -> torch.Tensor:
    """The stored position embedding on the backbone's grid (an img_size= call resizes it, as timm does)."""
    rows, cols = backbone.grid_size
    if pos_embed.shape[1] == rows * cols:
        return pos_embed
    from timm.layers import resample_abs_pos_embed
    return resample_abs_pos_embed(pos_embed.float(), new_size=(rows, cols), num_prefix_tokens=0, antialias=False)


# --------------------------------------------------------------------------------------------
# loss and metrics


def segmentation_loss(
        logits: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int = IGNORE_INDEX,
        class_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pixel cross-entropy: (B, C, H, W) logits, (B, H, W) class ids; `ignore_index` pixels count for nothing.
    Logits smaller than the mask (a loss at a fraction of the pixels) are upsampled bilinearly to it first."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode='bilinear', align_corners=False)
    return F.cross_entropy(logits, target.long(), weight=class_weight, ignore_index=ignore_index)


def confusion_matrix(
        prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """(num_classes, num_classes) int64 pixel counts, rows the true class, columns the predicted one."""
    valid = target != ignore_index
    pairs = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """(C, C) confusion -> (C,) intersection over union; NaN for a class neither present nor predicted."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float('nan')))


def mean_iou(confusion: torch.Tensor, classes: Optional[Sequence[int]] = None) -> float:
    """Mean IoU over `classes` (default: all) that are present or predicted."""
    iou = iou_per_class(confusion)
    if classes is not None:
        iou = iou[list(classes)]
    return float(iou.nanmean())
