"""``cleanup``: remove the large fields of recorded runs, freeing disk (or memory).

By default the cells × genes layers of every run go and the per-gene (var) and per-cell
(obs) statistics stay, as in kompot. The run history is never edited, so
:class:`~kompot_dask.RunInfo` reports the removed fields as ``Missing``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import scipy.sparse as sp
from dask.utils import format_bytes

from .._io import commit
from .._io.lease import store_lock
from .._io.store import Store, StoreHandle
from .._report import Report, Section
from .fields import KNOWN_FIELD_TYPES
from .history import RunHistory, RunSource, history_key, read_history
from .record import encode_entry, load_removed

__all__ = ["cleanup", "CleanupSummary", "RemovedField", "SkippedField"]

logger = logging.getLogger("kompot_dask")

_KEEP_ARG = {
    "layers": "keep_layers", "obsm": "keep_layers", "varm": "keep_layers", "obsp": "keep_layers",
    "obs": "keep_obs_fields", "var": "keep_var_fields",
}


@dataclass(frozen=True)
class RemovedField:
    run_id: int
    location: str
    name: str
    type: str
    nbytes: int
    """Bytes freed: on disk for a store, in memory for an AnnData."""


@dataclass(frozen=True)
class SkippedField:
    run_id: int
    location: str
    name: str
    reason: str


@dataclass
class CleanupSummary:
    """What :func:`cleanup` removed (or, with ``dry_run=True``, would remove)."""

    target: str
    analysis_type: str
    run_ids: list[int]
    removed: list[RemovedField] = field(default_factory=list)
    skipped: list[SkippedField] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(r.nbytes for r in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "analysis_type": self.analysis_type, "run_ids": self.run_ids,
            "dry_run": self.dry_run, "bytes_freed": self.bytes_freed,
            "removed": [vars(r) for r in self.removed], "skipped": [vars(s) for s in self.skipped],
        }

    def report(self) -> Report:
        """The summary as a :class:`~kompot_dask._report.Report`."""
        removed = [f"{r.location}/{r.name} (run {r.run_id}, {format_bytes(r.nbytes)})" for r in self.removed]
        kept = [f"{s.location}/{s.name} (run {s.run_id}): {s.reason}" for s in self.skipped]
        return Report(
            f"Cleanup of {self.analysis_type.upper()} run(s) {self.run_ids} in {self.target}",
            [Section("Would remove" if self.dry_run else "Removed", removed),
             Section("Kept", kept, optional=True)],
            status=f"{'Would free' if self.dry_run else 'Freed'} {format_bytes(self.bytes_freed)}",
        )

    def __str__(self) -> str:
        return self.report().text()

    def _repr_html_(self) -> str:
        return self.report().html()


def _check_keep(name: str, value: Any, types_seen: set[str]) -> bool | frozenset[str]:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence | set | frozenset) else None
    if items is None:
        raise TypeError(f"{name}={value!r} must be True, False or a list of field types such as ['fold_change']")
    allowed = set(KNOWN_FIELD_TYPES) | types_seen
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise ValueError(f"{name}={value!r} names unknown field type(s) {unknown}; known types: {sorted(allowed)}")
    return frozenset(items)


def _resolve_run_ids(history: RunHistory, run_ids: int | Sequence[int] | None) -> list[int]:
    if run_ids is None:
        return list(range(len(history)))
    ids = [run_ids] if isinstance(run_ids, int | np.integer) else list(run_ids)
    return sorted({history.resolve(r) for r in ids})


def _plan(history: RunHistory, run_ids: list[int], keep: dict[str, bool | frozenset[str]],
          ) -> tuple[list[tuple[int, str, str, str]], list[SkippedField]]:
    """(run, location, name, type) of fields to remove, and those kept for another run."""
    todo: dict[tuple[str, str], tuple[int, str, str, str]] = {}
    skipped: list[SkippedField] = []
    for rid in run_ids:
        for name, spec in history.run_fields(rid).items():
            loc, ftype = spec.location, spec.type
            if loc not in _KEEP_ARG:
                skipped.append(SkippedField(rid, loc, name, f"location {loc!r} is not handled by cleanup"))
                continue
            rule = keep[_KEEP_ARG[loc]]
            if rule is True or (isinstance(rule, frozenset) and ftype in rule):
                continue
            if name not in history.present(loc) or (loc, name) in todo:
                continue
            writer = history.last_writer(loc, name)
            if writer is not None and writer != rid:
                if writer in run_ids:
                    continue  # removed on behalf of that run
                reason = f"last written by run {writer}, not run {rid}; clean up run {writer} to remove it"
                skipped.append(SkippedField(rid, loc, name, reason))
                logger.info("Keeping %s/%s: %s", loc, name, reason)
                continue
            todo[(loc, name)] = (rid, loc, name, ftype)
    return list(todo.values()), skipped


def _anndata_nbytes(adata: Any, loc: str, name: str) -> int:
    if loc in ("obs", "var"):
        return int(getattr(adata, loc)[name].memory_usage(index=False, deep=True))
    value = getattr(adata, loc)[name]
    if sp.issparse(value):
        return int(value.data.nbytes + value.indices.nbytes + value.indptr.nbytes)
    nbytes = getattr(value, "nbytes", None)
    if nbytes is None and hasattr(value, "memory_usage"):  # a DataFrame in obsm/varm
        nbytes = value.memory_usage(deep=True).sum()
    return int(nbytes or 0)


def _remove_from_anndata(adata: Any, fields: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    sizes = {(loc, name): _anndata_nbytes(adata, loc, name) for loc, name in fields}
    for loc in ("obs", "var"):
        names = [n for l_, n in fields if l_ == loc]
        if names:
            getattr(adata, loc).drop(columns=names, inplace=True)
    for loc, name in fields:
        if loc not in ("obs", "var"):
            del getattr(adata, loc)[name]
    return sizes


def cleanup(
    data: Any,
    run_ids: int | Sequence[int] | None = None,
    analysis_type: str = "de",
    *,
    keep_layers: bool | Sequence[str] = False,
    keep_obs_fields: bool | Sequence[str] = True,
    keep_var_fields: bool | Sequence[str] = True,
    dry_run: bool = False,
    staged: bool = False,
) -> CleanupSummary:
    """Remove the fields that runs created, freeing disk in a zarr store (or memory).

    A field is removed only on behalf of the run that wrote it last: a field that a later
    run (outside ``run_ids``) has overwritten belongs to that run and is kept, with a log
    line saying so. The run history is left intact.

    Parameters
    ----------
    data
        A zarr store path, a :class:`~kompot_dask.store.Store`, or an in-memory AnnData
        (fields are deleted from it in place).
    run_ids
        Run id or ids to clean (negative ids count back from the latest); ``None`` cleans
        every run.
    analysis_type
        ``"de"``.
    keep_layers
        ``False`` removes the runs' layers (imputed expression, fold changes; also any
        obsm/varm/obsp matrices); ``True`` keeps them; a list of field types keeps those
        types only, e.g. ``["fold_change"]``.
    keep_obs_fields
        Same, for obs columns (the per-cell posterior std). Kept by default.
    keep_var_fields
        Same, for var columns (Mahalanobis, mean log fold change, local FDR, is_de).
        Kept by default.
    dry_run
        Only report what would be removed.
    staged
        Also remove the work that interrupted runs kept for a resume (the store's hidden
        staging directory). With ``run_ids=None`` only that is removed and the runs' fields
        stay.

    Returns
    -------
    :class:`CleanupSummary` (``removed``, ``skipped``, ``bytes_freed``).

    Raises
    ------
    StoreLockedError
        When another kompot_dask process (a running ``de`` or another cleanup) holds the
        store's lease.

    Notes
    -----
    On a store, removal holds the store's lease and keeps the store readable by anndata at
    every step (see :meth:`kompot_dask.store.StoreHandle.remove_fields`); the metadata is
    reconsolidated at the end.
    """
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run={dry_run!r} must be True or False")
    if not isinstance(staged, bool):
        raise TypeError(f"staged={staged!r} must be True or False")
    source = data if isinstance(data, RunSource) else RunSource(data)
    if staged and source.is_store and not dry_run:
        with store_lock(source.path, "kompot_dask.cleanup"):
            freed = commit.sweep(source.path)
        logger.info("Removed %s of staged work kept by interrupted runs in %s", format_bytes(freed), source.path)
        if run_ids is None:
            summary = CleanupSummary(str(source.path), analysis_type, [])
            summary.removed.append(RemovedField(-1, commit.KOMPOT_DIR, "staging", "staging", freed))
            return summary
    elif staged and source.is_store:
        if run_ids is None:
            summary = CleanupSummary(str(source.path), analysis_type, [], dry_run=True)
            summary.removed.append(RemovedField(-1, commit.KOMPOT_DIR, "staging", "staging",
                                               commit.staged_bytes(source.path)))
            return summary
    if not source.is_store or dry_run:
        return _cleanup(source, data, run_ids, analysis_type, keep_layers, keep_obs_fields, keep_var_fields, dry_run)
    with store_lock(source.path, "kompot_dask.cleanup"):
        # read the history only now: a run that committed just before the lease is seen
        fresh = RunSource(StoreHandle(source.path))
        summary = _cleanup(fresh, data, run_ids, analysis_type, keep_layers, keep_obs_fields, keep_var_fields, dry_run)
    if isinstance(data, Store):
        data._reopen()
    return summary


def _noting_removal(source: RunSource, key: str, todo: list[tuple[int, str, str, str]]) -> dict[str, Any]:
    """The history entry with the removed fields noted, so that RunInfo reports them as
    removed (not lost) and ``verify`` does not count them as damage."""
    entry = source.uns_entry(key)
    removed = load_removed(entry)
    stamp = datetime.now().isoformat(timespec="seconds")
    for rid, loc, name, _ in todo:
        removed.setdefault(loc, {})[name] = {"run_id": rid, "timestamp": stamp}
    return encode_entry({**entry, "removed_fields": removed})


def _cleanup(source: RunSource, data: Any, run_ids: Any, analysis_type: str, keep_layers: Any,
             keep_obs_fields: Any, keep_var_fields: Any, dry_run: bool) -> CleanupSummary:
    history = read_history(source, analysis_type)
    key = history_key(analysis_type)
    ids = _resolve_run_ids(history, run_ids)
    if not ids:
        history.resolve(0)  # raises: no runs recorded
    types_seen = {spec.type for rid in ids for spec in history.run_fields(rid).values()}
    keep = {
        "keep_layers": _check_keep("keep_layers", keep_layers, types_seen),
        "keep_obs_fields": _check_keep("keep_obs_fields", keep_obs_fields, types_seen),
        "keep_var_fields": _check_keep("keep_var_fields", keep_var_fields, types_seen),
    }
    target = source.path if source.is_store else "the AnnData"
    todo, skipped = _plan(history, ids, keep)
    summary = CleanupSummary(str(target), analysis_type, ids, skipped=skipped, dry_run=dry_run)
    where = "on disk" if source.is_store else "of memory"
    if not todo:
        logger.info("Cleanup of %s run(s) %s: nothing to remove in %s", history.label, ids, target)
        return summary
    fields = [(loc, name) for _, loc, name, _ in todo]
    if dry_run:
        sizes = {(loc, name): (source.handle.element_nbytes(loc, name) if source.is_store
                               else _anndata_nbytes(source.adata, loc, name)) for loc, name in fields}
    elif source.is_store:
        sizes = source.handle.remove_fields(fields, {key: _noting_removal(source, key, todo)})
    else:
        sizes = _remove_from_anndata(source.adata, fields)
        source.adata.uns[key] = _noting_removal(source, key, todo)
    verb = "Would remove" if dry_run else "Removed"
    for rid, loc, name, ftype in todo:
        nbytes = sizes.get((loc, name), 0)
        summary.removed.append(RemovedField(rid, loc, name, ftype, nbytes))
        logger.info("%s %s/%s of run %d (%s)", verb, loc, name, rid, format_bytes(nbytes))
    logger.info(
        "Cleanup of %s run(s) %s %s %s %s in %s: %d field(s)%s", history.label, ids,
        "would free" if dry_run else "freed", format_bytes(summary.bytes_freed), where, target,
        len(summary.removed), f", {len(skipped)} kept for later runs" if skipped else "",
    )
    return summary
