"""service/api only translates HTTP (issue 14): one ``RuntimeDep``, one audit helper, the URLs
of results made by the API's view, not stored by the scheduler."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from service.api.analyses import result_urls, view
from service.storage.store import Record, Status

API = Path(__file__).resolve().parents[2] / "service" / "api"
OUTPUTS = {"secondary_capture_series_instance_uid": "1.2.3", "sr_sop_instance_uid": "1.2.4",
           "sr_series_instance_uid": "1.2.5"}


def done(result: dict[str, Any]) -> Record:
    now = time.time()
    return Record("a" * 32, Status.DONE, "upload", "1.2", "1.2.9", None, now, now, result,
                  None)


def test_view_adds_the_urls_of_the_outputs() -> None:
    body = view(done({"outputs": dict(OUTPUTS)})).model_dump(mode="json")
    # a result from before the Parametric Map (or without it, FLAIRCAD_OUTPUTS) has it null
    assert body["outputs"] == {**OUTPUTS, "parametric_map_series_instance_uid": None,
                               "parametric_map_sop_instance_uid": None,
                               "instances_url": f"/v1/analyses/{'a' * 32}/instances",
                               "preview_url": f"/v1/analyses/{'a' * 32}/preview.png"}
    assert result_urls("b" * 32)["instances_url"] == f"/v1/analyses/{'b' * 32}/instances"
    # a result stored with the URLs (before issue 14) reads the same
    stored = {"outputs": {**OUTPUTS, **result_urls("a" * 32)}}
    assert view(done(stored)).model_dump(mode="json") == body
    assert view(done({})).outputs is None  # queued, failed: no outputs, no URLs


def test_the_scheduler_makes_no_urls() -> None:
    from service.pipeline import runner
    from service.runtime import runs, scheduler

    for module in (scheduler, runs, runner):  # the run of one analysis is theirs (issue 14)
        source = Path(module.__file__).read_text()  # type: ignore[arg-type]
        assert "instances_url" not in source and "preview.png" not in source, module.__name__
        assert not hasattr(module, "result_urls"), module.__name__


def test_routes_use_one_runtime_alias_and_one_audit_helper() -> None:
    for path in API.glob("*.py"):
        source = path.read_text()
        if path.name != "deps.py":
            assert "Depends(runtime)" not in source, path.name
        if path.name not in ("trail.py", "security.py"):
            # the who/client/request_id boilerplate exists once, in service.api.trail
            assert not re.search(r"audit\.trail\(", source), path.name
            assert "REQUEST_ID.get()" not in source, path.name
