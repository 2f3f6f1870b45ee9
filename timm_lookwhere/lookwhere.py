""" LookWhere: a low-res selector predicts where to look, an extractor sees only the top-k high-res patches.

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
import os
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub.errors import LocalEntryNotFoundError

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    LayerNorm, Mlp, PatchEmbed, SwiGLUPacked, calculate_drop_path_rates, resample_abs_pos_embed, to_2tuple,
    trunc_normal_,
)
from timm.models import (
    build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, get_pretrained_cfg, named_apply,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc, init_weights_vit_timm

from .dense import idw_fill
from .hub import check_state_dict_keys, convert_authors_checkpoint, is_authors_layout, weights_unavailable_message

__all__ = ['LookWhere', 'LookWhereSelector', 'TopKSelect', 'SelectionRecorder']

_logger = logging.getLogger(__name__)

DEFAULT_K_RATIO = 0.1  # the authors' suggestion


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
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: side of the square low-res copy the selector sees.
            map_grid: grid side the map head was trained for (518 / 14 = 37); each low-res patch
                scores a ceil(map_grid / low-res grid)^2 sub-grid, as in the authors' head.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
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
        self.head = Mlp(embed_dim, 4 * embed_dim, self.multiplier ** 2, act_layer=nn.GELU, **dd)

    def forward(self, x: torch.Tensor, out_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) high-res image -> (B, rows * cols) map logits, (B, P, D) prefix tokens."""
        x = F.interpolate(x, size=self.img_size, mode='bilinear', align_corners=False)  # (B, C, 154, 154)
        x = self.backbone.forward_features(x)  # (B, P + 121, D)
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        # contiguous: on a strided slice F.linear falls back to a batched matmul with the weight
        # copied per image (2x slower on CPU); a copy of the 121 tokens lets it use one GEMM
        scores = self.head(patches.contiguous())  # (B, 121, m*m)
        scores = rearrange(
            scores, 'b (h w) (i j) -> b 1 (h i) (w j)',
            h=self.grid_size[0], i=self.multiplier,
        )  # (B, 1, 44, 44)
        scores = F.interpolate(scores, size=out_size, mode='bilinear', align_corners=False)  # (B, 1, rows, cols)
        return scores.flatten(1), prefix  # (B, rows * cols), (B, P, D)


