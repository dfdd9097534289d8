"""Tests of the SDK integrations, against the real ``openai``, ``anthropic`` and
``openai-agents`` packages (their own response types; no network).

:func:`require` imports an extra's package at the top of a test module: without it the
module is skipped locally, but under ``CI=true`` (CI installs every extra) the import
error fails the run instead. ``conftest.py`` here turns any other skip into a failure
under ``CI=true`` as well.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


def under_ci() -> bool:
    """``True`` when running in CI (``CI=true``), where skipping is a failure."""
    return os.environ.get("CI") == "true"


def require(module: str) -> ModuleType:
    """Import ``module``: skip the calling test module when it is missing, except under
    ``CI=true``, where the ``ImportError`` propagates and fails the collection."""
    if under_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` as a newcomer would: a script, in a fresh directory, with the
    default database (``SAFEAGENT_DB`` unset)."""
    env = {k: v for k, v in os.environ.items() if k != "SAFEAGENT_DB"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
