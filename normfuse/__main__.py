"""``python -m normfuse explain FILE.py:FUNC --shape 32,10``; see ``normfuse.cli``."""

from .cli import main

raise SystemExit(main())
