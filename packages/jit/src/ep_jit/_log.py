"""The package logger; diagnostics requested through knobs are made visible on stderr."""

from __future__ import annotations

import logging

from ep_jit import knobs

logger = logging.getLogger("ep_jit")
_handler: logging.Handler | None = None


def verbose(msg: str, *args: object) -> None:
    """Logs a diagnostic the user asked for with an ``EP_JIT_*`` knob.

    Such messages must be seen even when the application never configured logging, so the
    ``ep_jit`` logger gets a stderr handler (once) when it has none and is not propagating to a
    configured root logger.
    """
    global _handler
    if _handler is None and not logger.handlers and not logging.getLogger().handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("[ep_jit] %(message)s"))
        logger.addHandler(_handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.info(msg, *args)


def debug_enabled() -> bool:
    """Whether ``EP_JIT_DEBUG`` is on."""
    return knobs.jit.debug
