"""The HTTP server's limits on slow and oversized clients: uvicorn's own settings where it has them,
and the little it has no setting for.

uvicorn's settings (`uvicorn_config`):
- `timeout_keep_alive`: an idle keep-alive connection is closed after this many seconds;
- `limit_concurrency`: past this many connections (or running requests) a new request gets 503 at
  once, so connections held by slow clients cannot starve the others of the event loop;
- `timeout_graceful_shutdown`: at shutdown, requests still running after this are cancelled (a
  backstop: `ServiceServer` ends them with a 503 before, SHUTDOWN_GRACE_S after the shutdown began).
What uvicorn (0.54, httptools parser) cannot do: put a deadline on a request's head (request line
and headers) or its body, cap the head's size and header count (h11's max_incomplete_event_size
caps only the size, and only with the pure-Python h11 parser, half as fast when streaming), or
drop a client that stops reading its response (its send waits for ever, holding the request). So:
- `LimitedHttpToolsProtocol` (here): uvicorn's httptools protocol with a deadline for each head
  (408, `head_timeout_seconds`), a cap on its bytes and on its header count (431), and nginx's
  send_timeout: a connection whose client takes none of the waiting response for
  `send_timeout_seconds` is dropped, and its request cancelled as on a disconnect;
- the body's deadline is the route's (service/api/routes.py `read_body`: 408 after
  `body_timeout_seconds`), where the body is read.
"""
from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

SHUTDOWN_GRACE_S = 30.0  # at shutdown, running requests may finish for this long; then they end with 503
SHUTDOWN_BACKSTOP_S = 5.0  # then uvicorn cancels the requests whose handlers have still not ended

log = logging.getLogger(__name__)

STATUS = {408: b"HTTP/1.1 408 Request Timeout\r\n", 431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n"}


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Set by `limited_protocol`: the head's deadline (s), its bytes and its header count at most; the
    seconds a client may take none of its waiting response."""

    head_timeout: float = 10.0
    max_head_bytes: int = 65536
    max_headers: int = 100
    send_timeout: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._refused: int | None = None
        self._head_bytes = 0
        super().connection_made(transport)
        self._arm()

    # The send timeout. Writing pauses while the transport's buffer is over its high-water mark (the
    # client's TCP window and the kernel's buffers are full): from then on the client must take some
    # of it within each send_timeout, as nginx's send_timeout counts between two successful writes.
    # A slow reader takes some each time and stays; one that reads nothing is dropped.
    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send()

    def resume_writing(self) -> None:
        self._unwatch_send()
        super().resume_writing()

    def _watch_send(self) -> None:
        self._unwatch_send()
        self._send_waiting = self.transport.get_write_buffer_size()
        self._send_deadline = self.loop.call_later(self.send_timeout, self._send_expired)

    def _unwatch_send(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_expired(self) -> None:
        self._send_deadline = None
        # Closing too (keep-alive's end, a 408): close() waits for the buffer to go, which it never would.
        if self.transport.get_write_buffer_size() < self._send_waiting:  # it took some: slow, not gone
            self._watch_send()
            return
        log.warning("dropped the connection of %s: it read none of its response for %g s (send_timeout_seconds)",
                    "%s:%d" % self.client if self.client else "a client", self.send_timeout)
        self.transport.abort()  # not close(): that waits for the buffer to be sent; connection_lost follows

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_expired(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:  # no request running: the head is late
            self._send_status(408, "The request head did not arrive in time.")

    def _send_status(self, status: int, message: str) -> None:
        if self.transport.is_closing():
            return
        body = message.encode()
        self.transport.write(STATUS[status] + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                             + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._refuse(f"The request head is over {self.max_head_bytes} bytes.")

    def _refuse(self, message: str) -> None:
        self._refused = 431
        self._refused_message = message
        raise ValueError(message)  # stops the parser; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:
            self._send_status(self._refused, self._refused_message)
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if len(self.headers) >= self.max_headers:
            self._refuse(f"The request has more than {self.max_headers} headers.")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_send()
        super().connection_lost(exc)


def limited_protocol(head_timeout: float, max_head_bytes: int, max_headers: int,
                     send_timeout: float) -> type[LimitedHttpToolsProtocol]:
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"head_timeout": head_timeout, "max_head_bytes": max_head_bytes, "max_headers": max_headers,
                 "send_timeout": send_timeout})


def uvicorn_config(app, settings, *, grace_s: float = SHUTDOWN_GRACE_S):
    """The server's uvicorn.Config (python -m service and the tests' server alike)."""
    protocol = limited_protocol(settings.head_timeout_seconds, settings.max_header_bytes, settings.max_headers,
                                settings.send_timeout_seconds)
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, http=protocol,
                          timeout_keep_alive=5, limit_concurrency=settings.max_connections,
                          timeout_graceful_shutdown=grace_s + SHUTDOWN_BACKSTOP_S)


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound now (OSError when they cannot be): uvicorn binds only after the
    app's start-up, and a port in use should be said before the model loads. Bound as asyncio's
    create_server binds them for uvicorn: one per address the host stands for, IPv6 ones v6-only, and
    SO_REUSEADDR, with which Linux refuses a port another socket listens on, not one whose server
    just stopped (its closed connections in TIME_WAIT)."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
                socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)):
            try:
                sockets.append(sock := socket.socket(family, kind, proto))
            except OSError:  # a family this host lacks (IPv6 off): skipped, as asyncio skips it
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class ServiceServer(uvicorn.Server):
    """uvicorn's server, telling the engine when a shutdown starts: queued requests get 503 at once
    and the running ones finish; those still running after the grace end with a 503 (streamed: an
    error event and [DONE]), so uvicorn's own cut-off (a bare 500, a stream broken off) stays a backstop."""

    def __init__(self, config: uvicorn.Config, app, grace_s: float):
        super().__init__(config)
        self._app, self._grace_s = app, grace_s

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if sockets and self.started:  # uvicorn says where it listens only for the sockets it binds itself
            self._log_started_message(sockets)

    async def shutdown(self, sockets=None) -> None:
        engine = self._app.state.service.engine
        cut_off = None
        if engine is not None and engine.ready:  # one still warming up is stopped by the lifespan
            engine.drain()
            cut_off = asyncio.get_running_loop().call_later(self._grace_s, engine.end_running)
        try:
            await super().shutdown(sockets)
        finally:
            if cut_off is not None:
                cut_off.cancel()


def uvicorn_server(app, settings, *, grace_s: float = SHUTDOWN_GRACE_S) -> ServiceServer:
    """The server that runs the app (python -m service and the tests' server alike); ``grace_s``:
    how long running requests may take to finish at shutdown."""
    return ServiceServer(uvicorn_config(app, settings, grace_s=grace_s), app, grace_s)

