"""Connections and requests: how many the server takes, for how long, and where it listens.

uvicorn's one limit, `limit_concurrency`, answers 503 once open connections *or* running requests reach it. Idle
connections count, and uvicorn closes a connection that has not sent a request only once it has answered one (its
keep-alive timeout), so twenty sockets that send half a request line and wait lock every other client out for as
long as they stay open (slowloris). Here the two limits are apart, and idle connections are timed out:

- `HTTPProtocol`: uvicorn's HTTP/1.1 (h11) protocol with a connection cap and a header timeout. A connection opened
  past `max_connections` gets a 503 for its request and is closed. A connection that has not sent a request's
  complete headers `header_timeout` seconds after it opened, or after its previous response, is closed. (A body
  that does not arrive is the app's: `ServerConfig.body_timeout`, a 408.)
- `RequestLimit`: ASGI middleware capping the API requests in progress (`ServerConfig.max_running_requests`,
  from the first byte of the body to the last of the answer); one more gets a 503 with `Retry-After`. /health,
  /metrics and the page are not counted: they are cheap, and needed most when the server is busy.
- `bind(host, port)`: the listening sockets, bound before the model loads, so that a host that does not resolve or a
  port in use is reported at once rather than after minutes of loading.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from instructblip.serving.protocol import APIError


class HTTPProtocol(H11Protocol):
    """uvicorn's h11 protocol with `max_connections` and `header_timeout` (see the module docstring). Pass
    `http=HTTPProtocol.factory(max_connections, header_timeout)` to `uvicorn.Config`."""

    def __init__(self, *args: Any, max_connections: int, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_connections, self.header_timeout = max_connections, header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def factory(cls, max_connections: int, header_timeout: float) -> Any:
        # uvicorn builds the protocol with its own arguments and takes any callable in place of a class
        return functools.partial(cls, max_connections=max_connections, header_timeout=header_timeout)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.app = _too_many_connections  # every request on this connection; it closes after the first
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: its cycle began
            self._headers_arrived()

    def handle_websocket_upgrade(self, event: Any) -> None:  # the connection goes to another protocol
        self._headers_arrived()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        self._await_headers()  # before: a pipelined request may begin inside, and stop the timer
        super().on_response_complete()

    def _await_headers(self) -> None:
        self._headers_arrived()
        self.header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _headers_arrived(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_timed_out(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


async def _too_many_connections(scope, receive, send) -> None:
    error = APIError(503, "the server has too many open connections; retry shortly", code="too_many_connections",
                     headers={"Retry-After": "1", "Connection": "close"})
    await error.response()(scope, receive, send)


class RequestLimit:
    """ASGI middleware: at most `limit` requests under /v1/ in progress at once; one more is answered 503."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.running = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.running >= self.limit:
            error = APIError(503, f"the server is busy ({self.limit} requests in progress); retry shortly",
                             code="too_many_requests", headers={"Retry-After": "1"})
            await error.response()(scope, receive, send)
            return
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to, as asyncio's `create_server` binds them (not listening
    yet: uvicorn listens once the model is loaded). ValueError with the fix for a port out of range, a host that does
    not resolve, or an address in use."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range: use 1 to 65535, or 0 for any free port")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"--host {host}: the name does not resolve ({reason}); use an address such as 127.0.0.1 "
                         "(this machine only) or 0.0.0.0 (every interface)") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address has its own socket
            try:
                sock.bind(address)
            except OSError as e:
                where = f"{address[0]} port {address[1]}"
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(f"--port {port}: {where} is already in use (another server?); stop it or choose "
                                     "another --port") from None
                raise ValueError(f"--host {host} --port {port}: cannot bind {where} ({e.strerror}); choose another "
                                 "--host or --port") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
