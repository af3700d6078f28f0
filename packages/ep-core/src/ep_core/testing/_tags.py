"""Stale epoch tags planted in a symmetric buffer, for the tag-refresh tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


class StaleTags:
    """Makes epoch-tagged 64-bit words look 2^32 ops old, then finds the ones still that old.

    Args:
        sym: The ``ep_jit.SymmetricBuffer`` holding the words.
        areas: ``name -> (offset within a region, number of words)``.
        bases: Byte offsets of the regions in the buffer.
        stale_epoch: An epoch above every op the test runs that has the same low 32 bits as a
            word written 2^32 ops earlier would (e.g. ``2**32 + 6``).
    """

    def __init__(
        self,
        sym: Any,
        areas: Mapping[str, tuple[int, int]],
        bases: Sequence[int],
        stale_epoch: int,
    ) -> None:
        self.sym, self.areas, self.bases = sym, dict(areas), tuple(bases)
        self.tag = stale_epoch & 0xFFFFFFFF

    def _words(self, base: int, area: str) -> torch.Tensor:
        off, count = self.areas[area]
        view: torch.Tensor = self.sym.tensor(base + off, (count,), torch.int64)
        return view

    def plant(self) -> None:
        """Gives every word the stale tag (and a non-zero payload). Collective."""
        word = (self.tag << 32) | 0x5A5A
        word = word - (1 << 64) if word >= 1 << 63 else word
        for base in self.bases:
            for area in self.areas:
                self._words(base, area).fill_(word)
        self.sym.settle()

    def remaining(self) -> dict[str, int]:
        """``"region i: area" -> words still carrying the stale tag``. Collective."""
        self.sym.settle()
        found = {}
        for i, base in enumerate(self.bases):
            for area in self.areas:
                tags = (self._words(base, area) >> 32) & 0xFFFFFFFF
                found[f"region {i}: {area}"] = int((tags == self.tag).sum())
        return found
