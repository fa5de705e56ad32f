"""Smoke client for a running flaircad image (docker/build-and-smoke.sh); standard library only.

    python3 docker/smoke_client.py http://127.0.0.1:PORT SERIES_FOR_ANALYSES SERIES_FOR_STOW

With FLAIRCAD_SMOKE_TOKEN set, requests carry ``Authorization: Bearer <token>`` and a request
without it must be refused (401). Checks, in order: /healthz and /readyz answer 200 with JSON;
/v1/model names the bundled demo model on the CPU provider; POST /v1/analyses
(multipart/related) analyses one phantom series synchronously (probabilities sum to 1, preview
PNG and the SC + SR instances are served); a STOW-RS push of a second series (as Orthanc sends
it) is stored and analysed once the stability window has passed; /metrics exposes flaircad_*
series. With FLAIRCAD_SMOKE_SINK_PORT set, a STOW-RS sink listens on 127.0.0.1 at that port
(the server is started with a destination to it) and the first analysis' SC + SR must reach
it, the analysis' delivery reported "sent": the image's own install delivers results.
Exit status 0 when all hold, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = os.environ.get("FLAIRCAD_SMOKE_TOKEN", "")
SINK_PORT = int(os.environ.get("FLAIRCAD_SMOKE_SINK_PORT") or 0)


def request(method: str, url: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120,
            authenticate: bool = True) -> tuple[int, bytes, dict[str, str]]:
    headers = dict(headers or {})
    if TOKEN and authenticate:
        headers["Authorization"] = f"Bearer {TOKEN}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read(), _lower(response.headers.items())
    except urllib.error.HTTPError as error:
        return error.code, error.read(), _lower(error.headers.items())


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {key.lower(): value for key, value in items}


def multipart_related(folder: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for path in sorted(folder.glob("*.dcm")):
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                   path.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def study_uid(path: Path) -> str:
    """StudyInstanceUID (0020,000D) of an explicit-VR little-endian file, without pydicom."""
    data = path.read_bytes()
    at = data.index(b"\x20\x00\x0d\x00UI")
    length = int.from_bytes(data[at + 6:at + 8], "little")
    return data[at + 8:at + 8 + length].rstrip(b"\x00 ").decode("ascii")


class Sink:
    """A STOW-RS destination: keeps each POSTed body, answers 200 with an empty DICOM JSON
    response (every instance stored)."""

    def __init__(self, port: int) -> None:
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                sink.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def check_delivery(base: str, sink: Sink, result: dict) -> None:
    """The analysis' SC + SR reach the sink and its delivery is reported sent."""
    deadline = time.monotonic() + 60
    deliveries: list[dict] = []
    while time.monotonic() < deadline:
        status, body, _ = request("GET", f"{base}/v1/analyses/{result['analysis_id']}")
        deliveries = (json.loads(body).get("deliveries") or []) if status == 200 else []
        if deliveries and deliveries[0]["state"] in ("sent", "failed"):
            break
        time.sleep(0.5)
    check([d["state"] for d in deliveries] == ["sent"], "result delivered to the STOW-RS sink",
          deliveries)
    sr_uid = result["outputs"]["sr_sop_instance_uid"].encode()
    check(any(sr_uid in body for body in sink.bodies), "the sink received the SR",
          f"{len(sink.bodies)} requests, {sum(map(len, sink.bodies))} B")


def check(condition: bool, what: str, detail: object = "") -> None:
    print(("ok   " if condition else "FAIL ") + what + (f": {detail}" if detail != "" else ""),
          flush=True)
    if not condition:
        raise SystemExit(1)


def main(base: str, analyses_series: Path, stow_series: Path) -> None:
    sink = Sink(SINK_PORT) if SINK_PORT else None
    for route in ("/healthz", "/readyz"):
        status, body, _ = request("GET", base + route)
        check(status == 200, f"GET {route} 200", body.decode(errors="replace")[:200])
        json.loads(body)

    status, body, _ = request("GET", base + "/v1/model")
    model = json.loads(body)
    check(status == 200 and model["name"].startswith("flaircad"), "GET /v1/model",
          {key: model.get(key) for key in ("name", "version", "provider")})
    check(model["provider"] == "CPUExecutionProvider", "runs on the CPU provider")

    payload, content_type = multipart_related(analyses_series)
    if TOKEN:  # authentication is on (the image's default): no token, no analysis
        # A small body: the 401 is sent before the body is read, and the connection closed.
        status, body, headers = request(
            "POST", base + "/v1/analyses", b"--b--\r\n",
            {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
            authenticate=False)
        check(status == 401 and headers.get("www-authenticate", "").startswith("Bearer"),
              "POST /v1/analyses without a token: 401 Bearer challenge", status)
    started = time.monotonic()
    status, body, _ = request("POST", base + "/v1/analyses", payload,
                              {"Content-Type": content_type})
    result = json.loads(body)
    check(status == 200 and result["status"] == "done", "POST /v1/analyses 200 done",
          f"{time.monotonic() - started:.1f} s, prediction {result.get('prediction')}, "
          f"probabilities {result.get('probabilities')}")
    check(abs(sum(result["probabilities"].values()) - 1.0) < 1e-4, "probabilities sum to 1")
    status, body, _ = request("GET", base + result["outputs"]["preview_url"])
    check(status == 200 and body.startswith(b"\x89PNG"), "preview.png served", f"{len(body)} B")
    status, body, headers = request("GET", base + result["outputs"]["instances_url"])
    check(status == 200 and headers.get("content-type", "").startswith("multipart/related"),
          "SC + SR instances served", f"{len(body)} B")
    if sink is not None:
        check_delivery(base, sink, result)

    payload, content_type = multipart_related(stow_series)
    status, body, _ = request("POST", base + "/dicomweb/studies", payload,
                              {"Content-Type": content_type, "Accept": "application/dicom+json"})
    stored = json.loads(body)
    check(status == 200, "STOW-RS POST /dicomweb/studies 200",
          f"{len(stored.get('00081199', {}).get('Value', []))} instances stored")
    study = study_uid(sorted(stow_series.glob("*.dcm"))[0])
    deadline = time.monotonic() + 120
    analyses: list[dict] = []
    while time.monotonic() < deadline:
        status, body, _ = request("GET", f"{base}/v1/analyses?study_instance_uid={study}")
        analyses = json.loads(body)["analyses"] if status == 200 else []
        if analyses and analyses[0]["status"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    check(bool(analyses) and analyses[0]["status"] == "done",
          "the STOW-RS series was analysed after the stability window",
          analyses[0].get("prediction") if analyses else "no analysis")

    status, body, _ = request("GET", base + "/metrics")
    text = body.decode()
    names = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line.startswith("flaircad_")})
    check(status == 200 and names != [], "GET /metrics", f"{len(names)} flaircad_* series")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(sys.argv[1].rstrip("/"), Path(sys.argv[2]), Path(sys.argv[3]))
