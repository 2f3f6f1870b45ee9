"""Semantic segmentation with LookWhere: the authors' per-cell linear head on the filled patch grid, pixel logits.

LookWhere's extractor sees k of the high-res patches; `forward_dense` fills every cell of the patch grid
from those k tokens (inverse-distance weighting of the nearest chosen patches, as the authors do), and
the authors' segmentation head is a linear layer on each cell. Its logits, one per patch, are upsampled
bilinearly to the image's pixels. The selector stays frozen (the paper's fine-tuning): it was trained,
without labels, to find what matters. `ViTSegmenter` is the same head on a full-res ViT: what a LookWhere
segmenter is compared with, and its teacher.

    seg = create_segmenter('lookwhere_vitt16_512.dense_signs', pretrained=True)   # shipped: loads offline
    logits = seg(x)                                  # (B, 3, 512, 512) normalised -> (B, 15, 512, 512)
    teacher = timm_lookwhere.create_teacher('lookwhere_vitt16_512.dense_signs')   # its full-res teacher: the same
    seg = create_segmenter('lookwhere_vitb_518.dinov2', pretrained=True, num_classes=150)  # a new task
    loss = segmentation_loss(seg(x), masks)          # cross-entropy, IGNORE_INDEX pixels left out
    confusion += confusion_matrix(logits.argmax(1), masks, 150); mean_iou(confusion)

Also the loss and the metrics (a confusion matrix of pixel counts, IoU and accuracy per class, and
mmsegmentation's three numbers: aAcc, mIoU, mAcc).
"""
import numbers
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg, build_model_with_cfg, split_model_name_tag
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from .dense import SelectorInformedFill
from .layers import check_image_batch, normalize_pixels, per_channel
from .lookwhere import WEIGHTS_DIR, LookWhere, checkpoint_filter_fn
from .teachers import create_teacher, window_features

__all__ = [
    'IGNORE_INDEX', 'SHIPPED_SEGMENTERS', 'SHIPPED_DENSE_TEACHERS', 'LookWhereSegmenter', 'ViTSegmenter',
    'create_segmenter', 'create_dense_teacher', 'pixel_logits', 'segmentation_loss', 'confusion_matrix',
    'iou_per_class', 'mean_iou', 'accuracy_per_class', 'mean_accuracy', 'pixel_accuracy', 'segmentation_metrics',
]

IGNORE_INDEX = 255  # mask value of pixels without a label (ADE20K's and mmsegmentation's convention)
FILLS = ('idw', 'selector')  # how a segmenter fills the cells the extractor did not see
DENSE_SIGNS_RECIPE = 'python -m timm_lookwhere.recipes.dense_signs'

Images = Union[torch.Tensor, List[torch.Tensor], Dict[str, torch.Tensor]]


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f'num_classes must be an int (the classes of the head), got {num_classes!r}')
    if num_classes < 1:
        raise ValueError(f'num_classes must be at least 1 (the classes of the head), got {num_classes}')
    return int(num_classes)


def pixel_logits(cell_logits: torch.Tensor, patch_size: int, image_size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, rows, cols) logits of the patch cells -> (B, C, H, W) logits of the pixels: bilinear, each cell's
    value at its patch's centre (align_corners=False), cropped to the image where the grid was padded."""
    rows, cols = cell_logits.shape[-2:]
    up = F.interpolate(cell_logits, size=(rows * patch_size, cols * patch_size), mode='bilinear',
                       align_corners=False)  # (B, C, rows * p, cols * p)
    return up[..., :image_size[0], :image_size[1]]


