"""Environment knobs of ep-elastic (``EP_*``); ep-core and ep-jit declare the shared ones.

``EP_CHECK_INPUTS``, ``EP_BUFFER_DEBUG`` and ``EP_BACKEND`` live in :mod:`ep_core.knobs`
(``ep_core.knobs.ep``); ``EP_AVOID_RECORD_STREAM`` lives in :mod:`ep_jit.knobs`
(``ep_jit.knobs.jit.avoid_record_stream``), next to the comm stream that reads it. This group
keeps the old spelling working::

    from ep_elastic import knobs

    knobs.elastic.avoid_record_stream  # bool, from EP_AVOID_RECORD_STREAM (ep-jit's knob)
"""

from __future__ import annotations

from ep_jit.knobs import JitKnobs, KnobGroup

__all__ = ["ElasticKnobs", "elastic"]


class ElasticKnobs(KnobGroup):
    """The knobs of ep-elastic."""

    # The same descriptor as ep-jit's (declared once there), not a second declaration.
    avoid_record_stream = JitKnobs.avoid_record_stream


elastic = ElasticKnobs()
