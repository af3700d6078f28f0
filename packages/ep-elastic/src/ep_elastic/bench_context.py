"""Per-rank helpers of ``ep-bench`` shared by the high-throughput and low-latency cases.

:class:`RankContext` carries the rank's config, device and group; the functions compare results
bit for bit, merge mismatch reports over ranks, and turn a timing plus row counts into the
latency / bytes / GB/s record that ends up in the JSON and the table.

Byte counting (per rank, mean over ranks, divided by the max-over-ranks median time):

* ``logical``: payload rows x (data bytes + FP8 scale bytes). Received rows include the ones a
  rank sends to itself, as DeepEP's "logical bandwidth" does. This is what our targets use.
* ``deepep``: as DeepEP's test prints it: high-throughput dispatch adds the int64 top-k ids and
  float32 weights of every row (``12 k`` bytes), combine adds the float32 weights (``4 k``);
  low-latency FP8 dispatch adds 16 bytes per row.
* ``remote``: ``logical`` bytes of the rows that cross to another rank (NVLink traffic).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ep_elastic.bench_cases import BenchConfig, make_routing
from ep_elastic.bench_cases import seeded_generator as _gen
from ep_elastic.bench_timing import RepeatedTiming
from ep_jit.testing import RankInfo, RankTiming, allgather_floats

__all__ = [
    "RankContext",
    "agree",
    "cast_fp8",
    "check_equal",
    "destroy_buffer",
    "device_name",
    "make_buffer",
    "measure",
    "split_fp8",
]


class RankContext:
    """What every case of one rank needs: config, rank, device and process group.

    Args:
        info: From :func:`ep_jit.testing.run_ranks`.
        cfg: The run's resolved options.
    """

    def __init__(self, info: RankInfo, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.rank = info.rank
        self.num_ranks = info.world_size
        self.device = info.device
        self.group = info.group

    @property
    def is_cuda(self) -> bool:
        """Whether this rank runs on a GPU."""
        return self.device.type == "cuda"

    def gen(self, case_index: int, *parts: int) -> torch.Generator:
        """A generator on the rank's device for this case (and ``parts``, e.g. a replay)."""
        return _gen(self.device, self.cfg.seed, case_index, self.rank, *parts)

    def routing(self, num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(topk_idx [T, k] int64, topk_weights [T, k] float32)``."""
        cfg = self.cfg
        return make_routing(
            cfg.routing,
            num_tokens,
            cfg.num_experts,
            cfg.num_topk,
            num_ranks=self.num_ranks,
            gen=gen,
            device=self.device,
        )

    def log(self, message: str) -> None:
        """Prints a progress line to stderr on rank 0 only."""
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    @property
    def progress_log(self) -> Callable[[str], None] | None:
        """Where progress lines go: :meth:`log` on rank 0, ``None`` elsewhere."""
        return self.log if self.rank == 0 else None


def split_fp8(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(data, scales)`` of a dispatch input or output: a tensor, or an FP8 ``(data, sf)``."""
    if isinstance(x, tuple):
        return x[0], x[1]
    return x, None


def check_equal(a: torch.Tensor | None, b: torch.Tensor | None, rows: int | None = None) -> bool:
    """``torch.equal`` of the first ``rows`` rows (all when ``None``); FP8 compared as bytes.

    Shapes (past the row cut) and dtypes must match; ``None`` equals only ``None``.
    """
    if a is None or b is None:
        return a is None and b is None
    if rows is not None:
        if a.shape[0] < rows or b.shape[0] < rows:
            return False
        a, b = a[:rows], b[:rows]
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def agree(ctx: RankContext, local: list[str]) -> list[str]:
    """Every rank's mismatch names as ``"rank r: name"``, identical on all ranks (collective)."""
    gathered: list[Any] = [None] * ctx.num_ranks
    dist.all_gather_object(gathered, local, group=ctx.group)
    return [f"rank {r}: {name}" for r, names in enumerate(gathered) for name in names]


def measure(
    ctx: RankContext,
    timing: RankTiming | RepeatedTiming,
    row_bytes: Mapping[str, float],
    rows: tuple[int, int],
    kernel_us: float | None = None,
) -> dict[str, Any]:
    """Latency, bytes and GB/s of one measurement (collective: gathers the row counts).

    Args:
        ctx: The rank context.
        timing: Merged timing of the measurement (of its repeats, when repeated).
        row_bytes: Bytes per row for each count, with at least ``"logical"``.
        rows: ``(rows, remote_rows)`` this rank moves; ``rows`` includes its local rows.
        kernel_us: Device time of the call's own kernels (``bench_timing.kernel_times``), or
            ``None`` when not measured.

    Returns:
        ``{"latency_us", "rows", "remote_rows", "bytes", "gbps", "kernel_us", "kernel_gbps"}``;
        rows and bytes are per rank (mean over ranks), ``gbps`` divides them by the median
        latency, ``kernel_gbps`` by ``kernel_us`` (``None`` without it).
    """
    per_rank = allgather_floats(
        [float(rows[0]), float(rows[1])], device=ctx.device, group=ctx.group
    )
    mean_rows = sum(r[0] for r in per_rank) / len(per_rank)
    mean_remote = sum(r[1] for r in per_rank) / len(per_rank)
    seconds = timing.median_us * 1e-6
    counted = {name: mean_rows * b for name, b in row_bytes.items()}
    counted["remote"] = mean_remote * row_bytes["logical"]
    kernel_gbps = None
    if kernel_us is not None and kernel_us > 0:
        kernel_gbps = {k: b / (kernel_us * 1e-6) / 1e9 for k, b in counted.items()}
    return {
        "latency_us": timing.to_json(),
        "rows": mean_rows,
        "remote_rows": mean_remote,
        "bytes": counted,
        "gbps": {k: (b / seconds / 1e9 if seconds > 0 else 0.0) for k, b in counted.items()},
        "kernel_us": kernel_us,
        "kernel_gbps": kernel_gbps,
    }


def make_buffer(ctx: RankContext, dtype: str, backend: str) -> Any:
    """An :class:`~ep_elastic.ElasticBuffer` sized for every case of the run (collective)."""
    from ep_elastic import ElasticBuffer

    cfg = ctx.cfg
    return ElasticBuffer(
        ctx.group,
        num_max_tokens_per_rank=cfg.num_max_tokens_per_rank,
        hidden=cfg.hidden,
        num_topk=cfg.num_topk,
        use_fp8_dispatch=dtype == "fp8",
        backend=backend,
    )


def destroy_buffer(buf: Any) -> None:
    """Releases a buffer's resources when it has a ``destroy`` method (collective)."""
    destroy = getattr(buf, "destroy", None)
    if callable(destroy):
        destroy()


def cast_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ep_core.fp8.per_token_cast_to_fp8``: e4m3 ``[T, H]`` and float32 scales ``[T, H/128]``."""
    from ep_core.fp8 import per_token_cast_to_fp8

    return per_token_cast_to_fp8(x)


def device_name(device: torch.device) -> str:
    """Human-readable name of the rank's device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {platform.processor() or 'unknown'})"
