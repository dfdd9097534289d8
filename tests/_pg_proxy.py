"""A TCP proxy in front of PostgreSQL that loses a request or a reply on purpose.

Tests point a store at the proxy to make a connection die at the worst moments, for real:
PostgreSQL runs, commits or rolls back as it would, and the client sees the connection
drop as it would after a failover or behind a proxy that drops connections. Nothing in the
store is mocked or hooked.

- ``lose_reply(marker)``: the first client message carrying ``marker`` arms its
  connection: the server's replies are passed on until one announces the server idle
  again (ReadyForQuery, status I: the transaction has committed, or rolled back); that
  one, with whatever came in the same read, is dropped, and both sides are closed. So
  the commit has happened and the client never learns (it waits for ReadyForQuery in
  vain, whether or not the statement's own results reached it).
- ``fatal_reply(marker)``: as ``lose_reply``, but the server's replies before that
  ReadyForQuery reach the client, and it is replaced by what a terminated backend sends
  (``pg_terminate_backend``: an ErrorResponse FATAL 57P01 "terminating connection due to
  administrator command"), then both sides are closed. The commit has happened and the
  client is told the server went away. ``meanwhile``, if given, is called first: what
  another client does between the commit and the client learning of the loss.
- ``lose_request(marker)``: the first client message carrying ``marker`` is not passed
  on; both sides are closed. The server never sees the statement.
- ``attempts(marker)``: how many client messages carried ``marker`` (sent attempts).

Markers are at least 32 bytes (a uuid's hex, say), so none is counted twice where a read
of the client's stream is cut.
- ``refuse()``: new connections are closed at once (the server "is down").

Each connection is two threads copying bytes. The server's stream is cut into protocol
messages (a type byte and a length) from its first byte: the client must not ask for SSL
or GSS encryption (``url`` turns both off).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

_BUF = 65536
_MARKER_MIN = 32


def _admin_shutdown() -> bytes:
    """ErrorResponse FATAL 57P01: what a backend sends as pg_terminate_backend ends it."""
    fields = (
        b"SFATAL",
        b"VFATAL",
        b"C57P01",
        b"Mterminating connection due to administrator command",
    )
    body = b"".join(f + b"\0" for f in fields) + b"\0"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


def _check(marker: str) -> None:
    if len(marker.encode()) < _MARKER_MIN:
        raise ValueError(f"a marker has at least {_MARKER_MIN} bytes: {marker!r}")


class PgProxy:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self._target_url = target_url
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._lose_reply: list[bytes] = []
        self._fatal_reply: list[bytes] = []
        self._meanwhile: dict[bytes, Callable[[], None]] = {}
        self._lose_request: list[bytes] = []
        self._seen: Counter[bytes] = Counter()
        self._watched: set[bytes] = set()
        self._refusing = False
        self._closed = False
        self._socks: set[socket.socket] = set()
        self.lost = 0  # connections dropped on purpose
        self.errors: list[BaseException] = []  # raised by a fatal_reply's meanwhile
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        parts = urlsplit(self._target_url)
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0] + "@" if len(netloc) == 2 else ""
        query = "sslmode=disable&gssencmode=disable"
        if parts.query:
            query = parts.query + "&" + query
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}", query=query))

    # -- what the test asks -------------------------------------------------------------

    def lose_reply(self, marker: str) -> None:
        _check(marker)
        with self._lock:
            self._lose_reply.append(marker.encode())
            self._watched.add(marker.encode())

    def fatal_reply(self, marker: str, meanwhile: Callable[[], None] | None = None) -> None:
        _check(marker)
        with self._lock:
            self._fatal_reply.append(marker.encode())
            if meanwhile is not None:
                self._meanwhile[marker.encode()] = meanwhile
            self._watched.add(marker.encode())

    def lose_request(self, marker: str) -> None:
        _check(marker)
        with self._lock:
            self._lose_request.append(marker.encode())
            self._watched.add(marker.encode())

    def watch(self, marker: str) -> None:
        _check(marker)
        with self._lock:
            self._watched.add(marker.encode())

    def attempts(self, marker: str) -> int:
        with self._lock:
            return self._seen[marker.encode()]

    def refuse(self, refusing: bool = True) -> None:
        with self._lock:
            self._refusing = refusing

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    # -- the copying ----------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing or self._closed
            if refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            _Pair(self, client, server).start()

    def _take(self, armed: list[bytes], data: bytes) -> bytes | None:
        """The first marker of ``armed`` that ``data`` carries, removed (one shot)."""
        for marker in armed:
            if marker in data:
                armed.remove(marker)
                return marker
        return None


class _Pair:
    """One client connection and its server connection."""

    def __init__(self, proxy: PgProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.armed = False  # drop the server's next ReadyForQuery (idle), and close
        self.fatal = False  # ... passing on what came before it, then a FATAL
        self.meanwhile: Callable[[], None] | None = None
        self.dead = False
        self.lock = threading.Lock()
        with proxy._lock:
            proxy._socks.update((client, server))

    def start(self) -> None:
        threading.Thread(target=self._upstream, daemon=True).start()
        threading.Thread(target=self._downstream, daemon=True).start()

    def _kill(self) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = True
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        with self.proxy._lock:
            self.proxy._socks.difference_update((self.client, self.server))

    def _upstream(self) -> None:
        """Client -> server: count markers, arm or drop."""
        proxy = self.proxy
        tail = b""
        try:
            while True:
                data = self.client.recv(_BUF)
                if not data:
                    break
                window = tail + data
                with proxy._lock:
                    for marker in proxy._watched:
                        if marker in window:
                            proxy._seen[marker] += 1
                    drop = proxy._take(proxy._lose_request, window)
                    arm = proxy._take(proxy._lose_reply, window)
                    fatal = proxy._take(proxy._fatal_reply, window)
                    meanwhile = None if fatal is None else proxy._meanwhile.pop(fatal, None)
                    if drop is not None or arm is not None or fatal is not None:
                        proxy.lost += 1
                tail = data[-(_MARKER_MIN - 1) :]
                if drop is not None:
                    break
                if arm is not None or fatal is not None:
                    with self.lock:
                        self.armed = True
                        self.fatal = fatal is not None
                        self.meanwhile = meanwhile
                self.server.sendall(data)
        except OSError:
            pass
        self._kill()

    def _downstream(self) -> None:
        """Server -> client: whole messages, each read's worth passed on at once; once
        armed, a read that holds ReadyForQuery with status I is dropped instead."""
        pending = b""
        try:
            while True:
                data = self.server.recv(_BUF)
                if not data:
                    break
                pending += data
                out: list[bytes] = []
                while len(pending) >= 5:
                    size = 1 + int.from_bytes(pending[1:5], "big")
                    if len(pending) < size:
                        break
                    message, pending = pending[:size], pending[size:]
                    out.append(message)
                    # ReadyForQuery, idle: the transaction has committed (or rolled back)
                    if message[:1] == b"Z" and message[5:6] == b"I":
                        with self.lock:
                            armed, fatal = self.armed, self.fatal
                        if armed and fatal:  # the client is told the backend was ended
                            if self.meanwhile is not None:
                                try:
                                    self.meanwhile()
                                except BaseException as exc:  # for the test to see
                                    self.proxy.errors.append(exc)
                            with contextlib.suppress(OSError):
                                self.client.sendall(b"".join(out[:-1]) + _admin_shutdown())
                            self._kill()
                            return
                        if armed:
                            self._kill()  # the client never learns
                            return
                if out:
                    self.client.sendall(b"".join(out))
        except OSError:
            pass
        self._kill()
