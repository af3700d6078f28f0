"""Rank workers shared by the CPU and GPU tests (top-level functions, so they pickle)."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

import torch

from ep_jit.testing import RankInfo
from pp_rdma import PipeBuffer, PipeError, PipeSizeMismatchError, PipeTimeoutError

DTYPES = (torch.uint8, torch.int16, torch.float32, torch.bfloat16, torch.int64)


def payload(gen: torch.Generator, nbytes: int, device: torch.device) -> torch.Tensor:
    """Random bytes of ``nbytes`` viewed as a dtype whose size divides it."""
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    fits = [d for d in DTYPES if nbytes % torch.empty((), dtype=d).element_size() == 0]
    dtype = fits[int(torch.randint(0, len(fits), (1,), generator=gen))]
    return raw.view(dtype).to(device)


def schedule(
    seed: int, world: int, num_sends: int, inflight: int, sizes: list[int]
) -> tuple[list[tuple[float, str, int, int, int]], list[int]]:
    """The same random program on every rank: ``(time, op, me, peer, msg)`` and message sizes.

    Random pairs and random times; per directed pair the k-th send is matched with the k-th recv
    (recv after send), and recv k happens before send k + inflight, so a rank that runs its ops in
    time order only ever waits for an op with an earlier time (no deadlock, back-pressure hit).
    """
    rng = random.Random(seed)
    sends: dict[tuple[int, int], list[tuple[float, int]]] = defaultdict(list)
    msg_sizes = []
    for m in range(num_sends):
        src = rng.randrange(world)
        dst = rng.choice([r for r in range(world) if r != src])
        sends[(src, dst)].append((rng.random(), m))
        msg_sizes.append(rng.choice(sizes))
    ops = []
    for (src, dst), items in sends.items():
        items.sort()
        recv_times: list[float] = []
        for k, (ts, m) in enumerate(items):
            lo = max(ts, recv_times[-1] if recv_times else 0.0)
            tr = lo + rng.random() * 0.05
            if k + inflight < len(items):
                tr = min(tr, (lo + items[k + inflight][0]) / 2)
            recv_times.append(tr)
            ops.append((ts, "send", src, dst, m))
            ops.append((tr, "recv", dst, src, m))
    ops.sort()
    return ops, msg_sizes


def stress_worker(
    info: RankInfo,
    backend: Any,
    seed: int,
    num_sends: int,
    max_bytes: int,
    inflight: int,
    span_s: float,
) -> dict[str, Any]:
    """Runs the random program bit-exact; returns counts and the backends used."""
    device = info.device
    sizes = [0, 1, 3, 64, 1000, max_bytes // 3, max_bytes - 1, max_bytes]
    ops, msg_sizes = schedule(seed, info.world_size, num_sends, inflight, sizes)
    gen = torch.Generator().manual_seed(seed)
    data = [payload(gen, n, device) for n in msg_sizes]  # every rank makes every payload
    outs = {
        m: torch.full_like(data[m], 0)
        for _, op, me, _, m in ops
        if op == "recv" and me == info.rank
    }
    buf = PipeBuffer(info.group, max_bytes, inflight, backend=backend, timeout_s=60, device=device)
    last = 0.0
    count = 0
    for t, op, me, peer, m in ops:
        if me != info.rank:
            continue
        if t > last:
            time.sleep((t - last) * span_s)
            last = t
        if op == "send":
            buf.send(data[m], peer)
        else:
            buf.recv(outs[m], peer)
        count += 1
    buf.synchronize()
    bad = [
        m
        for m, o in outs.items()
        if not torch.equal(o.view(torch.uint8), data[m].view(torch.uint8))
    ]
    routes = dict(buf.routes)
    buf.destroy()
    if bad:
        raise AssertionError(f"rank {info.rank}: messages {bad[:10]} differ")
    return {"ops": count, "routes": routes}


def backpressure_worker(info: RankInfo, backend: Any, inflight: int, hold_s: float) -> float:
    """Rank 0 sends inflight + 2 messages to rank 1, which starts receiving after ``hold_s``.

    Returns, on rank 0, how long the send past the limit was held.
    """
    return _backpressure(info, backend, inflight, hold_s)


def sizes_and_backpressure_worker(
    info: RankInfo, backend: Any, max_bytes: int, hold_s: float
) -> tuple[int, float]:
    """:func:`sizes_worker` then :func:`backpressure_worker` in one job."""
    return sizes_worker(info, backend, max_bytes), _backpressure(info, backend, 3, hold_s)


def _backpressure(info: RankInfo, backend: Any, inflight: int, hold_s: float) -> float:
    """Rank 0 sends inflight + 2 messages to rank 1, which starts receiving after ``hold_s``.

    Returns, on rank 0, how long the send past the limit was held.
    """
    device = info.device
    buf = PipeBuffer(info.group, 4096, inflight, backend=backend, timeout_s=60, device=device)
    msgs = [torch.full((1024,), i, dtype=torch.int32, device=device) for i in range(inflight + 2)]
    held = 0.0
    if info.rank == 0:
        start = time.monotonic()
        for t in msgs[:inflight]:
            buf.send(t, 1)
        free = time.monotonic() - start
        assert free < hold_s / 2, f"the first {inflight} sends took {free:.3f} s"
        start = time.monotonic()
        buf.send(msgs[inflight], 1)
        held = time.monotonic() - start
        buf.send(msgs[inflight + 1], 1)
    elif info.rank == 1:
        time.sleep(hold_s)
        for t in msgs:
            out = torch.empty_like(t)
            buf.recv(out, 0)
            assert torch.equal(out, t)
    buf.synchronize()
    buf.destroy()
    return held


def sizes_worker(info: RankInfo, backend: Any, max_bytes: int) -> int:
    """Every size from 0 and 1 byte to the maximum, both directions, several dtypes."""
    device = info.device
    sizes = [0, 1, 2, 3, 4, 7, 8, 255, 256, 257, 4095, 4096, max_bytes - 1, max_bytes]
    gen = torch.Generator().manual_seed(7)
    data = [payload(gen, n, device) for n in sizes]
    buf = PipeBuffer(info.group, max_bytes, 2, backend=backend, timeout_s=60, device=device)
    peer = 1 - info.rank
    checked = 0
    for first in (0, 1):
        for t in data:
            if info.rank == first:
                buf.send(t, peer)
            else:
                out = torch.full_like(t, 0)
                buf.recv(out, peer)
                assert torch.equal(out.view(torch.uint8), t.view(torch.uint8)), t.numel()
                checked += 1
    # A dtype/shape different from the sender's, the same bytes.
    if info.rank == 0:
        buf.send(torch.arange(16, dtype=torch.float32, device=device), 1)
    else:
        out = torch.empty((4, 8), dtype=torch.int16, device=device)
        buf.recv(out, 0)
        assert torch.equal(
            out.view(torch.float32).view(-1), torch.arange(16, dtype=torch.float32, device=device)
        )
    buf.destroy()
    return checked


def failure_worker(info: RankInfo, backend: Any, inflight: int, timeout_s: float) -> dict[str, Any]:
    """Size mismatch, a send blocked past the timeout, a recv that waits in vain.

    Each case has its own process group (a gloo wait that times out closes that group's
    connection between the two ranks).
    """
    import torch.distributed as dist

    device = info.device
    groups = [dist.new_group(backend="gloo") for _ in range(3)]
    seen: dict[str, Any] = {}
    # 1. Size mismatch: the receiver raises, and (where the transport can tell) the sender too.
    buf = PipeBuffer(groups[0], 64, inflight, backend=backend, timeout_s=timeout_s, device=device)
    if info.rank == 0:
        buf.send(torch.ones(16, dtype=torch.uint8, device=device), 1)
    else:
        out = torch.full((8,), 7, dtype=torch.uint8, device=device)
        try:
            buf.recv(out, 0)
        except PipeSizeMismatchError as exc:
            seen["mismatch"] = (exc.op, exc.peer, exc.seq, exc.sent_nbytes, exc.expected_nbytes)
            assert torch.all(out == 7), "a mismatched recv touched out"
    dist.barrier(info.group)
    # The sender hears of it at the latest in destroy, which still meets rank 1 (rank 1 would
    # otherwise wait in destroy's meeting until the group's timeout).
    try:
        buf.destroy()
        seen["sender_mismatch"] = None
    except PipeSizeMismatchError as exc:
        seen["sender_mismatch"] = (exc.op, exc.peer, exc.seq)
    # 2. Rank 1 stops receiving: rank 0's send past the limit times out; nothing overwritten.
    buf = PipeBuffer(groups[1], 64, inflight, backend=backend, timeout_s=timeout_s, device=device)
    msgs = [torch.full((16,), i + 1, dtype=torch.uint8, device=device) for i in range(inflight + 1)]
    if info.rank == 0:
        for t in msgs[:inflight]:
            buf.send(t, 1)
        start = time.monotonic()
        try:
            buf.send(msgs[inflight], 1)
        except PipeTimeoutError as exc:
            seen["send_timeout"] = (exc.op, exc.peer, exc.seq, time.monotonic() - start, str(exc))
        try:
            buf.send(msgs[0], 1)
        except RuntimeError as exc:
            seen["after_failure"] = str(exc)
    dist.barrier(info.group)
    if info.rank == 1 and backend != "torch":
        got = []
        for _ in range(inflight):
            out = torch.empty(16, dtype=torch.uint8, device=device)
            buf.recv(out, 0)
            got.append(int(out[0]))
        seen["received"] = got
    if backend == "torch" and info.rank == 1:
        # gloo closed the group's connection when rank 0's wait timed out.
        try:
            buf.destroy()
        except RuntimeError as exc:
            seen["destroy_after_peer_timeout"] = str(exc)[:200]
    else:
        buf.destroy()
    # 3. Rank 0 sends nothing: rank 1's recv times out.
    buf = PipeBuffer(groups[2], 64, inflight, backend=backend, timeout_s=timeout_s, device=device)
    if info.rank == 1:
        start = time.monotonic()
        try:
            buf.recv(torch.empty(16, dtype=torch.uint8, device=device), 0)
        except PipeTimeoutError as exc:
            seen["recv_timeout"] = (exc.op, exc.peer, exc.seq, time.monotonic() - start, str(exc))
    dist.barrier(info.group)
    if backend == "torch" and info.rank == 0:
        try:
            buf.destroy()
        except RuntimeError as exc:
            seen["destroy_after_peer_timeout"] = str(exc)[:200]
    else:
        buf.destroy()
    return seen


def dead_peer_worker(info: RankInfo, backend: Any, timeout_s: float) -> Any:
    """Rank 1 exchanges one message and leaves; rank 0's next recv from it raises in time."""
    device = info.device
    buf = PipeBuffer(info.group, 64, 2, backend=backend, timeout_s=timeout_s, device=device)
    t = torch.arange(8, dtype=torch.int64, device=device)
    if info.rank == 1:
        buf.send(t, 0)
        buf.recv(torch.empty_like(t), 0)  # rank 0 has the message (gloo sends need a receiver)
        return None  # leaves without destroy: the process exits
    out = torch.empty_like(t)
    buf.recv(out, 1)
    assert torch.equal(out, t)
    buf.send(t, 1)
    time.sleep(1.0)
    start = time.monotonic()
    try:
        buf.recv(out, 1)
    except PipeError as exc:
        result = (type(exc).__name__, exc.op, exc.peer, exc.seq, time.monotonic() - start)
    else:
        raise AssertionError("recv from a departed peer returned")
    buf.destroy(collective=False)
    return result


