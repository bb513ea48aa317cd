"""``kompot_dask.de`` and ``kompot_dask.plan`` as named steps.

``de``: **validate** the call against the store (:func:`_validate`, before any compute),
**plan** it on the cluster (:func:`_plan_for_run`), **execute** it on the engine
(:func:`_execute`), **record** its results (:func:`_record`: FDR, the run record) and
**commit** them in one journaled change (:func:`_commit`). ``plan`` stops after the plan.
Whether ``data`` is a store or an in-memory AnnData is decided by
:mod:`kompot_dask._io.source`; the layout and cost model is :mod:`kompot_dask._layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from dask.utils import format_bytes, format_time
from distributed import Client, KilledWorker

from . import _groups
from . import _planner as planner
from ._engine import graph as engine
from ._engine.cluster import (
    check_process_context,
    cluster_workers,
    is_embedded,
    limit_malloc_arenas,
    may_run_in_process,
    resolve_client,
    worker_runtime,
)
from ._io import commit as io_commit
from ._io.lease import store_lock
from ._io.source import (
    copy_results,
    discard_unused_results_store,
    lazy_store_path,
    results_store_for,
    run_store,
)
from ._io.store import (
    EmbeddingReader,
    LayerInfo,
    RowSubset,
    Store,
    StoreDiskFullError,
    disk_full_error,
)
from ._layout import (
    Landmarks,
    Layout,
    kernel_sum_parts,
    landmarks_for,
    make_layout,
    null_value_dtype,
)
from ._numerics import fdr as fdr_mod
from ._numerics import gp as gp_numerics
from ._runs import fields as run_fields
from ._runs import record as run_record
from ._settings import (
    ComputeSettings,
    FDRSettings,
    FilterSettings,
    GPSettings,
    OutputSettings,
    SettingsError,
    StorageSettings,
    _short,
)

logger = logging.getLogger("kompot_dask")


@dataclass(frozen=True)
class _Settings:
    """The six settings objects of a call, defaults filled in and types checked."""

    gp: GPSettings
    fdr: FDRSettings
    filter: FilterSettings
    storage: StorageSettings
    output: OutputSettings
    compute: ComputeSettings

    @classmethod
    def of(cls, gp, fdr, filter, storage, output, compute) -> _Settings:  # noqa: A002
        if isinstance(output, str | os.PathLike):  # de(..., output="results.zarr")
            storage = _check_settings(storage, StorageSettings, "storage")
            if storage.results_store is not None and storage.results_store != os.fspath(output):
                raise SettingsError(
                    f"output={os.fspath(output)!r} and StorageSettings(results_store={storage.results_store!r}) name two "
                    "results stores; pass one of them."
                )
            storage, output = dataclasses.replace(storage, results_store=os.fspath(output)), None
        given = dict(gp=gp, fdr=fdr, filter=filter, storage=storage, output=output, compute=compute)
        types = dict(gp=GPSettings, fdr=FDRSettings, filter=FilterSettings, storage=StorageSettings,
                     output=OutputSettings, compute=ComputeSettings)
        return cls(**{name: _check_settings(given[name], types[name], name) for name in types})


def _check_settings(value: Any, cls: type, name: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name}= expects a kompot_dask.{cls.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class _Call:
    """What was asked: the comparison and where its inputs are in the store."""

    groupby: str
    condition1: Any
    condition2: Any
    layer: str | None
    obsm_key: str
    genes: list[str] | None
    sample_col: str | None = None

    def params(self, s: _Settings) -> dict[str, Any]:
        """The run record's ``params`` for this call and these settings."""
        return run_record.record_params(self.groupby, self.condition1, self.condition2, self.obsm_key,
                                        self.layer, self.genes, s.gp, s.fdr, s.filter, s.storage, s.output,
                                        s.compute, self.sample_col)


def _cell_filter_mask(obs: pd.DataFrame, cell_filter: Any) -> np.ndarray:
    n = len(obs)
    if cell_filter is None:
        return np.ones(n, dtype=bool)
    if isinstance(cell_filter, str):
        if cell_filter not in obs.columns:
            raise KeyError(f"FilterSettings.cell_filter: obs column {cell_filter!r} not found; available: {list(obs.columns)}")
        col = obs[cell_filter]
        if col.dtype != bool:
            raise TypeError(f"FilterSettings.cell_filter: obs column {cell_filter!r} must be boolean, got {col.dtype}")
        return col.to_numpy(dtype=bool)
    if isinstance(cell_filter, dict):
        mask = np.ones(n, dtype=bool)
        for col, values in cell_filter.items():
            if col not in obs.columns:
                raise KeyError(f"FilterSettings.cell_filter: obs column {col!r} not found; available: {list(obs.columns)}")
            vals = values if isinstance(values, list | tuple | set) else [values]
            mask &= obs[col].isin(list(vals)).to_numpy()
        return mask
    arr = np.asarray(cell_filter)
    if arr.dtype != bool or arr.shape != (n,):
        raise ValueError(f"FilterSettings.cell_filter array must be boolean with {n} entries, got dtype {arr.dtype} shape {arr.shape}")
    return arr


def _refuse_unsupported(**given: Any) -> None:
    """kompot's ``de`` arguments that kompot_dask does not implement: refused by name."""
    reasons = {
        "model": "prefitted kompot predictors cannot be distributed; kompot_dask fits its own model",
    }
    for name, value in given.items():
        if value is not None:
            raise SettingsError(f"{name}={value!r} is not supported: {reasons[name]}.")


def de(
    data: str | os.PathLike | ad.AnnData,
    groupby: str,
    condition1: Any,
    condition2: Any,
    obsm_key: str = "DM_EigenVectors",
    layer: str | None = None,
    genes: list[str] | None = None,
    sample_col: str | None = None,
    *,
    gp: GPSettings | None = None,
    fdr: FDRSettings | None = None,
    filter: FilterSettings | None = None,  # noqa: A002 - kompot's name
    storage: StorageSettings | None = None,
    output: OutputSettings | str | os.PathLike | None = None,
    compute: ComputeSettings | None = None,
    model: Any = None,
    client: Client | None = None,
    plan: planner.ResourcePlan | None = None,
    dry_run: bool = False,
    resume: bool = True,
) -> dict[str, Any] | ad.AnnData | planner.ResourcePlan | None:
    """Kompot differential expression between two conditions, computed on Dask.

    Parameters
    ----------
    data
        Path (or ``file://`` URL) of a zarr AnnData store, or an in-memory AnnData
        (small data; results are written into it like kompot does).
    groupby
        obs column holding the condition labels.
    condition1, condition2
        The two labels compared; fold changes are condition2 − condition1.
    obsm_key
        Cell-state embedding (cells × d).
    layer
        Expression layer (log scale); ``None`` uses X.
    genes
        Optional subset of var_names to test (store order is kept).
    sample_col
        obs column naming each cell's sample (donor, replicate): kompot's sample variance.
        Each condition's samples (of at least two cells) get their own model on the same
        landmarks; the spread of their predictions is added to the Mahalanobis covariance
        (per gene, as a low-rank term) and to the per-cell std, which is then written as
        layers. Field names get kompot's ``_sample_var`` suffix, and ``null_genes="auto"``
        means no null genes (as in kompot).
    model
        kompot's prefitted predictors (``ModelSettings``): not supported (a value raises).
    gp, fdr, filter, storage, output, compute
        Settings objects; see :mod:`kompot_dask` (``GPSettings``, ``FDRSettings``, ...).
        ``output`` may also be the path of a separate results store
        (``output="results.zarr"``, the same as ``StorageSettings(results_store=...)``):
        ``data`` is then only read, and the results and the run history go there.
    client
        Dask client; by default the current one, else an embedded LocalCluster.
    plan
        A :class:`~kompot_dask.ResourcePlan` from :func:`plan` for these same
        arguments: the run uses its chunking. Without one, ``de`` plans by itself (memory
        only, no timing calibration). An infeasible plan is refused before any compute.
    dry_run
        Plan only (same as :func:`plan`): returns the plan, computes and writes nothing.
    resume
        After an interrupted run of the same call on the same store (a killed client, a
        preempted job), reuse the gene blocks it finished; its results are identical to an
        uninterrupted run. ``False`` starts afresh (and discards what was kept).

    Returns
    -------
    ``None``, or with ``OutputSettings(return_full_results=True)`` a dict with ``table``
    (per-gene DataFrame), ``fdr_summary``, ``run_id``, ``field_names``, ``ls`` and ``landmarks``;
    with ``dry_run=True`` the :class:`~kompot_dask.ResourcePlan`.
    """
    settings = _Settings.of(gp, fdr, filter, storage, output, compute)
    check_process_context("kompot_dask.de", client, settings.compute)
    if not dry_run and may_run_in_process(client, settings.compute):
        limit_malloc_arenas()  # before the store's reader threads and the cluster's start
    _refuse_unsupported(model=model)
    out = settings.output
    data = _lazy_to_store(data, "kompot_dask.de", needs_memory=not out.inplace or out.copy,
                          results_store=settings.storage.results_store)
    with _results_target(data, settings.storage.results_store, "kompot_dask.de", keep=not dry_run) as data:
        return _de_on(data, _Call(groupby, condition1, condition2, layer, obsm_key, genes, sample_col), settings,
                      client, plan, dry_run, resume)


