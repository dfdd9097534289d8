"""Preparing and running tool calls, as the tool-call integrations share it: a
:class:`ToolCall` is prepared (:func:`prepare`: the tool resolved, its arguments bound, the
request id derived) into a :class:`Prepared` call or a rejection, and run through the guard
(:func:`execute`, :func:`aexecute`, :func:`run_calls`) to an :class:`Outcome`, whose
content is what the model is shown. The checks of the options and the tools, made before
any call runs, are in :mod:`safeagent.integrations._toolspec`; running an ``async`` tool
body across threads and loops is in :mod:`safeagent.integrations._loops`. No SDK is
imported here.

**Request ids** (docs/design.md section 6). By default the request id of a tool call is derived
from what the call *is*: :func:`safeagent.derive_request_id` over ``(scope, tool name,
arguments)``, the arguments bound through the tool function's signature with its defaults
applied (a default that is no JSON value as it is, such as an ``Enum`` member or a
``Decimal``, by its JSON form: :class:`~safeagent.integrations._toolspec.ToolSpec`),
minus the volatile ones the caller names in ``exclude``. A model that re-emits the
same call after a retry mints a new tool-call id, but gets the same request id, so the
retry replays instead of running again. With ``key="tool_call_id"`` the tool-call id is the
request id instead, and :class:`~safeagent.errors.TransportIdWarning` is emitted.

**Outcomes**. A call either ran (or replayed) successfully, failed (the stored failure, on
the first call and on every replay), was released (the tool raised ``NotExecuted`` or a
type declared "not executed": the next call runs again), or was rejected before anything
ran or was recorded (an unknown tool, or arguments that are not a JSON object that fits
the function's signature). Everything else propagates: SafeAgent's own errors
(``InProgressError``, ``OutcomeUnknownError``, ``ConflictError``, ``StoreError``,
``ResultNotSerializableError``, ...) and an exception that left the record in doubt (a type
declared "outcome unknown").

**Content** (what the model sees). A ``str`` result as it is, any other result as JSON
(``json.dumps(result, ensure_ascii=False)``); a failure as ``"Error: <Type>: <message>"``
with the short name of the stored exception type. Failures are rendered from the stored
error type and message, so a replay shows the model exactly what the first call showed;
with ``replay_marker`` set, replays are prefixed with it (:data:`REPLAY_MARKER` is the
suggested one).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from safeagent import (
    AsyncGuard,
    ErrorInfo,
    ExecutionContext,
    Guard,
    Receipt,
    Status,
    bind_arguments,
    derive_request_id,
)
from safeagent._decide import FrameworkStop
from safeagent._keys import MAX_DEPTH, check_request_id, nested_deeper
from safeagent._policy import CASE_PREFIX
from safeagent.errors import (
    InvalidInputError,
    InvalidRequestIdError,
    ReplayedFailureError,
)
from safeagent.integrations._toolspec import (
    UNAPPLIED,
    CallSettings,
    KeyMode,
    ToolFunction,
    ToolSpec,
    hoist_excluded,
    is_async_callable,
)


class ControlFlow(FrameworkStop):
    """A framework's own control flow, raised through a tool body on purpose, before its
    work, for the framework to call the tool again later: LangGraph's ``interrupt()``
    (``GraphInterrupt``: the graph pauses and re-runs the tool from its start on resume),
    MCP's ``UrlElicitationRequiredError`` (the client retries once the user has acted).
    Recorded as a final failure, it would be replayed on that later call and the work
    never done; so the body's wrapper raises this instead, the guard releases the claim
    (a ``FrameworkStop``, whatever ``outcome_unknown`` names), and the wrapper re-raises
    :attr:`original` to the framework.
    Like every ``NotExecuted``, it holds only if the body did no side effect before it:
    LangGraph's own advice is to put side effects after ``interrupt()``."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(
            f"{type(original).__name__}: the framework stopped the tool before its work, "
            "to call it again"
        )
        self.original = original


def note_raised(
    exc: BaseException, raised: list[BaseException], kinds: tuple[type[BaseException], ...]
) -> None:
    """In a tool body's ``except``, before its bare ``raise``: note ``exc`` in ``raised``,
    and raise a :class:`ControlFlow` around it instead if it is one of ``kinds``."""
    raised.append(exc)
    if kinds and isinstance(exc, kinds):
        raise ControlFlow(exc) from exc