def _error_name(fn: Any) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return type(exc).__name__
    return "no error"


def validation_worker(info: RankInfo) -> dict[str, str]:
    """Bad constructor arguments raise on every rank; bad call arguments raise locally."""
    g = info.group
    out = {
        "max_bytes": _error_name(lambda: PipeBuffer(g, 0, backend="torch")),
        "inflight": _error_name(lambda: PipeBuffer(g, 64, 0, backend="torch")),
        "disagree": _error_name(lambda: PipeBuffer(g, 64, 1 + info.rank, backend="torch")),
        "backend": _error_name(lambda: PipeBuffer(g, 64, backend="smoke_signals")),
    }
    # Arguments bad on one rank only: every rank raises (none is left in a collective).
    out["timeout_one_rank"] = _error_name(
        lambda: PipeBuffer(g, 64, backend="torch", timeout_s="soon" if info.rank == 0 else 5.0)
    )
    out["timeout_inf"] = _error_name(
        lambda: PipeBuffer(g, 64, backend="torch", timeout_s=float("inf"))
    )
    out["backend_type"] = _error_name(
        lambda: PipeBuffer(g, 64, backend=3 if info.rank == 1 else "torch")  # type: ignore[arg-type]
    )
    buf = PipeBuffer(g, 64, backend="torch")
    t = torch.zeros(4, dtype=torch.int32)
    out["self"] = _error_name(lambda: buf.send(t, info.rank))
    out["big"] = _error_name(lambda: buf.send(torch.zeros(65, dtype=torch.uint8), 1 - info.rank))
    out["strided"] = _error_name(lambda: buf.send(torch.zeros(4, 4)[:, 0], 1 - info.rank))
    out["device"] = _error_name(lambda: buf.recv(torch.zeros(4, device="meta"), 1 - info.rank))
    buf.destroy()
    return out


