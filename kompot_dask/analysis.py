"""``kompot_dask.de``: validate, prepare on the client, run the engine, commit the results."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from datetime import datetime
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from distributed import Client

from . import engine, runs
from . import fdr as fdr_mod
from .cluster import resolve_client
from .settings import (
    ComputeSettings,
    FDRSettings,
    FilterSettings,
    GPSettings,
    OutputSettings,
    StorageSettings,
)
from .store import Store

logger = logging.getLogger("kompot_dask")


def _check_settings(value: Any, cls: type, name: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name}= expects a kompot_dask.{cls.__name__}, got {type(value).__name__}")
    return value


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
) -> dict[str, Any] | None:
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
        Settings objects; see :mod:`kompot_dask.settings`.
    client
        Dask client; by default the current one, else an embedded LocalCluster.

    Returns
    -------
    ``None``, or with ``OutputSettings(return_full_results=True)`` a dict with ``table``
    (per-gene DataFrame), ``fdr_summary``, ``run_id``, ``field_names``, ``ls`` and ``landmarks``.
    """
    gp = _check_settings(gp, GPSettings, "gp")
    fdr = _check_settings(fdr, FDRSettings, "fdr")
    filter = _check_settings(filter, FilterSettings, "filter")
    storage = _check_settings(storage, StorageSettings, "storage")
    output = _check_settings(output, OutputSettings, "output")
    compute = _check_settings(compute, ComputeSettings, "compute")

    if isinstance(data, ad.AnnData):
        return _de_in_memory(data, groupby, condition1, condition2, layer, obsm_key, genes,
                             gp, fdr, filter, storage, output, compute, client)
    store = Store(data)
    return _de_store(store, groupby, condition1, condition2, layer, obsm_key, genes,
                     gp, fdr, filter, storage, output, compute, client)


