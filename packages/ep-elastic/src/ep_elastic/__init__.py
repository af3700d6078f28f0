"""ep-elastic: expert-parallel MoE dispatch/combine for PyTorch, shaped after DeepEP V2.

:class:`ElasticBuffer` is the user API; :mod:`ep_elastic.autograd` makes dispatch and combine
differentiable; :mod:`ep_elastic.compat` offers DeepEP V1's ``Buffer`` API on the same backends
(``docs/migrating.md``). Importing never initialises CUDA or compiles anything.
"""

from __future__ import annotations

import torch

from ep_core.handle import EPHandle, LowLatencyHandle
from ep_elastic._version import __version__ as __version__
from ep_elastic.autograd import combine_fn, dispatch_fn
from ep_elastic.buffer import ElasticBuffer
from ep_elastic.event import EventHandle, EventOverlap

topk_idx_t: torch.dtype = torch.int64
"""dtype of ``topk_idx`` (DeepEP's name)."""

__all__ = [
    "EPHandle",
    "ElasticBuffer",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "__version__",
    "combine_fn",
    "dispatch_fn",
    "topk_idx_t",
]
