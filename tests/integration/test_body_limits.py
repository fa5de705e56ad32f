"""A multipart request body as it streams in (issue 13, items 5, 6 and 9): the headers of its
parts are bounded and mostly dropped, the per-part work stays off the event loop, and a disk
that fills up under a part answers 503 ``spool_full``, not 500.

bench/multipart_load.py measures the same shapes with more detail."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from service.api import body as body_module
from service.intake.multipart import (
    MAX_KEPT_HEADER_BYTES,
    MAX_PART_HEADER_LINES,
    MediaType,
    MultipartError,
    StreamingMultipart,
    parse_multipart,
)
from tests import _hostile
from tests._live import related, running, settings_for
from tests._server import ServerProcess

BOUNDARY = "limits-boundary-0c4e"
STOW = "/dicomweb/studies"


def _body(parts: list[bytes], header_lines: int = 0) -> bytes:
    extra = b"".join(b"X%d: v\r\n" % n for n in range(header_lines))
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode() + extra + b"\r\n"
    return b"".join(head + data + b"\r\n" for data in parts) + f"--{BOUNDARY}--\r\n".encode()


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    """STOW-RS over a raw socket (cheap for the client, and it reads an early answer)."""
    head = (f"POST {STOW} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        # answered before the body was read: the answer is still there
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head + body)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data.partition(b"\r\n\r\n")[2]


# -- item 5: part headers ------------------------------------------------------------------------
def test_only_the_headers_that_are_read_are_kept() -> None:
    body = (b"--B\r\nContent-Type: application/dicom\r\nContent-ID: <1@x>\r\nX-Junk: "
            + b"j" * 900 + b"\r\n\r\nDATA\r\n--B--\r\n")
    (part,) = parse_multipart(body, "B")
    assert part.headers == {"content-type": "application/dicom"}
    kept: list[dict[str, str]] = []
    reader = StreamingMultipart("B", lambda headers: kept.append(headers) or _Sink())
    reader.feed(body)
    reader.finish()
    assert kept == [{"content-type": "application/dicom"}]


def test_header_lines_are_bounded_as_soon_as_they_pass_the_bound() -> None:
    lines = b"".join(b"X%d: v\r\n" % n for n in range(MAX_PART_HEADER_LINES))
    # at the bound: read
    ok = b"--B\r\n" + lines + b"\r\nDATA\r\n--B--\r\n"
    assert [p.body for p in parse_multipart(ok, "B")] == [b"DATA"]
    # one line past it: refused while the block is still arriving, before its blank line
    reader = StreamingMultipart("B", lambda headers: _Sink())
    with pytest.raises(MultipartError, match="header lines"):
        reader.feed(b"--B\r\n" + lines + b"X: one too many\r\n")
    with pytest.raises(MultipartError, match="header lines"):
        parse_multipart(b"--B\r\n" + lines + b"X: v\r\n\r\nDATA\r\n--B--\r\n", "B")


def test_a_kept_header_value_is_bounded() -> None:
    long_name = b"n" * MAX_KEPT_HEADER_BYTES
    body = (b'--B\r\nContent-Disposition: form-data; name="f"; filename="' + long_name
            + b'"\r\n\r\nDATA\r\n--B--\r\n')
    with pytest.raises(MultipartError, match="content-disposition"):
        parse_multipart(body, "B")


class _Sink:
    def write(self, data: bytes) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("body-limits"),
                         env={"FLAIRCAD_LOG_LEVEL": "warning"}).start()
    yield proc
    proc.stop()


def test_many_parts_with_many_header_lines_are_refused_without_the_memory(
        server: ServerProcess) -> None:
    # the shape: 5,000 parts x 1,400 header lines (62 MiB) took +711 MiB, kept for
    # the whole request; now refused at the first part
    before = server.rss_bytes()
    status, content = _post(server.port, _body([b"x"] * 5000, header_lines=1400))
    grown = server.rss_bytes() - before
    assert status == 400 and json.loads(content)["code"] == "malformed_multipart", content
    assert grown < 64 * 1024**2, f"RSS grew by {grown / 1024**2:.0f} MiB"
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


# -- item 6: the event loop ----------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_bodies_of_many_tiny_parts_do_not_stall_the_event_loop(
        server: ServerProcess) -> None:
    # 4 requests of 5,000 one-byte parts stalled /healthz for up to 10 s while their parts
    # were created, written and closed on the event loop (now in a thread); 2 shared cores
    body = _body([b"x"] * 5000)
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.monotonic()
            assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)

    statuses: list[int] = []
    senders = [threading.Thread(target=lambda: statuses.append(_post(server.port, body)[0]))
               for _ in range(4)]
    prober = threading.Thread(target=probe)
    prober.start()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    done.set()
    prober.join()
    assert statuses == [409] * 4  # every part refused as not DICOM, one by one
    assert max(latencies) < 1.5, f"/healthz took up to {max(latencies):.2f} s"
    assert len(latencies) > 10


class _Request:
    """What spool_parts reads of a request: its headers and its body's chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.headers: dict[str, str] = {}
        self._chunks = chunks

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        await asyncio.sleep(3600)  # the rest never comes: the request is cancelled


