"""``kompot_dask.de``: validate, prepare on the client, run the engine, commit the results."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import psutil
from dask.utils import format_bytes, format_time
from distributed import Client, KilledWorker

from . import _planner as planner
from ._engine import graph as engine
from ._engine.cluster import resolve_client
from ._io import commit as io_commit
from ._io.lease import store_lock
from ._io.store import Store
from ._numerics import fdr as fdr_mod
from ._runs import fields as run_fields
from ._runs import record as run_record
from ._settings import (
    ComputeSettings,
    FDRSettings,
    FilterSettings,
    GPSettings,
    OutputSettings,
    StorageSettings,
)

logger = logging.getLogger("kompot_dask")


def _check_settings(value: Any, cls: type, name: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name}= expects a kompot_dask.{cls.__name__}, got {type(value).__name__}")
    return value


def _all_settings(gp, fdr, filter, storage, output, compute) -> dict[str, Any]:  # noqa: A002
    """The six settings objects, defaults filled in and types checked."""
    return dict(
        gp=_check_settings(gp, GPSettings, "gp"),
        fdr=_check_settings(fdr, FDRSettings, "fdr"),
        filter=_check_settings(filter, FilterSettings, "filter"),
        storage=_check_settings(storage, StorageSettings, "storage"),
        output=_check_settings(output, OutputSettings, "output"),
        compute=_check_settings(compute, ComputeSettings, "compute"),
    )


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


def de(
    data: str | os.PathLike | ad.AnnData,
    groupby: str,
    condition1: Any,
    condition2: Any,
    layer: str | None = None,
    obsm_key: str = "DM_EigenVectors",
    genes: list[str] | None = None,
    *,
    gp: GPSettings | None = None,
    fdr: FDRSettings | None = None,
    filter: FilterSettings | None = None,  # noqa: A002 - kompot's name
    storage: StorageSettings | None = None,
    output: OutputSettings | None = None,
    compute: ComputeSettings | None = None,
    client: Client | None = None,
    plan: planner.ResourcePlan | None = None,
    dry_run: bool = False,
    resume: bool = True,
) -> dict[str, Any] | planner.ResourcePlan | None:
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
    layer
        Expression layer (log scale); ``None`` uses X.
    obsm_key
        Cell-state embedding (cells × d).
    genes
        Optional subset of var_names to test (store order is kept).
    gp, fdr, filter, storage, output, compute
        Settings objects; see :mod:`kompot_dask` (``GPSettings``, ``FDRSettings``, ...).
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
    settings = _all_settings(gp, fdr, filter, storage, output, compute)
    if plan is not None and not isinstance(plan, planner.ResourcePlan):
        raise TypeError(f"plan= expects a ResourcePlan from kompot_dask.plan(...), got {type(plan).__name__}")
    if dry_run:
        if plan is not None:
            return plan
        return _plan_public(data, groupby, condition1, condition2, layer, obsm_key, genes, settings, client)
    args = (groupby, condition1, condition2, layer, obsm_key, genes)
    if isinstance(data, ad.AnnData):
        return _de_in_memory(data, args, settings, client, plan)
    store = Store(data)
    run = _validate(store, *args, **settings)
    with store_lock(store.path, "kompot_dask.de"):
        return _execute(run, client, plan, resume)


def plan(
    data: str | os.PathLike | ad.AnnData,
    groupby: str,
    condition1: Any,
    condition2: Any,
    layer: str | None = None,
    obsm_key: str = "DM_EigenVectors",
    genes: list[str] | None = None,
    *,
    gp: GPSettings | None = None,
    fdr: FDRSettings | None = None,
    filter: FilterSettings | None = None,  # noqa: A002 - kompot's name
    storage: StorageSettings | None = None,
    output: OutputSettings | None = None,
    compute: ComputeSettings | None = None,
    client: Client | None = None,
) -> planner.ResourcePlan:
    """What :func:`de` with these arguments will need on this cluster, and how it will cut
    the work. Computes and writes nothing but a few seconds of timed kernels on the workers.

    Without ``client`` (and no current client), the LocalCluster that ``de`` would start is
    started for the calibration and closed again.
    """
    settings = _all_settings(gp, fdr, filter, storage, output, compute)
    return _plan_public(data, groupby, condition1, condition2, layer, obsm_key, genes, settings, client)


def _plan_public(data, groupby, condition1, condition2, layer, obsm_key, genes, settings, client):
    args = (groupby, condition1, condition2, layer, obsm_key, genes)
    if isinstance(data, ad.AnnData):
        with _temporary_store(data, layer) as store:
            run = _validate(store, *args, **settings, existing_layers=list(data.layers.keys()), in_memory=True)
            with resolve_client(client, settings["compute"]) as c:
                return _make_plan(run, c, timed=True)
    store = Store(data)
    run = _validate(store, *args, **settings)
    with resolve_client(client, settings["compute"]) as c:
        return _make_plan(run, c, timed=True)


@contextmanager
def _temporary_store(adata: ad.AnnData, layer: str | None) -> Iterator[Store]:
    from ._io.ingest import ingest

    tmp = tempfile.mkdtemp(prefix="kompot_dask_")
    try:
        path = os.path.join(tmp, "data.zarr")
        ingest(adata, path, layers=[layer] if layer is not None else [], include_x=layer is None, progress=False)
        yield Store(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _de_in_memory(adata: ad.AnnData, args: tuple, settings: dict, client, plan):
    with _temporary_store(adata, args[3]) as store:
        run = _validate(store, *args, **settings, existing_layers=list(adata.layers.keys()), in_memory=True)
        result = _execute(run, client, plan, resume=False)
        record = run_record.RunRecord.from_dict(run_record.load_history(store.read_uns_json(run_record.HISTORY_KEY))[-1])
        for loc_field in record.fields_written:
            loc, name = loc_field.split("/", 1)
            if loc == "var":
                adata.var[name] = store.var[name].to_numpy()
            elif loc == "obs":
                adata.obs[name] = store.obs[name].to_numpy()
            elif loc == "layers":
                adata.layers[name] = store.read_layer_dense(name)
        rk = settings["storage"].result_key
        for key in {run_record.HISTORY_KEY, rk}:
            if "uns" in store.root and key in store.root["uns"]:
                adata.uns[key] = ad.io.read_elem(store.root["uns"][key])
        return result


@dataclass
class _Run:
    """A validated call: everything known before any worker is involved."""

    store: Store
    info: Any
    groupby: str
    condition1: Any
    condition2: Any
    layer: str | None
    obsm_key: str
    genes: list[str] | None
    gp: GPSettings
    fdr: FDRSettings
    filter: FilterSettings
    storage: StorageSettings
    output: OutputSettings
    compute: ComputeSettings
    X_raw: np.ndarray
    selected: np.ndarray
    filter_mask: np.ndarray
    mask1: np.ndarray
    mask2: np.ndarray
    names: dict[str, str]
    roles: list[str]
    layer_roles: list[str]
    n_null: int
    uns_entry: dict[str, Any]
    history: list[dict]
    tracking: dict
    existing: list[tuple[str, str]]  # (location, name) of output fields already present
    in_memory: bool = False

    @property
    def use_fdr(self) -> bool:
        return self.n_null > 0

    @property
    def n_landmarks(self) -> int:
        if self.gp.landmarks is not None:
            return int(self.gp.landmarks.shape[0])
        return int(min(self.gp.n_landmarks, self.mask1.sum() + self.mask2.sum()))

    def previous_run(self) -> run_record.RunRecord | None:
        """The record of the run that last wrote this result_key (else the latest run)."""
        prev_id = self.tracking.get("uns", {}).get(self.storage.result_key)
        prev = next((h for h in self.history if h.get("run_id") == prev_id),
                    self.history[-1] if self.history else None)
        return None if prev is None else run_record.RunRecord.from_dict(prev)


def _validate(store: Store, groupby, condition1, condition2, layer, obsm_key, genes,
              gp: GPSettings, fdr: FDRSettings, filter: FilterSettings, storage: StorageSettings,
              output: OutputSettings, compute: ComputeSettings,
              existing_layers: list[str] | None = None, in_memory: bool = False) -> _Run:
    rk = storage.result_key
    obs, var = store.obs, store.var
    # ---- validation: everything that can be checked without touching the layer -------
    if groupby not in obs.columns:
        raise KeyError(f"obs column {groupby!r} (groupby) not found; available columns: {list(obs.columns)}; pass groupby= one of these")
    if condition1 == condition2:
        raise ValueError(f"condition1 and condition2 are both {condition1!r}; pass two different values of obs[{groupby!r}]")
    labels = obs[groupby]
    present = list(pd.unique(labels.dropna()))
    for name, cond in (("condition1", condition1), ("condition2", condition2)):
        if not (labels == cond).any():
            raise ValueError(f"{name}={cond!r} is not a value of obs[{groupby!r}]; available values: {present}; pass {name}= one of these")
    info = store.layer_info(layer)
    X_raw = store.read_obsm(obsm_key)
    if X_raw.ndim != 2 or X_raw.shape[0] != store.n_obs:
        raise ValueError(f"obsm[{obsm_key!r}] has shape {X_raw.shape}; expected ({store.n_obs}, d)")
    if not np.issubdtype(X_raw.dtype, np.number):
        raise TypeError(f"obsm[{obsm_key!r}] has dtype {X_raw.dtype}; expected a numeric embedding")
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise ValueError("genes= is an empty list; pass at least one var name, or genes=None to test all genes")
        unknown = [g for g in genes if g not in var.index]
        if unknown:
            raise KeyError(f"genes= names {len(unknown)} gene(s) not in var_names: {unknown[:20]}; check spelling or var_names")
        selected = np.flatnonzero(var.index.isin(genes))
    else:
        selected = np.arange(store.n_vars)
    filter_mask = _cell_filter_mask(obs, filter.cell_filter)
    # Only the filtered cells enter the model (fits, predictions, stds), so only they must be finite.
    bad_rows = filter_mask & ~np.all(np.isfinite(X_raw), axis=1)
    if bad_rows.any():
        raise ValueError(
            f"obsm[{obsm_key!r}] holds NaN or inf in {int(bad_rows.sum())} cell(s) "
            f"(first: {list(obs.index[bad_rows][:5])}); fix or filter these cells (FilterSettings(cell_filter=...))."
        )
    mask1 = (labels == condition1).to_numpy() & filter_mask
    mask2 = (labels == condition2).to_numpy() & filter_mask
    for i, (cond, mask) in enumerate(((condition1, mask1), (condition2, mask2)), start=1):
        if mask.sum() < filter.min_cells:
            raise ValueError(
                f"condition{i}={cond!r} has {int(mask.sum())} cell(s) after filtering; at least "
                f"{filter.min_cells} are needed (FilterSettings.min_cells). Relax the cell filter or pick another condition."
            )
    if gp.landmarks is not None and gp.landmarks.shape[1] != X_raw.shape[1]:
        raise ValueError(
            f"GPSettings.landmarks has {gp.landmarks.shape[1]} columns but obsm[{obsm_key!r}] has {X_raw.shape[1]}"
        )
    store.check_writable()

    names = run_fields.output_field_names(rk, condition1, condition2)
    if run_fields.sanitize_name(condition1) == run_fields.sanitize_name(condition2):
        raise ValueError(
            f"condition1={condition1!r} and condition2={condition2!r} both become "
            f"{run_fields.sanitize_name(condition1)!r} in field names (' ', '-', '.', '/' are written as '_'), "
            f"so their results would overwrite each other. Rename one of the two labels in obs[{groupby!r}]."
        )
    n_null = fdr.resolved_null_genes()
    use_fdr = n_null > 0
    roles = ["mahalanobis", "mean_lfc", "std1", "std2"]
    if use_fdr:
        roles += ["local_fdr", "is_de"]
    layer_roles = ["imputed1", "imputed2", "fold_change"] if storage.store_layers else []
    roles += layer_roles
    store.check_new_field_names(
        [(run_fields.FIELD_LOCATIONS[r], names[r]) for r in roles] + [("uns", rk)],
        "Use a shorter or plainer StorageSettings(result_key=...) or rename the condition labels.",
    )
    uns_entry = store.read_uns_json(run_record.HISTORY_KEY)
    history = run_record.load_history(uns_entry)
    tracking = run_record.load_field_tracking(uns_entry)
    present = {"var": set(store.var.columns), "obs": set(store.obs.columns),
               "layers": set(store.layer_keys() if existing_layers is None else existing_layers)}
    existing = [(run_fields.FIELD_LOCATIONS[r], names[r]) for r in roles if names[r] in present[run_fields.FIELD_LOCATIONS[r]]]
    return _Run(store, info, groupby, condition1, condition2, layer, obsm_key, genes, gp, fdr, filter,
                storage, output, compute, X_raw, selected, filter_mask, mask1, mask2, names, roles,
                layer_roles, n_null, uns_entry, history, tracking, existing, in_memory)


def _execute(run: _Run, client: Client | None, plan: planner.ResourcePlan | None,
             resume: bool) -> dict[str, Any] | None:
    t_start = time.perf_counter()
    store, gp, fdr, storage, output, compute = run.store, run.gp, run.fdr, run.storage, run.output, run.compute
    groupby, condition1, condition2 = run.groupby, run.condition1, run.condition2
    obsm_key, layer, genes = run.obsm_key, run.layer, run.genes
    X_raw, selected, filter_mask, mask1, mask2 = run.X_raw, run.selected, run.filter_mask, run.mask1, run.mask2
    names, roles, layer_roles, n_null, use_fdr = run.names, run.roles, run.layer_roles, run.n_null, run.use_fdr
    uns_entry, history, info = run.uns_entry, run.history, run.info
    var = store.var
    filter = run.filter
    rk = storage.result_key
    _check_overwrites(run)

    # ---- client-side preparation -------------------------------------------------------
    n1, n2 = int(mask1.sum()), int(mask2.sum())
    logger.info("Condition 1 (%s): %s cells", condition1, f"{n1:,}")
    logger.info("Condition 2 (%s): %s cells", condition2, f"{n2:,}")
    X = np.ascontiguousarray(X_raw, dtype=np.float64)
    codes = np.zeros(store.n_obs, dtype=np.int8)
    codes[mask1] = 1
    codes[mask2] = 2
    if use_fdr:
        null_sources, null_seeds = fdr_mod.choose_null_genes(store.n_vars, n_null, fdr.null_seed)
    else:
        null_sources = null_seeds = np.array([], dtype=np.int64)
    layer_names = {r: names[r] for r in layer_roles}

    with resolve_client(client, compute) as c:
        environment = run_record.environment_info(c)  # now: version skew shows before the long run
        plan = _plan_for_run(run, c, plan)
        fingerprint = _fingerprint(run)
        staging, saved = io_commit.open_run_staging(store.path, fingerprint, resume)
        try:
            if saved is not None:
                ls, Z, landmark_source = float(saved["ls"]), saved["Z"], saved["landmark_source"]
                layout = engine.make_layout(store.n_obs, store.n_vars, plan.resources.total_threads,
                                            **saved["layout"])
                logger.info("Resuming the interrupted run of this call kept in %s", staging.path)
            else:
                ls, Z, landmark_source = engine.prepare_model(
                    c, X_raw[mask1], np.vstack([X[mask1], X[mask2]]), ls=gp.ls, ls_factor=gp.ls_factor,
                    landmarks=gp.landmarks, n_landmarks=gp.n_landmarks, random_state=gp.random_state,
                )
                layout = _layout_of(plan, store)
                io_commit.save_run_state(staging, fingerprint, {
                    "ls": ls, "landmark_source": landmark_source,
                    "layout": {"cell_chunk": layout.row_chunk, "gene_block": layout.gene_block,
                               "null_gene_block": layout.null_gene_block, "kernel_chunk": layout.kernel_chunk},
                }, Z)
            res = engine.run_engine(
                c, store, info, X=X, codes=codes, pred=filter_mask, selected=selected, Z=Z, ls=ls,
                sigma=gp.sigma, eps=gp.eps, null_sources=null_sources, null_seeds=null_seeds,
                layer_names=layer_names, layer_dtype=storage.layer_dtype, dtype=compute.dtype,
                layout=layout, progress=output.progress, staging=staging,
            )
        except engine.NonFiniteExpressionError as exc:
            staging.remove()
            raise engine.NonFiniteExpressionError(
                exc.columns, [str(var.index[i]) for i in exc.columns], exc.as_null_source
            ) from None
        except BaseException as exc:
            _keep_or_discard(staging, exc)
            raise
        n_workers = len(c.scheduler_info(n_workers=-1)["workers"])

    # ---- FDR and outputs ---------------------------------------------------------------
    n_vars = store.n_vars
    mahal = np.full(n_vars, np.nan)
    mahal[res.columns] = res.mahalanobis
    lfc = np.full(n_vars, np.nan)
    lfc[res.columns] = res.mean_lfc
    var_cols = {names["mahalanobis"]: mahal, names["mean_lfc"]: lfc}
    fdr_summary = None
    fdr_result = None
    if use_fdr:
        fdr_result = fdr_mod.compute_fdr(res.mahalanobis, res.null_mahalanobis, fdr.threshold)
        local = np.full(n_vars, np.nan)
        local[res.columns] = fdr_result.local_fdr
        is_de = np.zeros(n_vars, dtype=bool)
        is_de[res.columns] = fdr_result.is_de
        var_cols[names["local_fdr"]] = local
        var_cols[names["is_de"]] = is_de
        fdr_summary = fdr_result.summary
        logger.info(
            "FDR analysis complete: %d/%d genes significantly DE at FDR < %s",
            fdr_summary["n_significant"], fdr_summary["n_total"], fdr.threshold,
        )
        logger.info("Mahalanobis distance threshold for FDR < %s: %.4f", fdr.threshold, fdr_summary["min_significant_mahalanobis"])
    obs_cols = {names["std1"]: res.std1, names["std2"]: res.std2}
    staged_by_name = {names[r]: p for r, p in res.staged.items()}

    run_id = len(history)
    logger.info("This run will have `run_id=%d`.", run_id)
    fields_written = [f"var/{k}" for k in var_cols] + [f"obs/{k}" for k in obs_cols] + [f"layers/{k}" for k in staged_by_name]
    record = run_record.build_record(
        run_id, names={r: names[r] for r in roles}, fields_written=fields_written, fdr_results=fdr_summary,
        params=run_record.record_params(groupby, condition1, condition2, obsm_key, layer, genes,
                                        gp, fdr, filter, storage, output, compute),
        model=run_record.ModelInfo(ls=ls, n_landmarks=int(Z.shape[0]), landmark_source=landmark_source,
                                   n_cells_condition1=n1, n_cells_condition2=n2, n_null_genes=n_null),
        layout=run_record.LayoutInfo(cell_chunk=res.layout.row_chunk, gene_block=res.layout.gene_block,
                                     null_gene_block=res.layout.null_gene_block,
                                     kernel_chunk=res.layout.kernel_chunk, n_tasks=res.n_tasks, n_workers=n_workers),
        plan=run_record.PlanSummary.of(plan), environment=environment,
        wall_seconds=round(time.perf_counter() - t_start, 3),
        resumed=run_record.ResumeInfo(tasks_reused=res.n_reused, tasks_run=res.n_tasks) if res.n_reused else None,
    )
    previous_result = None if rk == run_record.HISTORY_KEY else store.read_uns_json(rk)
    uns_updates = run_record.uns_updates(uns_entry, record, previous_result, Z, landmark_source,
                                         storage.store_landmarks)
    try:
        store.commit(staging, layers=staged_by_name, obs_columns=obs_cols, var_columns=var_cols,
                     uns_updates=uns_updates)
    except BaseException as exc:
        if not os.path.exists(os.path.join(store.path, io_commit.JOURNAL)):
            _keep_or_discard(staging, exc)  # before the commit point: the store is unchanged
        raise
    logger.info("Results written to %s (run_id=%d)", store.path, run_id)

    if not output.return_full_results:
        return None
    table = pd.DataFrame(
        {"mean_lfc": res.mean_lfc, "mahalanobis": res.mahalanobis}, index=var.index[res.columns]
    )
    if fdr_result is not None:
        table["pvalue"] = fdr_result.pvalue
        table["local_fdr"] = fdr_result.local_fdr
        table["tail_fdr"] = fdr_result.tail_fdr
        table["is_de"] = fdr_result.is_de
    return {
        "table": table, "fdr_summary": fdr_summary, "run_id": run_id,
        "field_names": {r: names[r] for r in roles}, "ls": ls, "landmarks": Z,
        "null_mahalanobis": res.null_mahalanobis,
    }


def _fingerprint(run: _Run) -> str:
    """What makes two calls the same run: their parameters and the state of their inputs."""
    params = run_record.record_params(run.groupby, run.condition1, run.condition2, run.obsm_key, run.layer,
                                run.genes, run.gp, run.fdr, run.filter, run.storage, run.output, run.compute)
    params.pop("output", None)  # progress bars and return values do not change the results
    digest = hashlib.sha256()
    digest.update(json.dumps([params, run.store.path, run.store.n_obs, run.store.n_vars,
                              run.store.element_signature(run.info.elem_path),
                              run.store.element_signature(f"obsm/{run.obsm_key}"),
                              run.store.element_signature(f"obs/{run.groupby}")],
                             sort_keys=True, default=str).encode())
    for arr in (run.gp.landmarks, run.filter_mask):
        if arr is not None:
            digest.update(np.ascontiguousarray(arr).tobytes())
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


def _check_overwrites(run: _Run) -> None:
    """Warn (overwrite=None), raise (False) or stay silent (True) about earlier results."""
    storage = run.storage
    if not run.existing or storage.overwrite is True:
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
    existing = [f"{loc}.{name}" for loc, name in run.existing]
    shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
    return (f"Differential expression results with result_key={run.storage.result_key!r} already exist in the dataset."
            f"{where} Fields that will be overwritten: {shown}")


# --------------------------------------------------------------------------------------
# Planning


def _plan_inputs(run: _Run) -> planner.PlanInputs:
    store, info = run.store, run.info
    nnz = None
    if info.kind in ("csr", "csc"):
        nnz = int(store.root[info.elem_path]["data"].shape[0])
    tracking = run.tracking
    overwrites = tuple((loc, name, tracking.get(loc, {}).get(name)) for loc, name in run.existing)
    prev = run.previous_run()
    prev_summary = None
    if prev is not None:
        prev_summary = {"run_id": prev.run_id, "timestamp": prev.timestamp,
                        "condition1": prev.condition1, "condition2": prev.condition2}
    return planner.PlanInputs(
        store_path=store.path, n_obs=store.n_obs, n_vars=store.n_vars, n_selected=len(run.selected),
        n1=int(run.mask1.sum()), n2=int(run.mask2.sum()), n_pred=int(run.filter_mask.sum()),
        d=int(run.X_raw.shape[1]), m=run.n_landmarks, n_null=run.n_null, layer=run.layer,
        layer_kind=info.kind, layer_itemsize=int(np.dtype(info.dtype).itemsize),
        layer_chunks=tuple(info.chunks) if info.chunks else None, layer_nnz=nnz,
        store_layers=run.storage.store_layers, layer_dtype=run.storage.layer_dtype, dtype=run.compute.dtype,
        ls_given=run.gp.ls is not None, landmarks_given=run.gp.landmarks is not None,
        fields=tuple((r, run_fields.FIELD_LOCATIONS[r], run.names[r]) for r in run.roles),
        overwrites=overwrites, previous_run=prev_summary, in_memory=run.in_memory,
        overwrite=run.storage.overwrite,
    )


def _make_plan(run: _Run, client: Client, *, timed: bool) -> planner.ResourcePlan:
    from ._engine.cluster import is_embedded

    inp = _plan_inputs(run)
    embedded = is_embedded(client)
    res = planner.resources_from_client(client, run.store.path, embedded=embedded)
    kc = planner.kernel_chunk_for(inp.m)
    hint = (inp.layer_chunks[0] if inp.layer_chunks else 1024, inp.layer_chunks[1] if inp.layer_chunks else 256, kc)
    reader = run.store.tile_reader(run.info) if timed else None
    cal = planner.calibrate(client, inp, hint, reader, timed=timed)
    c = run.compute

    def counter(ch: planner.Choice) -> dict[str, int]:
        lay = engine.make_layout(inp.n_obs, inp.n_vars, res.total_threads, cell_chunk=ch.cell_chunk,
                                 gene_block=ch.gene_block, null_gene_block=ch.null_gene_block,
                                 kernel_chunk=ch.kernel_chunk)
        return engine.task_counts(lay, inp.n_vars, run.selected, inp.n_null, inp.n_pred, res.n_workers,
                                  res.total_threads)

    plan = planner.make_plan(
        inp, res, cal, cell_chunk=c.cell_chunk, gene_block=c.gene_block, null_gene_block=c.null_gene_block,
        current_client_rss=int(psutil.Process().memory_info().rss), embedded=embedded, task_counter=counter,
        max_task_bytes=c.max_task_bytes,
    )
    if run.existing and run.storage.overwrite is False:
        plan.errors.append(planner.Problem(
            _overwrite_message(run) + " and StorageSettings(overwrite=False) forbids it",
            ["StorageSettings(result_key=...) with a new name", "StorageSettings(overwrite=True)"]))
        plan.status = "INFEASIBLE"
    return plan


def _plan_for_run(run: _Run, client: Client, plan: planner.ResourcePlan | None) -> planner.ResourcePlan:
    """The plan a run executes: the one given (checked against this call), else a new one."""
    if plan is None:
        plan = _make_plan(run, client, timed=False)
    else:
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


def _layout_of(plan: planner.ResourcePlan, store: Store) -> engine.Layout:
    threads = plan.resources.total_threads
    return engine.make_layout(store.n_obs, store.n_vars, threads, cell_chunk=plan.cell_chunk,
                              gene_block=plan.gene_block, null_gene_block=plan.null_gene_block,
                              kernel_chunk=plan.kernel_chunk)
