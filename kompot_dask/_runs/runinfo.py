"""``RunInfo``: one recorded run, for reading in a terminal or a notebook, comparing with
another run, and re-running with the same (or edited) settings.

Everything comes from the run history in ``uns`` (see :mod:`kompot_dask._runs.history`); the
store or AnnData is read for which fields are still there, never for results.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._report import Report, Reportable, Section, format_cell
from .._settings import (
    ComputeSettings,
    FDRSettings,
    FilterSettings,
    GPSettings,
    OutputSettings,
    SettingsError,
    StorageSettings,
    _is_default,
)
from .history import FieldStatus, RunHistory, RunSource, read_history
from .record import RunRecord

__all__ = ["RunInfo", "RunComparison", "FieldDifference"]

logger = logging.getLogger("kompot_dask")

SETTINGS_CLASSES: dict[str, type] = {
    "gp": GPSettings,
    "fdr": FDRSettings,
    "filter": FilterSettings,
    "storage": StorageSettings,
    "output": OutputSettings,
    "compute": ComputeSettings,
}
"""``params`` section → Settings class that :func:`kompot_dask.de` takes for it."""

CALL_ARGUMENTS = ("groupby", "condition1", "condition2", "layer", "obsm_key", "genes", "sample_col")
"""Top-level arguments of :func:`kompot_dask.de` recorded in ``params``."""

KEY_PARAMETERS = ("groupby", "condition1", "condition2", "obsm_key", "layer", "genes", "storage.result_key")
"""Parameters that change what is compared (listed first by :meth:`RunInfo.compare_with`)."""

_ABSENT = "<absent>"


# ---- formatting ----------------------------------------------------------------------


def _flatten(params: dict[str, Any]) -> dict[str, Any]:
    """``{"gp": {"sigma": 1.0}}`` → ``{"gp.sigma": 1.0}``; top-level values stay as they are."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _conditions(record: RunRecord) -> str:
    return f"{record.condition1} to {record.condition2}"


# ---- settings from a run record ------------------------------------------------------


def _rebuild_settings(history: RunHistory, run_id: int) -> dict[str, Any]:
    """The Settings objects of a run, from its JSON ``params``.

    Fields this version does not know are ignored with a warning; fields the record lacks
    take their defaults. ``gp.landmarks`` and ``filter.cell_filter`` arrays are not in the
    record: landmarks are loaded from ``uns[result_key]["landmarks"]`` when this run stored
    them and no later run replaced them, and a boolean-array cell filter cannot be restored.
    """
    record = history.runs[run_id]
    out: dict[str, Any] = {}
    for section, cls in SETTINGS_CLASSES.items():
        recorded = record.params.get(section)
        if not isinstance(recorded, dict):
            logger.info("Run %d recorded no %s settings; using %s() defaults", run_id, section, cls.__name__)
            recorded = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in recorded if k not in known)
        if unknown:
            logger.warning(
                "Run %d recorded %s, which this kompot_dask version's %s does not have; ignored.",
                run_id, ", ".join(f"{section}.{k}={recorded[k]!r}" for k in unknown), cls.__name__,
            )
        kwargs = {k: v for k, v in recorded.items() if k in known}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for k in sorted(set(kwargs) & set(getattr(cls, "_REFUSED", {}))):
            if not _is_default(kwargs[k], defaults[k]):
                logger.warning("Run %d recorded %s.%s=%r, which kompot_dask does not support; using the default.",
                               run_id, section, k, kwargs.pop(k))
        if section == "gp":
            kwargs["landmarks"] = _recorded_landmarks(history, run_id, kwargs.get("landmarks"))
            if "neighbors" not in recorded:
                # recorded before the fast path existed (or by kompot): it searched with
                # pynndescent and clustered every cell
                kwargs.update(neighbors="pynndescent", neighbor_sample=None, landmark_sample=None)
            if kwargs.get("random_state", 0) is None and record.model.landmark_source == "kmeans":
                logger.warning(
                    "Run %d placed its landmarks by k-means with GPSettings.random_state=None, so a "
                    "re-run places them differently; set gp.random_state to make runs repeatable.", run_id,
                )
        if section == "fdr" and isinstance(kwargs.get("null_mahalanobis"), int | float):
            logger.warning(
                "Run %d tested against %d null distances given in FDRSettings.null_mahalanobis, which the run "
                "record does not hold; call_args() leaves them out (the null genes alone). Pass the same "
                "distances as kwargs['fdr'].null_mahalanobis to reproduce the run.", run_id,
                int(kwargs["null_mahalanobis"]),
            )
            kwargs["null_mahalanobis"], kwargs["combine_with_internal"] = None, False
        if section == "fdr" and kwargs.get("null_expression") is not None:
            logger.warning(
                "Run %d also fitted null expression given in FDRSettings.null_expression (%s), which the run "
                "record does not hold; call_args() leaves it out (the null genes alone). Pass the same arrays as "
                "kwargs['fdr'].null_expression to reproduce the run.", run_id,
                f"{kwargs['null_expression']} column(s)" if isinstance(kwargs["null_expression"], int)
                else repr(kwargs["null_expression"]),
            )
            kwargs["null_expression"] = None
        if section == "filter" and isinstance(kwargs.get("cell_filter"), str) and kwargs["cell_filter"].startswith("<array"):
            logger.warning(
                "Run %d filtered cells with a boolean array (%s), which the run record does not hold; "
                "call_args() leaves FilterSettings.cell_filter=None (all cells). Pass the same mask as "
                "kwargs['filter'].cell_filter to reproduce the run, or store it as an obs column.",
                run_id, kwargs["cell_filter"],
            )
            kwargs["cell_filter"] = None
        try:
            out[section] = cls(**kwargs)
        except (SettingsError, TypeError) as exc:
            raise SettingsError(
                f"run {run_id}'s recorded {section} settings cannot be rebuilt with this kompot_dask "
                f"version: {exc} Edit the values in RunInfo(...).params[{section!r}] and build "
                f"{cls.__name__}(...) yourself."
            ) from exc
    return out