def _de_on(data, call, settings, client, plan, dry_run, resume):
    """:func:`de` once ``data`` is what the run reads and writes (a store path, the results
    store of a read-only input, or an in-memory AnnData)."""
    out = settings.output
    if (not out.inplace or out.copy) and not isinstance(data, ad.AnnData):
        field = "inplace=False" if not out.inplace else "copy=True"
        raise SettingsError(f"OutputSettings.{field} needs an in-memory AnnData: a store is always written in "
                            "place. Copy the store directory first, or use another StorageSettings.result_key.")
    if plan is not None and not isinstance(plan, planner.ResourcePlan):
        raise TypeError(f"plan= expects a ResourcePlan from kompot_dask.plan(...), got {type(plan).__name__}")
    if dry_run:
        return plan if plan is not None else _plan_public(data, call, settings, client)
    if not out.inplace or out.copy:  # the AnnData passed stays as it is
        data = data.copy()
        if not out.inplace and not out.return_full_results:  # the results are what is returned
            settings = dataclasses.replace(settings, output=dataclasses.replace(out, return_full_results=True))
    in_memory = isinstance(data, ad.AnnData)
    with run_store(data, call.layer) as store:
        run = _validate(store, call, settings, in_memory=in_memory,
                        existing_layers=list(data.layers.keys()) if in_memory else None)
        # A temporary store of an AnnData is this call's alone: no lease, nothing to resume.
        try:
            with contextlib.nullcontext() if in_memory else store_lock(store.path, "kompot_dask.de"):
                done = _de(run, client, plan, resume=resume and not in_memory)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not isinstance(exc, StoreDiskFullError):
                raise disk_full_error(store.path, exc) from exc
            raise
        if in_memory:
            copy_results(store, data, done.record.fields_written,
                         sorted({run_record.HISTORY_KEY, settings.storage.result_key}))
    if not out.inplace:  # the AnnData passed is unchanged; the results are returned
        return done.returned
    if out.copy:
        return data if done.returned is None else {**done.returned, "adata": data}
    return done.returned


def plan(
    data: str | os.PathLike | ad.AnnData,
    groupby: str,
    condition1: Any,
    condition2: Any,
    obsm_key: str = "DM_EigenVectors",
    layer: str | None = None,
    genes: list[str] | None = None,
    sample_col: str | None = None,
    *,
    gp: GPSettings | None = None,
    fdr: FDRSettings | None = None,
    filter: FilterSettings | None = None,  # noqa: A002 - kompot's name
    storage: StorageSettings | None = None,
    output: OutputSettings | str | os.PathLike | None = None,
    compute: ComputeSettings | None = None,
    client: Client | None = None,
) -> planner.ResourcePlan:
    """What :func:`de` with these arguments will need on this cluster, and how it will cut
    the work. Computes and writes nothing but a few seconds of timed kernels on the workers.

    Without ``client`` (and no current client), the LocalCluster that ``de`` would start is
    started for the calibration and closed again.
    """
    settings = _Settings.of(gp, fdr, filter, storage, output, compute)
    check_process_context("kompot_dask.plan", client, settings.compute)
    data = _lazy_to_store(data, "kompot_dask.plan", results_store=settings.storage.results_store)
    with _results_target(data, settings.storage.results_store, "kompot_dask.plan", keep=False) as data:
        return _plan_public(data, _Call(groupby, condition1, condition2, layer, obsm_key, genes, sample_col), settings,
                            client)


@contextlib.contextmanager
def _results_target(data: Any, results_store: str | None, what: str, keep: bool = True) -> Iterator[Any]:
    """``data``, or with a results store that store's path (:func:`_to_results_store`). A
    results store that this call creates is removed again if the call fails before a run
    wrote anything there (or, with ``keep=False``, whenever it stays empty: a plan)."""
    if results_store is None:
        yield data
        return
    target = results_store.removeprefix("file://")
    existed = os.path.exists(target)
    path = _to_results_store(data, results_store, what)
    try:
        yield path
    except BaseException:
        if not existed:
            discard_unused_results_store(path)
        raise
    if not keep and not existed:
        discard_unused_results_store(path)


def _to_results_store(data: Any, results_store: str | None, what: str) -> Any:
    """With a results store, the run's store is that one (created for the input store
    ``data`` on first use), which reads the input's expression and embedding."""
    if results_store is None:
        return data
    if isinstance(data, ad.AnnData):
        raise SettingsError(
            f"{what}: a results store (output={results_store!r} / StorageSettings.results_store) is for an input "
            "store that is only read; an in-memory AnnData receives its results itself. Pass the input store's "
            "path as the data, or drop the results store."
        )
    path = results_store_for(data, results_store)
    logger.info("Reading the input store %s (never written); results and run history go to %s",
                os.fspath(data), path)
    return path


def _lazy_to_store(data: Any, what: str, needs_memory: bool = False, results_store: str | None = None) -> Any:
    """An AnnData read lazily from a zarr store (``anndata.experimental.read_lazy``, or
    matrices as dask arrays over one store) becomes that store's path: the run reads it
    out of core and writes its results there, never loading it into memory."""
    if not isinstance(data, ad.AnnData):
        return data
    path = lazy_store_path(data)
    lazy = path is not None or not isinstance(data.obs, pd.DataFrame) or _has_dask_matrix(data)
    if not lazy:
        return data
    if path is None:
        raise TypeError(
            f"{what} got an AnnData whose matrices are lazy but not all read from one zarr store, so it can be "
            "neither traced back to its store nor computed without loading it. Pass the store path "
            "(kompot_dask.de('atlas.zarr', ...)), or an in-memory AnnData (adata.to_memory())."
        )
    if needs_memory:
        raise SettingsError(
            f"OutputSettings(copy=True) / inplace=False need an in-memory AnnData, but this one was read lazily "
            f"from {path}, which a run writes in place. Copy the store and pass its path, or pass "
            "adata.to_memory()."
        )
    if results_store is None:
        logger.info("The AnnData was read lazily from %s: computing on that store out of core; the results are "
                    "written into it (read it again to see them).", path)
    else:
        logger.info("The AnnData was read lazily from %s: computing on that store out of core.", path)
    return path


def _has_dask_matrix(adata: ad.AnnData) -> bool:
    import dask.array as da

    return any(isinstance(m, da.Array) for m in (adata.X, *(adata.layers[k] for k in adata.layers.keys())))


def _plan_public(data: Any, call: _Call, settings: _Settings, client: Client | None) -> planner.ResourcePlan:
    """validate → plan, with the timed calibration."""
    in_memory = isinstance(data, ad.AnnData)
    with run_store(data, call.layer) as store:
        run = _validate(store, call, settings, in_memory=in_memory,
                        existing_layers=list(data.layers.keys()) if in_memory else None)
        # the calibration times the kernels under the run's own worker settings
        with resolve_client(client, settings.compute, store.n_obs * store.n_vars) as c, worker_runtime(c):
            return _make_plan(run, c, timed=True)


# --------------------------------------------------------------------------------------
# validate


@dataclass(frozen=True)
class _Cells:
    """The run's cells and genes: the embedding, the masks and the tested store columns."""

    embedding: np.ndarray | EmbeddingReader  # obsm[obsm_key]: a band reader when dense in the store
    filter_mask: np.ndarray  # FilterSettings.cell_filter: the cells the model predicts at
    mask1: np.ndarray  # condition 1, within the filter
    mask2: np.ndarray  # condition 2, within the filter
    selected: np.ndarray  # store columns of the genes tested
    samples: engine.SampleSpec | None = None  # sample_col: the samples fitted for the sample variance
    subsets: _groups.Subsets | None = None  # FilterSettings.groups, within the filter (≥ 2 cells each)
    underrepresentation: dict[str, list[Any]] = field(default_factory=dict)
    auto_filtered: bool = False  # check_representation=True left underrepresented cells out

    @property
    def n1(self) -> int:
        return int(self.mask1.sum())

    @property
    def n2(self) -> int:
        return int(self.mask2.sum())


@dataclass(frozen=True)
class _Outputs:
    """The fields the run writes: their names by role and which roles it writes."""

    names: dict[str, str]
    roles: list[str]
    layer_roles: list[str]
    n_null: int  # null genes drawn and scored (0: none)
    external_null: np.ndarray | None = None  # FDRSettings.null_mahalanobis
    n_external: int = 0  # FDRSettings.null_expression's columns, scored after the null genes

    @property
    def use_fdr(self) -> bool:
        """Whether the raw (kompot) FDR is computed: null genes, given null expression or
        given null distances."""
        return self.n_null > 0 or self.n_external > 0 or self.external_null is not None

    def null_distances(self, internal: np.ndarray) -> np.ndarray:
        """What the FDR tests against: the null genes' distances, the given ones, or both."""
        if self.external_null is None:
            return internal
        return np.concatenate([internal, self.external_null]) if self.n_null else self.external_null

    def by_role(self) -> dict[str, str]:
        return {r: self.names[r] for r in self.roles}


