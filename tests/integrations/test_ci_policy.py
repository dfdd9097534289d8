"""The skip policy of the integration tests: skip locally, fail under CI=true."""

from __future__ import annotations

import pytest

from tests.integrations import require


def test_missing_extra_skips_locally(monkeypatch):
    """Without CI=true, a missing extra skips the test module."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("safeagent_no_such_extra")


def test_missing_extra_fails_under_ci(monkeypatch):
    """Under CI=true, a missing extra is an ImportError: a failure, never a skip."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError):
        require("safeagent_no_such_extra")
