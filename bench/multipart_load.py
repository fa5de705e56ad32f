"""Cost of hostile multipart shapes against ``flaircad serve`` (issue 13, items 5 and 6).

    .venv/bin/python bench/multipart_load.py headers [--parts 5000] [--lines 1400] [--requests 1]
    .venv/bin/python bench/multipart_load.py loop [--parts 5000] [--requests 4] [--dicom]

``headers``: ``--requests`` concurrent STOW-RS requests of ``--parts`` parts with
``--lines`` header lines each; prints the server's status codes and its resident memory before,
at its peak (VmHWM) and after, in MiB.

``loop``: ``--requests`` concurrent STOW-RS requests of ``--parts`` tiny parts (one byte of
junk each, or with ``--dicom`` a minimal 4 x 4 MR instance each) while ``/healthz`` is asked
every 50 ms on a connection of its own; prints the status codes and the probe's latencies
(max, p99, median) in seconds.

Authentication is off (the server of tests/_server.py); the spool is a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._server import ServerProcess

BOUNDARY = "bench-boundary-5e1d"


def body_of(parts: list[bytes], header_lines: int = 0) -> bytes:
    extra = b"".join(b"X%d: v\r\n" % n for n in range(header_lines))
    head = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode() + extra + b"\r\n")
    return b"".join(head + data + b"\r\n" for data in parts) + f"--{BOUNDARY}--\r\n".encode()


def post(port: int, body: bytes) -> int:
    """POST ``body`` to STOW-RS over a raw socket (the client costs next to nothing)."""
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        # refused early: the answer is still there to read
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
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def memory(server: ServerProcess) -> dict[str, float]:
    assert server.process is not None
    fields = {}
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0]) / 1024
    return fields


def tiny_dicom(count: int) -> list[bytes]:
    from pydicom.uid import generate_uid

    from tests import _hostile

    study, series = generate_uid(), generate_uid()
    out = []
    for _ in range(count):
        ds = _hostile.header(study, series)
        ds.PixelData = b"\0" * 32
        out.append(_hostile.encode(ds))
    return out


def bench_headers(server: ServerProcess, args: argparse.Namespace) -> dict[str, object]:
    body = body_of([b"x"] * args.parts, args.lines)
    before = memory(server)
    statuses: list[int] = []
    senders = [threading.Thread(target=lambda: statuses.append(post(server.port, body)))
               for _ in range(args.requests)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    time.sleep(1)
    after = memory(server)
    return {"body_mib": round(len(body) / 1024**2, 1), "statuses": statuses,
            "rss_before_mib": round(before["VmRSS"]), "rss_peak_mib": round(after["VmHWM"]),
            "rss_after_mib": round(after["VmRSS"]),
            "peak_growth_mib": round(after["VmHWM"] - before["VmRSS"])}


def bench_loop(server: ServerProcess, args: argparse.Namespace) -> dict[str, object]:
    parts = tiny_dicom(args.parts) if args.dicom else [b"x"] * args.parts
    bodies = [body_of(parts) for _ in range(args.requests)]
    if args.dicom:  # every request its own instances: nothing is a re-sent duplicate
        bodies = [body_of(tiny_dicom(args.parts)) for _ in range(args.requests)]
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            while not done.is_set():
                start = time.monotonic()
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                head, rest = data.split(b"\r\n\r\n", 1)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += sock.recv(65536)
                latencies.append(time.monotonic() - start)
                time.sleep(0.05)

    statuses: list[int] = []
    senders = [threading.Thread(target=lambda b=b: statuses.append(post(server.port, b)))
               for b in bodies]
    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.3)
    start = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    elapsed = time.monotonic() - start
    time.sleep(0.3)
    done.set()
    prober.join()
    ordered = sorted(latencies)
    return {"statuses": statuses, "requests_s": round(elapsed, 2), "probes": len(ordered),
            "healthz_max_s": round(ordered[-1], 3),
            "healthz_p99_s": round(ordered[int(len(ordered) * 0.99) - 1], 3),
            "healthz_median_s": round(statistics.median(ordered), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("headers", "loop"))
    parser.add_argument("--parts", type=int, default=5000)
    parser.add_argument("--lines", type=int, default=1400)
    parser.add_argument("--requests", type=int, default=0, help="default: 1 (headers), 4 (loop)")
    parser.add_argument("--dicom", action="store_true")
    args = parser.parse_args()
    args.requests = args.requests or (1 if args.mode == "headers" else 4)
    with tempfile.TemporaryDirectory() as folder:
        server = ServerProcess(Path(folder), env={"FLAIRCAD_LOG_LEVEL": "warning"}).start()
        try:
            run = bench_headers if args.mode == "headers" else bench_loop
            print(json.dumps({"mode": args.mode, **vars(args), **run(server, args)}))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
