"""Run records: output field names, the JSON run history in ``uns``, environment capture,
and reading that history back (from a zarr store or an in-memory AnnData).

Readers (``RunInfo``, ``cleanup``, plots) go through :func:`read_history` and
:func:`get_run_fields`; they never parse ``uns`` themselves.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

logger = logging.getLogger("kompot_dask")

HISTORY_KEY = "kompot_de"
"""``uns`` key holding the DE run history, whatever the result_key (as in kompot)."""

_PACKAGES = (
    "kompot_dask", "anndata", "dask", "distributed", "zarr", "jax", "jaxlib",
    "numpy", "scipy", "pandas", "pynndescent",
)


def sanitize_name(name: Any) -> str:
    """Condition name as it appears in field names (" ", "-", ".", "/" → "_")."""
    out = str(name)
    for ch in (" ", "-", ".", "/"):
        out = out.replace(ch, "_")
    return out


def output_field_names(result_key: str, condition1: Any, condition2: Any) -> dict[str, str]:
    """Every field a DE run may write, keyed by role."""
    c1, c2 = sanitize_name(condition1), sanitize_name(condition2)
    pair = f"{result_key}_{c1}_to_{c2}"
    return {
        "mahalanobis": f"{pair}_mahalanobis",
        "mean_lfc": f"{pair}_mean_lfc",
        "local_fdr": f"{pair}_mahalanobis_local_fdr",
        "is_de": f"{pair}_is_de",
        "std1": f"{result_key}_{c1}_std",
        "std2": f"{result_key}_{c2}_std",
        "imputed1": f"{result_key}_{c1}_imputed",
        "imputed2": f"{result_key}_{c2}_imputed",
        "fold_change": f"{pair}_fold_change",
    }


FIELD_LOCATIONS = {
    "mahalanobis": "var", "mean_lfc": "var", "local_fdr": "var", "is_de": "var",
    "std1": "obs", "std2": "obs",
    "imputed1": "layers", "imputed2": "layers", "fold_change": "layers",
}


def field_descriptions(condition1: Any, condition2: Any, threshold: float) -> dict[str, tuple[str, str]]:
    """(type, description) of each role, for the run record's field mapping."""
    return {
        "mahalanobis": ("mahalanobis", "Mahalanobis distances"),
        "mean_lfc": ("mean_log_fold_change", "Mean log fold change values"),
        "local_fdr": ("mahalanobis_local_fdr", "Local FDR values using empirical null estimation similar to R's fdrtool"),
        "is_de": ("is_de", f"Boolean indicator of differential expression at local FDR < {threshold}"),
        "std1": ("std", f"Posterior standard deviation of imputed expression for {condition1} (same for all genes)"),
        "std2": ("std", f"Posterior standard deviation of imputed expression for {condition2} (same for all genes)"),
        "imputed1": ("imputed", f"Imputed expression for {condition1}"),
        "imputed2": ("imputed", f"Imputed expression for {condition2}"),
        "fold_change": ("fold_change", "Log fold change for each cell and gene"),
    }