REPLAY_MARKER = "[replayed] "
"""A short marker to pass as ``replay_marker=``: replayed content is prefixed with it."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call as the model emitted it, SDK shapes aside.

    Attributes:
        call_id: the transport id (``tool_call_id``, ``call_id``, ``tool_use_id``).
        name: the tool's name.
        arguments: the JSON text (OpenAI) or the parsed object (Anthropic).
        kind: ``"function"``; other kinds (OpenAI custom tools) are rejected.
        extra: SDK fields echoed back with the result (the Responses API ``caller``, an
            Anthropic ``toolset_name``).
    """

    call_id: str
    name: str
    arguments: Any
    kind: str = "function"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one tool call came to.

    Attributes:
        kind: ``"succeeded"``, ``"failed"`` (a stored failure), ``"released"`` (the tool
            said it did not happen; the next call runs again) or ``"rejected"`` (nothing
            ran and nothing was recorded).
        result: the stored result (a JSON value) when ``kind == "succeeded"``.
        error: the failure's type and message otherwise.
        replay: ``True`` when the tool did not run for this call (a stored outcome).
        receipt: the guard's receipt, when there is one.
        exception: the exception the tool raised, on the call that ran it.
    """

    kind: Literal["succeeded", "failed", "released", "rejected"]
    result: Any = None
    error: ErrorInfo | None = None
    replay: bool = False
    receipt: Receipt | None = None
    exception: BaseException | None = None

    @property
    def is_error(self) -> bool:
        """``True`` unless the call succeeded."""
        return self.kind != "succeeded"

    def content(self, replay_marker: str | None = None) -> str:
        """The text the model is shown (see the module docstring)."""
        if self.kind == "succeeded":
            text = render(self.result)
        else:
            text = error_text(self.error or ErrorInfo("Error", ""))
        if self.replay and replay_marker:
            text = replay_marker + text
        return text


@dataclass(frozen=True, slots=True)
class Prepared:
    """A call ready to run through the guard."""

    func: ToolFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    request_id: str
    action: str
    payload: dict[str, Any]
    exclude: frozenset[str]


# -- preparing a call ------------------------------------------------------------------------


def rejected(error_type: str, message: str) -> Outcome:
    """A call refused before anything ran or was recorded."""
    return Outcome("rejected", error=ErrorInfo(error_type, message))


ARGUMENT_DEPTH = MAX_DEPTH - 1
"""Deepest nesting of a call's arguments (the arguments object is level 1): a derived
request id covers ``[scope, tool, arguments]``, one level more, and canonical JSON takes
at most :data:`safeagent._keys.MAX_DEPTH`."""


def _nested_too_deep() -> Outcome:
    return rejected("InvalidArguments", f"arguments nest deeper than {ARGUMENT_DEPTH} levels")


def parse_arguments(arguments: Any) -> dict[str, Any] | Outcome:
    """The call's arguments as a dict, from JSON text or an already parsed object; or the
    ``InvalidArguments`` rejection. Arguments nested deeper than :data:`ARGUMENT_DEPTH`
    are refused here with one message on every Python version, whether ``json.loads``
    parses them (3.12 and later take thousands of levels) or gives up with
    ``RecursionError`` (3.11 past about a thousand), which would otherwise end the whole
    turn."""
    if isinstance(arguments, (str, bytes, bytearray)):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except RecursionError:
            return _nested_too_deep()
        except ValueError as exc:
            return rejected("InvalidArguments", f"arguments are not valid JSON: {exc}")
    elif arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping) or not all(isinstance(k, str) for k in arguments):
        return rejected("InvalidArguments", "arguments must be a JSON object")
    if nested_deeper(arguments, ARGUMENT_DEPTH):
        return _nested_too_deep()
    return dict(arguments)


def request_id_for(
    scope: str,
    action: str,
    payload: Mapping[str, Any],
    excluded: Collection[str],
    key: KeyMode,
    call_id: str,
) -> str:
    """The request id of a call whose bound arguments are ``payload``.

    Raises:
        InvalidInputError: the arguments are not JSON values (NaN, huge integers, ...).
    """
    derived = derive_request_id(
        scope, action, {k: v for k, v in payload.items() if k not in excluded}
    )
    return call_id if key == "tool_call_id" else derived


def prepare(
    call: ToolCall, tools: Mapping[str, ToolSpec], options: CallSettings
) -> Prepared | Outcome:
    """Resolve the tool, bind its arguments and derive the request id; or the rejection
    the model is shown when that fails (nothing ran, nothing was recorded). A default the
    call leaves to the function counts as its JSON form (:attr:`ToolSpec.defaults`)."""
    if call.kind != "function":
        return rejected(
            "UnsupportedToolCall", f"{call.kind} tool calls are not run here; use function tools"
        )
    spec = tools.get(call.name)
    if spec is None:
        return rejected("UnknownTool", f"no tool named {call.name!r}")
    func = spec.func
    if options.key == "tool_call_id":  # the transport id is the request id: check it here
        try:
            check_request_id(call.call_id)
        except InvalidRequestIdError as exc:
            return rejected("InvalidToolCallId", str(exc))
        if call.call_id.startswith(CASE_PREFIX):
            return rejected(
                "InvalidToolCallId",
                f"tool-call ids starting with {CASE_PREFIX!r} are reserved for case settlement",
            )
    parsed = parse_arguments(call.arguments)
    if isinstance(parsed, Outcome):
        return parsed
    excluded = options.excluded(call.name)
    try:
        payload = bind_arguments(func, (), parsed)
    except InvalidInputError as exc:
        cause = exc.__cause__  # bind_arguments names the function object; the model needs less
        return rejected("InvalidArguments", str(cause if isinstance(cause, TypeError) else exc))
    if spec.defaults:  # the defaults the call leaves to the function, as they count
        given = {k: v for k, v in payload.items() if k in parsed or k not in spec.defaults}
        left = {k: spec.defaults[k] for k in payload if k not in given}
        payload = {**given, **{k: v for k, v in left.items() if v is not UNAPPLIED}}
    if excluded:
        payload = hoist_excluded(payload, spec.accepted.var_keyword, excluded)
    if nested_deeper(payload, ARGUMENT_DEPTH):  # a **kwargs dict is one level more
        return _nested_too_deep()
    try:
        request_id = request_id_for(
            options.scope, call.name, payload, excluded, options.key, call.call_id
        )
    except InvalidInputError as exc:
        return rejected("InvalidArguments", str(exc))
    return Prepared(func, (), parsed, request_id, call.name, payload, excluded)


# -- running a call --------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` with pydantic models (anything with ``model_dump``) dumped to JSON values,
    at any depth of lists, tuples and dicts; everything else as it is (the guard's
    ``result_encoder`` then applies)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def storable(value: Any) -> Any:
    """What a guarded tool body returns for the guard to store: ``plain(value)``, or
    ``value`` unchanged when dumping it raises. The tool has already run, so a conversion
    that fails is not the tool's failure: the guard's result encoder meets the same value,
    records the call as succeeded without a stored result and raises
    :class:`~safeagent.errors.ResultNotSerializableError` (docs/exceptions.md), so the call
    is never recorded as FAILED, a status an operator may re-run."""
    try:
        return plain(value)
    except Exception:  # noqa: BLE001 - any dump error: the encoder reports it
        return value


def render(value: Any) -> str:
    """A result as the model is shown it: a ``str`` as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def error_text(error: ErrorInfo) -> str:
    """A failure as the model is shown it: ``"Error: <Type>: <message>"``."""
    short = error.type.rsplit(".", 1)[-1]
    return f"Error: {short}: {error.message}" if error.message else f"Error: {short}"


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _after_failure(receipt: Receipt | None, exc: BaseException) -> Outcome | None:
    """Classify the tool's own exception by the record it left; ``None``: re-raise it."""
    if receipt is not None and receipt.status is Status.FAILED and receipt.error is not None:
        return Outcome("failed", error=receipt.error, receipt=receipt, exception=exc)
    if receipt is not None and receipt.status is Status.RELEASED:
        error = ErrorInfo(_type_name(exc), str(exc))
        return Outcome("released", error=error, receipt=receipt, exception=exc)
    return None  # in doubt (or changed under us): the caller must see the exception


