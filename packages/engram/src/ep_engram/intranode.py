"""The intranode backend: a JIT gather kernel reading the owners' peer-mapped segments.

Every rank's rows live in ep-jit :class:`~ep_jit.PeerMemory` mapped into every rank of the host:
the host segment (pinned memory on the owner GPU's NUMA node) for ``placement="host"``, the GPU
segment for ``"gpu"``. FP8 scales always live in the owner's GPU segment (they are 1/32 of the
rows at most and are read 4 bytes at a time). A fetch is one kernel on the caller's current
stream with ``num_ctas`` CTAs; no other rank takes part. The kernel writes out-of-range ids as
zero rows and records the first such position; ``hook()`` waits for the fetch on the host and
raises it (``EP_ENGRAM_CHECK_ERRORS``). The ``tile_sorted`` gather first groups the ids by table
page on the same CTAs (:mod:`ep_engram.bucket`; ``EP_ENGRAM_SORT``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ep_engram import knobs
from ep_engram._collective import Meeting
from ep_engram.backend import EngramBackend, TableConfig
from ep_engram.bucket import BucketGrouper, bucket_shift
from ep_engram.kernels import auto_variant, build_gather, smem_of, threads_of
from ep_engram.layout import align, sf_col_stride
from ep_engram.reference import out_of_range_error
from ep_jit.hostwait import wait_event
from ep_jit.peer_memory import PeerMemory

__all__ = ["IntranodeBackend"]

_NO_ERROR = (1 << 63) - 1
_ERROR_WORDS = 8  # hooks of one table that may be pending before a fetch allocates its own word


class _ErrorWords:
    """Pinned words and events that carry each fetch's error position to its hook.

    A fetch takes a slot that no pending hook holds; its hook frees it once it has read the word.
    When every slot is held, the fetch gets a word and an event of its own, so no hook's word is
    ever overwritten. A hook dropped without being called frees its slot once its copy is done.

    Args:
        size: Slots kept (pinned int64 words and events).
    """

    def __init__(self, size: int) -> None:
        self.words = torch.empty(size, dtype=torch.int64, pin_memory=True)
        self.events = [torch.cuda.Event() for _ in range(size)]
        self.holders: list[weakref.ref[Callable[[], None]] | None] = [None] * size
        self.next = 0

    def take(self) -> tuple[torch.Tensor, torch.cuda.Event, int]:
        """A free ``(word [1] int64 pinned, event, slot)``; slot ``-1``: allocated for this one."""
        size = len(self.events)
        for k in range(size):
            i = (self.next + k) % size
            holder = self.holders[i]
            if holder is None or (holder() is None and self.events[i].query()):
                self.holders[i] = None
                self.next = (i + 1) % size
                return self.words[i : i + 1], self.events[i], i
        return torch.empty(1, dtype=torch.int64, pin_memory=True), torch.cuda.Event(), -1

    def hold(self, slot: int, hook: Callable[[], None]) -> None:
        """Marks ``slot`` as read by ``hook`` (until :meth:`free` or the hook's collection)."""
        if slot >= 0:
            self.holders[slot] = weakref.ref(hook)

    def free(self, slot: int) -> None:
        """The hook of ``slot`` has read its word."""
        if slot >= 0:
            self.holders[slot] = None


class IntranodeBackend(EngramBackend):
    """Rows in peer-mapped memory, fetched by a gather kernel (see the module doc).

    Args:
        cfg: The table's configuration (every rank on a CUDA device of one host).
        meeting: The table's meeting point (unused: fetch is not collective here).
    """

    name = "intranode"
    collective_fetch = False

    def __init__(self, cfg: TableConfig, meeting: Meeting) -> None:
        self.cfg = cfg
        shard = cfg.num_entries_per_rank * cfg.row_bytes
        scales = cfg.num_entries_per_rank * cfg.max_sf_bytes_per_row
        host = cfg.placement == "host"
        self.rows_offset = 0
        self.sf_offset = 0 if host else align(shard, 256)
        gpu_bytes = max(self.sf_offset + scales, 256)
        with torch.cuda.device(cfg.device):
            self.memory = PeerMemory(
                cfg.group,
                gpu_bytes,
                cfg.device,
                host_bytes=shard if host else 0,
                timeout_s=cfg.timeout_s,
            )
            mem = self.memory
            rows = mem.host_ptrs if host else mem.peer_ptrs
            self.rows_base = torch.tensor(rows, dtype=torch.int64, device=cfg.device)
            sf = [p + self.sf_offset for p in mem.peer_ptrs]
            self.sf_base = torch.tensor(sf, dtype=torch.int64, device=cfg.device)
            self.error_pos = torch.full((1,), _NO_ERROR, dtype=torch.int64, device=cfg.device)
            self.grouper = BucketGrouper(cfg.device)
            self.error_words = _ErrorWords(_ERROR_WORDS)
        self.shift = bucket_shift(cfg.row_bytes, cfg.num_rows)
        self.sf_packs = 0

    @classmethod
    def from_config(cls, cfg: TableConfig, meeting: Meeting) -> IntranodeBackend:
        """The registry's factory (collective: allocates and maps the segments)."""
        return cls(cfg, meeting)

    def rows_view(self, peer: int) -> torch.Tensor:
        """``[E, row_bytes]`` uint8 view of ``peer``'s rows, mapped on this rank's device."""
        cfg = self.cfg
        shape = (cfg.num_entries_per_rank, cfg.row_bytes)
        if cfg.placement == "host":
            return self.memory.host_tensor(peer, 0, shape, torch.uint8)
        return self.memory.peer_tensor(peer, self.rows_offset, shape, torch.uint8)

    def write(self, storage: torch.Tensor, sf: torch.Tensor | None) -> None:
        """Settles earlier fetches everywhere, copies this rank's rows in, barriers (collective)."""
        cfg = self.cfg
        with torch.cuda.device(cfg.device):
            self.memory.settle(cfg.timeout_s)
            rows = self.rows_view(cfg.rank)
            rows.copy_(storage.contiguous().view(torch.uint8).view(rows.shape))
            if sf is not None:
                packs = sf.contiguous().view(torch.uint8)
                self.memory.tensor(self.sf_offset, packs.shape, torch.uint8).copy_(packs)
                self.sf_packs = sf.shape[1]
            else:
                self.sf_packs = 0
            self.memory.barrier()
            self.memory.synchronize("EngramTable.write")

    def fetch(
        self,
        indices: torch.Tensor,
        out: torch.Tensor,
        sf_out: torch.Tensor | None,
        error: Exception | None,
        num_ctas: int,
    ) -> Callable[[], None] | None:
        """Enqueues the gather on the current stream; returns the hook's completion step."""
        if error is not None:
            raise error
        cfg = self.cfg
        items = indices.numel()
        if items == 0:
            return None
        variant = knobs.engram.kernel
        if variant == "auto":
            variant = auto_variant(cfg.placement, cfg.row_bytes)
        # Column-major scales have a column stride of align(T, 4); with one column the two
        # layouts are the same bytes.
        col_major = sf_out is not None and sf_out.shape[1] > 1 and sf_out.stride(1) != 1
        kernel = build_gather(
            index64=indices.dtype == torch.int64,
            row_bytes=cfg.row_bytes,
            num_sf_packs=self.sf_packs if sf_out is not None else 0,
            sf_col_major=col_major,
            variant=variant,
            unroll=knobs.engram.unroll,
        )
        flat = indices.contiguous()
        order = None
        threads = threads_of(variant, knobs.engram.unroll)
        check = knobs.engram.check_errors
        ctas = max(1, num_ctas)
        with torch.cuda.device(cfg.device):
            if variant == "tile_sorted":
                # Ids of one table page are then read together; the kernel writes each row to
                # its original position.
                flat, order = self.grouper.arrange(flat.view(-1), cfg.num_rows, self.shift, ctas)
            if check:
                self.error_pos.fill_(_NO_ERROR)
            kernel.launch(
                ctas,
                threads,
                flat,
                out,
                sf_out,
                self.error_pos,
                self.rows_base,
                self.sf_base,
                items,
                cfg.num_entries_per_rank,
                indices.shape[1],
                sf_col_stride(indices.shape[0]),
                cfg.world_size,
                order,
                smem=smem_of(variant, cfg.row_bytes),
            )
            if not check:
                return None
            words = self.error_words
            seen, done, slot = words.take()
            seen.copy_(self.error_pos, non_blocking=True)
            done.record()

        def finish() -> None:
            # On a timeout the slot stays held: the copy into it may still land.
            wait_event(done, "EngramTable fetch (hook)", timeout_s=cfg.timeout_s)
            pos = int(seen[0])
            words.free(slot)
            if pos != _NO_ERROR:
                raise out_of_range_error(indices, pos, cfg.num_rows)

        words.hold(slot, finish)
        return finish

    def destroy(self) -> None:
        """Frees the segments (collective: meets every rank)."""
        with torch.cuda.device(self.cfg.device):
            self.memory.destroy()
