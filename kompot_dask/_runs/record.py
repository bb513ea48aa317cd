"""The run record: one typed entry of the DE run history, how it is stored in ``uns``, how
a run builds it, and the ``uns`` entries a run commits.

``uns["kompot_de"]`` holds (as JSON strings, as kompot writes them):

``run_history``
    the list of run records (:meth:`RunRecord.to_dict` of each);
``last_run_info``
    the latest record;
``anndata_fields``
    location → field → id of the run that last wrote it (the field tracking);
``removed_fields``
    location → field → {run_id, timestamp} of fields that ``cleanup`` removed.

:class:`RunRecord` reads every history entry, including those of older kompot_dask versions
and of kompot: keys it does not know are kept as they are, and keys an entry lacks take
defaults and stay absent when it is written back.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import platform
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from typing import Any, ClassVar, Self

import numpy as np

from .fields import FIELD_LOCATIONS, field_mapping

__all__ = [
    "HISTORY_KEY", "RunRecord", "RecordedField", "ModelInfo", "LayoutInfo", "PlanSummary",
    "ResumeInfo", "build_record", "uns_updates", "landmarks_info", "record_params",
    "environment_info", "to_json", "encode_entry", "decoded", "load_history",
    "load_field_tracking", "load_removed",
]

HISTORY_KEY = "kompot_de"
"""``uns`` key holding the DE run history, whatever the result_key (as in kompot)."""

_PACKAGES = (
    "kompot_dask", "anndata", "dask", "distributed", "zarr", "jax", "jaxlib",
    "numpy", "scipy", "pandas", "pynndescent",
)


# ---- tolerant JSON dataclasses -------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """A dataclass stored as a JSON object.

    :meth:`from_dict` takes any dict: keys the class lacks go to ``extra``, keys the dict
    lacks take their defaults and are listed in ``absent``; :meth:`to_dict` gives back
    exactly what was read.
    """

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)
    """Keys this version does not know (from other versions or kompot), kept as they are."""
    absent: frozenset[str] = field(default=frozenset(), kw_only=True, repr=False, compare=False)
    """Keys the stored entry did not have (left out of :meth:`to_dict`)."""

    _SECTIONS: ClassVar[dict[str, type[_Stored]]] = {}

    @classmethod
    def _keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "absent")]

    @classmethod
    def _accepts(cls, key: str, value: Any) -> bool:
        """Whether ``value`` has the shape field ``key`` holds: a dict for a section or a
        dict field (``None`` too where that is the default), a list for a list field."""
        spec = next(f for f in dataclasses.fields(cls) if f.name == key)
        if value is None:
            return spec.default is None
        if key in cls._SECTIONS or spec.default_factory is dict:
            return isinstance(value, Mapping)
        if spec.default_factory is list:
            return isinstance(value, list)
        return True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The entry from its stored (decoded) dict; tolerant of missing and unknown keys.

        A value of another shape than this version expects (``None`` where a dict is due,
        say) is kept untouched in ``extra`` and the field takes its default.
        """
        keys = cls._keys()
        kwargs: dict[str, Any] = {}
        extra = {str(k): v for k, v in data.items() if k not in keys}
        for key in [k for k in keys if k in data]:
            value, section = data[key], cls._SECTIONS.get(key)
            if not cls._accepts(key, value):
                extra[key] = value
            elif section is not None and value is not None:
                kwargs[key] = section.from_dict(value)
            else:
                kwargs[key] = value
        absent = frozenset(k for k in keys if k not in kwargs)
        return cls(**kwargs, extra=extra, absent=absent)

    def to_dict(self) -> dict[str, Any]:
        """The stored (JSON-ready) form, with the keys in the order of the dataclass."""
        out: dict[str, Any] = {}
        for key in self._keys():
            if key in self.absent:
                continue
            value = getattr(self, key)
            out[key] = value.to_dict() if isinstance(value, _Stored) else value
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class ModelInfo(_Stored):
    """``model``: the fitted model's scale, landmarks and cell counts."""

    ls: float | None = None
    n_landmarks: int | None = None
    landmark_source: str | None = None
    """``"kmeans"``, ``"user"`` or ``"all cells"``."""
    n_cells_condition1: int | None = None
    n_cells_condition2: int | None = None
    n_null_genes: int | None = None


@dataclass(frozen=True)
class LayoutInfo(_Stored):
    """``layout``: how the run cut the work."""

    cell_chunk: int | None = None
    gene_block: int | None = None
    null_gene_block: int | None = None
    kernel_chunk: int | None = None
    n_tasks: int | None = None
    n_workers: int | None = None


