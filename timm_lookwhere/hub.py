"""Deprecated name of `timm_lookwhere.checkpoints` (it reads checkpoint files and converts their layouts; it
calls no Hub). Kept for one release."""
import warnings

from .checkpoints import *  # noqa: F401,F403
from .checkpoints import __all__  # noqa: F401

warnings.warn('timm_lookwhere.hub is renamed timm_lookwhere.checkpoints; import from there', DeprecationWarning,
              stacklevel=2)
