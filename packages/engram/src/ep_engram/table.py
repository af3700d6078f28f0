"""``EngramTable``: one embedding table sharded over the ranks of a group, fetched by row id.

Rank ``r`` owns the global rows ``[r*E, (r+1)*E)``. ``write`` (collective) stores every rank's
shard; ``fetch`` takes ``[T, K]`` global row ids and returns a hook whose call gives the rows
concatenated per token, ``[T, K*hidden]``, and for FP8 tables their scales ``[T, K*P]``.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from ep_engram import knobs
from ep_engram._collective import Meeting
from ep_engram.backend import EngramBackend, FetchHook, TableConfig
from ep_engram.factory import PRIMITIVE, PROVIDERS
from ep_engram.layout import DTYPES, SF_DTYPES, empty_sf, num_sf_packs
from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.hostwait import timeout_seconds
from ep_jit.registry import get_backend, select_backend
from ep_jit.topology import free_host_bytes, resolve_device

__all__ = ["PLACEMENTS", "SF_LAYOUTS", "EngramTable"]

PLACEMENTS = ("host", "gpu")
"""Where a table's rows live: pinned host memory of each owner, or its GPU memory."""

SF_LAYOUTS = ("row_major", "col_major_tma")
"""Names of the fetched scales' layouts (``fetch(sf_layout=...)``)."""


