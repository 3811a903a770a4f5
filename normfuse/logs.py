"""normfuse's log switches.

normfuse logs to the standard logger ``normfuse``: one INFO line per rewrite (with the batched code
to write instead), a WARNING when the pass fails, the graph before and after at DEBUG. Three ways
to see it:

* ``NORMFUSE_LOG=1`` (or ``info``) / ``NORMFUSE_LOG=debug`` in the environment: at ``import
  normfuse`` a handler writing to stderr is added to that logger, at that level. Nothing else about
  logging is configured, and nothing at all without the variable.
* ``TORCH_LOGS="normfuse"`` / ``TORCH_LOGS="+normfuse"`` (DEBUG): torch's own switch accepts the
  name of any importable module as a log, so it works with torch's format and handlers and needs
  no registration (a registration at ``import normfuse`` could not help: ``TORCH_LOGS`` is read
  when torch is imported, before normfuse). ``torch._logging.set_logs(modules={"normfuse":
  logging.INFO})`` is the same from code.
* ``logging.getLogger("normfuse")``, configured as any other.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "NORMFUSE_LOG"
_LEVELS = {
    "1": logging.INFO, "info": logging.INFO, "true": logging.INFO, "on": logging.INFO, "yes": logging.INFO,
    "2": logging.DEBUG, "debug": logging.DEBUG, "+": logging.DEBUG,
    "0": None, "": None, "false": None, "off": None, "no": None,
}


class _EnvHandler(logging.StreamHandler):
    """The handler ``NORMFUSE_LOG`` adds (a class of its own, so that it is added once)."""


def level_from_env(value: str | None) -> int | None:
    """The level ``NORMFUSE_LOG=value`` asks for; None for off. Unknown values raise ValueError."""
    if value is None:
        return None
    key = value.strip().lower()
    if key not in _LEVELS:
        raise ValueError(f"{ENV_VAR}={value!r}: use 1 or info, debug, or 0 to switch it off")
    return _LEVELS[key]


def configure_from_env(environ: dict[str, str] | None = None) -> int | None:
    """Apply ``NORMFUSE_LOG``: add a stderr handler to the ``normfuse`` logger at its level.

    Returns the level set, or None if the variable is unset or off. A value it does not know
    is reported once on stderr and ignored (an import must not fail over a log switch).
    """
    environ = os.environ if environ is None else environ
    try:
        level = level_from_env(environ.get(ENV_VAR))
    except ValueError as e:
        print(f"normfuse: {e}", file=sys.stderr)
        return None
    if level is None:
        return None
    log = logging.getLogger("normfuse")
    log.setLevel(level)
    if not any(isinstance(h, _EnvHandler) for h in log.handlers):
        handler = _EnvHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
    return level
