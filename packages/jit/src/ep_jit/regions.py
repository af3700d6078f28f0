"""Planning a peer buffer: named, aligned regions at the same offsets on every rank.

Kernels address peer memory by offset, so every rank must lay its buffer out identically; the
plan is computed from host integers only (no GPU), and tested on its own::

    plan = RegionPlan(align=128)
    plan.add("flags", num_ranks * 8)
    plan.add("rows", num_ranks * max_tokens * row_bytes, align=1024)
    plan.offsets["rows"], plan.size  # offsets from the plan's start, total bytes

    double = double_buffered(plan.size, header_bytes=4096)
    double.starts  # (header, header + region): the two parities' regions

Double buffering lets op ``n + 1`` start writing its region while peers still read op ``n``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DoubleBuffered", "RegionPlan", "align_up", "double_buffered"]


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (> 0)."""
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    return -(-value // alignment) * alignment


@dataclass
class RegionPlan:
    """Regions placed one after another, each at an aligned offset.

    Attributes:
        align: Default alignment of each region's start (bytes).
        offsets: Offset of each region by name, in the order added.
        sizes: Bytes of each region by name.
        size: Bytes up to the end of the last region (unpadded).
    """

    align: int = 128
    offsets: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    size: int = 0

    def add(self, name: str, nbytes: int, align: int | None = None) -> int:
        """Places ``nbytes`` at the next offset aligned to ``align`` (default: the plan's).

        Returns:
            The region's offset.

        Raises:
            ValueError: A name used twice, or negative ``nbytes``.
        """
        if name in self.offsets:
            raise ValueError(f"region {name!r} is already planned")
        if nbytes < 0:
            raise ValueError(f"region {name!r}: nbytes must be >= 0, got {nbytes}")
        offset = align_up(self.size, self.align if align is None else align)
        self.offsets[name] = offset
        self.sizes[name] = nbytes
        self.size = offset + nbytes
        return offset

    def padded(self, alignment: int) -> int:
        """The plan's size rounded up to ``alignment``."""
        return align_up(self.size, alignment)


@dataclass(frozen=True)
class DoubleBuffered:
    """Two copies of a region after a header: ``[header | region 0 | region 1]``.

    Attributes:
        header_bytes: Bytes before region 0.
        region_bytes: Bytes of each region (padded).
        starts: Offsets of region 0 and region 1.
        total: Bytes of the whole buffer (padded).
    """

    header_bytes: int
    region_bytes: int
    starts: tuple[int, int]
    total: int


def double_buffered(
    region_bytes: int, header_bytes: int, *, region_align: int = 2 << 20, total_align: int = 2 << 20
) -> DoubleBuffered:
    """Lays out a header and two copies of a region of ``region_bytes`` (padded).

    Args:
        region_bytes: Bytes one region needs.
        header_bytes: Bytes before the first region (control words).
        region_align: Each region's size is padded to this.
        total_align: The whole buffer's size is padded to this.
    """
    region = align_up(region_bytes, region_align)
    return DoubleBuffered(
        header_bytes=header_bytes,
        region_bytes=region,
        starts=(header_bytes, header_bytes + region),
        total=align_up(header_bytes + 2 * region, total_align),
    )
