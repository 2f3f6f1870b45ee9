"""Dense fill: every cell of the high-res grid from the k extracted patch tokens; the authors' inverse-distance
fill, and a learned one that adds what the selector saw (`SelectorInformedFill`).

Each cell takes the inverse-distance-weighted mean of its K nearest chosen patches (Euclidean
distance on grid coordinates, weight 1 / (d + eps)). Equidistant candidates are ranked by their
place in the selection, so the patch the selector scored higher wins the tie: this is the rule a
stable sort gives the authors' code, and it makes the output independent of sort implementations.

Cost (why it is written this way): the search is one integer top-k over a (B, N, k) key built by a
single broadcast add, because squared distances separate into a row and a column term; the fill is
one `embedding_bag` (a fused gather and weighted sum), which never materialises (B, N, K, C) or a
(B, N, C) temporary per neighbour.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['nearest_chosen', 'idw_fill', 'SelectorInformedFill']

# Largest (B, rows, cols, k) key block built at once: 2^24 int32 = 64 MiB, so 2072 px, batch 8
# searches in slices instead of allocating gigabytes.
_MAX_KEY_ELEMENTS = 1 << 24


def _key_dtype(grid_size: Tuple[int, int], num_keep: int) -> torch.dtype:
    rows, cols = grid_size
    return torch.int64 if (rows * rows + cols * cols + 1) * num_keep >= 2 ** 31 else torch.int32


def _nearest_in_rows(
        row_term: torch.Tensor,
        col_term: torch.Tensor,
        num_neighbors: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, r, k) row keys, (B, cols, k) column keys -> the K smallest keys of each of the r * cols cells."""
    key = row_term[:, :, None, :] + col_term[:, None, :, :]  # (B, r, cols, k)
    return key.flatten(1, 2).topk(num_neighbors, dim=2, largest=False, sorted=True)  # (B, r * cols, K) twice


