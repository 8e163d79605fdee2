"""Test support: a real daemon process, and helpers for raw socket frames."""

import os

import pytest


def unavailable(reason: str) -> None:
    """A tool or privilege a test needs is missing: skip, saying what to install; under CI, fail.

    CI (``CI`` set, as ``.ci/run`` does) installs every tool the suite needs, so there a skip would hide a
    missing install step.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test: .ci/run installs what it needs)")
    pytest.skip(reason)
