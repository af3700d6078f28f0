"""DeepEP V1's ``Config`` and buffer-size hints, for :mod:`ep_elastic.compat`.

The numbers are V1's: its tuned per-rank-count tables and its byte formulas, so code that sizes
``num_nvl_bytes`` / ``num_rdma_bytes`` with them gets the sizes it got from V1. Of a ``Config``
only ``num_sms`` reaches the kernels here; the chunk sizes describe V1's ring buffers, which this
library does not have (see ``docs/migrating.md``).
"""

from __future__ import annotations

from ep_core.validation import check_positive_int

__all__ = [
    "V1_BUFFER_ALIGNMENT",
    "Config",
    "combine_config",
    "dispatch_config",
    "low_latency_rdma_size_hint",
]

V1_NUM_MAX_NVL_PEERS = 8
"""GPUs per node V1 assumes (``rank = node * 8 + local``)."""

V1_BUFFER_ALIGNMENT = 128
"""V1 requires ``num_nvl_bytes`` and ``num_rdma_bytes`` to be multiples of this."""

_MAX_TOPK, _MAX_SCALES = 128, 128
"""Per-token top-k and scale slots V1 reserves in its buffer-size hints."""

_SOURCE_META_BYTES = 8
"""V1's per-token source metadata (two int32)."""

