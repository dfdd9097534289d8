"""What the sync and async guards share: settings, input validation, and the argument
checks of their public methods. The flows (``_flow``) hold the rules; the drivers
(``_guard``, ``_aguard``) do the I/O."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

from safeagent._audit import Redactor, default_redactor
from safeagent._flow import Call, Settings, encode_result, error_message, stored_error, type_name
from safeagent._keys import (
    canonical_json,
    check_name,
    check_request_id,
    check_text,
    fingerprint,
    fingerprint_payload,
)
from safeagent._policy import (
    CASE_PREFIX,
    DEFAULT_LEASE,
    DEFAULT_WAIT,
    ActionPolicy,
    ExceptionTypes,
    ReconcileHook,
    Seconds,
    exception_types,
    json_default,
    lease_seconds,
    seconds,
)
from safeagent._receipt import ErrorInfo, Status
from safeagent.errors import ConfigurationError, InvalidInputError, InvalidRequestIdError
from safeagent.stores._base import DATABASE_URL_ENV, ClaimFirstStore, Completion, ReceiptStore
from safeagent.stores.sqlite import SQLiteStore

Outcome = Literal["succeeded", "failed", "released", "rerun"]

_HOST = socket.gethostname()


def ended_before_fn(exc: BaseException) -> ErrorInfo:
    """How a claim released because ``exc`` (an interrupt) ended its call before ``fn``
    started is recorded (:meth:`GuardCore._release_unrun` stores the text escaped)."""
    return ErrorInfo(type_name(exc), f"the call ended before fn started: {error_message(exc)}")


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What a proactive reconcile pass did. ``items`` lists ``(namespace, request_id,
    verdict)`` for every in-doubt record looked at; the counters sum them up."""

    checked: int = 0
    happened: int = 0
    failed: int = 0
    not_happened: int = 0
    unknown: int = 0
    no_hook: int = 0
    skipped: int = 0
    items: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)


def tally(items: list[tuple[str, str, str]]) -> ReconcileReport:
    counts = dict.fromkeys(
        ("happened", "failed", "not_happened", "unknown", "no_hook", "skipped"), 0
    )
    for _, _, verdict in items:
        counts[verdict] += 1
    return ReconcileReport(checked=len(items), items=tuple(items), **counts)


_MAX_CACHED_ACTIONS = 1024


@dataclass(frozen=True, slots=True)
class _ActionDefaults:
    not_executed: ExceptionTypes
    outcome_unknown: ExceptionTypes
    lease_ms: int
    reconcile: ReconcileHook | None


def _check_dsn(dsn: str) -> str:
    """A ``$SAFEAGENT_DATABASE_URL`` value: a ``postgresql://`` URL or a libpq keyword
    string (``host=... dbname=...``), checked before anything connects.

    Raises:
        ConfigurationError: anything else (a file path meant for ``$SAFEAGENT_DB``, another
            database's URL, a blank value).
    """
    problem = "it is blank"
    if dsn.startswith(("postgresql://", "postgres://")):
        return dsn
    if dsn and "=" in dsn:
        try:
            from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - optional extra
        except ImportError:  # the store's own import says what to install
            return dsn
        try:
            conninfo_to_dict(dsn)
        except Exception as exc:  # noqa: BLE001 - psycopg.ProgrammingError and kin
            problem = str(exc).strip()
        else:
            return dsn
    elif dsn:
        problem = "it is neither a postgresql:// URL nor a key=value connection string"
    raise ConfigurationError(
        f"${DATABASE_URL_ENV} must be a PostgreSQL URL or connection string ({problem}); "
        f"got {dsn[:60]!r}. An SQLite file goes in $SAFEAGENT_DB"
    )


# libpq's connection keywords (PostgreSQL docs, "Parameter Key Words"): a store string that
# begins with one of them and "=" is a keyword connection string, never an SQLite file name.
_LIBPQ_KEYWORDS = frozenset(
    [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "require_auth",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
    ]
)
_KEYWORD_START = re.compile(r"\s*([A-Za-z_]+)\s*=")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")


