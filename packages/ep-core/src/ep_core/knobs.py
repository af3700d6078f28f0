"""Environment knobs of ep-core (``EP_*``).

Every variable is declared once here with its type, default and one line of doc; the values are
read at access time, so a variable exported after import still takes effect::

    from ep_core import knobs

    knobs.ep.check_inputs  # bool, from EP_CHECK_INPUTS
    with knobs.ep.scope():  # restores every EP_* variable of this group on exit
        knobs.ep.backend = "torch"
"""

from __future__ import annotations

from ep_jit.knobs import KnobGroup, knob_bool, knob_choice, knob_int

__all__ = ["BACKEND_CHOICES", "EpKnobs", "ep"]

BACKEND_CHOICES = ("auto", "torch", "nvlink")
"""Values of ``EP_BACKEND`` and of ``ElasticBuffer(backend=...)``."""


class EpKnobs(KnobGroup):
    """The knobs of ep-core (``EP_*``)."""

    check_inputs = knob_bool(
        "EP_CHECK_INPUTS",
        True,
        "Check expert-id values of dispatch inputs (a host sync on GPU; skipped in graph capture).",
    )
    buffer_debug = knob_bool(
        "EP_BUFFER_DEBUG",
        False,
        "Log each rank's backend choice and buffer sizes by region when a buffer is built.",
    )
    cpu_timeout_secs = knob_int(
        "EP_CPU_TIMEOUT_SECS",
        300,
        "Default of ElasticBuffer(num_cpu_timeout_secs=...): limit of host waits on every backend.",
    )
    backend = knob_choice(
        "EP_BACKEND",
        "auto",
        BACKEND_CHOICES,
        "Backend used by ElasticBuffer(backend='auto'): auto, torch (reference) or nvlink.",
    )


ep = EpKnobs()
