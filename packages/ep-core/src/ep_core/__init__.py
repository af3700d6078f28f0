"""ep-core: expert-parallel MoE routing layout, handles, FP8 formats, input checks, backends.

The user-facing API is ``ep_elastic.ElasticBuffer``; this package holds what every backend
shares and the reference backend (:class:`TorchBackend`). Importing it never initialises CUDA.
"""

from __future__ import annotations

from ep_core._version import __version__ as __version__
from ep_core.backend import BackendConfig, DispatchResult, EPBackend, LowLatencyDispatchResult
from ep_core.factory import create_backend, resolve_backend
from ep_core.fp8 import (
    pack_ue8m0,
    per_token_cast_back,
    per_token_cast_to_fp8,
    round_scale_to_pow2,
    unpack_ue8m0,
)
from ep_core.handle import EPHandle, LowLatencyHandle
from ep_core.layout import DispatchLayout, get_dispatch_layout
from ep_core.reference import TorchBackend
from ep_core.sizing import get_buffer_size_hint, get_theoretical_num_sms

__all__ = [
    "BackendConfig",
    "DispatchLayout",
    "DispatchResult",
    "EPBackend",
    "EPHandle",
    "LowLatencyDispatchResult",
    "LowLatencyHandle",
    "TorchBackend",
    "__version__",
    "create_backend",
    "get_buffer_size_hint",
    "get_dispatch_layout",
    "get_theoretical_num_sms",
    "pack_ue8m0",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "resolve_backend",
    "round_scale_to_pow2",
    "unpack_ue8m0",
]