def test_a_request_cancelled_while_its_parts_are_parsed_leaves_nothing(
        tmp_path: Path) -> None:
    # the parser thread may still be in a batch when the request is cancelled: the folder
    # goes once it is done, and no part is told to the caller after spool_parts gave up
    folder = tmp_path / "request"
    folder.mkdir()
    told_after: list[Path] = []
    gave_up = threading.Event()

    def on_part_head(part: body_module.SpooledPart) -> None:
        time.sleep(0.001)  # a part's head read, slowed down
        if gave_up.is_set():
            told_after.append(part.path)

    media = MediaType.parse(f"multipart/related; boundary={BOUNDARY}")
    chunks = [_body([b"x" * 100] * 3000)[:-20]]  # 450 KiB: one batch of 3,000 parts

    async def scenario() -> None:
        task = asyncio.create_task(body_module.spool_parts(
            _Request(chunks), media, folder, limit=10**9, max_part_bytes=10**6,
            max_parts=10**6, on_part_head=on_part_head))
        await asyncio.sleep(0.2)  # the thread is in the batch
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gave_up.set()

    asyncio.run(scenario())
    deadline = time.monotonic() + 120
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists()
    assert told_after == []


# -- item 9: the disk fills up under a part ------------------------------------------------------
class _FullDisk:
    """A part file on a volume with no space left: writes fail, and so does the flush of what
    a buffered writer holds when it is closed."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self._real.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_parts_stream_in_is_503_spool_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []

    def open_on_full_disk(path: Path, mode: str = "r") -> Any:
        opened.append(Path(path))
        real = open(path, mode)  # noqa: SIM115 - closed by _FullDisk.close
        return real if len(opened) < 3 else _FullDisk(real)  # the third part finds it full

    ds = _hostile.header(generate_uid(), generate_uid())
    ds.PixelData = b"\0" * 32
    instance = _hostile.encode(ds)
    with running(settings_for(tmp_path / "spool", retry_after_s=7)) as live:
        monkeypatch.setattr(body_module, "open", open_on_full_disk, raising=False)
        content, headers = related([instance, b"x" * 1000, b"y" * 1000, b"z"])
        response = live.post(STOW, content=content, headers=headers)
        monkeypatch.undo()
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "spool_full"
        assert response.headers["retry-after"] == "7"
        assert len(opened) == 3
        assert not opened[0].parent.exists()  # the request's folder is gone
        assert list(live.runtime.spool.tmp.iterdir()) == []
        # and the service still answers, and stores
        assert live.get("/healthz").status_code == 200
        assert live.post(STOW, content=related([instance])[0],
                         headers=headers).status_code == 200
