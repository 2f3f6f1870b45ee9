"""Dense fill: every cell of the high-res grid from the k extracted patch tokens.

Each cell takes the inverse-distance-weighted mean of its K nearest chosen patches (Euclidean
distance on grid coordinates, weight 1 / (d + eps)). Equidistant candidates are ranked by their
place in the selection, so the patch the selector scored higher wins the tie: this is the rule a
stable sort gives the authors' code, and it makes the output independent of sort implementations.
"""
from typing import Tuple

import torch

__all__ = ['nearest_chosen', 'idw_fill']


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
    cells = torch.arange(rows * cols, device=indices.device)
    # Squared distances are exact integers, so a key of (distance, selection rank) has no ties.
    key_dtype = torch.int64 if (rows * rows + cols * cols + 1) * num_keep >= 2 ** 31 else torch.int32
    d_row = (cells // cols)[None, :, None] - (indices // cols)[:, None, :]  # (B, N, k)
    d_col = (cells % cols)[None, :, None] - (indices % cols)[:, None, :]  # (B, N, k)
    dist_sq = (d_row * d_row + d_col * d_col).to(key_dtype)  # (B, N, k)
    rank = torch.arange(num_keep, device=indices.device, dtype=key_dtype)
    key = dist_sq * num_keep + rank  # (B, N, k), unique per cell
    nearest = key.topk(num_neighbors, dim=2, largest=False, sorted=True).indices  # (B, N, K)
    dist = dist_sq.gather(2, nearest).float().sqrt()  # (B, N, K)
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
    nearest, dist = nearest_chosen(indices, grid_size, num_neighbors)  # (B, N, K) each
    weights = 1.0 / (dist + eps)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(values.dtype)  # (B, N, K)
    channels = values.shape[-1]
    filled = None
    # One neighbour at a time keeps the peak at (B, N, C) instead of (B, N, K, C).
    for j in range(nearest.shape[-1]):
        idx = nearest[..., j:j + 1].expand(-1, -1, channels)  # (B, N, C)
        term = values.gather(1, idx) * weights[..., j:j + 1]  # (B, N, C)
        filled = term if filled is None else filled + term
    return filled