@dataclass(frozen=True)
class _Earlier:
    """What earlier runs left in the store: the history, its field tracking, and the output
    fields of this run that already exist."""

    uns_entry: dict[str, Any]
    history: list[dict]
    tracking: dict
    existing: list[tuple[str, str]]  # (location, name)


@dataclass(frozen=True)
class _Run:
    """A validated call: everything known before any worker is involved."""

    store: Store
    info: LayerInfo
    call: _Call
    settings: _Settings
    cells: _Cells
    outputs: _Outputs
    earlier: _Earlier
    landmarks: Landmarks
    in_memory: bool = False
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each step of the run as it goes (kept in the run record)."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = round(self.phase_seconds.get(name, 0.0) + time.perf_counter() - t, 3)

    def previous_run(self) -> run_record.RunRecord | None:
        """The record of the run that last wrote this result_key (else the latest run)."""
        history = self.earlier.history
        prev_id = self.earlier.tracking.get("uns", {}).get(self.settings.storage.result_key)
        prev = next((h for h in history if h.get("run_id") == prev_id), history[-1] if history else None)
        return None if prev is None else run_record.RunRecord.from_dict(prev)


def _validate(store: Store, call: _Call, settings: _Settings, *, existing_layers: list[str] | None = None,
              in_memory: bool = False) -> _Run:
    """Everything that can be checked without touching the expression layer, before any compute."""
    _check_conditions(store.obs, call)
    info = store.layer_info(call.layer)
    embedding = _read_embedding(store, call.obsm_key)
    call = dataclasses.replace(call, genes=_genes_list(call.genes))
    cells = _cells(store, call, settings, embedding)
    gp = settings.gp
    if gp.landmarks is not None and gp.landmarks.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"GPSettings.landmarks has {gp.landmarks.shape[1]} columns but obsm[{call.obsm_key!r}] has {embedding.shape[1]}"
        )
    store.check_writable()
    outputs = _outputs(store, call, settings)
    earlier = _earlier(store, outputs, existing_layers)
    landmarks = landmarks_for(gp.n_landmarks, cells.n1 + cells.n2,
                              None if gp.landmarks is None else gp.landmarks.shape[0])
    return _Run(store, info, call, settings, cells, outputs, earlier, landmarks, in_memory)


def _check_conditions(obs: pd.DataFrame, call: _Call) -> None:
    groupby, condition1, condition2 = call.groupby, call.condition1, call.condition2
    if groupby not in obs.columns:
        raise KeyError(f"obs column {groupby!r} (groupby) not found; available columns: {list(obs.columns)}; pass groupby= one of these")
    if condition1 == condition2:
        raise ValueError(f"condition1 and condition2 are both {condition1!r}; pass two different values of obs[{groupby!r}]")
    labels = obs[groupby]
    present = list(pd.unique(labels.dropna()))
    for name, cond in (("condition1", condition1), ("condition2", condition2)):
        if not (labels == cond).any():
            raise ValueError(f"{name}={cond!r} is not a value of obs[{groupby!r}]; available values: {present}; pass {name}= one of these")


def _read_embedding(store: Store, obsm_key: str) -> np.ndarray | EmbeddingReader:
    """A dense embedding in the store as a band reader (no process holds it whole), any
    other encoding read into memory."""
    reader = store.embedding_reader(obsm_key)
    X_raw = reader if reader is not None else store.read_obsm(obsm_key)
    if X_raw.ndim != 2 or X_raw.shape[0] != store.n_obs:
        raise ValueError(f"obsm[{obsm_key!r}] has shape {X_raw.shape}; expected ({store.n_obs}, d)")
    if not np.issubdtype(X_raw.dtype, np.number):
        raise TypeError(f"obsm[{obsm_key!r}] has dtype {X_raw.dtype}; expected a numeric embedding")
    return X_raw


def _genes_list(genes: Any) -> list[str] | None:
    if genes is None:
        return None
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("genes= is an empty list; pass at least one var name, or genes=None to test all genes")
    return genes


def _finite_rows(embedding: np.ndarray | EmbeddingReader) -> np.ndarray:
    """Whether each cell's coordinates are all finite (a stored embedding band by band)."""
    if not isinstance(embedding, EmbeddingReader):
        return np.all(np.isfinite(embedding), axis=1)
    out = np.empty(len(embedding), dtype=bool)
    for r0, r1, rows in embedding.bands():
        out[r0:r1] = np.all(np.isfinite(rows), axis=1)
    return out


def _cells(store: Store, call: _Call, settings: _Settings, embedding: np.ndarray | EmbeddingReader) -> _Cells:
    obs, var, genes, filt = store.obs, store.var, call.genes, settings.filter
    if genes is not None:
        unknown = [g for g in genes if g not in var.index]
        if unknown:
            raise KeyError(f"genes= names {len(unknown)} gene(s) not in var_names: {unknown[:20]}; check spelling or var_names")
        selected = np.flatnonzero(var.index.isin(genes))
    else:
        selected = np.arange(store.n_vars)
    filter_mask = _cell_filter_mask(obs, filt.cell_filter)
    subsets, underrep, auto = _subsets(obs, call, filt)
    if auto is not None:
        filter_mask = filter_mask & auto
    # Only the filtered cells enter the model (fits, predictions, stds), so only they must be finite.
    bad_rows = filter_mask & ~_finite_rows(embedding)
    if bad_rows.any():
        raise ValueError(
            f"obsm[{call.obsm_key!r}] holds NaN or inf in {int(bad_rows.sum())} cell(s) "
            f"(first: {list(obs.index[bad_rows][:5])}); fix or filter these cells (FilterSettings(cell_filter=...))."
        )
    labels = obs[call.groupby]
    mask1 = (labels == call.condition1).to_numpy() & filter_mask
    mask2 = (labels == call.condition2).to_numpy() & filter_mask
    for i, (cond, mask) in enumerate(((call.condition1, mask1), (call.condition2, mask2)), start=1):
        if mask.sum() < filt.min_cells:
            raise ValueError(
                f"condition{i}={cond!r} has {int(mask.sum())} cell(s) after filtering; at least "
                f"{filt.min_cells} are needed (FilterSettings.min_cells). Relax the cell filter or pick another condition."
            )
    samples = None
    if call.sample_col is not None:
        samples = _sample_spec(obs, call, mask1, mask2, settings.output.allow_single_condition_variance,
                               settings.gp.use_empirical_variance)
        if settings.fdr.mode == "calibrated":
            _relabel_samples(samples, call, settings.fdr)  # refused here when too few relabellings exist
    if settings.fdr.null_expression is not None:
        for i, (part, mask) in enumerate(zip(settings.fdr.null_expression, (mask1, mask2), strict=True), start=1):
            if part.shape[0] != int(mask.sum()):
                cond = call.condition1 if i == 1 else call.condition2
                raise SettingsError(
                    f"FDRSettings.null_expression: expr{i} has {part.shape[0]} rows, but condition{i}={cond!r} has "
                    f"{int(mask.sum())} cells (after the cell filter). Give one row per cell of the condition, in "
                    "the store's order."
                )
    if subsets is not None:
        subsets = _in_filter(subsets, filter_mask)
    return _Cells(embedding, filter_mask, mask1, mask2, selected, samples, subsets, underrep, auto is not None)


def _subsets(obs: pd.DataFrame, call: _Call, filt: FilterSettings
             ) -> tuple[_groups.Subsets | None, dict[str, list[Any]], np.ndarray | None]:
    """``FilterSettings.groups`` as named subsets, the conditions underrepresented in each
    (checked, as kompot does, only when no cell_filter is given), and with
    ``check_representation=True`` the cells that stay (the underrepresented (subset,
    condition) pairs' cells left out), else None."""
    if filt.groups is None:
        return None, {}, None
    subsets = _groups.parse_groups(obs, filt.groups)
    if filt.check_representation is False or filt.cell_filter is not None:
        return subsets, {}, None
    logger.info("Checking for underrepresentation on the full dataset")
    labels = obs[call.groupby]
    low = _groups.underrepresented(subsets, labels, (call.condition1, call.condition2), filt.min_cells,
                                   filt.min_percentage, warn=filt.check_representation is None)
    if not low:
        return subsets, {}, None
    if filt.check_representation is None:
        logger.warning("Please pass `check_representation=True` to enable filtering out these underrepresented groups.")
        return subsets, low, None
    keep = np.ones(len(obs), dtype=bool)
    values = labels.to_numpy()
    for name, conds in low.items():
        mask = subsets.masks[subsets.names.index(name)]
        for cond in conds:
            keep &= ~(mask & (values == cond))
        logger.info("  - Group '%s': underrepresented conditions %s: their cells are left out", name, conds)
    logger.info("Automatically applying the underrepresentation filter (%s cells left out)", f"{int((~keep).sum()):,}")
    return subsets, low, keep


