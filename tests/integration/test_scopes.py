"""Scopes (issue 13, item 13): a key or JWT may ``store`` (STOW-RS, ``POST /v1/analyses``)
and/or ``read`` (results, WADO-RS, QIDO-RS), per key and from the JWT's ``scope``/``scp``
claims; a route outside the caller's scopes is 403 insufficient_scope (RFC 6750 §3.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.api.security import DOC_ROUTES, PUBLIC_ROUTES, route_scopes
from service.core.config import Settings
from service.runtime import audit
from service.runtime.auth import SCOPES, ApiKey, Authenticator, check_configured, parse_api_keys
from tests._live import KEY, Live, related, running, settings_for
from tests.conftest import PhantomFactory

VIEWER = "viewer-key-1d2e3f4a5b6c7d8e"
PACS = "pacs-key-9a8b7c6d5e4f3a2b"
OPS = "ops-key-0f1e2d3c4b5a6978"
SCOPES_OF = {VIEWER: {"read"}, PACS: {"store"}, OPS: {"read", "store"}, KEY: {"read", "store"}}
PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# what each operation needs: POSTs send data, GETs of results read, the model is for anyone
EXPECTED = {("post", "/dicomweb/studies"): "store",
            ("post", "/dicomweb/studies/{study}"): "store",
            ("post", "/v1/analyses"): "store", ("get", "/v1/model"): None}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("scopes")
    (root / "keys").write_text(f"# the PACS sends, ops does both\npacs:{PACS}:store\n"
                               f"ops:{OPS}:read,store\n")
    (root / "rsa.pem").write_text(PRIVATE.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    settings = settings_for(root / "spool", api_keys=f"tester:{KEY}, viewer:{VIEWER}:read",
                            api_keys_file=root / "keys", jwt_public_key_file=root / "rsa.pem",
                            jwt_audience="flaircad", audit_refusal_window_s=3600)
    with running(settings) as server:
        yield server


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(**claims: Any) -> str:
    payload = {"sub": "dr-who", "aud": "flaircad", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, PRIVATE,
                      algorithm="RS256")


def _concrete(path: str) -> str:
    for name in ("study", "series", "sop", "frames", "analysis_id"):
        path = path.replace("{" + name + "}", "0" * 32 if name == "analysis_id"
                            else "1" if name == "frames" else "1.2.3")
    return path


def _operations(live: Live) -> list[tuple[str, str, str | None]]:
    """(method, path template, scope it declares) of every scoped operation in the spec."""
    out = []
    for path, operations in live.app.openapi()["paths"].items():
        if path in PUBLIC_ROUTES:
            continue
        for method, operation in operations.items():
            out.append((method, path, operation.get("x-flaircad-scope")))
    return out


def _assert_insufficient(response: httpx.Response, scope: str) -> None:
    assert response.status_code == 403, (response.request.url, response.status_code)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="flaircad", error="insufficient_scope", scope="{scope}"')
    body = response.json()
    assert body["code"] == "insufficient_scope" and body["required_scope"] == scope


def test_every_route_declares_the_scope_it_needs(live: Live) -> None:
    operations = _operations(live)
    assert len(operations) >= 14
    declared = route_scopes(live.app)
    for method, path, scope in operations:
        # every route but the probes declares (a new route without a declaration fails here)
        assert (path, method) in declared, f"{method.upper()} {path} declares no scope"
        assert scope == EXPECTED.get((method, path), "read"), (method, path)
        responses = live.app.openapi()["paths"][path][method]["responses"]
        assert ("403" in responses) == (scope is not None)
    for path in PUBLIC_ROUTES | DOC_ROUTES:
        assert not any(p == path for p, _ in declared)


def test_keys_are_refused_the_routes_outside_their_scopes(live: Live) -> None:
    for method, path, scope in _operations(live):
        for key, granted in SCOPES_OF.items():
            response = httpx.request(method.upper(), live.url + _concrete(path),
                                     headers=_bearer(key), timeout=30)
            if scope is not None and scope not in granted:
                _assert_insufficient(response, scope)
            else:  # past the check: whatever the route says (404, 415, ...), not 401/403
                assert response.status_code not in (401, 403), (method, path, key[:4])


def test_a_store_key_gets_its_own_answer_but_reads_nothing(
        live: Live, phantom_series: PhantomFactory) -> None:
    files = [("files", (p.name, p.read_bytes(), "application/dicom"))
             for p in sorted(phantom_series(label="MS", seed=71).glob("*.dcm"))]
    answer = httpx.post(live.url + "/v1/analyses", files=files, headers=_bearer(PACS),
                        timeout=120)
    assert answer.status_code == 200 and answer.json()["status"] == "done"
    result = answer.json()
    analysis, study = result["analysis_id"], result["study_instance_uid"]
    stored = httpx.post(live.url + "/dicomweb/studies", timeout=60, **_stow(files, PACS))
    assert stored.status_code == 200
    for path in (f"/v1/analyses/{analysis}", f"/v1/analyses/{analysis}/preview.png",
                 f"/v1/analyses?study_instance_uid={study}",
                 f"/dicomweb/studies/{study}/series"):
        _assert_insufficient(httpx.get(live.url + path, headers=_bearer(PACS)), "read")
    assert httpx.get(live.url + f"/v1/analyses/{analysis}",
                     headers=_bearer(VIEWER)).json()["status"] == "done"
    series = httpx.get(live.url + f"/dicomweb/studies/{study}/series", headers=_bearer(VIEWER))
    # the SC series, the Parametric Map and the SR
    assert series.status_code == 200 and len(series.json()) == 3
    # ... and a viewer sends nothing
    _assert_insufficient(httpx.post(live.url + "/dicomweb/studies", timeout=60,
                                    **_stow(files, VIEWER)), "store")
    _assert_insufficient(httpx.post(live.url + "/v1/analyses", files=files,
                                    headers=_bearer(VIEWER), timeout=60), "store")


def _stow(files: list[tuple[str, tuple[str, bytes, str]]], key: str) -> dict[str, Any]:
    body, headers = related([data for _, (_, data, _) in files])
    return {"content": body, "headers": {**headers, **_bearer(key)}}


@pytest.mark.parametrize(("claims", "granted"), [
    ({"scope": "read"}, {"read"}),
    ({"scope": "openid store profile"}, {"store"}),
    ({"scp": ["read", "store"]}, {"read", "store"}),
    ({"scp": "store"}, {"store"}),
    ({"scope": "flaircad:read other:store"}, set()),  # not our names
    ({}, set()),  # no scope claim: no scope (least privilege)
])
def test_jwt_scopes_come_from_the_scope_and_scp_claims(
        live: Live, claims: dict[str, Any], granted: set[str]) -> None:
    headers = _bearer(_token(**claims))
    assert httpx.get(live.url + "/v1/model", headers=headers).status_code == 200
    read = httpx.get(live.url + "/v1/analyses", headers=headers)
    if "read" in granted:
        assert read.status_code == 200
    else:
        _assert_insufficient(read, "read")
    store = httpx.post(live.url + "/dicomweb/studies", headers=headers, timeout=30)
    if "store" in granted:
        assert store.status_code == 415  # past the scope check: no body
    else:
        _assert_insufficient(store, "store")


@pytest.mark.parametrize("sub", ["", "   ", 42, ["dr-who"]])
def test_jwt_without_a_subject_is_401(live: Live, sub: Any) -> None:
    response = httpx.get(live.url + "/v1/model",
                         headers=_bearer(_token(sub=sub, scope="read store")))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_scope_refusals_are_audited_and_counted(live: Live) -> None:
    trail = audit.trail(live.settings)
    trail.flush(force=True)  # a new window for the refusals below
    before = len(trail.read())
    for _ in range(5):
        _assert_insufficient(httpx.post(live.url + "/dicomweb/studies",
                                        headers=_bearer(VIEWER)), "store")
    trail.flush(force=True)
    new = trail.read()[before:]
    (first,) = [r for r in new if r["event"] == "auth_failed"]
    assert first["reason"] == "insufficient_scope" and first["who"] == "key:viewer"
    assert first["scope"] == "store" and first["route"] == "/dicomweb/studies"
    assert first["method"] == "POST"
    (repeated,) = [r for r in new if r["event"] == "auth_failed_repeated"]
    assert repeated["reason"] == "insufficient_scope" and repeated["count"] == 4
    text = (live.settings.spool_dir / "audit.jsonl").read_text()
    for secret in (VIEWER, PACS, OPS, KEY):
        assert secret not in text


def test_key_entries_with_scopes() -> None:
    keys = parse_api_keys(
        f"viewer:{VIEWER}:read, pacs:{PACS}:store\nops:{OPS}:read+store\n"
        f"both:{OPS}x:read,store\nlegacy:{KEY}\n{PACS}y:store  # a bare key, scoped\n"
        f"coloned:abc:{KEY}:x-1\nshouting:{OPS}y:Read Store\n", "test")
    assert keys["viewer"] == ApiKey(VIEWER, frozenset({"read"}))
    assert keys["pacs"] == ApiKey(PACS, frozenset({"store"}))
    assert keys["ops"].scopes == keys["both"].scopes == keys["shouting"].scopes == SCOPES
    assert keys["legacy"] == ApiKey(KEY, None)  # no list: every scope, as before
    assert keys["coloned"] == ApiKey(f"abc:{KEY}:x-1", None)  # a ':' in a key still works
    assert [entry.scopes for name, entry in keys.items() if name.startswith("key-")] == [
        frozenset({"store"})]
    for bad in (f"viewer:{VIEWER}:reed", f"viewer:{VIEWER}:read+admin"):
        with pytest.raises(ValueError, match="unknown scope") as error:
            parse_api_keys(bad, "test")
        assert VIEWER not in str(error.value)
    with pytest.raises(ValueError, match="shorter"):  # a stray item is no scope, nor a key
        parse_api_keys(f"viewer:{VIEWER}:read,admin", "test")
    authenticator = Authenticator(keys)
    assert authenticator.authenticate(f"Bearer {VIEWER}").scopes == {"read"}
    assert authenticator.authenticate(f"Bearer {KEY}").scopes == SCOPES
    assert authenticator.unscoped_keys == ["coloned", "legacy"]


def test_keys_without_scopes_are_named_in_a_warning_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def warnings(**values: Any) -> list[logging.LogRecord]:
        settings = Settings(spool_dir=tmp_path, **values)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.runtime.auth"):
            check_configured(settings, Authenticator.from_settings(settings))
        return [r for r in caplog.records if r.name == "service.runtime.auth"]

    (record,) = warnings(api_keys=f"tester:{KEY}, viewer:{VIEWER}:read, {OPS}")
    assert "scopes" in record.getMessage()
    named = record.__dict__["keys"]
    assert len(named) == 2 and "tester" in named and any(n.startswith("key-") for n in named)
    assert KEY not in repr(record.__dict__) and OPS not in repr(record.__dict__)
    assert warnings(api_keys=f"viewer:{VIEWER}:read") == []
    assert warnings(api_keys=f"tester:{KEY}", auth_disabled=True) == []