def _replayed(err: ReplayedFailureError) -> Outcome:
    error = ErrorInfo(err.error_type, err.error_message)
    return Outcome("failed", error=error, replay=True, receipt=err.receipt)


def execute(guard: Guard, prepared: Prepared, namespace: str | None) -> Outcome:
    """Run one prepared call through a sync guard.

    Raises:
        GuardError: SafeAgent's own errors (in progress, in doubt, conflict, store, ...).
        BaseException: the tool's exception when it left the record in doubt.
    """
    raised: list[BaseException] = []

    def fn(_ctx: ExecutionContext) -> Any:
        try:
            value = prepared.func(*prepared.args, **prepared.kwargs)
        except BaseException as exc:
            raised.append(exc)
            raise
        return storable(value)

    try:
        receipt = guard.execute(
            prepared.request_id,
            prepared.action,
            prepared.payload,
            fn,
            namespace=namespace,
            exclude=prepared.exclude,
        )
    except Exception as exc:
        if raised and exc is raised[-1]:  # the tool's own exception, as the guard recorded it
            outcome = _after_failure(guard.get(prepared.request_id, namespace=namespace), exc)
            if outcome is None:
                raise
            return outcome
        if isinstance(exc, ReplayedFailureError):
            return _replayed(exc)
        raise
    return Outcome("succeeded", result=receipt.result, replay=receipt.replay, receipt=receipt)


