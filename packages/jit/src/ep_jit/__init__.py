"""ep-jit: compile, cache and launch CUDA C++ kernels; symmetric peer memory; test helpers.

Start with :class:`KernelSpec` and :func:`build` (``spec.py``, ``launch.py``), then
:class:`SymmetricBuffer` (``symm.py``). Environment variables are in :mod:`ep_jit.knobs`; the
multi-process test launcher and timers are in :mod:`ep_jit.testing`. Importing this package
initialises no CUDA context and compiles nothing.
"""

from __future__ import annotations

from ep_jit import knobs as knobs
from ep_jit._version import __version__ as __version__
from ep_jit.cache import CacheEntry as CacheEntry
from ep_jit.cache import CacheStats as CacheStats
from ep_jit.cache import cache_stats as cache_stats
from ep_jit.cache import clear_memory_cache as clear_memory_cache
from ep_jit.cache import compile_spec as compile_spec
from ep_jit.cache import reset_cache_stats as reset_cache_stats
from ep_jit.compiler import FunctionUsage as FunctionUsage
from ep_jit.compiler import parse_ptxas as parse_ptxas
from ep_jit.errors import HostTimeoutError as HostTimeoutError
from ep_jit.errors import JitCompileError as JitCompileError
from ep_jit.errors import JitError as JitError
from ep_jit.errors import JitLaunchError as JitLaunchError
from ep_jit.errors import JitPeerAbortError as JitPeerAbortError
from ep_jit.errors import JitPtxasCheckError as JitPtxasCheckError
from ep_jit.errors import JitTimeoutError as JitTimeoutError
from ep_jit.hostwait import wait_device as wait_device
from ep_jit.hostwait import wait_event as wait_event
from ep_jit.hostwait import wait_stream as wait_stream
from ep_jit.hostwait import wait_until as wait_until
from ep_jit.kernels import iter_shipped_kernels as iter_shipped_kernels
from ep_jit.launch import BoundLaunch as BoundLaunch
from ep_jit.launch import Kernel as Kernel
from ep_jit.launch import build as build
from ep_jit.memcpy import memcpy_batch as memcpy_batch
from ep_jit.peer_memory import PeerMemory as PeerMemory
from ep_jit.registry import BackendSpec as BackendSpec
from ep_jit.registry import get_backend as get_backend
from ep_jit.registry import registered_backends as registered_backends
from ep_jit.registry import select_backend as select_backend
from ep_jit.spec import KernelSpec as KernelSpec
from ep_jit.streamops import MemOp as MemOp
from ep_jit.streamops import MemOpBatch as MemOpBatch
from ep_jit.streamops import batch_mem_ops as batch_mem_ops
from ep_jit.streamops import wait_value as wait_value
from ep_jit.streamops import write_value as write_value
from ep_jit.streams import EventHandle as EventHandle
from ep_jit.streams import EventOverlap as EventOverlap
from ep_jit.streams import get_comm_stream as get_comm_stream
from ep_jit.streams import run_on_comm_stream as run_on_comm_stream
from ep_jit.symm import SymmetricBuffer as SymmetricBuffer
from ep_jit.symm import is_single_nvlink_domain as is_single_nvlink_domain
from ep_jit.symm import peer_memory as peer_memory
from ep_jit.toolchain import include_roots as include_roots
from ep_jit.toolchain import register_include_root as register_include_root
from ep_jit.toolchain import resolve_arch as resolve_arch
from ep_jit.toolchain import unregister_include_root as unregister_include_root
from ep_jit.topology import Topology as Topology
from ep_jit.topology import topology as topology
from ep_jit.watchdog import DeviceWatchdog as DeviceWatchdog
from ep_jit.watchdog import WaitContext as WaitContext
from ep_jit.watchdog import signal_abort as signal_abort

__all__ = [
    "BackendSpec",
    "BoundLaunch",
    "CacheEntry",
    "CacheStats",
    "DeviceWatchdog",
    "EventHandle",
    "EventOverlap",
    "FunctionUsage",
    "HostTimeoutError",
    "JitCompileError",
    "JitError",
    "JitLaunchError",
    "JitPeerAbortError",
    "JitPtxasCheckError",
    "JitTimeoutError",
    "Kernel",
    "KernelSpec",
    "MemOp",
    "MemOpBatch",
    "PeerMemory",
    "SymmetricBuffer",
    "Topology",
    "WaitContext",
    "__version__",
    "batch_mem_ops",
    "build",
    "cache_stats",
    "clear_memory_cache",
    "compile_spec",
    "get_backend",
    "get_comm_stream",
    "include_roots",
    "is_single_nvlink_domain",
    "iter_shipped_kernels",
    "knobs",
    "memcpy_batch",
    "parse_ptxas",
    "peer_memory",
    "register_include_root",
    "registered_backends",
    "reset_cache_stats",
    "resolve_arch",
    "run_on_comm_stream",
    "select_backend",
    "signal_abort",
    "topology",
    "unregister_include_root",
    "wait_device",
    "wait_event",
    "wait_stream",
    "wait_until",
    "wait_value",
    "write_value",
]