def _recorded_landmarks(history: RunHistory, run_id: int, recorded: Any) -> np.ndarray | None:
    if recorded is None or recorded is False:
        return None
    record = history.runs[run_id]
    rk = record.stored_result_key
    # uns[rk]["landmarks"] holds the landmarks of the latest run with this result_key that
    # stored them; only if that is this run are they this run's.
    storer = None
    for rid in range(len(history.runs) - 1, -1, -1):
        storage = history.runs[rid].settings("storage")
        if storage.get("result_key", "kompot_de") == rk and storage.get("store_landmarks"):
            storer = rid
            break
    stored = history.source.uns_item(rk, "landmarks") if storer == run_id else None
    if stored is not None:
        arr = np.asarray(stored, dtype=np.float64)
        expected = record.model.n_landmarks
        if arr.ndim == 2 and (expected is None or arr.shape[0] == expected):
            logger.info("Loaded run %d's %d landmarks from uns[%r]['landmarks']", run_id, arr.shape[0], rk)
            return arr
    reason = (
        f"run {storer} has since replaced uns[{rk!r}]['landmarks']" if storer is not None and storer > run_id
        else f"they were not stored (StorageSettings(store_landmarks=False)) or are no longer in uns[{rk!r}]"
    )
    logger.warning(
        "Run %d used landmarks given in GPSettings.landmarks, but %s; they cannot be reproduced. "
        "call_args() leaves gp.landmarks=None (k-means landmarks); set kwargs['gp'].landmarks to the "
        "original array to reproduce the run.", run_id, reason,
    )
    return None


# ---- RunInfo -------------------------------------------------------------------------


