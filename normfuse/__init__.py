"""normfuse: batched vector norms for naive per-slice norm loops, as a torch.compile backend.

    import normfuse
    torch.compile(model, backend=normfuse.backend)   # or backend="normfuse" once installed
    normfuse.fuse_norms(gm)                          # the pass alone, in place
    print(normfuse.explain(fn, x))                   # what would be rewritten
"""

from .backend import backend
from .explain import explain
from .passes import fuse_norms
from .report import FuseReport, Rewrite, Skip

__all__ = ["backend", "explain", "fuse_norms", "FuseReport", "Rewrite", "Skip"]
__version__ = "0.1.0"