def _de_in_memory(adata, groupby, condition1, condition2, layer, obsm_key, genes,
                  gp, fdr, filter, storage, output, compute, client):
    from .ingest import ingest

    tmp = tempfile.mkdtemp(prefix="kompot_dask_")
    try:
        path = os.path.join(tmp, "data.zarr")
        ingest(adata, path, layers=[layer] if layer is not None else [], include_x=layer is None)
        store = Store(path)
        result = _de_store(store, groupby, condition1, condition2, layer, obsm_key, genes,
                           gp, fdr, filter, storage, output, compute, client)
        record = runs.load_history(store.read_uns_json(runs.HISTORY_KEY))[-1]
        for loc_field in record["fields_written"]:
            loc, name = loc_field.split("/", 1)
            if loc == "var":
                adata.var[name] = store.var[name].to_numpy()
            elif loc == "obs":
                adata.obs[name] = store.obs[name].to_numpy()
            elif loc == "layers":
                adata.layers[name] = store.read_layer_dense(name)
        for key in {runs.HISTORY_KEY, storage.result_key}:
            if "uns" in store.root and key in store.root["uns"]:
                adata.uns[key] = ad.io.read_elem(store.root["uns"][key])
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _de_store(store: Store, groupby, condition1, condition2, layer, obsm_key, genes,
              gp: GPSettings, fdr: FDRSettings, filter: FilterSettings, storage: StorageSettings,
              output: OutputSettings, compute: ComputeSettings, client) -> dict[str, Any] | None:
    t_start = time.perf_counter()
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

    names = runs.output_field_names(rk, condition1, condition2)
    n_null = fdr.resolved_null_genes()
    use_fdr = n_null > 0
    roles = ["mahalanobis", "mean_lfc", "std1", "std2"]
    if use_fdr:
        roles += ["local_fdr", "is_de"]
    layer_roles = ["imputed1", "imputed2", "fold_change"] if storage.store_layers else []
    roles += layer_roles
    uns_entry = store.read_uns_json(runs.HISTORY_KEY)
    history = runs.load_history(uns_entry)
    tracking = runs.load_field_tracking(uns_entry)
    _check_overwrites(store, names, roles, history, tracking, storage)

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
        ls, Z, landmark_source = engine.prepare_model(
            c, X_raw[mask1], np.vstack([X[mask1], X[mask2]]), ls=gp.ls, ls_factor=gp.ls_factor,
            landmarks=gp.landmarks, n_landmarks=gp.n_landmarks, random_state=gp.random_state,
        )
        try:
            res = engine.run_engine(
                c, store, info, X=X, codes=codes, pred=filter_mask, selected=selected, Z=Z, ls=ls,
                sigma=gp.sigma, eps=gp.eps, null_sources=null_sources, null_seeds=null_seeds,
                layer_names=layer_names, layer_dtype=storage.layer_dtype, dtype=compute.dtype,
                cell_chunk=compute.cell_chunk, gene_block=compute.gene_block,
                null_gene_block=compute.null_gene_block, progress=output.progress,
            )
        except engine.NonFiniteExpressionError as exc:
            raise engine.NonFiniteExpressionError(
                exc.columns, [str(var.index[i]) for i in exc.columns], exc.as_null_source
            ) from None
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
    descriptions = runs.field_descriptions(condition1, condition2, fdr.threshold)
    field_mapping = {
        names[r]: {"location": runs.FIELD_LOCATIONS[r], "type": descriptions[r][0], "description": descriptions[r][1]}
        for r in roles
    }
    landmarks_info = {
        "shape": list(Z.shape), "dtype": str(Z.dtype), "source": landmark_source,
        "n_landmarks": int(Z.shape[0]), "timestamp": datetime.now().isoformat(),
    }
    record = {
        "run_id": run_id,
        "timestamp": datetime.now().isoformat(),
        "function": "kompot_dask.de",
        "analysis_type": "de",
        "result_key": rk,
        "lfc_key": names["mean_lfc"],
        "mahalanobis_key": names["mahalanobis"],
        "fdr_keys": {"local_fdr_key": names["local_fdr"], "is_de_key": names["is_de"]} if use_fdr else {},
        "fdr_results": fdr_summary,
        "imputed_layer_keys": {"condition1": names["imputed1"], "condition2": names["imputed2"],
                               "fold_change": names["fold_change"]} if layer_roles else {},
        "std_keys": {"condition1": names["std1"], "condition2": names["std2"]},
        "field_names": {r: names[r] for r in roles},
        "field_mapping": field_mapping,
        "fields_written": fields_written,
        "uses_sample_variance": False,
        "params": {
            "groupby": groupby, "condition1": condition1, "condition2": condition2,
            "obsm_key": obsm_key, "layer": layer, "genes": genes,
            "gp": gp.to_dict() | {"landmarks": gp.landmarks is not None},
            "fdr": fdr.to_dict() | {"null_genes": n_null},
            "filter": filter.to_dict(), "storage": storage.to_dict(), "output": output.to_dict(),
            "compute": compute.to_dict(),
        },
        "model": {"ls": ls, "n_landmarks": int(Z.shape[0]), "landmark_source": landmark_source,
                  "n_cells_condition1": n1, "n_cells_condition2": n2, "n_null_genes": n_null},
        "layout": {"cell_chunk": res.layout.row_chunk, "gene_block": res.layout.gene_block,
                   "null_gene_block": res.layout.null_gene_block, "kernel_chunk": res.layout.kernel_chunk,
                   "n_tasks": res.n_tasks, "n_workers": n_workers},
        "environment": runs.environment_info(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
    }
    for loc_field in fields_written:
        loc, name = loc_field.split("/", 1)
        tracking.setdefault(loc, {})[name] = run_id
    tracking.setdefault("uns", {})[rk] = run_id
    history.append(record)
    hist_entry = dict(uns_entry)
    hist_entry.update({
        "run_history": runs.to_json(history),
        "last_run_info": runs.to_json(record),
        "anndata_fields": runs.to_json(tracking),
    })
    uns_updates: dict[str, dict[str, Any]] = {}
    rk_entry = hist_entry if rk == runs.HISTORY_KEY else dict(store.read_uns_json(rk))
    rk_entry["landmarks_info"] = runs.to_json(landmarks_info)
    if storage.store_landmarks:
        rk_entry["landmarks"] = np.asarray(Z)
    for entry in (hist_entry, rk_entry):
        for k, v in list(entry.items()):
            if isinstance(v, dict | list):
                entry[k] = runs.to_json(v)
    uns_updates[runs.HISTORY_KEY] = hist_entry
    if rk != runs.HISTORY_KEY:
        uns_updates[rk] = rk_entry
    try:
        store.commit(staged_by_name, obs_cols, var_cols, uns_updates)
    except BaseException:
        store.discard_staged(list(staged_by_name.values()))
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


def _check_overwrites(store: Store, names: dict[str, str], roles: list[str], history: list[dict],
                      tracking: dict, storage: StorageSettings) -> None:
    existing = []
    for r in roles:
        loc = runs.FIELD_LOCATIONS[r]
        present = {"var": store.var.columns, "obs": store.obs.columns, "layers": store.layer_keys()}[loc]
        if names[r] in present:
            existing.append(f"{loc}.{names[r]}")
    if not existing or storage.overwrite is True:
        return
    prev_id = tracking.get("uns", {}).get(storage.result_key)
    prev = next((h for h in history if h.get("run_id") == prev_id), history[-1] if history else None)
    where = ""
    if prev is not None:
        p = prev.get("params", {})
        where = (f" Previous run was at {prev.get('timestamp')} comparing "
                 f"{p.get('condition1')} to {p.get('condition2')}.")
    shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
    msg = (f"Differential expression results with result_key={storage.result_key!r} already exist in the dataset."
           f"{where} Fields that will be overwritten: {shown}")
    if storage.overwrite is False:
        raise ValueError(msg + ". Use a different StorageSettings(result_key=...) or overwrite=True.")
    logger.warning("%s Set overwrite=False to prevent overwriting or overwrite=True to silence this message.", msg)