def lonely_recv_worker(info: RankInfo) -> None:
    """Rank 0 waits for a message nobody sends (the test expects the timeout to surface)."""
    buf = PipeBuffer(info.group, 64, backend="torch", timeout_s=1.0)
    if info.rank == 0:
        buf.recv(torch.empty(4), 1)
    else:
        time.sleep(3.0)
    buf.destroy()


def graph_replay_worker(info: RankInfo, replays: int, nbytes: int) -> int:
    """Rank 0 captures send + recv, rank 1 captures recv + echo; both replay ``replays`` times.

    Between capture and replays, eager messages of another size go through the captured slots:
    they set other sizes into the prepared flag operations the capture used, which must leave
    the captured graph waiting for its own size.
    """
    device = info.device
    buf = PipeBuffer(info.group, nbytes, 2, backend="copy_engine", timeout_s=30, device=device)
    x = torch.zeros(nbytes // 4, dtype=torch.int32, device=device)
    y = torch.full_like(x, -1)
    # Every kernel this rank will run comes before the first pending wait (lazy module loading).
    assert torch.equal(x, x)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        if info.rank == 0:
            buf.send(x, 1)
            buf.recv(y, 1)
        else:
            buf.recv(x, 0)
            buf.send(x, 0)
    half = x.numel() // 2
    for i in range(2):  # the slots after the captured one, then the captured one
        if info.rank == 0:
            a = torch.full((half,), 7 + i, dtype=torch.int32, device=device)
            b = torch.full_like(a, -1)
            buf.send(a, 1)
            buf.recv(b, 1)
            buf.synchronize()
            assert torch.equal(a, b), f"eager echo {i}: {b[:4].tolist()}"
        else:
            c = torch.empty(half, dtype=torch.int32, device=device)
            buf.recv(c, 0)
            buf.send(c, 0)
            buf.synchronize()
    checked = 0
    for i in range(replays):
        if info.rank == 0:
            x.copy_(torch.arange(i, i + x.numel(), dtype=torch.int32).to(device))
        graph.replay()
        buf.synchronize()
        if info.rank == 0:
            expect = torch.arange(i, i + x.numel(), dtype=torch.int32, device=device)
            assert torch.equal(y, expect), f"replay {i}: {y[:4].tolist()}"
            y.fill_(-1)
            checked += 1
    # Eager calls after the replays still pair up.
    if info.rank == 0:
        buf.send(x, 1)
    else:
        buf.recv(y, 0)
    buf.synchronize()
    buf.destroy()
    return checked


def no_kernel_worker(info: RankInfo, nbytes: int, count: int) -> list[str]:
    """Profiles ``count`` transfers each way; returns the names of CUDA kernels that ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = info.device
    buf = PipeBuffer(info.group, nbytes, 2, backend="copy_engine", timeout_s=30, device=device)
    ins = [torch.full((nbytes,), i, dtype=torch.uint8, device=device) for i in range(count)]
    outs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
    peer = 1 - info.rank
    buf.send(ins[0], peer)  # one round before profiling (first-use costs)
    buf.recv(outs[0], peer)
    buf.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for t, o in zip(ins, outs, strict=True):
            buf.send(t, peer)
            buf.recv(o, peer)
        buf.synchronize()
    for i, o in enumerate(outs):
        assert torch.all(o == i), i
    buf.destroy()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = [n for n in names if n.startswith("Memcpy")]
    assert copies, f"the profiler saw no copy at all: {names[:20]}"
    return [n for n in names if not n.startswith(("Memcpy", "Memset"))]


def copy_engine_timeout_worker(info: RankInfo, inflight: int, timeout_s: float) -> Any:
    """Rank 1 stops receiving; rank 0's synchronize names it; then rank 1 drains everything."""
    import torch.distributed as dist

    device = info.device
    buf = PipeBuffer(
        info.group, 256, inflight, backend="copy_engine", timeout_s=timeout_s, device=device
    )
    msgs = [torch.full((64,), i + 1, dtype=torch.int32, device=device) for i in range(inflight + 1)]
    outs = [torch.empty(64, dtype=torch.int32, device=device) for _ in msgs]
    assert torch.equal(msgs[0], msgs[0])
    result: Any = None
    if info.rank == 0:
        for t in msgs:
            buf.send(t, 1)  # the last one waits on the stream for a credit
        start = time.monotonic()
        try:
            buf.synchronize()
        except PipeTimeoutError as exc:
            result = (exc.op, exc.peer, exc.seq, time.monotonic() - start, str(exc))
    dist.barrier(info.group)
    if info.rank == 1:
        for o in outs:
            buf.recv(o, 0)
        buf.synchronize()
        result = [int(o[0]) for o in outs]
    buf.destroy()  # rank 0's stream drains once rank 1 received
    return result
