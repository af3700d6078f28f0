"""pp-rdma: pipeline-parallel send/recv with no SM busy while data moves.

:class:`PipeBuffer` sends tensors between any two ranks of a group, FIFO per pair with credit
flow control. Inside a node the copy engines move the data into peer-mapped landing slots, with
stream memory operations as signals (no kernel, capturable in CUDA graphs); across nodes NIXL
posts one-sided RDMA writes; ``torch.distributed`` is the reference. Importing this package
initialises no CUDA context and loads no transport.
"""

from __future__ import annotations

from pp_rdma import knobs as knobs
from pp_rdma._version import __version__ as __version__
from pp_rdma.buffer import PipeBuffer as PipeBuffer
from pp_rdma.errors import PipeError as PipeError
from pp_rdma.errors import PipePeerError as PipePeerError
from pp_rdma.errors import PipeSizeMismatchError as PipeSizeMismatchError
from pp_rdma.errors import PipeTimeoutError as PipeTimeoutError

__all__ = [
    "PipeBuffer",
    "PipeError",
    "PipePeerError",
    "PipeSizeMismatchError",
    "PipeTimeoutError",
    "__version__",
    "knobs",
]
