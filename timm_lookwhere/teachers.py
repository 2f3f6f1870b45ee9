"""Full-resolution ViTs beside a LookWhere: the teacher a pretrained one was distilled from, and the dense
counterpart (the same blocks on every patch) it is compared with.

    create_teacher('lookwhere_vitt16_512.sparse_signs')   # shipped in the package: loads offline
    create_teacher('lookwhere_vitb_518.dinov2')           # timm's own DINOv2 ViT-B/14 (Hugging Face Hub)
"""
import os
from typing import Any, Dict

import torch.nn as nn

import timm
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer

from .lookwhere import SIGNS_RECIPE, WEIGHTS_DIR, LookWhere

__all__ = ['TEACHER_BASE', 'SHIPPED_TEACHER_FILES', 'ZOO_TEACHERS', 'dense_counterpart_kwargs', 'create_teacher']

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


def create_teacher(model_name: str, pretrained: bool = True, **kwargs) -> VisionTransformer:
    """The full-resolution ViT a pretrained LookWhere was distilled from, e.g.
    `create_teacher('lookwhere_vitt16_256.sparse_signs')` (shipped in the package, loads offline).

    Args:
        model_name: a LookWhere name with its pretrained tag (the default tag when none is given).
        pretrained: load the teacher's weights; False builds the same architecture at random.
        **kwargs: more `timm.create_model` arguments (e.g. img_size for the shipped teachers).
    """
    cfg = get_pretrained_cfg(model_name)
    name = f'{model_name.split(".")[0]}.{cfg.tag}' if cfg is not None else model_name
    if name in ZOO_TEACHERS:
        return timm.create_model(ZOO_TEACHERS[name], pretrained=pretrained, **kwargs)
    if name not in SHIPPED_TEACHER_FILES:
        known = sorted(SHIPPED_TEACHER_FILES) + sorted(ZOO_TEACHERS)
        raise ValueError(f'no known teacher for {model_name!r}; teachers are known for {known}')
    lookwhere = timm.create_model(name.split('.')[0], num_classes=cfg.num_classes, weight_init='skip')
    args = dict(dense_counterpart_kwargs(lookwhere), **kwargs)
    if not pretrained:
        return timm.create_model(TEACHER_BASE, **args)
    file = SHIPPED_TEACHER_FILES[name]
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f'the shipped teacher weights {file} are missing: reinstall timm-lookwhere, or train them with '
            f'{SIGNS_RECIPE} --ship')
    overlay = dict(file=file, num_classes=args['num_classes'])  # num_classes in the overlay keeps the head
    return timm.create_model(TEACHER_BASE, pretrained=True, pretrained_cfg_overlay=overlay, **args)
