"""``GatherHandle``: the completion of one :class:`~cp_copyengine.CopyEngineBuffer` call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cp_copyengine.buffer import CopyEngineBuffer

__all__ = ["GatherHandle"]


class GatherHandle:
    """The completion of one ``all_gather`` or ``reduce_scatter`` call.

    ``handle()`` makes the current CUDA stream wait until the call's data has arrived
    (asynchronous, no host wait; a no-op on CPU, where calls complete before returning). It may
    be called several times, but only while the call's session is open.
    """

    def __init__(self, buffer: CopyEngineBuffer, session: int, event: torch.cuda.Event | None):
        self._buffer = buffer
        self.session = session
        self._event = event

    def __call__(self) -> None:
        """Makes the current stream wait for the call's data.

        Raises:
            RuntimeError: The call's session has ended (or the buffer was destroyed).
        """
        buf = self._buffer
        if buf.destroyed or not buf.in_session or buf.session_index != self.session:
            raise RuntimeError(
                f"this handle belongs to session {self.session}, which has ended (the buffer is "
                f"{'destroyed' if buf.destroyed else f'at session {buf.session_index}'}); call "
                "a handle before destroy_session(), while its outputs are still valid"
            )
        if self._event is not None:
            torch.cuda.current_stream(buf.device).wait_event(self._event)