def nearest_chosen(
        indices: torch.Tensor,
        grid_size: Tuple[int, int],
        num_neighbors: int = 5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `num_neighbors` chosen patches nearest to every grid cell.

    Args:
        indices: (B, k) flat cell ids of the chosen patches, in selection order (best first).
        grid_size: (rows, cols) of the high-res patch grid.
        num_neighbors: K; fewer when fewer than K patches were chosen.

    Returns:
        (B, N, K) positions into `indices` of the nearest chosen patches, and (B, N, K) their
        float32 Euclidean distances, N = rows * cols.
    """
    batch_size, num_keep = indices.shape
    rows, cols = grid_size
    num_neighbors = min(num_neighbors, num_keep)
    key_dtype = _key_dtype(grid_size, num_keep)
    # Squared distances are exact integers, so key = dist^2 * k + rank orders by distance, then by
    # selection rank, with no ties. It separates: (dr^2 * k + rank) + dc^2 * k.
    chosen_row = (indices // cols).to(key_dtype)
    chosen_col = (indices % cols).to(key_dtype)
    rank = torch.arange(num_keep, device=indices.device, dtype=key_dtype)
    row_ids = torch.arange(rows, device=indices.device, dtype=key_dtype)
    col_ids = torch.arange(cols, device=indices.device, dtype=key_dtype)
    row_term = (row_ids[None, :, None] - chosen_row[:, None, :]).square() * num_keep + rank  # (B, rows, k)
    col_term = (col_ids[None, :, None] - chosen_col[:, None, :]).square() * num_keep  # (B, cols, k)

    rows_per_slice = max(1, _MAX_KEY_ELEMENTS // max(1, batch_size * cols * num_keep))
    found = [
        _nearest_in_rows(row_term[:, start:start + rows_per_slice], col_term, num_neighbors)
        for start in range(0, rows, rows_per_slice)
    ]
    keys = torch.cat([f.values for f in found], dim=1) if len(found) > 1 else found[0].values
    nearest = torch.cat([f.indices for f in found], dim=1) if len(found) > 1 else found[0].indices
    dist = torch.div(keys, num_keep, rounding_mode='floor').float().sqrt()  # (B, N, K)
    return nearest, dist


def idw_fill(
        values: torch.Tensor,
        indices: torch.Tensor,
        grid_size: Tuple[int, int],
        num_neighbors: int = 5,
        eps: float = 1e-8,
) -> torch.Tensor:
    """Fill a (rows, cols) grid from values at chosen cells by inverse-distance weighting.

    Args:
        values: (B, k, C) features of the chosen patches.
        indices: (B, k) their flat cell ids, in selection order (ties go to the earlier one).
        grid_size: (rows, cols).
        num_neighbors: how many nearest chosen patches each cell mixes (the authors use 5).
        eps: added to distances; a chosen cell keeps its own value (weight 1/eps dominates).

    Returns:
        (B, rows * cols, C) filled features.
    """
    if values.ndim != 3 or indices.shape != values.shape[:2]:
        raise ValueError(
            f'values must be (B, k, C) and indices (B, k); got {tuple(values.shape)} and {tuple(indices.shape)}')
    batch_size, num_keep, channels = values.shape
    nearest, dist = nearest_chosen(indices, grid_size, num_neighbors)  # (B, N, K) each
    # clamp, not + eps: the same fp32 values (d >= 1 absorbs eps), and the ONNX exporter keeps a clamp
    # where it folded "+ eps" away, leaving 1 / 0 = inf on the chosen cells
    weights = 1.0 / dist.clamp_min(eps)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(values.dtype)  # (B, N, K)
    # Each cell is a bag of K rows of the flattened (B * k, C) values: offset every image's ids.
    offsets = torch.arange(batch_size, device=nearest.device, dtype=nearest.dtype) * num_keep
    bags = (nearest + offsets[:, None, None]).flatten(0, 1)  # (B * N, K)
    filled = F.embedding_bag(
        bags, values.reshape(batch_size * num_keep, channels),
        per_sample_weights=weights.flatten(0, 1), mode='sum')  # (B * N, C)
    return filled.view(batch_size, nearest.shape[1], channels)  # (B, N, C); explicit sizes: B may be 0


class SelectorInformedFill(nn.Module):
    """A learned fill: every cell of the high-res grid from the authors' inverse-distance fill of the k extracted
    tokens, refined with what the selector already saw of it at low resolution.

    The selector looked at every region of the image (its patch tokens on the low-res grid, and its map: how much
    the region matters) before the extractor saw k of them; the inverse-distance fill throws that view away and
    paints an unseen cell with its nearest chosen neighbours. Here each cell gets a residual from its filled
    features, the selector's tokens resized to the high-res grid, its map logit, whether it was chosen and how
    far the nearest chosen patch is; a 3x3 depth-wise convolution lets it read its neighbours, so a sign seen in
    one patch can take the shape the low-res view gives it. The last layer starts at zero: before training, the
    fill is the authors'.

    Cost per cell: about 2 * (D + hidden + 3) * hidden + 2 * hidden * D FLOPs (D = 128, hidden = 64: 41 kFLOPs,
    0.04 GFLOPs for a 32x32 grid), beside the extractor's k patches.
    """

    def __init__(self, embed_dim: int, selector_dim: int, hidden_dim: int = 64, refine_chosen: bool = True):
        """
        Args:
            embed_dim: channels of the filled grid (the extractor's tokens).
            selector_dim: channels of the selector's patch tokens.
            hidden_dim: channels of the refinement.
            refine_chosen: also refine the cells the extractor saw (else they keep their own tokens).
        """
        super().__init__()
        self.refine_chosen = refine_chosen
        self.selector_proj = nn.Linear(selector_dim, hidden_dim)
        self.mix = nn.Conv2d(embed_dim + hidden_dim + 3, hidden_dim, kernel_size=1)
        self.spatial = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.out = nn.Conv2d(hidden_dim, embed_dim, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
            self,
            filled: torch.Tensor,
            indices: torch.Tensor,
            selector_tokens: torch.Tensor,
            selector_grid: Tuple[int, int],
            map_logits: torch.Tensor,
    ) -> torch.Tensor:
        """(B, D, rows, cols) inverse-distance fill, (B, k) chosen ids, (B, h * w, Ds) selector patch tokens on
        its (h, w) grid, (B, rows * cols) map logits -> (B, D, rows, cols) refined fill."""
        batch_size, _, rows, cols = filled.shape
        seen = torch.zeros(batch_size, rows * cols, device=filled.device, dtype=filled.dtype)
        seen.scatter_(1, indices, 1.)  # (B, N)
        _, distance = nearest_chosen(indices, (rows, cols), 1)  # (B, N, 1)
        view = self.selector_proj(selector_tokens).transpose(1, 2).reshape(
            batch_size, self.selector_proj.out_features, *selector_grid)  # explicit sizes: B may be 0
        view = F.interpolate(view, size=(rows, cols), mode='bilinear', align_corners=False)  # (B, hidden, rows, cols)
        cues = torch.stack([map_logits.to(filled.dtype), seen, distance[..., 0].to(filled.dtype).clamp(max=8) / 8],
                           dim=1).view(batch_size, 3, rows, cols)  # (B, 3, rows, cols)
        hidden = F.gelu(self.mix(torch.cat([filled, view, cues], dim=1)))
        hidden = hidden + F.gelu(self.spatial(hidden))
        residual = self.out(hidden)  # (B, D, rows, cols)
        if not self.refine_chosen:
            residual = residual * (1 - seen).view(batch_size, 1, rows, cols)
        return filled + residual