def _in_filter(subsets: _groups.Subsets, filter_mask: np.ndarray) -> _groups.Subsets:
    """Each subset within the cells the run predicts at; subsets of fewer than 2 cells are skipped (kompot)."""
    masks = subsets.masks & filter_mask[None, :]
    counts = masks.sum(axis=1)
    for name, n in zip(subsets.names, counts, strict=True):
        if n < 2:
            logger.warning("Subset '%s' has fewer than 2 cells (%d). Skipping analysis.", name, n)
    keep = counts >= 2
    if not keep.any():
        raise ValueError(
            f"FilterSettings.groups: none of the subsets {list(subsets.names)} has 2 or more cells within the cell "
            "filter, so there is nothing to report per group. Check the groups and the cell filter."
        )
    logger.info("Identified %s subset(s): %s", f"{int(keep.sum()):,}",
                ", ".join(n for n, k in zip(subsets.names, keep, strict=True) if k))
    return _groups.Subsets(tuple(n for n, k in zip(subsets.names, keep, strict=True) if k), masks[keep],
                           subsets.description)


MIN_SAMPLE_CELLS = 2
"""Cells a sample needs in a condition to get its own model (kompot's ``min_cells``)."""


def _sample_spec(obs: pd.DataFrame, call: _Call, mask1: np.ndarray, mask2: np.ndarray,
                 allow_single: bool, empirical: bool = False) -> engine.SampleSpec:
    """kompot's sample variance: within each condition, one model per sample with at least
    two cells; a condition needs two such samples, or (allow_single_condition_variance) the
    other condition's samples stand in for its variance. With the empirical variance every
    sample gets a model, a one-cell sample too (each cell's residual comes from its own
    sample's model, as in kompot), but only those with two or more cells make the sample
    variance."""
    col = call.sample_col
    if not isinstance(col, str) or col not in obs.columns:
        raise KeyError(f"sample_col={col!r}: obs column not found; available columns: {list(obs.columns)}; "
                       "pass the obs column that names each cell's sample (donor, replicate)")
    values = obs[col]
    group = np.full(len(obs), -1, dtype=np.int32)
    labels: list[str] = []
    condition: list[int] = []
    used: dict[int, list[int]] = {1: [], 2: []}
    spread: list[int] = []  # per fitted sample: its condition if it makes the sample variance, else 0
    for c, (cond, mask) in enumerate(((call.condition1, mask1), (call.condition2, mask2)), start=1):
        missing = mask & values.isna().to_numpy()
        if missing.any():
            raise ValueError(
                f"obs[{col!r}] (sample_col) is missing for {int(missing.sum())} cell(s) of condition{c}={cond!r} "
                f"(first: {list(obs.index[missing][:5])}); fill it in, or leave these cells out with "
                "FilterSettings(cell_filter=...)"
            )
        group[mask] = c - 1
        names, codes, counts = np.unique(values[mask].astype(str).to_numpy(), return_inverse=True,
                                         return_counts=True)
        rows = np.flatnonzero(mask)
        logger.info("Found %d unique sample(s) in condition %d", len(names), c)
        for j, (name, count) in enumerate(zip(names, counts, strict=True)):
            if count < MIN_SAMPLE_CELLS and not empirical:
                logger.warning("Skipping sample %s of condition %d (only %d cells < %d)", name, c, count,
                               MIN_SAMPLE_CELLS)
                continue
            if count < MIN_SAMPLE_CELLS:
                logger.warning("Sample %s of condition %d has only %d cell(s) (< %d): left out of the sample "
                               "variance; its own model still gives its cells' residuals (empirical variance)",
                               name, c, count, MIN_SAMPLE_CELLS)
            group[rows[codes == j]] = 2 + len(labels)
            if count >= MIN_SAMPLE_CELLS:
                used[c].append(len(labels))
            spread.append(c if count >= MIN_SAMPLE_CELLS else 0)
            labels.append(f"{cond}: {name}")
            condition.append(c)
    for c, other in ((1, 2), (2, 1)):
        if len(used[c]) >= 2:
            continue
        cond = call.condition1 if c == 1 else call.condition2
        if allow_single and len(used[other]) >= 2:
            logger.info("Using condition %d's sample variance for both conditions", other)
            continue
        raise ValueError(
            f"sample_col={col!r}: condition{c}={cond!r} has {len(used[c])} sample(s) with at least "
            f"{MIN_SAMPLE_CELLS} cells; the sample variance needs 2. Pass "
            "OutputSettings(allow_single_condition_variance=True) to use the other condition's sample variance for "
            "it, or run without sample_col."
        )
    use1, use2 = engine.labelling_uses(spread, len(labels))
    logger.info("Using sample column '%s' for sample variance estimation", col)
    return engine.SampleSpec(group, tuple(labels), tuple(condition), use1, use2)


def _outputs(store: Store, call: _Call, settings: _Settings) -> _Outputs:
    """The output fields, checked for collisions between the two labels and for names the
    store cannot hold."""
    rk, c1, c2 = settings.storage.result_key, call.condition1, call.condition2
    sampled = call.sample_col is not None
    names = run_fields.output_field_names(rk, c1, c2, sample_variance=sampled)
    if run_fields.sanitize_name(c1) == run_fields.sanitize_name(c2):
        raise ValueError(
            f"condition1={c1!r} and condition2={c2!r} both become "
            f"{run_fields.sanitize_name(c1)!r} in field names (' ', '-', '.', '/' are written as '_'), "
            f"so their results would overwrite each other. Rename one of the two labels in obs[{call.groupby!r}]."
        )
    scored, fdr = settings.output.compute_mahalanobis, settings.fdr
    external = fdr.null_mahalanobis if scored else None
    # kompot: no distance, no FDR; given null distances replace the null genes unless combined
    n_null = (fdr.resolved_null_genes(sampled) if scored and (external is None or fdr.combine_with_internal)
              else 0)
    n_external = 0 if fdr.null_expression is None or not scored else int(fdr.null_expression[0].shape[1])
    extra = settings.storage.store_additional_stats
    roles = (["mahalanobis"] if scored else []) + (["neg_log10_ptp"] if scored and extra else [])
    roles += ["mean_lfc"] + ([] if sampled else ["std1", "std2"])
    if n_null > 0 or n_external > 0 or external is not None:
        roles += ["local_fdr", "is_de"] + (["pvalue", "tail_fdr"] if extra else [])
    if fdr.mode == "variance_stratified":
        _check_fdr_mode(call, settings, n_null + n_external)
        roles += ["residual_z", "residual_local_fdr"] + (["residual_tail_fdr"] if extra else [])
    elif fdr.mode == "calibrated":
        _check_fdr_mode(call, settings, n_null + n_external)
        roles += [] if "is_de" in roles else ["is_de"]
        roles += ["permuted_mahalanobis", "calibrated_score", "calibrated_local_fdr"]
        roles += ["calibrated_tail_fdr"] if extra else []
    layer_roles = ["imputed1", "imputed2", "fold_change"] if settings.storage.store_layers else []
    layer_roles += ["fold_change_zscores"] if layer_roles and extra else []
    layer_roles += ["sample_std1", "sample_std2"] if layer_roles and sampled else []
    roles += layer_roles
    if settings.storage.store_posterior_covariance:
        if sampled:
            raise SettingsError(
                f"StorageSettings(store_posterior_covariance=True) with sample_col={call.sample_col!r}: with the "
                "sample variance the covariance is per gene (a cells × cells matrix per gene), which kompot cannot "
                "store either. Drop one of the two."
            )
        roles += ["posterior_covariance"]
    if settings.filter.groups is not None:  # kompot's varm tables: FDR only from null genes
        roles += ["group_mean_lfc"] + (["group_mahalanobis"] if scored else [])
        roles += ["group_local_fdr", "group_is_de"] if n_null + n_external > 0 else []
        roles += ["group_neg_log10_ptp"] if scored and extra else []
    store.check_new_field_names(
        [(run_fields.FIELD_LOCATIONS[r], names[r]) for r in roles] + [("uns", rk)],
        "Use a shorter or plainer StorageSettings(result_key=...) or rename the condition labels.",
    )
    return _Outputs(names, roles, layer_roles, n_null, external, n_external)


def _check_fdr_mode(call: _Call, settings: _Settings, n_null: int) -> None:
    """FDRSettings(mode="variance_stratified") needs null genes of its own; both it and
    mode="calibrated" apply to the run's main columns only."""
    fdr = settings.fdr
    what = None
    if not settings.output.compute_mahalanobis:
        what = "OutputSettings(compute_mahalanobis=False): there are no distances to calibrate"
    elif fdr.mode == "calibrated" and settings.gp.use_empirical_variance:
        what = "GPSettings(use_empirical_variance=True): the permuted labels' fit has no empirical variance yet"
    elif fdr.mode == "variance_stratified" and n_null == 0:
        what = (f"sample_col={call.sample_col!r}: there are no null genes with the sample variance"
                if call.sample_col is not None else
                f"FDRSettings(null_genes={fdr.null_genes!r}): the trend is fitted on the null genes' distances")
    elif settings.filter.groups is not None:
        what = (f"FilterSettings(groups={_short(settings.filter.groups)}): the per-subset FDR tables are "
                "kompot's raw mode only")
    if what is not None:
        raise SettingsError(f"FDRSettings(mode={fdr.mode!r}) with {what}. Use mode='raw' (the default), "
                            "or drop the other setting.")


