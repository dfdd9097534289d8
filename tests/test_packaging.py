"""The public surface: __all__ is sorted and complete, the version is the package's."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import subprocess
import sys

import safeagent


def test_all_is_sorted_and_complete() -> None:
    """Every public name is exported once, in sorted order, and resolves."""
    assert safeagent.__all__ == sorted(safeagent.__all__)
    for name in safeagent.__all__:
        assert hasattr(safeagent, name), name
    public = {n for n in vars(safeagent) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(safeagent.__all__)


def test_version_comes_from_the_package_metadata() -> None:
    """__version__ is the installed distribution's version."""
    assert safeagent.__version__ == importlib.metadata.version("safeagent")


def test_py_typed_marker_ships() -> None:
    """The package declares its inline types (PEP 561)."""
    assert importlib.resources.files("safeagent").joinpath("py.typed").is_file()


def test_core_import_pulls_in_no_framework() -> None:
    """Importing safeagent loads no agent framework or database driver."""
    code = (
        "import sys, safeagent; "
        "bad = [m for m in ('openai', 'anthropic', 'langchain', 'crewai', 'mcp', 'psycopg') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_console_script_explains_a_missing_cli_extra() -> None:
    """The ``safeagent`` script is installed with the core package, so without the ``cli``
    extra it must say what to install (one line, exit 2: docs/cli.md), not crash."""
    scripts = importlib.metadata.entry_points(group="console_scripts")
    (script,) = [s for s in scripts if s.name == "safeagent"]
    assert script.value.split(":")[0] == "safeagent.__main__"
    code = (
        "import sys; sys.modules['typer'] = None; "  # as if the cli extra were not installed
        f"from {script.module} import {script.attr}; {script.attr}()"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: the safeagent command needs typer: pip install -e '.[cli]' in a SafeAgent clone"
    ]
