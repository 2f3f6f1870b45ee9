"""timm-lookwhere: LookWhere models in timm's registry.

Importing this package registers `lookwhere_vitb_518`, `lookwhere_vitb_franca_518` and
`lookwhere_vits_518` with timm, so `timm.create_model(...)` builds them.
"""
from .dense import idw_fill, nearest_chosen
from .hub import convert_authors_checkpoint
from .lookwhere import LookWhere, LookWhereSelector, SelectionRecorder, TopKSelect, checkpoint_filter_fn

__version__ = '0.1.0'