def _names_a_server(store: str) -> bool:
    """Whether a ``store`` string names a database server rather than an SQLite file: a
    ``postgresql://`` URL or a libpq keyword string (``host=... dbname=...``).

    Raises:
        ConfigurationError: a URL of another scheme (``mysql://``, ``sqlite:///``...),
            which would otherwise become an SQLite file of that name.
    """
    scheme = _URL_SCHEME.match(store)
    if scheme is not None:
        if scheme.group(1).lower() in ("postgresql", "postgres"):
            return True
        raise ConfigurationError(
            f"store {store[:60]!r} is a {scheme.group(1)}:// URL: SafeAgent's stores are an "
            "SQLite file (give its path) and PostgreSQL (a postgresql:// URL or a libpq "
            "connection string)"
        )
    keyword = _KEYWORD_START.match(store)
    return keyword is not None and keyword.group(1).lower() in _LIBPQ_KEYWORDS


def scope(default: str, namespace: str | None, all_namespaces: bool) -> str | None:
    """The namespace a listing reads: ``namespace`` (default ``default``), or ``None`` for
    every namespace when ``all_namespaces`` is true.

    Raises:
        InvalidInputError: both a namespace and ``all_namespaces=True`` (one of them would
            be ignored), or a namespace that is not a valid name.
    """
    if all_namespaces is not True and all_namespaces is not False:
        raise InvalidInputError(f"all_namespaces must be True or False, not {all_namespaces!r}")
    if all_namespaces:
        if namespace is not None:
            raise InvalidInputError(
                f"namespace={namespace!r} and all_namespaces=True: pass one of them"
            )
        return None
    return default if namespace is None else check_name("namespace", namespace)


