"""A real uvicorn server in a thread of the test process (so tests can look inside it), and
small helpers for requests against it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from service.core.config import Settings
from service.runtime.app import create_app

KEY = "test-key-6f1c2a9e8b7d4c3f"  # the API key of the "tester" in servers made here


@dataclass
class Live:
    url: str
    app: FastAPI
    settings: Settings

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}", **extra}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        kwargs["headers"] = {**self.headers(), **kwargs.get("headers", {})}
        return httpx.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        kwargs["headers"] = {**self.headers(), **kwargs.get("headers", {})}
        return httpx.post(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def wait_for_study(self, study: str, count: int = 1, timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            analyses = self.get("/v1/analyses",
                                params={"study_instance_uid": study}).json()["analyses"]
            if len(analyses) >= count and all(
                    a["status"] in ("done", "rejected", "failed") for a in analyses):
                return analyses
            time.sleep(0.1)
        raise AssertionError(f"no {count} finished analyses of the study within {timeout} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings_for(spool: Path, **overrides: Any) -> Settings:
    """Small, fast settings with authentication on and the tester's key."""
    values: dict[str, Any] = {"spool_dir": spool, "stability_window_s": 0.5,
                              "providers": ["CPUExecutionProvider"],
                              "api_keys": f"tester:{KEY}", "max_upload_bytes": 64 * 1024**2}
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running(settings: Settings) -> Iterator[Live]:
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert thread.is_alive(), "the server stopped while starting"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)
        yield Live(url, app, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def related(parts: list[bytes], boundary: str = "hostile-boundary-7f3a",
            lengths: bool = False) -> tuple[bytes, dict[str, str]]:
    """A multipart/related application/dicom body and its Content-Type header."""
    body = b""
    for data in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n".encode()
        if lengths:
            body += f"Content-Length: {len(data)}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; '
                                  f"boundary={boundary}"}
