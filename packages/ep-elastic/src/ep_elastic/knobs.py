"""Environment knobs of ep-elastic (``EP_*``); ep-core declares the shared ones.

``EP_CHECK_INPUTS``, ``EP_BUFFER_DEBUG`` and ``EP_BACKEND`` live in :mod:`ep_core.knobs`
(``ep_core.knobs.ep``); this module adds what only the user API reads::

    from ep_elastic import knobs

    knobs.elastic.avoid_record_stream  # bool, from EP_AVOID_RECORD_STREAM
"""

from __future__ import annotations

from ep_jit.knobs import KnobGroup, knob_bool

__all__ = ["ElasticKnobs", "elastic"]


class ElasticKnobs(KnobGroup):
    """The knobs of ep-elastic."""

    avoid_record_stream = knob_bool(
        "EP_AVOID_RECORD_STREAM",
        False,
        "Keep async operands alive in the returned EventOverlap instead of calling record_stream.",
    )


elastic = ElasticKnobs()
