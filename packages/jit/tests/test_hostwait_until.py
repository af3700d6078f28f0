"""ep_jit.wait_until: a host-driven poll with a deadline (CPU only)."""

from __future__ import annotations

import time

import pytest

import ep_jit
from ep_jit.errors import HostTimeoutError


def test_returns_once_the_predicate_holds() -> None:
    calls = []

    def ready() -> bool:
        calls.append(1)
        return len(calls) >= 50

    ep_jit.wait_until(ready, "fifty polls", timeout_s=5)
    assert len(calls) == 50


def test_times_out_naming_what_it_waited_for() -> None:
    start = time.monotonic()
    with pytest.raises(HostTimeoutError, match="the peer's credit") as info:
        ep_jit.wait_until(lambda: False, "the peer's credit", timeout_s=0.2)
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 2.0
    assert info.value.timeout_s == 0.2


def test_an_exception_of_the_predicate_propagates() -> None:
    def broken() -> bool:
        raise ConnectionError("peer gone")

    with pytest.raises(ConnectionError, match="peer gone"):
        ep_jit.wait_until(broken, "x", timeout_s=5)


def test_timeout_seconds_checks_the_argument() -> None:
    from ep_jit.hostwait import timeout_seconds

    assert timeout_seconds(5) == 5.0 and isinstance(timeout_seconds(5), float)
    assert timeout_seconds(-1) == -1.0  # no limit
    for bad in (True, "10", None):
        with pytest.raises(TypeError, match="timeout_s must be a number of seconds"):
            timeout_seconds(bad)
    with pytest.raises(ValueError, match="got nan"):
        timeout_seconds(float("nan"))
