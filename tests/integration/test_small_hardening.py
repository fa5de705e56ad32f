"""Small findings of the hardening issue (13): identifiers matched in full, the trailing-slash
form of the analyses collection answered rather than redirected."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.config import Settings
from service.pipeline import sanitize
from service.runtime.logs import sane_request_id
from service.storage.spool import Spool, safe_uid
from tests._live import Live, free_port, related, running, settings_for
from tests._server import FLAIRCAD, ServerProcess
from tests.conftest import PhantomFactory


@pytest.mark.parametrize("value", ["1.2.3\n", "1.2.3\r\n", "\n1.2.3", "1.2.3\t", "1.2.3\x0b"])
def test_a_uid_with_a_newline_or_other_whitespace_is_refused(value: str) -> None:
    """`^…$` with re.match accepts "1.2.3\\n" ($ matches before a final newline), and a
    whitespace strip() hid the rest; only DICOM's own padding (NUL, space) may be taken off."""
    with pytest.raises(ValueError):
        safe_uid(value)
    assert not sanitize.is_conformant_uid(value)
    assert sanitize.clean_uid(value) is None


def test_dicom_padding_is_still_accepted() -> None:
    assert safe_uid("1.2.3\x00") == "1.2.3" and safe_uid("1.2.3 ") == "1.2.3"
    assert sanitize.is_conformant_uid("1.2.840.10008.5.1.4.1.1.4")


def test_a_request_id_with_a_newline_is_not_echoed() -> None:
    assert sane_request_id("abcdefgh-1234") == "abcdefgh-1234"
    assert sane_request_id("abcdefgh-1234\n") is None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with running(settings_for(tmp_path_factory.mktemp("small") / "spool")) as server:
        yield server


def test_the_analyses_collection_answers_with_a_trailing_slash(live: Live) -> None:
    listed = live.get("/v1/analyses/", follow_redirects=False)
    assert listed.status_code == 200 and "analyses" in listed.json()
    # a POST without a body: a problem+json 4xx, not a 307 with an empty body
    posted = live.post("/v1/analyses/", follow_redirects=False)
    assert 400 <= posted.status_code < 500 and posted.status_code != 404
    assert posted.headers["content-type"].startswith("application/problem+json")
    assert posted.json()["status"] == posted.status_code



def test_a_rejection_names_the_clients_part_not_a_server_path(tmp_path: Path,
                                                               dicom_samples: Path) -> None:
    """A mosaic upload is refused (422 mosaic, with the non-FLAIR override so that the volume
    stage sees it): the detail names the request's part, never the spool folder it was in."""
    mosaic = sorted((dicom_samples / "siemens_trio_epi_mosaic_transfer_syntaxes" / "dicom")
                    .glob("*.dcm"))[0].read_bytes()
    body, headers = related([mosaic])
    settings = settings_for(tmp_path / "spool", accept_non_flair=True)
    with running(settings) as server:
        response = server.post("/v1/analyses", content=body, headers=headers)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "mosaic"
    text = json.dumps(problem)
    assert str(tmp_path) not in text and "uploads" not in text
    assert ".dcm" not in text and "part 1" in problem["detail"]


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLAIRCAD_")}
    clean.update({"FLAIRCAD_SPOOL_DIR": str(tmp_path / "spool"), "FLAIRCAD_HOST": "127.0.0.1",
                  **env})
    return subprocess.run([str(FLAIRCAD), "serve"], env=clean, cwd=tmp_path, text=True,
                          capture_output=True, timeout=60)


def test_serve_without_credentials_says_so_in_one_line(tmp_path: Path) -> None:
    result = _serve(tmp_path, FLAIRCAD_PORT=str(free_port()))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) < 400, result.stderr[-2000:]
    assert "no credentials" in lines[0] and "FLAIRCAD_API_KEYS" in lines[0]
    assert not (tmp_path / "spool").exists()  # nothing opened


