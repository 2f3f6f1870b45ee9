"""The extractor's sparse patch embedding: only the chosen patches of an image are cut out and embedded, with
position embeddings sampled on the image's own grid, in O(k); the input checks it runs first go with it, and
what raw uint8 pixels need on the way: the selector's low-res copy and the cut patches normalised, the full
frame never.

`SparsePatchEmbed` is to LookWhere what timm's `NaFlexEmbeds` is to NaFlexViT: the embedding steps in one
module (hook it to read or change the extractor's patch tokens). It keeps timm's `PatchEmbed` names and
weights (`patch_embed.proj`, `patch_embed.norm`), so checkpoints, layer decay and timm's feature tools see a
ViT; the model keeps its `pos_embed` and hands it in.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, register_notrace_function, register_notrace_module

__all__ = [
    'SparsePatchEmbed', 'check_image_batch', 'normalize_pixels', 'low_res_copy', 'sample_abs_pos_embed', 'naflex_cells',
    'image_from_cells',
]


@torch.jit.ignore  # TorchScript has no is_autocast_enabled(device_type); a scripted graph calls back into Python
def _autocast_enabled(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


@register_notrace_function
def check_image_batch(
        x: torch.Tensor,
        in_chans: int,
        patch_size: int,
        img_size: Optional[Tuple[int, int]] = None,
        pad: bool = False,
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Raise a ValueError/TypeError that names what is wrong with an input batch, and the way out;
    return the batch.

    Registered as a no-trace function, FX keeps it as one call in the graph, and because the model
    goes on with what it returns, graph clean-up (e.g. torchvision's feature extractor) keeps it too:
    a traced model still checks its input at run time. Written in TorchScript's subset, so the
    traced graph also scripts.

    Args:
        img_size: the one (H, W) a fixed-size model takes; None for a model that takes every size.
        pad: sides need not be multiples of the patch size (the model pads them).
        dtype: the model's weights' dtype, which a float batch must have outside autocast (uint8 pixels are
            normalised into it).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'expected an image tensor (B, C, H, W), got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'expected an image batch (B, C, H, W), got shape {list(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} (shape {list(x.shape)})')
    if not x.is_floating_point() and x.dtype != torch.uint8:
        raise TypeError(
            f'expected uint8 pixels (0..255) or a float image batch normalised with the pretrained cfg\'s '
            f'mean/std, got {x.dtype}; convert {x.dtype} pixels to uint8 (x.to(torch.uint8) if they are 0..255, '
            f'else scale them), or transform images with timm.data.create_transform(**timm.data.'
            f'resolve_data_config(model=model))')
    if dtype is not None and x.is_floating_point() and x.dtype != dtype and not _autocast_enabled(x.device.type):
        raise TypeError(
            f'the batch is {x.dtype} but the model\'s weights are {dtype}: convert the batch (x.to({dtype})) or '
            f'the model (model.to({x.dtype})), or run under torch.autocast')
    height, width = x.shape[2], x.shape[3]
    if height < 1 or width < 1:
        raise ValueError(f'expected an image of at least 1x1 pixels, got {height}x{width}')
    if not pad and (height % patch_size != 0 or width % patch_size != 0):
        raise ValueError(
            f'image sides must be multiples of the patch size {patch_size}, got {height}x{width}; crop or '
            f'resize them, or create the model with dynamic_img_size=True, dynamic_img_pad=True to pad them')
    if img_size is not None and (height != img_size[0] or width != img_size[1]):
        raise ValueError(
            f'this model was built for {img_size[0]}x{img_size[1]} images, got {height}x{width}; create it '
            f'with img_size=({height}, {width}), or with dynamic_img_size=True to take every size')
    return x


def per_channel(values, channels: int) -> List[float]:
    """A pixel mean or std (one value, or one a channel) as `channels` values; another count than the channels
    (ImageNet's three for a one-channel model) serves as its average."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return values if len(values) == channels else [sum(values) / len(values)] * channels


@register_notrace_function
def normalize_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """uint8 pixels -> float32 (x / 255 - mean) / std per channel (`channel_dim`), the operations of torchvision's
    ToTensor + Normalize in their order: the same pixels give the float path's very numbers."""
    shape = [1] * pixels.dim()
    shape[channel_dim] = -1
    return (pixels.float().div(255) - mean.float().view(shape)) / std.float().view(shape)


def _linear_taps(out_len: int, in_len: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where F.interpolate(mode='bilinear', align_corners=False, antialias=False) reads the output cells of an
    axis resized from in_len to out_len: (out_len, 2) source ids and weights, as ATen computes them."""
    scale = (torch.tensor(in_len, dtype=torch.float32) / out_len).double()
    # in float64, rounded once to float32: ATen's fused multiply-add gives that rounding
    src = ((torch.arange(out_len, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).float().clamp(min=0)
    first = src.floor().clamp(max=in_len - 1)
    second = (first + 1).clamp(max=in_len - 1)
    far = src - first
    return torch.stack([first, second], dim=1).long(), torch.stack([1 - far, far], dim=1)


@register_notrace_function
def low_res_copy(
        x: torch.Tensor,
        size: Tuple[int, int],
        antialias: bool,
        padded_size: Tuple[int, int],
        mean: torch.Tensor,
        std: torch.Tensor,
        dtype: torch.dtype,
) -> torch.Tensor:
    """(B, C, H, W) images -> (B, C, *size) bilinear low-res copies, normalised (uint8 pixels: into `dtype`).

    A float batch is already normalised and on whole patches. uint8 pixels (H, W at most `padded_size`, the
    image's patch grid, the rest padding that normalises to zero, as the float path pads) are normalised on
    what the copy reads only:
      - without antialiasing (the authors' resize, up to their downscale) each output pixel reads 2x2 source
        pixels: those rows and columns are gathered, normalised and mixed with ATen's weights, which gives the
        float path's copy within float rounding;
      - with antialiasing every pixel counts: the copy is made in uint8 (rounded to whole pixel levels, at most
        one level off the float path's) and then normalised.
    """
    if x.is_floating_point():
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=antialias)
    height, width = x.shape[2], x.shape[3]
    if antialias:
        padding = height != padded_size[0] or width != padded_size[1]
        if padding or not x.is_contiguous(memory_format=torch.channels_last):
            # uint8 resizes 5-10x faster from (H, W, C) memory, the layout image decoders give (read_image's
            # (C, H, W) is a view of it): the copy, padded or not, is made in it
            framed = torch.empty((x.shape[0], x.shape[1], padded_size[0], padded_size[1]), dtype=x.dtype,
                                 device=x.device, memory_format=torch.channels_last)
            framed[:, :, :height, :width] = x
            if padding:  # the border strips only, with the pixel level nearest the mean
                fill = (mean.float() * 255).round().to(x.dtype).view(1, -1, 1, 1)
                framed[:, :, height:] = fill
                framed[:, :, :height, width:] = fill
            x = framed
        small = F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=True)
        return normalize_pixels(small, mean, std, 1).to(dtype)
    row_ids, row_weights = _linear_taps(size[0], padded_size[0], x.device)  # (h, 2) each
    col_ids, col_weights = _linear_taps(size[1], padded_size[1], x.device)  # (w, 2) each
    rows = normalize_pixels(x.index_select(2, row_ids.clamp(max=height - 1).flatten()), mean, std, 1)  # (B, C, 2h, W)
    rows = rows * (row_ids < height).flatten().to(rows.dtype)[:, None]  # padding rows normalise to zero
    rows = (rows.unflatten(2, (size[0], 2)) * row_weights[:, :, None]).sum(3)  # (B, C, h, W)
    cells = rows.index_select(3, col_ids.clamp(max=width - 1).flatten())  # (B, C, h, 2w)
    cells = cells * (col_ids < width).flatten().to(cells.dtype)
    return (cells.unflatten(3, (size[1], 2)) * col_weights).sum(4).to(dtype)  # (B, C, h, w)


def _cubic_taps(dst: torch.Tensor, in_len: int, out_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where F.interpolate(mode='bicubic', align_corners=False, antialias=False) reads output cells `dst`
    of an axis resized from in_len to out_len: (..., 4) source ids (clamped to the axis) and weights."""
    scale = torch.tensor(in_len, dtype=torch.float32) / out_len  # as ATen: float32 in / out
    src = (dst.float() + 0.5) * scale - 0.5
    first = src.floor().clamp(max=in_len - 1)
    t = (src - first).clamp(0, 1)[..., None]  # (..., 1)
    a = -0.75  # ATen's cubic convolution coefficient
    d = torch.cat([t + 1, t, 1 - t, 2 - t], dim=-1)  # distances to the 4 taps, (..., 4)
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    weights = torch.cat([far[..., :1], near[..., 1:3], far[..., 3:]], dim=-1)
    taps = (first.long()[..., None] + torch.arange(-1, 3, device=dst.device)).clamp(0, in_len - 1)
    return taps, weights


@register_notrace_function
def sample_abs_pos_embed(
        pos_embed: torch.Tensor,
        old_size: Tuple[int, int],
        new_size: Tuple[int, int],
        indices: torch.Tensor,
) -> torch.Tensor:
    """Position embeddings of chosen cells of a grid resized from `old_size` to `new_size`, in O(k).

    Equal (within float rounding) to `resample_abs_pos_embed(pos_embed, new_size, old_size,
    num_prefix_tokens=0, interpolation='bicubic', antialias=False)[0][indices]`, the authors' resize
    followed by a gather, without building the (rows * cols, D) grid: each chosen cell mixes its
    4x4 bicubic taps of the stored grid.

    Args:
        pos_embed: (1, old_rows * old_cols, D) stored embeddings.
        indices: (B, k) flat ids of cells of the new (rows, cols) grid.

    Returns:
        (B, k, D) in pos_embed's dtype.
    """
    rows, cols = new_size
    row_taps, row_weights = _cubic_taps(indices // cols, old_size[0], rows)  # (B, k, 4) each
    col_taps, col_weights = _cubic_taps(indices % cols, old_size[1], cols)
    taps = (row_taps[..., :, None] * old_size[1] + col_taps[..., None, :]).flatten(-2)  # (B, k, 16)
    weights = (row_weights[..., :, None] * col_weights[..., None, :]).flatten(-2)  # (B, k, 16)
    table = pos_embed[0].float()  # (old_rows * old_cols, D), interpolated in float32 as timm does
    sampled = F.embedding_bag(taps.flatten(0, 1), table, per_sample_weights=weights.flatten(0, 1), mode='sum')
    return sampled.view(indices.shape[0], indices.shape[1], table.shape[1]).to(pos_embed.dtype)  # (B, k, D)


@register_notrace_module  # a leaf under FX, as timm's NaFlexEmbeds: its forward hooks still run in a traced model
class SparsePatchEmbed(PatchEmbed):
    """timm's PatchEmbed, run on the chosen patches only: (B, C, H, W) image, (B, k) ids -> (B, k, D) tokens.

    The model checks and pads the image first (`check_image_batch`, in its own forward, where tracing keeps
    the check in the graph).

    Args:
        dynamic_img_size: the model takes every image at its own size (else only `img_size`).
        dynamic_img_pad: with dynamic_img_size, it takes any sides, padded right and bottom to whole patches.
    """

    def __init__(
            self,
            img_size: Tuple[int, int],
            patch_size: int,
            in_chans: int,
            embed_dim: int,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ):
        # strict_img_size is what timm reads to tell whether the input size is fixed
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            strict_img_size=not dynamic_img_size, dynamic_img_pad=dynamic_img_pad, device=device, dtype=dtype)

    def forward(
            self,
            x: torch.Tensor,
            indices: torch.Tensor,
            grid_size: Tuple[int, int],
            pos_embed: torch.Tensor,
            pixel_mean: Optional[torch.Tensor] = None,
            pixel_std: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(B, C, H, W) image of a (rows, cols) grid, (B, k) chosen ids, (1, N, D) position embeddings stored at
        `self.grid_size` -> (B, k, D) tokens of the chosen patches.

        A float image is normalised and on whole patches. uint8 pixels may stop short of the grid's last row and
        column (the rest is padding); only the k patches are normalised, with `pixel_mean` and `pixel_std`.
        """
        if x.dtype == torch.uint8:
            if pixel_mean is None or pixel_std is None:
                raise ValueError('uint8 pixels need the pixel_mean and pixel_std to normalise them with')
            pixels = self.cut_pixels(x, indices, grid_size, pixel_mean, pixel_std).to(pos_embed.dtype)
        else:
            pixels = self.cut(x, indices, grid_size)
        return self.embed_pixels(pixels, indices, grid_size, pos_embed)

    def cut(self, x: torch.Tensor, indices: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W) image, (B, k) ids of cells of its (rows, cols) grid -> (B, k, C * p * p) pixels of
        those patches, in the (C, p, p) order of the projection's weight."""
        B, C = x.shape[0], x.shape[1]
        k = indices.shape[1]
        (rows, cols), p = grid_size, self.patch_size[0]
        # Every run of p pixels of an image row is a row of a (B * C * H * cols, p) view, so one
        # index_select of C * p runs per patch cuts them out: 2x faster on CPU than advanced
        # indexing into the (B, C, rows, p, cols, p) grid, and the result is already (B * k, C * p * p).
        runs = x.contiguous().view(B * C * rows * p * cols, p)
        batch = torch.arange(B, device=x.device)[:, None]
        first = (batch * C * rows * p + (indices // cols) * p) * cols + indices % cols  # (B, k): channel 0, row 0
        channel_rows = torch.arange(C, device=x.device)[:, None] * rows * p + torch.arange(p, device=x.device)
        patches = runs.index_select(0, (first[..., None] + channel_rows.flatten() * cols).flatten())  # (B*k*C*p, p)
        return patches.view(B, k, C * p * p)

    def cut_pixels(
            self,
            x: torch.Tensor,
            indices: torch.Tensor,
            grid_size: Tuple[int, int],
            mean: torch.Tensor,
            std: torch.Tensor,
    ) -> torch.Tensor:
        """(B, C, H, W) uint8 pixels, (B, k) ids of cells of a (rows, cols) grid that may run past the image's
        sides -> (B, k, C * p * p) float32 pixels of those patches, normalised, zero where a patch runs past
        the image (the float path's padding); in the (C, p, p) order of the projection's weight."""
        B, C, height, width = x.shape
        cols, p = grid_size[1], self.patch_size[0]
        steps = torch.arange(p, device=x.device)
        ys = (indices // cols)[..., None] * p + steps  # (B, k, p) pixel rows of each patch
        xs = (indices % cols)[..., None] * p + steps  # (B, k, p) pixel columns
        inside = (ys < height)[:, :, None, :, None] & (xs < width)[:, :, None, None, :]  # (B, k, 1, p, p)
        # indexing by (image, channel, row, column) reads the k patches in whatever layout the pixels have (a
        # decoder's (H, W, C) memory viewed as (C, H, W) included), without copying the frame
        pixels = x[torch.arange(B, device=x.device)[:, None, None, None, None],
                   torch.arange(C, device=x.device)[None, None, :, None, None],
                   ys.clamp(max=height - 1)[:, :, None, :, None],
                   xs.clamp(max=width - 1)[:, :, None, None, :]]  # (B, k, C, p, p) uint8
        pixels = normalize_pixels(pixels, mean, std, 2) * inside.to(torch.float32)
        return pixels.flatten(2)  # (B, k, C * p * p)

    def embed_pixels(
            self,
            pixels: torch.Tensor,
            indices: torch.Tensor,
            grid_size: Tuple[int, int],
            pos_embed: torch.Tensor,
    ) -> torch.Tensor:
        """(B, k, C * p * p) pixels of patches already cut, at (B, k) cells of a (rows, cols) grid -> (B, k, D)
        tokens: the projection, the norm and the position embeddings of those cells."""
        rows, cols = grid_size
        tokens = F.linear(pixels, self.proj.weight.flatten(1), self.proj.bias)  # (B, k, D)
        tokens = self.norm(tokens)
        if (rows, cols) == self.grid_size:
            return tokens + pos_embed[0][indices]
        return tokens + sample_abs_pos_embed(pos_embed, self.grid_size, (rows, cols), indices)


def naflex_cells(
        patches: torch.Tensor,
        patch_coord: torch.Tensor,
        patch_valid: torch.Tensor,
        patch_size: int,
        in_chans: int,
        channels_last: bool = True,
        pixel_mean: Optional[torch.Tensor] = None,
        pixel_std: Optional[torch.Tensor] = None,
) -> List[Tuple[torch.Tensor, Tuple[int, int]]]:
    """timm's NaFlex batch -> for each image, its patches by grid cell, (rows * cols, C * p * p) in the
    projection's (C, p, p) order, and its (rows, cols) grid (from the largest coordinates of its valid patches).

    Each image's valid patches must tile its grid, each cell once, as timm's NaFlex collator gives them: a
    coordinate outside the grid or a cell given twice is refused (it would make another grid of the image).
    uint8 patches are raw pixels, normalised with `pixel_mean` and `pixel_std`.

    Args:
        patches: (B, N, p * p * C) as timm's NaFlexCollator pads them ((p, p, C) per patch, or (C, p, p) with
            channels_last=False), or unflattened (B, N, p, p, C) / (B, N, C, p, p).
        patch_coord: (B, N, 2) (row, col) of each patch.
        patch_valid: (B, N) False for the collator's padding.
    """
    B, N = patches.shape[0], patches.shape[1]
    p, C = patch_size, in_chans
    if patches.numel() != B * N * p * p * C or patch_coord.shape[:2] != (B, N) or patch_valid.shape != (B, N):
        raise ValueError(
            f'a NaFlex batch of {p}x{p} patches with {C} channels needs patches (B, N, {p * p * C}), patch_coord '
            f'(B, N, 2) and patch_valid (B, N); got {list(patches.shape)}, {list(patch_coord.shape)}, '
            f'{list(patch_valid.shape)}: was the loader made with this model\'s patch size (get_patch_size())?')
    if patch_coord.is_floating_point() or patch_coord.dtype == torch.bool:
        raise TypeError(f'NaFlex patch_coord must hold integer (row, col) cells, got {patch_coord.dtype}')
    pixels = patches.reshape(B, N, p, p, C).permute(0, 1, 4, 2, 3) if channels_last else patches.reshape(B, N, C, p, p)
    pixels = pixels.reshape(B, N, C * p * p)
    if pixels.dtype == torch.uint8:
        if pixel_mean is None or pixel_std is None:
            raise ValueError('uint8 NaFlex patches need the pixel_mean and pixel_std to normalise them with')
        pixels = normalize_pixels(pixels.view(B, N, C, p * p), pixel_mean, pixel_std, 2).flatten(2)
    out = []
    for b in range(B):
        valid = patch_valid[b].bool()
        if not valid.any():
            raise ValueError(f'image {b} of the NaFlex batch has no valid patch')
        coord = patch_coord[b][valid].long()  # (n, 2)
        if bool((coord < 0).any()):
            raise ValueError(f'image {b} of the NaFlex batch has negative patch coordinates '
                             f'{coord[(coord < 0).any(1)][:4].tolist()}; (row, col) cells count from 0')
        rows, cols = int(coord[:, 0].max()) + 1, int(coord[:, 1].max()) + 1
        cell_ids = coord[:, 0] * cols + coord[:, 1]
        if len(cell_ids) != rows * cols or torch.unique(cell_ids).numel() != rows * cols:
            given, unique = len(cell_ids), torch.unique(cell_ids).numel()
            raise ValueError(
                f'image {b} of the NaFlex batch: its {given} valid patches do not tile its {rows}x{cols} grid '
                f'(the grid its largest coordinates give) each cell once: {rows * cols - unique} cells missing, '
                f'{given - unique} given twice. A coordinate outside the image or a repeated one? timm\'s '
                f'NaFlex collator gives every cell of each image once.')
        cells = pixels.new_zeros(rows * cols, C * p * p)
        cells[cell_ids] = pixels[b][valid]
        out.append((cells, (rows, cols)))
    return out


def image_from_cells(cells: torch.Tensor, grid_size: Tuple[int, int], patch_size: int) -> torch.Tensor:
    """(rows * cols, C * p * p) patches by cell -> the (C, rows * p, cols * p) image they tile."""
    (rows, cols), p = grid_size, patch_size
    C = cells.shape[1] // (p * p)
    return cells.view(rows, cols, C, p, p).permute(2, 0, 3, 1, 4).reshape(C, rows * p, cols * p)
