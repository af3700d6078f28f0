"""Byte rows and the all-to-all collectives that move them (reference backends).

A reference backend packs everything one item carries (a token's data, scales, ids, weights and
source index) into one ``uint8`` row, so a single ``all_to_all_single`` moves it whatever the
dtypes: gloo has no float8 or int16 collectives, and bytes work the same on NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_jit.errors import HostTimeoutError

__all__ = [
    "RowField",
    "all_to_all_fixed",
    "all_to_all_uneven",
    "collective_timeout",
    "pack_rows",
    "unpack_rows",
]

_deadline = threading.local()


@contextlib.contextmanager
def collective_timeout(seconds: float | None) -> Iterator[None]:
    """Bounds the host wait of every all-to-all of this module inside the block (this thread).

    Where the collective blocks the host (gloo; CPU tensors), it is issued asynchronously and
    waited for at most ``seconds``; past that :class:`~ep_jit.errors.HostTimeoutError` names the
    collective, instead of a peer that never arrives leaving this rank waiting for gloo's own
    limit (30 minutes by default). The group is not usable after such a timeout. ``None`` or
    ``<= 0``: no limit of ours. NCCL collectives on CUDA tensors stay stream-ordered (no wait).
    """
    previous = getattr(_deadline, "seconds", None)
    _deadline.seconds = seconds
    try:
        yield
    finally:
        _deadline.seconds = previous


def _all_to_all(
    recv: torch.Tensor,
    send: torch.Tensor,
    group: dist.ProcessGroup,
    recv_counts: list[int] | None,
    send_counts: list[int] | None,
    what: str,
) -> None:
    seconds = getattr(_deadline, "seconds", None)
    host_blocking = send.device.type == "cpu" or str(dist.get_backend(group)) == "gloo"
    if not seconds or seconds <= 0 or not host_blocking:
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
        return
    work = dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group, async_op=True)
    assert work is not None
    try:
        work.wait(timeout=datetime.timedelta(seconds=seconds))
    except RuntimeError as exc:
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise HostTimeoutError(f"{what} (a peer did not join the collective)", seconds) from exc


@dataclass(frozen=True)
class RowField:
    """One field of a packed row: ``cols`` elements of ``dtype`` per row."""

    name: str
    dtype: torch.dtype
    cols: int

    @property
    def nbytes(self) -> int:
        return self.cols * torch.empty((), dtype=self.dtype).element_size()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    cols = 1
    for size in t.shape[1:]:
        cols *= size
    flat = t.reshape(t.shape[0], cols)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.contiguous().view(torch.uint8)


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenates the bytes of each part row by row.

    Args:
        parts: Tensors with the same first dimension ``N`` on one device.

    Returns:
        ``[N, B]`` uint8, ``B`` the sum of the parts' bytes per row.
    """
    return torch.cat([_as_bytes(p) for p in parts], dim=1)


def unpack_rows(rows: torch.Tensor, fields: Sequence[RowField]) -> dict[str, torch.Tensor]:
    """Splits ``[N, B]`` uint8 rows into one contiguous ``[N, cols]`` tensor per field."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for f in fields:
        # A fresh buffer: a one-row slice counts as contiguous yet keeps the parent's row stride,
        # which a dtype view would reject.
        chunk = rows.new_empty((rows.shape[0], f.nbytes))
        chunk.copy_(rows[:, offset : offset + f.nbytes])
        out[f.name] = chunk.view(f.dtype)
        offset += f.nbytes
    if offset != rows.shape[1]:
        raise RuntimeError(f"row layout mismatch: fields cover {offset} of {rows.shape[1]} bytes")
    return out


def all_to_all_fixed(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Equal-split all-to-all: block ``d`` of ``send`` goes to rank ``d``.

    Needs no host-side counts, so it never syncs. Runs on the current stream. Bounded by
    :func:`collective_timeout` where it blocks the host.

    Args:
        send: ``[R * C, ...]`` contiguous.
        group: The process group of ``R`` ranks.

    Returns:
        ``[R * C, ...]``; block ``s`` came from rank ``s``.
    """
    recv = torch.empty_like(send)
    _all_to_all(recv, send.contiguous(), group, None, None, "an equal-split all-to-all")
    return recv


def all_to_all_uneven(
    send: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """All-to-all with row counts known on the host.

    Args:
        send: ``[sum(send_counts), ...]`` contiguous, rows for rank 0 first.
        send_counts: Rows sent to each rank.
        recv_counts: Rows received from each rank.
        group: The process group.

    Returns:
        ``[sum(recv_counts), ...]``, rows from rank 0 first.
    """
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    _all_to_all(recv, send.contiguous(), group, recv_counts, send_counts, "an all-to-all of rows")
    return recv