def test_serve_on_a_busy_port_refuses_before_starting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve(tmp_path, FLAIRCAD_PORT=str(port), FLAIRCAD_AUTH_DISABLED="true")
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    # one line, and no log record: the app never started
    assert len(result.stderr.strip().splitlines()) == 1 and "{" not in result.stderr
    assert not (tmp_path / "spool").exists()


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def test_killing_a_multi_worker_server_kills_its_workers(tmp_path: Path) -> None:
    """tests/_server.py SIGKILLed only the parent of `--workers 2`: the workers lived on,
    still listening. Each server now has its own process group, and kill() ends the group."""
    server = ServerProcess(tmp_path, args=("--workers", "2")).start()
    assert server.process is not None
    workers = _children(server.process.pid)
    assert workers, "no worker processes seen"
    server.kill()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()]


# -- issue 13 item 14: no URL made from a client's Host / X-Forwarded-* headers -------------
_SPOOFED = {"Host": "evil.example", "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "gopher", "X-Forwarded-Prefix": "/evil"}


def _spoof_free(response: Any) -> str:
    """The response as text (status, headers, body); it must not name the spoofed values."""
    text = (f"{response.status_code} {dict(response.headers)} "
            f"{response.content.decode('latin-1')}")
    for needle in ("evil", "gopher"):
        assert needle not in text, f"{response.request.url}: {text[:600]}"
    return text


def _urls(items: list[dict[str, Any]]) -> list[str]:
    """The RetrieveURLs and BulkDataURIs in DICOM JSON items."""
    found = [item["00081190"]["Value"][0] for item in items if "00081190" in item]
    found += [item["7FE00010"]["BulkDataURI"] for item in items if "7FE00010" in item]
    return found


def test_no_response_reflects_a_spoofed_host_or_forwarded_proto(
        tmp_path: Path, phantom_series: PhantomFactory) -> None:
    """WADO-RS BulkDataURI and QIDO-RS RetrieveURL were made from request.base_url, i.e. the
    Host header: `Host: evil.example` sent viewers (and caches) to evil.example. They are
    now FLAIRCAD_PUBLIC_BASE_URL-based, or path-absolute when that is unset."""
    folder = phantom_series(label="MS", seed=7, slices=8)
    files = [("files", (p.name, p.read_bytes(), "application/dicom"))
             for p in sorted(folder.glob("*.dcm"))]
    with running(settings_for(tmp_path / "spool")) as server:
        posted = server.post("/v1/analyses", files=files, headers=_SPOOFED)
        assert posted.status_code == 200, posted.text
        _spoof_free(posted)
        analysis = posted.json()
        study, outputs = analysis["study_instance_uid"], analysis["outputs"]
        sc_series = outputs["secondary_capture_series_instance_uid"]
        sr = f"series/{outputs['sr_series_instance_uid']}/instances/" \
             f"{outputs['sr_sop_instance_uid']}"
        paths = [f"/v1/analyses/{analysis['analysis_id']}", "/v1/analyses",
                 f"/dicomweb/studies/{study}/series",
                 f"/dicomweb/studies/{study}/series/{sc_series}/metadata",
                 f"/dicomweb/studies/{study}/{sr}/metadata",
                 f"/dicomweb/studies/{study}/{sr}", "/dicomweb/studies/1.2.3/series",
                 "/healthz", "/readyz"]
        for path in paths:
            _spoof_free(server.get(path, headers=_SPOOFED))
        queued = server.post("/v1/analyses", files=files,
                             headers={**_SPOOFED, "Prefer": "respond-async"})
        _spoof_free(queued)
        stow_body, stow_headers = related([sorted(folder.glob("*.dcm"))[0].read_bytes()])
        _spoof_free(server.post("/dicomweb/studies", content=stow_body,
                                headers={**stow_headers, **_SPOOFED}))

        series = server.get(f"/dicomweb/studies/{study}/series", headers=_SPOOFED).json()
        metadata = server.get(f"/dicomweb/studies/{study}/series/{sc_series}/metadata",
                              headers=_SPOOFED).json()
        urls = _urls(series) + _urls(metadata)
        assert len(urls) == len(series) + len(metadata)
        assert all(url.startswith(f"/dicomweb/studies/{study}/series/") for url in urls), urls

        # with the public address configured, the absolute URLs are made from it alone
        server.runtime.settings.public_base_url = "https://flaircad.hospital.org/pacs"
        series = server.get(f"/dicomweb/studies/{study}/series", headers=_SPOOFED).json()
        metadata = server.get(f"/dicomweb/studies/{study}/series/{sc_series}/metadata",
                              headers=_SPOOFED).json()
        expected = f"https://flaircad.hospital.org/pacs/dicomweb/studies/{study}/series/"
        assert all(url.startswith(expected) for url in _urls(series) + _urls(metadata))


@pytest.mark.parametrize("value", ["gopher://h", "/relative", "https://u:p@h", "https://h/?q=1",
                                   "https://h/#x", "https://h:99999", "https://h/a b"])
def test_a_malformed_public_base_url_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="FLAIRCAD_PUBLIC_BASE_URL"):
        Settings(public_base_url=value)


