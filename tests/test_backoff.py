"""Tests for forwarder.backoff: jittered delays stay in bounds, Retry-After is read and clamped."""

from __future__ import annotations

import random

import pytest

from forwarder.backoff import Backoff, parse_retry_after

NOW = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize("failures", range(1, 40))
def test_delay_stays_within_the_exponential_ceiling(failures: int) -> None:
    backoff = Backoff(base=0.5, cap=60.0)
    rng = random.Random(failures)
    ceiling = min(60.0, 0.5 * 2 ** (failures - 1))
    delays = [backoff.delay(failures, rng) for _ in range(200)]
    assert all(0.0 <= d <= ceiling for d in delays)


def test_delay_is_the_seeded_uniform_draw() -> None:
    assert Backoff(base=1.0, cap=300.0).delay(4, random.Random(7)) == random.Random(7).uniform(0.0, 8.0)


def test_delay_reaches_the_cap_for_many_failures() -> None:
    backoff = Backoff(base=1.0, cap=300.0)
    rng = random.Random(1)
    delays = [backoff.delay(20, rng) for _ in range(500)]
    assert max(delays) <= 300.0
    assert max(delays) > 256.0  # above the previous power of two: the ceiling in force is the cap


@pytest.mark.parametrize("failures", [1024, 1025, 10_000, 10**9])
def test_delay_does_not_overflow_for_huge_failure_counts(failures: int) -> None:
    assert Backoff(base=1.0, cap=300.0).delay(failures, random.Random(3)) == random.Random(3).uniform(0.0, 300.0)


def test_delay_before_any_failure_is_zero() -> None:
    assert Backoff().delay(0, random.Random(0)) == 0.0


def test_backoff_defaults() -> None:
    assert Backoff() == Backoff(base=1.0, cap=300.0)


@pytest.mark.parametrize(("base", "cap"), [(0.0, 300.0), (-1.0, 300.0), (float("nan"), 300.0), (1.0, -1.0)])
def test_backoff_rejects_nonsense_settings(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base=base, cap=cap)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("3600", 3600.0),
        ("3601", 3600.0),
        ("9" * 5000, 3600.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:28:30 -0000", 30.0),
        ("Wed, 21 Oct 2015 08:28:30 +0100", 30.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),
        ("Fri, 31 Dec 2100 23:59:59 GMT", 3600.0),
    ],
)
def test_parse_retry_after_reads_seconds_and_dates(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW, 3600.0) == expected


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "1.5", "7s", "Wed, 32 Oct 2015 07:28:00 GMT",
     "Wed, 21 Oct 99999999999999999999 07:28:00 GMT"],
)
def test_parse_retry_after_gives_none_for_absent_or_garbage(value: str | None) -> None:
    assert parse_retry_after(value, NOW, 3600.0) is None
