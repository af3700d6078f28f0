"""Test helpers shared by the packages' tests, GPU checks and benchmarks.

* :class:`Case`, :func:`make_inputs`, :func:`make_routing`: seeded scenarios that every rank can
  rebuild for every rank (random, skewed and group-limited routing, ``-1`` slots, a rank that
  receives nothing, zero tokens).
* ``expected_*``: an independent per-token oracle of ``docs/design.md``.
* :func:`run_case`, :func:`run_low_latency_case`: run a scenario through any
  :class:`~ep_core.backend.EPBackend` and compare bit for bit (optionally with a reference).
"""

from __future__ import annotations

from ep_core.testing._checks import assert_equal, run_case, run_low_latency_case
from ep_core.testing._inputs import ROUTINGS, Case, RankInputs, make_inputs, make_routing, seeded
from ep_core.testing._oracle import (
    ExpectedDispatch,
    ExpectedLowLatency,
    expected_combine,
    expected_dispatch,
    expected_low_latency_combine,
    expected_low_latency_dispatch,
)

__all__ = [
    "ROUTINGS",
    "Case",
    "ExpectedDispatch",
    "ExpectedLowLatency",
    "RankInputs",
    "assert_equal",
    "expected_combine",
    "expected_dispatch",
    "expected_low_latency_combine",
    "expected_low_latency_dispatch",
    "make_inputs",
    "make_routing",
    "run_case",
    "run_low_latency_case",
    "seeded",
]
