"""The LookWhere model family: a low-res selector predicts where to look, a ViT extractor sees only the top-k patches.

Paper: `LookWhere? Efficient Visual Recognition by Learning Where to Look and What to See from
Self-Supervision` - https://arxiv.org/abs/2505.18051 (NeurIPS 2025). Authors' code and weights:
https://github.com/antofuller/lookwhere, https://huggingface.co/antofuller/lookwhere (MIT).

Forward for one 518x518 image (ViT-B/14, k = 10%):
    selector:  image -> 154x154 -> 3-block ViT -> 5 prefix tokens + 121 patch tokens
               -> MLP (16 scores per low-res patch = a 4x4 sub-grid) -> 44x44 map -> 37x37 logits
    topk:      the 136 best-scored of the 1369 high-res patches (a submodule: hook it to read or replace)
    extractor: only those 136 patches are cut out, embedded and given their position embeddings,
               the selector's prefix tokens go in front, 12 blocks, final norm
    outputs:   cls token -> head; or every patch of the grid filled from the 136 (forward_dense)
"""
import logging
import math
import numbers
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from huggingface_hub.errors import LocalEntryNotFoundError

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    LayerNorm, Mlp, SwiGLUPacked, calculate_drop_path_rates, register_notrace_function,
    register_notrace_module, resample_abs_pos_embed, to_2tuple, trunc_normal_,
)
from timm.models import (
    build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, get_pretrained_cfg, named_apply,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.naflexvit import global_pool_naflex
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc, init_weights_vit_timm

from .checkpoints import (
    WEIGHTS_FILE_KINDS, check_state_dict_keys, convert_authors_checkpoint, is_authors_layout, read_weights_file,
    stored_num_classes, weights_unavailable_message,
)
from .dense import idw_fill
from .layers import SparsePatchEmbed, check_image_batch, low_res_copy, per_channel
from .many_sizes import attention_mask, is_many, pad_tokens, read_many, similar_k_groups, zero_padding

__all__ = [
    'LookWhere', 'LookWhereSelector', 'TopKSelect', 'SelectionRecorder', 'RandomSelection', 'PreferredSelection',
    'checkpoint_filter_fn',
]

_logger = logging.getLogger(__name__)

# What a forward takes: a (B, C, H, W) batch, a list of (C, H_i, W_i) images of their own sizes, or timm's NaFlex
# dict; normalised floats or uint8 pixels
Images = Union[torch.Tensor, List[torch.Tensor], Dict[str, torch.Tensor]]
# What forward_features gives: (B, P + k, D) tokens, or for many images {'patches': ..., 'patch_valid': ...}
Features = Union[torch.Tensor, Dict[str, Optional[torch.Tensor]]]

DEFAULT_K_RATIO = 0.1  # the authors' suggestion
# The authors' selector sees a 518 px image at 154 px: a 3.4x bilinear downscale without antialiasing.
AUTHORS_SELECTOR_DOWNSCALE = 518 / 154

try:  # newer timm (1.0.31 has it) records a resize made after construction in the model's traits
    from timm.models._input import update_model_input_size
except ImportError:  # older timm keeps no traits to update
    update_model_input_size = None


# --------------------------------------------------------------------------------------------
# building blocks


@register_notrace_function
def check_selection(indices: torch.Tensor, batch_size: int, num_patches: int, check_range: bool) -> torch.Tensor:
    """The selection must be (B, k) integer ids of patches of the grid; `check_range` also reads their
    values (only a forward hook can put ids outside [0, N) there, so only then is it paid for).
    Returns the ids as int64 (kept by graph clean-up, as `check_image_batch`)."""
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f'top-k selection must give (B, k) integer patch ids, got {type(indices).__name__}')
    if (indices.dim() != 2 or indices.shape[0] != batch_size or indices.shape[1] < 1
            or (indices.dtype != torch.int64 and indices.dtype != torch.int32)):
        raise ValueError(f'top-k selection must give (B, k) integer patch ids with k >= 1 for a batch of '
                         f'{batch_size}, got shape {list(indices.shape)} of {indices.dtype}')
    if check_range and indices.numel() > 0:
        outside = torch.unique(indices[(indices < 0) | (indices >= num_patches)])
        if outside.numel() > 0:
            shown: List[int] = outside[:8].tolist()
            more = ' ...' if outside.numel() > 8 else ''
            raise ValueError(
                f'the selection hook returned patch ids outside [0, {num_patches}) for this '
                f'{num_patches}-patch grid: {shown}{more}')
    return indices.long()


def _as_count(k: Any) -> int:
    """An integral number (int, numpy integer, 0-d integer tensor) as an int; bools and floats are refused."""
    if isinstance(k, torch.Tensor):
        if k.dim() != 0 or k.dtype == torch.bool or k.is_floating_point() or k.is_complex():
            raise TypeError(f'k must be an int, got a {k.dtype} tensor of shape {tuple(k.shape)}')
        return int(k.item())
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f'k must be an int, got {type(k).__name__}')
    return int(k)


def _check_architecture(
        counts: Dict[str, int],
        sizes: Dict[str, int],
        rates: Dict[str, float],
) -> None:
    """Construction arguments named in the error: `counts` at least 1, `sizes` at least 0, `rates` in [0, 1]."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f'{name} must be at least 1, got {value}')
    for name, value in sizes.items():
        if value < 0:
            raise ValueError(f'{name} must be 0 or more, got {value}')
    for name, value in rates.items():
        if not 0 <= value <= 1:
            raise ValueError(f'{name} is a probability, in [0, 1]; got {value}')
    if counts['embed_dim'] % counts['num_heads']:
        raise ValueError(f"embed_dim={counts['embed_dim']} must be divisible by num_heads={counts['num_heads']}")


def _check_global_pool(global_pool: str) -> str:
    if global_pool not in ('token', 'avg', ''):
        raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
    return global_pool


def _check_img_size(img_size: Tuple[int, int], patch_size: int) -> None:
    if any(s % patch_size or s <= 0 for s in img_size):
        raise ValueError(f'image sides must be positive multiples of the patch size {patch_size}, got {img_size}')


def _check_k_fits(k: int, grid_size: Tuple[int, int], patch_size: int, way_out: str = '') -> None:
    """k patches must exist on a (rows, cols) grid: between 1 and rows * cols."""
    rows, cols = grid_size
    where = f'{rows * cols} patches of a {rows}x{cols} grid ({rows * patch_size}x{cols * patch_size} px images)'
    if k < 1:
        raise ValueError(f'k={k} must be between 1 and the {where}')
    if k > rows * cols:
        raise ValueError(f'k={k} is more than the {where}: it must be between 1 and the {rows * cols} patches'
                         + (f'; {way_out}' if way_out else ''))


@register_notrace_module  # a leaf under FX, which cannot trace einops; as a module it scripts, compiles and exports
class MapLayout(Rearrange):
    """einops' Rearrange, kept whole by FX tracing."""