def _earlier(store: Store, outputs: _Outputs, existing_layers: list[str] | None) -> _Earlier:
    uns_entry = store.read_uns_json(run_record.HISTORY_KEY)
    present = {"var": set(store.field_names("var")), "obs": set(store.field_names("obs")),
               "layers": set(store.field_names("layers") if existing_layers is None else existing_layers),
               "varm": set(store.field_names("varm")), "obsp": set(store.field_names("obsp"))}
    where = run_fields.FIELD_LOCATIONS
    existing = [(where[r], outputs.names[r]) for r in outputs.roles if outputs.names[r] in present[where[r]]]
    return _Earlier(uns_entry, run_record.load_history(uns_entry), run_record.load_field_tracking(uns_entry),
                    existing)


# --------------------------------------------------------------------------------------
# The steps after validation


@dataclass
class _Computed:
    """What the execute step hands on: the engine's results, the model, where its layers
    are staged, and the cluster it ran on."""

    result: engine.EngineResult
    ls: float
    landmarks: np.ndarray
    landmark_source: str
    staging: io_commit.Staging
    n_workers: int


@dataclass
class _Results:
    """The record step's output: the fields to commit, the FDR, and the run record."""

    var_columns: dict[str, np.ndarray]
    obs_columns: dict[str, np.ndarray]
    layers: dict[str, str]  # field name -> staged array
    fdr: fdr_mod.FDRResult | None
    record: run_record.RunRecord | None = None  # set by the record step
    varm: dict[str, pd.DataFrame] = field(default_factory=dict)  # per-subset tables (groups)
    obsp: dict[str, str] = field(default_factory=dict)  # field name -> staged matrix (posterior covariance)
    raw_fdr: fdr_mod.FDRResult | None = None  # kompot's raw-mode FDR, when is_de comes from another mode


@dataclass
class _Done:
    record: run_record.RunRecord
    returned: dict[str, Any] | None


def _de(run: _Run, client: Client | None, plan: planner.ResourcePlan | None, resume: bool) -> _Done:
    """plan → execute → record → commit, under the store's lease."""
    t_start = time.perf_counter()
    _check_overwrites(run)
    c1, c2 = run.call.condition1, run.call.condition2
    logger.info("Condition 1 (%s): %s cells", c1, f"{run.cells.n1:,}")
    logger.info("Condition 2 (%s): %s cells", c2, f"{run.cells.n2:,}")
    with ExitStack() as stack:
        with run.phase("cluster start"):
            c = stack.enter_context(resolve_client(client, run.settings.compute,
                                                   run.store.n_obs * run.store.n_vars))
        environment = run_record.environment_info(c)  # now: version skew shows before the long run
        with run.phase("plan"):
            plan = _plan_for_run(run, c, plan)
        computed = _execute(run, c, plan, resume)
    _announce(plan, "FDR and commit", "Computing the FDR and writing the results")
    with run.phase("FDR and record"):
        results = _record(run, computed, plan, environment, t_start)
    t_commit = time.perf_counter()
    _commit(run, computed, results)
    logger.debug("Commit took %.2f s", time.perf_counter() - t_commit)
    return _Done(results.record, _returned(run, computed, results))


# --------------------------------------------------------------------------------------
# execute


def _execute(run: _Run, client: Client, plan: planner.ResourcePlan, resume: bool) -> _Computed:
    """The model (length scale, landmarks) and the engine's tasks, in a staging directory
    that a failed run keeps for a resume or discards (:func:`_keep_or_discard`)."""
    store, cells = run.store, run.cells
    rows1, rows2 = np.flatnonzero(cells.mask1), np.flatnonzero(cells.mask2)
    if isinstance(cells.embedding, EmbeddingReader):
        # Read band by band, in the client (the model's samples) as on the workers.
        X = cells.embedding
        X1, pooled = RowSubset(X, rows1), RowSubset(X, np.concatenate([rows1, rows2]))
    else:
        X = np.ascontiguousarray(cells.embedding, dtype=np.float64)
        X1, pooled = cells.embedding[rows1], np.vstack([X[rows1], X[rows2]])
    fingerprint = _fingerprint(run)
    staging, saved = io_commit.open_run_staging(store.path, fingerprint, resume)
    try:
        if saved is not None:
            ls, Z, landmark_source = float(saved["ls"]), saved["Z"], saved["landmark_source"]
            layout = make_layout(store.n_obs, store.n_vars, plan.resources.total_threads, **saved["layout"])
            logger.info("Resuming the interrupted run of this call kept in %s", staging.path)
        else:
            gp = run.settings.gp
            _announce(plan, "landmarks and length scale", "Choosing the landmarks and the length scale")
            with run.phase("length scale and landmarks"):
                ls, Z, landmark_source = engine.prepare_model(
                    client, X1, pooled, ls=gp.ls,
                    ls_factor=gp.ls_factor, landmarks=run.landmarks, given=gp.landmarks,
                    random_state=gp.random_state, neighbors=gp.neighbors, neighbor_sample=gp.neighbor_sample,
                    landmark_sample=gp.landmark_sample,
                )
            engine.trim_heap()  # what k-means and the neighbour search freed, before the fit's m × m arrays
            layout = plan.layout
            io_commit.save_run_state(staging, fingerprint, {"ls": ls, "landmark_source": landmark_source,
                                                            "layout": _layout_state(layout)}, Z)
        _announce(plan, "fit (S and factors)", "Fitting both conditions' models on the workers")
        _announce(plan, "gene and null blocks, std", "Scoring the gene and null-gene blocks")
        res = _run_engine(run, client, X, Z, ls, layout, staging)
        for stage, seconds in res.wall_seconds.items():
            run.phase_seconds[f"engine: {stage}"] = seconds
    except engine.NonFiniteExpressionError as exc:
        staging.remove()
        raise engine.NonFiniteExpressionError(
            exc.columns, [str(store.var.index[i]) for i in exc.columns], exc.as_null_source
        ) from None
    except BaseException as exc:
        _keep_or_discard(staging, exc)
        raise
    n_workers = len(cluster_workers(client))
    return _Computed(res, ls, Z, landmark_source, staging, n_workers)


TIMED_PLAN_FLOPS = 1e11
"""A run of at least this many flops (a few seconds of work) plans with timed kernels."""
ANNOUNCE_SECONDS = 2.0
"""Steps the plan expects to take at least this long are announced with that estimate."""


def _announce(plan: planner.ResourcePlan | None, phase: str, what: str) -> None:
    """Say that a long step starts and how long the plan expects it to take (a batch log
    then shows what the run is doing between its progress lines)."""
    seconds = None if plan is None else (plan.phase_seconds or {}).get(phase)
    if seconds is None:
        logger.debug("%s", what)
    elif seconds >= ANNOUNCE_SECONDS:
        logger.info("%s: expected ~%s (the plan's estimate)", what, format_time(seconds))


def _layout_state(layout: Layout) -> dict[str, int]:
    """The chunk sizes a resumed run cuts its work with (the staged tiles follow them)."""
    return {"cell_chunk": layout.cell_chunk, "gene_block": layout.gene_block,
            "null_gene_block": layout.null_gene_block, "kernel_chunk": layout.kernel_chunk}


def _group_spec(run: _Run, X: np.ndarray | EmbeddingReader, Z: np.ndarray) -> engine.GroupSpec | None:
    """Each subset's cells and the points of its Mahalanobis covariance: k-means landmarks
    of the subset (as many as the run's, with its seed) when it has more cells than that,
    else the subset's cells (kompot's rule)."""
    subsets = run.cells.subsets
    if subsets is None:
        return None
    gp, m = run.settings.gp, Z.shape[0]
    rows, points = [], []
    for name, mask in zip(subsets.names, subsets.masks, strict=True):
        r = np.flatnonzero(mask)
        cells = RowSubset(X, r) if isinstance(X, EmbeddingReader) else X[r]
        if len(r) > m:
            logger.info("Subset '%s' has %s cells, more than the %s landmarks. Computing new landmarks.", name,
                        f"{len(r):,}", f"{m:,}")
            pts = gp_numerics.compute_landmarks(cells, m, gp.random_state, gp.landmark_sample)
        else:
            pts = np.asarray(cells, dtype=np.float64)
        rows.append(r)
        points.append(np.ascontiguousarray(pts, dtype=np.float64))
    return engine.GroupSpec(subsets.names, tuple(rows), tuple(points))


