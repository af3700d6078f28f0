"""Multi-process launcher shared by every package's tests and benchmarks.

``run_ranks(world_size, fn, *args)`` spawns one process per rank, joins them into one
``torch.distributed`` group and calls ``fn(info, *args)`` in each. ``run_from_env(fn, *args)`` does
the same for one process started by torchrun (several nodes, or several simulated nodes).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import importlib
import importlib.util
import logging
import os
import pickle
import queue as queue_mod
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ep_jit import knobs

__all__ = ["RankFailedError", "RankInfo", "run_from_env", "run_ranks"]

T = TypeVar("T")
_TCPStore = dist.TCPStore  # type: ignore[attr-defined, unused-ignore]
_KILL_GRACE_S = 5.0
# How long the parent waits for stuck ranks to write their Python stacks after it signals them.
_STACK_WAIT_S = 2.0
# A rank that cannot join the process group (a gloo mesh connection lost on a loaded host) makes
# the whole job start again, once; nothing of the worker has run by then.
_SETUP_ATTEMPTS = 2
logger = logging.getLogger("ep_jit.testing")
_PYTEST_OUTCOMES = {"pytest.Skipped": "skip", "pytest.XFailed": "xfail", "pytest.Failed": "fail"}


@dataclass(frozen=True)
class RankInfo:
    """Where the current process sits in the job; passed as the first argument of workers.

    Attributes:
        rank: Global rank in ``[0, world_size)``.
        world_size: Number of ranks.
        local_rank: Rank within this node (the CUDA device index when GPUs are used).
        local_world_size: Ranks per node.
        node_rank: Index of this node (``rank // local_world_size`` for ``run_ranks``).
        num_nodes: Number of nodes.
        device: ``cuda:<local_rank // ranks_per_gpu>`` when GPUs are used, else ``cpu``.
        backend: The ``torch.distributed`` backend string the group was created with.
        group: The default (world) process group.
        ranks_per_gpu: Ranks sharing each GPU (1: a GPU per rank; > 1: a gloo group).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    device: torch.device
    backend: str
    group: dist.ProcessGroup
    ranks_per_gpu: int = 1


class RankFailedError(RuntimeError):
    """A rank raised; carries the child's traceback text.

    Attributes:
        rank: The rank that failed first.
        exc_type: Qualified name of the exception type raised in the child.
        traceback_text: The formatted traceback from the child.
        original: The child's exception object when it could be pickled, else ``None``.
    """

    def __init__(
        self, rank: int, exc_type: str, traceback_text: str, original: BaseException | None
    ) -> None:
        super().__init__(f"rank {rank} failed with {exc_type}:\n{traceback_text}")
        self.rank = rank
        self.exc_type = exc_type
        self.traceback_text = traceback_text
        self.original = original


@dataclass(frozen=True)
class _FnRef:
    """Names a top-level function so a spawned child can import it even outside ``sys.path``."""

    module: str
    qualname: str
    file: str | None

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> _FnRef:
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", "")
        if module is None or "<locals>" in qualname or "<lambda>" in qualname:
            raise TypeError(f"worker {fn!r} must be a top-level function so it can be pickled")
        mod = sys.modules.get(module)
        file = getattr(mod, "__file__", None) if module not in ("__main__", "__mp_main__") else None
        return cls(module, qualname, file)

    def _same_file(self, mod: object) -> bool:
        found = getattr(mod, "__file__", None)
        if self.file is None or found is None:
            return True
        return bool(os.path.realpath(str(found)) == os.path.realpath(self.file))

    def resolve(self) -> Callable[..., Any]:
        try:
            mod = importlib.import_module(self.module)
            if not self._same_file(mod):
                raise ImportError(f"{self.module} resolves to another file")
        except ImportError:
            # pytest --import-mode=importlib names test modules after a path that may not be
            # importable from sys.path (or importable as a different file); load the file
            # under the same name instead.
            if self.file is None:
                raise
            spec = importlib.util.spec_from_file_location(self.module, self.file)
            if spec is None or spec.loader is None:
                raise
            mod = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = mod
            spec.loader.exec_module(mod)
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj  # type: ignore[no-any-return]


def _auto_backend(use_gpu: bool) -> str:
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def _make_info(
    rank: int,
    world: int,
    local_rank: int,
    local_world: int,
    node: int,
    use_gpu: bool,
    backend: str,
    ranks_per_gpu: int = 1,
) -> RankInfo:
    gpu = local_rank // ranks_per_gpu
    device = torch.device("cuda", gpu) if use_gpu else torch.device("cpu")
    group = dist.group.WORLD
    assert group is not None  # init_process_group has run
    return RankInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node,
        num_nodes=max(1, world // max(local_world, 1)),
        device=device,
        backend=backend,
        group=group,
        ranks_per_gpu=ranks_per_gpu,
    )


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    use_gpu: bool,
    timeout_s: float,
    fn_ref: _FnRef,
    args_blob: bytes,
    results: Any,  # a multiprocessing queue
    ranks_per_gpu: int = 1,
    stacks_dir: str = "",
) -> None:
    if stacks_dir and hasattr(signal, "SIGUSR1"):
        # On SIGUSR1 (sent by the parent when the job runs past its timeout) write every
        # thread's Python stack, even while the rank is blocked inside a C call.
        stack_file = open(os.path.join(stacks_dir, f"rank{rank}.txt"), "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        fn = fn_ref.resolve()
        args = pickle.loads(args_blob)
        if use_gpu:
            torch.cuda.set_device(rank // ranks_per_gpu)
        else:
            # Ranks share the host's cores; avoid N x cores intra-op threads.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = _TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
            init_kwargs: dict[str, Any] = {"store": store, "rank": rank, "world_size": world_size}
            if use_gpu and "nccl" in backend:
                init_kwargs["device_id"] = torch.device("cuda", rank // ranks_per_gpu)
            dist.init_process_group(backend, timeout=timeout, **init_kwargs)
        except Exception as exc:
            # Before the worker ran: the parent may start the whole job again.
            results.put((rank, "setup", type(exc).__qualname__, traceback.format_exc(), None))
            return
        try:
            info = _make_info(
                rank, world_size, rank, world_size, 0, use_gpu, backend, ranks_per_gpu
            )
            returned = pickle.dumps(fn(info, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # report everything, including pytest.skip and SystemExit
        text = traceback.format_exc()
        try:
            blob: bytes | None = pickle.dumps(exc)
        except Exception:
            blob = None
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        if _is_pytest_outcome(exc):
            # pytest's outcomes do not pickle; the parent re-raises them by name and message.
            kind, blob = f"pytest.{type(exc).__name__}", str(getattr(exc, "msg", "")).encode()
        results.put((rank, "error", kind, text, blob))
        return
    results.put((rank, "ok", "", "", returned))


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _is_pytest_outcome(exc: BaseException) -> bool:
    # pytest's Skipped claims module "builtins"; its base OutcomeException does not.
    return any(
        c.__name__ == "OutcomeException" and c.__module__.startswith("_pytest")
        for c in type(exc).__mro__
    )


def _raise_failure(rank: int, kind: str, text: str, blob: bytes | None) -> None:
    if kind in _PYTEST_OUTCOMES and blob is not None:
        # skip / xfail / fail inside a rank keep their meaning in the parent.
        import pytest

        getattr(pytest, _PYTEST_OUTCOMES[kind])(blob.decode())
    original: BaseException | None = None
    if blob is not None:
        with contextlib.suppress(Exception):
            original = pickle.loads(blob)
    raise RankFailedError(rank, kind, text, original)


def run_ranks(
    world_size: int,
    fn: Callable[..., object],
    *args: object,
    timeout_s: float = 300.0,
    backend: str | None = None,
    use_gpu: bool | None = None,
    ranks_per_gpu: int = 1,
) -> list[Any]:
    """Runs ``fn(info, *args)`` in ``world_size`` spawned processes joined in one process group.

    Each child creates the default process group (rendezvous through a ``TCPStore`` the parent
    hosts on a free port of 127.0.0.1), sets ``cuda:<rank>`` as its device when GPUs are used,
    calls ``fn`` and destroys the group in a ``finally``. On CPU each child limits torch to
    ``cpu_count // world_size`` threads, and logging records are prefixed with the rank when
    the worker configured none. Blocks until every rank returns.

    Args:
        world_size: Number of ranks (>= 1).
        fn: A top-level function ``fn(info: RankInfo, *args)``; under pytest it may live in the
            test file itself.
        *args: Picklable arguments passed to every rank (tensors are copied).
        timeout_s: Wall-clock limit for the whole run, also the process group timeout.
        backend: ``torch.distributed`` backend; ``None`` picks ``"cpu:gloo,cuda:nccl"`` with GPUs
            and ``"gloo"`` without.
        use_gpu: Give rank ``r`` the device ``cuda:r``; ``None`` means "when CUDA is available
            and has at least ``world_size`` devices".
        ranks_per_gpu: Ranks sharing each GPU: rank ``r`` gets ``cuda:<r // ranks_per_gpu>``
            and the group defaults to gloo (NCCL refuses two ranks on one GPU). With
            ``ranks_per_gpu=world_size`` every rank runs on ``cuda:0``: multi-rank GPU code
            tested on one GPU (correctness only: the ranks' contexts time-slice the GPU).

    Returns:
        What ``fn`` returned on each rank (picklable values), indexed by rank.

    Raises:
        ValueError: ``world_size`` < 1, or ``use_gpu`` with fewer devices than ranks.
        TypeError: ``fn`` is not a top-level function.
        RankFailedError: A rank raised or died; the first failure, with the child's traceback.
        TimeoutError: Not every rank finished within ``timeout_s``; names the stuck ranks.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    fn_ref = _FnRef.of(fn)
    if not isinstance(ranks_per_gpu, int) or ranks_per_gpu < 1:
        raise ValueError(f"ranks_per_gpu must be a positive int, got {ranks_per_gpu!r}")
    gpus = -(-world_size // ranks_per_gpu)
    if ranks_per_gpu > 1 and use_gpu is False:
        raise ValueError("ranks_per_gpu > 1 places ranks on GPUs; it needs use_gpu")
    if use_gpu is None:
        use_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= gpus
    elif use_gpu and torch.cuda.device_count() < gpus:
        raise ValueError(
            f"use_gpu=True needs {gpus} CUDA devices, found {torch.cuda.device_count()}"
        )
    if ranks_per_gpu > 1 and not use_gpu:
        raise ValueError(f"ranks_per_gpu={ranks_per_gpu} needs {gpus} CUDA devices")
    backend = backend or ("gloo" if ranks_per_gpu > 1 else _auto_backend(use_gpu))
    args_blob = pickle.dumps(args)

    for attempt in range(_SETUP_ATTEMPTS):
        try:
            return _run_once(
                world_size, fn_ref, args_blob, timeout_s, backend, use_gpu, ranks_per_gpu
            )
        except _SetupFailed as failed:
            if attempt + 1 == _SETUP_ATTEMPTS:
                raise RankFailedError(failed.rank, failed.kind, failed.text, None) from None
            logger.warning(
                "run_ranks(%s): rank %d could not join the process group (%s); starting the "
                "job again",
                fn_ref.qualname,
                failed.rank,
                failed.kind,
            )
    raise AssertionError("unreachable")


class _SetupFailed(Exception):
    """A rank failed to join the process group, before the worker ran (safe to retry)."""

    def __init__(self, rank: int, kind: str, text: str) -> None:
        super().__init__(text)
        self.rank, self.kind, self.text = rank, kind, text


def _run_once(
    world_size: int,
    fn_ref: _FnRef,
    args_blob: bytes,
    timeout_s: float,
    backend: str,
    use_gpu: bool,
    ranks_per_gpu: int,
) -> list[Any]:
    """One spawn of the job (see :func:`run_ranks`); raises :class:`_SetupFailed` when a rank
    could not join the process group."""
    ctx = mp.get_context("spawn")
    store = _TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    stacks_dir = tempfile.mkdtemp(prefix="ep_jit_stacks_")
    procs = [
        ctx.Process(
            target=_child_main,
            args=(
                r,
                world_size,
                store.port,
                backend,
                use_gpu,
                timeout_s,
                fn_ref,
                args_blob,
                results,
                ranks_per_gpu,
                stacks_dir,
            ),
            name=f"ep_jit-rank{r}",
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    done: set[int] = set()
    returned: list[Any] = [None] * world_size
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < world_size:
            try:
                rank, status, kind, text, blob = results.get(timeout=0.05)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and not p.is_alive()]
                if dead:
                    # Let a message the dead rank sent just before exiting arrive first.
                    with contextlib.suppress(queue_mod.Empty):
                        rank, status, kind, text, blob = results.get(timeout=1.0)
                        if status == "setup":
                            raise _SetupFailed(rank, kind, text) from None
                        if status == "error":
                            _raise_failure(rank, kind, text, blob)
                        returned[rank] = pickle.loads(blob) if blob is not None else None
                        done.add(rank)
                        continue
                    r = dead[0]
                    raise RankFailedError(
                        r, "ProcessExit", f"rank {r} exited with code {procs[r].exitcode}", None
                    ) from None
                if time.monotonic() > deadline:
                    stuck = sorted(set(range(world_size)) - done)
                    raise TimeoutError(
                        f"run_ranks({fn_ref.qualname}): ranks {stuck} of {world_size} did not "
                        f"finish within {timeout_s:g} s (finished: {sorted(done)})"
                        + _stuck_stacks([(r, procs[r]) for r in stuck], stacks_dir)
                    ) from None
                continue
            if status == "setup":
                raise _SetupFailed(rank, kind, text)
            if status == "error":
                _raise_failure(rank, kind, text, blob)
            returned[rank] = pickle.loads(blob) if blob is not None else None
            done.add(rank)
        for p in procs:
            p.join(_KILL_GRACE_S)
    finally:
        _stop(procs)
        results.close()
        del store
        shutil.rmtree(stacks_dir, ignore_errors=True)
    return returned


def _stuck_stacks(stuck: list[tuple[int, Any]], stacks_dir: str) -> str:
    """The Python stacks of the stuck ranks (asked for with SIGUSR1), for the timeout message."""
    if not hasattr(signal, "SIGUSR1"):
        return ""
    asked = []
    for rank, proc in stuck:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGUSR1)
                asked.append(rank)
    paths = {rank: os.path.join(stacks_dir, f"rank{rank}.txt") for rank in asked}

    def sizes() -> dict[int, int]:
        return {r: os.path.getsize(p) if os.path.exists(p) else 0 for r, p in paths.items()}

    # Wait until every asked rank has written something and nothing grew for one poll.
    last: dict[int, int] = {}
    deadline = time.monotonic() + _STACK_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = sizes()
        if all(now.values()) and now == last:
            break
        last = now
    texts: dict[int, str] = {}
    for rank, path in paths.items():
        with contextlib.suppress(OSError):
            with open(path) as f:
                text = f.read().strip()
            if text:
                texts[rank] = text
    if not texts:
        return ""
    parts = [f"\n--- Python stacks of rank {r} ---\n{t}" for r, t in sorted(texts.items())]
    return "\n" + "".join(parts)


def run_from_env(fn: Callable[..., T], *args: object, backend: str | None = None) -> T:
    r"""Runs ``fn(info, *args)`` in a process started by torchrun; returns what ``fn`` returns.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` (see :func:`ep_jit.knobs.torchrun_env`), creates the
    default group with ``init_method="env://"`` (GPU ``cuda:<LOCAL_RANK>`` when CUDA has enough
    devices) and destroys it afterwards. Two simulated nodes on one host::

        torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 \\
            --master-addr 127.0.0.1 --master-port 29531 my_test.py &
        torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 \\
            --master-addr 127.0.0.1 --master-port 29531 my_test.py

    Raises:
        ValueError: The torchrun variables are absent or malformed.
    """
    env = knobs.torchrun_env()
    if env is None:
        raise ValueError("run_from_env needs RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun)")
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() > env.local_rank
    backend = backend or _auto_backend(use_gpu)
    init_kwargs: dict[str, Any] = {}
    if use_gpu:
        torch.cuda.set_device(env.local_rank)
        init_kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(
        backend, init_method="env://", rank=env.rank, world_size=env.world_size, **init_kwargs
    )
    try:
        info = _make_info(
            env.rank,
            env.world_size,
            env.local_rank,
            env.local_world_size,
            env.node_rank,
            use_gpu,
            backend,
        )
        return fn(info, *args)
    finally:
        dist.destroy_process_group()
