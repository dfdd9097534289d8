"""``python -m safeagent``: the operator's command line (see :mod:`safeagent._cli`)."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the CLI, or explain how to install it when its extra is missing."""
    try:
        from safeagent._cli import main as cli_main  # noqa: PLC0415 - optional extra
    except ModuleNotFoundError as exc:
        if exc.name not in ("typer", "rich", "click"):
            raise
        sys.stderr.write(
            f"error: the safeagent command needs {exc.name}: "
            "pip install -e '.[cli]' in a SafeAgent clone\n"
        )
        sys.exit(2)
    cli_main()


if __name__ == "__main__":
    main()
