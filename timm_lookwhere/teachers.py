"""Full-resolution ViTs beside a LookWhere: the teacher a pretrained one was distilled from, and the dense
counterpart (the same blocks on every patch) it is compared with.

    create_teacher('lookwhere_vitt16_512.sparse_signs')   # shipped in the package: loads offline
    create_teacher('lookwhere_vitb_518.dinov2')           # timm's own DINOv2 ViT-B/14 (Hugging Face Hub)
    create_dense_counterpart(lookwhere)                   # the extractor's blocks on every patch, at random
"""
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer

from .lookwhere import SIGNS_RECIPE, WEIGHTS_DIR, LookWhere

__all__ = [
    'TEACHER_BASE', 'SHIPPED_TEACHER_FILES', 'ZOO_TEACHERS', 'dense_counterpart_kwargs', 'create_dense_counterpart',
    'create_teacher', 'window_features',
]

# The timm entry dense (full-resolution) ViTs are built from: its defaults (no position embedding slot
# for the cls token, ImageNet mean/std) are LookWhere's; its size comes from dense_counterpart_kwargs.
TEACHER_BASE = 'vit_small_patch14_reg4_dinov2'
# The teacher each shipped model was distilled from, when the package ships it (trained by the sparse-signs recipe).
SHIPPED_TEACHER_FILES = {
    'lookwhere_vitt16_256.sparse_signs': os.path.join(WEIGHTS_DIR, 'vit_teacher_vitt16_256_sparse_signs.safetensors'),
    'lookwhere_vitt16_512.sparse_signs': os.path.join(WEIGHTS_DIR, 'vit_teacher_vitt16_512_sparse_signs.safetensors'),
}
# The teacher of the authors' weights is in timm's own zoo.
ZOO_TEACHERS = {'lookwhere_vitb_518.dinov2': 'vit_base_patch14_reg4_dinov2.lvd142m'}


def dense_counterpart_kwargs(model: LookWhere) -> Dict[str, Any]:
    """`timm.create_model(TEACHER_BASE, **kwargs)` arguments for a ViT with the extractor's blocks
    that sees every patch: the full-resolution model LookWhere is compared with (and distilled from)."""
    block = model.blocks[0]
    kwargs = dict(
        img_size=tuple(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim, reg_tokens=model.num_reg_tokens,
        init_values=None if isinstance(block.ls1, nn.Identity) else 1e-5, num_classes=model.num_classes,
    )
    if type(block.mlp).__name__ != 'Mlp':  # e.g. Franca's SwiGLU
        kwargs.update(mlp_layer=type(block.mlp), act_layer=type(block.mlp.act))
    if kwargs['img_size'][0] == kwargs['img_size'][1]:
        kwargs['img_size'] = kwargs['img_size'][0]
    return kwargs


def create_dense_counterpart(model: LookWhere, file: Optional[str] = None, **kwargs) -> VisionTransformer:
    """The full-resolution ViT beside `model`: `TEACHER_BASE` with the extractor's blocks, seeing every patch
    (`dense_counterpart_kwargs`), at random or with the weights of `file` (.pth or .safetensors; timm resizes
    the position embeddings to the img_size given, and keeps a classifier of the num_classes given).

    Args:
        model: the LookWhere whose extractor the ViT repeats.
        file: weights to load; None leaves timm's initialisation.
        **kwargs: `timm.create_model` arguments over the counterpart's (img_size, num_classes, init_values, ...).
    """
    args = dict(dense_counterpart_kwargs(model), **kwargs)
    if file is None:
        return timm.create_model(TEACHER_BASE, **args)
    overlay = dict(file=file, num_classes=args['num_classes'])  # num_classes in the overlay keeps the head
    return timm.create_model(TEACHER_BASE, pretrained=True, pretrained_cfg_overlay=overlay, **args)


def create_teacher(model_name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    """The full-resolution ViT a pretrained LookWhere was distilled from, e.g.
    `create_teacher('lookwhere_vitt16_256.sparse_signs')` (shipped in the package, loads offline). For a shipped
    segmenter, its full-res ViT segmenter: `create_teacher('lookwhere_vitt16_512.dense_signs')` gives
    (B, 15, H, W) pixel logits (`timm_lookwhere.segmentation.ViTSegmenter`).

    Args:
        model_name: a LookWhere name with its pretrained tag (the default tag when none is given).
        pretrained: load the teacher's weights; False builds the same architecture at random.
        **kwargs: more `timm.create_model` arguments (e.g. img_size for the shipped teachers).
    """
    from .segmentation import SHIPPED_DENSE_TEACHERS, create_dense_teacher  # (segmentation imports this module)
    if model_name in SHIPPED_DENSE_TEACHERS:  # a segmenter's teacher: a ViTSegmenter, (B, 3, H, W) -> pixel logits
        return create_dense_teacher(model_name, pretrained=pretrained, **kwargs)
    cfg = get_pretrained_cfg(model_name)
    name = f'{model_name.split(".")[0]}.{cfg.tag}' if cfg is not None else model_name
    if name in ZOO_TEACHERS:
        return timm.create_model(ZOO_TEACHERS[name], pretrained=pretrained, **kwargs)
    if name not in SHIPPED_TEACHER_FILES:
        known = sorted(SHIPPED_TEACHER_FILES) + sorted(ZOO_TEACHERS)
        raise ValueError(f'no known teacher for {model_name!r}; teachers are known for {known}')
    lookwhere = timm.create_model(name.split('.')[0], num_classes=cfg.num_classes, weight_init='skip')
    if not pretrained:
        return create_dense_counterpart(lookwhere, **kwargs)
    file = SHIPPED_TEACHER_FILES[name]
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f'the shipped teacher weights {file} are missing: reinstall timm-lookwhere, or train them with '
            f'{SIGNS_RECIPE} --ship')
    return create_dense_counterpart(lookwhere, file, **kwargs)


def window_features(vit: VisionTransformer, crops: torch.Tensor, rows: torch.Tensor,
                    cols: torch.Tensor) -> torch.Tensor:
    """Tokens of a full-res timm ViT (no_embed_class) on windows of the image at their true positions.

    crops (B, 3, w*p, w*p) are the windows, rows/cols (B,) their top-left patch; the patches get the
    position embeddings they have in the whole image, exactly as when the ViT sees all of it. A window
    teaches the ViT what is in it at a fraction of the cost of the whole image.
    """
    proj = vit.patch_embed.proj
    p, grid_cols = proj.stride[0], vit.patch_embed.grid_size[1]
    x = F.conv2d(crops, proj.weight, proj.bias, stride=p).flatten(2).transpose(1, 2)  # (B, w*w, D)
    w = crops.shape[-1] // p
    r, c = torch.meshgrid(torch.arange(w), torch.arange(w), indexing='ij')
    index = (rows[:, None] + r.flatten()) * grid_cols + cols[:, None] + c.flatten()  # (B, w*w)
    x = x + vit.pos_embed[0][index]
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + w*w, D)
    return vit.norm(vit.blocks(vit.norm_pre(x)))
