"""Run a torchrun script as several simulated nodes on this host: one launcher per node.

    python tools/run_multinode.py --nnodes 2 --nproc-per-node 2 -- tools/multinode_check.py

Starts ``nnodes`` separate ``torchrun --nnodes N --node-rank i --master-addr 127.0.0.1`` processes
that share one free port, so each rank sees ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``GROUP_RANK`` as it
would on a real multi-node job. Streams every launcher's output with a ``[node i]`` prefix, stops
all of them as soon as one fails or the timeout passes, and exits non-zero in both cases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump(node: int, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"[node {node}] {line}")
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
        deadline = time.monotonic() + 10
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole job")
    parser.add_argument("script", help="script (or -m module) and its arguments, after --")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.nnodes < 1 or args.nproc_per_node < 1:
        parser.error("--nnodes and --nproc-per-node must be positive")

    port = args.port or _free_port()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    # All simulated nodes live on the loopback interface.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    target = (
        ["-m", args.script_args[0], *args.script_args[1:]]
        if args.script == "-m"
        else [args.script, *args.script_args]
    )
    procs: list[subprocess.Popen[str]] = []
    threads = []
    print(
        f"run_multinode: {args.nnodes} nodes x {args.nproc_per_node} ranks, "
        f"127.0.0.1:{port}: {' '.join(target)}",
        flush=True,
    )
    for node in range(args.nnodes):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc_per_node),
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--max-restarts", "0",
            *target,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a process group per node, so _stop reaches its ranks
        )
        procs.append(proc)
        thread = threading.Thread(target=_pump, args=(node, proc), daemon=True)
        thread.start()
        threads.append(thread)

    deadline = time.monotonic() + args.timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                print(f"run_multinode: node {failed[0]} failed; stopping the others", flush=True)
                status = 1
                break
            if time.monotonic() > deadline:
                print(f"run_multinode: timed out after {args.timeout:g} s", flush=True)
                status = 124
                break
            time.sleep(0.2)
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if status == 0 and any(codes):
        status = 1
    verdict = "ok" if status == 0 else "FAILED"
    print(f"run_multinode: {verdict}; launcher exit codes {codes}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
