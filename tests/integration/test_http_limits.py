"""Request heads and bodies are bounded before the application sees them (issue 13, item 1):
``flaircad serve`` as operators run it, attacked over raw sockets."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests._server import ServerProcess

HEADER_TIMEOUT_S = 1.5
BODY_IDLE_S = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("http-limits"), env={
        "FLAIRCAD_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "FLAIRCAD_HTTP_BODY_IDLE_TIMEOUT_S": str(BODY_IDLE_S),
        "FLAIRCAD_HTTP_MAX_URL_BYTES": "4096",
        "FLAIRCAD_HTTP_MAX_HEADER_BYTES": "16384",
        "FLAIRCAD_HTTP_MAX_HEADER_COUNT": "50"}).start()
    yield proc
    proc.stop()


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def _one_response(sock: socket.socket) -> bytes:
    """One response on a kept-alive connection (its head, then content-length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _send_all(sock: socket.socket, data: bytes) -> None:
    # the server may close as soon as the limit is crossed
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(data)


def _problem(data: bytes) -> dict[str, object]:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def _healthy(server: ServerProcess) -> float:
    start = time.monotonic()
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    return time.monotonic() - start


def test_a_long_request_line_gets_414_and_the_connection_closes(server: ServerProcess) -> None:
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz?" + b"a" * 1_000_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        status, data = _response(sock)
    assert status == 414
    assert _problem(data)["status"] == 414 and b"application/problem+json" in data
    _healthy(server)


def test_a_header_flood_gets_431_without_being_buffered(server: ServerProcess) -> None:
    """Many small headers (the 64 MiB flood of the issue, cut short by the server) and one huge
    header value: both refused at the limit, and the server's memory does not follow the flood."""
    rss_before = server.rss_bytes()
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        line = b"x-flood: " + b"y" * 40 + b"\r\n"
        sent = 0
        try:
            while sent < 64 * 1024**2:
                sock.sendall(line * 1000)
                sent += len(line) * 1000
        except (ConnectionResetError, BrokenPipeError):
            pass
        status, data = _response(sock)
    assert status == 431 and sent < 64 * 1024**2  # refused long before the flood was sent
    with _connect(server) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"v" * 10**6)
        status, _ = _response(sock)
    assert status == 431
    with _connect(server) as sock:  # many lines, each small, under the byte limit
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"a: b\r\n" * 60 + b"\r\n")
        status, data = _response(sock)
    assert status == 431 and b"too many" in data
    assert server.rss_bytes() - rss_before < 32 * 1024**2
    _healthy(server)


def test_normal_requests_still_pass_at_the_limits(server: ServerProcess) -> None:
    headers = {f"x-h{i}": "v" * 100 for i in range(40)}
    response = httpx.get(server.url + "/healthz?" + "q" * 3000, headers=headers, timeout=5)
    assert response.status_code == 200
    with _connect(server) as sock:  # keep-alive: the bounds start again for the next request
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert _one_response(sock).startswith(b"HTTP/1.1 200")


def test_slow_heads_are_closed_with_408_and_health_stays_fast(server: ServerProcess) -> None:
    """Slowloris: 100 connections each sending a byte of head now and then are all answered
    408 and closed once the header timeout has passed; /healthz answers meanwhile."""
    socks = [_connect(server) for _ in range(100)]
    try:
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + HEADER_TIMEOUT_S - 0.5
        while time.monotonic() < deadline:
            for sock in socks:
                _send_all(sock, b"x")
            assert _healthy(server) < 1.0
            time.sleep(0.2)
        results = [_response(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert {status for status, _ in results} == {408}
    _healthy(server)


def test_an_idle_connection_without_a_request_is_closed(server: ServerProcess) -> None:
    with _connect(server) as sock:
        start = time.monotonic()
        status, _ = _response(sock)
    # uvicorn's keep-alive timeout (5 s) or the head timeout, whichever is first
    assert time.monotonic() - start < HEADER_TIMEOUT_S + 3
    assert status in (0, 408)


def test_a_stalled_body_is_dropped_and_the_upload_left_no_trace(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /dicomweb/studies HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
                     b"content-length: 100000\r\n\r\n--b\r\ncontent-type: application/dicom\r\n\r\n"
                     + b"\0" * 1000)
        start = time.monotonic()
        status, _ = _response(sock)
        waited = time.monotonic() - start
    assert status == 408
    assert BODY_IDLE_S - 0.5 < waited < BODY_IDLE_S + 5
    _healthy(server)
    tmp = server.folder / "spool" / "tmp"
    deadline = time.monotonic() + 5
    while tmp.exists() and any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the aborted upload's temporary file is removed as the handler unwinds
    assert not tmp.exists() or not any(tmp.iterdir())