def test_the_public_base_url_loses_its_trailing_slash() -> None:
    assert Settings(public_base_url="https://h.org:8443/x/").public_base_url == \
        "https://h.org:8443/x"
    assert Settings(public_base_url="").public_base_url is None


# -- issue 13 item 14: X-Forwarded-For believed only from configured proxies ----------------
def test_trusted_proxies_are_addresses_or_networks() -> None:
    assert Settings().trusted_proxies == []
    assert Settings(trusted_proxies=["10.0.0.7/8", " ::1 ", "192.0.2.1"]).trusted_proxies == \
        ["10.0.0.0/8", "::1", "192.0.2.1"]
    for bad in ("*", "proxy.local", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
            Settings(trusted_proxies=[bad])


def _audited_client(tmp_path: Path, **env: str) -> str | None:
    """The client address the audit trail records for a refused request from 127.0.0.1 that
    claims, in X-Forwarded-For, to come from 10.9.9.9 (a header only: nothing is sent
    there)."""
    server = ServerProcess(tmp_path, env={"FLAIRCAD_AUTH_DISABLED": "false",
                                          "FLAIRCAD_API_KEYS": "ops:" + "k" * 32, **env})
    server.start()
    try:
        refused = httpx.get(server.url + "/v1/analyses", timeout=30,
                            headers={"Authorization": "Bearer wrong-key-0000000000000000",
                                     "X-Forwarded-For": "10.9.9.9"})
        assert refused.status_code == 401
    finally:
        server.stop()
    lines = (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()
    refusals = [json.loads(line) for line in lines if '"auth_failed"' in line]
    assert len(refusals) == 1, lines
    client: str | None = refusals[0].get("client")
    return client


def test_x_forwarded_for_is_believed_only_from_a_configured_proxy(tmp_path: Path) -> None:
    """uvicorn's default (proxy_headers on, forwarded_allow_ips 127.0.0.1) let any local
    process write any client address into the audit trail."""
    assert _audited_client(tmp_path / "none") == "127.0.0.1"
    trusted = _audited_client(tmp_path / "trusted",
                              FLAIRCAD_TRUSTED_PROXIES='["127.0.0.0/8"]')
    assert trusted == "10.9.9.9"


# -- issue 13 item 14: lock files of dead owners do not pile up in owners/ -------------------
_HOLD_LOCK = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def test_lock_files_of_dead_owners_are_removed_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    dead = spool.owners / "host-1-gone.lock"
    dead.write_bytes(b"")
    half_made = spool.owners / ".host-2-gone.lock-new"  # died before renaming its lock
    half_made.write_bytes(b"")
    old = time.time() - 3600
    os.utime(half_made, (old, old))
    live = spool.owners / "host-3-alive.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(live)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        mine = spool.acquire_lease()
        assert sorted(p.name for p in spool.owners.iterdir()) == sorted(
            [live.name, mine.path.name])
        assert spool.owner_alive(mine.token) and spool.owner_alive("host-3-alive")
        # the periodic sweep (retention: remove_stale) keeps the live ones, its own included
        assert spool.remove_stale(3600) == 0 and mine.path.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert spool.remove_dead_owner_locks() == 1 and not live.exists()
    assert mine.path.exists()
    mine.release()
    assert list(spool.owners.iterdir()) == []