@dataclass(frozen=True)
class PlanSummary(_Stored):
    """``plan``: the resource plan the run ran under."""

    status: str | None = None
    peak_worker_bytes: int | None = None
    peak_client_bytes: int | None = None
    wall_seconds: float | None = None
    n_tasks: int | None = None

    @classmethod
    def of(cls, plan: Any) -> PlanSummary:
        """The summary of a :class:`~kompot_dask.ResourcePlan`."""
        return cls(status=plan.status, peak_worker_bytes=plan.peak_worker_bytes,
                   peak_client_bytes=plan.peak_client_bytes, wall_seconds=plan.wall_seconds,
                   n_tasks=plan.n_tasks)


@dataclass(frozen=True)
class ResumeInfo(_Stored):
    """``resumed``: how much of an interrupted run's work was reused."""

    tasks_reused: int | None = None
    tasks_run: int | None = None


@dataclass(frozen=True)
class RecordedField:
    """One field a run wrote, as its record describes it."""

    name: str
    location: str
    type: str = ""
    description: str = ""


@dataclass(frozen=True)
class RunRecord(_Stored):
    """One entry of the DE run history.

    Attributes mirror the stored JSON keys; :meth:`to_dict` writes them back in the same
    order. ``params`` holds the call's top-level arguments and one dict per Settings
    section (see :func:`record_params`).
    """

    run_id: int | None = None
    timestamp: str | None = None
    function: str | None = "kompot_dask.de"
    analysis_type: str | None = "de"
    result_key: str | None = None
    lfc_key: str | None = None
    mahalanobis_key: str | None = None
    fdr_keys: dict[str, str] = field(default_factory=dict)
    fdr_results: dict[str, Any] | None = None
    imputed_layer_keys: dict[str, str] = field(default_factory=dict)
    std_keys: dict[str, str] = field(default_factory=dict)
    field_names: dict[str, str] = field(default_factory=dict)
    """Role → field name (see :mod:`kompot_dask._runs.fields`)."""
    field_mapping: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Field name → {location, type, description}."""
    fields_written: list[str] = field(default_factory=list)
    """``"location/name"`` of every field the run wrote."""
    uses_sample_variance: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    model: ModelInfo = field(default_factory=ModelInfo)
    layout: LayoutInfo = field(default_factory=LayoutInfo)
    plan: PlanSummary = field(default_factory=PlanSummary)
    environment: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each step up to the record (cluster start, plan, model, engine, FDR)."""
    task_seconds: dict[str, float] = field(default_factory=dict)
    """Thread-seconds the workers' tasks spent per phase (tile read, projection, ...)."""
    resumed: ResumeInfo | None = None
    has_groups: bool = False
    """FilterSettings(groups=...): per-subset tables in varm (kompot's keys below)."""
    subset_names: list[str] | None = None
    groups_summary: dict[str, Any] | None = None
    """Subsets: count, names, the form given, and per subset its cells (and per condition)."""
    varm_keys: dict[str, str] | None = None
    posterior_covariance_key: str | None = None
    underrepresentation: dict[str, list[Any]] = field(default_factory=dict)
    """Subset → conditions with too few cells there (the representation check)."""
    auto_filtered: bool = False
    """Whether check_representation=True left underrepresented cells out of the run."""

    _SECTIONS: ClassVar[dict[str, type[_Stored]]] = {
        "model": ModelInfo, "layout": LayoutInfo, "plan": PlanSummary, "resumed": ResumeInfo,
    }

    # ---- what was compared -------------------------------------------------------

    @property
    def groupby(self) -> str | None:
        return self.params.get("groupby")

    @property
    def condition1(self) -> Any:
        return self.params.get("condition1")

    @property
    def condition2(self) -> Any:
        return self.params.get("condition2")

    @property
    def layer(self) -> str | None:
        return self.params.get("layer")

    @property
    def obsm_key(self) -> str | None:
        return self.params.get("obsm_key")

    def settings(self, section: str) -> dict[str, Any]:
        """The recorded dict of one Settings section (``"gp"``, ``"storage"``, ...); {} if none."""
        value = self.params.get(section)
        return dict(value) if isinstance(value, Mapping) else {}

    @property
    def stored_result_key(self) -> str:
        """The result_key the run wrote under (from its storage settings, else the record)."""
        return self.settings("storage").get("result_key") or self.result_key or HISTORY_KEY

    @property
    def fdr_mode(self) -> str | None:
        """Which null calibration produced ``is_de`` (``FDRSettings.mode``: ``"raw"`` for
        kompot's, and for records from before the setting); ``None`` without an FDR."""
        if "is_de_key" not in self.fdr_keys:
            return None
        return str(self.settings("fdr").get("mode") or "raw")

    @property
    def n_de(self) -> int | None:
        """Genes called DE (``None`` without an FDR)."""
        return (self.fdr_results or {}).get("n_significant")

    # ---- fields ------------------------------------------------------------------

    def fields(self) -> dict[str, RecordedField]:
        """Field name → :class:`RecordedField` of every field the run wrote.

        ``field_mapping`` describes them; a field listed only in ``fields_written`` comes
        with its location alone.
        """
        out = {}
        for name, spec in self.field_mapping.items():
            spec = spec if isinstance(spec, Mapping) else {}
            out[str(name)] = RecordedField(str(name), str(spec.get("location") or ""),
                                           str(spec.get("type") or ""), str(spec.get("description") or ""))
        for loc_field in self.fields_written:
            loc, name = loc_field.split("/", 1)
            out.setdefault(name, RecordedField(name, loc))
        return out

    def role_names(self) -> dict[str, str]:
        """Role → field name; for a record without roles (written by kompot) the field
        types stand in for them."""
        if self.field_names:
            return {str(k): str(v) for k, v in self.field_names.items()}
        out: dict[str, str] = {}
        for field_ in self.fields().values():
            out.setdefault(field_.type or field_.name, field_.name)
        return out

    def role_locations(self) -> dict[str, str]:
        """Role → location, from the record's fields, else from the field registry."""
        fields = self.fields()
        return {role: (fields[name].location if name in fields else "") or FIELD_LOCATIONS.get(role, "")
                for role, name in self.role_names().items()}


