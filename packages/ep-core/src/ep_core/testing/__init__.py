"""Test helpers shared by the packages' tests, GPU checks and benchmarks.

* :class:`Case`, :func:`make_inputs`, :func:`make_routing`: seeded scenarios that every rank can
  rebuild for every rank (random, skewed and group-limited routing, ``-1`` slots, a rank that
  receives nothing, zero tokens).
* ``expected_*``: an independent per-token oracle of ``docs/design.md``.
* :func:`run_case`, :func:`run_low_latency_case`: run a scenario through any
  :class:`~ep_core.backend.EPBackend` and compare bit for bit (optionally with a reference).
* :data:`HT_CASES`, :data:`LL_CASES`, :func:`run_standard_cases`: the standard scenario set the
  test suites and the multi-node check share.
* :class:`StaleTags`: epoch-tagged words made to look 2^32 ops old, for the tag-refresh tests.
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
from ep_core.testing._standard import HT_CASES, LL_CASES, run_standard_cases
from ep_core.testing._tags import StaleTags

__all__ = [
    "HT_CASES",
    "LL_CASES",
    "ROUTINGS",
    "Case",
    "ExpectedDispatch",
    "ExpectedLowLatency",
    "RankInputs",
    "StaleTags",
    "assert_equal",
    "expected_combine",
    "expected_dispatch",
    "expected_low_latency_combine",
    "expected_low_latency_dispatch",
    "make_inputs",
    "make_routing",
    "run_case",
    "run_low_latency_case",
    "run_standard_cases",
    "seeded",
]
