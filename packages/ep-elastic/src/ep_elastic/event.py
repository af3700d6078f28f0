"""Events and the communication stream: re-exported from :mod:`ep_jit.streams`.

The stream protocol (comm stream, ``EventOverlap``, ``EP_AVOID_RECORD_STREAM``) is documented
there; this module keeps ``from ep_elastic.event import ...`` working.
"""

from __future__ import annotations

from ep_jit.streams import EventHandle, EventOverlap, get_comm_stream, run_on_comm_stream

__all__ = ["EventHandle", "EventOverlap", "get_comm_stream", "run_on_comm_stream"]
