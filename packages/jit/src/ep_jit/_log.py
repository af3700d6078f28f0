"""The package logger; diagnostics requested through knobs are made visible on stderr."""

from __future__ import annotations

import logging

from ep_jit import knobs

logger = logging.getLogger("ep_jit")
_handlers: dict[str, logging.Handler] = {}


def verbose(msg: str, *args: object, name: str = "ep_jit") -> None:
    """Logs, at INFO on logger ``name``, a diagnostic the user asked for with a knob.

    Such messages must be seen even when the application never configured logging, so the
    logger gets a stderr handler (once) when it has none and is not propagating to a configured
    root logger. Every package's debug knobs go through here (``EP_JIT_DEBUG``,
    ``EP_BUFFER_DEBUG``, ...).
    """
    log = logging.getLogger(name)
    if name not in _handlers and not log.handlers and not logging.getLogger().handlers:
        handler = _handlers[name] = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    log.info(msg, *args)


def debug_enabled() -> bool:
    """Whether ``EP_JIT_DEBUG`` is on."""
    return knobs.jit.debug
