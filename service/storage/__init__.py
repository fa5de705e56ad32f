"""Everything persistent, behind a small interface; no other layer writes SQL or knows a path
inside the spool.

* :mod:`~service.storage.sqlite` — the one SQLite setup: file name, pragmas, schema, migrations;
* :mod:`~service.storage.store` — analyses (:class:`AnalysisRepository`);
* :mod:`~service.storage.deliveries` — result deliveries (:class:`DeliveryRepository`);
* :mod:`~service.storage.spool` — received instances, uploads, request bodies, leases;
* :mod:`~service.storage.results` — the result-folder layout (:class:`ResultStore`), and how
  an analysis' outputs are written;
* :mod:`~service.storage.retention` — deleting what has expired (the sweep is the runtime's).

The protocols below are the seam: today SQLite plus the local file system implement them
(:class:`~service.storage.store.AnalysisStore`, :class:`~service.storage.deliveries.
DeliveryStore`, :class:`~service.storage.spool.Spool`); a second backend implements the same.
This package imports nothing of ours but :mod:`service.core`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.core.destinations import Destination
from service.storage.deliveries import Delivery, DeliveryState, DeliveryStore
from service.storage.results import AnalysisOutputs, ResultFolder, write_outputs
from service.storage.spool import Spool
from service.storage.sqlite import DATABASE, database_path
from service.storage.store import AnalysisStore, Record, Status

__all__ = ["DATABASE", "AnalysisOutputs", "AnalysisRepository", "AnalysisStore", "Delivery",
           "DeliveryRepository", "DeliveryState", "DeliveryStore", "Record", "ResultFolder",
           "ResultStore", "Spool", "Status", "database_path", "write_outputs"]


class AnalysisRepository(Protocol):
    """Analyses: one record each, shared by every process of one spool."""

    def create(self, source: str, study_instance_uid: str | None = None,
               series_instance_uid: str | None = None, fingerprint: str | None = None,
               owner: str | None = None) -> Record: ...

    def claim_series(self, study_instance_uid: str, series_instance_uid: str,
                     fingerprint: str, owner: str) -> Record | None: ...

    def claim_upload(self, fingerprint: str, owner: str) -> tuple[Record, bool]: ...

    def take_over(self, analysis_id: str, previous_owner: str | None, owner: str) -> bool: ...

    def start(self, analysis_id: str) -> int: ...

    def update(self, analysis_id: str, status: Status, *,
               result: dict[str, Any] | None = None, problem: dict[str, Any] | None = None,
               study_instance_uid: str | None = None,
               series_instance_uid: str | None = None) -> None: ...

    def get(self, analysis_id: str) -> Record | None: ...

    def by_study(self, study_instance_uid: str) -> list[Record]: ...

    def recent(self, limit: int = 100) -> list[Record]: ...

    def find_series(self, series_instance_uid: str, fingerprint: str) -> Record | None: ...

    def unfinished(self) -> list[Record]: ...

    # retention
    def expired(self, before: float, limit: int = 500) -> list[Record]: ...

    def series_in_use(self, series_instance_uid: str, before: float,
                      other_than: str) -> bool: ...

    def delete(self, analysis_id: str) -> None: ...

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


class DeliveryRepository(Protocol):
    """Result deliveries: one row per analysis and destination."""

    def plan(self, analysis_id: str, destinations: Iterable[Destination],
             now: float | None = None) -> int: ...

    def plan_missing(self, destinations: Iterable[Destination],
                     now: float | None = None) -> int: ...

    def claim_due(self, names: Iterable[str], owner: str, now: float | None = None,
                  limit: int = 8) -> list[Delivery]: ...

    def record(self, analysis_id: str, destination: str, state: DeliveryState, *,
               attempts: int, next_attempt: float | None = None, error: str | None = None,
               instances: int | None = None) -> None: ...

    def release(self, owner_alive: Callable[[str | None], bool]) -> int: ...

    def next_due(self, names: Iterable[str]) -> float | None: ...

    def of_analysis(self, analysis_id: str) -> list[Delivery]: ...

    def counts(self) -> dict[tuple[str, str], int]: ...

    def close(self) -> None: ...


class ResultStore(Protocol):
    """Published results by analysis id, written through a staging folder."""

    def result(self, analysis_id: str) -> ResultFolder: ...

    def staging_folder(self, analysis_id: str) -> Path: ...

    def publish_result(self, staging: Path, analysis_id: str) -> Path: ...

    def remove_result(self, analysis_id: str) -> None: ...


if TYPE_CHECKING:  # mypy checks here that the one implementation implements the interface
    def _implements(analyses: AnalysisStore, deliveries: DeliveryStore, spool: Spool
                    ) -> tuple[AnalysisRepository, DeliveryRepository, ResultStore]:
        return analyses, deliveries, spool
