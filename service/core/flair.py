"""Is this series a T2-FLAIR? Rules are data: a JSON file, the default one shipped in the package
(``service/rules/flair.json``), another one chosen by configuration (``FLAIRCAD_FLAIR_RULES``).

A rules file (version 1)::

    {"version": 1, "description": "...",
     "rules": [{"name": "flair_by_name", "description": "...", "when": CONDITION}, ...]}

A series is FLAIR when any rule's condition holds; the first rule that holds is reported
(``flair_rule``). A CONDITION is one of::

    {"all": [CONDITION, ...]}                       AND
    {"any": [CONDITION, ...]}                       OR
    {"not": CONDITION}
    {"attribute": NAME, "regex": "PATTERN"}         re.search, case-insensitive
    {"attribute": NAME, "equals": VALUE}            strings compared case-insensitively
    {"attribute": NAME, "contains": VALUE}          one of a multi-valued attribute's values
                                                    equals VALUE (a string: substring)
    {"attribute": NAME, "range": [MIN, MAX]}        numeric, inclusive; null = unbounded
    {"attribute": NAME, "present": true|false}

A leaf on an attribute the series does not have is false (``present: false`` aside); a
multi-valued attribute matches a leaf when any of its values does. NAMEs are DICOM keywords, read
by :func:`selection_attributes` from classic headers or, for enhanced multi-frame images, from
their functional groups (``SequenceName`` ← PulseSequenceName, ``InversionTime`` ←
InversionTimes, ``EchoTime`` ← EffectiveEchoTime, ``ScanningSequence`` gains ``IR`` when
InversionRecovery is YES).

Refusing non-FLAIR input is the API's job (HTTP 422, code ``not_flair``); ``flaircad inspect``
only reports ``is_flair``. For research on other contrasts the override
``FLAIRCAD_ACCEPT_NON_FLAIR=1`` lets such series through (see :func:`flair_rejection`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from service.core.codes import Code
from service.core.series import Rejection, functional_group

DEFAULT_RULES_PATH = Path(__file__).resolve().parent / "rules" / "flair.json"
_LEAF_OPERATORS = ("regex", "equals", "contains", "range", "present")


@dataclass(frozen=True)
class FlairMatch:
    is_flair: bool
    rule: str | None  # the first rule that matched


class RulesError(ValueError):
    """A rules file that does not follow the schema above."""


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Condition:
    """A compiled CONDITION; ``where`` names its place in the file for error messages."""

    def __init__(self, spec: Any, where: str) -> None:
        if not isinstance(spec, Mapping):
            raise RulesError(f"{where}: a condition must be an object, got {spec!r}")
        self.kind: str
        self.children: list[Condition] = []
        if "all" in spec or "any" in spec:
            self.kind = "all" if "all" in spec else "any"
            items = spec[self.kind]
            if not isinstance(items, list) or not items:
                raise RulesError(f"{where}.{self.kind}: needs a non-empty list")
            self.children = [Condition(c, f"{where}.{self.kind}[{i}]") for i, c in
                             enumerate(items)]
            return
        if "not" in spec:
            self.kind = "not"
            self.children = [Condition(spec["not"], f"{where}.not")]
            return
        attribute = spec.get("attribute")
        operators = [op for op in _LEAF_OPERATORS if op in spec]
        if not isinstance(attribute, str) or len(operators) != 1:
            raise RulesError(
                f"{where}: a leaf needs 'attribute' and exactly one of {_LEAF_OPERATORS}, "
                f"got {sorted(spec)}"
            )
        self.kind, self.attribute, self.operand = operators[0], attribute, spec[operators[0]]
        if self.kind == "regex":
            try:
                self.pattern = re.compile(str(self.operand), re.IGNORECASE)
            except re.error as error:
                raise RulesError(f"{where}: bad regex {self.operand!r}: {error}") from error
        if self.kind == "range":
            bounds = self.operand
            if not (isinstance(bounds, list) and len(bounds) == 2
                    and all(b is None or isinstance(b, int | float) for b in bounds)):
                raise RulesError(f"{where}: range must be [min, max] (numbers or null)")

    def __call__(self, attributes: Mapping[str, Any]) -> bool:
        if self.kind == "all":
            return all(child(attributes) for child in self.children)
        if self.kind == "any":
            return any(child(attributes) for child in self.children)
        if self.kind == "not":
            return not self.children[0](attributes)
        values = _as_list(attributes.get(self.attribute))
        if self.kind == "present":
            return bool(values) == bool(self.operand)
        if self.kind == "regex":
            return any(self.pattern.search(str(v)) for v in values)
        if self.kind == "equals":
            return any(_equal(v, self.operand) for v in values)
        if self.kind == "contains":
            raw = attributes.get(self.attribute)
            if isinstance(raw, str):
                return str(self.operand).upper() in raw.upper()
            return any(_equal(v, self.operand) for v in values)
        low, high = self.operand
        numbers = [n for n in (_number(v) for v in values) if n is not None]
        return any((low is None or n >= low) and (high is None or n <= high) for n in numbers)


def _equal(value: Any, operand: Any) -> bool:
    if isinstance(operand, str):
        return str(value).strip().upper() == operand.strip().upper()
    number = _number(value)
    return number is not None and number == operand


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    when: Condition


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str
    description: str = ""

    def evaluate(self, attributes: Mapping[str, Any]) -> FlairMatch:
        for rule in self.rules:
            if rule.when(attributes):
                return FlairMatch(True, rule.name)
        return FlairMatch(False, None)


def parse_rules(raw: Any, source: str = "<rules>") -> RuleSet:
    if not isinstance(raw, Mapping) or raw.get("version") != 1:
        raise RulesError(f"{source}: expected an object with \"version\": 1")
    rules = raw.get("rules")
    if not isinstance(rules, list) or not rules:
        raise RulesError(f"{source}: \"rules\" must be a non-empty list")
    compiled = []
    for i, rule in enumerate(rules):
        where = f"{source}: rules[{i}]"
        if not isinstance(rule, Mapping) or not isinstance(rule.get("name"), str):
            raise RulesError(f"{where}: each rule needs a \"name\"")
        if "when" not in rule:
            raise RulesError(f"{where} ({rule['name']}): missing \"when\"")
        compiled.append(Rule(rule["name"], str(rule.get("description", "")),
                             Condition(rule["when"], f"{where}.when")))
    return RuleSet(tuple(compiled), source, str(raw.get("description", "")))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> RuleSet:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RulesError(f"{path}: not valid JSON: {error}") from error
    return parse_rules(raw, path)


def load_rules(path: Path | str | None = None) -> RuleSet:
    """The rules at ``path``, or the packaged default; cached until the file changes."""
    resolved = Path(path) if path is not None else DEFAULT_RULES_PATH
    return _load_cached(str(resolved), resolved.stat().st_mtime_ns)


def selection_attributes(ds: Dataset) -> dict[str, Any]:
    """The header values rules look at, from classic or enhanced (multi-frame) MR headers."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return None if value in (None, "") else str(value).strip()

    def values(value: Any) -> list[str]:
        return [str(v).strip() for v in _as_list(value) if str(v).strip()]

    attributes: dict[str, Any] = {
        "Modality": text("Modality"),
        "SeriesDescription": text("SeriesDescription"),
        "ProtocolName": text("ProtocolName"),
        "SequenceName": text("SequenceName") or text("PulseSequenceName"),
        "Manufacturer": text("Manufacturer"),
        "MRAcquisitionType": text("MRAcquisitionType"),
        "ImageType": values(ds.get("ImageType")),
        "ScanningSequence": values(ds.get("ScanningSequence")),
        "SequenceVariant": values(ds.get("SequenceVariant")),
        "ScanOptions": values(ds.get("ScanOptions")),
        "InversionTime": _number(ds.get("InversionTime")),
        "EchoTime": _number(ds.get("EchoTime")),
        "RepetitionTime": _number(ds.get("RepetitionTime")),
        "MagneticFieldStrength": _number(ds.get("MagneticFieldStrength")),
    }
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        modifier = functional_group(ds, 0, "MRModifierSequence")
        if modifier is not None:
            if str(modifier.get("InversionRecovery", "")).upper() == "YES":
                attributes["ScanningSequence"] = [*attributes["ScanningSequence"], "IR"]
            times = _as_list(modifier.get("InversionTimes"))
            if attributes["InversionTime"] is None and times:
                attributes["InversionTime"] = _number(times[0])
        echo = functional_group(ds, 0, "MREchoSequence")
        if attributes["EchoTime"] is None and echo is not None:
            attributes["EchoTime"] = _number(echo.get("EffectiveEchoTime"))
        timing = functional_group(ds, 0, "MRTimingAndRelatedParametersSequence")
        if attributes["RepetitionTime"] is None and timing is not None:
            attributes["RepetitionTime"] = _number(timing.get("RepetitionTime"))
    return {k: v for k, v in attributes.items() if v not in (None, [])}


def is_flair(attributes: Mapping[str, Any], rules: RuleSet | None = None) -> FlairMatch:
    return (rules or load_rules()).evaluate(attributes)


def flair_rejection(match: FlairMatch, accept_non_flair: bool = False) -> Rejection | None:
    """The API's decision: None to go on, else a ``not_flair`` rejection (HTTP 422).
    ``accept_non_flair`` is the research override (``FLAIRCAD_ACCEPT_NON_FLAIR``)."""
    if match.is_flair or accept_non_flair:
        return None
    return Rejection(
        str(Code.NOT_FLAIR),
        "no FLAIR selection rule matched this series (SeriesDescription/ProtocolName/"
        "SequenceName, inversion time); set FLAIRCAD_ACCEPT_NON_FLAIR=1 to run it anyway "
        "(research use)",
    )