class LookWhereSelector(nn.Module):
    """Low-res ViT and an MLP that turns each low-res patch token into a sub-grid of high-res scores.

    State dict keys follow the authors' ["selector"] layout: `backbone.*` is a timm ViT,
    `head.fc1/fc2` the map MLP (their `w1/w2`).
    """

    def __init__(
            self,
            img_size: int = 154,
            patch_size: int = 14,
            in_chans: int = 3,
            embed_dim: int = 768,
            depth: int = 3,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            reg_tokens: int = 4,
            init_values: Optional[float] = 1e-5,
            mlp_layer: Type[nn.Module] = Mlp,
            act_layer: Optional[Type[nn.Module]] = None,
            map_grid: int = 37,
            antialias: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: side of the square low-res copy the selector sees.
            map_grid: grid side the map head was trained for (518 / 14 = 37); each low-res patch
                scores a ceil(map_grid / low-res grid)^2 sub-grid, as in the authors' head.
            antialias: how the low-res copy is made. None: the authors' bilinear resize without
                antialiasing up to their downscale (518 -> 154, 3.4x), antialiased beyond it, where
                plain bilinear reads a shrinking fraction of the pixels; True/False: always/never.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if img_size < patch_size or img_size % patch_size:
            below, above = img_size // patch_size * patch_size, max(1, -(-img_size // patch_size)) * patch_size
            nearest = f'{below} or {above}' if below > 0 else f'{above}'
            raise ValueError(
                f'selector_img_size={img_size} must be a positive multiple of the patch size {patch_size} (else '
                f'pixels of its low-res copy go unseen: the patch grid drops a partial patch); use {nearest}')
        self.backbone = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values, class_token=True,
            reg_tokens=reg_tokens, no_embed_class=True, mlp_layer=mlp_layer, act_layer=act_layer, **dd,
        )
        self.img_size = self.backbone.patch_embed.img_size
        self.grid_size = self.backbone.patch_embed.grid_size
        if self.grid_size[0] != self.grid_size[1]:
            raise ValueError(f'the selector works on a square low-res copy, got img_size={img_size}')
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
        self.multiplier = math.ceil(map_grid / self.grid_size[0])
        self.antialias = antialias
        self.head = Mlp(embed_dim, 4 * embed_dim, self.multiplier ** 2, act_layer=nn.GELU, **dd)
        # each low-res patch scores an m x m block of the high-res map, laid out as the authors do
        self.map_layout = MapLayout(  # (B, h * w, m * m) -> (B, 1, h * m, w * m)
            'b (h w) (i j) -> b 1 (h i) (w j)', h=self.grid_size[0], i=self.multiplier)

    def antialias_for(self, image_size: Tuple[int, int]) -> bool:
        """Whether the low-res copy of an (H, W) image is made with antialiasing (see `antialias`)."""
        if self.antialias is not None:
            return self.antialias
        downscale = max(image_size[0] / self.img_size[0], image_size[1] / self.img_size[1])
        return downscale > AUTHORS_SELECTOR_DOWNSCALE + 1e-6

    def low_res_copy(
            self,
            x: torch.Tensor,
            grid_size: Tuple[int, int],
            pixel_mean: torch.Tensor,
            pixel_std: torch.Tensor,
    ) -> torch.Tensor:
        """(B, C, H, W) images of a (rows, cols) grid of high-res patches -> (B, C, 154, 154) normalised copies:
        what the selector sees. Float images are normalised and on whole patches; uint8 pixels are normalised
        on what the copy reads (see `layers.low_res_copy`)."""
        patch = self.backbone.patch_embed.patch_size[0]
        padded = (grid_size[0] * patch, grid_size[1] * patch)
        return low_res_copy(x, self.img_size, self.antialias_for(padded), padded, pixel_mean, pixel_std,
                            self.backbone.pos_embed.dtype)

    def forward(self, low_res: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, 154, 154) low-res copies -> (B, 1, 44, 44) map logits in the blocks of the authors' layout,
        (B, P, D) prefix tokens, (B, 121, D) its patch tokens (its own view of every region)."""
        x = self.backbone.forward_features(low_res)  # (B, P + 121, D)
        # contiguous: on a strided slice F.linear falls back to a batched matmul with the weight
        # copied per image (2x slower on CPU); a copy of the 121 tokens lets it use one GEMM
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:].contiguous()
        logits = self.head(patches)  # (B, 121, m*m)
        return self.map_layout(logits), prefix, patches  # (B, 1, 44, 44), (B, P, D), (B, 121, D)

    @staticmethod
    def map_on_grid(map_blocks: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """(B, 1, 44, 44) map blocks -> (B, rows * cols) map logits, one per patch of a (rows, cols) grid."""
        return F.interpolate(map_blocks, size=grid_size, mode='bilinear', align_corners=False).flatten(1)


@register_notrace_module  # a leaf under FX, so its forward hooks still run in a traced model
class TopKSelect(nn.Module):
    """Picks the k best-scored patches, best first.

    A module of its own so a forward hook can read the map (input) and the indices (output), or
    replace the indices by returning a (B, k') long tensor of flat patch ids.

    `k` is the count on the model's own grid; with `k_ratio` set, every call keeps that fraction of
    the patches of its own grid (a model that takes images of many sizes).
    """

    def __init__(self, k: int, k_ratio: Optional[float] = None):
        super().__init__()
        self.k = k
        self.k_ratio = k_ratio

    def num_keep(self, num_patches: int) -> int:
        """How many of `num_patches` patches a call keeps."""
        return self.k if self.k_ratio is None else max(1, int(self.k_ratio * num_patches))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(self.num_keep(scores.shape[1]), dim=1, sorted=True).indices  # (B, k)

    def extra_repr(self) -> str:
        return f'k={self.k}' if self.k_ratio is None else f'k={self.k}, k_ratio={self.k_ratio}'


def _lookwhere_in(model: nn.Module, user: str) -> 'LookWhere':
    """The LookWhere a hook goes on: the model itself, a segmenter's backbone, or what timm's features_only wrapper
    holds."""
    for candidate in (model, getattr(model, 'backbone', None), getattr(model, 'model', None)):
        if isinstance(candidate, LookWhere):
            return candidate
    raise TypeError(f'{user} hooks the top-k of a LookWhere model (or of a LookWhere segmenter, or timm\'s '
                    f'features_only wrapper of one); got a {type(model).__name__}')


class _TopKHook:
    """A forward hook on a LookWhere's `topk` while a `with` block lasts. Hooks run in the order the blocks were
    entered, and one that returns ids replaces them for the hooks after it (a recorder entered last sees them)."""

    def __init__(self, model: nn.Module):
        self.model = _lookwhere_in(model, type(self).__name__)
        self._handle = None

    def _hook(self, module: nn.Module, args: Tuple[torch.Tensor], indices: torch.Tensor) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def __enter__(self):
        self._handle = self.model.topk.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


class SelectionRecorder(_TopKHook):
    """Records the selector map and the chosen indices of every forward, for visualisation.

        with SelectionRecorder(model) as rec:
            model(images)
        rec.records[-1]['map'], rec.records[-1]['indices']  # (B, N), (B, k); a record per image for a list
    """

    def __init__(self, model: 'LookWhere'):
        super().__init__(model)
        self.records: List[Dict[str, torch.Tensor]] = []

    def _hook(self, module, args, indices):
        self.records.append(dict(map=args[0].detach().cpu(), indices=indices.detach().cpu()))


class RandomSelection(_TopKHook):
    """As many random patches as the selector would choose, in place of its choice, while the `with` block lasts:
    the ablation that says what choosing is worth.

        with RandomSelection(model, seed=0):
            model(images)

    The patches come from a generator seeded with `seed` as the block starts: the same seed gives the same
    patches in every block, another seed others. Drawn on the CPU, so the device does not change them.
    """

    def __init__(self, model: 'LookWhere', seed: int = 0):
        super().__init__(model)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f'seed must be an int, got {seed!r}')
        if not -2 ** 63 <= seed < 2 ** 64:
            raise ValueError(f'seed must be in [-2**63, 2**64), what torch.Generator.manual_seed takes; got {seed}')
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None

    def __enter__(self) -> 'RandomSelection':
        self._generator = torch.Generator().manual_seed(self.seed)
        return super().__enter__()

    def _hook(self, module, args, indices):
        scores = torch.rand(args[0].shape, generator=self._generator)  # (B, N)
        return scores.topk(indices.shape[1], dim=1).indices.to(indices.device)  # (B, k)


class PreferredSelection(_TopKHook):
    """Chooses given patches first, then the rest in the selector's own order, while the `with` block lasts. With
    the patches that hold the object preferred it is an oracle: what the extractor could do with a perfect selector.

        with PreferredSelection(model, under_object):  # (n, N) bool, or n collections of flat patch ids
            model(images)

    `preferred` names the patches of each image, in the order the images will come through the model (one entry
    per image, across forwards, from the first image of the block on): an (n, N) bool tensor for images on one
    grid, or a sequence of n collections of flat patch ids (row-major on each image's own grid), which also
    serves lists of images of many sizes. The k chosen are the preferred patches, best scored first, then the
    others, best scored first; where more are preferred than k, the best scored of them.
    """

    def __init__(self, model: 'LookWhere', preferred: Union[torch.Tensor, Sequence[Any]]):
        super().__init__(model)
        if isinstance(preferred, np.ndarray) and preferred.dtype == np.bool_:
            preferred = torch.from_numpy(preferred)
        if isinstance(preferred, torch.Tensor) and (preferred.dim() != 2 or preferred.dtype != torch.bool):
            raise ValueError(f'preferred patches must be an (n, N) bool tensor or n collections of patch ids, got a '
                             f'{preferred.dtype} tensor of shape {list(preferred.shape)}')
        if isinstance(preferred, (str, bytes, Mapping)) or not isinstance(preferred, (torch.Tensor, Iterable)):
            raise TypeError(f'preferred patches must be an (n, N) bool tensor or a sequence of n collections of patch '
                            f'ids, one per image in order; got a {type(preferred).__name__}')
        self.preferred = preferred if isinstance(preferred, (torch.Tensor, Sequence)) else list(preferred)
        self._next = 0  # the image the next top-k row belongs to

    def __enter__(self) -> 'PreferredSelection':
        self._next = 0
        return super().__enter__()

    def _rows(self, batch_size: int, num_patches: int) -> torch.Tensor:
        """(B, N) bool: the preferred patches of the next `batch_size` images."""
        first, self._next = self._next, self._next + batch_size
        if self._next > len(self.preferred):
            raise ValueError(f'PreferredSelection names the patches of {len(self.preferred)} images, and image '
                             f'{self._next} has come: give an entry for every image the model sees in the block')
        if isinstance(self.preferred, torch.Tensor):
            if self.preferred.shape[1] != num_patches:
                raise ValueError(f'preferred patches are ({len(self.preferred)}, {self.preferred.shape[1]}) but the '
                                 f'image has {num_patches} patches: give ids per image for images of many sizes')
            return self.preferred[first:self._next]
        rows = torch.zeros(batch_size, num_patches, dtype=torch.bool)
        for row, ids in enumerate(self.preferred[first:self._next]):
            ids = self._image_ids(ids, first + row, num_patches)
            if ids.numel() and (ids.min() < 0 or ids.max() >= num_patches):
                raise ValueError(f'preferred patch ids of image {first + row} lie outside [0, {num_patches}), the '
                                 f'patches of its grid: {ids[(ids < 0) | (ids >= num_patches)][:8].tolist()}')
            rows[row, ids] = True
        return rows

    @staticmethod
    def _image_ids(ids: Any, image: int, num_patches: int) -> torch.Tensor:
        """One image's entry -> its preferred patch ids: a collection of integer ids, or an (N,) bool mask."""
        try:
            ids = torch.as_tensor(list(ids) if isinstance(ids, (set, frozenset)) else ids)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f'preferred patches of image {image}: expected a collection of patch ids or an (N,) '
                            f'bool mask, got {type(ids).__name__}') from None
        if ids.dtype == torch.bool:  # a mask of the image's patches
            if ids.dim() != 1 or len(ids) != num_patches:
                raise ValueError(f'preferred patches of image {image}: a bool mask of shape {list(ids.shape)} for '
                                 f'its {num_patches} patches; give ({num_patches},)')
            return ids.nonzero()[:, 0]
        if ids.numel() and (ids.is_floating_point() or ids.is_complex()):
            raise TypeError(f'preferred patches of image {image}: patch ids are whole numbers, got {ids.dtype} '
                            f'values {ids.flatten()[:4].tolist()}')
        return ids.long().flatten()

    def _hook(self, module, args, indices):
        scores = args[0]  # (B, N)
        preferred = self._rows(*scores.shape).to(scores.device)  # (B, N)
        order = scores.argsort(dim=1, descending=True, stable=True)  # (B, N) the selector's own order
        # a stable sort on "preferred" keeps the selector's order within the preferred patches and within the rest
        first = preferred.gather(1, order).to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        return order.gather(1, first)[:, :indices.shape[1]]  # (B, k)


class LookWhere(nn.Module):
    """LookWhere: selector + top-k + sparse extractor, with timm's VisionTransformer API.

    The extractor's modules sit at the top level with timm ViT names (`patch_embed`, `pos_embed`,
    `blocks`, `norm`, `head`), so layer decay, features and checkpoints treat it like a ViT. It has
    no class/register tokens of its own: the selector's output prefix tokens take their place.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 518,
            patch_size: int = 14,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            init_values: Optional[float] = 1e-5,
            reg_tokens: int = 4,
            mlp_layer: Type[nn.Module] = Mlp,
            act_layer: Optional[Type[nn.Module]] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            selector_img_size: int = 154,
            selector_depth: int = 3,
            selector_antialias: Optional[bool] = None,
            map_grid: int = 37,
            k: Optional[int] = None,
            k_ratio: Optional[float] = None,
            freeze_selector: bool = True,
            num_neighbors: int = 5,
            patchify_channels_last: bool = True,
            weight_init: str = '',
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: high-res input size, int or (H, W); each side a multiple of patch_size. With
                dynamic_img_size, the size the position embeddings are stored at (the weights' own).
            reg_tokens: register tokens of the selector (they become the extractor's prefix too).
            dynamic_img_size: take every image at its own size, each side a multiple of patch_size
                (timm's ViT argument): the position embeddings of the chosen patches are interpolated
                from the stored grid, the selector's map is resized to the image's grid.
            dynamic_img_pad: with dynamic_img_size, take any sides: pad right and bottom to whole
                patches, as timm's ViT does.
            selector_img_size: side of the low-res copy the selector sees.
            selector_depth: blocks in the selector ViT.
            selector_antialias: how that copy is made; None (default): the authors' bilinear resize
                up to their 3.4x downscale, antialiased beyond (see LookWhereSelector).
            map_grid: high-res grid side the selector head was trained for (518 / 14).
            k: patches the extractor sees; or
            k_ratio: that number as a fraction of the high-res patches (default 0.1); with
                dynamic_img_size, of each image's own patches.
            freeze_selector: keep the selector fixed (the authors' fine-tuning). When False its ViT
                trains through the prefix tokens; its map head still gets no gradient from a task
                loss (top-k is not differentiable) and stays frozen unless set otherwise, see
                `set_selector_trainable`.
            num_neighbors: chosen patches mixed into each cell by `forward_dense`.
            patchify_channels_last: the layout of a NaFlex batch's flat patches, as timm's NaFlexViT takes it:
                (p, p, C) (timm's loader default) or (C, p, p) (`--naflex-patchify-channels-first`).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_architecture(
            dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                 selector_depth=selector_depth, map_grid=map_grid, num_neighbors=num_neighbors),
            dict(num_classes=num_classes, reg_tokens=reg_tokens),
            dict(drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
                 drop_path_rate=drop_path_rate),
        )
        if mlp_ratio <= 0:
            raise ValueError(f'mlp_ratio must be positive, got {mlp_ratio}')
        _check_global_pool(global_pool)
        img_size = to_2tuple(img_size)
        _check_img_size(img_size, patch_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_neighbors = num_neighbors
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.patchify_channels_last = patchify_channels_last
        self.grad_checkpointing = False

        self.selector = LookWhereSelector(
            img_size=selector_img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=selector_depth, num_heads=num_heads, mlp_ratio=mlp_ratio, reg_tokens=reg_tokens,
            init_values=init_values, mlp_layer=mlp_layer, act_layer=act_layer, map_grid=map_grid,
            antialias=selector_antialias, **dd,
        )
        self.num_prefix_tokens = self.selector.num_prefix_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = True

        self.patch_embed = SparsePatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad, **dd)
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches, embed_dim, **dd))
        self.topk = TopKSelect(1)
        if k is None and k_ratio is None:
            k_ratio = DEFAULT_K_RATIO
        self.set_k(k=k, k_ratio=k_ratio)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                init_values=init_values, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                mlp_layer=mlp_layer, act_layer=act_layer or nn.GELU, depth=i, **dd,
            )
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        # how uint8 pixels are normalised (the pretrained cfg's mean and std, set by the model factory): buffers,
        # so they travel with the model to its device; not in the state dict
        self.register_buffer('pixel_mean', torch.empty(in_chans, device=device, dtype=torch.float32), persistent=False)
        self.register_buffer('pixel_std', torch.empty(in_chans, device=device, dtype=torch.float32), persistent=False)
        self.set_pixel_normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

        if weight_init != 'skip':
            self.init_weights()
        self.set_selector_trainable(not freeze_selector)

    # ----------------------------------------------------------------------------------------
    # set-up

    @property
    def grid_size(self) -> Tuple[int, int]:
        """The (rows, cols) patch grid of the model's own image size, the grid `pos_embed` is stored at."""
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=.02)
        for module in (self.patch_embed, self.blocks, self.head, self.selector.head):
            named_apply(init_weights_vit_timm, module)

    def set_pixel_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The mean and std (per channel, of pixels scaled to [0, 1]) that uint8 input is normalised with; the
        model factory sets its pretrained cfg's. One value (or another count than the channels: their average)
        serves every channel."""
        values = dict(mean=per_channel(mean, self.in_chans), std=per_channel(std, self.in_chans))
        if any(v <= 0 for v in values['std']):
            raise ValueError(f"pixel std must be positive, got {values['std']}")
        with torch.no_grad():
            self.pixel_mean.copy_(torch.tensor(values['mean']))
            self.pixel_std.copy_(torch.tensor(values['std']))

    def set_k(self, k: Optional[int] = None, k_ratio: Optional[float] = None) -> None:
        """Set how many high-res patches the extractor sees: a count `k` or a fraction `k_ratio`.

        Any integral number (int, numpy or 0-d torch integer) is a count; a fraction follows each
        image's own grid when the model takes dynamic sizes.
        """
        if (k is None) == (k_ratio is None):
            raise ValueError(f'give exactly one of k or k_ratio, got k={k!r}, k_ratio={k_ratio!r}')
        if k is not None:
            k = _as_count(k)
            _check_k_fits(k, self.grid_size, self.patch_embed.patch_size[0])
        else:
            if isinstance(k_ratio, (bool, torch.Tensor)) or not isinstance(k_ratio, numbers.Real):
                raise TypeError(f'k_ratio must be a float, got {type(k_ratio).__name__}')
            k_ratio = float(k_ratio)
            if not 0 < k_ratio <= 1:
                raise ValueError(f'k_ratio must be in (0, 1], got {k_ratio}')
        self.k_ratio = k_ratio
        self.topk.k = k if k is not None else max(1, int(k_ratio * self.num_patches))
        self.topk.k_ratio = k_ratio if self.dynamic_img_size else None  # a fixed grid keeps a fixed count

    @property
    def k(self) -> int:
        """Patches the extractor sees in an image of the model's own size."""
        return self.topk.k

    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """Change the model's own image size, as timm's ViT does: the stored position embeddings
        are resized to the new grid (bicubic, no antialiasing, as at load) and k follows k_ratio.

        The selector keeps its low-res input; the patch size is fixed by the selector's map head.
        """
        if patch_size is not None and to_2tuple(patch_size) != tuple(self.patch_embed.patch_size):
            raise ValueError(
                f'the patch size of a LookWhere is fixed ({self.patch_embed.patch_size[0]}): its selector head '
                f'scores patches of that size; got patch_size={patch_size}')
        if img_size is None:
            return
        img_size = to_2tuple(img_size)
        patch = self.patch_embed.patch_size[0]
        _check_img_size(img_size, patch)
        if self.k_ratio is None:
            _check_k_fits(self.k, (img_size[0] // patch, img_size[1] // patch), patch, 'set_k first')
        old_grid = self.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        if self.grid_size != old_grid:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed.detach(), new_size=self.grid_size, old_size=old_grid, num_prefix_tokens=0,
                interpolation='bicubic', antialias=False), requires_grad=self.pos_embed.requires_grad)
        self.set_k(k=None if self.k_ratio is not None else self.k, k_ratio=self.k_ratio)
        if update_model_input_size is not None:
            update_model_input_size(self, img_size)

    def set_selector_trainable(self, trainable: bool = True, head: bool = False) -> None:
        """Train (or freeze) the selector ViT; `head=True` also trains its map head, which only a
        loss on the map itself (e.g. distillation) can teach."""
        self.selector.requires_grad_(False)
        self.selector.backbone.requires_grad_(trainable)
        self.selector.head.requires_grad_(trainable and head)
        self.selector.train(self.training and trainable)

    @property
    def selector_trainable(self) -> bool:
        return any(p.requires_grad for p in self.selector.parameters())

    def train(self, mode: bool = True) -> 'LookWhere':
        super().train(mode)
        self.selector.train(mode and self.selector_trainable)  # a frozen selector stays in eval
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'selector.backbone.pos_embed', 'selector.backbone.cls_token',
                'selector.backbone.reg_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^pos_embed|patch_embed|selector',  # embeddings and the (usually frozen) selector
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        # the new head follows the model's device, dtype and train/eval mode
        self.head = nn.Linear(self.embed_dim, num_classes, device=self.pos_embed.device,
                              dtype=self.pos_embed.dtype) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    # ----------------------------------------------------------------------------------------
    # forward: one embedding step for every input form, then the blocks, then the head

    def _image_on_grid(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Check a (B, C, H, W) batch; return it and its (rows, cols) patch grid. Normalised floats are padded
        to whole patches (with zeros, when asked); uint8 pixels stay as they are: only what the model reads of
        them is normalised and padded (the low-res copy, the k patches)."""
        patch = self.patch_embed.patch_size[0]
        pad = self.dynamic_img_size and self.dynamic_img_pad
        only_size = None if self.dynamic_img_size else self.patch_embed.img_size
        x = check_image_batch(x, self.in_chans, patch, only_size, pad, self.pos_embed.dtype)
        if not self.dynamic_img_size:
            return x, self.grid_size  # static, also where tracing hides the input's shape
        rows, cols = -(-x.shape[-2] // patch), -(-x.shape[-1] // patch)
        if pad and x.is_floating_point():
            x = F.pad(x, (0, cols * patch - x.shape[-1], 0, rows * patch - x.shape[-2]))  # right and bottom, as timm
        return x, (rows, cols)

    def _check_k_fits(self, grid_size: Tuple[int, int]) -> None:
        _check_k_fits(self.topk.num_keep(grid_size[0] * grid_size[1]), grid_size, self.patch_embed.patch_size[0],
                      'set a smaller k, or a k_ratio that follows the image size')

    def _top_k(self, map_logits: torch.Tensor) -> torch.Tensor:
        """(B, N) map logits -> (B, k) chosen ids, best first; a hook on `topk` may have replaced them."""
        indices = self.topk(map_logits)
        return check_selection(indices, map_logits.shape[0], map_logits.shape[1], len(self.topk._forward_hooks) > 0)

    def _select(self, x: Images) -> Dict[str, Any]:
        """The selector's step, for every input form: the `map` logits over each image's high-res patches, the
        chosen `indices` (best first), the `grid_size` they refer to, the selector's `prefix` tokens (B, P, D) and
        patch tokens (`selector_tokens`, (B, h * w, D)), and the `images` the extractor cuts from.

        A (B, C, H, W) batch gives (B, N), (B, k), one (rows, cols) and the checked batch. A list or a NaFlex
        dict (`many`) gives lists with an entry per image: (1, N_i), (1, k_i), (rows_i, cols_i), (1, C, H_i, W_i)
        images, and for NaFlex the `cells` already cut; its low-res copies go through the selector as one batch,
        and the top-k module runs once per image (a hook sees each image on its own grid).
        """
        many = is_many(x)
        if isinstance(x, dict) and not self.dynamic_img_size:
            raise ValueError('a NaFlex batch holds images of many sizes: create the model with dynamic_img_size=True '
                             '(train.py / validate.py: --model-kwargs dynamic_img_size=True)')
        if many:
            read = read_many(x, self._image_on_grid, self.patch_embed.patch_size[0], self.in_chans,
                             self.patchify_channels_last, self.pixel_mean, self.pixel_std, self.pos_embed.dtype)
            images, grids, cells = read.images, read.grids, read.cells
        else:
            x, grid = self._image_on_grid(x)
            images, grids, cells = [x], [grid], None
        for grid in grids:
            self._check_k_fits(grid)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.selector_trainable):
            low_res = torch.cat([self.selector.low_res_copy(image, grid, self.pixel_mean, self.pixel_std)
                                 for image, grid in zip(images, grids)])  # (B, C, 154, 154)
            map_blocks, prefix, selector_tokens = self.selector(low_res)  # (B, 1, 44, 44), (B, P, D), (B, 121, D)
            if not many:
                map_logits = self.selector.map_on_grid(map_blocks, grids[0])  # (B, N)
                return dict(many=False, map=map_logits, indices=self._top_k(map_logits), grid_size=grids[0],
                            prefix=prefix, selector_tokens=selector_tokens, images=x, cells=None)
            maps = [self.selector.map_on_grid(map_blocks[i:i + 1], grid) for i, grid in enumerate(grids)]  # (1, N_i)
        return dict(many=True, map=maps, indices=[self._top_k(m) for m in maps], grid_size=grids, prefix=prefix,
                    selector_tokens=selector_tokens, images=images, cells=cells)

    def embed_patches(
            self,
            images: torch.Tensor,
            indices: torch.Tensor,
            grid_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """(B, C, H, W) images, (B, k) chosen ids of their (rows, cols) grid (default: the model's own) -> (B, k, D)
        tokens: only those patches are cut, embedded and given their position embeddings (`SparsePatchEmbed`)."""
        grid_size = self.grid_size if grid_size is None else grid_size
        return self.patch_embed(images, indices, grid_size, self.pos_embed, self.pixel_mean, self.pixel_std)

    def _forward_embeds(self, x: Images) -> Dict[str, Any]:
        """The embedding step, timm's `_forward_embeds`: any input form -> `_select`'s output plus the extractor's
        input `tokens` (B, P + k, D), the selector's prefix tokens then the chosen patches' tokens, and
        `patch_valid` ((B, k) bool: True for a real patch token; None when nothing is padded). Images of many
        sizes with k_ratio have their own k_i each: their tokens are padded to the longest."""
        out = self._select(x)
        if not out['many']:
            patches, patch_valid = self.embed_patches(out['images'], out['indices'], out['grid_size']), None
        else:
            patches, patch_valid = pad_tokens([  # (1, k_i, D) each, padded to (B, k_max, D)
                self.patch_embed.embed_pixels(cells[ids[0]][None], ids, grid, self.pos_embed) if cells is not None
                else self.embed_patches(image, ids, grid)
                for image, cells, ids, grid in zip(
                    out['images'], out['cells'] or [None] * len(out['images']), out['indices'], out['grid_size'])])
        out.update(tokens=torch.cat([out.pop('prefix'), patches], dim=1), patch_valid=patch_valid)
        return out

    def _forward_blocks(
            self,
            tokens: torch.Tensor,
            patch_valid: Optional[torch.Tensor] = None,
            take_indices: Sequence[int] = (),
            last_block: Optional[int] = None,
            norm: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The extractor's blocks (up to `last_block`, default all) on (B, P + k, D) tokens: the final tokens
        (not normed) and the outputs of the blocks in `take_indices` (normed if asked).

        With `patch_valid`, images of similar k run together, each group padded only to its own longest and the
        padding masked: one 4K frame among thumbnails would otherwise make every image pay for its k.
        """
        blocks = self.blocks if last_block is None else self.blocks[:last_block + 1]
        if patch_valid is None:
            return self._run_blocks(tokens, None, blocks, take_indices, norm)
        out = torch.zeros_like(tokens)
        taken = [torch.zeros_like(tokens) for _ in take_indices]
        for images, k in similar_k_groups(patch_valid.sum(1).tolist()):
            rows = torch.tensor(images, device=tokens.device)
            length = self.num_prefix_tokens + k
            mask = attention_mask(patch_valid[rows, :k], self.num_prefix_tokens, tokens.dtype)
            final, group_taken = self._run_blocks(tokens[rows, :length], mask, blocks, take_indices, norm)
            out[rows, :length] = final
            for whole, part in zip(taken, group_taken):
                whole[rows, :length] = part
        return out, taken

    def _run_blocks(
            self,
            tokens: torch.Tensor,
            mask: Optional[torch.Tensor],
            blocks: nn.Sequential,
            take_indices: Sequence[int],
            norm: bool,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        if not take_indices and mask is None:
            return checkpoint_seq(blocks, tokens) if checkpointing else blocks(tokens), []
        taken = []
        for i, block in enumerate(blocks):
            if checkpointing:
                tokens = checkpoint(block, tokens) if mask is None else checkpoint(block, tokens, mask)
            else:
                tokens = block(tokens) if mask is None else block(tokens, attn_mask=mask)  # (B, P + k, D)
            if i in take_indices:
                taken.append(self.norm(tokens) if norm else tokens)
        return tokens, taken

    def _final_norm(self, tokens: torch.Tensor, patch_valid: Optional[torch.Tensor]) -> torch.Tensor:
        """The final norm, the padding zeroed."""
        return zero_padding(self.norm(tokens), patch_valid, self.num_prefix_tokens)

    def _features(self, out: Dict[str, Any]) -> Features:
        """What `forward_features` gives for an input form: (B, P + k, D) tokens for a batch; for many images,
        NaFlexViT's form, {'patches': (B, P + k_max, D), 'patch_valid': (B, k_max) or None}."""
        return dict(patches=out['tokens'], patch_valid=out['patch_valid']) if out['many'] else out['tokens']

    def forward_all(self, x: Images) -> Dict[str, Any]:
        """Everything one forward computes: `map` (B, N) logits, `indices` (B, k), `tokens` (B, P + k, D),
        `grid_size`, the image's (rows, cols) patch grid the map and the ids refer to, and `selector_tokens`
        (B, h * w, D), the selector's patch tokens on its low-res grid (`selector.grid_size`).

        For many images (a list, or a NaFlex dict): `map`, `indices` and `grid_size` are lists, one entry per
        image ((N_i,), (k_i,), (rows_i, cols_i)); `tokens` is (B, P + k_max, D) and `patch_valid` (B, k_max)
        says which of its patch tokens are real (None when every image has k: no padding), padding zeroed.
        """
        out = self._forward_embeds(x)
        tokens, _ = self._forward_blocks(out['tokens'], out['patch_valid'])
        result = dict(map=out['map'], indices=out['indices'], tokens=self._final_norm(tokens, out['patch_valid']),
                      grid_size=out['grid_size'], selector_tokens=out['selector_tokens'])
        if out['many']:
            result.update(map=[m[0] for m in out['map']], indices=[ids[0] for ids in out['indices']],
                          patch_valid=out['patch_valid'])
        return result

    def forward_features(self, x: Images) -> Features:
        """(B, C, H, W) -> (B, P + k, D): the selector's prefix tokens then the k patch tokens. For many images,
        NaFlexViT's form: {'patches': (B, P + k_max, D), padding zeroed, 'patch_valid': (B, k_max) or None};
        `forward_head` takes either, so `forward_head(forward_features(x))` is `forward(x)`."""
        out = self._forward_embeds(x)
        tokens, _ = self._forward_blocks(out['tokens'], out['patch_valid'])
        return self._features(dict(out, tokens=self._final_norm(tokens, out['patch_valid'])))

    def forward_selection(self, x: Images) -> Dict[str, Any]:
        """Selector only: `map` (B, N) logits over the high-res patches, `indices` (B, k) chosen, `grid_size`.
        For many images, each a list with one entry per image."""
        out = self._select(x)
        if out['many']:
            return dict(map=[m[0] for m in out['map']], indices=[ids[0] for ids in out['indices']],
                        grid_size=out['grid_size'])
        return dict(map=out['map'], indices=out['indices'], grid_size=out['grid_size'])

    def dense_from_tokens(
            self,
            tokens: torch.Tensor,
            indices: torch.Tensor,
            grid_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """(B, P + k, D) tokens, (B, k) ids -> (B, D, rows, cols), every cell of the grid (default: the
        model's own) filled from the k."""
        rows, cols = self.grid_size if grid_size is None else grid_size
        filled = idw_fill(tokens[:, self.num_prefix_tokens:], indices, (rows, cols), self.num_neighbors)  # (B, N, D)
        return filled.view(filled.shape[0], rows, cols, filled.shape[2]).permute(0, 3, 1, 2)  # (B, D, rows, cols)

    def _dense(self, out: Dict[str, Any], tokens: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Tokens of `_forward_embeds`' selection -> (B, C, rows, cols) filled maps; for many images a list of
        (C, rows_i, cols_i), each filled from its own k_i tokens (C: the tokens' channels)."""
        if not out['many']:
            return self.dense_from_tokens(tokens, out['indices'], out['grid_size'])
        return [self.dense_from_tokens(tokens[i:i + 1, :self.num_prefix_tokens + ids.shape[1]], ids, grid)[0]
                for i, (ids, grid) in enumerate(zip(out['indices'], out['grid_size']))]

    def forward_dense(self, x: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """(B, C, H, W) -> (B, D, rows, cols) features for every high-res patch (rows = H / patch). For many
        images, a list of (D, rows_i, cols_i) maps."""
        out = self._forward_embeds(x)
        tokens, _ = self._forward_blocks(out['tokens'], out['patch_valid'])
        return self._dense(out, self._final_norm(tokens, out['patch_valid']))

    def _take_block_indices(self, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
        """timm's rule (None: every block, n: the last n, a list: those, negative from the end),
        with a ValueError where timm asserts."""
        try:
            return feature_take_indices(len(self.blocks), indices)
        except AssertionError as err:
            raise ValueError(f'block indices {indices!r} do not fit {len(self.blocks)} blocks: {err}') from None

    def forward_intermediates(
            self,
            x: Images,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
    ) -> Union[List[Any], Tuple[Features, List[Any]], Dict[str, Any]]:
        """Outputs of chosen extractor blocks, with timm VisionTransformer's signature and return forms.

        A block sees only the k chosen patches; each intermediate covers the whole high-res grid,
        filled from that block's k tokens as `forward_dense` does: (B, D, rows, cols) for 'NCHW',
        (B, rows * cols, D) for 'NLC'. The final features are `forward_features`' (so `forward_head`
        applies to them). For many images (a list, or a NaFlex dict), each intermediate is a list of
        per-image maps, (D, rows_i, cols_i) or (rows_i * cols_i, D).

        Args:
            x: (B, C, H, W) images, a list of (C, H_i, W_i) images, or a NaFlex dict.
            indices: blocks to take: None every one, an int n the last n, a list those (negative from the end).
            return_prefix_tokens: pair each intermediate with that block's (B, P, D) prefix tokens.
            norm: pass the intermediates through the final norm.
            stop_early: skip the blocks after the last one taken (the final features then come from it).
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: return the list of intermediates only.
            output_dict: return {'image_intermediates', 'image_intermediates_prefix' (with
                return_prefix_tokens), 'image_features' (unless intermediates_only)}.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = self._take_block_indices(indices)
        out = self._forward_embeds(x)
        tokens, taken = self._forward_blocks(out['tokens'], out['patch_valid'], take_indices,
                                             max_index if stop_early else None, norm)
        prefix_tokens = [t[:, :self.num_prefix_tokens] for t in taken]  # (B, P, D) each
        intermediates: List[Any] = []
        if taken:  # every block shares the selection: one neighbour search fills all of them, side by side
            filled = self._dense(out, torch.cat(taken, dim=-1))  # (B, n * D, rows, cols), or per image
            if out['many']:
                per_image = [y.split(self.embed_dim, dim=0) for y in filled]  # per image, per block: (D, rows, cols)
                intermediates = [[blocks[j] for blocks in per_image] for j in range(len(taken))]
                if output_fmt == 'NLC':
                    intermediates = [[y.flatten(1).transpose(0, 1) for y in block] for block in intermediates]
            else:
                intermediates = list(filled.split(self.embed_dim, dim=1))  # (B, D, rows, cols) each
                if output_fmt == 'NLC':
                    intermediates = [y.flatten(2).transpose(1, 2) for y in intermediates]  # (B, rows * cols, D)

        features = self._features(dict(out, tokens=self._final_norm(tokens, out['patch_valid'])))
        if output_dict:
            result: Dict[str, Any] = {'image_intermediates': intermediates}
            if return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = features
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return features, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last one `indices` names, and the final norm and the head if asked.

        Returns the absolute indices of the blocks to take (what `features_only=True` then asks for).
        """
        take_indices, max_index = self._take_block_indices(indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def pool(
            self,
            x: torch.Tensor,
            pool_type: Optional[str] = None,
            patch_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(B, P + k, D) -> (B, D): the cls token or the mean of the patch tokens (the real ones: `patch_valid`)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if patch_valid is None:  # timm's ViT pooling, which TorchScript compiles (NaFlexViT's does not)
            return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)
        return global_pool_naflex(x, patch_valid, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(
            self,
            x: Features,
            pre_logits: bool = False,
            patch_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`forward_features`' output -> (B, num_classes): (B, P + k, D) tokens (with `patch_valid` (B, k) where
        they are padded), or the {'patches', 'patch_valid'} it gives for many images; padding stays out of
        'avg' pooling, as in NaFlexViT's forward_head."""
        if isinstance(x, dict):
            x, patch_valid = x['patches'], x.get('patch_valid')
        x = self.head_drop(self.pool(x, patch_valid=patch_valid))
        return x if pre_logits else self.head(x)

    # x unannotated: FX copies the annotation into a traced model, whose TorchScript reads an unannotated x as a Tensor
    def forward(self, x) -> torch.Tensor:
        """(B, C, H, W) images (normalised floats, or uint8 pixels), a list of (C, H_i, W_i) images, or timm's
        NaFlex dict -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_patch_size(self) -> Tuple[int, int]:
        """The (h, w) patch size, for timm's NaFlex loader (train.py --naflex-loader asks for it)."""
        return tuple(self.patch_embed.patch_size)

    @property
    def embeds(self) -> SparsePatchEmbed:
        """The patch embedding under NaFlexViT's name: validate.py --naflex-loader reads `model.embeds.patch_size`
        (a property, so the state dict keeps one `patch_embed`)."""
        return self.patch_embed


# --------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: LookWhere,
        interpolation: str = 'bicubic',
        antialias: bool = False,
) -> Dict[str, torch.Tensor]:
    """Authors' nested checkpoint or this project's flat one -> this model's state dict.

    Position embeddings are resized to the model's grids (bicubic without antialias, as the authors do).
    """
    if is_authors_layout(state_dict):
        state_dict = convert_authors_checkpoint(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if k not in ('cls_token', 'reg_token')}
    for key, grid in (('pos_embed', model.grid_size), ('selector.backbone.pos_embed', model.selector.grid_size)):
        pos = state_dict.get(key)
        if isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape[1] != grid[0] * grid[1]:
            state_dict[key] = resample_abs_pos_embed(
                pos, new_size=grid, num_prefix_tokens=0, interpolation=interpolation, antialias=antialias)
    head_weight = state_dict.pop('head.weight', None)
    head_bias = state_dict.pop('head.bias', None)
    if not isinstance(model.head, nn.Identity):
        if head_weight is not None and head_weight.shape == model.head.weight.shape:
            state_dict.update({'head.weight': head_weight, 'head.bias': head_bias})
        else:  # a new task: keep the freshly initialised head
            _logger.info('Checkpoint has no classifier head of this shape: the head starts from its init.')
            state_dict.update({'head.weight': model.head.weight, 'head.bias': model.head.bias})
    check_state_dict_keys(state_dict, model, ignore_prefix='head.')
    return state_dict


def _create_lookwhere(variant: str, pretrained: bool = False, **kwargs) -> LookWhere:
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if pretrained:
        file = _check_weights_file(variant, kwargs.get('pretrained_cfg'), overlay)
        if overlay.get('file') and 'num_classes' not in overlay:
            # A local file describes its own head: keep a fine-tuned classifier (num_classes follows the file
            # unless the call asks for another) instead of letting the registry's num_classes (0 for the
            # authors' feature weights) discard it without a word.
            stored = stored_num_classes(file) or 0
            kwargs.setdefault('num_classes', stored)
            kwargs['pretrained_cfg_overlay'] = dict(overlay, num_classes=kwargs['num_classes'])
    _prefer_the_calls_k(kwargs)
    try:
        model = build_model_with_cfg(
            LookWhere,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'),
            **kwargs,
        )
    except LocalEntryNotFoundError as err:
        tag = kwargs.get('pretrained_cfg')
        cfg = get_pretrained_cfg(f'{variant}.{tag}' if isinstance(tag, str) else variant)
        raise RuntimeError(weights_unavailable_message(variant, cfg.hf_hub_id, cfg.hf_hub_filename)) from err
    lookwhere = model.model if hasattr(model, 'model') and isinstance(model.model, LookWhere) else model
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if isinstance(lookwhere, LookWhere) and 'mean' in cfg and 'std' in cfg:  # uint8 input: normalised as the cfg says
        lookwhere.set_pixel_normalization(cfg['mean'], cfg['std'])
    return model


def _prefer_the_calls_k(kwargs: Dict[str, Any]) -> None:
    """`create_model('local-dir:EXPORT', k=8)`: timm adds the export's saved k setting (k or k_ratio) to the call's
    arguments; the call's own setting, in either form, replaces the saved default."""
    saved = kwargs.get('pretrained_model_args') or {}
    if 'k' not in kwargs or 'k_ratio' not in kwargs:
        return
    from_saved = [key for key in ('k', 'k_ratio') if key in saved and saved[key] == kwargs[key]]
    if len(from_saved) == 1:
        del kwargs[from_saved[0]]


WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
# the command that trains (and with --ship, installs) the shipped sign models and their teachers
SIGNS_RECIPE = 'python -m timm_lookwhere.recipes.sparse_signs'


def _check_weights_file(variant: str, tag: Any, overlay: Dict[str, Any]) -> Optional[str]:
    """A local weights file that is missing or not a weights file: say which, and what to do (timm raises a
    bare error). Returns the file's path, None where the weights come from elsewhere (the Hub, a URL)."""
    if overlay.get('file'):
        if not os.path.exists(overlay['file']):
            raise FileNotFoundError(
                f"pretrained_cfg_overlay file {overlay['file']!r} does not exist (working directory "
                f"{os.getcwd()}); pass the path of a weights file: {WEIGHTS_FILE_KINDS}")
        read_weights_file(overlay['file'], mmap=True)
        return overlay['file']
    if overlay.get('url') or overlay.get('hf_hub_id'):
        return None
    cfg = get_pretrained_cfg(f'{variant}.{tag}' if isinstance(tag, str) else variant)
    if cfg is not None and cfg.file:
        if not os.path.isfile(cfg.file):
            raise FileNotFoundError(
                f'the weights of {variant}.{cfg.tag} are not installed: {cfg.file} is missing. Reinstall '
                f'timm-lookwhere, or train and ship them with {SIGNS_RECIPE} --ship')
        read_weights_file(cfg.file, mmap=True)
        return cfg.file
    return None


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 0,
        'input_size': (3, 518, 518),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': ('patch_embed.proj', 'selector.backbone.patch_embed.proj'),
        'classifier': 'head',
        'license': 'mit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'lookwhere_vitb_518.dinov2': _cfg(
        hf_hub_id='antofuller/lookwhere', hf_hub_filename='lookwhere_dinov2.pt',
        paper_ids='arXiv:2505.18051', notes=('Selector and extractor distilled from DINOv2 ViT-B/14 reg4.',),
    ),
    'lookwhere_vitb_franca_518.franca': _cfg(
        hf_hub_id='antofuller/lookwhere', hf_hub_filename='lookwhere_franca.pt',
        paper_ids='arXiv:2505.18051', notes=('Selector and extractor distilled from Franca ViT-B/14.',),
    ),
    # the same file at 224 px: what fits ImageNet-sized pipelines (and timm's own model tests, whose size limits
    # skip 518 px models); the authors trained and evaluated at 518 px only
    'lookwhere_vitb_224.dinov2': _cfg(
        hf_hub_id='antofuller/lookwhere', hf_hub_filename='lookwhere_dinov2.pt', input_size=(3, 224, 224),
        paper_ids='arXiv:2505.18051', notes=(
            "The authors' 518 px DINOv2 weights run at 224 px: extractor position embeddings resized (bicubic) on "
            'load, the selector unchanged. Not a size the authors evaluated.',),
    ),
    'lookwhere_vits_518': _cfg(notes=('No published weights: pre-train it with timm_lookwhere.distill.',)),
    # trained by the sparse-signs recipe (SIGNS_RECIPE) and shipped inside the package: loads offline
    'lookwhere_vitt16_256.sparse_signs': _cfg(
        file=os.path.join(WEIGHTS_DIR, 'lookwhere_vitt16_256_sparse_signs.safetensors'),
        num_classes=14, input_size=(3, 256, 256), interpolation='bilinear',
        notes=('Sparse traffic signs (timm_lookwhere.scenes): teacher trained, distilled, fine-tuned with the '
               f'selector frozen, all by `{SIGNS_RECIPE} --config 256`.',),
    ),
    'lookwhere_vitt16_512.sparse_signs': _cfg(
        file=os.path.join(WEIGHTS_DIR, 'lookwhere_vitt16_512_sparse_signs.safetensors'),
        num_classes=14, input_size=(3, 512, 512), interpolation='bilinear',
        notes=('Sparse traffic signs in 512 px scenes, the sign 0.25-0.5% of the image (timm_lookwhere.scenes, '
               f'WIDE_AREA_RANGE): `{SIGNS_RECIPE} --config 512`.',),
    ),
})


@register_model
def lookwhere_vitb_518(pretrained: bool = False, **kwargs) -> LookWhere:
    """LookWhere ViT-B/14, 4 registers, distilled from DINOv2: 3-block selector at 154 px."""
    model_args = dict(
        patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=4,
        selector_img_size=154, selector_depth=3,
    )
    return _create_lookwhere('lookwhere_vitb_518', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookwhere_vitb_224(pretrained: bool = False, **kwargs) -> LookWhere:
    """lookwhere_vitb_518 at 224 px (16x16 patches, k = 25 by default): the authors' weights, resized on load."""
    model_args = dict(
        img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=4,
        selector_img_size=154, selector_depth=3,
    )
    return _create_lookwhere('lookwhere_vitb_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookwhere_vitb_franca_518(pretrained: bool = False, **kwargs) -> LookWhere:
    """LookWhere ViT-B/14 distilled from Franca: SwiGLU MLPs, no registers, 3-block selector at 154 px."""
    model_args = dict(
        patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=0,
        mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
        selector_img_size=154, selector_depth=3,
    )
    return _create_lookwhere('lookwhere_vitb_franca_518', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookwhere_vits_518(pretrained: bool = False, **kwargs) -> LookWhere:
    """LookWhere ViT-S/14, 4 registers: 6-block selector at 98 px (the authors' ViT-S pre-training config)."""
    model_args = dict(
        patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, reg_tokens=4,
        selector_img_size=98, selector_depth=6,
    )
    return _create_lookwhere('lookwhere_vits_518', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookwhere_vitt16_256(pretrained: bool = False, **kwargs) -> LookWhere:
    """LookWhere ViT-Tiny-class /16 at 256 px (128 wide, 6 blocks, no registers): 1-block selector at 128 px."""
    model_args = dict(
        img_size=256, patch_size=16, embed_dim=128, depth=6, num_heads=4, init_values=1e-5, reg_tokens=0,
        selector_img_size=128, selector_depth=1, map_grid=16,
    )
    return _create_lookwhere('lookwhere_vitt16_256', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookwhere_vitt16_512(pretrained: bool = False, **kwargs) -> LookWhere:
    """LookWhere ViT-Tiny-class /16 at 512 px (128 wide, 6 blocks, no registers): 1-block selector at 208 px."""
    model_args = dict(
        img_size=512, patch_size=16, embed_dim=128, depth=6, num_heads=4, init_values=1e-5, reg_tokens=0,
        selector_img_size=208, selector_depth=1, map_grid=32,
    )
    return _create_lookwhere('lookwhere_vitt16_512', pretrained=pretrained, **dict(model_args, **kwargs))
