"""The copy-engine backend's protocol, on CPU: which copies and which flag writes and waits one
call enqueues (the driver calls are recorded instead of issued; the flag operations are read
back from the parameters handed to ``cuStreamBatchMemOp``, as the driver would see them)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cp_copyengine import copyengine
from cp_copyengine.copyengine import CopyEngineBackend
from cp_copyengine.plan import Item, Transfer
from ep_jit.testing import record_stream_ops

BASE = 1 << 40  # rank p's data region at BASE * (p + 1); its signal region 1 MiB further
SIG = 1 << 20


def _backend(rank: int, world: int, max_ops: int, log: list[Any]) -> CopyEngineBackend:
    be = object.__new__(CopyEngineBackend)
    be.world_size, be.rank, be.max_ops = world, rank, max_ops
    be.memory = SimpleNamespace(  # type: ignore[assignment]
        peer_ptrs=[BASE * (p + 1) for p in range(world)],
        signal_ptrs=[BASE * (p + 1) + SIG for p in range(world)],
    )
    be._end_words = 4 * max_ops * world
    be.batched = None
    be._build_tables()
    return be


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(
        copyengine,
        "memcpy_batch",
        lambda copies, stream, batched: calls.append(("copy", copies, stream)) or "x",
    )
    record_stream_ops(monkeypatch, calls)
    return calls


def test_all_gather_copies_to_every_rank_then_flags(log: list[Any]) -> None:
    world, rank = 3, 1
    be = _backend(rank, world, 4, log)
    a, b = torch.zeros(10, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
    items = (Item(a, 0, 10, inplace=True), Item(b, 32, 4))
    stream = object()  # handed through to every driver call
    be.transfer(Transfer("all_gather", session=1, slot=2, items=items), stream=stream)  # type: ignore[arg-type]
    (kind, copies, s1), (kind2, ops, s2) = log
    assert kind == "copy" and kind2 == "ops" and s1 is stream and s2 is stream
    want = []
    for p in (1, 2, 0):  # starting at this rank
        if p != rank:  # the in-place tensor's self copy is skipped
            want.append((BASE * (p + 1) + 0 + rank * 10, a.data_ptr(), 10))
        want.append((BASE * (p + 1) + 32 + rank * 4, b.data_ptr(), 4))
    assert copies == want
    # Flags with the peers only (r+1, r+2, ...): this rank's own copies are stream-ordered.
    peers = (2, 0)
    writes = [(o.kind, o.address, o.value) for o in ops[: world - 1]]
    assert writes == [("write", BASE * (p + 1) + SIG + 4 * (2 * world + rank), 1) for p in peers]
    waits = [(o.kind, o.address, o.value, o.cond) for o in ops[world - 1 :]]
    mine = BASE * (rank + 1) + SIG
    assert waits == [("wait", mine + 4 * (2 * world + p), 1, "geq") for p in peers]


def test_reduce_scatter_sends_shard_p_to_rank_p(log: list[Any]) -> None:
    world, rank = 2, 0
    be = _backend(rank, world, 2, log)
    t = torch.zeros(8, dtype=torch.float32)  # [R*n] with n = 4 floats = 16 bytes a shard
    be.transfer(Transfer("reduce_scatter", session=5, slot=0, items=(Item(t, 64, 16),)))
    # Session 5, first call: wait for every peer's end of session 4 before any copy.
    (k0, fence, _), (k1, copies, _), (k2, flags, _) = log
    assert k0 == "ops" and [(o.address, o.value) for o in fence] == [
        (BASE + SIG + 4 * 2 * world + 4 * 1, 4)
    ]
    assert k2 == "ops" and [(o.kind, o.address) for o in flags] == [
        ("write", 2 * BASE + SIG + 4 * 0),
        ("wait", BASE + SIG + 4 * 1),
    ]
    assert k1 == "copy" and copies == [
        (BASE + 64, t.data_ptr(), 16),
        (2 * BASE + 64, t.data_ptr() + 16, 16),
    ]


def test_end_session_writes_every_peer_word_and_zero_bytes_send_nothing(log: list[Any]) -> None:
    be = _backend(2, 4, 3, log)
    be.end_session(7)
    ((kind, ops, _),) = log
    assert kind == "ops"
    assert [(o.address, o.value) for o in ops] == [
        (BASE * (p + 1) + SIG + 4 * 3 * 4 + 4 * 2, 7) for p in (3, 0, 1)
    ]
    log.clear()
    be.transfer(Transfer("all_gather", 1, 0, (Item(torch.zeros(0), 0, 0),)))
    assert log[0] == ("copy", [], None)  # no copy, but the flags still go out
    assert len(log[1][1]) == 6  # 3 writes to the peers, 3 waits for them


def test_one_rank_has_no_flags_and_no_fence(log: list[Any]) -> None:
    be = _backend(0, 1, 2, log)
    t = torch.zeros(8, dtype=torch.uint8)
    be.transfer(Transfer("all_gather", session=3, slot=0, items=(Item(t, 0, 8),)))
    be.end_session(3)
    assert log == [("copy", [(BASE, t.data_ptr(), 8)], None)]


def test_calls_reuse_the_prepared_flags_with_each_sessions_number(
    log: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, rank = 3, 0
    be = _backend(rank, world, 2, log)
    built: list[Any] = []
    monkeypatch.setattr(copyengine, "MemOpBatch", lambda ops: built.append(ops))
    t = torch.zeros(4, dtype=torch.uint8)
    mine, peers = BASE + SIG, (1, 2)
    end = 4 * 2 * world
    for session in (1, 2, 3, 0x1_0000_0002):  # the words hold the number's low 32 bits
        epoch = session & 0xFFFFFFFF
        for slot in (0, 1):
            log.clear()
            be.transfer(Transfer("all_gather", session, slot, (Item(t, 0, 4),)))
            flags = log[-1][1]
            assert [(o.kind, o.address, o.value) for o in flags] == [
                ("write", BASE * (p + 1) + SIG + 4 * (slot * world + rank), epoch) for p in peers
            ] + [("wait", mine + 4 * (slot * world + p), epoch) for p in peers]
            if slot == 0 and session > 1:  # the fence: every peer ended the last session
                fence = log[0][1]
                assert [(o.kind, o.address, o.value) for o in fence] == [
                    ("wait", mine + end + 4 * p, (session - 1) & 0xFFFFFFFF) for p in peers
                ]
            else:
                assert [k for k, _, _ in log] == ["copy", "ops"]
        log.clear()
        be.end_session(session)
        assert [(o.kind, o.address, o.value) for o in log[0][1]] == [
            ("write", BASE * (p + 1) + SIG + end + 4 * rank, epoch) for p in peers
        ]
    assert built == []  # no call builds driver parameters