class RunInfo(Reportable):
    """One recorded run: parameters, environment, the fields it created and their status.

    Parameters
    ----------
    data
        A zarr store path, a :class:`~kompot_dask.store.Store`, or an in-memory AnnData
        whose ``uns["kompot_de"]`` holds the run history.
    run_id
        Run to show; negative ids count back from the latest (``-1``).
    analysis_type
        ``"de"``.

    Attributes
    ----------
    run_id : int
        The resolved (non-negative) run id.
    record : dict
        The run record as stored (:attr:`run_record` is its typed form).
    run_record : RunRecord
        The run record.
    params : dict
        Arguments and settings of the run (nested by Settings section).
    environment : dict
        Host, platform, Python and package versions of the process that ran it.
    fields : list of FieldStatus
        Each field the run created, with ``status`` ``Present``, ``Overwritten by Run k``
        or ``Missing``.

    Examples
    --------
    >>> info = RunInfo("data.zarr", run_id=0)      # doctest: +SKIP
    >>> info.compare_with(1)                         # doctest: +SKIP
    >>> kwargs = info.call_args()                    # doctest: +SKIP
    >>> kwargs["fdr"].threshold = 0.01               # doctest: +SKIP
    >>> kompot_dask.de("data.zarr", **kwargs)       # doctest: +SKIP
    """

    def __init__(self, data: Any, run_id: int = -1, analysis_type: str = "de"):
        self._history = read_history(data if isinstance(data, RunSource) else RunSource(data), analysis_type)
        self.analysis_type = analysis_type
        self.run_id = self._history.resolve(run_id)
        self.run_record: RunRecord = self._history.runs[self.run_id]
        self.record: dict[str, Any] = self.run_record.to_dict()
        self.params: dict[str, Any] = dict(self.run_record.params)
        self.environment: dict[str, Any] = dict(self.run_record.environment)
        self.timestamp: str | None = self.run_record.timestamp
        self.fields: list[FieldStatus] = self._history.field_status(self.run_id)

    # ---- views -------------------------------------------------------------------

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def overwritten_fields(self) -> dict[str, int]:
        """Field → id of the later run that overwrote it."""
        return {f.name: f.last_writer for f in self.fields if f.status.startswith("Overwritten")}

    @property
    def missing_fields(self) -> list[str]:
        return [f.name for f in self.fields if f.status == "Missing"]

    def summary(self) -> dict[str, Any]:
        """The Run Summary rows."""
        r = self.run_record
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "conditions": _conditions(r),
            "groupby": r.groupby,
            "obsm_key": r.obsm_key,
            "layer": r.layer if r.layer is not None else "X",
            "uses_sample_variance": bool(r.uses_sample_variance),
            "result_key": r.result_key,
            "timestamp": self.timestamp,
        }
        fdr = r.fdr_results
        if isinstance(fdr, dict) and "n_significant" in fdr:
            out["DE genes"] = f"{fdr['n_significant']}/{fdr.get('n_total')} at local FDR < {fdr.get('fdr_threshold')}"
            mode = r.fdr_mode
            source = {"variance_stratified": "the residual local FDR",
                      "calibrated": "the local FDR against permuted labels"}.get(mode, f"the {mode} FDR")
            raw_n = fdr.get("raw_n_significant")
            out["FDR mode"] = ("raw (kompot 0.8.0's null-gene FDR)" if mode == "raw" else
                               f"{mode} (is_de from {source}" + ("" if raw_n is None else f"; raw mode: {raw_n} DE")
                               + ")")
        out["Fields Created"] = len(self.fields)
        return out

    def parameters(self) -> dict[str, Any]:
        """Every recorded parameter, flattened (``gp.n_landmarks``, ``fdr.null_genes``, ...)."""
        return _flatten(self.params)

    def environment_rows(self) -> dict[str, Any]:
        env = dict(self.environment)
        versions = env.pop("package_versions", {}) or {}
        out = {k: env[k] for k in ("hostname", "platform", "python_version", "username", "pid", "timestamp") if k in env}
        out.update({k: v for k, v in env.items() if k not in out})
        out.update({f"package_versions.{k}": v for k, v in versions.items()})
        return out

    def timings(self) -> dict[str, str]:
        """Where the run's time went: wall seconds per step, then the workers' thread-seconds
        per task phase ({} for runs recorded without them)."""
        r = self.run_record
        out = {f"wall: {k}": f"{v:.1f} s" for k, v in r.phase_seconds.items()}
        if r.wall_seconds is not None and r.phase_seconds:
            out["wall: total (to the record)"] = f"{r.wall_seconds:.1f} s"
        out.update({f"tasks: {k}": f"{v:.1f} thread-s" for k, v in r.task_seconds.items()})
        return out

    def report(self) -> Report:
        """The run as a :class:`~kompot_dask._report.Report` (text and HTML)."""
        fields = [(f.name, f.location, f"[{f.type}] {f.description}" if f.type else f.description, f.status)
                  for f in self.fields]
        sections = [
            Section.key_values("Run Summary", self.summary()),
            Section.key_values("All Parameters", self.parameters()),
            Section.key_values("Environment", self.environment_rows()),
        ]
        if self.timings():
            sections.append(Section.key_values("Time", self.timings()))
        sections.append(
            Section.table("Fields Created by This Run", ("Field", "Location", "Description", "Status"), fields))
        return Report(self.title, sections)

    @property
    def title(self) -> str:
        return f"Run {self.run_id} ({self._history.label} Analysis)"


    # ---- comparing ---------------------------------------------------------------

    def compare_with(self, other_run_id: int) -> RunComparison:
        """Differences between this run and ``other_run_id`` of the same history."""
        other = RunInfo(self._history.source, other_run_id, self.analysis_type)
        return RunComparison(self, other)

    # ---- reproducing -------------------------------------------------------------

    def to_settings(self) -> dict[str, Any]:
        """``{"gp": GPSettings(...), "fdr": ..., "filter": ..., "storage": ..., "output": ...,
        "compute": ...}`` as the run used them (new objects on every call)."""
        return _rebuild_settings(self._history, self.run_id)

    def call_args(self) -> dict[str, Any]:
        """Keyword arguments for :func:`kompot_dask.de` that reproduce this run.

        Edit them freely (they are new objects on every call). ``storage.overwrite`` is
        what the run had: re-running into the same store overwrites this run's fields, so
        set ``kwargs["storage"].overwrite = True`` to silence the notice (or change
        ``result_key``).
        """
        unknown = sorted(k for k in self.params if k not in CALL_ARGUMENTS and k not in SETTINGS_CLASSES)
        if unknown:
            logger.warning(
                "Run %d recorded argument(s) %s, which this kompot_dask version's de() does not take; ignored.",
                self.run_id, ", ".join(f"{k}={self.params[k]!r}" for k in unknown),
            )
        kwargs: dict[str, Any] = {k: self.params[k] for k in CALL_ARGUMENTS if k in self.params}
        if isinstance(kwargs.get("genes"), list):
            kwargs["genes"] = list(kwargs["genes"])
        kwargs.update(self.to_settings())
        return kwargs


