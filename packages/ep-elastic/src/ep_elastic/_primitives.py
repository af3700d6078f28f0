"""DeepEP V2's non-EP primitives under their ``ElasticBuffer`` names, delegated to our packages.

* all-gather sessions (``agrs_*``, ``all_gather``) and ``reduce_scatter``: ``cp-copyengine``;
* pipeline send/recv (``pp_*``): ``pp-rdma``;
* Engram row fetches (``engram_*``): ``ep-engram``.

Each package is an optional extra of ep-elastic (``pip install 'ep-elastic[cp,pp,engram]'``) and
is imported only when one of its methods is first called; without it the method raises an
``ImportError`` naming the package to install. The objects are built over the buffer's group and
freed by :meth:`ElasticBuffer.destroy`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from ep_elastic._base import BufferBase

__all__ = ["PrimitivesMixin"]

_PACKAGES = {
    "cp": ("cp_copyengine", "cp-copyengine"),
    "pp": ("pp_rdma", "pp-rdma"),
    "engram": ("ep_engram", "ep-engram"),
}


def _package(extra: str, method: str) -> ModuleType:
    """Imports the package behind ``extra``, or raises an ``ImportError`` saying what to install."""
    module, dist = _PACKAGES[extra]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module:
            raise  # the package is there but something it needs is not: show that error
        raise ImportError(
            f"ElasticBuffer.{method} needs the {dist} package, which is not installed: "
            f"pip install 'ep-elastic[{extra}]' (or pip install {dist})"
        ) from exc


class PrimitivesMixin(BufferBase):
    """``agrs_*``/``all_gather``, ``pp_*`` and ``engram_*`` on top of the buffer's group."""

    _agrs: Any = None
    _pp: Any = None
    _engram: Any = None
    _engram_key: tuple[Any, ...] | None = None

    # ---- all-gather sessions (cp-copyengine) -------------------------------------------------
    def agrs_set_config(
        self, num_max_session_bytes: int, num_max_all_gathers_per_session: int = 32
    ) -> None:
        """Builds the all-gather buffer (collective; replaces an earlier one).

        Args:
            num_max_session_bytes: Most bytes of gathered tensors (all ranks' slots) per session.
            num_max_all_gathers_per_session: Most ``all_gather`` calls per session.
        """
        cp = _package("cp", "agrs_set_config")
        _ = self.group  # raises once destroyed
        if self._agrs is not None:
            self._agrs.destroy()
            self._agrs = None
        self._agrs = cp.CopyEngineBuffer(
            self.group,
            num_max_session_bytes,
            num_max_ops_per_session=num_max_all_gathers_per_session,
            device=self.device,
        )

    def _configured(self, obj: Any, extra: str, method: str, setup: str) -> Any:
        """``obj``, the primitive's object that ``method`` needs, once the buffer is alive and
        ``setup`` has built it; raises naming what is missing (the package before the setup).
        The package is imported here only when ``obj`` is missing: calls stay off the import
        machinery."""
        _ = self.group  # raises once destroyed
        if obj is None:
            _package(extra, method)
            raise RuntimeError(f"ElasticBuffer.{method}: call {setup}(...) first")
        return obj

    def _agrs_buffer(self, method: str) -> Any:
        return self._configured(self._agrs, "cp", method, "agrs_set_config")

    def create_agrs_session(self) -> None:
        """Opens an all-gather session (collective)."""
        self._agrs_buffer("create_agrs_session").create_session()

    def destroy_agrs_session(self) -> None:
        """Closes the session; its gathered tensors become invalid (collective)."""
        self._agrs_buffer("destroy_agrs_session").destroy_session()

    @contextlib.contextmanager
    def agrs_new_session(self, enabled: bool = True) -> Iterator[None]:
        """A session for the ``with`` block (nothing when ``enabled`` is False)."""
        if not enabled:
            yield
            return
        with self._agrs_buffer("agrs_new_session").new_session():
            yield

    def agrs_get_inplace_tensor(
        self, shapes: Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """This rank's slot(s) of the next ``all_gather``: write there to skip the self copy."""
        slots: torch.Tensor | tuple[torch.Tensor, ...]
        slots = self._agrs_buffer("agrs_get_inplace_tensor").get_inplace_tensor(shapes, dtype)
        return slots

    def all_gather(self, t: torch.Tensor | Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """Gathers ``t`` from every rank on the copy engines (inside a session).

        Returns:
            DeepEP's shape: ``(gathered, handle)`` for one tensor, ``(*gathered, handle)`` for a
            list; each gathered tensor is ``[R, *t.shape]``. Call ``handle()`` before reading.
        """
        gathered, handle = self._agrs_buffer("all_gather").all_gather(t)
        if isinstance(gathered, tuple):
            return (*gathered, handle)
        return gathered, handle

    def reduce_scatter(
        self, t: torch.Tensor | Sequence[torch.Tensor], op: str = "sum"
    ) -> tuple[Any, Any]:
        """``cp_copyengine.CopyEngineBuffer.reduce_scatter`` over the buffer's group."""
        out, handle = self._agrs_buffer("reduce_scatter").reduce_scatter(t, op=op)
        return out, handle

    # ---- pipeline send/recv (pp-rdma) ----------------------------------------------------
    def pp_set_config(self, num_max_tensor_bytes: int, num_max_inflight_tensors: int) -> None:
        """Builds the pipeline buffer (collective; replaces an earlier one).

        Unlike DeepEP, any pair of ranks may talk, not only ring neighbours.
        """
        pp = _package("pp", "pp_set_config")
        _ = self.group  # raises once destroyed
        if self._pp is not None:
            self._pp.destroy()
            self._pp = None
        self._pp = pp.PipeBuffer(
            self.group,
            num_max_tensor_bytes,
            num_max_inflight=num_max_inflight_tensors,
            device=self.device,
        )

    def _pipe(self, method: str) -> Any:
        return self._configured(self._pp, "pp", method, "pp_set_config")

    def pp_send(self, t: torch.Tensor, dst_rank_idx: int, num_sms: int = 0) -> None:
        """Sends ``t`` to ``dst_rank_idx`` (stream-ordered). ``num_sms`` is accepted for
        DeepEP compatibility and ignored: the transfer uses no SM."""
        self._pipe("pp_send").send(t, dst_rank_idx)

    def pp_recv(self, t: torch.Tensor, src_rank_idx: int, num_sms: int = 0) -> None:
        """Receives the next tensor from ``src_rank_idx`` into ``t`` (same byte size).
        ``num_sms`` is accepted for DeepEP compatibility and ignored."""
        self._pipe("pp_recv").recv(t, src_rank_idx)

    # ---- Engram (ep-engram) ----------------------------------------------------------------
    def engram_write(
        self, storage: torch.Tensor, sf: torch.Tensor | None = None, *, placement: str = "host"
    ) -> None:
        """Stores this rank's shard of the Engram table (collective).

        Args:
            storage: ``[E, hidden]`` bf16 or ``float8_e4m3fn``; rank ``r`` owns global rows
                ``[r*E, (r+1)*E)``.
            sf: FP8 scales, as ``ep_engram.EngramTable.write`` takes them.
            placement: ``"host"`` (pinned host memory, as DeepEP) or ``"gpu"``; not a DeepEP
                argument.
        """
        engram = _package("engram", "engram_write")
        _ = self.group  # raises once destroyed
        if not isinstance(storage, torch.Tensor) or storage.dim() != 2:
            raise ValueError(
                "engram_write: storage must be a [num_entries, hidden] tensor, got "
                f"{getattr(storage, 'shape', type(storage).__name__)}"
            )
        key = (int(storage.shape[0]), int(storage.shape[1]), storage.dtype, placement)
        if self._engram is None or self._engram_key != key:
            if self._engram is not None:
                self._engram.destroy()
                self._engram = None
            self._engram = engram.EngramTable(
                self.group,
                key[0],
                key[1],
                dtype=storage.dtype,
                placement=placement,
                device=self.device,
            )
            self._engram_key = key
        self._engram.write(storage, sf)

    def engram_fetch(
        self,
        indices: torch.Tensor,
        num_qps: int = 0,
        use_tma_aligned_col_major_sf: bool = False,
    ) -> Any:
        """Starts fetching rows by global id; returns ``hook`` with ``hook() -> (data, sf)``.

        ``num_qps`` (DeepEP: RDMA queue pairs, one CTA each) sets the CTAs of the intranode
        gather kernel when non-zero; ``0`` takes ``EP_ENGRAM_NUM_CTAS``.
        """
        table = self._configured(self._engram, "engram", "engram_fetch", "engram_write")
        return table.fetch(
            indices,
            use_tma_aligned_col_major_sf=use_tma_aligned_col_major_sf,
            num_ctas=num_qps or None,
        )

    # ---- lifetime ------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Frees the primitives' buffers, then the EP backend (see ``BufferBase.destroy``)."""
        for name in ("_agrs", "_pp", "_engram"):
            obj = getattr(self, name, None)
            if obj is not None:
                setattr(self, name, None)
                obj.destroy()
        super().destroy()
