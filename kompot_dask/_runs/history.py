"""Reading the run history back, from a zarr store or an in-memory AnnData.

Readers (``RunInfo``, ``cleanup``, plots, the CLI, ``verify``) go through
:func:`read_history` and :func:`get_run_fields`; they never parse ``uns`` themselves. The
entries are :class:`~kompot_dask._runs.record.RunRecord` objects; the field names and locations
come from the field registry (:mod:`kompot_dask._runs.fields`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._io.source import open_data
from .._io.store import StoreHandle
from .record import (
    HISTORY_KEY,
    RecordedField,
    RunRecord,
    decoded,
    load_field_tracking,
    load_history,
    load_removed,
)

logger = logging.getLogger("kompot_dask")


# ---- reading the history back --------------------------------------------------------

ANALYSIS_TYPES = {"de": HISTORY_KEY}
"""Analysis type → ``uns`` key of its run history."""

_ANALYSIS_LABELS = {"de": "DE"}

FIELD_LOCATIONS_ALL = ("var", "obs", "layers", "obsm", "varm", "obsp")


class RunNotFoundError(IndexError):
    """A run id that the history does not hold (or a history that holds no run)."""


def history_key(analysis_type: str) -> str:
    """``uns`` key of the run history of ``analysis_type``."""
    try:
        return ANALYSIS_TYPES[analysis_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"analysis_type={analysis_type!r} is not known; kompot_dask records these analysis "
            f"types: {sorted(ANALYSIS_TYPES)}. Pass analysis_type='de'."
        ) from None


class RunSource:
    """Where run records and fields live: a zarr AnnData store or an in-memory AnnData.

    Parameters
    ----------
    data
        A store path (or ``file://`` URL), a :class:`kompot_dask.store.StoreHandle` /
        :class:`~kompot_dask.store.Store`, or an ``anndata.AnnData``.
    """

    def __init__(self, data: Any):
        opened = open_data(data, StoreHandle)
        self.handle: StoreHandle | None = opened if isinstance(opened, StoreHandle) else None
        self.adata: Any = None if self.handle is not None else opened

    @property
    def is_store(self) -> bool:
        return self.handle is not None

    @property
    def path(self) -> str | None:
        return self.handle.path if self.handle is not None else None

    @property
    def label(self) -> str:
        """How messages name this source."""
        return f"the store {self.handle.path}" if self.handle is not None else "the AnnData"

    def uns_entry(self, key: str) -> dict[str, Any]:
        """``uns[key]`` as a dict with JSON strings decoded ({} when absent)."""
        if self.handle is not None:
            return self.handle.read_uns_json(key)
        entry = decoded(self.adata.uns.get(key, {}))
        if not isinstance(entry, dict):
            return {}
        return {k: decoded(v) for k, v in entry.items()}

    def uns_item(self, key: str, item: str) -> Any:
        """``uns[key][item]`` undecoded (arrays stay arrays), or ``None``."""
        if self.handle is not None:
            return self.handle.read_uns_item(key, item)
        entry = self.adata.uns.get(key)
        return entry.get(item) if isinstance(entry, dict) else None

    def field_names(self, location: str) -> set[str]:
        """Names currently held at ``location`` (obs/var columns, layers/obsm/varm/obsp keys)."""
        if self.handle is not None:
            return set(self.handle.field_names(location))
        if location not in FIELD_LOCATIONS_ALL:
            raise ValueError(f"location={location!r} is not one of {list(FIELD_LOCATIONS_ALL)}")
        container = getattr(self.adata, location)
        return {str(k) for k in (container.columns if location in ("obs", "var") else container.keys())}


@dataclass(frozen=True)
class FieldStatus:
    """One field of a run and what became of it."""

    name: str
    location: str
    type: str
    description: str
    status: str
    """``"Present"``, ``"Overwritten by Run k"``, ``"Removed by cleanup"`` or ``"Missing"``."""
    last_writer: int | None
    """Id of the run that last wrote the field (``None`` when untracked)."""
    present: bool


@dataclass
class RunHistory:
    """The run records of one analysis type, with the field tracking (which run last
    wrote each field) and the source they were read from."""

    analysis_type: str
    runs: list[RunRecord]
    tracking: dict[str, dict[str, int]]
    source: RunSource
    removed: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """location → field → {run_id, timestamp} of fields that cleanup removed."""
    _present: dict[str, set[str]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return _ANALYSIS_LABELS.get(self.analysis_type, self.analysis_type.upper())

    def __len__(self) -> int:
        return len(self.runs)

    def resolve(self, run_id: int) -> int:
        """The non-negative id of ``run_id`` (``-1`` is the latest run)."""
        if isinstance(run_id, bool) or not isinstance(run_id, int | np.integer):
            raise TypeError(f"run_id={run_id!r} must be an integer (0 for the first run, -1 for the latest)")
        n = len(self.runs)
        if n == 0:
            raise RunNotFoundError(
                f"no {self.label} runs are recorded in {self.source.label} "
                f"(uns[{history_key(self.analysis_type)!r}] has no run history); run kompot_dask.de first."
            )
        rid = int(run_id)
        if not -n <= rid < n:
            raise RunNotFoundError(
                f"run_id={rid} is out of range: {self.source.label} holds {n} {self.label} run(s), "
                f"so valid run ids are 0..{n - 1} (or -{n}..-1 counting back from the latest)."
            )
        return rid % n

    def record(self, run_id: int) -> RunRecord:
        """The record of ``run_id`` (negative ids count back from the latest)."""
        return self.runs[self.resolve(run_id)]

    def present(self, location: str) -> set[str]:
        """Field names at ``location`` now (read once per history object)."""
        if location not in self._present:
            self._present[location] = self.source.field_names(location)
        return self._present[location]

    def run_fields(self, run_id: int) -> dict[str, RecordedField]:
        """Field name → :class:`RecordedField` of the fields the run wrote."""
        return self.record(run_id).fields()

    def last_writer(self, location: str, name: str) -> int | None:
        """Id of the run that last wrote ``location/name``.

        The field tracking answers; for an untracked field, the latest run whose record
        lists it.
        """
        tracked = self.tracking.get(location, {}).get(name)
        if tracked is not None:
            return int(tracked)
        for rid in range(len(self.runs) - 1, -1, -1):
            spec = self.run_fields(rid).get(name)
            if spec is not None and spec.location == location:
                return rid
        return None

    def field_status(self, run_id: int) -> list[FieldStatus]:
        """Status of every field of the run, sorted by location then name."""
        rid = self.resolve(run_id)
        out = []
        for name, spec in self.run_fields(rid).items():
            loc = spec.location
            present = loc in FIELD_LOCATIONS_ALL and name in self.present(loc)
            writer = self.last_writer(loc, name)
            if not present:
                status = "Removed by cleanup" if name in self.removed.get(loc, {}) else "Missing"
            elif writer is not None and writer != rid:
                status = f"Overwritten by Run {writer}"
            else:
                status = "Present"
            out.append(FieldStatus(name, loc, spec.type, spec.description, status, writer, present))
        order = {loc: i for i, loc in enumerate(("layers", "obs", "var", "obsm", "varm", "obsp"))}
        return sorted(out, key=lambda f: (order.get(f.location, 99), f.name))


def read_history(data: Any, analysis_type: str = "de") -> RunHistory:
    """The run history of ``analysis_type`` in ``data`` (store path, Store or AnnData)."""
    key = history_key(analysis_type)
    source = data if isinstance(data, RunSource) else RunSource(data)
    entry = source.uns_entry(key)
    records = [RunRecord.from_dict(r if isinstance(r, dict) else {}) for r in load_history(entry)]
    return RunHistory(analysis_type, records, load_field_tracking(entry), source, load_removed(entry))


@dataclass(frozen=True)
class RunFields:
    """The field names of one run, by role, for readers such as plots.

    Roles are those of the field registry (:mod:`kompot_dask._runs.fields`):
    ``mahalanobis``, ``mean_lfc``, ``local_fdr``, ``is_de``, ``std1``, ``std2``,
    ``imputed1``, ``imputed2``, ``fold_change`` (only those the run wrote).
    """

    run_id: int
    analysis_type: str
    names: dict[str, str]
    locations: dict[str, str]
    record: RunRecord
    writers: dict[str, int | None] = field(default_factory=dict)
    """Role → the run whose values its field holds now (a later run that overwrote it;
    ``None``: no run is recorded as writing it), for the roles that were asked for."""

    def __getitem__(self, role: str) -> str:
        try:
            return self.names[role]
        except KeyError:
            raise KeyError(
                f"run {self.run_id} wrote no {role!r} field; its fields are {sorted(self.names)}"
            ) from None

    def get(self, role: str, default: str | None = None) -> str | None:
        return self.names.get(role, default)

    @property
    def params(self) -> dict[str, Any]:
        return self.record.params

    @property
    def condition1(self) -> Any:
        return self.record.condition1

    @property
    def condition2(self) -> Any:
        return self.record.condition2

    @property
    def groupby(self) -> str | None:
        return self.record.groupby

    @property
    def layer(self) -> str | None:
        return self.record.layer

    @property
    def obsm_key(self) -> str | None:
        return self.record.obsm_key


def _check_role(history: RunHistory, rid: int, role: str, name: str, loc: str) -> None:
    """Warn when the field of ``role`` is gone or now holds a later run's values."""
    writer = history.last_writer(loc, name)
    if loc in FIELD_LOCATIONS_ALL and name not in history.present(loc):
        logger.warning(
            "Field %r (%s) of run %d is no longer in %s (removed by cleanup?); "
            "re-run kompot_dask.de to recreate it.", name, loc, rid, history.source.label,
        )
    elif writer is not None and writer != rid:
        logger.warning(
            "Field %r (%s) was last written by run %d, but run %d was asked for: it now holds "
            "run %d's values, not run %d's.", name, loc, writer, rid, writer, rid,
        )
    else:
        logger.debug("Found %s_key=%r from run info", role, name)


def get_run_fields(
    data: Any, run_id: int = -1, analysis_type: str = "de", *, roles: Sequence[str] | None = None
) -> RunFields:
    """Field names of a run, found through the run history.

    Parameters
    ----------
    data
        Store path, :class:`~kompot_dask.store.Store` or in-memory AnnData.
    run_id
        Run to read; negative ids count back from the latest (``-1``).
    analysis_type
        ``"de"``.
    roles
        The fields the caller will use (e.g. ``("mean_lfc", "mahalanobis")``); each is
        checked, with a warning when a later run overwrote it or it is no longer there.
        ``None`` checks every field of the run.

    Returns
    -------
    :class:`RunFields`; ``fields["mahalanobis"]`` is the var column name.
    """
    history = read_history(data, analysis_type)
    rid = history.resolve(run_id)
    record = history.runs[rid]
    logger.info("Found %s run info for run_id=%s", history.label, run_id)
    names, locations = record.role_names(), record.role_locations()
    wanted = list(names) if roles is None else list(roles)
    unknown = [r for r in wanted if r not in names]
    if unknown:
        why = (" (it ran with OutputSettings(compute_mahalanobis=False): no distance, no FDR)"
               if {"mahalanobis", "local_fdr", "is_de"} & set(unknown) and "mahalanobis" not in names else "")
        raise KeyError(f"run {rid} wrote no field for role(s) {unknown}; its roles are {sorted(names)}{why}")
    for role in wanted:
        _check_role(history, rid, role, names[role], locations[role])
    writers = {role: history.last_writer(locations[role], names[role]) for role in wanted}
    return RunFields(rid, analysis_type, names, locations, record, writers)
