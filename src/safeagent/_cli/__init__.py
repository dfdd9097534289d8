"""The operator's command line: ``safeagent ...`` and ``python -m safeagent ...``.

A thin shell over the library: every command opens the store the operator points at,
calls one library function, and prints its answer as a table or (``--json``) as JSON.
Install with ``pip install -e '.[cli]'``; ``safeagent/__init__.py`` never imports
this module. The commands are documented in ``docs/cli.md``.

Exit codes::

    0  ok
    1  a check failed, an id was not found, or the request was refused
       (audit verify found tampering, an unknown id, resolving a record not in doubt,
       records still in doubt after a reconcile pass, a declined confirmation)
    2  usage error or bad input (bad option, bad JSON, bad duration, missing key, text
       that is not valid UTF-8, a --database-url that is not PostgreSQL, an input the
       library refuses with InvalidInputError or ConfigurationError)
    3  the store is missing, unreachable or failed (no database file where pointed,
       PostgreSQL down, StoreError, a schema from a newer SafeAgent, the one row a
       command is about cannot be read)

Which store: ``--database-url`` (PostgreSQL) or ``--db`` (SQLite); without either,
``$SAFEAGENT_DATABASE_URL`` if set, else the SQLite file ``$SAFEAGENT_DB``, else
``./safeagent.db`` (the library's own rule). A command never creates a database: a
missing file or PostgreSQL schema is reported (exit 3). ``demo`` is the exception.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from safeagent import __version__
from safeagent._cli._audit import audit_app, purge, stats
from safeagent._cli._cases import cases_app
from safeagent._cli._common import (
    DEFAULT_SCHEMA,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    DbOpt,
    SchemaOpt,
    UrlOpt,
    cli_command,
    open_store,
    resolve_target,
)
from safeagent._cli._records import in_doubt_app, receipts_app, resolve
from safeagent._keys import check_name

__all__ = ["app", "main"]

DEMO_PATH = Path(__file__).resolve().parents[3] / "examples" / "safe_agent_demo.py"
"""The demo of a source checkout (``<repo>/examples``); a pip-installed package has none."""

# -- the application -------------------------------------------------------------------------

app = typer.Typer(
    name="safeagent",
    help="Look at and repair what the SafeAgent execution guard recorded.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(receipts_app, name="receipts")
app.add_typer(in_doubt_app, name="in-doubt")
app.add_typer(cases_app, name="cases")
app.add_typer(audit_app, name="audit")
app.command("resolve", epilog=EXIT_CODES)(resolve)
app.command("stats", epilog=EXIT_CODES)(stats)
app.command("purge", epilog=EXIT_CODES)(purge)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safeagent {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Look at and repair what the SafeAgent execution guard recorded.

    Every command takes --db PATH (SQLite) or --database-url URL (PostgreSQL, with
    --schema); listings take --json.
    """


# -- demo, mcp -------------------------------------------------------------------------------


@app.command("demo", epilog=EXIT_CODES)
@cli_command
def demo(db: DbOpt = None) -> None:
    """Run the payment demo (an agent retries a charge, with and without the guard).

    It runs examples/safe_agent_demo.py from a source checkout; a pip-installed package has
    no examples folder (exit 2). Its records go to --db (a SQLite file, created if
    needed), else where Guard() puts them: $SAFEAGENT_DATABASE_URL's PostgreSQL, else
    $SAFEAGENT_DB, else ./safeagent.db. Exit 1 if a claim of the demo does not hold."""
    if not DEMO_PATH.is_file():
        raise CliError(
            EXIT_USAGE,
            f"the demo needs a source checkout ({DEMO_PATH} not found); a pip-installed "
            "SafeAgent has no examples folder",
        )
    if db is not None:  # --db wins: the demo and its service process both read these
        os.environ["SAFEAGENT_DB"] = str(db.resolve())
        os.environ.pop("SAFEAGENT_DATABASE_URL", None)
    spec = importlib.util.spec_from_file_location("safeagent_demo", DEMO_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    code = int(module.main())
    raise typer.Exit(EXIT_OK if code == 0 else EXIT_FAILED)


@app.command("mcp", epilog=EXIT_CODES)
@cli_command
def mcp(
    create: Annotated[
        bool, typer.Option("--create", help="Create the database if it does not exist.")
    ] = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
    signal_source: Annotated[
        str | None,
        typer.Option(
            "--signal-source",
            help="Offer the signal_case tool, its signals recorded as this source (the "
            "agent the server is for). Without it the server writes nothing.",
        ),
    ] = None,
) -> None:
    """Serve the guard's tools over MCP (stdio), with receipts in the chosen store.
    Needs pip install -e '.[mcp]'."""
    try:
        serve = importlib.import_module("safeagent.integrations.mcp").serve
    except (ImportError, AttributeError) as exc:
        detail = str(exc)  # the integration's own ImportError already says how to install
        raise CliError(
            EXIT_USAGE,
            detail
            if "pip install" in detail
            else f"the MCP server needs the mcp extra: pip install -e '.[mcp]' in a SafeAgent "
            f"clone ({detail})",
        ) from exc
    target = resolve_target(db, database_url, schema)
    options: dict[str, str] = {"db": target.where}
    if target.kind == "postgres" and target.schema != DEFAULT_SCHEMA:
        params = inspect.signature(serve).parameters.values()
        if not any(p.name == "schema" or p.kind is p.VAR_KEYWORD for p in params):
            raise CliError(EXIT_USAGE, "this MCP server serves the default schema only")
        options["schema"] = target.schema
    if signal_source is not None:
        check_name("signal source", signal_source)  # exit 2 before the store is opened
        options["signal_source"] = signal_source
    if not create:
        open_store(target).close()
    serve(**options)


def main(argv: list[str] | None = None) -> None:
    """The console script: ``safeagent ...``."""
    app(args=argv, prog_name="safeagent")