async def aexecute(guard: AsyncGuard, prepared: Prepared, namespace: str | None) -> Outcome:
    """Run one prepared call through an async guard: an ``async`` tool is awaited, a sync
    one runs in a worker thread (the guard's rule). Raises as :func:`execute`."""
    raised: list[BaseException] = []
    fn: Callable[[ExecutionContext], Any]

    if is_async_callable(prepared.func):

        async def afn(_ctx: ExecutionContext) -> Any:
            try:
                value = await prepared.func(*prepared.args, **prepared.kwargs)
            except BaseException as exc:
                raised.append(exc)
                raise
            return storable(value)

        fn = afn
    else:

        def sfn(_ctx: ExecutionContext) -> Any:
            try:
                value = prepared.func(*prepared.args, **prepared.kwargs)
            except BaseException as exc:
                raised.append(exc)
                raise
            return storable(value)

        fn = sfn

    try:
        receipt = await guard.execute(
            prepared.request_id,
            prepared.action,
            prepared.payload,
            fn,
            namespace=namespace,
            exclude=prepared.exclude,
        )
    except Exception as exc:
        if raised and exc is raised[-1]:  # the tool's own exception, as the guard recorded it
            outcome = _after_failure(await guard.get(prepared.request_id, namespace=namespace), exc)
            if outcome is None:
                raise
            return outcome
        if isinstance(exc, ReplayedFailureError):
            return _replayed(exc)
        raise
    return Outcome("succeeded", result=receipt.result, replay=receipt.replay, receipt=receipt)


def run_calls(
    calls: Iterable[ToolCall],
    tools: Mapping[str, ToolSpec],
    guard: Guard,
    options: CallSettings,
) -> list[tuple[ToolCall, Outcome]]:
    """Run the calls one after another, in order, through a sync guard."""
    done: list[tuple[ToolCall, Outcome]] = []
    for call in calls:
        prepared = prepare(call, tools, options)
        if isinstance(prepared, Prepared):
            done.append((call, execute(guard, prepared, options.namespace)))
        else:
            done.append((call, prepared))
    return done


async def arun_calls(
    calls: Iterable[ToolCall],
    tools: Mapping[str, ToolSpec],
    guard: AsyncGuard,
    options: CallSettings,
) -> list[tuple[ToolCall, Outcome]]:
    """Run the calls one after another, in order, through an async guard."""
    done: list[tuple[ToolCall, Outcome]] = []
    for call in calls:
        prepared = prepare(call, tools, options)
        if isinstance(prepared, Prepared):
            done.append((call, await aexecute(guard, prepared, options.namespace)))
        else:
            done.append((call, prepared))
    return done


def read(obj: Any, name: str) -> Any:
    """``obj[name]`` for a mapping, else ``getattr(obj, name, None)``: SDK objects and the
    plain dicts users build or load from JSON are read alike."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)
