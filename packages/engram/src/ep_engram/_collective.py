"""The one meeting point of EngramTable's collective calls: every rank says which call it is in.

Each collective call (``write``, the reference backend's ``fetch``, ``destroy``) starts with one
small all-gather of fixed width, ``[op, call number, local error, values...]``. Ranks that are in
different calls (a ``write`` made on some ranks only, say) or at different call numbers see it in
that gather and all raise the same ``ValueError``; a rank that rejected its input makes every rank
raise, with the message shared by a second gather that every rank joins.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ep_jit.agreement import gather_checked
from ep_jit.errors import HostTimeoutError

__all__ = ["OPS", "Meeting"]

OPS = {"write": 1, "fetch": 2, "destroy": 3}
_NAMES = {v: k for k, v in OPS.items()}
_HEAD = 3


class Meeting:
    """Fixed-width all-gathers that open every collective call of one table.

    Args:
        group: The process group.
        device: Device of the gathered tensor (CPU for gloo, the rank's GPU for NCCL).
        width: Values each rank contributes besides the header (the same on every rank).
        timeout_s: Limit of the host wait where the gather blocks the host (gloo); ``<= 0``:
            none.
    """

    def __init__(
        self, group: dist.ProcessGroup, device: torch.device, width: int, timeout_s: float
    ) -> None:
        self.group = group
        self.device = device
        self.width = width
        self.timeout_s = timeout_s
        self.calls = 0
        self.world = dist.get_world_size(group)

    def _all_gather(self, row: torch.Tensor, what: str) -> torch.Tensor:
        out = [torch.empty_like(row) for _ in range(self.world)]
        if self.device.type == "cpu" and self.timeout_s > 0:
            work = dist.all_gather(out, row, group=self.group, async_op=True)
            assert work is not None
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                    raise
                raise HostTimeoutError(
                    f"{what} (a rank did not make this collective call)", self.timeout_s
                ) from exc
        else:
            dist.all_gather(out, row, group=self.group)
        return torch.stack(out).cpu()

    def meet(self, op: str, error: Exception | None, values: Sequence[int] = ()) -> torch.Tensor:
        """Gathers every rank's header and ``values``; raises on every rank together.

        Collective: every rank of the group calls it once per collective call of the table.

        Args:
            op: The call, a key of :data:`OPS`.
            error: What this rank's own checks raised, or ``None``.
            values: Up to ``width`` ints this rank shares (padded with zeros).

        Returns:
            ``[R, width]`` int64 CPU tensor of every rank's values.

        Raises:
            ValueError: Ranks are in different calls, or another rank's checks failed.
            Exception: This rank's own ``error`` (on this rank).
        """
        if len(values) > self.width:
            raise RuntimeError(f"meeting of {op} carries {len(values)} > {self.width} values")
        self.calls += 1
        head = [OPS[op], self.calls, 0 if error is None else 1]
        row = torch.zeros(_HEAD + self.width, dtype=torch.int64)
        row[: _HEAD + len(values)] = torch.tensor(head + [int(v) for v in values])
        table = self._all_gather(row.to(self.device), f"EngramTable.{op}")
        ops, calls = table[:, 0].tolist(), table[:, 1].tolist()
        if len(set(ops)) > 1 or len(set(calls)) > 1:
            by_op: dict[str, list[int]] = {}
            for r, (o, c) in enumerate(zip(ops, calls, strict=True)):
                by_op.setdefault(f"{_NAMES.get(o, '?')} (collective call {c})", []).append(r)
            seen = "; ".join(f"{name} on ranks {ranks}" for name, ranks in by_op.items())
            raise ValueError(
                f"EngramTable's collective calls must be made on every rank in the same order: "
                f"{seen}"
            )
        if bool(table[:, 2].any()):
            what = f"EngramTable.{op}"
            device = self.device if self.device.type == "cuda" else None
            try:
                gather_checked(self.group, {}, error, what=what, device=device)
            except ValueError as exc:
                prefix = f"{what} cannot be built: "
                if exc is error or not str(exc).startswith(prefix):
                    raise
                raise ValueError(
                    f"{what} failed on another rank: {str(exc)[len(prefix) :]}"
                ) from None
        return table[:, _HEAD:]
