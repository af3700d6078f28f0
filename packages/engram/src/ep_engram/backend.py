"""What every Engram backend implements, and the configuration it is built from."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_engram.layout import num_sf_packs, row_bytes

__all__ = ["EngramBackend", "FetchHook", "TableConfig"]


@dataclass(frozen=True)
class TableConfig:
    """The agreed configuration of one table (the same on every rank but ``rank``/``device``).

    Attributes:
        group: The process group.
        rank: This rank in ``group``.
        world_size: Ranks in ``group``.
        num_entries_per_rank: ``E``: rank ``r`` owns global rows ``[r*E, (r+1)*E)``.
        hidden: Elements per row.
        dtype: ``torch.bfloat16`` or ``torch.float8_e4m3fn``.
        placement: ``"host"`` or ``"gpu"``.
        device: This rank's device (fetch inputs and outputs live there).
        timeout_s: Limit of host waits (``<= 0``: none).
    """

    group: dist.ProcessGroup
    rank: int
    world_size: int
    num_entries_per_rank: int
    hidden: int
    dtype: torch.dtype
    placement: str
    device: torch.device
    timeout_s: float

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return row_bytes(self.hidden, self.dtype)

    @property
    def num_rows(self) -> int:
        """Rows of the whole table, ``world_size * E``."""
        return self.world_size * self.num_entries_per_rank

    @property
    def fp8(self) -> bool:
        """Whether rows are FP8 (and carry scales)."""
        return self.dtype == torch.float8_e4m3fn

    @property
    def max_sf_bytes_per_row(self) -> int:
        """Scale bytes of one row in the largest format (float32), 0 for BF16."""
        return 4 * num_sf_packs(self.hidden, torch.float32) if self.fp8 else 0


class FetchHook:
    """What :meth:`EngramTable.fetch` returns: call it to get ``(data, sf)``.

    Args:
        data: ``[T, K*hidden]`` result (filled when ``finish`` has run, in stream order).
        sf: ``[T, K*P]`` scales, or ``None`` for BF16.
        finish: Called once by the first call of the hook (waits and error checks).
    """

    def __init__(
        self,
        data: torch.Tensor,
        sf: torch.Tensor | None,
        finish: Callable[[], None] | None = None,
    ) -> None:
        self._data = data
        self._sf = sf
        self._finish = finish

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(data, sf)``; the first call runs the backend's completion step.

        Raises:
            ValueError: An index was out of range (intranode backend: found by the kernel).
            HostTimeoutError: The fetch did not complete within the table's timeout.
        """
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        return self._data, self._sf


class EngramBackend(abc.ABC):
    """One way of storing and fetching a table's rows.

    ``collective_fetch``: whether ``fetch`` is a collective call (every rank must fetch, in the
    same order as its other collective calls).
    """

    name: str = ""
    collective_fetch: bool = False

    @abc.abstractmethod
    def write(self, storage: torch.Tensor, sf: torch.Tensor | None) -> None:
        """Stores this rank's rows (``[E, hidden]``) and scales (``[E, P]`` or ``None``).

        Collective; the table has checked the arguments and that every rank takes part.
        """

    @abc.abstractmethod
    def fetch(
        self,
        indices: torch.Tensor,
        out: torch.Tensor,
        sf_out: torch.Tensor | None,
        error: Exception | None,
        num_ctas: int,
    ) -> Callable[[], None] | None:
        """Fills ``out`` (``[T*K, row_bytes]`` uint8) and ``sf_out`` with the rows of ``indices``.

        ``error`` is what the table's own checks of this rank raised (collective backends share
        it with every rank; others never see one). Returns the completion step of the hook.
        """

    @abc.abstractmethod
    def destroy(self) -> None:
        """Frees the storage (collective; the table has met every rank first)."""
