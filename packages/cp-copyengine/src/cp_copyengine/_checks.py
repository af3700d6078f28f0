"""The cross-rank agreement on every call of a :class:`~cp_copyengine.CopyEngineBuffer`.

With input checks on, every call compares what each rank passes (kind, op, shapes, dtypes, the
session and the call's index in it) and whether a rank's local checks failed, so that ranks that
disagree, or a rank that rejects its input, make every rank raise before any copy is enqueued.

Where the group has a CPU backend (gloo: a gloo group, or ``"cpu:gloo,cuda:nccl"``), a call costs
one all-gather of a fixed 16-byte CPU tensor per rank: a 64-bit digest of the call and a failure
flag. Only when the rows differ (some rank failed, or the calls differ) do the ranks exchange the
full descriptions, to name what differs; every rank sees the same rows, so every rank takes the
same path. A group with only NCCL gets a gloo group of the same ranks, made once at
construction, so no check ever waits for the device. The host waits for the round trip
(bounded by ``timeout_s``).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import torch
import torch.distributed as dist

from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.errors import HostTimeoutError

__all__ = ["CallChecker", "call_digest"]


def call_digest(payload: dict[str, Any]) -> int:
    """A signed 64-bit digest of a call's description, the same in every process."""
    text = repr(sorted(payload.items())).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


class CallChecker:
    """Agreement on each call over ``group``; see the module docstring.

    Args:
        group: The buffer's process group.
        device: The buffer's device (for the object all-gather of NCCL-only groups).
        timeout_s: Limit of the host wait for the fixed-size all-gather; ``<= 0``: gloo's own.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout_s: float) -> None:
        self.group = group
        self.device = device
        self.timeout_s = timeout_s
        self.own_group = not has_cpu_backend(group)
        if self.own_group:
            self.group = cpu_group_of(group)
        world = dist.get_world_size(group)
        self._mine = torch.zeros(2, dtype=torch.int64)
        self._mine_np = self._mine.numpy()
        self._rows = torch.zeros(world, 2, dtype=torch.int64)
        self._row_views = list(self._rows.unbind(0))
        self.rounds = 0
        """Fixed-size all-gathers made (one per checked call)."""

    def destroy(self) -> None:
        """Frees the gloo group made for an NCCL-only group (collective for those ranks)."""
        if self.own_group:
            self.own_group = False
            dist.destroy_process_group(self.group)

    def check(self, kind: str, payload: dict[str, Any], error: Exception | None) -> None:
        """Raises on every rank when any rank failed or the ranks' ``payload`` differ.

        Collective: every rank of the group calls it once per call.

        Raises:
            Exception: This rank's own ``error``.
            ValueError: Another rank failed (naming it and its error), or the payloads differ
                (naming each field and every rank's value).
            HostTimeoutError: A peer did not join within ``timeout_s`` (the group is not usable
                afterwards).
        """
        what = f"{kind}()"
        self._mine_np[0] = call_digest(payload)
        self._mine_np[1] = int(error is not None)
        self.rounds += 1
        work = dist.all_gather(self._row_views, self._mine, group=self.group, async_op=True)
        assert work is not None
        try:
            if self.timeout_s > 0:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            else:
                work.wait()
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                raise
            raise HostTimeoutError(
                f"the ranks' agreement on {what} (a peer did not make the call)",
                self.timeout_s,
            ) from exc
        rows = self._rows.tolist()
        if all(r == rows[0] for r in rows) and not rows[0][1]:
            return
        # Some rank failed or the calls differ: exchange the full descriptions (over gloo).
        gathered = gather_checked(self.group, payload, error, what=what, device=self.device)
        check_agreement(gathered, what)


def has_cpu_backend(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` runs collectives of CPU tensors (gloo, alone or beside NCCL)."""
    return "gloo" in str(dist.get_backend(group)).lower()


def cpu_group_of(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group of ``group``'s ranks; collective for those ranks only (not the world)."""
    ranks = dist.get_process_group_ranks(group)
    made = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
    if not isinstance(made, dist.ProcessGroup):
        raise RuntimeError(f"could not make a gloo group of ranks {ranks}")
    return made
