"""The backends of primitive ``"pp"`` and the per-peer routing of ``backend="auto"``.

Registered with ep-jit's registry (:mod:`ep_jit.registry`) through the entry point
``pp_rdma = "pp_rdma.factory:pp_backends"``:

* ``copy_engine`` (priority 100): copy-engine copies into peer-mapped landing slots, stream memory
  operations as data and credit signals; every rank on a CUDA device of one host, one NVLink
  domain (or one shared GPU).
* ``nixl`` (priority 50): NIXL (UCX) one-sided WRITE + notification; any ranks, CPU or GPU;
  needs ``nixl-cu13`` (the ``pp-rdma[rdma]`` extra).
* ``torch`` (priority 0): the reference, ``torch.distributed`` isend/irecv.

:func:`plan_routes` turns a request into one backend per peer: ``"auto"`` (or a mapping
``{"local": ..., "remote": ...}``) may pick a different backend for peers on this rank's node and
for peers on other nodes; a plain name serves every peer.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping

import torch.distributed as dist

from ep_jit.registry import BackendSpec, peer_access_unavailable, registered_backends
from ep_jit.topology import Topology

__all__ = [
    "LOCAL_ONLY",
    "PRIMITIVE",
    "plan_routes",
    "pp_backends",
    "resolve_choices",
    "usable_backends",
    "used_kinds",
]

PRIMITIVE = "pp"
"""The primitive name pp-rdma's backends are registered under."""

LOCAL_ONLY = frozenset({"copy_engine"})
"""Backends that reach only ranks of this rank's node."""

_PROVIDERS = (("pp_rdma", "pp_rdma.factory:pp_backends"),)
_log = logging.getLogger("pp_rdma")
_logged: set[str] = set()


def _nixl_unavailable(group: dist.ProcessGroup, all_cuda: bool) -> str | None:
    if importlib.util.find_spec("nixl_cu13") is None:
        return "nixl_cu13 is not installed (pip install 'pp-rdma[rdma]')"
    return None


def pp_backends() -> list[BackendSpec]:
    """pp-rdma's ``ep_jit.backends`` provider: ``copy_engine``, ``nixl`` and ``torch``."""
    return [
        BackendSpec(
            primitive=PRIMITIVE,
            name="copy_engine",
            priority=100,
            factory="pp_rdma.copy_engine:CopyEnginePipe",
            unavailable=peer_access_unavailable,
            description="copy-engine copies + stream memory operations on peer-mapped memory",
        ),
        BackendSpec(
            primitive=PRIMITIVE,
            name="nixl",
            priority=50,
            factory="pp_rdma.nixl_backend:NixlPipe",
            unavailable=_nixl_unavailable,
            description="NIXL (UCX) one-sided WRITE + notification, host-driven",
        ),
        BackendSpec(
            primitive=PRIMITIVE,
            name="torch",
            priority=0,
            factory="pp_rdma.reference:TorchPipe",
            description="reference: torch.distributed isend/irecv (gloo or NCCL)",
        ),
    ]


def usable_backends(
    group: dist.ProcessGroup, all_cuda: bool
) -> tuple[dict[str, BackendSpec], dict[str, str]]:
    """This rank's view: registered specs by name, and why each unusable one cannot serve.

    Collective (availability checks may gather); callers gather the reasons of every rank.
    """
    specs = {s.name: s for s in registered_backends(PRIMITIVE, _PROVIDERS)}
    reasons: dict[str, str] = {}
    for name, spec in specs.items():
        reason = spec.unavailable_reason(group, all_cuda)
        if reason is not None:
            reasons[name] = reason
    return specs, reasons


def _auto(order: list[str], reasons: Mapping[str, str], local: bool, num_nodes: int) -> str:
    for name in order:
        if name in reasons:
            continue
        if name in LOCAL_ONLY and (not local or num_nodes > 1):
            # One PeerMemory spans the whole group, so it serves a single node only.
            continue
        return name
    raise ValueError(f"no pp backend can serve this group ({dict(reasons)})")


def resolve_choices(
    requested: str | Mapping[str, str],
    topo: Topology,
    order: list[str],
    reasons: Mapping[str, str],
) -> dict[str, str]:
    """The backend of peers on a rank's own node (``"local"``) and on other nodes (``"remote"``).

    The same on every rank (the arguments are agreed). Arguments and errors as for
    :func:`plan_routes`.
    """
    if isinstance(requested, str):
        choice = {"local": requested, "remote": requested}
    else:
        extra = set(requested) - {"local", "remote"}
        if extra:
            raise ValueError(
                f"backend mapping takes keys 'local' and 'remote', got {sorted(extra)}"
            )
        choice = {
            "local": requested.get("local", "auto"),
            "remote": requested.get("remote", "auto"),
        }
    known = ("auto", *order)
    for where, name in choice.items():
        if name not in known:
            raise ValueError(f"pp backend ({where}) must be one of {known}, got {name!r}")
    resolved: dict[str, str] = {}
    for where, name in choice.items():
        local = where == "local"
        if name == "auto":
            resolved[where] = _auto(order, reasons, local, topo.num_nodes)
            continue
        if name in reasons:
            raise ValueError(f"pp backend={name!r} cannot be used: {reasons[name]}")
        if name in LOCAL_ONLY and (not local or topo.num_nodes > 1):
            if not local and topo.num_nodes == 1:
                resolved[where] = name  # no remote peer exists; nothing to route
                continue
            raise ValueError(
                f"pp backend={name!r} serves the ranks of one node; the group spans "
                f"{topo.num_nodes} nodes"
            )
        resolved[where] = name
    return resolved


def used_kinds(resolved: Mapping[str, str], topo: Topology) -> set[str]:
    """Backends some pair of the group uses: every rank builds each (constructors are collective).

    ``resolved`` is :func:`resolve_choices`'s answer. The same set on every rank, also on a rank
    that is alone on its node (it uses no local backend, but the other nodes' ranks may).
    """
    sizes: dict[int, int] = {}
    for n in topo.node_of:
        sizes[n] = sizes.get(n, 0) + 1
    kinds = set()
    if any(count > 1 for count in sizes.values()):
        kinds.add(resolved["local"])
    if len(sizes) > 1:
        kinds.add(resolved["remote"])
    return kinds


def plan_routes(
    requested: str | Mapping[str, str],
    topo: Topology,
    order: list[str],
    reasons: Mapping[str, str],
) -> dict[int, str]:
    """The backend of every peer of this rank (the same plan on every rank, mirrored).

    Args:
        requested: ``"auto"``, a backend name, or ``{"local": name, "remote": name}`` (each
            ``"auto"`` or a name).
        topo: The group's placement (:func:`ep_jit.topology`).
        order: Registered backend names, highest priority first.
        reasons: Backends that some rank cannot use, with why (agreed across ranks).

    Raises:
        ValueError: An unknown name, or a backend that cannot serve the peers asked of it.
    """
    resolved = resolve_choices(requested, topo, order, reasons)
    routes = {
        p: resolved["local" if topo.node_of[p] == topo.node else "remote"]
        for p in range(topo.world_size)
        if p != topo.rank
    }
    summary = f"local={resolved['local']}, remote={resolved['remote']}"
    if summary not in _logged:
        _logged.add(summary)
        _log.info("pp backend %r: %s (%d node(s))", requested, summary, topo.num_nodes)
    return routes