class GuardCore:
    """Settings and validation shared by :class:`Guard` and :class:`AsyncGuard`."""

    def __init__(
        self,
        store: ReceiptStore | str | os.PathLike[str] | None = None,
        *,
        namespace: str = "default",
        lease: Seconds = DEFAULT_LEASE,
        wait: Seconds = DEFAULT_WAIT,
        durability: str | None = None,
        not_executed: Collection[type[BaseException]] = (),
        outcome_unknown: Collection[type[BaseException]] = (),
        actions: Mapping[str, ActionPolicy] | None = None,
        redact: Redactor = default_redactor,
        result_encoder: Callable[[Any], Any] = json_default,
        owner: str | None = None,
    ) -> None:
        namespace = check_name("namespace", namespace)
        self.namespace = namespace
        self.lease = lease_seconds(lease)
        self.wait = seconds("wait", wait, allow_zero=True)
        self.not_executed = exception_types("not_executed", not_executed)
        self.outcome_unknown = exception_types("outcome_unknown", outcome_unknown)
        # Read-only: the per-action settings below are resolved once and cached.
        self.actions: Mapping[str, ActionPolicy] = MappingProxyType(
            {check_name("action", name): policy for name, policy in (actions or {}).items()}
        )
        self._defaults: dict[str, _ActionDefaults] = {}
        for name, policy in self.actions.items():
            if not isinstance(policy, ActionPolicy):
                raise ConfigurationError(f"actions[{name!r}] must be an ActionPolicy")
        if not callable(redact) or not callable(result_encoder):
            raise ConfigurationError("redact and result_encoder must be callables")
        self.redact = redact
        self.result_encoder = result_encoder
        self._owner = None if owner is None else check_name("owner", owner)
        dsn = os.environ.get(DATABASE_URL_ENV) if store is None else None
        if dsn:
            dsn = _check_dsn(dsn.strip())
        if not dsn and isinstance(store, str) and _names_a_server(store):
            dsn = _check_dsn(store.strip())
        if dsn:  # the CLI's rule too: a set $SAFEAGENT_DATABASE_URL wins over $SAFEAGENT_DB
            from safeagent.stores.postgres import PostgresStore  # noqa: PLC0415 - optional extra

            self.store: ReceiptStore = PostgresStore(dsn, durability=durability or "durable")
            self._owns_store = True
        elif store is None or isinstance(store, (str, os.PathLike)):
            self.store = SQLiteStore(store, durability=durability or "durable")
            self._owns_store = True
        else:
            store_mode = getattr(store, "durability", None)
            if durability is not None and store_mode in (None, "memory"):
                raise ConfigurationError(
                    f"durability={durability!r} is for a store the guard opens itself; "
                    f"{type(store).__name__} has no durability mode"
                    + (": it keeps nothing across a restart" if store_mode == "memory" else "")
                )
            if durability is not None and store_mode != durability:
                raise ConfigurationError(
                    f"durability={durability!r} conflicts with the store's own mode "
                    f"{store_mode!r}: set it on the store"
                )
            self.store = store
            self._owns_store = False
        # A store that can claim before it reads (PostgreSQL): see Settings.claim_first; it
        # says per call whether to (ClaimFirstStore.claim_first).
        self._claim_first = hasattr(self.store, "claim_first") and all(
            callable(getattr(self.store, name, None)) for name in ("claim_new", "look")
        )

    # -- settings -------------------------------------------------------------------------

    def _ns(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else check_name("namespace", namespace)

    def _scope(self, namespace: str | None, all_namespaces: bool) -> str | None:
        """The namespace a listing reads (``None``: every namespace)."""
        return scope(self.namespace, namespace, all_namespaces)

    def _owner_name(self) -> str:
        return self._owner or f"{_HOST}:{os.getpid()}:{threading.current_thread().name}"

    def _settings(self) -> Settings:
        return Settings(
            self._owner_name(),
            self.redact,
            self.result_encoder,
            self._claim_first and cast(ClaimFirstStore, self.store).claim_first is True,
        )

    def _release_unrun(
        self,
        namespace: str,
        request_id: str,
        token: int,
        action: str,
        execution_id: str,
        error: ErrorInfo,
        flag: str,
    ) -> None:
        """Release a claim whose caller was cancelled or interrupted before ``fn`` started
        (RELEASED: the next call runs ``fn``), audited with ``error`` and ``{flag: True}``.
        Never raises an ``Exception``: a claim left behind reads as in doubt after its
        lease, which is safe."""
        with contextlib.suppress(Exception):
            self.store.complete(
                Completion(
                    namespace=namespace,
                    request_id=request_id,
                    fencing_token=token,
                    status=Status.RELEASED,
                    result_json=None,
                    error=stored_error(error.type, error.message),  # storable text
                    actor=self._owner_name(),
                    detail={flag: True},
                    action=action,
                    execution_id=execution_id,
                )
            )

    def _lease_ms(self, action: str, lease: Seconds | None = None) -> int:
        if lease is not None:
            return int(1000 * lease_seconds(lease))
        policy = self.actions.get(action)
        if policy is not None and policy.lease is not None:
            return int(1000 * lease_seconds(policy.lease))
        return int(1000 * self.lease)

    def _exceptions(
        self,
        action: str,
        not_executed: Collection[type[BaseException]] | None,
        outcome_unknown: Collection[type[BaseException]] | None,
    ) -> tuple[ExceptionTypes, ExceptionTypes]:
        policy = self.actions.get(action)
        if not_executed is None:
            not_executed = (
                policy.not_executed
                if policy is not None and policy.not_executed is not None
                else self.not_executed
            )
        if outcome_unknown is None:
            outcome_unknown = (
                policy.outcome_unknown
                if policy is not None and policy.outcome_unknown is not None
                else self.outcome_unknown
            )
        return (
            exception_types("not_executed", not_executed),
            exception_types("outcome_unknown", outcome_unknown),
        )

    def _reconcile_hook(self, action: str) -> ReconcileHook | None:
        policy = self.actions.get(action)
        return None if policy is None else policy.reconcile

    # -- validation -----------------------------------------------------------------------

    def _prepare(
        self,
        request_id: str,
        action: str,
        payload: Any,
        namespace: str | None,
        exclude: Collection[str],
        wait: Seconds | None,
        lease: Seconds | None,
        not_executed: Collection[type[BaseException]] | None,
        outcome_unknown: Collection[type[BaseException]] | None,
        *,
        settle_case: str | None = None,
    ) -> Call:
        """Validate one call and compute its fingerprint, before anything is recorded."""
        request_id = check_request_id(request_id)
        if settle_case is None and request_id.startswith(CASE_PREFIX):
            raise InvalidRequestIdError(
                f"request ids starting with {CASE_PREFIX!r} are reserved for case "
                "settlement (FinalityGate.settle)",
                request_id=request_id,
            )
        action = check_name("action", action)
        ns = self._ns(namespace)
        if isinstance(exclude, str):
            raise InvalidInputError("exclude must be a collection of field names, not a str")
        payload_bytes = canonical_json(payload)
        covered = (
            canonical_json(fingerprint_payload(payload, exclude)) if exclude else payload_bytes
        )
        defaults = self._defaults.get(action)
        if defaults is None:
            defaults = self._action_defaults(action)
        if not_executed is None and outcome_unknown is None:
            ne, ou = defaults.not_executed, defaults.outcome_unknown
        else:
            ne, ou = self._exceptions(action, not_executed, outcome_unknown)
        return Call(
            namespace=ns,
            request_id=request_id,
            action=action,
            payload=payload,
            payload_json=payload_bytes.decode(),
            fingerprint=fingerprint(action, covered),
            lease_ms=defaults.lease_ms if lease is None else self._lease_ms(action, lease),
            wait=self.wait if wait is None else seconds("wait", wait, allow_zero=True),
            not_executed=ne,
            outcome_unknown=ou,
            reconcile=defaults.reconcile,
            settle_case=settle_case,
        )

    def _action_defaults(self, action: str) -> _ActionDefaults:
        """The guard's and the action's settings for ``action``, resolved once: the hot
        path reads them from a dict instead of re-validating exception types per call."""
        ne, ou = self._exceptions(action, None, None)
        defaults = _ActionDefaults(ne, ou, self._lease_ms(action), self._reconcile_hook(action))
        if len(self._defaults) < _MAX_CACHED_ACTIONS:
            self._defaults[action] = defaults
        return defaults

    def _resolution_args(
        self,
        request_id: str,
        outcome: Outcome | Status,
        by: str,
        reason: str,
        namespace: str | None,
        result: Any,
        error_type: str,
        error_message: str | None,
    ) -> tuple[str, Status, str | None, ErrorInfo | None, bool]:
        """Validate a resolution: ``(namespace, status, result_json, error, rerun)``."""
        ns = self._ns(namespace)
        request_id = check_request_id(request_id)
        by = check_name("by", by)
        check_text("reason", reason)
        rerun = outcome == "rerun"
        try:
            status = (
                Status.RELEASED
                if rerun
                else Status(outcome.upper() if isinstance(outcome, str) else outcome)
            )
        except ValueError:
            status = Status.PENDING  # rejected just below
        if status not in (Status.SUCCEEDED, Status.FAILED, Status.RELEASED):
            raise InvalidInputError(
                f"outcome must be 'succeeded', 'failed', 'released' or 'rerun', got {outcome!r}"
            )
        result_json = None
        if status is Status.SUCCEEDED:  # stored like fn's results, so replays look alike
            result_json, unstorable = encode_result(result, self.result_encoder)
            if unstorable is not None:
                raise InvalidInputError(f"result cannot be stored: {unstorable.message}")
        check_text("error_type", error_type)
        if error_message is not None:
            check_text("error_message", error_message, blank=True)
        error = (
            stored_error(error_type, error_message or reason) if status is Status.FAILED else None
        )
        return ns, status, result_json, error, rerun
