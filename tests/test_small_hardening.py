"""Small findings of the hardening issue (13): identifiers matched in full, the trailing-slash
form of the analyses collection answered rather than redirected."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import sanitize
from service.logs import sane_request_id
from service.spool import safe_uid
from tests._live import Live, free_port, related, running, settings_for
from tests._server import FLAIRCAD, ServerProcess


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
