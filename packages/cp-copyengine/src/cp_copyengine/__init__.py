"""cp-copyengine: all-gather and reduce-scatter on the GPUs' copy engines, in sessions.

:class:`CopyEngineBuffer` is the whole API: open a session, all-gather or reduce-scatter into
it (asynchronously, with a handle per call), end the session. The copy-engine backend moves the
bytes with peer memory copies and signals arrival with stream memory operations, so no kernel
runs for an all-gather; the reference backend does the same over ``torch.distributed``.
Environment variables are in :mod:`cp_copyengine.knobs`. Importing this package initialises no
CUDA context and compiles nothing.
"""

from __future__ import annotations

from cp_copyengine import knobs as knobs
from cp_copyengine._version import __version__ as __version__
from cp_copyengine.buffer import CopyEngineBuffer as CopyEngineBuffer
from cp_copyengine.buffer import GatherHandle as GatherHandle
from cp_copyengine.plan import session_bytes_hint as session_bytes_hint

__all__ = ["CopyEngineBuffer", "GatherHandle", "__version__", "knobs", "session_bytes_hint"]
