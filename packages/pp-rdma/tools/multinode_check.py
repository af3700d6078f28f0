"""PipeBuffer across simulated nodes: NIXL between nodes, the local path within them.

    python tools/run_multinode.py --nnodes 2 --nproc-per-node 2 -- \
        packages/pp-rdma/tools/multinode_check.py

Every launcher is one node. The script sets ``EP_JIT_RANKS_PER_NODE`` to the launcher's
``LOCAL_WORLD_SIZE`` (when unset), so ``ep_jit.topology`` sees the nodes even on one host, then
runs the random bidirectional program of the test suite bit-exact twice: with
``backend={"local": "torch", "remote": "nixl"}`` (checking that each peer got the backend its
node says) and with ``"auto"``. Any mismatch raises, which fails the launcher.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ep_jit import knobs
from ep_jit.testing import RankInfo, run_from_env

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _pp_workers as w


def check(info: RankInfo) -> None:
    per_node = info.local_world_size
    for backend in ({"local": "torch", "remote": "nixl"}, "auto"):
        result = w.stress_worker(info, backend, 3, 120, 1 << 14, 2, 0.2)
        for peer, name in result["routes"].items():
            local = peer // per_node == info.rank // per_node
            if backend != "auto":
                expect = "torch" if local else "nixl"
                if name != expect:
                    raise AssertionError(f"rank {info.rank}: peer {peer} on {name}, not {expect}")
            elif not local and name != "nixl":
                raise AssertionError(f"rank {info.rank}: remote peer {peer} on {name}")
        if info.rank == 0:
            print(
                f"pp-rdma multinode {backend}: {result['ops']} ops on rank 0, "
                f"routes {result['routes']}"
            )


if __name__ == "__main__":
    env = knobs.torchrun_env()
    if env is not None and not knobs.jit.ranks_per_node:
        knobs.jit.ranks_per_node = env.local_world_size
    run_from_env(check)
    print("pp-rdma multinode: OK")
