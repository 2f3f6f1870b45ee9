"""Deprecated name of `timm_lookwhere.scenes` (it generates the sign scenes). Kept for one release."""
import warnings

from .scenes import *  # noqa: F401,F403
from .scenes import __all__  # noqa: F401

warnings.warn('timm_lookwhere.data is renamed timm_lookwhere.scenes; import from there', DeprecationWarning,
              stacklevel=2)
