"""Cost of unauthenticated requests: refusals/s in-process and audit bytes written per refusal.

    .venv/bin/python bench/refusals.py [--requests 10000] [--clients 1]

Builds the app (authentication on, one API key, a fresh spool in a temporary folder) and sends
``--requests`` requests without credentials straight into its ASGI callable (no socket, no
HTTP parser: what is measured is what the service itself spends on a refusal, through the whole
middleware stack), from ``--clients`` client addresses, with the service's JSON logs formatted
and sent to /dev/null (``--no-logs``: logging off). Prints refusals/s and the bytes the audit
trail files (``audit.jsonl*``) hold afterwards, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.config
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.core.config import Settings
from service.runtime import audit, logs
from service.runtime.app import create_app


async def refuse(app: object, count: int, clients: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    body = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, object]:
        return body

    for n in range(count):
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object], sent: list = sent) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/dicomweb/studies",
                 "raw_path": b"/dicomweb/studies", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"flaircad"), (b"content-type", b"application/dicom")],
                 "client": (f"192.0.2.{n % clients + 1}", 40000 + n % 20000),
                 "server": ("127.0.0.1", 8000)}
        await app(scope, receive, send)  # type: ignore[operator]
        status = int(sent[0]["status"])  # type: ignore[call-overload]
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--no-logs", action="store_true",
                        help="logging off (default: the service's JSON logs, sent to /dev/null)")
    args = parser.parse_args()
    if args.no_logs:
        logging.disable(logging.CRITICAL)
    else:  # the service's own log set-up, its stderr swapped for /dev/null: formatting counts
        logging.config.dictConfig(logs.config("info"))
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory() as folder:
        spool = Path(folder) / "spool"
        settings = Settings(spool_dir=spool, api_keys="bench:bench-key-0123456789abcdef",
                            providers=["CPUExecutionProvider"])
        app = create_app(settings)
        asyncio.run(refuse(app, 200, args.clients))  # warm up (imports, first writes)
        flush = getattr(audit.trail(settings), "flush", None)  # absent before the bounds
        if flush is not None:
            flush(force=True)
        for path in spool.glob("audit.jsonl*"):
            path.unlink()
        started = time.perf_counter()
        statuses = asyncio.run(refuse(app, args.requests, args.clients))
        elapsed = time.perf_counter() - started
        if flush is not None:  # the summaries of the window still open
            flush(force=True)
        files = sorted(spool.glob("audit.jsonl*"))
        audit_bytes = sum(p.stat().st_size for p in files)
        lines = [line for p in files for line in p.read_text().splitlines()]
    print(json.dumps({"requests": args.requests, "clients": args.clients,
                      "logs": not args.no_logs, "statuses": statuses,
                      "seconds": round(elapsed, 3),
                      "refusals_per_s": round(args.requests / elapsed),
                      "audit_bytes": audit_bytes, "audit_lines": len(lines),
                      "audit_bytes_per_10000": round(audit_bytes * 10_000 / args.requests)}))


if __name__ == "__main__":
    main()