def _run_engine(run: _Run, client: Client, X: np.ndarray, Z: np.ndarray, ls: float, layout: Layout,
                staging: io_commit.Staging) -> engine.EngineResult:
    cells, s, outputs = run.cells, run.settings, run.outputs
    codes = np.zeros(run.store.n_obs, dtype=np.int8)
    codes[cells.mask1] = 1
    codes[cells.mask2] = 2
    if outputs.use_fdr:
        null_sources, null_seeds = fdr_mod.choose_null_genes(run.store.n_vars, outputs.n_null, s.fdr.null_seed)
    else:
        null_sources = null_seeds = np.array([], dtype=np.int64)
    if outputs.n_external:
        logger.info("Appended %d external null expression column(s) (FDRSettings.null_expression) to the null genes",
                    outputs.n_external)
    permuted = permuted_samples = None
    if s.fdr.mode == "calibrated" and cells.samples is not None:
        permuted_samples, permuted = _sample_relabellings(run, codes)
    elif s.fdr.mode == "calibrated":
        permuted, k = fdr_mod.neighbourhood_permutations(codes, X, Z, s.fdr.null_neighbourhood_cells, s.fdr.null_seed,
                                                         s.fdr.null_permutations)
        logger.info("Calibrated FDR: condition labels permuted %d time(s) within %d neighbourhoods of ~%d cells",
                    s.fdr.null_permutations, k, s.fdr.null_neighbourhood_cells)
    with worker_runtime(client):
        return engine.run_engine(
            client, run.store, run.info, X=X, codes=codes, pred=cells.filter_mask, selected=cells.selected, Z=Z,
            ls=ls, sigma=s.gp.sigma, eps=s.gp.eps, null_sources=null_sources, null_seeds=null_seeds,
            layer_names={r: outputs.names[r] for r in outputs.layer_roles}, layer_dtype=s.storage.layer_dtype,
            dtype=s.compute.dtype, layout=layout, progress=s.output.progress, staging=staging,
            samples=cells.samples, need_std=cells.samples is None or bool(outputs.layer_roles),
            empirical=s.gp.use_empirical_variance, groups=_group_spec(run, X, Z),
            posterior_covariance=outputs.names["posterior_covariance"] if "posterior_covariance" in outputs.roles
            else None, permuted_codes=permuted, permuted_samples=permuted_samples,
            null_expression=s.fdr.null_expression if outputs.n_external else None,
        )


def _relabel_samples(spec: engine.SampleSpec, call: _Call, fdr: FDRSettings) -> tuple[np.ndarray, float]:
    """The samples' relabellings (:func:`kompot_dask._numerics.fdr.sample_permutations`), or
    a SettingsError naming the setting when fewer exist than asked for."""
    try:
        return fdr_mod.sample_permutations(spec.condition, fdr.null_permutations, fdr.null_seed)
    except ValueError as exc:
        raise SettingsError(
            f"FDRSettings(mode='calibrated', null_permutations={fdr.null_permutations}) with "
            f"sample_col={call.sample_col!r}: {exc}. Ask for fewer permutations, or use data with more samples "
            "per condition."
        ) from None


def _sample_relabellings(run: _Run, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sample_col with FDRSettings(mode="calibrated"): whole samples' condition labels
    permuted between the conditions (:func:`kompot_dask._numerics.fdr.sample_permutations`),
    per fitted sample and per cell (cells outside every fitted sample keep their label)."""
    spec = run.cells.samples
    labels, leak = _relabel_samples(spec, run.call, run.settings.fdr)
    cell_codes = np.repeat(codes[None, :], labels.shape[0], axis=0)
    for k in range(spec.n_samples):
        cell_codes[:, spec.cell_group == 2 + k] = labels[:, k : k + 1]
    logger.info("Calibrated FDR: whole samples' condition labels permuted %d time(s) between the conditions (%d + %d "
                "samples; a relabelled contrast keeps %.0f%% of a real effect)", labels.shape[0],
                spec.condition.count(1), spec.condition.count(2), 100 * abs(leak))
    return labels, cell_codes


def _fingerprint(run: _Run) -> str:
    """What makes two calls the same run: their parameters and the state of their inputs."""
    params = run.call.params(run.settings)
    params.pop("output", None)  # progress bars and return values do not change the results
    store = run.store
    digest = hashlib.sha256()
    digest.update(json.dumps([params, store.path, store.n_obs, store.n_vars,
                              store.element_signature(run.info.elem_path),
                              store.element_signature(f"obsm/{run.call.obsm_key}"),
                              store.element_signature(f"obs/{run.call.groupby}"),
                              store.element_signature(f"obs/{run.call.sample_col}") if run.call.sample_col else None],
                             sort_keys=True, default=str).encode())
    subsets = run.cells.subsets
    for arr in (run.settings.gp.landmarks, run.cells.filter_mask, None if subsets is None else subsets.masks):
        if arr is not None:
            digest.update(np.ascontiguousarray(arr).tobytes())
    for part in run.settings.fdr.null_expression or ():  # the values themselves (a dask array: its token)
        if isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            from dask.base import tokenize

            digest.update(tokenize(part).encode())
    return digest.hexdigest()


def _keep_or_discard(staging: io_commit.Staging, exc: BaseException) -> None:
    """After a failure: keep the finished work for a resume when the same call can succeed
    (an interruption, a lost worker, a full disk), discard it otherwise (a fault of the input
    or of the code would only repeat)."""
    finished = len(io_commit.read_markers(staging.sub("markers")))
    interrupted = isinstance(exc, KeyboardInterrupt | SystemExit | OSError | KilledWorker) or (
        type(exc).__name__ == "WorkerLostError")
    if finished and interrupted:
        logger.warning(
            "The run stopped (%s); its %d finished tasks are kept in %s. Rerunning the same call "
            "resumes them; kompot_dask.cleanup(store, staged=True) removes them.",
            type(exc).__name__, finished, staging.path,
        )
        return
    staging.remove()


# --------------------------------------------------------------------------------------
# record


def _record(run: _Run, computed: _Computed, plan: planner.ResourcePlan, environment: dict[str, Any],
            t_start: float) -> _Results:
    """The fields to write (with the local FDR) and the run record that describes them."""
    results = _result_fields(run, computed.result)
    run_id = len(run.earlier.history)
    logger.info("This run will have `run_id=%d`.", run_id)
    res, cells, o = computed.result, run.cells, run.outputs
    fields_written = ([f"var/{k}" for k in results.var_columns] + [f"obs/{k}" for k in results.obs_columns]
                      + [f"layers/{k}" for k in results.layers] + [f"varm/{k}" for k in results.varm]
                      + [f"obsp/{k}" for k in results.obsp])
    results.record = run_record.build_record(
        run_id, names=o.by_role(), fields_written=fields_written,
        fdr_results=None if results.fdr is None else results.fdr.summary, params=run.call.params(run.settings),
        model=run_record.ModelInfo(ls=computed.ls, n_landmarks=int(computed.landmarks.shape[0]),
                                   landmark_source=computed.landmark_source, n_cells_condition1=cells.n1,
                                   n_cells_condition2=cells.n2, n_null_genes=o.n_null),
        layout=run_record.LayoutInfo(cell_chunk=res.layout.cell_chunk, gene_block=res.layout.gene_block,
                                     null_gene_block=res.layout.null_gene_block,
                                     kernel_chunk=res.layout.kernel_chunk, n_tasks=res.n_tasks,
                                     n_workers=computed.n_workers),
        plan=run_record.PlanSummary.of(plan), environment=environment,
        wall_seconds=round(time.perf_counter() - t_start, 3),
        phase_seconds=dict(run.phase_seconds), task_seconds=dict(res.thread_seconds),
        resumed=run_record.ResumeInfo(tasks_reused=res.n_reused, tasks_run=res.n_tasks) if res.n_reused else None,
        groups=_groups_record(run),
    )
    return results


def _groups_record(run: _Run) -> dict[str, Any]:
    """kompot's record entries of a run with groups: the subsets, their cells (per
    condition) and the representation check's findings."""
    cells, call = run.cells, run.call
    out: dict[str, Any] = {"underrepresentation": {k: [str(c) for c in v] for k, v in cells.underrepresentation.items()},
                           "auto_filtered": cells.auto_filtered}
    subsets = cells.subsets
    if subsets is None:
        return out
    labels = run.store.obs[call.groupby].to_numpy()
    per_group = {}
    for name, mask in zip(subsets.names, subsets.masks, strict=True):
        n = int(mask.sum())
        conds = {}
        for cond in (call.condition1, call.condition2):
            cc = int((mask & (labels == cond)).sum())
            conds[str(cond)] = {"count": cc, "percentage": 100.0 * cc / n if n else 0.0}
        per_group[name] = {"count": n, "percentage": 100.0 * n / run.store.n_obs, "conditions": conds}
    out["subset_names"] = list(subsets.names)
    out["groups_summary"] = {"count": len(subsets), "names": list(subsets.names), "description": subsets.description,
                             "cells_per_group": per_group}
    return out


