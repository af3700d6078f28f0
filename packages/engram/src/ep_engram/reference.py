"""The reference backend: a table on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank keeps its own rows (in host memory for ``placement="host"``, on its GPU for
``"gpu"``). A fetch is collective: the row ids go to their owners in one all-to-all, each owner
gathers its rows locally (``index_select``), and a second all-to-all brings them back. This is
the test oracle of the other backends and the path between nodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ep_engram._collective import Meeting
from ep_engram.backend import EngramBackend, TableConfig
from ep_jit.rows import all_to_all_uneven, collective_timeout

__all__ = ["ReferenceBackend", "out_of_range_error"]


def out_of_range_error(indices: torch.Tensor, flat_pos: int, num_rows: int) -> ValueError:
    """The error of an out-of-range id at flat position ``flat_pos`` of ``indices`` ``[T, K]``."""
    k = indices.shape[1]
    value = int(indices.reshape(-1)[flat_pos])
    return ValueError(
        f"indices[{flat_pos // k}, {flat_pos % k}] = {value} is out of range: global row ids "
        f"must be in [0, {num_rows}) or -1 (a zero row)"
    )


class ReferenceBackend(EngramBackend):
    """Rows kept by their owner, fetched with two all-to-alls (see the module doc).

    Args:
        cfg: The table's configuration.
        meeting: The table's meeting point; fetch opens with it (it is collective here).
    """

    name = "reference"
    collective_fetch = True

    def __init__(self, cfg: TableConfig, meeting: Meeting) -> None:
        self.cfg = cfg
        self.meeting = meeting
        gloo = str(dist.get_backend(cfg.group)) == "gloo"
        self.comm_device = torch.device("cpu") if gloo else cfg.device
        on_gpu = cfg.placement == "gpu" and cfg.device.type == "cuda"
        self.store_device = cfg.device if on_gpu else torch.device("cpu")
        self.rows: torch.Tensor | None = None
        self.sf: torch.Tensor | None = None
        self.sf_dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, cfg: TableConfig, meeting: Meeting) -> ReferenceBackend:
        """The registry's factory."""
        return cls(cfg, meeting)

    def write(self, storage: torch.Tensor, sf: torch.Tensor | None) -> None:
        """Keeps a copy of this rank's rows (and scales) as bytes; no communication."""
        rows = storage.contiguous().view(torch.uint8)
        self.rows = rows.to(self.store_device, copy=True)
        if sf is None:
            self.sf, self.sf_dtype = None, None
        else:
            self.sf = sf.contiguous().view(torch.uint8).to(self.store_device, copy=True)
            self.sf_dtype = sf.dtype

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.rows is not None
        at = ids.to(self.store_device)
        parts = [self.rows.index_select(0, at)]
        if self.sf is not None:
            parts.append(self.sf.index_select(0, at))
        rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return rows.to(self.comm_device)

    def fetch(
        self,
        indices: torch.Tensor,
        out: torch.Tensor,
        sf_out: torch.Tensor | None,
        error: Exception | None,
        num_ctas: int,
    ) -> Callable[[], None] | None:
        """Collective: exchanges ids and rows with every rank; returns no completion step."""
        cfg = self.cfg
        world, entries = cfg.world_size, cfg.num_entries_per_rank
        flat = indices.reshape(-1).to(self.comm_device, torch.int64)
        if error is None and flat.numel() > 0:
            bad = (flat < -1) | (flat >= cfg.num_rows)
            if bool(bad.any()):
                error = out_of_range_error(indices, int(bad.nonzero()[0, 0]), cfg.num_rows)
        valid = (flat >= 0) & (flat < cfg.num_rows)
        owner = torch.where(valid, flat.clamp(min=0) // entries, world)
        counts = torch.bincount(owner, minlength=world + 1)[:world]
        table = self.meeting.meet("fetch", error, counts.tolist())
        send_counts = [int(c) for c in counts.tolist()]
        recv_counts = [int(c) for c in table[:, cfg.rank].tolist()]
        order = torch.argsort(owner, stable=True)[: sum(send_counts)]
        with collective_timeout(cfg.timeout_s):
            ids = all_to_all_uneven(flat[order] % entries, send_counts, recv_counts, cfg.group)
            back = all_to_all_uneven(self._gather(ids), recv_counts, send_counts, cfg.group)
        width = cfg.row_bytes + (0 if self.sf is None else self.sf.shape[1])
        result = torch.zeros((flat.numel(), width), dtype=torch.uint8, device=self.comm_device)
        result[order] = back
        out.copy_(result[:, : cfg.row_bytes])
        if sf_out is not None:
            assert self.sf_dtype is not None
            sf = result[:, cfg.row_bytes :].contiguous().view(self.sf_dtype)
            sf_out.copy_(sf.view(sf_out.shape))
        return None

    def destroy(self) -> None:
        """Drops the rows."""
        self.rows, self.sf = None, None
