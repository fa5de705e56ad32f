"""Service settings: environment variables prefixed ``FLAIRCAD_`` (pydantic-settings)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS
from service.core.destinations import AE_TITLE_PATTERN, Destination
from service.core.limits import DEFAULT_ANALYSIS_MEMORY_BYTES
from service.core.outputs import ALL_OUTPUTS, DESCRIPTIONS, DicomOutput, parse_outputs

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "flaircad-demo.onnx"


def public_url(text: str) -> str:
    """``http(s)://host[:port][/path]``, without a trailing slash; a query, fragment or
    user info would end up in every URL built from it."""
    url = urlsplit(text.strip())
    if any(char.isspace() or not char.isprintable() for char in text.strip()):
        raise ValueError("FLAIRCAD_PUBLIC_BASE_URL must not hold spaces or control characters")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("FLAIRCAD_PUBLIC_BASE_URL must be an absolute http(s) URL, not "
                         f"{text[:80]!r}")
    if url.query or url.fragment or url.username is not None or "?" in text or "#" in text:
        raise ValueError("FLAIRCAD_PUBLIC_BASE_URL takes no query, fragment or user info")
    try:
        url.port  # noqa: B018 -- raises ValueError on a port that is no number or out of range
    except ValueError:
        raise ValueError(f"FLAIRCAD_PUBLIC_BASE_URL has no valid port: {text[:80]!r}") from None
    return text.strip().rstrip("/")


def proxy_network(text: str) -> str:
    """An address or network as uvicorn's ``forwarded_allow_ips`` reads it: uvicorn takes a
    malformed entry (or a network with host bits, ``10.0.0.1/8``) as a literal that matches
    nothing, silently; here it is refused, and ``*`` too (that would trust every peer)."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("FLAIRCAD_TRUSTED_PROXIES takes IP addresses and CIDR networks, not "
                         f"{text[:80]!r}") from None
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAIRCAD_", protected_namespaces=())

    model_path: Path = Field(BUNDLED_MODEL, description="ONNX model; default: the bundled demo")
    providers: list[str] = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    flair_rules: Path | None = Field(
        None,
        description="FLAIR series-selection rules (JSON, schema in service/core/flair.py); "
        "default: the packaged service/core/rules/flair.json",
    )
    accept_non_flair: bool = Field(
        False,
        description="research override: run series that no FLAIR rule matches instead of "
        "refusing them (not_flair, HTTP 422)",
    )
    explanation: str = Field(
        DEFAULT_EXPLANATION,
        description="the map the overlays, the preview and the reports show: "
        + ", ".join(f"{name} ({text})" for name, text in EXPLANATIONS.items())
        + f"; default {DEFAULT_EXPLANATION}",
    )
    # NoDecode: "sc,sr" as well as a JSON list (parse_outputs reads both)
    outputs: Annotated[frozenset[DicomOutput], NoDecode] = Field(
        ALL_OUTPUTS,
        description="the DICOM outputs written, sent and served, comma-separated: "
        + "; ".join(f"{o.value} ({text})" for o, text in DESCRIPTIONS.items())
        + "; default all three (for a PACS that refuses some SOP classes)",
    )
    spool_dir: Path = Field(
        Path("var/flaircad"),
        description="received instances, uploads, results and the SQLite database",
    )
    max_upload_bytes: int = Field(
        2 * 1024**3, gt=0, description="largest request body accepted (HTTP 413 beyond)")
    stability_window_s: float = Field(
        5.0, ge=0, description="a STOW-RS series is complete after this long without new "
        "instances")
    max_open_series: int = Field(
        256, ge=1, description="most series in the stability window (received, not yet "
        "claimed for analysis) per process; an instance that would open one more gets HTTP "
        "503 too_many_open_series + Retry-After (C-STORE 0xA700); instances of open series "
        "are always taken")
    max_open_series_per_sender: int = Field(
        128, ge=1, description="most open series of one sender (API key or JWT subject, DIMSE "
        "calling AE title; the client address with authentication off), so one sender never "
        "fills the window for the others")
    workers: int = Field(1, ge=1, description="analysis worker threads per process: analyses "
                         "run at the same time in one process")
    http_workers: int = Field(
        1, ge=1, description="uvicorn worker processes (`flaircad serve --workers`); each has "
        "its own analysis threads and queue; metrics are merged (prometheus-client "
        "multiprocess mode)")
    http_max_url_bytes: int = Field(
        8 * 1024, ge=256, description="longest request line (method, URL, version); HTTP 414 "
        "and the connection closed beyond")
    http_max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="largest request head (request line and headers); "
        "HTTP 431 and the connection closed beyond")
    http_max_header_count: int = Field(
        100, ge=8, description="most request header lines; HTTP 431 beyond")
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="time a client has to send a request's head, from its "
        "connection or its previous response; HTTP 408 and closed after it (slowloris)")
    http_body_idle_timeout_s: float = Field(
        60.0, gt=0, description="longest pause while a request body is arriving; HTTP 408 "
        "(or the connection dropped, once a response has started) after it")
    max_queue: int = Field(16, ge=1, description="analyses waiting (per process); beyond it "
                           "HTTP 503")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with HTTP 503")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM: how long queued and running analyses may take to "
        "finish while readiness answers 503; what is left resumes on the next start")
    log_level: str = Field("info", pattern="^(?i:debug|info|warning|error|critical)$",
                           description="JSON logs on stderr from this level up")
    spool_scan_interval_s: float = Field(
        15.0, ge=0, description="flaircad_spool_bytes walks the spool at most this often")
    orphan_sweep_interval_s: float = Field(
        30.0, gt=0, description="how often a process looks for analyses left by a process "
        "that died (several workers), to run them")
    # -- PACS connection (service/runtime/pacs.py: results sent back, DIMSE listener) -------------
    destinations: list[Destination] = Field(
        default_factory=list, description="where finished results (SC series + SR) are sent: "
        "a JSON list of DICOMweb STOW-RS and DIMSE C-STORE destinations (service/destinations"
        ".py)")
    delivery_max_attempts: int = Field(
        10, ge=1, description="attempts per result and destination before it is marked failed")
    delivery_backoff_s: float = Field(
        5.0, gt=0, description="wait before the first retry; doubled after each failure")
    delivery_backoff_max_s: float = Field(600.0, gt=0, description="longest wait between tries")
    dimse_ae_title: str = Field(
        "FLAIRCAD", pattern=AE_TITLE_PATTERN, description="this service's AE title: the "
        "called AE of the C-STORE listener, the calling AE of C-STORE destinations")
    dimse_port: int | None = Field(
        None, ge=0, le=65535, description="C-STORE/C-ECHO listener port inside the service "
        "(unset: no listener; `flaircad dimse` runs one on its own)")
    dimse_host: str = Field("127.0.0.1", description="listen address of the DIMSE listener")
    dimse_allowed_calling_aes: list[str] = Field(
        default_factory=list, description="calling AE titles accepted by the DIMSE listener, "
        'a JSON list such as ["ORTHANC"]; empty: any')
    # -- retention, limits, disk (README: Reliability) -----------------------------------------
    retention_hours: float = Field(
        168.0, ge=0, description="a finished analysis is deleted this long after it finished, "
        "with its results, its spooled input and its database row (PHI does not linger); 0: "
        "kept forever")
    retention_sweep_interval_s: float = Field(
        300.0, gt=0, description="how often expired analyses are looked for")
    spool_max_fill: float = Field(
        0.9, gt=0, le=1, description="refuse new data (HTTP 503 spool_full, C-STORE 0xA700) "
        "while the spool's file system is fuller than this fraction")
    max_instance_bytes: int = Field(
        256 * 1024**2, gt=0, description="largest single instance (multipart part) accepted, "
        "counted while it streams in (HTTP 413)")
    max_instances_per_series: int = Field(
        5000, ge=1, description="most instances in one series, and parts in one request")
    max_matrix: int = Field(2048, ge=1, description="largest Rows and Columns accepted")
    max_series_bytes: int = Field(
        1024**3, gt=0, description="largest decoded series: Rows x Columns x frames x samples "
        "x bytes per sample, summed over its instances")
    analysis_memory_bytes: int = Field(
        DEFAULT_ANALYSIS_MEMORY_BYTES, ge=0, description="memory the analyses of the whole "
        "container may add to its processes' RSS together: the memory limit minus each "
        "process's base RSS (~400 MiB) and headroom. Each analysis gets this divided by "
        "workers x http_workers; a series whose estimated peak (service/core/limits.py: 64 MiB + "
        "16 bytes a voxel, measured) exceeds that is refused as series_too_large before it is "
        "decoded. The default (2.5 GiB) fits the shipped 4 GiB pod; 0: not checked")
    wado_max_frames: int = Field(
        5000, ge=1, description="most distinct frames in one WADO-RS frames request (a frame "
        "named twice is sent once); HTTP 400 too_many_frames beyond. The default is "
        "max_instances_per_series: a result with one frame per slice of the largest accepted "
        "series comes in one request")
    # -- security (README: Security; docs/SECURITY.md) -----------------------------------------
    auth_disabled: bool = Field(
        False, description="serve without authentication (a warning at start-up); only for a "
        "demo on 127.0.0.1 (`make serve`)")
    api_keys: SecretStr | None = Field(
        None, description="static API keys, comma- or newline-separated, each "
        "`name:key[:scopes]` (the name is what the audit log records) or a bare key; scopes "
        "`read`, `store` or `read+store`, none listed: all (a warning at start-up)")
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one `name:key[:scopes]` per line (`#` "
        "comments): a mounted secret")
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key that verifies bearer JWTs")
    jwt_jwks_file: Path | None = Field(
        None, description="JWKS (JSON) whose keys verify bearer JWTs, chosen by `kid`")
    jwt_audience: str | None = Field(None, description="required `aud` of bearer JWTs")
    jwt_issuer: str | None = Field(None, description="required `iss` of bearer JWTs")
    jwt_algorithms: list[str] = Field(
        ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"],
        description="accepted JWT signature algorithms (asymmetric only)")
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS, a JSON list; empty: CORS "
        "closed")
    public_base_url: str | None = Field(
        None, description="the service's address as clients reach it (e.g. "
        "https://flaircad.hospital.org): the absolute URLs in responses (WADO-RS BulkDataURI, "
        "QIDO-RS RetrieveURL) start with it; unset: they are path-absolute (/dicomweb/...). "
        "Never taken from a request's Host or X-Forwarded-* headers")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or CIDR networks of reverse proxies whose "
        'X-Forwarded-For and X-Forwarded-Proto are believed, a JSON list such as ["10.0.0.5"]'
        "; empty: none, the client address is the connection's peer")
    audit_log: Path | None = Field(
        None, description="the audit trail (JSON lines); default: audit.jsonl in the spool")
    audit_max_bytes: int = Field(
        32 * 1024**2, ge=0, description="the audit trail is rotated (renamed audit.jsonl.1, "
        ".1 to .2, ...) before a line would take it past this size; with "
        "FLAIRCAD_AUDIT_BACKUPS it bounds the trail's bytes at about (backups + 1) x this; 0: "
        "never rotated by the service (rotate it outside, e.g. logrotate)")
    audit_backups: int = Field(
        10, ge=0, description="rotated audit files kept (audit.jsonl.1 newest ... .N oldest); "
        "the oldest is dropped on rotation; 0: the full file is dropped")
    audit_refusal_window_s: float = Field(
        60.0, ge=0, description="refused requests (401 auth_failed) are audited per window of "
        "this many seconds and per (reason, client address): the first as its own line, the "
        "others as one auth_failed_repeated line with their count when the window closes; 0: "
        "one line per refusal (unbounded under a flood)")
    audit_refusal_max_keys: int = Field(
        256, ge=1, description="most (reason, client address) counters per refusal window; "
        'refusals from further addresses are counted together under client "*"')

    @field_validator("public_base_url", mode="before")
    @classmethod
    def _absolute_http_url(cls, value: object) -> str | None:
        return None if value is None or str(value).strip() == "" else public_url(str(value))

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [proxy_network(item) for item in value]

    @field_validator("outputs", mode="before")
    @classmethod
    def _known_outputs(cls, value: object) -> frozenset[DicomOutput]:
        if isinstance(value, (str, list, tuple, set, frozenset)):
            return parse_outputs(value)
        raise ValueError("FLAIRCAD_OUTPUTS: a comma-separated list of sc, pm, sr")

    @field_validator("explanation", mode="before")
    @classmethod
    def _known_explanation(cls, value: object) -> str:
        name = str(value).strip().lower()
        if name not in EXPLANATIONS:
            raise ValueError(f"FLAIRCAD_EXPLANATION must be one of {', '.join(EXPLANATIONS)}, "
                             f"not {str(value)[:40]!r}")
        return name
