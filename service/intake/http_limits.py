"""Bounds on what a client may send before the application sees a request.

uvicorn's default parser (httptools) does not limit the request line or the headers, and
neither parser limits how slowly they arrive: one connection sending 64 MiB of small headers
took the server from 201 to 1,171 MiB RSS, and 200 slow connections were never closed. This
protocol is uvicorn's h11 protocol with those bounds, checked on the bytes as they arrive (the
head is never buffered whole here):

* request line longer than ``max_url_bytes`` → 414, the connection closed;
* more than ``max_header_count`` header lines, or a head over ``max_header_bytes`` → 431;
* a head not complete ``header_timeout_s`` after its first byte (or after the connection
  opened) → 408 (slowloris);
* a request body that stops arriving for ``body_idle_timeout_s`` → 408 when no response has
  started, else the connection is dropped; the application sees a disconnect.

The limits come from the ``FLAIRCAD_HTTP_*`` settings (read once per process, so each uvicorn
worker applies the same ones). h11's own incomplete-event bound is set to ``max_header_bytes``
too (`flaircad serve` passes it to uvicorn), as a backstop for pipelined requests, whose heads
after the first are not scanned here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("service.intake.http_limits")

_REASONS = {408: b"Request Timeout", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large"}


@dataclass(frozen=True)
class HeadLimits:
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 60.0


def _problem(status: int, detail: str) -> bytes:
    """A complete problem+json response that closes the connection, as raw bytes: nothing of
    the request has reached the application, so h11's state machine is bypassed."""
    body = (b'{"type":"about:blank","title":"' + _REASONS[status] + b'","status":'
            + str(status).encode() + b',"detail":"' + detail.encode("ascii") + b'"}')
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))) + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the head and body bounds of :class:`HeadLimits`."""

    limits: ClassVar[HeadLimits | None] = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = self.current_limits()
        self._in_head = True
        self._line_bytes = self._head_bytes = self._lines = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    @classmethod
    def current_limits(cls) -> HeadLimits:
        if cls.limits is None:
            from service.core.config import Settings

            settings = Settings()
            cls.limits = HeadLimits(
                max_url_bytes=settings.http_max_url_bytes,
                max_header_bytes=settings.http_max_header_bytes,
                max_header_count=settings.http_max_header_count,
                header_timeout_s=settings.http_header_timeout_s,
                body_idle_timeout_s=settings.http_body_idle_timeout_s)
        return cls.limits

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._cancel_body_timer()
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_head:
            self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if not self._scan_head(data):
                return  # refused: the connection is closing
            if not self._in_head:
                self._arm_body_timer()
        else:
            self._arm_body_timer()
        super().data_received(data)

    # -- the head ------------------------------------------------------------------------

    def _start_head(self) -> None:
        self._in_head = True
        self._line_bytes = self._head_bytes = self._lines = 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self._limits.header_timeout_s,
                                                self._head_timed_out)

    def _scan_head(self, data: bytes) -> bool:
        """Count the head's lines and bytes in ``data``; False when the request is refused
        (the answer is sent and the connection closing)."""
        limits, start = self._limits, 0
        while True:
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            self._line_bytes += end - start
            self._head_bytes += end - start + (newline >= 0)
            if self._lines == 0 and self._line_bytes > limits.max_url_bytes:
                return self._refused(414, "request line over the limit")
            if self._head_bytes > limits.max_header_bytes:
                return self._refused(431, "request headers over the size limit")
            if newline < 0:
                return True
            blank = self._line_bytes <= 1  # "" or "\r"
            self._line_bytes, start = 0, newline + 1
            if self._lines == 0:
                if not blank:  # empty lines before the request line are ignored (RFC 9112)
                    self._lines = 1
                continue
            if blank:  # the end of the head
                self._in_head = False
                self._cancel_head_timer()
                return True
            self._lines += 1
            if self._lines - 1 > limits.max_header_count:
                return self._refused(431, "too many request header lines")

    def _refused(self, status: int, detail: str) -> bool:
        self._cancel_timers()
        logger.warning("refused a request before its head was read",
                       extra={"status": status, "reason": detail})
        if not self.transport.is_closing():
            self.transport.write(_problem(status, detail))
            self.transport.close()
        return False

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refused(408, "request head not received in time")

    # -- the body ------------------------------------------------------------------------

    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(self._limits.body_idle_timeout_s,
                                                self._body_timed_out)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.more_body:
            return  # the body is complete: the application is answering
        if self.transport.is_closing():
            return
        logger.warning("request body stalled; connection dropped",
                       extra={"status": 408, "reason": "body idle"})
        if not cycle.response_started:
            self.transport.write(_problem(408, "request body stalled"))
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