# ---- building a record ---------------------------------------------------------------


def build_record(run_id: int, *, names: Mapping[str, str], fields_written: Sequence[str],
                 fdr_results: dict[str, Any] | None, params: dict[str, Any], model: ModelInfo,
                 layout: LayoutInfo, plan: PlanSummary, environment: dict[str, Any],
                 wall_seconds: float, resumed: ResumeInfo | None,
                 phase_seconds: dict[str, float] | None = None,
                 task_seconds: dict[str, float] | None = None,
                 groups: dict[str, Any] | None = None) -> RunRecord:
    """The record of a finished run.

    Parameters
    ----------
    run_id
        Position of the run in the history.
    names
        Role → name of every field the run wrote (the roles in the order they were written).
    fields_written
        ``"location/name"`` of every field written.
    fdr_results
        The FDR summary, or ``None`` when the run had no null genes.
    params
        From :func:`record_params`; conditions, threshold and result_key are read from it.
    model, layout, plan, environment, wall_seconds, resumed
        The record's sections (``resumed`` is ``None`` for a run that reused nothing).
    phase_seconds, task_seconds
        Where the time went: wall seconds per step, thread-seconds per task phase.
    groups
        With per-group results: ``subset_names``, ``groups_summary``,
        ``underrepresentation`` and ``auto_filtered`` (kompot's record entries).
    """
    rk = params["storage"]["result_key"]
    mapping = field_mapping(list(names), names, params["condition1"], params["condition2"],
                            params["fdr"]["threshold"], params["fdr"].get("mode", "raw"))
    groups = groups or {}
    for spec in mapping.values():
        if spec["location"] == "varm" and groups.get("subset_names"):
            spec["contains_subsets"] = list(groups["subset_names"])
    fdr_keys = {f"{role}_key": names[role] for role in ("local_fdr", "is_de") if role in names}
    fdr_keys.update({f"{role}_key": names[role] for role in ("pvalue", "tail_fdr", "residual_z",
                                                             "residual_local_fdr", "residual_tail_fdr",
                                                             "permuted_mahalanobis", "calibrated_score",
                                                             "calibrated_local_fdr", "calibrated_tail_fdr")
                     if role in names})
    layer_keys = ({"condition1": names["imputed1"], "condition2": names["imputed2"],
                   "fold_change": names["fold_change"]} if "imputed1" in names else {})
    # obs columns, or with sample variance layers (not written when no layers are stored)
    std_keys = {f"condition{i}": names.get(f"std{i}", names.get(f"sample_std{i}")) for i in (1, 2)}
    std_keys = {k: v for k, v in std_keys.items() if v is not None}
    return RunRecord(
        run_id=run_id, timestamp=datetime.now().isoformat(), function="kompot_dask.de",
        analysis_type="de", result_key=rk, lfc_key=names["mean_lfc"],
        mahalanobis_key=names.get("mahalanobis"), fdr_keys=fdr_keys, fdr_results=fdr_results,
        imputed_layer_keys=layer_keys, std_keys=std_keys,
        field_names=dict(names), field_mapping=mapping, fields_written=list(fields_written),
        uses_sample_variance=params.get("sample_col") is not None, params=params, model=model, layout=layout, plan=plan,
        environment=environment, wall_seconds=wall_seconds, phase_seconds=dict(phase_seconds or {}),
        task_seconds=dict(task_seconds or {}), resumed=resumed,
        has_groups=bool(groups.get("subset_names")), subset_names=groups.get("subset_names"),
        groups_summary=groups.get("groups_summary"),
        varm_keys=({"mean_lfc": names["group_mean_lfc"], "mahalanobis": names.get("group_mahalanobis")}
                   if "group_mean_lfc" in names else None),
        posterior_covariance_key=names.get("posterior_covariance"),
        underrepresentation=dict(groups.get("underrepresentation") or {}),
        auto_filtered=bool(groups.get("auto_filtered")),
        # a run without groups stores none of their keys (as before groups existed)
        absent=((frozenset() if groups.get("subset_names") else _GROUP_KEYS)
                | (frozenset() if "posterior_covariance" in names else {"posterior_covariance_key"})),
    )