def _cell_head(embed_dim: int, num_classes: int) -> nn.Conv2d:
    """The authors' segmentation head: a linear layer on each cell of the grid (a 1x1 convolution)."""
    head = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def _check_vit_img_size(vit: nn.Module) -> None:
    """A ViT whose image side is no multiple of its patch drops the last pixels of each side (timm cuts the grid
    short): refused, with the sizes nearest."""
    embed = vit.patch_embed
    patch = embed.patch_size[0]
    if getattr(embed, 'dynamic_img_pad', False) or all(side % patch == 0 for side in embed.img_size):
        return
    nearest = sorted({size for side in embed.img_size if side % patch
                      for size in (side // patch * patch, side // patch * patch + patch) if size > 0})
    raise ValueError(f'img_size={tuple(embed.img_size)} is not a multiple of the {patch} px patch: the ViT would '
                     f'not see the last pixels of each side; take one of {nearest} (img_size=...)')


class LookWhereSegmenter(nn.Module):
    """A LookWhere backbone and a linear head on every cell of its filled patch grid: pixel logits.

    Takes what the backbone takes: a (B, C, H, W) batch at the model's size (any size, each side a multiple
    of the patch, with `dynamic_img_size=True`; any size at all with `dynamic_img_pad=True` too), a list
    of (C, H_i, W_i) images, which gives a list of (num_classes, H_i, W_i) logits, or timm's NaFlex dict,
    which gives a list of (num_classes, rows_i * p, cols_i * p) logits (its images are whole patches).
    """

    def __init__(self, backbone: LookWhere, num_classes: int, drop_rate: float = 0., fill: str = 'idw'):
        """
        Args:
            backbone: the LookWhere model.
            num_classes: classes of the head.
            drop_rate: dropout on the grid features before the head.
            fill: how cells the extractor did not see are filled: 'idw', the authors' inverse-distance fill of
                the k tokens (`forward_dense`); 'selector', that fill refined by a small learned module with
                the selector's own low-res view of every cell (`dense.SelectorInformedFill`, trained with the
                head).
        """
        super().__init__()
        if not isinstance(backbone, LookWhere):
            raise TypeError(f'backbone must be a LookWhere model, got {type(backbone).__name__}')
        num_classes = _check_num_classes(num_classes)
        if fill not in FILLS:
            raise ValueError(f'fill must be one of {FILLS}, got {fill!r}')
        backbone.reset_classifier(0)  # the image classifier is not used
        self.backbone = backbone
        self.num_classes = num_classes
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.fill = SelectorInformedFill(backbone.embed_dim, backbone.selector.backbone.embed_dim) \
            if fill == 'selector' else None
        self.head_drop = nn.Dropout2d(drop_rate)
        self.head = _cell_head(backbone.embed_dim, num_classes)
        # timm's data helpers (resolve_data_config(model=...)) read the backbone's mean, std and size here
        self.pretrained_cfg = getattr(backbone, 'pretrained_cfg', {})

    def set_k(self, k: Optional[int] = None, k_ratio: Optional[float] = None) -> None:
        """Patches the extractor sees: k, or a fraction of the grid (see `LookWhere.set_k`)."""
        self.backbone.set_k(k=k, k_ratio=k_ratio)

    @property
    def k(self) -> int:
        return self.backbone.k

    def forward_dense(self, x: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The filled patch grid the head classifies: (B, D, rows, cols), or a list of (D, rows_i, cols_i)."""
        if self.fill is None:
            return self.backbone.forward_dense(x)
        return self.dense_from_all(self.backbone.forward_all(x))

    def dense_from_all(self, out: Dict[str, Any]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The backbone's `forward_all` output -> the filled grid the head classifies (see `forward_dense`)."""
        prefix, selector_grid = self.backbone.num_prefix_tokens, self.backbone.selector.grid_size
        if isinstance(out['indices'], torch.Tensor):  # a batch
            filled = self.backbone.dense_from_tokens(out['tokens'], out['indices'], out['grid_size'])
            return filled if self.fill is None else self.fill(
                filled, out['indices'], out['selector_tokens'], selector_grid, out['map'])
        dense = []
        for i, (ids, grid, map_logits) in enumerate(zip(out['indices'], out['grid_size'], out['map'])):
            filled = self.backbone.dense_from_tokens(out['tokens'][i:i + 1, :prefix + len(ids)], ids[None], grid)
            dense.append(filled[0] if self.fill is None else self.fill(
                filled, ids[None], out['selector_tokens'][i:i + 1], selector_grid, map_logits[None])[0])
        return dense

    def forward_cells(self, x: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Logits of the patch cells: (B, num_classes, rows, cols), or a list of (num_classes, rows_i, cols_i)."""
        dense = self.forward_dense(x)  # (B, D, rows, cols) or a list of (D, rows_i, cols_i)
        if isinstance(dense, list):
            return [self.head(self.head_drop(d[None]))[0] for d in dense]
        return self.head(self.head_drop(dense))  # (B, num_classes, rows, cols)

    def forward(self, x: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Images -> (B, num_classes, H, W) pixel logits, or a list of (num_classes, H_i, W_i) for many images."""
        cells = self.forward_cells(x)
        if isinstance(cells, torch.Tensor):
            return pixel_logits(cells, self.patch_size, x.shape[-2:])
        if isinstance(x, dict):  # a NaFlex batch carries whole patches: each image is its grid times the patch
            sizes = [(c.shape[-2] * self.patch_size, c.shape[-1] * self.patch_size) for c in cells]
        else:
            sizes = [image.shape[-2:] for image in x]
        return [pixel_logits(c[None], self.patch_size, size)[0] for c, size in zip(cells, sizes)]


class ViTSegmenter(nn.Module):
    """A full-res timm ViT with LookWhere's segmentation head: a linear layer on every patch token, logits
    upsampled to the pixels (what a LookWhere segmenter is compared with, and its teacher). With `img_size`,
    it sees a low-res copy of that side instead (the baseline at equal cost), its grid's logits upsampled to
    the full image. Takes a (B, C, H, W) batch, normalised floats or uint8 pixels (normalised with the pretrained
    cfg's mean and std, as LookWhere does), gives (B, num_classes, H, W).
    """

    def __init__(self, vit: nn.Module, num_classes: int, img_size: Optional[int] = None):
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        _check_vit_img_size(vit)
        vit.reset_classifier(0)
        self.vit = vit
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = vit.patch_embed.patch_size[0]
        self.head = _cell_head(vit.embed_dim, num_classes)
        # uint8 pixels are normalised with its mean and std (build_model_with_cfg sets the segmenter's own)
        self.pretrained_cfg = getattr(vit, 'pretrained_cfg', {})

    def forward_head(self, features: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """The ViT's (B, P + rows * cols, D) features -> (B, num_classes, rows, cols) cell logits."""
        tokens = features[:, self.vit.num_prefix_tokens:]  # (B, rows * cols, D)
        grid = tokens.transpose(1, 2).reshape(len(tokens), -1, *grid_size)  # (B, D, rows, cols)
        return self.head(grid)

    def forward_window(self, crops: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Cell logits of windows of the full image at their true positions (see `teachers.window_features`):
        (B, 3, w*p, w*p), top-left patches (B,), (B,) -> (B, num_classes, w, w)."""
        side = crops.shape[-1] // self.patch_size
        return self.forward_head(window_features(self.vit, crops, rows, cols), (side, side))

    def forward_cells(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes, rows, cols) on the grid of the ViT's input (with img_size, the copy's)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'a ViTSegmenter takes a (B, C, H, W) batch, got {got}')
        embed = self.vit.patch_embed
        # timm's ViT asserts the size with no way out, and a uint8 batch meets a float convolution
        resized = self.img_size is not None  # any size: the copy is resized to the ViT's
        fixed_size = None if resized or getattr(self.vit, 'dynamic_img_size', False) else tuple(embed.img_size)
        check_image_batch(x, embed.proj.in_channels, self.patch_size, fixed_size,
                          pad=resized or fixed_size is not None or embed.dynamic_img_pad, dtype=embed.proj.weight.dtype)
        if x.dtype == torch.uint8:
            channels = embed.proj.in_channels
            mean = torch.tensor(per_channel(self.pretrained_cfg.get('mean', IMAGENET_DEFAULT_MEAN), channels),
                                device=x.device)
            std = torch.tensor(per_channel(self.pretrained_cfg.get('std', IMAGENET_DEFAULT_STD), channels),
                               device=x.device)
            x = normalize_pixels(x, mean, std, 1).to(embed.proj.weight.dtype)
        if self.img_size is not None:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode='bilinear', antialias=True,
                              align_corners=False)
        return self.forward_head(self.vit.forward_features(x), self.vit.patch_embed.dynamic_feat_size(x.shape[-2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes, H, W) logits."""
        return F.interpolate(self.forward_cells(x), size=x.shape[-2:], mode='bilinear', align_corners=False)


# --------------------------------------------------------------------------------------------
# loading shipped weights: timm's build_model_with_cfg, each part through its model's filter function


def _float_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # the files are fp16: resize position embeddings in float, as on the weights the model was trained with
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _filter_part(state_dict: Dict[str, torch.Tensor], prefix: str, filter_fn, module: nn.Module):
    """`filter_fn` on the keys under `prefix` (for `module`), the other keys unchanged."""
    part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return {**{prefix + k: v for k, v in filter_fn(part, module).items()}, **rest}


def segmenter_filter_fn(state_dict: Dict[str, torch.Tensor], model: LookWhereSegmenter) -> Dict[str, torch.Tensor]:
    """A LookWhere segmenter's file -> its state dict: the backbone through LookWhere's `checkpoint_filter_fn`
    (position embeddings resized to the grids of an img_size= call, a clear error for another layout)."""
    return _filter_part(_float_state(state_dict), 'backbone.', checkpoint_filter_fn, model.backbone)


def vit_segmenter_filter_fn(state_dict: Dict[str, torch.Tensor], model: ViTSegmenter) -> Dict[str, torch.Tensor]:
    """A ViTSegmenter's file -> its state dict: the ViT through timm's own ViT filter function."""
    return _filter_part(_float_state(state_dict), 'vit.', vit_checkpoint_filter_fn, model.vit)


def _cfg(**kwargs) -> PretrainedCfg:
    return PretrainedCfg(**{
        'num_classes': 15,
        'input_size': (3, 512, 512),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head',
        'license': 'mit',
        **kwargs,
    })


# Segmenters that ship inside the package (trained by the dense-signs recipe): name -> pretrained cfg, the
# name's architecture being the backbone's.
SEGMENTER_CFGS: Dict[str, PretrainedCfg] = {
    'lookwhere_vitt16_512.dense_signs': _cfg(
        architecture='lookwhere_vitt16_512', tag='dense_signs',
        file=os.path.join(WEIGHTS_DIR, 'lookwhere_vitt16_512_dense_signs.safetensors'),
        first_conv=('backbone.patch_embed.proj', 'backbone.selector.backbone.patch_embed.proj'),
        notes=('Dense sign scenes (timm_lookwhere.scenes): fine-tuned from lookwhere_vitt16_512.sparse_signs, the '
               f'selector frozen, k drawn per step: `{DENSE_SIGNS_RECIPE} --ship`.',),
    ),
}
# the segmenter arguments each shipped one was trained with (its fill; 'idw' where none is given)
SEGMENTER_ARGS: Dict[str, Dict[str, Any]] = {'lookwhere_vitt16_512.dense_signs': dict(fill='selector')}
# name -> (backbone architecture, classes, weights file)
SHIPPED_SEGMENTERS: Dict[str, Tuple[str, int, str]] = {
    name: (cfg.architecture, cfg.num_classes, cfg.file) for name, cfg in SEGMENTER_CFGS.items()}
# The full-res teacher each shipped segmenter was trained beside, `timm_lookwhere.create_teacher(<its name>)`:
# segmenter name -> (the classification teacher whose ViT architecture it has, its pretrained cfg).
SHIPPED_DENSE_TEACHERS: Dict[str, Tuple[str, PretrainedCfg]] = {
    'lookwhere_vitt16_512.dense_signs': ('lookwhere_vitt16_512.sparse_signs', _cfg(
        architecture='vit_teacher_vitt16_512', tag='dense_signs',
        file=os.path.join(WEIGHTS_DIR, 'vit_teacher_vitt16_512_dense_signs.safetensors'),
        first_conv='vit.patch_embed.proj',
        notes=('The full-res ViT segmenter (every patch, the same head) of the dense-signs recipe\'s teacher stage, '
               'started from the sparse-signs teacher.',),
    )),
}


def _check_weights_file(name: str, cfg: PretrainedCfg, overlay: Optional[Dict[str, Any]], how: str) -> None:
    """A missing local weights file, named with the way to get it (timm's own error names neither)."""
    overlay = overlay or {}
    if overlay.get('url') or overlay.get('hf_hub_id') or overlay.get('state_dict') is not None:
        return
    file = overlay.get('file') or cfg.file
    if not os.path.isfile(file):
        raise FileNotFoundError(f'the weights of {name} are missing: {file} is not a file. {how}')


def _lookwhere_segmenter(architecture: str, num_classes: int, drop_rate: float = 0., fill: str = 'idw',
                         **kwargs) -> LookWhereSegmenter:
    return LookWhereSegmenter(timm.create_model(architecture, num_classes=0, **kwargs), num_classes, drop_rate, fill)


def _vit_segmenter(vit_of: str, num_classes: int, **kwargs) -> ViTSegmenter:
    return ViTSegmenter(create_teacher(vit_of, pretrained=False, **kwargs), num_classes)


def _known_names() -> str:
    return (f'shipped segmenters: {sorted(SHIPPED_SEGMENTERS)}; or a LookWhere backbone (any of '
            f'{timm.list_models("lookwhere_*")}, with a pretrained tag of {timm.list_pretrained("lookwhere_*")}) '
            'and num_classes')


def create_segmenter(
        model_name: str,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        drop_rate: float = 0.,
        fill: Optional[str] = None,
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
        fill: how unseen cells are filled (see `LookWhereSegmenter`): a shipped segmenter's own by default, else
            'idw', the authors' fill; 'selector' adds a learned fill (trained with the head) that reads the
            selector's low-res view of every cell.
        **kwargs: more `timm.create_model` arguments of the backbone (k, k_ratio, dynamic_img_size, img_size, ...);
            for a shipped segmenter also timm's `pretrained_cfg_overlay` (dict(file=...): a recipe run's export).
    """
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    if model_name in SEGMENTER_CFGS:
        cfg = SEGMENTER_CFGS[model_name]
        overlay = kwargs.pop('pretrained_cfg_overlay', None)
        shipped_classes = (overlay or {}).get('num_classes', cfg.num_classes)
        if pretrained and num_classes not in (None, shipped_classes):
            raise ValueError(f'{model_name} segments {shipped_classes} classes; for {num_classes}, start from its '
                             f"backbone: create_segmenter('{cfg.architecture}.<tag>', pretrained=True, "
                             'num_classes=...)')
        shipped_fill = SEGMENTER_ARGS.get(model_name, {}).get('fill', 'idw')
        if pretrained and fill not in (None, shipped_fill):
            raise ValueError(f"{model_name} was trained with fill={shipped_fill!r}; for fill={fill!r}, train a head "
                             f"from its backbone: create_segmenter('{cfg.architecture}.<tag>', fill={fill!r}, ...)")
        if pretrained:
            _check_weights_file(model_name, cfg, overlay, 'Reinstall timm-lookwhere, or train and ship them with '
                                f'{DENSE_SIGNS_RECIPE} --output DIR --ship')
        return build_model_with_cfg(
            _lookwhere_segmenter, model_name, pretrained, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay,
            pretrained_filter_fn=segmenter_filter_fn, architecture=cfg.architecture,
            num_classes=num_classes or shipped_classes, drop_rate=drop_rate, fill=fill or shipped_fill, **kwargs)
    teachers = {f'{cfg.architecture}.{cfg.tag}': name for name, (_, cfg) in SHIPPED_DENSE_TEACHERS.items()}
    if model_name in teachers:
        name = teachers[model_name]
        raise ValueError(f"{model_name} is {name}'s full-res teacher: timm_lookwhere.create_teacher({name!r}); "
                         f'the LookWhere segmenter: create_segmenter({name!r}, pretrained=True)')
    architecture, tag = split_model_name_tag(model_name)
    if architecture not in timm.list_models('lookwhere_*'):
        raise ValueError(f'{model_name!r} is not a LookWhere model; {_known_names()}')
    if tag and model_name not in timm.list_pretrained(f'{architecture}.*'):
        raise ValueError(f'{model_name!r}: no shipped segmenter and no pretrained tag {tag!r} of {architecture} '
                         f'(its tags: {timm.list_pretrained(f"{architecture}.*")}); '
                         f'{_known_names()}')
    if num_classes is None:
        raise ValueError(f'give num_classes: {model_name} is a backbone, its segmentation head starts new')
    backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    return LookWhereSegmenter(backbone, num_classes, drop_rate, fill or 'idw')


def create_dense_teacher(model_name: str, pretrained: bool = True, **kwargs) -> ViTSegmenter:
    """The full-res ViT segmenter a shipped segmenter was trained beside (`timm_lookwhere.create_teacher` calls
    this for a segmenter's name): (B, 3, H, W) -> (B, num_classes, H, W) pixel logits.

    Args:
        model_name: a shipped segmenter with a teacher (SHIPPED_DENSE_TEACHERS).
        pretrained: load the shipped weights; False builds the same architecture at random.
        **kwargs: more `timm.create_model` arguments of the ViT (img_size: its position embeddings resized by
            timm's ViT filter), and timm's `pretrained_cfg_overlay` (dict(file=...): a dense-signs run's
            teacher/model.pth).
    """
    if model_name not in SHIPPED_DENSE_TEACHERS:
        raise ValueError(f'no dense teacher ships for {model_name!r}; one ships for {sorted(SHIPPED_DENSE_TEACHERS)}')
    vit_of, cfg = SHIPPED_DENSE_TEACHERS[model_name]
    num_classes = kwargs.get('num_classes')
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    shipped_classes = (kwargs.get('pretrained_cfg_overlay') or {}).get('num_classes', cfg.num_classes)
    if pretrained and num_classes not in (None, shipped_classes):
        # timm would load the ViT and leave the head of the other class count untrained, silently
        raise ValueError(f"{model_name}'s teacher segments the {shipped_classes} classes it shipped with; for "
                         f'{num_classes}, put a new head on the full-res ViT of its classification teacher: '
                         f'ViTSegmenter(timm_lookwhere.create_teacher({vit_of!r}), num_classes={num_classes}) '
                         '(timm_lookwhere.segmentation), or pretrained=False for a random one')
    if pretrained:
        _check_weights_file(f"{model_name}'s teacher", cfg, kwargs.get('pretrained_cfg_overlay'), (
            f"Reinstall timm-lookwhere, or train it with {DENSE_SIGNS_RECIPE} --output DIR --stages data,teacher and "
            "load DIR/teacher/model.pth: create_teacher(..., pretrained_cfg_overlay=dict(file=...))"))
    return build_model_with_cfg(
        _vit_segmenter, cfg.architecture, pretrained, pretrained_cfg=cfg, pretrained_filter_fn=vit_segmenter_filter_fn,
        vit_of=vit_of, **kwargs)


# --------------------------------------------------------------------------------------------
# loss and metrics


def _check_class_ids(values: torch.Tensor, num_classes: int, what: str) -> None:
    """Class ids outside [0, num_classes) named, where they would land in a wrong cell or fail far away."""
    outside = (values < 0) | (values >= num_classes)
    if outside.any():
        found = torch.unique(values[outside])
        shown = ', '.join(str(v) for v in found[:10].tolist()) + (', ...' if len(found) > 10 else '')
        raise ValueError(f'{what} holds values outside the {num_classes} classes [0, {num_classes}): {shown}')


def _check_aspect(logits_size: Tuple[int, int], mask_size: Tuple[int, int]) -> None:
    (h, w), (mask_h, mask_w) = logits_size, mask_size
    # the same scale in both directions, within a pixel of the mask (a strided mask may round)
    if abs(mask_h * w - mask_w * h) >= max(h, w):
        raise ValueError(
            f'logits of {h}x{w} do not cover a {mask_h}x{mask_w} mask: another aspect ratio. Give the logits of '
            'the image the mask belongs to (the pixel logits, or its cell logits, which are upsampled to the mask)')


def _loss_sum(
        logits: torch.Tensor, target: torch.Tensor, ignore_index: int, class_weight: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) logits, (B, H, W) mask -> the weighted cross-entropy summed over the labelled pixels, and
    the sum of their weights (their count without class weights)."""
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(f'segmentation_loss takes (B, C, H, W) logits and (B, H, W) masks (or lists of '
                         f'(C, H, W) and (H, W)), got {list(logits.shape)} and {list(target.shape)}')
    target = target.long()
    valid = target != ignore_index
    _check_class_ids(target[valid], logits.shape[1], 'the mask')
    if logits.shape[-2:] != target.shape[-2:]:
        _check_aspect(logits.shape[-2:], target.shape[-2:])
        logits = F.interpolate(logits, size=target.shape[-2:], mode='bilinear', align_corners=False)
    total = F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index, reduction='sum')
    weight = valid.sum() if class_weight is None else class_weight[target[valid]].sum()
    return total, weight


def segmentation_loss(
        logits: Union[torch.Tensor, Sequence[torch.Tensor]],
        target: Union[torch.Tensor, Sequence[torch.Tensor]],
        ignore_index: int = IGNORE_INDEX,
        class_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pixel cross-entropy: (B, C, H, W) logits, (B, H, W) class ids; `ignore_index` pixels count for nothing.

    Logits smaller than the mask, of the same aspect ratio (a loss at a fraction of the pixels, or on the cell
    logits), are upsampled bilinearly to it first. A list of (C, H_i, W_i) logits (what a segmenter gives for a
    list of images) takes a list (or a batch) of (H_i, W_i) masks: the mean over all their labelled pixels, as
    one batch would give. A mask with no labelled pixel gives a zero loss that still backpropagates (to zero).
    """
    if isinstance(logits, (list, tuple)) or isinstance(target, (list, tuple)):
        logits, target = list(logits), list(target)
        if len(logits) != len(target):
            raise ValueError(f'segmentation_loss: {len(logits)} logits for {len(target)} masks')
        if not logits:
            raise ValueError('segmentation_loss: no logits (an empty list)')
        sums = [_loss_sum(lg[None], t[None], ignore_index, class_weight) for lg, t in zip(logits, target)]
        total, weight = sum(s for s, _ in sums), sum(w for _, w in sums)
    else:
        total, weight = _loss_sum(logits, target, ignore_index, class_weight)
    # no labelled pixel: the sum is an exact zero on the logits' graph, where the mean would be 0 / 0
    return total / weight if weight > 0 else total


def _check_class_id_dtype(values: torch.Tensor, what: str, hint: str) -> None:
    # floats would be truncated to a class (1.4 counted as 1): silently wrong
    if values.is_floating_point() or values.is_complex():
        raise TypeError(f'confusion_matrix: the {what} is {values.dtype}, not class ids; {hint}')


def confusion_matrix(
        prediction: Union[torch.Tensor, Sequence[torch.Tensor]],
        target: Union[torch.Tensor, Sequence[torch.Tensor]],
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """(num_classes, num_classes) int64 pixel counts, rows the true class, columns the predicted one.

    Takes integer class ids of the same shape (a (B, H, W) batch, or an image's (H, W)), or lists of (H_i, W_i)
    predictions and masks (what a segmenter gives for a list of images): their matrices summed. Class ids outside
    [0, num_classes) (but `ignore_index` in the target) and float values are refused, named.
    """
    num_classes = _check_num_classes(num_classes)
    if isinstance(prediction, (list, tuple)) or isinstance(target, (list, tuple)):
        prediction, target = list(prediction), list(target)
        if len(prediction) != len(target):
            raise ValueError(f'confusion_matrix: {len(prediction)} predictions for {len(target)} masks')
        matrices = [confusion_matrix(p, t, num_classes, ignore_index) for p, t in zip(prediction, target)]
        return torch.stack(matrices).sum(0) if matrices else torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for what, values in (('prediction', prediction), ('target', target)):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f'confusion_matrix takes tensors of class ids (or lists of them); the {what} is a '
                            f'{type(values).__name__} (torch.as_tensor(...) converts an array)')
    if prediction.shape != target.shape:
        raise ValueError(f'confusion_matrix: prediction {list(prediction.shape)} and target {list(target.shape)} '
                         'differ in shape (give class ids, e.g. logits.argmax(1), not logits)')
    _check_class_id_dtype(prediction, 'prediction', 'give the class of each pixel: logits.argmax(1) (dim 0 for '
                          "one image's (C, H, W) logits)")
    _check_class_id_dtype(target, 'target', 'give the mask as integer class ids (mask.long() if its values are whole)')
    valid = target != ignore_index
    target, prediction = target[valid].long(), prediction[valid].long()
    _check_class_ids(target, num_classes, 'the target')
    _check_class_ids(prediction, num_classes, 'the prediction')
    pairs = target * num_classes + prediction
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)


def _check_confusion(confusion: Any) -> torch.Tensor:
    """A (C, C) confusion matrix (counts, or normalised floats) -> float64."""
    if not isinstance(confusion, torch.Tensor):
        raise TypeError(f'expected a (C, C) confusion matrix tensor (confusion_matrix\'s), got a '
                        f'{type(confusion).__name__} (torch.as_tensor(...) converts an array)')
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        stacked = confusion.dim() == 3 and confusion.shape[1] == confusion.shape[2]
        raise ValueError(f'expected a (C, C) confusion matrix (rows the true class, columns the predicted one), '
                         f'got shape {list(confusion.shape)}'
                         + ('; a stack of per-image matrices sums to one: confusion.sum(0)' if stacked else ''))
    return confusion.double()


def _class_ids(classes: Any, num_classes: int) -> torch.Tensor:
    """`classes` of a mean -> their ids, each an int in [0, num_classes) given once (-1 would silently be the last
    class, a bool mask would be read as the ids 0 and 1, a repeated class would weigh twice)."""
    if isinstance(classes, numbers.Number) or isinstance(classes, (str, bytes)):
        raise TypeError(f'classes must be a sequence of class ids, e.g. [1, 2], got {classes!r}')
    if hasattr(classes, 'dtype'):  # a tensor or an array
        values = torch.as_tensor(classes)
        if values.dtype == torch.bool:
            raise TypeError('classes must be class ids, got a bool mask; its ids: mask.nonzero().flatten().tolist()')
        if values.is_floating_point() or values.is_complex():
            raise TypeError(f'classes must be class ids (ints), got {values.dtype} values')
        ids = values.flatten().tolist()
    else:
        ids = list(classes)
        if any(isinstance(c, bool) for c in ids):
            raise TypeError('classes must be class ids, got bools; the ids of a mask: '
                            '[i for i, keep in enumerate(mask) if keep]')
        wrong = [c for c in ids if not isinstance(c, numbers.Integral)]
        if wrong:
            raise TypeError(f'classes must be class ids (ints), got {wrong[:10]}')
        ids = [int(c) for c in ids]
    if not ids:
        raise ValueError('classes is empty: give the class ids to average over, or None for all')
    outside = sorted({c for c in ids if not 0 <= c < num_classes})
    if outside:
        backwards = ' (ids do not count from the end)' if min(outside) < 0 else ''
        raise ValueError(f'classes must be ids of the {num_classes} classes [0, {num_classes}) of the confusion '
                         f'matrix; not: {outside[:10]}{backwards}')
    repeated = sorted({c for c in ids if ids.count(c) > 1})
    if repeated:
        raise ValueError(f'classes names {repeated[:10]} more than once; give each class once')
    return torch.tensor(ids, dtype=torch.long)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """(C, C) confusion (pixel counts, or a normalised float matrix) -> (C,) intersection over union; NaN for a
    class neither present nor predicted."""
    confusion = _check_confusion(confusion)
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union, torch.full_like(hits, float('nan')))


def mean_iou(confusion: torch.Tensor, classes: Optional[Sequence[int]] = None) -> float:
    """Mean IoU over `classes` (ids in [0, C); default: all) that are present or predicted."""
    iou = iou_per_class(confusion)
    if classes is not None:
        iou = iou[_class_ids(classes, len(iou))]
    return float(iou.nanmean())


def accuracy_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """(C, C) confusion (pixel counts, or a normalised float matrix) -> (C,) accuracy of each class: its pixels
    predicted as it / its pixels (recall); NaN for a class absent from the target."""
    confusion = _check_confusion(confusion)
    pixels = confusion.sum(1)
    return torch.where(pixels > 0, confusion.diagonal() / pixels, torch.full_like(pixels, float('nan')))


def mean_accuracy(confusion: torch.Tensor, classes: Optional[Sequence[int]] = None) -> float:
    """Mean of the per-class accuracies over `classes` (ids in [0, C); default: all) present in the target:
    mmsegmentation's mAcc."""
    accuracy = accuracy_per_class(confusion)
    if classes is not None:
        accuracy = accuracy[_class_ids(classes, len(accuracy))]
    return float(accuracy.nanmean())


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Labelled pixels predicted right / labelled pixels, every class together: mmsegmentation's aAcc (NaN for none)."""
    confusion = _check_confusion(confusion)
    total = confusion.sum()
    return float(confusion.trace() / total) if total > 0 else float('nan')


def segmentation_metrics(confusion: torch.Tensor, classes: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """mmsegmentation's three numbers from a confusion matrix: {'aAcc', 'mIoU', 'mAcc'}, fractions (mmsegmentation
    prints them x 100). `classes` narrows the two means; aAcc counts every labelled pixel."""
    return {'aAcc': pixel_accuracy(confusion), 'mIoU': mean_iou(confusion, classes),
            'mAcc': mean_accuracy(confusion, classes)}
