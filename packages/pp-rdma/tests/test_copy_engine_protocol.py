"""The copy-engine pipe's protocol, on CPU: which flag operations and copies a send and a recv
enqueue (the driver calls are recorded instead of issued; batched operations are read back from
the parameters handed to ``cuStreamBatchMemOp``, as the driver would see them)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ep_jit.streamops import MemOp
from ep_jit.testing import record_stream_ops
from pp_rdma import copy_engine
from pp_rdma.copy_engine import CopyEnginePipe

BASE = 1 << 40  # rank p's data region at BASE * (p + 1); its signal region 1 MiB further
SIG = 1 << 20
SLOT = 256


def _entry(ops: list[MemOp], stream: Any) -> tuple[str, list[tuple[str, int, int]]]:
    """``("ops", [(kind, address, value)])`` of the 64-bit operations (equality waits)."""
    out = []
    for op in ops:
        assert op.width == 64 and (op.kind == "write" or op.cond == "eq"), op
        out.append(("write" if op.kind == "write" else "wait_eq", op.address, op.value))
    return ("ops", out)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    record_stream_ops(monkeypatch, calls, _entry)
    monkeypatch.setattr(
        copy_engine, "memcpy_batch", lambda copies: calls.append(("copy", list(copies)))
    )
    monkeypatch.setattr(CopyEnginePipe, "_track", lambda self, *args: None)
    return calls


def _pipe(rank: int, world: int, inflight: int) -> CopyEnginePipe:
    """A pipe over made-up addresses, as the constructor lays them out (no GPU)."""
    pipe = object.__new__(CopyEnginePipe)
    pipe.config = SimpleNamespace(  # type: ignore[assignment]
        rank=rank, world_size=world, num_max_inflight=inflight
    )
    pipe._slot = SLOT
    pipe._mem = SimpleNamespace(  # type: ignore[assignment]
        peer_ptrs=[BASE * (p + 1) for p in range(world)],
        signal_ptrs=[BASE * (p + 1) + SIG for p in range(world)],
    )
    slots = world * inflight
    pipe._words = 8 * slots
    pipe._send_ops = [None] * slots
    pipe._recv_ops = [None] * slots
    return pipe


def test_send_and_recv_flags_per_peer_and_slot_with_each_calls_size(
    log: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, inflight, me, peer = 3, 2, 1, 2
    pipe = _pipe(me, world, inflight)
    built: list[Any] = []
    real = copy_engine.MemOpBatch
    monkeypatch.setattr(copy_engine, "MemOpBatch", lambda ops: built.append(ops) or real(ops))
    sig = [BASE * (p + 1) + SIG for p in range(world)]
    used_off = 8 * world * inflight
    sizes = [16, 4, 0, 16, 8]  # the slot alternates: k = 0, 1, 0, 1, 0
    for seq, n in enumerate(sizes, start=1):
        k = (seq - 1) % inflight
        t = torch.zeros(n, dtype=torch.uint8)
        log.clear()
        pipe.send(t, peer, seq)
        used = sig[me] + used_off + 8 * (peer * inflight + k)
        full_there = sig[peer] + 8 * (me * inflight + k)
        want: list[Any] = [("ops", [("wait_eq", used, 0), ("write", used, 1)])]
        if n:
            dst = BASE * (peer + 1) + (me * inflight + k) * SLOT
            want.append(("copy", [(dst, t.data_ptr(), n)]))
        want.append(("ops", [("write", full_there, n + 1)]))
        assert log == want, seq

        log.clear()
        pipe.recv(t, peer, seq)
        full = sig[me] + 8 * (peer * inflight + k)
        used_there = sig[peer] + used_off + 8 * (me * inflight + k)
        want = [("ops", [("wait_eq", full, n + 1), ("write", full, 0)])]
        if n:
            src = BASE * (me + 1) + (peer * inflight + k) * SLOT
            want.append(("copy", [(t.data_ptr(), src, n)]))
        want.append(("ops", [("write", used_there, 0)]))
        assert log == want, seq
    # One prepared batch per (direction, peer, slot): later calls only set the size.
    assert len(built) == 2 * inflight
