"""Environment knobs of cp-copyengine (``EP_CP_*``), each declared once::

from cp_copyengine import knobs

knobs.cp.check_inputs  # bool, from EP_CP_CHECK_INPUTS
with knobs.cp.scope():  # restores every EP_CP_* variable on exit
    knobs.cp.check_inputs = False
"""

from __future__ import annotations

from ep_jit.knobs import KnobGroup, knob_bool, knob_choice

__all__ = ["BACKEND_CHOICES", "CpKnobs", "cp"]

BACKEND_CHOICES = ("auto", "copyengine", "torch")
"""Values of ``EP_CP_BACKEND`` and of ``CopyEngineBuffer(backend=...)``."""


class CpKnobs(KnobGroup):
    """The knobs of cp-copyengine (``EP_CP_*``)."""

    check_inputs = knob_bool(
        "EP_CP_CHECK_INPUTS",
        True,
        "Compare every call's shapes and dtypes across ranks (one 16-byte gloo all-gather per "
        "call), so ranks that disagree or reject their input all raise; off: local checks only.",
    )
    backend = knob_choice(
        "EP_CP_BACKEND",
        "auto",
        BACKEND_CHOICES,
        "Backend used by CopyEngineBuffer(backend='auto'): auto, copyengine or torch (reference).",
    )


cp = CpKnobs()
