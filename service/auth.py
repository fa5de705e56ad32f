"""Who is calling: ``Authorization: Bearer <token>``, where the token is a static API key or a
JWT signed by a key the operator configured.

* **API keys** come from ``FLAIRCAD_API_KEYS`` and/or the file ``FLAIRCAD_API_KEYS_FILE`` (a
  mounted secret), one ``name:key`` per entry; the name is what the audit log records, never
  the key. Only SHA-256 digests of the keys are kept; a presented token is hashed and compared
  with every digest by :func:`hmac.compare_digest`, without stopping at a match, so the time
  taken says nothing about which key, or how much of one, matched. Keys shorter than 16
  characters are refused at start-up.
* **JWTs** (a token with two dots, when a key is configured) are verified with PyJWT against
  ``FLAIRCAD_JWT_PUBLIC_KEY_FILE`` (PEM) or ``FLAIRCAD_JWT_JWKS_FILE`` (the key chosen by the
  token's ``kid``), with asymmetric algorithms only (no ``none``, no HMAC: a public key must
  never double as a shared secret). ``exp`` and ``sub`` are required, ``aud``/``iss`` checked
  when configured, 30 s of clock skew allowed. The audit log records ``jwt:<sub>``.

Authentication is on unless ``FLAIRCAD_AUTH_DISABLED=true``; on without any key configured the
service refuses to start (:func:`check_configured`) rather than lock everyone out quietly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

MIN_KEY_LENGTH = 16
_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                         "ES256K", "ES384", "ES512", "EdDSA"})
_MAX_TOKEN = 8192  # longer bearer tokens are not parsed at all


@dataclass(frozen=True)
class Principal:
    """The caller: ``id`` is ``key:<name>``, ``jwt:<sub>`` or ``anonymous`` (auth off)."""

    id: str
    method: str  # api_key, jwt, none


ANONYMOUS = Principal("anonymous", "none")


class AuthError(Exception):
    """401; ``error`` is the RFC 6750 error code (``invalid_request``/``invalid_token``) or
    None when no credentials were sent."""

    def __init__(self, detail: str, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        self.detail, self.error = detail, error


def parse_keys(text: str, origin: str) -> dict[str, str]:
    """``name:key`` entries separated by commas or new lines (``#`` starts a comment); a bare
    key gets the name ``key-<first 8 hex digits of its SHA-256>``."""
    keys: dict[str, str] = {}
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0]
        for entry in line.split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, key = entry.partition(":")
            if not sep:
                name, key = "", entry
            name, key = name.strip(), key.strip()
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"an API key in {origin} is shorter than {MIN_KEY_LENGTH} "
                                 "characters")
            keys[name or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]] = key
    return keys


class Authenticator:
    def __init__(self, keys: dict[str, str], *, jwt_keys: list[Any] | None = None,
                 audience: str | None = None, issuer: str | None = None,
                 algorithms: list[str] | None = None) -> None:
        self._digests = [(name, hashlib.sha256(key.encode()).digest())
                         for name, key in keys.items()]
        self._jwt_keys = jwt_keys or []  # PEM text or jwt.PyJWK
        self._audience, self._issuer = audience, issuer
        wanted = algorithms or sorted(_ASYMMETRIC)
        refused = sorted(set(wanted) - _ASYMMETRIC)
        if refused:
            raise ValueError(f"JWT algorithms {refused} are not accepted (asymmetric only)")
        self._algorithms = list(wanted)

    @classmethod
    def from_settings(cls, settings: Any) -> Authenticator:
        keys: dict[str, str] = {}
        if settings.api_keys is not None:
            keys.update(parse_keys(settings.api_keys.get_secret_value(), "FLAIRCAD_API_KEYS"))
        if settings.api_keys_file is not None:
            keys.update(parse_keys(Path(settings.api_keys_file).read_text(encoding="utf-8"),
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
        return Principal(f"key:{match}", "api_key")

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
        options = {"require": ["exp", "sub"]}
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
            subject = str(claims.get("sub", ""))[:128]
            return Principal(f"jwt:{subject}", "jwt")
        raise AuthError("the JWT's signature does not verify with any configured key")


def check_configured(settings: Any, authenticator: Authenticator) -> None:
    """Refuse to start with authentication on and nothing to authenticate against."""
    if not settings.auth_disabled and not authenticator.configured:
        raise RuntimeError(
            "authentication is on but no credentials are configured: set FLAIRCAD_API_KEYS "
            "or FLAIRCAD_API_KEYS_FILE (name:key entries), or FLAIRCAD_JWT_PUBLIC_KEY_FILE / "
            "FLAIRCAD_JWT_JWKS_FILE; for a local demo only, FLAIRCAD_AUTH_DISABLED=true")
