"""Authentication (API keys, JWTs), security headers, CORS and the audit trail, through a real
server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI

from service.core.config import Settings
from service.runtime.app import create_app
from service.runtime.auth import Authenticator, AuthError, parse_keys
from tests._live import KEY, Live, related, running, settings_for
from tests.conftest import PhantomFactory

FILE_KEY = "file-key-0a9b8c7d6e5f4a3b2c1d"
ORIGIN = "https://viewer.example.org"
PATIENT_NAME = "Quuxley^Zebedee"


def _pem(private: Any) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("security")
    (root / "keys").write_text(f"# viewer plugin\nfile-client:{FILE_KEY}\n")
    (root / "rsa.pem").write_text(_pem(keys["rsa"]))
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["ec"].public_key()))
    (root / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "ec-1",
                                                         "use": "sig", "alg": "ES256"}]}))
    settings = settings_for(root / "spool", api_keys_file=root / "keys",
                            jwt_public_key_file=root / "rsa.pem",
                            jwt_jwks_file=root / "jwks.json", jwt_audience="flaircad",
                            cors_allow_origins=[ORIGIN])
    with running(settings) as server:
        yield server


def _token(private: Any, algorithm: str = "RS256", **claims: Any) -> str:
    payload = {"sub": "dr-who", "aud": "flaircad", "exp": int(time.time()) + 300, **claims}
    headers = {"kid": "ec-1"} if algorithm == "ES256" else None
    return jwt.encode(payload, private, algorithm=algorithm, headers=headers)


def _operations(live: Live) -> list[tuple[str, str]]:
    spec = live.app.openapi()
    out = []
    for path, operations in spec["paths"].items():
        concrete = path
        for name in ("study", "series", "instance", "frame", "analysis_id"):
            concrete = concrete.replace("{" + name + "}", "0" * 32 if name == "analysis_id"
                                        else "1.2.3")
        concrete = concrete.replace("{", "").replace("}", "")
        out += [(method.upper(), concrete) for method in operations]
    return out


def test_every_route_but_the_probes_needs_a_bearer_token(live: Live) -> None:
    operations = _operations(live)
    assert len(operations) >= 10
    for method, path in operations:
        response = httpx.request(method, live.url + path, timeout=30)
        if path in ("/healthz", "/readyz", "/metrics"):
            assert response.status_code == 200, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"].startswith('Bearer realm="flaircad"')
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "unauthorized"
    # unknown routes too: nothing is said about what exists
    assert httpx.get(live.url + "/nope").status_code == 401
    for name, value in live.app.openapi()["paths"]["/v1/analyses"]["post"].items():
        if name == "security":
            assert value == [{"bearer": []}]


@pytest.mark.parametrize(("authorization", "error"), [
    (f"Bearer {KEY}x", "invalid_token"),
    ("Bearer " + KEY[:-1], "invalid_token"),
    (f"Basic {KEY}", "invalid_request"),
    ("Bearer", "invalid_request"),
    ("Bearer " + "a" * 9000, "invalid_token"),
    ("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "invalid_token"),
])
def test_wrong_credentials_are_401(live: Live, authorization: str, error: str) -> None:
    response = httpx.get(live.url + "/v1/model", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert f'error="{error}"' in response.headers["www-authenticate"]


def test_keys_from_settings_and_from_the_secret_file(live: Live) -> None:
    assert live.get("/v1/model").status_code == 200
    response = httpx.get(live.url + "/v1/model",
                         headers={"Authorization": f"bearer {FILE_KEY}"})
    assert response.status_code == 200


def test_jwts_signed_by_the_configured_keys(live: Live, keys: dict[str, Any]) -> None:
    def status(token: str) -> int:
        return httpx.get(live.url + "/v1/model",
                         headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(_token(keys["rsa"])) == 200  # PEM key
    assert status(_token(keys["ec"], "ES256")) == 200  # JWKS key, by kid
    assert status(_token(keys["stranger"])) == 401  # nobody we know signed it
    assert status(_token(keys["rsa"], exp=int(time.time()) - 3600)) == 401  # expired
    assert status(_token(keys["rsa"], aud="someone-else")) == 401
    no_sub = jwt.encode({"aud": "flaircad", "exp": int(time.time()) + 60}, keys["rsa"],
                        algorithm="RS256")
    assert status(no_sub) == 401
    # algorithm confusion: the public key used as an HMAC secret; and no signature at all
    claims = {"sub": "mallory", "aud": "flaircad", "exp": int(time.time()) + 60}
    assert status(_forged(claims, "HS256", _pem(keys["rsa"]).encode())) == 401
    assert status(_forged(claims, "none", b"")) == 401


def _forged(claims: dict[str, Any], algorithm: str, secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (b64(json.dumps({"alg": algorithm, "typ": "JWT"}).encode()) + "."
                     + b64(json.dumps(claims).encode()))
    signature = (hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
                 if secret else b"")
    return signing_input + "." + b64(signature)


def test_security_headers_on_every_answer(live: Live) -> None:
    for response in (live.get("/v1/model"), httpx.get(live.url + "/v1/model"),
                     live.get("/v1/analyses/" + "0" * 32), httpx.get(live.url + "/healthz")):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        assert headers["content-security-policy"].startswith("default-src 'none'")


def test_cors_only_for_listed_origins(live: Live, tmp_path: Path) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(live.url + "/v1/analyses", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(live.url + "/v1/analyses",
                          headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    simple = live.get("/v1/model", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers
    # by default there is no CORS at all
    closed = create_app(Settings(spool_dir=tmp_path, auth_disabled=True))
    assert "CORSMiddleware" not in {m.cls.__name__ for m in closed.user_middleware}


def test_audit_trail_says_who_sent_and_read_what_without_names_or_tokens(
        live: Live, phantom_series: PhantomFactory, tmp_path: Path) -> None:
    files = []
    for path in sorted(phantom_series(label="MS", seed=61).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        files.append(tmp_path / path.name)
        ds.save_as(files[-1])
    body, headers = related([p.read_bytes() for p in files])
    stored = httpx.post(live.url + "/dicomweb/studies", content=body, timeout=60,
                        headers={**headers, "Authorization": f"Bearer {FILE_KEY}"})
    assert stored.status_code == 200
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    (analysis,) = live.wait_for_study(first.StudyInstanceUID)
    assert analysis["status"] == "done"
    assert live.get(f"/v1/analyses/{analysis['analysis_id']}/preview.png").status_code == 200
    assert httpx.get(live.url + "/v1/model",
                     headers={"Authorization": "Bearer not-a-key-at-all-123"}).status_code == 401

    trail = live.settings.spool_dir / "audit.jsonl"
    assert trail.stat().st_mode & 0o777 == 0o600
    text = trail.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    stow = [r for r in records if r["event"] == "stow"
            and r["series"][0]["study_instance_uid"] == first.StudyInstanceUID]
    assert stow and stow[0]["who"] == "key:file-client"
    assert stow[0]["series"][0]["series_instance_uid"] == first.SeriesInstanceUID
    assert stow[0]["series"][0]["new_instances"] == len(files)
    finished = [r for r in records if r["event"] == "analysis"
                and r["analysis_id"] == analysis["analysis_id"]]
    assert finished[0]["sr_sop_instance_uid"] == analysis["outputs"]["sr_sop_instance_uid"]
    assert finished[0]["sc_series_instance_uid"] == (
        analysis["outputs"]["secondary_capture_series_instance_uid"])
    reads = [r for r in records if r["event"] == "read" and r.get("what") == "preview"]
    assert reads[-1]["who"] == "key:tester"
    assert reads[-1]["series_instance_uid"] == first.SeriesInstanceUID
    assert any(r["event"] == "auth_failed" for r in records)
    for secret in (PATIENT_NAME, "Quuxley", "Zebedee", KEY, FILE_KEY, "not-a-key-at-all"):
        assert secret not in text


def test_start_refused_without_credentials_and_warned_when_disabled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def start(app: FastAPI) -> None:
        async with app.router.lifespan_context(app):
            pass

    app = create_app(Settings(spool_dir=tmp_path, providers=["CPUExecutionProvider"]))
    with pytest.raises(RuntimeError, match="FLAIRCAD_AUTH_DISABLED"):
        asyncio.run(start(app))
    app = create_app(Settings(spool_dir=tmp_path, providers=["CPUExecutionProvider"],
                              auth_disabled=True))
    with caplog.at_level(logging.WARNING, logger="service.runtime.app"):
        asyncio.run(start(app))
    assert any("authentication is DISABLED" in r.getMessage() for r in caplog.records)


def test_key_parsing_and_constant_time_lookup() -> None:
    keys = parse_keys("a:0123456789abcdef0, 0123456789abcdefXYZ\n# b:comment\n", "test")
    assert keys["a"] == "0123456789abcdef0"
    assert [name for name in keys if name.startswith("key-")]
    with pytest.raises(ValueError, match="shorter"):
        parse_keys("short:abc", "test")
    authenticator = Authenticator(keys)
    assert authenticator.authenticate("Bearer 0123456789abcdef0").id == "key:a"
    with pytest.raises(AuthError):
        authenticator.authenticate("Bearer 0123456789abcdef1")
    with pytest.raises(ValueError, match="asymmetric"):
        Authenticator({}, algorithms=["HS256"])