def _check_positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class EngramTable:
    """A table of ``world_size * E`` rows of ``hidden`` elements, rank ``r`` owning rows
    ``[r*E, (r+1)*E)``.

    Collective: every rank of ``group`` constructs it with the same arguments (checked; ranks
    that disagree or a rank whose arguments are bad make every rank raise).

    Args:
        group: The process group (``None``: the world). gloo for CPU ranks or ranks sharing a
            GPU, NCCL for a GPU per rank.
        num_entries_per_rank: ``E``, rows each rank owns.
        hidden: Elements per row; a row must be a multiple of 16 bytes (BF16: ``hidden % 8 ==
            0``; FP8: ``hidden % 16 == 0``).
        dtype: ``torch.bfloat16`` or ``torch.float8_e4m3fn``.
        placement: ``"host"``: pinned host memory of each owner (tables larger than GPU memory);
            ``"gpu"``: the owner's GPU memory.
        backend: ``"auto"`` (``EP_ENGRAM_BACKEND``, else the best that can serve the group),
            ``"intranode"`` (a JIT gather kernel over peer-mapped memory of one host) or
            ``"reference"`` (``torch.distributed``).
        device: This rank's device; default the current CUDA device, else the CPU.
        timeout_s: Limit of host waits; default ``EP_ENGRAM_TIMEOUT_S``; ``<= 0``: none.

    Raises:
        ValueError: Bad or disagreeing arguments, or a table too large for its placement (the
            message names the bytes); raised on every rank.
        TypeError: ``dtype`` is not a supported type (on every rank).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_entries_per_rank: int,
        hidden: int,
        dtype: torch.dtype = torch.bfloat16,
        placement: str = "host",
        backend: str = "auto",
        *,
        device: torch.device | int | str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Checks the arguments on every rank, picks the backend and allocates (collective)."""
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD  # type: ignore[assignment]
        self._destroyed = True
        requested = backend
        error: Exception | None = None
        dev = torch.device("cpu")
        seconds = float(knobs.engram.timeout_s)
        try:
            if timeout_s is not None:
                seconds = timeout_seconds(timeout_s)
            dev = resolve_device(device, what="EngramTable")
            _check_positive("num_entries_per_rank", num_entries_per_rank)
            _check_positive("hidden", hidden)
            if dtype not in DTYPES:
                raise TypeError(f"dtype must be torch.bfloat16 or torch.float8_e4m3fn, got {dtype}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if hidden * itemsize % 16:
                raise ValueError(
                    f"a row must be a multiple of 16 bytes: hidden={hidden} of {dtype} is "
                    f"{hidden * itemsize} bytes"
                )
            if placement not in PLACEMENTS:
                raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
            if placement == "gpu" and dev.type != "cuda":
                raise ValueError(f"placement='gpu' needs a CUDA device; this rank uses {dev}")
            if backend not in knobs.BACKEND_CHOICES:
                raise ValueError(f"backend must be one of {knobs.BACKEND_CHOICES}, got {backend!r}")
            # EP_ENGRAM_BACKEND is checked here too, so a bad value on one rank fails on every rank.
            requested = knobs.engram.backend if backend == "auto" else backend
        except (ValueError, TypeError) as exc:
            error = exc
        agreed = {
            "num_entries_per_rank": num_entries_per_rank,
            "hidden": hidden,
            "dtype": str(dtype),
            "placement": placement,
            "backend": requested,
            "device_type": dev.type,
        }
        where = {"host": socket.gethostname(), "device": str(dev)}
        gathered = gather_checked(
            self.group, {**agreed, **where}, error, what="EngramTable", device=dev
        )
        check_agreement([{k: g[k] for k in agreed} for g in gathered], "EngramTable")
        self.config = TableConfig(
            group=self.group,
            rank=dist.get_rank(self.group),
            world_size=dist.get_world_size(self.group),
            num_entries_per_rank=num_entries_per_rank,
            hidden=hidden,
            dtype=dtype,
            placement=placement,
            device=dev,
            timeout_s=seconds,
        )
        on_host = sum(g["host"] == where["host"] for g in gathered)
        on_device = sum(
            g["host"] == where["host"] and g["device"] == where["device"] for g in gathered
        )
        all_cuda = all(g["device_type"] == "cuda" for g in gathered)
        # Availability checks may be collective: every rank runs them, whatever else failed.
        spec_name = ""
        try:
            spec = select_backend(PRIMITIVE, requested, self.group, all_cuda, PROVIDERS)
            spec_name = spec.name
        except ValueError as exc:
            error = exc
        else:
            error = self._capacity_error(on_host, on_device)
        names = gather_checked(
            self.group, {"backend": spec_name}, error, what="EngramTable", device=dev
        )
        check_agreement(names, "EngramTable")
        gloo = str(dist.get_backend(self.group)) == "gloo"
        self._meeting = Meeting(
            self.group,
            torch.device("cpu") if gloo else dev,
            width=max(self.config.world_size, 2),
            timeout_s=seconds,
        )
        spec = get_backend(PRIMITIVE, spec_name, PROVIDERS)
        self.backend_name = spec_name
        self._backend: EngramBackend = spec.build(self.config, self._meeting)
        self._destroyed = False
        self._written = False
        self._sf_dtype: torch.dtype | None = None
        self._landing: torch.Tensor | None = None

    # ---- properties -----------------------------------------------------------------------
    @property
    def num_entries_per_rank(self) -> int:
        """``E``: rows each rank owns."""
        return self.config.num_entries_per_rank

    @property
    def num_rows(self) -> int:
        """Rows of the whole table."""
        return self.config.num_rows

    @property
    def hidden(self) -> int:
        """Elements per row."""
        return self.config.hidden

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the rows."""
        return self.config.dtype

    @property
    def placement(self) -> str:
        """``"host"`` or ``"gpu"``."""
        return self.config.placement

    @property
    def device(self) -> torch.device:
        """This rank's device: ``fetch`` takes indices there and returns results there."""
        return self.config.device

    @property
    def sf_dtype(self) -> torch.dtype | None:
        """Type of the scale packs of the last write (FP8), else ``None``."""
        return self._sf_dtype

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` ran."""
        return self._destroyed

    def _capacity_error(self, on_host: int, on_device: int) -> ValueError | None:
        cfg = self.config
        shard = cfg.num_entries_per_rank * cfg.row_bytes
        scales = cfg.num_entries_per_rank * cfg.max_sf_bytes_per_row
        if cfg.placement == "host":
            free = free_host_bytes()
            if shard * on_host > free:
                return ValueError(
                    f"the table is too large for host memory: {shard} bytes per rank, "
                    f"{shard * on_host} bytes for the {on_host} ranks of this host, "
                    f"{free} bytes available"
                )
            return None
        free = int(torch.cuda.mem_get_info(cfg.device)[0])
        need = (shard + scales) * on_device
        if need > free:
            return ValueError(
                f"the table is too large for GPU memory: {shard + scales} bytes per rank "
                f"(rows and scales), {need} bytes for the {on_device} ranks of {cfg.device}, "
                f"{free} bytes free"
            )
        return None

    def _alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("EngramTable was destroyed")

    # ---- write ----------------------------------------------------------------------------
    def _check_write(self, storage: object, sf: object) -> tuple[int, int]:
        cfg = self.config
        e, h = cfg.num_entries_per_rank, cfg.hidden
        if not isinstance(storage, torch.Tensor):
            raise TypeError(f"storage must be a tensor, got {type(storage).__name__}")
        if storage.dtype != cfg.dtype:
            raise TypeError(f"storage must be {cfg.dtype}, got {storage.dtype}")
        if tuple(storage.shape) != (e, h):
            raise ValueError(
                f"storage must be [{e}, {h}] (this rank's rows), got {list(storage.shape)}"
            )
        if storage.device.type not in ("cpu", cfg.device.type):
            raise ValueError(f"storage must be on the CPU or {cfg.device}, got {storage.device}")
        if not cfg.fp8:
            if sf is not None:
                raise ValueError("sf must be None for a BF16 table")
            return 0, 0
        if not isinstance(sf, torch.Tensor):
            raise TypeError("an FP8 table needs sf: float32 or packed UE8M0 (int32) scales")
        if sf.dtype not in SF_DTYPES:
            raise TypeError(f"sf must be float32 or int32 (packed UE8M0), got {sf.dtype}")
        p = num_sf_packs(h, sf.dtype)
        rows = (e, cfg.num_rows)
        if sf.dim() != 2 or sf.shape[0] not in rows or sf.shape[1] != p:
            raise ValueError(
                f"sf must be [{e}, {p}] (this rank's rows) or [{cfg.num_rows}, {p}] (the whole "
                f"table) of {sf.dtype} for hidden={h}, got {list(sf.shape)}"
            )
        if sf.device.type not in ("cpu", cfg.device.type):
            raise ValueError(f"sf must be on the CPU or {cfg.device}, got {sf.device}")
        return (1 if sf.dtype == torch.float32 else 2), p

    def write(self, storage: torch.Tensor, sf: torch.Tensor | None = None) -> None:
        """Stores this rank's rows; collective, every rank calls it (a write on some ranks only
        is detected when the ranks next meet and raises on every rank).

        Fetches issued earlier complete first; after the call, every rank's fetches see every
        rank's new rows. Blocks the host until the rows are stored.

        Args:
            storage: ``[E, hidden]`` of the table's dtype, this rank's rows ``[r*E, (r+1)*E)``;
                on the CPU or this rank's device.
            sf: FP8 tables only: scales, one per 128 channels, ``[E, P]`` (this rank's rows) or
                ``[world_size*E, P]`` (the whole table, as DeepEP takes it; this rank keeps its
                own rows). ``float32`` (``P = ceil(hidden/128)``) or ``int32`` holding four
                UE8M0 exponent bytes (``P = ceil(ceil(hidden/128)/4)``). Every rank stores its
                own rows' scales; the format is the same on every rank.

        Raises:
            TypeError: Wrong dtype of ``storage`` or ``sf`` (on every rank).
            ValueError: Wrong shape or device, ``sf`` with BF16, ranks in different calls or
                with different scale formats (on every rank).
        """
        self._alive()
        error: Exception | None = None
        code, p = 0, 0
        try:
            code, p = self._check_write(storage, sf)
        except (TypeError, ValueError) as exc:
            error = exc
        values = self._meeting.meet("write", error, [code, p])
        codes = values[:, 0].tolist()
        if len(set(codes)) > 1:
            names = {0: "none", 1: "float32", 2: "int32"}
            by_rank = ", ".join(f"rank {r}: {names[c]}" for r, c in enumerate(codes))
            raise ValueError(
                f"EngramTable.write: the scale format differs across ranks ({by_rank})"
            )
        local_sf: torch.Tensor | None = None
        if sf is not None:
            e = self.config.num_entries_per_rank
            local_sf = (
                sf if sf.shape[0] == e else sf[self.config.rank * e : (self.config.rank + 1) * e]
            )
        self._backend.write(storage, local_sf)
        self._written = True
        self._sf_dtype = None if sf is None else sf.dtype

    # ---- fetch ----------------------------------------------------------------------------
    def _check_fetch(self, indices: object, out: object) -> None:
        cfg = self.config
        if not self._written:
            raise RuntimeError(
                "EngramTable.fetch before any write: call write() on every rank first"
            )
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a tensor, got {type(indices).__name__}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
        if indices.dim() != 2:
            raise ValueError(f"indices must be [num_tokens, K], got {list(indices.shape)}")
        if indices.device != cfg.device:
            raise ValueError(f"indices must be on {cfg.device}, got {indices.device}")
        if out is None:
            return
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a tensor, got {type(out).__name__}")
        shape = [indices.shape[0], indices.shape[1] * cfg.hidden]
        if out.dtype != cfg.dtype or list(out.shape) != shape or out.device != cfg.device:
            raise ValueError(
                f"out must be {shape} {cfg.dtype} on {cfg.device}, got {list(out.shape)} "
                f"{out.dtype} on {out.device}"
            )
        if not out.is_contiguous() or out.data_ptr() % 16:
            raise ValueError("out must be contiguous and 16-byte aligned")

    def _landing_bytes(self, nbytes: int) -> torch.Tensor:
        if self._landing is None or self._landing.numel() < nbytes:
            self._landing = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=self.device)
        return self._landing[:nbytes]

    def fetch(
        self,
        indices: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        use_tma_aligned_col_major_sf: bool = False,
        num_ctas: int | None = None,
        sf_layout: str | None = None,
    ) -> FetchHook:
        """Gathers the rows ``indices`` names; returns a hook that gives ``(data, sf)``.

        With the intranode backend the gather is enqueued on the current stream and this call
        returns at once (no other rank takes part). With the reference backend the call is
        collective: every rank fetches, in the same order as its other collective calls.

        Args:
            indices: ``[T, K]`` int32 or int64 global row ids on :attr:`device`; ``-1`` gives a
                zero row (and all-zero scale bytes). ``T`` may be 0.
            out: ``[T, K*hidden]`` contiguous tensor of the table's dtype on :attr:`device` to
                receive the rows; ``None``: a landing area of the table that the next fetch
                overwrites.
            use_tma_aligned_col_major_sf: Return the scales with strides ``(1, align(T, 4))``
                instead of row-major (FP8 tables).
            num_ctas: CTAs (SMs) of the intranode gather kernel; default ``EP_ENGRAM_NUM_CTAS``.
            sf_layout: The scale layout by name, ``"row_major"`` or ``"col_major_tma"`` (the
                same as ``use_tma_aligned_col_major_sf=True``); ``None``: by the flag.

        Returns:
            A :class:`FetchHook`; ``hook()`` returns ``data`` ``[T, K*hidden]`` and, for FP8,
            ``sf`` ``[T, K*P]`` (a new tensor of the written scale type), else ``None``.

        Raises:
            TypeError, ValueError: Bad ``indices`` or ``out`` (collective backends: on every
                rank). An out-of-range id is raised here by the reference backend and by
                ``hook()`` with the intranode backend.
            RuntimeError: A fetch before any write, or after destroy.
        """
        self._alive()
        cfg = self.config
        error: Exception | None = None
        try:
            self._check_fetch(indices, out)
            if num_ctas is not None:
                _check_positive("num_ctas", num_ctas)
            if sf_layout is not None:
                if sf_layout not in SF_LAYOUTS:
                    raise ValueError(f"sf_layout must be one of {SF_LAYOUTS}, got {sf_layout!r}")
                if use_tma_aligned_col_major_sf and sf_layout != "col_major_tma":
                    raise ValueError(
                        f"use_tma_aligned_col_major_sf=True contradicts sf_layout={sf_layout!r}"
                    )
                use_tma_aligned_col_major_sf = sf_layout == "col_major_tma"
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
        if error is not None and not self._backend.collective_fetch:
            raise error
        if error is not None:
            # Still meets the other ranks; shapes below only need to be well formed.
            t, k = 0, 0
        else:
            t, k = int(indices.shape[0]), int(indices.shape[1])
        nbytes = t * k * cfg.row_bytes
        data = out if (out is not None and error is None) else None
        if data is None:
            data = self._landing_bytes(nbytes).view(cfg.dtype).view(t, k * cfg.hidden)
        raw = data.view(torch.uint8).view(t * k, cfg.row_bytes)
        sf: torch.Tensor | None = None
        if self._sf_dtype is not None:
            p = num_sf_packs(cfg.hidden, self._sf_dtype)
            sf = empty_sf(t, k * p, self._sf_dtype, cfg.device, use_tma_aligned_col_major_sf)
        ctas = num_ctas if num_ctas is not None else knobs.engram.num_ctas
        if error is not None:
            indices = torch.empty((0, 0), dtype=torch.int64, device=cfg.device)
        finish = self._backend.fetch(indices, raw, sf, error, ctas)
        return FetchHook(data, sf, finish)

    # ---- teardown -------------------------------------------------------------------------
    def destroy(self) -> None:
        """Frees the table; collective and idempotent. Pending fetches complete first."""
        if self._destroyed:
            return
        self._meeting.meet("destroy", None)
        self._destroyed = True
        self._landing = None
        self._backend.destroy()

    def __enter__(self) -> EngramTable:
        """Returns the table; :meth:`destroy` runs on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Destroys the table (collective)."""
        self.destroy()

    def __repr__(self) -> str:
        """Sizes, placement and backend."""
        cfg = self.config
        state = " destroyed" if self._destroyed else ""
        return (
            f"EngramTable(rank {cfg.rank}/{cfg.world_size}, {cfg.num_rows} rows x {cfg.hidden} "
            f"{cfg.dtype}, placement={cfg.placement!r}, backend={self.backend_name!r}{state})"
        )
