"""Under ``CI=true`` a skipped integration test is a failed one (CI installs every extra)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.integrations import under_ci


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, Any, Any]:
    report = yield
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which installs every extra: {report.longrepr}"
    return report
