"""timm-lookwhere: LookWhere models in timm's registry.

Importing this package (or timm, once the package is installed) registers `lookwhere_vitb_518`,
`lookwhere_vitb_224`, `lookwhere_vitb_franca_518`, `lookwhere_vits_518`, `lookwhere_vitt16_256` and
`lookwhere_vitt16_512` with timm, so `timm.create_model(...)` builds them. `create_teacher(name)` builds
the full-resolution ViT a pretrained one was distilled from; `create_segmenter(name)` a LookWhere with a
per-cell segmentation head (pixel logits).
"""
from .checkpoints import convert_authors_checkpoint
from .dense import idw_fill, nearest_chosen
from .layers import SparsePatchEmbed
from .lookwhere import (
    LookWhere, LookWhereSelector, PreferredSelection, RandomSelection, SelectionRecorder, TopKSelect,
    checkpoint_filter_fn,
)
from .segmentation import LookWhereSegmenter, create_segmenter
from .segmentation_data import ADE20KFolder
from .teachers import create_teacher

__all__ = [
    'LookWhere', 'LookWhereSelector', 'SelectionRecorder', 'RandomSelection', 'PreferredSelection', 'TopKSelect',
    'SparsePatchEmbed', 'checkpoint_filter_fn',
    'create_teacher', 'LookWhereSegmenter', 'create_segmenter', 'ADE20KFolder', 'idw_fill', 'nearest_chosen',
    'convert_authors_checkpoint',
]
__version__ = '0.1.0'
