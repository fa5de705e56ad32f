"""Where finished results go: DICOMweb STOW-RS and DIMSE C-STORE destinations (settings).

``FLAIRCAD_DESTINATIONS`` is a JSON list; each entry names one destination::

    [{"name": "pacs", "kind": "stow", "url": "http://pacs:8042/dicom-web",
      "username": "flaircad", "password": "secret"},
     {"name": "pacs-dimse", "kind": "cstore", "ae_title": "ORTHANC", "host": "pacs",
      "port": 4242}]

The name identifies the destination in the spool database, the metrics and
``GET /v1/analyses/{id}``: keep it when a URL or a password changes, and pending sends resume
against the new values.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

AE_TITLE_PATTERN = r"^[ -\[\]-~]{1,16}$"  # PS3.5 AE VR: 16 characters, no backslash


class Destination(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                      description="stable identifier (database, metrics, API)")
    kind: Literal["stow", "cstore"] = Field(
        description="stow: DICOMweb STOW-RS over HTTP(S); cstore: DIMSE C-STORE")
    # -- stow --------------------------------------------------------------------------------
    url: str | None = Field(
        None, pattern=r"^https?://", description="stow: the DICOMweb root; instances are "
        "POSTed to <url>/studies (e.g. http://orthanc:8042/dicom-web)")
    username: str | None = Field(None, description="stow: HTTP basic authentication")
    password: SecretStr | None = None
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="stow: extra HTTP headers, e.g. "
        '{"Authorization": "Bearer <token>"}')
    verify_tls: bool | str = Field(
        True, description="stow: verify the server certificate (or the path of a CA bundle)")
    # -- cstore ------------------------------------------------------------------------------
    ae_title: str | None = Field(None, pattern=AE_TITLE_PATTERN,
                                 description="cstore: the called AE title")
    host: str | None = Field(None, description="cstore: host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="cstore: port")
    # -- both --------------------------------------------------------------------------------
    timeout_s: float = Field(60.0, gt=0, description="network timeout of one attempt")

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "stow" and not self.url:
            raise ValueError(f"destination {self.name!r}: kind stow needs url")
        if self.kind == "cstore" and not (self.ae_title and self.host and self.port):
            raise ValueError(f"destination {self.name!r}: kind cstore needs ae_title, host "
                             "and port")
        if self.username is not None and self.password is None:
            raise ValueError(f"destination {self.name!r}: username without password")
        return self

    def describe(self) -> str:
        """For logs and errors: where, never credentials."""
        if self.kind == "stow":
            return "STOW-RS " + re.sub(r"//[^/@]*@", "//", self.url or "")
        return f"C-STORE {self.ae_title}@{self.host}:{self.port}"