# (nvl send chunk, nvl recv chunk, rdma send chunk, rdma recv chunk) per rank count; V1's tables.
_DISPATCH_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (32, 288, 8, 128),
    32: (32, 288, 8, 128),
    48: (32, 288, 8, 128),
    64: (32, 288, 8, 128),
    96: (20, 480, 12, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
_COMBINE_TABLE: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _v1_round(num_bytes: int) -> int:
    """V1's hint rounding: up to a multiple of 128 (``ceil`` on the 128-byte grid)."""
    return (num_bytes + 127) // 128 * 128


class Config:
    """V1's performance configuration of normal dispatch/combine.

    Only ``num_sms`` has an effect here (the SM count of the kernel backends); the chunked
    token counts size V1's per-channel ring buffers and are kept for the size hints.

    Args:
        num_sms: SMs for the normal kernels (``>= 0``).
        num_max_nvl_chunked_send_tokens: V1's NVLink send chunk (``> 0``, ``< recv``).
        num_max_nvl_chunked_recv_tokens: V1's NVLink ring-buffer tokens per channel.
        num_max_rdma_chunked_send_tokens: V1's RDMA send chunk (``> 0``).
        num_max_rdma_chunked_recv_tokens: V1's RDMA ring-buffer tokens; rounded up to a multiple
            of the send chunk, which must then be at most half of it.

    Raises:
        TypeError: A count is not an int.
        ValueError: The counts break V1's constraints above (the message names the value).
    """

    def __init__(
        self,
        num_sms: int,
        num_max_nvl_chunked_send_tokens: int,
        num_max_nvl_chunked_recv_tokens: int,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        check_positive_int("num_sms", num_sms, minimum=0)
        nvl_send = check_positive_int(
            "num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens
        )
        nvl_recv = check_positive_int(
            "num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens
        )
        if nvl_send >= nvl_recv:
            raise ValueError(
                f"num_max_nvl_chunked_send_tokens ({nvl_send}) must be less than "
                f"num_max_nvl_chunked_recv_tokens ({nvl_recv})"
            )
        rdma_send = check_positive_int(
            "num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens
        )
        rdma_recv = _align(
            check_positive_int(
                "num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens
            ),
            rdma_send,
        )
        if rdma_send > rdma_recv // 2:
            raise ValueError(
                f"num_max_rdma_chunked_send_tokens ({rdma_send}) must be at most half of "
                f"num_max_rdma_chunked_recv_tokens ({rdma_recv} after rounding up to the chunk)"
            )
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = nvl_send
        self.num_max_nvl_chunked_recv_tokens = nvl_recv
        self.num_max_rdma_chunked_send_tokens = rdma_send
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def __repr__(self) -> str:
        return (
            f"Config(num_sms={self.num_sms}, "
            f"num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
            f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
            f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
            f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})"
        )

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """V1's NVLink buffer bytes for this config (128-byte aligned).

        Args:
            hidden_bytes: Bytes of one token's hidden vector.
            num_ranks: ``R``: below 8, or a multiple of 8 (then ``num_sms`` must be even).

        Raises:
            ValueError: ``num_ranks`` or ``num_sms`` outside V1's constraints.
        """
        check_positive_int("hidden_bytes", hidden_bytes)
        check_positive_int("num_ranks", num_ranks)
        peers = V1_NUM_MAX_NVL_PEERS
        if num_ranks >= peers and num_ranks % peers != 0:
            raise ValueError(f"num_ranks {num_ranks} must be below {peers} or a multiple of it")
        if num_ranks > peers and self.num_sms % 2 != 0:
            raise ValueError(f"num_sms {self.num_sms} must be even for more than {peers} ranks")
        num_rdma_ranks = max(num_ranks // peers, 1)
        num_nvl_ranks = min(num_ranks, peers)
        slots = (self.num_sms // 2) * num_nvl_ranks
        tokens = slots * self.num_max_nvl_chunked_recv_tokens
        per_token = hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * (8 + 4) + _MAX_SCALES * 4
        return _v1_round(slots * (2 * num_rdma_ranks + 3) * 4 + tokens * per_token)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """V1's RDMA buffer bytes: 0 up to 8 ranks (one node), else its formula.

        Raises:
            ValueError: More than 8 ranks that are not a multiple of 8, or an odd ``num_sms``.
        """
        check_positive_int("hidden_bytes", hidden_bytes)
        check_positive_int("num_ranks", num_ranks)
        peers = V1_NUM_MAX_NVL_PEERS
        if num_ranks <= peers:
            return 0
        if num_ranks % peers != 0:
            raise ValueError(f"num_ranks {num_ranks} must be a multiple of {peers}")
        if self.num_sms % 2 != 0:
            raise ValueError(f"num_sms {self.num_sms} must be even")
        slots = (self.num_sms // 2) * (num_ranks // peers)
        tokens = slots * self.num_max_rdma_chunked_recv_tokens
        per_token = hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * (8 + 4) + _MAX_SCALES * 4 + 16
        return _v1_round(slots * (peers * 2 + 2) * 2 * 4 + tokens * per_token * 2)


def _table_config(
    table: dict[int, tuple[int, int, int, int]], num_sms: int, num_ranks: int
) -> Config:
    row = table.get(num_ranks)
    if row is None:
        raise ValueError(
            f"no tuned config for {num_ranks} ranks; DeepEP V1's tables cover {sorted(table)}"
        )
    return Config(num_sms, *row)


def dispatch_config(num_sms: int, num_ranks: int) -> Config:
    """V1's recommended dispatch ``Config`` for ``num_ranks`` (``ValueError`` if untabulated)."""
    return _table_config(_DISPATCH_TABLE, num_sms, num_ranks)


def combine_config(num_sms: int, num_ranks: int) -> Config:
    """V1's recommended combine ``Config`` for ``num_ranks`` (``ValueError`` if untabulated)."""
    return _table_config(_COMBINE_TABLE, num_sms, num_ranks)


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """V1's low-latency RDMA buffer bytes (BF16 sizing, two alternating buffers).

    Raises:
        TypeError, ValueError: A non-positive or non-int argument, or ``hidden / 128`` float
            scales not fitting in ``hidden`` bytes (V1's constraint).
    """
    nmax = check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    check_positive_int("hidden", hidden)
    check_positive_int("num_ranks", num_ranks)
    check_positive_int("num_experts", num_experts)
    num_scales = hidden // 128
    if num_scales * 4 > hidden:
        raise ValueError(f"hidden {hidden} is too small for its {num_scales} float scales")
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    send = max(nmax * dispatch_msg, num_experts * nmax * combine_msg)
    recv = num_experts * nmax * max(dispatch_msg, combine_msg)
    signal = _align(num_experts * 4, 128)
    total = 2 * (send + recv + signal)
    # V1 rounds with "+ alignment" rather than "+ alignment - 1".
    return (total + V1_BUFFER_ALIGNMENT) // V1_BUFFER_ALIGNMENT * V1_BUFFER_ALIGNMENT
