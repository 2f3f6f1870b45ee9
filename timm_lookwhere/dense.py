"""Dense fill: every cell of the high-res grid from the k extracted patch tokens.

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
import torch.nn.functional as F

__all__ = ['nearest_chosen', 'idw_fill']

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