@dataclass(frozen=True)
class FieldDifference:
    """One field of either run in a :class:`RunComparison`."""

    name: str
    location: str
    status: str
    """``"Shared"``, ``"Only in Run a"`` or ``"Only in Run b"``."""
    last_writer: int | None
    present: bool


class RunComparison(Reportable):
    """What differs between two runs: summary, parameters, fields.

    Attributes
    ----------
    run_ids : tuple of int
    key_differences : dict
        Parameter → (value in the first run, value in the second) for
        :data:`KEY_PARAMETERS` that differ.
    parameter_differences : dict
        Every differing parameter (flattened names such as ``fdr.null_genes``).
    n_same : int
        Number of parameters equal in both runs.
    field_differences : list of FieldDifference
    """

    def __init__(self, first: RunInfo, second: RunInfo):
        self.first, self.second = first, second
        self.run_ids = (first.run_id, second.run_id)
        a, b = first.parameters(), second.parameters()
        keys = list(a) + [k for k in b if k not in a]
        self.parameter_differences: dict[str, tuple[Any, Any]] = {
            k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)
        }
        self.key_differences = {k: v for k, v in self.parameter_differences.items() if k in KEY_PARAMETERS}
        self.n_same = len(keys) - len(self.parameter_differences)
        fa = {f.name: f for f in first.fields}
        fb = {f.name: f for f in second.fields}
        diffs = []
        for name in list(fa) + [n for n in fb if n not in fa]:
            f = fa.get(name) or fb[name]
            status = "Shared" if name in fa and name in fb else f"Only in Run {first.run_id if name in fa else second.run_id}"
            diffs.append(FieldDifference(name, f.location, status, f.last_writer, f.present))
        order = {"Shared": 0}
        self.field_differences = sorted(diffs, key=lambda d: (order.get(d.status, 1), d.status, d.location, d.name))

    def summary(self) -> dict[str, tuple[Any, Any]]:
        s1, s2 = self.first.summary(), self.second.summary()
        keys = ("conditions", "groupby", "result_key", "uses_sample_variance", "timestamp", "Fields Created")
        return {k: (s1.get(k), s2.get(k)) for k in keys}

    def difference_lines(self) -> list[str]:
        """``"condition2: Old → Mid"`` for each differing parameter."""
        return [f"{k}: {format_cell(v1)} → {format_cell(v2)}" for k, (v1, v2) in self.parameter_differences.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_ids": list(self.run_ids),
            "summary": {k: list(v) for k, v in self.summary().items()},
            "key_differences": {k: list(v) for k, v in self.key_differences.items()},
            "parameter_differences": {k: list(v) for k, v in self.parameter_differences.items()},
            "n_same": self.n_same,
            "field_differences": [dataclasses.asdict(d) for d in self.field_differences],
        }

    def report(self) -> Report:
        """The comparison as a :class:`~kompot_dask._report.Report` (text and HTML)."""
        a, b = self.run_ids
        runs = (f"Run {a}", f"Run {b}")

        def diff_rows(d: dict[str, tuple[Any, Any]]) -> list[tuple[Any, ...]]:
            return [(k, v1, v2, f"{k}: {format_cell(v1)} → {format_cell(v2)}") for k, (v1, v2) in d.items()]

        fields = [(d.name, d.location, d.status, f"Run {d.last_writer}" if d.last_writer is not None else "untracked",
                   "Present" if d.present else "Missing") for d in self.field_differences]
        return Report(self.title, [
            Section.table("Summary", ("Aspect", *runs), [(k, *v) for k, v in self.summary().items()]),
            Section.table("Key Parameter Differences", ("Parameter", *runs, "Change"),
                          diff_rows(self.key_differences)),
            Section.table(f"All Parameter Differences ({self.n_same} parameters are the same in both runs)",
                          ("Parameter", *runs, "Change"), diff_rows(self.parameter_differences)),
            Section.table("Field Differences", ("Field", "Location", "Status", "Last Modified By", "Now"), fields),
        ])

    @property
    def title(self) -> str:
        return f"Comparison of Run {self.run_ids[0]} and Run {self.run_ids[1]}"

