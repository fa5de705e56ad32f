"""Who is calling: ``Authorization: Bearer <token>``, where the token is a static API key or a
JWT signed by a key the operator configured.

* **API keys** come from ``FLAIRCAD_API_KEYS`` and/or the file ``FLAIRCAD_API_KEYS_FILE`` (a
  mounted secret), one ``name:key[:scopes]`` per entry (:func:`parse_api_keys`); the name is
  what the audit log records, never the key. Only SHA-256 digests of the keys are kept; a
  presented token is hashed and compared with every digest by :func:`hmac.compare_digest`,
  without stopping at a match, so the time taken says nothing about which key, or how much of
  one, matched. Keys shorter than 16 characters are refused at start-up.
* **JWTs** (a token with two dots, when a key is configured) are verified with PyJWT against
  ``FLAIRCAD_JWT_PUBLIC_KEY_FILE`` (PEM) or ``FLAIRCAD_JWT_JWKS_FILE`` (the key chosen by the
  token's ``kid``), with asymmetric algorithms only (no ``none``, no HMAC: a public key must
  never double as a shared secret). ``exp`` and ``sub`` are required, ``aud``/``iss`` checked
  when configured, 30 s of clock skew allowed; a ``sub`` that is not a non-empty string is
  refused (the audit trail must name somebody). The audit log records ``jwt:<sub>``.

**Scopes** (what a caller may do, checked per route by :class:`service.api.security.RequireScope`):
``store`` sends data (STOW-RS, ``POST /v1/analyses``), ``read`` reads results (``GET
/v1/analyses…``, WADO-RS, QIDO-RS). A key's scopes follow its last ``:`` (``pacs:KEY:store``,
``ops:KEY:read+store``); a key listed without scopes has all of them, as before scopes existed
(a warning at start names such keys). A JWT's come from its ``scope`` claim (space-separated,
RFC 8693) or ``scp`` (a list or a space-separated string); names other than ours are ignored,
and a JWT with neither claim has none: least privilege for tokens minted by an identity
provider that other services share.

Authentication is on unless ``FLAIRCAD_AUTH_DISABLED=true``; on without any key configured the
service refuses to start (:func:`check_configured`) rather than lock everyone out quietly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.types import Options

from service.core.config import Settings

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                         "ES256K", "ES384", "ES512", "EdDSA"})
_MAX_TOKEN = 8192  # longer bearer tokens are not parsed at all

READ, STORE = "read", "store"
SCOPES = frozenset({READ, STORE})
# what may follow a key's last ':' as its scopes: lowercase names joined by '+' or spaces
_SCOPE_LIST = re.compile(r"[A-Za-z]+(?:[+ ]+[A-Za-z]+)*")


@dataclass(frozen=True)
class Principal:
    """The caller: ``id`` is ``key:<name>``, ``jwt:<sub>`` or ``anonymous`` (auth off);
    ``scopes`` what it may do (:data:`SCOPES`)."""

    id: str
    method: str  # api_key, jwt, none
    scopes: frozenset[str] = SCOPES


ANONYMOUS = Principal("anonymous", "none")  # authentication off: every scope


@dataclass(frozen=True)
class ApiKey:
    key: str
    scopes: frozenset[str] | None = None  # None: none listed, so all (as before scopes)


class AuthError(Exception):
    """401; ``error`` is the RFC 6750 error code (``invalid_request``/``invalid_token``) or
    None when no credentials were sent."""

    def __init__(self, detail: str, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        self.detail, self.error = detail, error


def parse_keys(text: str, origin: str) -> dict[str, str]:
    """The keys of :func:`parse_api_keys`, without their scopes."""
    return {name: entry.key for name, entry in parse_api_keys(text, origin).items()}


def parse_api_keys(text: str, origin: str) -> dict[str, ApiKey]:
    """``name:key[:scopes]`` entries separated by commas or new lines (``#`` starts a comment);
    a bare key gets the name ``key-<first 8 hex digits of its SHA-256>``.

    Scopes are :data:`SCOPES` names joined by ``+`` or spaces (``ops:KEY:read+store``,
    ``KEY:read`` for a bare key); a comma-separated item that is only scope names continues
    the scope list of the entry before it (``ops:KEY:read,store``: it cannot be a key, keys
    being 16 characters or more). Text after a second ``:`` that is not letters stays part of
    the key, as before scopes existed; letters that are not all scope names stop the start
    (a typo must not quietly become a key nobody has, nor a key lose its scopes)."""
    keys: dict[str, ApiKey] = {}
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0]
        last: str | None = None  # the line's previous entry, when it listed scopes
        for item in line.split(","):
            item = item.strip()
            if not item:
                continue
            if last is not None and _SCOPE_LIST.fullmatch(item) and _names(item) <= SCOPES:
                listed = keys[last].scopes or frozenset()
                keys[last] = ApiKey(keys[last].key, listed | _scopes_of(item, last, origin))
                continue
            name, entry = _parse_entry(item, origin)
            keys[name] = entry
            last = name if entry.scopes is not None else None
    return keys


def _parse_entry(item: str, origin: str) -> tuple[str, ApiKey]:
    scoped, sep, tail = item.rpartition(":")
    tail = tail.strip()
    # name:key:scopes, or key:scopes (a bare key), whose scopes are all known names
    listed = bool(sep and _SCOPE_LIST.fullmatch(tail)) and (
        ":" in scoped or _names(tail) <= SCOPES)
    if not listed:
        scoped = item
    name, sep, key = scoped.partition(":")
    if not sep:
        name, key = "", scoped
    name, key = name.strip(), key.strip()
    scopes = _scopes_of(tail, name, origin) if listed else None
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"an API key in {origin} is shorter than {MIN_KEY_LENGTH} "
                         "characters")
    return name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8], ApiKey(key, scopes)


def _names(text: str) -> frozenset[str]:
    return frozenset(re.split(r"[+ ]+", text.strip().lower()))


def _scopes_of(text: str, name: str, origin: str) -> frozenset[str]:
    names = _names(text)
    if not names <= SCOPES:  # the names are not quoted: they might be a mistyped key's end
        raise ValueError(f"API key {name[:40] or '(unnamed)'!r} in {origin} lists an unknown "
                         f"scope; known: {', '.join(sorted(SCOPES))} (a key holding ':' "
                         "must not end in letters only)")
    return names


def jwt_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Our scopes among the JWT's ``scope`` (space-separated string) and ``scp`` (list or
    string) claims; others' scopes are ignored, and no claim means no scope."""
    granted: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(item for item in value if isinstance(item, str))
    return frozenset(granted) & SCOPES


class Authenticator:
    def __init__(self, keys: Mapping[str, str | ApiKey], *, jwt_keys: list[Any] | None = None,
                 audience: str | None = None, issuer: str | None = None,
                 algorithms: list[str] | None = None) -> None:
        """``keys``: name → key (all scopes) or :class:`ApiKey`."""
        entries = {name: value if isinstance(value, ApiKey) else ApiKey(value)
                   for name, value in keys.items()}
        self._digests = [(name, hashlib.sha256(entry.key.encode()).digest())
                         for name, entry in entries.items()]
        self._scopes = {name: SCOPES if entry.scopes is None else entry.scopes
                        for name, entry in entries.items()}
        self.unscoped_keys = sorted(name for name, entry in entries.items()
                                    if entry.scopes is None)
        self._jwt_keys = jwt_keys or []  # PEM text or jwt.PyJWK
        self._audience, self._issuer = audience, issuer
        wanted = algorithms or sorted(_ASYMMETRIC)
        refused = sorted(set(wanted) - _ASYMMETRIC)
        if refused:
            raise ValueError(f"JWT algorithms {refused} are not accepted (asymmetric only)")
        self._algorithms = list(wanted)

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        keys: dict[str, ApiKey] = {}
        if settings.api_keys is not None:
            keys.update(parse_api_keys(settings.api_keys.get_secret_value(),
                                       "FLAIRCAD_API_KEYS"))
        if settings.api_keys_file is not None:
            keys.update(parse_api_keys(
                Path(settings.api_keys_file).read_text(encoding="utf-8"),
                "FLAIRCAD_API_KEYS_FILE"))
        jwt_keys: list[Any] = []
        if settings.jwt_public_key_file is not None:
            jwt_keys.append(Path(settings.jwt_public_key_file).read_text(encoding="ascii"))
        if settings.jwt_jwks_file is not None:
            document = json.loads(Path(settings.jwt_jwks_file).read_text(encoding="utf-8"))
            jwt_keys.extend(jwt.PyJWKSet.from_dict(document).keys)
        return cls(keys, jwt_keys=jwt_keys, audience=settings.jwt_audience,
                   issuer=settings.jwt_issuer, algorithms=settings.jwt_algorithms)

    @property
    def configured(self) -> bool:
        return bool(self._digests or self._jwt_keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError("this route needs Authorization: Bearer <token>", error=None)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <token>'",
                            error="invalid_request")
        if len(token) > _MAX_TOKEN:
            raise AuthError("the bearer token is too long")
        if self._jwt_keys and token.count(".") == 2:
            return self._verify_jwt(token)
        return self._check_key(token)

    def _check_key(self, token: str) -> Principal:
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        match: str | None = None
        for name, digest in self._digests:  # all of them, whatever matched
            if hmac.compare_digest(digest, presented):
                match = name
        if match is None:
            raise AuthError("the bearer token is not valid")
        return Principal(f"key:{match}", "api_key", self._scopes[match])

    def _verify_jwt(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a valid JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise AuthError(f"JWT algorithm {str(algorithm)[:20]!r} is not accepted")
        kid = header.get("kid")
        candidates = [key for key in self._jwt_keys
                      if kid is None or getattr(key, "key_id", None) in (None, kid)]
        options: Options = {"require": ["exp", "sub"]}
        for key in candidates:
            try:
                claims = jwt.decode(token, key.key if isinstance(key, jwt.PyJWK) else key,
                                    algorithms=[algorithm], audience=self._audience,
                                    issuer=self._issuer, options=options, leeway=30)
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, jwt.InvalidAlgorithmError,
                    ValueError, TypeError):
                continue  # another configured key (of another type) may have signed it
            except jwt.PyJWTError as error:  # signature good, claims not (PyJWT checks in order)
                raise AuthError(f"the JWT is not valid: {type(error).__name__}") from None
            subject = claims.get("sub")
            if not isinstance(subject, str) or not subject.strip():
                # "jwt:" would be the audit trail's only word on who read what
                raise AuthError("the JWT's sub claim is empty")
            return Principal(f"jwt:{subject[:128]}", "jwt", jwt_scopes(claims))
        raise AuthError("the JWT's signature does not verify with any configured key")


def check_configured(settings: Settings, authenticator: Authenticator) -> None:
    """Refuse to start with authentication on and nothing to authenticate against."""
    if not settings.auth_disabled and not authenticator.configured:
        raise RuntimeError(
            "authentication is on but no credentials are configured: set FLAIRCAD_API_KEYS "
            "or FLAIRCAD_API_KEYS_FILE (name:key entries), or FLAIRCAD_JWT_PUBLIC_KEY_FILE / "
            "FLAIRCAD_JWT_JWKS_FILE; for a local demo only, FLAIRCAD_AUTH_DISABLED=true")
    if not settings.auth_disabled and authenticator.unscoped_keys:
        warn_unscoped(authenticator.unscoped_keys)


def warn_unscoped(names: Iterable[str]) -> None:
    """One line at start: keys listed without scopes may still do everything."""
    names = list(names)
    log.warning("API keys without scopes may send data and read every result: give each the "
                "scopes it needs (name:key:read, name:key:store)",
                extra={"keys": names[:50], "unscoped_keys": len(names)})
