"""Environment knobs of ep-engram (``EP_ENGRAM_*``).

Every variable is declared once here with its type, default and one line of doc; the values are
read at access time, so a variable exported after import still takes effect::

    from ep_engram import knobs

    knobs.engram.num_ctas  # int, from EP_ENGRAM_NUM_CTAS
    with knobs.engram.scope():  # restores every EP_ENGRAM_* variable on exit
        knobs.engram.kernel = "warp"
"""

from __future__ import annotations

from ep_jit.knobs import KnobGroup, knob_bool, knob_choice, knob_int

__all__ = ["BACKEND_CHOICES", "KERNEL_CHOICES", "SORT_CHOICES", "EngramKnobs", "engram"]

BACKEND_CHOICES = ("auto", "intranode", "reference")
"""Values of ``EP_ENGRAM_BACKEND`` and of ``EngramTable(backend=...)``."""

KERNEL_CHOICES = ("auto", "ilp", "warp", "bulk", "tile", "ring", "ring_bulk", "tile_sorted", "wide")
"""Gather kernel variants of the intranode backend (``auto``: chosen per table)."""

SORT_CHOICES = ("bucket", "torch")
"""Values of ``EP_ENGRAM_SORT``: how ``tile_sorted`` orders the ids before its gather."""


class EngramKnobs(KnobGroup):
    """The knobs of ep-engram (``EP_ENGRAM_*``)."""

    backend = knob_choice(
        "EP_ENGRAM_BACKEND",
        "auto",
        BACKEND_CHOICES,
        "Backend of EngramTable(backend='auto'): auto, intranode (JIT gather kernel) or reference.",
    )
    num_ctas = knob_int(
        "EP_ENGRAM_NUM_CTAS",
        8,
        "CTAs (one per SM) of the intranode gather kernel when fetch() is given no num_ctas.",
    )
    kernel = knob_choice(
        "EP_ENGRAM_KERNEL",
        "auto",
        KERNEL_CHOICES,
        "Intranode gather kernel: auto (ring for rows of 1 KiB or more, warp above 12 KiB, else "
        "wide in GPU memory and tile_sorted in host memory, the fastest of one H100's sweep), ilp "
        "(many 16-byte loads in flight per thread), warp (one row per warp at a time), bulk "
        "(bulk asynchronous copies through shared memory), tile (ilp with rows resolved once per "
        "tile), ring / ring_bulk (a ring of bulk-loaded slots per warp, written out with 16-byte "
        "stores / bulk stores), tile_sorted (tile over the ids grouped by table page first, see "
        "EP_ENGRAM_SORT) or wide (groups of rows per warp, every chunk of a lane loaded before "
        "any store).",
    )
    sort = knob_choice(
        "EP_ENGRAM_SORT",
        "bucket",
        SORT_CHOICES,
        "How the tile_sorted gather orders the ids first: bucket (grouped by 2 MiB of table rows "
        "with a counting sort on the gather's own CTAs) or torch (torch.sort, on every SM).",
    )
    unroll = knob_int(
        "EP_ENGRAM_UNROLL",
        8,
        "16-byte loads each thread keeps in flight in the ilp, tile* and wide gather kernels "
        "(1..16).",
    )
    check_errors = knob_bool(
        "EP_ENGRAM_CHECK_ERRORS",
        True,
        "hook() waits for the fetch on the host and raises for out-of-range row ids.",
    )
    timeout_s = knob_int(
        "EP_ENGRAM_TIMEOUT_S",
        300,
        "Limit in seconds of the host waits of EngramTable (hook, write, destroy; 0: none).",
    )


engram = EngramKnobs()
