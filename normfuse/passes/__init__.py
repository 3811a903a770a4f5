"""normfuse's FX passes, one idea a module (see ``fuse_norms`` for the pass itself)."""

from .fuse_norms import fuse_norms

__all__ = ["fuse_norms"]
