"""Environment knobs of pp-rdma (``EP_PP_*``).

Every variable is declared once here with its type, default and one line of doc; values are read
at access time, so a variable exported after import still takes effect::

    from pp_rdma import knobs

    knobs.pp.timeout_s  # int, from EP_PP_TIMEOUT_S
"""

from __future__ import annotations

from ep_jit.knobs import KnobGroup, knob_bool, knob_choice, knob_int

__all__ = ["BACKEND_CHOICES", "PpKnobs", "pp"]

BACKEND_CHOICES = ("auto", "copy_engine", "nixl", "torch")
"""Values of ``EP_PP_BACKEND`` and of ``PipeBuffer(backend=...)``."""


class PpKnobs(KnobGroup):
    """The knobs of pp-rdma (``EP_PP_*``)."""

    backend = knob_choice(
        "EP_PP_BACKEND",
        "auto",
        BACKEND_CHOICES,
        "Backend of PipeBuffer(backend=None): auto picks by topology (see docs/pp-rdma.md).",
    )
    timeout_s = knob_int(
        "EP_PP_TIMEOUT_S",
        120,
        "Default of PipeBuffer(timeout_s=...): limit of a send blocked on credits or a recv.",
    )
    nixl_progress_thread = knob_bool(
        "EP_PP_NIXL_PROGRESS_THREAD",
        False,
        "Run NIXL's progress thread (one busy core per rank); off: PipeBuffer calls poll.",
    )
    nixl_err_mode = knob_choice(
        "EP_PP_NIXL_ERR_MODE",
        "auto",
        ("auto", "peer", "none"),
        "UCX error handling of the NIXL backend: none (one host: shared memory, one-sided "
        "writes), peer (reports dead peers; on one host its writes need the target to poll); "
        "auto: none on one host, else peer.",
    )


pp = PpKnobs()
