"""Structured logs: one JSON object per line, and no patient data in them, ever.

Every line has ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` and ``pid``;
``request_id`` and ``analysis_id`` come from context variables set by the request middleware
and the analysis workers; anything passed as ``extra=`` is added as is (our own code only
passes ids, codes, counts and timings).

The PHI policy, and why it is conservative:

* Our own log calls never carry DICOM values. Not even Study/Series/SOP Instance UIDs: they are
  not names, but they are identifiers that link a log line to one patient's examination, and
  the normal log is read by more people than the audit trail is. Analyses are identified by
  their ``analysis_id``; the API maps it to the UIDs for those allowed to ask.
* Routes are logged by template (``/dicomweb/studies/{study}``), never the raw path or query,
  which can hold a StudyInstanceUID.
* Messages of other libraries (pydicom, highdicom, Python warnings, ...) are withheld: pydicom's
  value validation warns with the offending value in the text ("Invalid value for VR DA:
  '19710203x'"). Their logger name and level are kept, so that one can see something happened.
* Exceptions are logged as type and stack frames (file, line, function), without the message:
  exception texts of DICOM libraries quote values too. The analysis record keeps the message
  for those allowed to read it (``problem.detail``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import traceback
from types import TracebackType
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flaircad_request_id", default=None)
ANALYSIS_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flaircad_analysis_id", default=None)

# Loggers whose message text is ours or known not to carry DICOM values.
TRUSTED_LOGGERS = ("service", "flaircad", "uvicorn", "asyncio", "multiprocessing")
WITHHELD = "message withheld (third-party text may quote DICOM values)"

# An incoming X-Request-ID is echoed and logged only if it looks like an id, not like data.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")

# The attributes every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}


def sane_request_id(value: str | None) -> str | None:
    return value if value is not None and _SANE_REQUEST_ID.fullmatch(value) else None


def _trusted(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in TRUSTED_LOGGERS)


_ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


def _frames(exc_info: _ExcInfo) -> dict[str, str | list[str]]:
    kind, _, tb = exc_info
    return {"type": getattr(kind, "__qualname__", str(kind)),
            "frames": [f"{frame.filename}:{frame.lineno} in {frame.name}"
                       for frame in traceback.extract_tb(tb)]}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON (see the module docstring for what goes in)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        # Python warnings would otherwise reach stderr as plain text, value and all; through
        # logging they become JSON lines with the message withheld (logger ``py.warnings``).
        logging.captureWarnings(True)

    def format(self, record: logging.LogRecord) -> str:
        trusted = _trusted(record.name)
        line: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage() if trusted else WITHHELD,
            "pid": record.process,
        }
        for key, variable in (("request_id", REQUEST_ID), ("analysis_id", ANALYSIS_ID)):
            value = variable.get()
            if value is not None:
                line[key] = value
        if trusted:
            for key, value in vars(record).items():
                if key not in _STANDARD and not key.startswith("_"):
                    line[key] = _jsonable(value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = _frames(record.exc_info)
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def config(level: str = "info") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for the service (uvicorn applies it in every worker
    process): everything as JSON on stderr; uvicorn's access log is off because the request
    middleware writes its own line (route template, not the raw path)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "service.runtime.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            # chatty below WARNING and withheld anyway; their warnings still show (withheld)
            **{name: {"level": "WARNING"} for name in (
                "pydicom", "highdicom", "pylibjpeg", "openjpeg", "libjpeg", "PIL",
                "pynetdicom")},
        },
    }