def environment_info(client: Any = None) -> dict[str, Any]:
    """Where and with what a run ran: host, platform, user and package versions.

    Versions come from distributed's own report (``distributed.versions``). With a
    ``client`` they come from ``client.get_versions(check=True)``, which also asks every
    worker and the scheduler: distributed warns ("Mismatched versions found", with a table)
    when they differ from this process, and the record keeps the packages that differ
    between this process and any worker under ``version_mismatches`` (package → version
    here and on each differing worker), with ``n_workers_checked``.
    """
    from distributed.versions import get_versions

    if client is not None:
        report = client.get_versions(check=True, packages=list(_PACKAGES))
        local = report["client"]["packages"]
        workers = {addr: (info or {}).get("packages") or {} for addr, info in report["workers"].items()}
    else:
        local, workers = get_versions(packages=_PACKAGES)["packages"], None
    # python is recorded as python_version; packages this process lacks are left out
    versions = {pkg: v for pkg, v in local.items() if v is not None and pkg != "python"}
    if "kompot_dask" not in versions:  # run from a source tree, not installed
        from .. import __version__

        versions["kompot_dask"] = __version__
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    info: dict[str, Any] = {
        "timestamp": datetime.now().isoformat(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "username": user,
        "pid": os.getpid(),
        "package_versions": versions,
    }
    if workers is not None:
        mismatches: dict[str, dict[str, str | None]] = {}
        for pkg in sorted(set(local).union(*workers.values())):
            differ = {addr: pkgs.get(pkg) for addr, pkgs in workers.items() if pkgs.get(pkg) != local.get(pkg)}
            if differ:
                mismatches[pkg] = {"client": local.get(pkg), **differ}
        info["n_workers_checked"] = len(workers)
        info["version_mismatches"] = mismatches
    return info


def load_history(uns_entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The run history list from a ``uns["kompot_de"]`` dict (JSON strings or decoded)."""
    history = _decoded(uns_entry.get("run_history", []))
    return [_decoded(r) for r in history] if history is not None else []


def load_field_tracking(uns_entry: dict[str, Any]) -> dict[str, dict[str, int]]:
    """location → field → id of the run that last wrote it."""
    fields = _decoded(uns_entry.get("anndata_fields", {})) or {}
    return {loc: {str(k): int(v) for k, v in (_decoded(names) or {}).items()} for loc, names in fields.items()}


def load_removed(uns_entry: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """location → field → {run_id, timestamp} of fields that ``cleanup`` removed."""
    removed = _decoded(uns_entry.get("removed_fields", {})) or {}
    return {loc: {str(k): dict(_decoded(v)) for k, v in (_decoded(names) or {}).items()}
            for loc, names in removed.items()}


def encode_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry as stored in ``uns``: dicts and lists as JSON strings."""
    return {k: to_json(v) if isinstance(v, dict | list) else v for k, v in entry.items()}


def _decoded(value: Any) -> Any:
    """A JSON string decoded; anything else (already decoded) as it is."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value.item()  # a string read back as a numpy scalar
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return f"<array shape={value.shape}>"
    return str(value)


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
        import anndata as ad

        from .._io.store import StoreHandle

        self.adata: Any = None
        self.handle: StoreHandle | None = None
        if isinstance(data, ad.AnnData):
            self.adata = data
        elif isinstance(data, StoreHandle):
            self.handle = data
        elif isinstance(data, str | os.PathLike):
            self.handle = StoreHandle(data)
        else:
            raise TypeError(
                f"expected a zarr store path, a kompot_dask Store or an anndata.AnnData, got "
                f"{type(data).__name__}; pass the store path (e.g. 'data.zarr') or the AnnData."
            )

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
        entry = _decoded(self.adata.uns.get(key, {}))
        if not isinstance(entry, dict):
            return {}
        return {k: _decoded(v) for k, v in entry.items()}

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
    runs: list[dict[str, Any]]
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

    def record(self, run_id: int) -> dict[str, Any]:
        return self.runs[self.resolve(run_id)]

    def present(self, location: str) -> set[str]:
        """Field names at ``location`` now (read once per history object)."""
        if location not in self._present:
            self._present[location] = self.source.field_names(location)
        return self._present[location]

    def run_fields(self, run_id: int) -> dict[str, dict[str, str]]:
        """Field name → {location, type, description} of the fields the run wrote."""
        record = self.record(run_id)
        mapping = record.get("field_mapping") or {}
        out = {str(k): dict(v) for k, v in mapping.items()}
        for loc_field in record.get("fields_written", []):  # fields a mapping may lack
            loc, name = loc_field.split("/", 1)
            out.setdefault(name, {"location": loc, "type": "", "description": ""})
        return out

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
            if spec is not None and spec.get("location") == location:
                return rid
        return None

    def field_status(self, run_id: int) -> list[FieldStatus]:
        """Status of every field of the run, sorted by location then name."""
        rid = self.resolve(run_id)
        out = []
        for name, spec in self.run_fields(rid).items():
            loc = spec.get("location", "")
            present = loc in FIELD_LOCATIONS_ALL and name in self.present(loc)
            writer = self.last_writer(loc, name)
            if not present:
                status = "Removed by cleanup" if name in self.removed.get(loc, {}) else "Missing"
            elif writer is not None and writer != rid:
                status = f"Overwritten by Run {writer}"
            else:
                status = "Present"
            out.append(FieldStatus(name, loc, spec.get("type", ""), spec.get("description", ""),
                                   status, writer, present))
        order = {loc: i for i, loc in enumerate(("layers", "obs", "var", "obsm", "varm", "obsp"))}
        return sorted(out, key=lambda f: (order.get(f.location, 99), f.name))


def read_history(data: Any, analysis_type: str = "de") -> RunHistory:
    """The run history of ``analysis_type`` in ``data`` (store path, Store or AnnData)."""
    key = history_key(analysis_type)
    source = data if isinstance(data, RunSource) else RunSource(data)
    entry = source.uns_entry(key)
    return RunHistory(analysis_type, load_history(entry), load_field_tracking(entry), source, load_removed(entry))


@dataclass(frozen=True)
class RunFields:
    """The field names of one run, by role, for readers such as plots.

    Roles are those of :func:`output_field_names`: ``mahalanobis``, ``mean_lfc``,
    ``local_fdr``, ``is_de``, ``std1``, ``std2``, ``imputed1``, ``imputed2``,
    ``fold_change`` (only those the run wrote).
    """

    run_id: int
    analysis_type: str
    names: dict[str, str]
    locations: dict[str, str]
    params: dict[str, Any]

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
    def condition1(self) -> Any:
        return self.params.get("condition1")

    @property
    def condition2(self) -> Any:
        return self.params.get("condition2")

    @property
    def groupby(self) -> str | None:
        return self.params.get("groupby")

    @property
    def layer(self) -> str | None:
        return self.params.get("layer")

    @property
    def obsm_key(self) -> str | None:
        return self.params.get("obsm_key")


def _role_names(record: dict[str, Any]) -> dict[str, str]:
    names = record.get("field_names")
    if isinstance(names, dict) and names:
        return {str(k): str(v) for k, v in names.items()}
    # a record without roles (e.g. written by kompot): the field types stand in for them
    out: dict[str, str] = {}
    for name, spec in (record.get("field_mapping") or {}).items():
        out.setdefault(str(spec.get("type") or name), str(name))
    return out


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
    names = _role_names(record)
    mapping = history.run_fields(rid)
    locations = {
        role: mapping.get(name, {}).get("location") or FIELD_LOCATIONS.get(role, "")
        for role, name in names.items()
    }
    wanted = list(names) if roles is None else list(roles)
    unknown = [r for r in wanted if r not in names]
    if unknown:
        raise KeyError(f"run {rid} wrote no field for role(s) {unknown}; its roles are {sorted(names)}")
    for role in wanted:
        name, loc = names[role], locations[role]
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
    params = dict(record.get("params") or {})
    return RunFields(rid, analysis_type, names, locations, params)


def record_params(groupby: Any, condition1: Any, condition2: Any, obsm_key: Any, layer: Any,
                  genes: Any, gp: Any, fdr: Any, filter: Any, storage: Any, output: Any,  # noqa: A002
                  compute: Any) -> dict[str, Any]:
    """The ``params`` entry of a run record: top-level arguments plus one dict per Settings.

    ``gp.landmarks`` becomes ``True``/``False`` (the array is in ``uns[result_key]`` only
    with ``StorageSettings(store_landmarks=True)``) and ``fdr.null_genes`` the resolved
    count; :class:`kompot_dask.RunInfo` rebuilds the Settings from this.
    """
    return {
        "groupby": groupby, "condition1": condition1, "condition2": condition2,
        "obsm_key": obsm_key, "layer": layer, "genes": genes,
        "gp": gp.to_dict() | {"landmarks": gp.landmarks is not None},
        "fdr": fdr.to_dict() | {"null_genes": fdr.resolved_null_genes()},
        "filter": filter.to_dict(), "storage": storage.to_dict(), "output": output.to_dict(),
        "compute": compute.to_dict(),
    }