def _result_fields(run: _Run, res: engine.EngineResult) -> _Results:
    """Per-gene columns over all store genes (NaN where not tested), per-cell columns, the
    staged layers by field name, and the local FDR when null genes were scored."""
    names, n_vars, threshold = run.outputs.names, run.store.n_vars, run.settings.fdr.threshold

    def per_gene(values: np.ndarray, fill: Any = np.nan, dtype: Any = None) -> np.ndarray:
        out = np.full(n_vars, fill, dtype=dtype)
        out[res.columns] = values
        return out

    var_cols = {names[r]: per_gene(getattr(res, r)) for r in ("mahalanobis", "mean_lfc") if r in run.outputs.roles}
    fdr_result = raw_fdr = None
    if run.outputs.use_fdr:
        fdr_result = fdr_mod.compute_fdr(res.mahalanobis, run.outputs.null_distances(res.null_mahalanobis), threshold)
        var_cols[names["local_fdr"]] = per_gene(fdr_result.local_fdr)
        var_cols[names["is_de"]] = per_gene(fdr_result.is_de, False, bool)
        for role in ("pvalue", "tail_fdr"):
            if role in run.outputs.roles:
                var_cols[names[role]] = per_gene(getattr(fdr_result, role))
        summary = fdr_result.summary
        logger.info("FDR analysis complete: %d/%d genes significantly DE at FDR < %s",
                    summary["n_significant"], summary["n_total"], threshold)
        logger.info("Mahalanobis distance threshold for FDR < %s: %.4f", threshold,
                    summary["min_significant_mahalanobis"])
        if "residual_z" in run.outputs.roles:
            raw_fdr, fdr_result = fdr_result, _stratified(run, res, fdr_result, var_cols, per_gene)
    if "calibrated_score" in run.outputs.roles:
        raw_fdr, fdr_result = fdr_result, _calibrated(run, res, fdr_result, var_cols, per_gene)
    if "neg_log10_ptp" in run.outputs.roles:
        var_cols[names["neg_log10_ptp"]] = per_gene(fdr_mod.neg_log10_ptp(res.mahalanobis, run.cells.embedding.shape[1]))
    obs_cols = {names[r]: getattr(res, r) for r in ("std1", "std2") if r in run.outputs.roles}
    layers = {names[r]: p for r, p in res.staged.items()}
    return _Results(var_cols, obs_cols, layers, fdr_result, raw_fdr=raw_fdr, varm=_group_tables(run, res, per_gene),
                    obsp=dict(res.staged_obsp))


def _stratified(run: _Run, res: engine.EngineResult, raw: fdr_mod.FDRResult, var_cols: dict[str, np.ndarray],
                per_gene) -> fdr_mod.FDRResult:
    """FDRSettings(mode="variance_stratified"): the residual columns beside the raw ones, and
    ``is_de`` from the residual local FDR. Returns the FDR that ``is_de`` comes from."""
    fdr, names = run.settings.fdr, run.outputs.names
    trend = fdr_mod.variance_stratified_fdr(
        res.mahalanobis, res.null_mahalanobis, res.moments, res.null_moments, features=fdr.null_trend_features,
        degree=fdr.TREND_MODELS[fdr.null_trend_model], threshold=fdr.threshold)
    var_cols[names["residual_z"]] = per_gene(trend.residual_z)
    var_cols[names["residual_local_fdr"]] = per_gene(trend.fdr.local_fdr)
    if "residual_tail_fdr" in run.outputs.roles:
        var_cols[names["residual_tail_fdr"]] = per_gene(trend.fdr.tail_fdr)
    var_cols[names["is_de"]] = per_gene(trend.fdr.is_de, False, bool)
    summary = trend.fdr.summary
    summary["raw_n_significant"] = raw.summary["n_significant"]
    summary["trend_scale"] = trend.scale
    logger.info("Variance-stratified FDR (null trend %s in %s, residual scale %.3f): %d/%d genes significantly DE "
                "at FDR < %s (raw mode: %d)", fdr.null_trend_model, " and ".join(fdr.null_trend_features),
                trend.scale, summary["n_significant"], summary["n_total"], fdr.threshold,
                raw.summary["n_significant"])
    return trend.fdr


def _calibrated(run: _Run, res: engine.EngineResult, raw: fdr_mod.FDRResult | None, var_cols: dict[str, np.ndarray],
                per_gene) -> fdr_mod.FDRResult:
    """FDRSettings(mode="calibrated"): the permuted labels' distances, the score and its FDR
    beside the raw columns (when null genes gave those), and ``is_de`` from it."""
    fdr, names = run.settings.fdr, run.outputs.names
    score, result = fdr_mod.permutation_fdr(res.mahalanobis, res.permuted_mahalanobis, fdr.threshold)
    var_cols[names["permuted_mahalanobis"]] = per_gene(fdr_mod.permuted_distance(res.permuted_mahalanobis))
    var_cols[names["calibrated_score"]] = per_gene(score)
    var_cols[names["calibrated_local_fdr"]] = per_gene(result.local_fdr)
    if "calibrated_tail_fdr" in run.outputs.roles:
        var_cols[names["calibrated_tail_fdr"]] = per_gene(result.tail_fdr)
    var_cols[names["is_de"]] = per_gene(result.is_de, False, bool)
    summary = result.summary
    if run.cells.samples is not None:
        summary["null"] = "samples"
        how = "whole samples' labels permuted between the conditions"
    else:
        summary["null"] = "neighbourhoods"
        summary["n_neighbourhoods"] = k = fdr_mod.neighbourhood_count(
            run.cells.n1 + run.cells.n2, fdr.null_neighbourhood_cells, run.landmarks.count)
        how = f"labels permuted within {k} neighbourhoods"
    if raw is not None:
        summary["raw_n_significant"] = raw.summary["n_significant"]
    logger.info("Calibrated FDR (%s, %d time(s)): %d/%d genes significantly DE at FDR < %s%s", how,
                fdr.null_permutations, summary["n_significant"], summary["n_total"], fdr.threshold,
                "" if raw is None else f" (raw mode: {raw.summary['n_significant']})")
    return result


def _group_tables(run: _Run, res: engine.EngineResult, per_gene) -> dict[str, pd.DataFrame]:
    """kompot's varm tables of a run with groups: genes × subsets, NaN (is_de: False) at the
    genes not tested; the local FDR of each subset from its own null-gene distances."""
    subsets, roles, names = run.cells.subsets, run.outputs.roles, run.outputs.names
    if subsets is None:
        return {}
    threshold, dims = run.settings.fdr.threshold, run.cells.embedding.shape[1]
    index = run.store.var.index
    cols: dict[str, dict[str, np.ndarray]] = {r: {} for r in roles if r in run_fields.GROUP_ROLES}
    for i, name in enumerate(subsets.names):
        d = res.group_mahalanobis[i]
        cols["group_mean_lfc"][name] = per_gene(res.group_mean_lfc[i])
        if "group_mahalanobis" in cols:
            cols["group_mahalanobis"][name] = per_gene(d)
        if "group_local_fdr" in cols:
            fdr = fdr_mod.compute_fdr(d, res.group_null_mahalanobis[i], threshold)
            cols["group_local_fdr"][name] = per_gene(fdr.local_fdr)
            cols["group_is_de"][name] = per_gene(fdr.is_de, False, bool)
            logger.info("Group '%s': %d/%d genes significantly DE at FDR < %s", name, int(fdr.is_de.sum()), len(d),
                        threshold)
        if "group_neg_log10_ptp" in cols:
            cols["group_neg_log10_ptp"][name] = per_gene(fdr_mod.neg_log10_ptp(d, dims))
    logger.info("Group-specific data stored in varm")
    return {names[r]: pd.DataFrame(c, index=index.astype(str)) for r, c in cols.items()}


# --------------------------------------------------------------------------------------
# commit


def _commit(run: _Run, computed: _Computed, results: _Results) -> None:
    """Every field and the record in one journaled change; before its commit point a
    failure leaves the store as it was (and the staging kept or discarded)."""
    store, storage = run.store, run.settings.storage
    rk = storage.result_key
    previous_result = None if rk == run_record.HISTORY_KEY else store.read_uns_json(rk)
    uns_updates = run_record.uns_updates(run.earlier.uns_entry, results.record, previous_result,
                                         computed.landmarks, computed.landmark_source, storage.store_landmarks)
    try:
        store.commit(computed.staging, layers=results.layers, obs_columns=results.obs_columns,
                     var_columns=results.var_columns, uns_updates=uns_updates, varm=results.varm,
                     obsp=results.obsp)
    except BaseException as exc:
        if not os.path.exists(os.path.join(store.path, io_commit.JOURNAL)):
            _keep_or_discard(computed.staging, exc)  # before the commit point: the store is unchanged
        raise
    if run.in_memory:  # the temporary store is removed; the AnnData gets the results next
        logger.info("Results written to the AnnData in memory (run_id=%d)", results.record.run_id)
    else:
        logger.info("Results written to %s (run_id=%d)", store.path, results.record.run_id)


