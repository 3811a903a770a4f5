"""normfuse: batched vector norms for naive per-slice norm loops, as a torch.compile backend.

    import normfuse
    torch.compile(model, backend=normfuse.backend)   # or backend="normfuse" once installed
    normfuse.fuse_norms(gm)                          # the pass alone, in place
    normfuse.explain(fn, x)                          # what would be rewritten, checked
    python -m normfuse explain file.py:fn --shape 32,10   # the same from the shell

NORMFUSE_LOG=1 (or debug) logs each rewrite to stderr; TORCH_LOGS="+normfuse" works too.
"""

from .backend import backend
from .explain import explain
from .inductor_pass import install, uninstall
from .passes import fuse_norms
from .report import FuseReport, Rewrite, Skip

__all__ = ["backend", "explain", "fuse_norms", "install", "uninstall", "FuseReport", "Rewrite", "Skip"]
__version__ = "0.1.0"

from .logs import configure_from_env as _configure_logs  # noqa: E402

_configure_logs()