_GROUP_KEYS = frozenset({"has_groups", "subset_names", "groups_summary", "varm_keys", "underrepresentation",
                         "auto_filtered"})


def landmarks_info(landmarks: np.ndarray, source: str) -> dict[str, Any]:
    """``uns[result_key]["landmarks_info"]``: shape, dtype and origin of a run's landmarks."""
    return {"shape": list(landmarks.shape), "dtype": str(landmarks.dtype), "source": source,
            "n_landmarks": int(landmarks.shape[0]), "timestamp": datetime.now().isoformat()}


def _next_history_entry(previous: Mapping[str, Any], record: RunRecord) -> dict[str, Any]:
    """``uns["kompot_de"]`` after ``record``: history appended, field tracking updated, and
    the fields it wrote again no longer listed as removed."""
    tracking = load_field_tracking(previous)
    removed = load_removed(previous)
    for loc_field in record.fields_written:
        loc, name = loc_field.split("/", 1)
        tracking.setdefault(loc, {})[name] = record.run_id
        removed.get(loc, {}).pop(name, None)
    tracking.setdefault("uns", {})[record.result_key] = record.run_id
    entry = record.to_dict()
    return {**previous, "run_history": load_history(previous) + [entry], "last_run_info": entry,
            "anndata_fields": tracking, "removed_fields": removed}


def uns_updates(previous: Mapping[str, Any], record: RunRecord, previous_result: Mapping[str, Any] | None,
                landmarks: np.ndarray, landmark_source: str, store_landmarks: bool) -> dict[str, dict[str, Any]]:
    """The ``uns`` entries a run commits, encoded as stored.

    Parameters
    ----------
    previous
        ``uns["kompot_de"]`` before the run (decoded).
    record
        The run's record.
    previous_result
        ``uns[result_key]`` before the run, when result_key is not ``"kompot_de"``.
    landmarks, landmark_source
        The run's landmarks, described in ``uns[result_key]["landmarks_info"]``.
    store_landmarks
        Also store the landmark array (``StorageSettings.store_landmarks``).

    Returns
    -------
    ``{"kompot_de": ..., result_key: ...}`` (one entry when they are the same key).
    """
    history = _next_history_entry(previous, record)
    rk = record.result_key
    result = history if rk == HISTORY_KEY else dict(previous_result or {})
    result["landmarks_info"] = landmarks_info(landmarks, landmark_source)
    if store_landmarks:
        result["landmarks"] = np.asarray(landmarks)
    out = {HISTORY_KEY: encode_entry(history)}
    if rk != HISTORY_KEY:
        out[str(rk)] = encode_entry(result)
    return out


