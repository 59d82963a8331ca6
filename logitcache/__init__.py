"""logitcache: offline knowledge distillation from cached sparse teacher targets."""

from __future__ import annotations

from logitcache.errors import LogitCacheError

__version__ = "0.1.0"

__all__ = ["LogitCacheError", "__version__"]