class TopKSelect(nn.Module):
    """Picks the k best-scored patches, best first.

    A module of its own so a forward hook can read the map (input) and the indices (output), or
    replace the indices by returning a (B, k') long tensor of flat patch ids.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(self.k, dim=1, sorted=True).indices  # (B, k)

    def extra_repr(self) -> str:
        return f'k={self.k}'


class SelectionRecorder:
    """Records the selector map and the chosen indices of every forward, for visualisation.

        with SelectionRecorder(model) as rec:
            model(images)
        rec.records[-1]['map'], rec.records[-1]['indices']  # (B, N), (B, k)
    """

    def __init__(self, model: 'LookWhere'):
        self.model = model
        self.records: List[Dict[str, torch.Tensor]] = []
        self._handle = None

    def _hook(self, module, args, output):
        self.records.append(dict(map=args[0].detach().cpu(), indices=output.detach().cpu()))

    def __enter__(self) -> 'SelectionRecorder':
        self._handle = self.model.topk.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


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
            selector_img_size: int = 154,
            selector_depth: int = 3,
            map_grid: int = 37,
            k: Optional[int] = None,
            k_ratio: Optional[float] = None,
            freeze_selector: bool = True,
            num_neighbors: int = 5,
            weight_init: str = '',
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: high-res input size, int or (H, W); each side a multiple of patch_size.
            reg_tokens: register tokens of the selector (they become the extractor's prefix too).
            selector_img_size: side of the low-res copy the selector sees.
            selector_depth: blocks in the selector ViT.
            map_grid: high-res grid side the selector head was trained for (518 / 14).
            k: patches the extractor sees; or
            k_ratio: that number as a fraction of the high-res patches (default 0.1).
            freeze_selector: keep the selector fixed (the authors' fine-tuning). When False its ViT
                trains through the prefix tokens; its map head still gets no gradient from a task
                loss (top-k is not differentiable) and stays frozen unless set otherwise, see
                `set_selector_trainable`.
            num_neighbors: chosen patches mixed into each cell by `forward_dense`.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        img_size = to_2tuple(img_size)
        if any(s % patch_size or s <= 0 for s in img_size):
            raise ValueError(f'image sides must be positive multiples of the patch size {patch_size}, got {img_size}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_neighbors = num_neighbors
        self.grad_checkpointing = False

        self.selector = LookWhereSelector(
            img_size=selector_img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=selector_depth, num_heads=num_heads, mlp_ratio=mlp_ratio, reg_tokens=reg_tokens,
            init_values=init_values, mlp_layer=mlp_layer, act_layer=act_layer, map_grid=map_grid, **dd,
        )
        self.num_prefix_tokens = self.selector.num_prefix_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = True

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, embed_dim, **dd))
        self.topk = TopKSelect(1)
        self.k_ratio: Optional[float] = None
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

        if weight_init != 'skip':
            self.init_weights()
        self.set_selector_trainable(not freeze_selector)

    # ----------------------------------------------------------------------------------------
    # set-up

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=.02)
        for module in (self.patch_embed, self.blocks, self.head, self.selector.head):
            named_apply(init_weights_vit_timm, module)

    def set_k(self, k: Optional[int] = None, k_ratio: Optional[float] = None) -> None:
        """Set how many high-res patches the extractor sees: a count `k` or a fraction `k_ratio`."""
        if (k is None) == (k_ratio is None):
            raise ValueError(f'give exactly one of k or k_ratio, got k={k!r}, k_ratio={k_ratio!r}')
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f'k must be an int, got {type(k).__name__}')
            if not 1 <= k <= self.num_patches:
                raise ValueError(
                    f'k={k} must be between 1 and the {self.num_patches} patches of a '
                    f'{self.grid_size[0]}x{self.grid_size[1]} grid')
        else:
            if isinstance(k_ratio, bool) or not isinstance(k_ratio, (int, float)):
                raise TypeError(f'k_ratio must be a float, got {type(k_ratio).__name__}')
            if not 0 < k_ratio <= 1:
                raise ValueError(f'k_ratio must be in (0, 1], got {k_ratio}')
            k = max(1, int(k_ratio * self.num_patches))
        self.topk.k = k
        self.k_ratio = k_ratio

    @property
    def k(self) -> int:
        return self.topk.k

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
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, device=self.pos_embed.device,
                              dtype=self.pos_embed.dtype) if num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------------------------------
    # forward

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'expected an image tensor (B, C, H, W), got {type(x).__name__}')
        if x.ndim != 4:
            raise ValueError(f'expected an image batch (B, C, H, W), got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})')
        size, patch = tuple(x.shape[-2:]), self.patch_embed.patch_size[0]
        if size[0] % patch or size[1] % patch:
            raise ValueError(f'image sides must be multiples of the patch size {patch}, got {size[0]}x{size[1]}')
        if size != self.patch_embed.img_size:
            raise ValueError(
                f'this model was built for {self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} images, '
                f'got {size[0]}x{size[1]}; create it with img_size={size}')

    def select(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Selector and top-k: (B, N) map logits, (B, P, D) prefix tokens, (B, k) chosen patch ids."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.selector_trainable):
            scores, prefix = self.selector(x, self.grid_size)  # (B, N), (B, P, D)
        indices = self.topk(scores)  # (B, k), a hook may have replaced it
        if (not isinstance(indices, torch.Tensor) or indices.ndim != 2 or indices.shape[0] != x.shape[0]
                or indices.dtype not in (torch.int64, torch.int32) or indices.shape[1] < 1):
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f'top-k selection must give (B, k) integer patch ids with k >= 1, got {got}')
        return scores, prefix, indices.long()

    def embed_patches(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Cut out only the chosen patches, then embed them: (B, C, H, W), (B, k) -> (B, k, D)."""
        B, C = x.shape[:2]
        k = indices.shape[1]
        (rows, cols), p = self.grid_size, self.patch_embed.patch_size[0]
        # Every run of p pixels of an image row is a row of a (B * C * H * cols, p) view, so one
        # index_select of C * p runs per patch cuts them out: 2x faster on CPU than advanced
        # indexing into the (B, C, rows, p, cols, p) grid, and the result is already (B * k, C * p * p).
        runs = x.contiguous().view(-1, p)
        batch = torch.arange(B, device=x.device)[:, None]
        first = (batch * C * rows * p + (indices // cols) * p) * cols + indices % cols  # (B, k): channel 0, row 0
        channel_rows = torch.arange(C, device=x.device)[:, None] * rows * p + torch.arange(p, device=x.device)
        patches = runs.index_select(0, (first[..., None] + channel_rows.flatten() * cols).flatten())  # (B*k*C*p, p)
        proj = self.patch_embed.proj
        tokens = F.linear(patches.view(B * k, -1), proj.weight.flatten(1), proj.bias).view(B, k, -1)  # (B, k, D)
        tokens = self.patch_embed.norm(tokens)
        return tokens + self.pos_embed[0][indices]  # (B, k, D)

    def _input_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The extractor's input: (B, N) map logits, (B, k) chosen ids, (B, P + k, D) tokens."""
        self._check_input(x)
        scores, prefix, indices = self.select(x)
        return scores, indices, torch.cat([prefix, self.embed_patches(x, indices)], dim=1)

    def forward_all(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Everything one forward computes: `map` (B, N), `indices` (B, k), `tokens` (B, P + k, D)."""
        scores, indices, tokens = self._input_tokens(x)  # (B, N), (B, k), (B, P + k, D)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            tokens = checkpoint_seq(self.blocks, tokens)
        else:
            tokens = self.blocks(tokens)
        return dict(map=scores, indices=indices, tokens=self.norm(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P + k, D): the selector's prefix tokens then the k patch tokens."""
        return self.forward_all(x)['tokens']

    def forward_selection(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Selector only: `map` (B, N) logits over the high-res patches, `indices` (B, k) chosen."""
        self._check_input(x)
        scores, _, indices = self.select(x)
        return dict(map=scores, indices=indices)

    def dense_from_tokens(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, P + k, D) tokens, (B, k) ids -> (B, D, rows, cols), every cell filled from the k."""
        filled = idw_fill(tokens[:, self.num_prefix_tokens:], indices, self.grid_size, self.num_neighbors)
        return rearrange(filled, 'b (h w) c -> b c h w', h=self.grid_size[0])

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H / 14, W / 14) features for every high-res patch."""
        out = self.forward_all(x)
        return self.dense_from_tokens(out['tokens'], out['indices'])

    def _take_block_indices(self, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
        """timm's rule (None: every block, n: the last n, a list: those, negative from the end),
        with a ValueError where timm asserts."""
        try:
            return feature_take_indices(len(self.blocks), indices)
        except AssertionError as err:
            raise ValueError(f'block indices {indices!r} do not fit {len(self.blocks)} blocks: {err}') from None

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Outputs of chosen extractor blocks, with timm VisionTransformer's signature and return forms.

        A block sees only the k chosen patches; each intermediate covers the whole high-res grid,
        filled from that block's k tokens as `forward_dense` does: (B, D, rows, cols) for 'NCHW',
        (B, rows * cols, D) for 'NLC'. The final features stay (B, P + k, D) like `forward_features`,
        so `forward_head` applies to them.

        Args:
            x: (B, C, H, W) images.
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
        _, chosen, tokens = self._input_tokens(x)  # (B, k), (B, P + k, D)

        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        taken = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                tokens = checkpoint(block, tokens)
            else:
                tokens = block(tokens)  # (B, P + k, D)
            if i in take_indices:
                taken.append(self.norm(tokens) if norm else tokens)

        prefix_tokens = [t[:, :self.num_prefix_tokens] for t in taken]  # (B, P, D) each
        # every block shares the selection: one neighbour search fills all of them, side by side in channels
        intermediates = []
        if taken:
            filled = self.dense_from_tokens(torch.cat(taken, dim=-1), chosen)  # (B, n * D, rows, cols)
            intermediates = list(filled.split(self.embed_dim, dim=1))  # (B, D, rows, cols) each
        if output_fmt == 'NLC':
            intermediates = [y.flatten(2).transpose(1, 2) for y in intermediates]  # (B, rows * cols, D)

        if output_dict:
            out: Dict[str, Any] = {'image_intermediates': intermediates}
            if return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                out['image_features'] = self.norm(tokens)
            return out
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

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

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
    if overlay.get('file') and 'num_classes' in kwargs and 'num_classes' not in overlay:
        # A local file describes its own head: keep a fine-tuned classifier instead of letting the
        # registry's num_classes (0 for the authors' feature weights) discard it.
        kwargs['pretrained_cfg_overlay'] = dict(overlay, num_classes=kwargs['num_classes'])
    try:
        return build_model_with_cfg(
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
    'lookwhere_vits_518': _cfg(notes=('No published weights: pre-train it with timm_lookwhere.distill.',)),
    # trained by benchmarks/sparse_signs.py and shipped inside the package: loads offline
    'lookwhere_vitt16_256.sparse_signs': _cfg(
        file=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), 'weights', 'lookwhere_vitt16_256_sparse_signs.safetensors'),
        num_classes=14, input_size=(3, 256, 256), interpolation='bilinear',
        notes=('Sparse traffic signs (timm_lookwhere.data): teacher trained, distilled, fine-tuned with the '
               'selector frozen, all by benchmarks/sparse_signs.py.',),
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
    """LookWhere ViT-Tiny-class /16 at 256 px (128 wide, 6 blocks, no registers): 1-block selector at 128 px.

    The `sparse_signs` tag is the model of benchmarks/sparse_signs.py, shipped in the package.
    """
    model_args = dict(
        img_size=256, patch_size=16, embed_dim=128, depth=6, num_heads=4, init_values=1e-5, reg_tokens=0,
        selector_img_size=128, selector_depth=1, map_grid=16,
    )
    return _create_lookwhere('lookwhere_vitt16_256', pretrained=pretrained, **dict(model_args, **kwargs))
