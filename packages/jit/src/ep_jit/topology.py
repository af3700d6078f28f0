"""Where the ranks of a process group sit: nodes, GPUs, NVLink domains.

:func:`topology` is collective and uses only the group's object collectives, so it works on gloo
groups (ranks that share a GPU, CPU ranks) as well as NCCL ones::

    topo = ep_jit.topology(group)
    topo.local_ranks  # ranks on this rank's node
    topo.gpu_peers  # ranks on this rank's GPU (this rank included)
    topo.nvlink_domains  # lists of ranks that can load and store each other's GPU memory

Simulated nodes: with ``EP_JIT_RANKS_PER_NODE=n`` (or ``ranks_per_node=n``), rank ``r`` is placed on
node ``r // n`` even when every rank runs on one host, so multi-node code paths run on one machine.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_jit import knobs
from ep_jit.agreement import gather_checked

__all__ = ["Topology", "free_host_bytes", "resolve_device", "topology"]


@dataclass(frozen=True)
class Topology:
    """The placement of every rank of a group, the same on every rank except ``rank``.

    Attributes:
        rank: This rank in the group.
        world_size: Ranks in the group.
        node_of: Node index of every rank (nodes numbered by their lowest rank's order).
        gpu_of: Device UUID of every rank, ``None`` for a rank without a CUDA device.
        nvlink_domains: Groups of ranks, each a sorted tuple, whose GPUs can all load and store
            each other's memory (one node, peer access between every pair, or one shared GPU).
            CPU ranks form no domain.
    """

    rank: int
    world_size: int
    node_of: tuple[int, ...]
    gpu_of: tuple[str | None, ...]
    nvlink_domains: tuple[tuple[int, ...], ...]

    @property
    def num_nodes(self) -> int:
        """Number of (real or simulated) nodes."""
        return len(set(self.node_of))

    @property
    def node(self) -> int:
        """This rank's node index."""
        return self.node_of[self.rank]

    @property
    def local_ranks(self) -> tuple[int, ...]:
        """Ranks on this rank's node, in order."""
        return tuple(r for r, n in enumerate(self.node_of) if n == self.node)

    @property
    def gpu_peers(self) -> tuple[int, ...]:
        """Ranks using this rank's GPU (this rank included); empty for a CPU rank."""
        mine = self.gpu_of[self.rank]
        return () if mine is None else tuple(r for r, u in enumerate(self.gpu_of) if u == mine)

    @property
    def shares_gpu(self) -> bool:
        """Whether any GPU of the group is used by more than one rank."""
        used = [u for u in self.gpu_of if u is not None]
        return len(set(used)) < len(used)

    @property
    def all_cuda(self) -> bool:
        """Whether every rank has a CUDA device."""
        return all(u is not None for u in self.gpu_of)

    @property
    def single_nvlink_domain(self) -> bool:
        """Whether all ranks form one NVLink domain (every rank on a GPU)."""
        return self.all_cuda and self.nvlink_domains == (tuple(range(self.world_size)),)


def resolve_device(
    device: torch.device | int | str | None, *, what: str = "device", cuda_only: bool = False
) -> torch.device:
    """A user's ``device`` argument as a concrete device, as every primitive reads it.

    ``None``: the current CUDA device when CUDA is available, else the CPU; an int ``i``:
    ``cuda:i``; ``"cuda"`` without an index: the current CUDA device.

    Args:
        device: What the user passed.
        what: The object asking, for messages (e.g. ``"PeerMemory"``).
        cuda_only: Refuse the CPU.

    Raises:
        ValueError: Not a CPU or CUDA device, CUDA asked for but not available, or the CPU
            where ``cuda_only``.
    """
    if cuda_only and not torch.cuda.is_available():
        raise ValueError(f"{what} needs a CUDA device; CUDA is not available")
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: device {dev} asked for but CUDA is not available")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if cuda_only:
        raise ValueError(f"{what} needs a CUDA device, got {dev}")
    if dev.type != "cpu":
        raise ValueError(f"{what}: device must be a CUDA device or the CPU, got {dev}")
    return dev


def _device_of(device: torch.device | None) -> torch.device | None:
    if device is not None:
        return device if device.type == "cuda" else None
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def topology(
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
    *,
    ranks_per_node: int | None = None,
) -> Topology:
    """Collective: every rank of ``group`` calls it; all get the same placement.

    Args:
        group: The process group (default: the world).
        device: This rank's device; default the current CUDA device when CUDA is available,
            else none (a CPU rank).
        ranks_per_node: Simulated nodes of this many consecutive ranks; default
            ``EP_JIT_RANKS_PER_NODE`` (0: real hosts).

    Raises:
        ValueError: ``ranks_per_node`` is negative.
    """
    group = group if group is not None else dist.group.WORLD
    assert group is not None
    rpn = knobs.jit.ranks_per_node if ranks_per_node is None else ranks_per_node
    if rpn < 0:
        raise ValueError(f"ranks_per_node must be >= 0, got {rpn}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _device_of(device)
    uuid = None if dev is None else str(torch.cuda.get_device_properties(dev).uuid)
    host = socket.gethostname()
    views = gather_checked(group, {"host": host, "uuid": uuid}, None, what="topology", device=dev)
    hosts: list[str] = []
    node_of = []
    for r, v in enumerate(views):
        key = f"{v['host']}#{r // rpn}" if rpn > 0 else v["host"]
        if key not in hosts:
            hosts.append(key)
        node_of.append(hosts.index(key))
    gpu_of = tuple(v["uuid"] for v in views)

    # Which ranks of this node this rank can reach: the same GPU, or a visible peer GPU.
    visible: dict[str, int] = {}
    if dev is not None:
        visible = {
            str(torch.cuda.get_device_properties(i).uuid): i
            for i in range(torch.cuda.device_count())
        }
    reach = []
    for q in range(world):
        ok = False
        other = gpu_of[q]
        if uuid is not None and other is not None and node_of[q] == node_of[rank]:
            if other == uuid:
                ok = True
            elif other in visible and dev is not None:
                ok = bool(torch.cuda.can_device_access_peer(dev.index or 0, visible[other]))
        reach.append(ok)
    rows = [
        v["reach"]
        for v in gather_checked(group, {"reach": reach}, None, what="topology", device=dev)
    ]
    domains: list[list[int]] = []
    for r in range(world):
        if gpu_of[r] is None:
            continue
        for d in domains:
            if all(rows[r][q] and rows[q][r] for q in d):
                d.append(r)
                break
        else:
            domains.append([r])
    return Topology(
        rank=rank,
        world_size=world,
        node_of=tuple(node_of),
        gpu_of=gpu_of,
        nvlink_domains=tuple(tuple(d) for d in domains),
    )


def free_host_bytes() -> int:
    """MemAvailable of /proc/meminfo, in bytes (the physical pages a new segment can take)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
