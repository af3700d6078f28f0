"""Helpers for tests and benchmarks of every package: a multi-process launcher and timers.

``run_ranks`` spawns ranks on one host (gloo on CPU, NCCL on GPUs); ``run_from_env`` runs one
rank started by torchrun; ``bench`` times a callable with CUDA events (or perf_counter on CPU)
and ``capture_graph`` captures one in a CUDA graph. For collective calls, ``start_line`` makes
every rank start together and ``time_steps`` / ``kernel_times`` time steps on all ranks and
report the slowest rank (``RankTiming``). ``record_stream_ops`` records the stream memory
operations of ``ep_jit.streamops`` instead of issuing them (CPU tests of copy-engine protocols).
"""

from __future__ import annotations

from ep_jit.testing._bench import L2_FLUSH_BYTES as L2_FLUSH_BYTES
from ep_jit.testing._bench import BenchStats as BenchStats
from ep_jit.testing._bench import bench as bench
from ep_jit.testing._bench import capture_graph as capture_graph
from ep_jit.testing._collective_bench import START_LINE_SLEEP_CYCLES as START_LINE_SLEEP_CYCLES
from ep_jit.testing._collective_bench import RankTiming as RankTiming
from ep_jit.testing._collective_bench import allgather_floats as allgather_floats
from ep_jit.testing._collective_bench import kernel_times as kernel_times
from ep_jit.testing._collective_bench import per_call_kernel_us as per_call_kernel_us
from ep_jit.testing._collective_bench import start_line as start_line
from ep_jit.testing._collective_bench import time_steps as time_steps
from ep_jit.testing._launcher import RankFailedError as RankFailedError
from ep_jit.testing._launcher import RankInfo as RankInfo
from ep_jit.testing._launcher import run_from_env as run_from_env
from ep_jit.testing._launcher import run_ranks as run_ranks
from ep_jit.testing._peer_pattern import peer_pattern as peer_pattern
from ep_jit.testing._peer_pattern import peer_write_spec as peer_write_spec
from ep_jit.testing._placements import gpu_placements as gpu_placements
from ep_jit.testing._stream_ops import StreamOpRecorder as StreamOpRecorder
from ep_jit.testing._stream_ops import record_stream_ops as record_stream_ops

__all__ = [
    "L2_FLUSH_BYTES",
    "START_LINE_SLEEP_CYCLES",
    "BenchStats",
    "RankFailedError",
    "RankInfo",
    "RankTiming",
    "StreamOpRecorder",
    "allgather_floats",
    "bench",
    "capture_graph",
    "gpu_placements",
    "kernel_times",
    "peer_pattern",
    "peer_write_spec",
    "per_call_kernel_us",
    "record_stream_ops",
    "run_from_env",
    "run_ranks",
    "start_line",
    "time_steps",
]
