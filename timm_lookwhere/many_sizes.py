"""Many images of their own sizes in one batch: a list of (C, H_i, W_i) images or timm's NaFlex dict read into
images on their own patch grids, and their k_i tokens each made one extractor batch with a validity mask.

`LookWhere._forward_embeds` reads every input form through here; the rest of the model only sees tokens and
`patch_valid` (True for a real patch token, as NaFlexViT's), from which `attention_mask` makes the blocks'
key-padding mask and timm's `global_pool_naflex` pools.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models.naflexvit import create_attention_mask

from .layers import image_from_cells, naflex_cells

__all__ = [
    'PADDING_SLACK', 'ManyImages', 'is_many', 'read_many', 'pad_tokens', 'similar_k_groups', 'attention_mask',
    'zero_padding',
]

# Images whose k differ by at most this factor share an extractor pass, padded to the longest of them.
PADDING_SLACK = 1.25

Grid = Tuple[int, int]


class ManyImages(NamedTuple):
    """Images of many sizes, each on its own patch grid."""
    images: List[torch.Tensor]  # (1, C, H_i, W_i) each: what the model cuts patches from and copies to low res
    grids: List[Grid]  # (rows_i, cols_i)
    cells: Optional[List[torch.Tensor]]  # a NaFlex batch's patches by grid cell, (rows_i * cols_i, C * p * p)


def is_many(x) -> bool:
    """Whether `x` is a many-sizes input: a list or tuple of images, or timm's NaFlex dict."""
    return isinstance(x, (list, tuple, dict))


def read_many(
        x: Union[Sequence[torch.Tensor], Dict[str, torch.Tensor]],
        on_grid: Callable[[torch.Tensor], Tuple[torch.Tensor, Grid]],
        patch_size: int,
        in_chans: int,
        channels_last: bool,
        pixel_mean: torch.Tensor,
        pixel_std: torch.Tensor,
        dtype: torch.dtype,
) -> ManyImages:
    """A list of (C, H_i, W_i) images (each checked by `on_grid`, the model's check of a batch of one) or timm's
    NaFlex dict (`patches`, `patch_coord`, `patch_valid`) -> `ManyImages`. An empty one is refused."""
    if isinstance(x, dict):
        missing = [key for key in ('patches', 'patch_coord', 'patch_valid') if key not in x]
        if missing:
            raise ValueError(f'a NaFlex batch is a dict with patches, patch_coord and patch_valid; it lacks {missing}')
        patches = x['patches']
        if not isinstance(patches, torch.Tensor) or len(patches) == 0:
            raise ValueError('the NaFlex batch holds no image: give at least one')
        if patches.is_floating_point() and patches.dtype != dtype and not torch.is_autocast_enabled(
                patches.device.type):
            raise TypeError(f'the NaFlex patches are {patches.dtype} but the model\'s weights are {dtype}: convert '
                            f'them (.to({dtype})) or the model, or run under torch.autocast')
        if not patches.is_floating_point() and patches.dtype != torch.uint8:
            raise TypeError(f'NaFlex patches must be uint8 pixels or normalised floats, got {patches.dtype}')
        by_cell = naflex_cells(patches, x['patch_coord'], x['patch_valid'], patch_size, in_chans, channels_last,
                               pixel_mean, pixel_std)
        cells = [c.to(dtype) if c.is_floating_point() and not torch.is_autocast_enabled(c.device.type) else c
                 for c, _ in by_cell]
        grids = [grid for _, grid in by_cell]
        images = [image_from_cells(c, grid, patch_size)[None] for c, grid in zip(cells, grids)]  # (1, C, H_i, W_i)
        return ManyImages(images, grids, cells)
    if len(x) == 0:
        raise ValueError('give a non-empty list of (C, H, W) images, or a (B, C, H, W) batch')
    images, grids = [], []
    for i, image in enumerate(x):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f'image {i} of the list: expected a (C, H, W) tensor, got {got}')
        try:
            picture, grid = on_grid(image[None])  # checked (and padded, if float) as a batch of one
        except (TypeError, ValueError) as err:
            raise type(err)(f'image {i} of the list: {err}') from None
        images.append(picture)
        grids.append(grid)
    return ManyImages(images, grids, None)


def pad_tokens(tokens: List[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(1, k_i, D) tokens of each image -> (B, k_max, D) padded with zeros and (B, k_max) `patch_valid`, True for
    a real token (None when every image has the same k: nothing is padded)."""
    counts = [t.shape[1] for t in tokens]
    k_max = max(counts)
    if min(counts) == k_max:
        return torch.cat(tokens), None
    padded = torch.cat([F.pad(t, (0, 0, 0, k_max - t.shape[1])) for t in tokens])
    device = padded.device
    return padded, torch.arange(k_max, device=device)[None] < torch.tensor(counts, device=device)[:, None]


def similar_k_groups(counts: List[int]) -> List[Tuple[List[int], int]]:
    """Image ids grouped by similar k (sorted, a group's longest at most PADDING_SLACK times its shortest):
    (ids, the group's longest k) each, so the padding a group runs is at most a quarter of its tokens."""
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    groups, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or counts[order[end]] > PADDING_SLACK * counts[order[start]]:
            groups.append((order[start:end], counts[order[end - 1]]))
            start = end
    return groups


def attention_mask(patch_valid: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, k) `patch_valid` -> the blocks' additive (B, 1, P + k, P + k) mask: every query attends to the prefix
    and the real patches only (a padding query too, so that no row is empty; its output is dropped).
    None where nothing is padded."""
    if bool(patch_valid.all()):
        return None
    return create_attention_mask(patch_valid, num_prefix_tokens=num_prefix_tokens, symmetric=False, dtype=dtype)


def zero_padding(tokens: torch.Tensor, patch_valid: Optional[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """(B, P + k_max, D) tokens with their padding zeroed (`patch_valid` None: nothing padded)."""
    if patch_valid is None:
        return tokens
    valid = F.pad(patch_valid, (num_prefix_tokens, 0), value=True)  # (B, P + k)
    return tokens * valid[..., None].to(tokens.dtype)