def _returned(run: _Run, computed: _Computed, results: _Results) -> dict[str, Any] | None:
    """What ``de`` returns: nothing, or with ``return_full_results`` the per-gene table and the model."""
    if not run.settings.output.return_full_results:
        return None
    res, fdr_result = computed.result, results.fdr
    table = pd.DataFrame({"mean_lfc": res.mean_lfc, "mahalanobis": res.mahalanobis},
                         index=run.store.var.index[res.columns])
    if "mahalanobis" not in run.outputs.roles:  # OutputSettings(compute_mahalanobis=False)
        table = table[["mean_lfc"]]
    if fdr_result is not None:
        # the raw columns stay raw whatever the mode (none without null genes)
        raw = fdr_result if run.settings.fdr.mode == "raw" else results.raw_fdr
        if raw is not None:
            table["pvalue"] = raw.pvalue
            table["local_fdr"] = raw.local_fdr
            table["tail_fdr"] = raw.tail_fdr
        names = run.outputs.names
        if "residual_z" in run.outputs.roles:
            table["residual_z"] = results.var_columns[names["residual_z"]][res.columns]
            table["residual_local_fdr"] = fdr_result.local_fdr
        if "calibrated_score" in run.outputs.roles:
            table["permuted_mahalanobis"] = fdr_mod.permuted_distance(res.permuted_mahalanobis)
            table["calibrated_score"] = results.var_columns[names["calibrated_score"]][res.columns]
            table["calibrated_local_fdr"] = fdr_result.local_fdr
        table["is_de"] = fdr_result.is_de
    return {
        "table": table, "fdr_summary": None if fdr_result is None else fdr_result.summary,
        "run_id": results.record.run_id, "field_names": run.outputs.by_role(), "ls": computed.ls,
        "landmarks": computed.landmarks, "null_mahalanobis": res.null_mahalanobis,
    }


# --------------------------------------------------------------------------------------
# Overwrites


def _check_overwrites(run: _Run) -> None:
    """Warn (overwrite=None), raise (False) or stay silent (True) about earlier results."""
    storage = run.settings.storage
    if not run.earlier.existing or storage.overwrite is True:
        return
    msg = _overwrite_message(run)
    if storage.overwrite is False:
        raise ValueError(msg + ". Use a different StorageSettings(result_key=...) or overwrite=True.")
    logger.warning("%s Set overwrite=False to prevent overwriting or overwrite=True to silence this message.", msg)


def _overwrite_message(run: _Run) -> str:
    prev = run.previous_run()
    where = ""
    if prev is not None:
        where = f" Previous run was at {prev.timestamp} comparing {prev.condition1} to {prev.condition2}."
    existing = [f"{loc}.{name}" for loc, name in run.earlier.existing]
    shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
    return (f"Differential expression results with result_key={run.settings.storage.result_key!r} already "
            f"exist in the dataset.{where} Fields that will be overwritten: {shown}")


# --------------------------------------------------------------------------------------
# plan


def _plan_inputs(run: _Run) -> planner.PlanInputs:
    """The sizes the layout and cost model needs, read from the validated call."""
    store, info, cells, s = run.store, run.info, run.cells, run.settings
    nnz = info.nnz
    tracking = run.earlier.tracking
    overwrites = tuple((loc, name, tracking.get(loc, {}).get(name)) for loc, name in run.earlier.existing)
    prev = run.previous_run()
    prev_summary = None if prev is None else {"run_id": prev.run_id, "timestamp": prev.timestamp,
                                              "condition1": prev.condition1, "condition2": prev.condition2}
    return planner.PlanInputs(
        store_path=store.path, n_obs=store.n_obs, n_vars=store.n_vars, n_selected=len(cells.selected),
        n1=cells.n1, n2=cells.n2, n_pred=int(cells.filter_mask.sum()), d=int(cells.embedding.shape[1]),
        m=run.landmarks.count, n_null=run.outputs.n_null + run.outputs.n_external, layer=run.call.layer, layer_kind=info.kind,
        layer_itemsize=int(np.dtype(info.dtype).itemsize), layer_chunks=tuple(info.chunks) if info.chunks else None,
        layer_nnz=nnz, store_layers=s.storage.store_layers, layer_dtype=s.storage.layer_dtype,
        dtype=s.compute.dtype, ls_given=s.gp.ls is not None, landmark_source=run.landmarks.source,
        fields=tuple((r, run_fields.FIELD_LOCATIONS[r], run.outputs.names[r]) for r in run.outputs.roles),
        overwrites=overwrites, previous_run=prev_summary, in_memory=run.in_memory, overwrite=s.storage.overwrite,
        neighbors=s.gp.neighbors, neighbor_sample=s.gp.neighbor_sample, landmark_sample=s.gp.landmark_sample,
        layer_dtype_is_float32_safe=null_value_dtype(info.dtype) == np.float32,
        embedding_cache_bytes=(cells.embedding.cache_nbytes if isinstance(cells.embedding, EmbeddingReader) else 0),
        zarr_format=int(store.zarr_format),
        n_samples=0 if cells.samples is None else cells.samples.n_samples,
        sample_rank=0 if cells.samples is None else len(cells.samples.use1) + len(cells.samples.use2) - 2,
        empirical=s.gp.use_empirical_variance,
        permutations=s.fdr.null_permutations if s.fdr.mode == "calibrated" else 0,
        **_group_sizes(cells.subsets, run.landmarks.count),
    )


def _group_sizes(subsets: _groups.Subsets | None, m: int) -> dict[str, int]:
    """The planner's view of the subsets: their points (min(cells, m) each, as
    :func:`_group_spec` chooses them) and cells."""
    if subsets is None:
        return {}
    counts = subsets.masks.sum(axis=1)
    points = np.minimum(counts, m)
    return {"n_groups": len(subsets), "group_points": int(points.sum()), "group_max_points": int(points.max()),
            "group_cells": int(counts.sum()),
            "group_tasks": int(sum(kernel_sum_parts(int(c)) + 1 for c in counts))}


def _make_plan(run: _Run, client: Client, *, timed: bool) -> planner.ResourcePlan:
    """A new plan on this cluster; timed calibration only for ``kd.plan`` (``de`` plans by
    memory alone, so that it does not spend seconds timing kernels before its own run)."""
    c = run.settings.compute
    plan = planner.plan_on(
        client, _plan_inputs(run), run.cells.selected, cell_chunk=c.cell_chunk, gene_block=c.gene_block,
        null_gene_block=c.null_gene_block, max_task_bytes=c.max_task_bytes, embedded=is_embedded(client),
        reader=run.store.tile_reader(run.info), timed=timed,
    )
    if run.earlier.existing and run.settings.storage.overwrite is False:
        plan.errors.append(planner.Problem(
            _overwrite_message(run) + " and StorageSettings(overwrite=False) forbids it",
            ["StorageSettings(result_key=...) with a new name", "StorageSettings(overwrite=True)"]))
        plan.status = "INFEASIBLE"
    return plan


def _plan_for_run(run: _Run, client: Client, plan: planner.ResourcePlan | None) -> planner.ResourcePlan:
    """The plan a run executes: the one given (checked against this call), else a new one."""
    if plan is None:
        plan = _make_plan(run, client, timed=False)
        if sum(plan.flops.values()) >= TIMED_PLAN_FLOPS:
            # worth half a second of timed kernels: the plan then knows how long each step
            # takes, and the run announces it (timed under the run's own worker settings)
            with worker_runtime(client):
                plan = _make_plan(run, client, timed=True)
    else:
        _check_given_plan(run, client, plan)
    if not plan.feasible:
        raise planner.InfeasiblePlanError(plan)
    for w in plan.warnings:
        if not w.startswith("Results already exist"):
            logger.warning("Plan: %s", w)
    logger.info(
        "Plan: cell_chunk=%d, gene_block=%d, null_gene_block=%d, %d tasks; predicted peak %s per worker%s",
        plan.cell_chunk, plan.gene_block, plan.null_gene_block, plan.n_tasks,
        format_bytes(plan.peak_worker_bytes),
        f", ~{format_time(plan.wall_seconds)}" if plan.wall_seconds is not None else "",
    )
    return plan


def _check_given_plan(run: _Run, client: Client, plan: planner.ResourcePlan) -> None:
    """Refuse a plan made for other arguments; warn when the cluster changed since."""
    mine = _plan_inputs(run).fingerprint()
    theirs = plan.inputs.fingerprint()
    diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
    if diff:
        shown = ", ".join(f"{k}: planned {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"plan= was made for a different run ({shown}); make a new plan with kompot_dask.plan(...) "
            "for these arguments, or leave plan= out to let de() plan by itself"
        )
    res = planner.resources_from_client(client, run.store.path, embedded=False)
    if res.total_threads != plan.resources.total_threads or res.memory_limit < plan.resources.memory_limit:
        logger.warning(
            "The cluster changed since planning (%d×%d threads, %s per worker; planned for %d×%d, %s); "
            "running the planned layout", res.n_workers, res.threads_per_worker, format_bytes(res.memory_limit),
            plan.resources.n_workers, plan.resources.threads_per_worker,
            format_bytes(plan.resources.memory_limit),
        )
