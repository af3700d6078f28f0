"""Helpers for tests and benchmarks of every package: a multi-process launcher and timers.

``run_ranks`` spawns ranks on one host (gloo on CPU, NCCL on GPUs); ``run_from_env`` runs one
rank started by torchrun; ``bench`` times a callable with CUDA events (or perf_counter on CPU).
"""

from __future__ import annotations

from ep_jit.testing._bench import L2_FLUSH_BYTES as L2_FLUSH_BYTES
from ep_jit.testing._bench import BenchStats as BenchStats
from ep_jit.testing._bench import bench as bench
from ep_jit.testing._launcher import RankFailedError as RankFailedError
from ep_jit.testing._launcher import RankInfo as RankInfo
from ep_jit.testing._launcher import run_from_env as run_from_env
from ep_jit.testing._launcher import run_ranks as run_ranks
from ep_jit.testing._placements import gpu_placements as gpu_placements

__all__ = [
    "L2_FLUSH_BYTES",
    "BenchStats",
    "RankFailedError",
    "RankInfo",
    "bench",
    "gpu_placements",
    "run_from_env",
    "run_ranks",
]
