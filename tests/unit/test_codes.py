"""One codes module: every code describes itself, the README's code table agrees with it, and
the modules that emit codes use its members, not strings of their own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from service.core.codes import Code, Kind
from tests.conftest import REPO

_ROW = re.compile(r"^\| `(?P<code>[a-z0-9_]+)` \| (?P<kind>[^|]+?) \| (?P<meaning>.+?) \|$")


def _readme_table() -> dict[str, tuple[str, str]]:
    """The rows of the README's code table (the one whose header is ``| code | kind | ...``)."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| code | kind | meaning |")
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2:]:
        match = _ROW.match(line)
        if match is None:
            break
        rows[match["code"]] = (match["kind"], match["meaning"])
    return rows


def test_every_code_has_a_kind_and_a_description() -> None:
    for code in Code:
        assert isinstance(code.kind, Kind), code
        assert code.description and code.description == code.description.strip(), code
        # looked up by its value, the member itself (mypy reads Code(...) as __new__'s call)
        assert Code._value2member_map_[code.value] is code and str(code) == code.value


def test_the_values_are_the_stable_strings_clients_switch_on() -> None:
    # a sample across the kinds: renaming one breaks clients
    assert [Code.NOT_FLAIR, Code.INFLATED_TOO_LARGE, Code.SERIES_TOO_LARGE, Code.SPOOL_FULL,
            Code.TOO_MANY_OPEN_SERIES, Code.CRASHED_TWICE, Code.INPUT_LOST] == [
        "not_flair", "inflated_too_large", "series_too_large", "spool_full",
        "too_many_open_series", "crashed_twice", "input_lost"]
    assert len({code.value for code in Code}) == len(Code)


def test_the_readme_code_table_is_the_enum() -> None:
    """Every input code (skip, reject, warning) documented with its kind and description, in
    the enum's order, and no row for a code that does not exist."""
    expected = {str(code): (str(code.kind), code.description)
                for code in Code if code.kind.in_readme_table}
    table = _readme_table()
    assert list(table) == list(expected), "README code table: missing, stale or reordered codes"
    assert table == expected, "README code table: kinds or meanings differ from service.core.codes"


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_the_emitting_modules_spell_no_code_of_their_own() -> None:
    """The modules that used to hold their own code strings now use the enum's members."""
    values = {code.value for code in Code}
    offenders = {}
    for name in ("service/core/reading.py", "service/core/series.py", "service/core/volume.py",
                 "service/core/flair.py", "service/core/limits.py", "service/intake/stow.py",
                 "service/pipeline/analysis.py", "service/pipeline/runner.py",
                 "service/runtime/scheduler.py", "service/runtime/runs.py",
                 "service/runtime/orphans.py",
                 "service/api/problems.py", "service/api/deps.py", "service/api/body.py",
                 "service/api/wado.py", "service/api/dicomweb.py"):
        spelled = _string_constants(REPO / name) & values
        if spelled:
            offenders[name] = sorted(spelled)
    assert offenders == {}
