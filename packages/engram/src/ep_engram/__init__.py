"""ep-engram: Engram's sharded embedding tables in GPU and host memory, fetched by row id.

Start with :class:`EngramTable`: ``write`` stores every rank's shard (collective), ``fetch``
gathers rows by global id and returns a hook giving ``(data [T, K*hidden], sf [T, K*P] | None)``.
Scale layouts are described in :mod:`ep_engram.layout`, environment variables in
:mod:`ep_engram.knobs`. Importing this package initialises no CUDA context and compiles nothing.
"""

from __future__ import annotations

from ep_engram import knobs as knobs
from ep_engram._version import __version__ as __version__
from ep_engram.backend import FetchHook as FetchHook
from ep_engram.layout import num_sf_packs as num_sf_packs
from ep_engram.table import PLACEMENTS as PLACEMENTS
from ep_engram.table import EngramTable as EngramTable

__all__ = ["PLACEMENTS", "EngramTable", "FetchHook", "__version__", "knobs", "num_sf_packs"]
