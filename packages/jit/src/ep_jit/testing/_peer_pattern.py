"""A recognisable pattern written into every peer's memory, for tests of peer-memory paths.

Rank ``src`` writes ``peer_pattern(src, dst, n)`` into its slice of rank ``dst``'s buffer, by the
kernel of :func:`peer_write_spec` (SM stores through the peer pointer table) or by copies; every
rank then checks that the slice of each source holds exactly that pattern::

    kernel = ep_jit.build(peer_write_spec(world))
    kernel.launch(64, 256, mem.peer_ptrs_dev, offset, rank, n)  # words [rank*n, rank*n+n)
    ...
    assert torch.equal(
        mem.tensor(offset, (world, n), torch.int32)[s], peer_pattern(s, rank, n, dev)
    )
"""

from __future__ import annotations

import torch

from ep_jit.spec import KernelSpec

__all__ = ["peer_pattern", "peer_write_spec"]


def peer_write_spec(num_ranks: int) -> KernelSpec:
    """The kernel of ``<ep_jit/smxx_peer_pattern.cuh>`` for ``num_ranks`` ranks.

    Launch args: ``buffer_ptrs`` (``[R]`` int64 CUDA tensor of peer base addresses), ``offset``
    (bytes), ``rank``, ``n`` (words per source).
    """
    return KernelSpec(
        name=f"ep_jit_peer_write_r{num_ranks}",
        includes=["ep_jit/smxx_peer_pattern.cuh"],
        template="ep_jit::testing::peer_write",
        params=["const uint64_t* buffer_ptrs", "int64_t offset", "int rank", "int64_t n"],
        constants={"kNumRanks": num_ranks},
    )


def peer_pattern(src: int, dst: int, n: int, device: torch.device) -> torch.Tensor:
    """``[n]`` int32: what rank ``src`` writes into rank ``dst`` (mirrors the kernel's pattern)."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    u = (src << 28) ^ (dst << 24) ^ (((i * 2654435761) & 0xFFFFFFFF) >> 8)
    return (u - ((u >> 31) & 1) * (1 << 32)).to(torch.int32)