def record_params(groupby: Any, condition1: Any, condition2: Any, obsm_key: Any, layer: Any,
                  genes: Any, gp: Any, fdr: Any, filter: Any, storage: Any, output: Any,  # noqa: A002
                  compute: Any, sample_col: Any = None) -> dict[str, Any]:
    """The ``params`` entry of a run record: top-level arguments plus one dict per Settings.

    ``gp.landmarks`` becomes ``True``/``False`` (the array is in ``uns[result_key]`` only
    with ``StorageSettings(store_landmarks=True)``) and ``fdr.null_genes`` the resolved
    count; :class:`kompot_dask.RunInfo` rebuilds the Settings from this.
    """
    return {
        "groupby": groupby, "condition1": condition1, "condition2": condition2,
        "obsm_key": obsm_key, "layer": layer, "genes": genes, "sample_col": sample_col,
        "gp": gp.to_dict() | {"landmarks": gp.landmarks is not None},
        # user-given null distances are recorded by their count (not the array)
        "fdr": fdr.to_dict() | {"null_genes": fdr.resolved_null_genes(sample_col is not None),
                                "null_mahalanobis": None if fdr.null_mahalanobis is None
                                else int(np.asarray(fdr.null_mahalanobis).size)},
        "filter": filter.to_dict(), "storage": storage.to_dict(), "output": output.to_dict(),
        "compute": compute.to_dict(),
    }


# ---- environment ---------------------------------------------------------------------


def _local_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _version_mismatches(local: Mapping[str, Any], workers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    mismatches: dict[str, dict[str, str | None]] = {}
    for pkg in sorted(set(local).union(*workers.values())):
        differ = {addr: pkgs.get(pkg) for addr, pkgs in workers.items() if pkgs.get(pkg) != local.get(pkg)}
        if differ:
            mismatches[pkg] = {"client": local.get(pkg), **differ}
    return mismatches


def environment_info(client: Any = None) -> dict[str, Any]:
    """Where and with what a run ran: host, platform, user and package versions.

    With a ``client`` the versions come from ``client.get_versions(check=True)``, which also
    asks every worker and the scheduler: distributed warns ("Mismatched versions found",
    with a table) when they differ from this process, and the record keeps the packages
    that differ between this process and any worker under ``version_mismatches`` (package
    → version here and on each differing worker), with ``n_workers_checked``. Without one
    they are this process's installed versions.
    """
    workers = None
    if client is not None:
        report = client.get_versions(check=True, packages=list(_PACKAGES))
        local = report["client"]["packages"]
        workers = {addr: (info or {}).get("packages") or {} for addr, info in report["workers"].items()}
    else:
        local = _local_versions()
    # python is recorded as python_version; packages this process lacks are left out
    versions = {pkg: v for pkg, v in local.items() if v is not None and pkg != "python"}
    if "kompot_dask" not in versions:  # run from a source tree, not installed
        # the package is imported by now; read its version without importing it from here
        versions["kompot_dask"] = getattr(sys.modules.get("kompot_dask"), "__version__", "unknown")
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    info: dict[str, Any] = {
        "timestamp": datetime.now().isoformat(), "platform": platform.platform(),
        "python_version": platform.python_version(), "hostname": socket.gethostname(),
        "username": user, "pid": os.getpid(), "package_versions": versions,
    }
    if workers is not None:
        info["n_workers_checked"] = len(workers)
        info["version_mismatches"] = _version_mismatches(local, workers)
    return info


# ---- the stored form -----------------------------------------------------------------


def to_json(value: Any) -> str:
    """``value`` as JSON (numpy scalars as numbers, arrays as a ``<array shape=...>`` note)."""
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return f"<array shape={value.shape}>"
    return str(value)


def encode_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An ``uns`` entry as stored: dicts and lists as JSON strings."""
    return {k: to_json(v) if isinstance(v, dict | list) else v for k, v in entry.items()}


def decoded(value: Any) -> Any:
    """A JSON string decoded; anything else (already decoded) as it is."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value.item()  # a string read back as a numpy scalar
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def load_history(uns_entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run history list from a ``uns["kompot_de"]`` dict (JSON strings or decoded)."""
    history = decoded(uns_entry.get("run_history", []))
    return [decoded(r) for r in history] if history is not None else []


def load_field_tracking(uns_entry: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """location → field → id of the run that last wrote it."""
    fields = decoded(uns_entry.get("anndata_fields", {})) or {}
    return {loc: {str(k): int(v) for k, v in (decoded(names) or {}).items()} for loc, names in fields.items()}


def load_removed(uns_entry: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """location → field → {run_id, timestamp} of fields that ``cleanup`` removed."""
    removed = decoded(uns_entry.get("removed_fields", {})) or {}
    return {loc: {str(k): dict(decoded(v)) for k, v in (decoded(names) or {}).items()}
            for loc, names in removed.items()}
