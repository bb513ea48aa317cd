"""FDR after the fact: a run's distances as a null for another run, and the FDR of a run
recomputed against a new null (kompot 0.8.0's ``extract_null_distribution`` and
``recompute_fdr``).

A typical use: a control comparison (two batches of the same condition) gives distances
that no biology separates; they are a null for the real comparison::

    null = kd.extract_null_distribution("atlas.zarr", run_id=0)    # control vs control
    table = kd.recompute_fdr("atlas.zarr", null, run_id=1)           # the real comparison
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from .._io import commit
from .._io.lease import store_lock
from .._io.store import Store
from .._numerics import fdr as fdr_mod
from .history import RunSource, read_history
from .record import HISTORY_KEY, encode_entry

logger = logging.getLogger("kompot_dask")

_UPDATED_ROLES = ("local_fdr", "is_de", "pvalue", "tail_fdr")
"""The run's var columns that a recomputed FDR replaces, where the run wrote them."""


def _distances(source: RunSource, run_id: int) -> tuple[int, str, pd.Series]:
    """(resolved run id, its Mahalanobis column, that column over all genes)."""
    history = read_history(source, "de")
    rid = history.resolve(run_id)
    names = history.runs[rid].role_names()
    if "mahalanobis" not in names:
        raise KeyError(f"run {rid} of {history.label} wrote no Mahalanobis distances (it ran with "
                       "OutputSettings(compute_mahalanobis=False)); pass the run_id of a run that did")
    column = names["mahalanobis"]
    if source.is_store:
        var = source.handle.var if isinstance(source.handle, Store) else Store(source.path).var
    else:
        var = source.adata.var
    if column not in var.columns:
        raise KeyError(f"var column {column!r} of run {rid} is no longer in {history.label} (removed by cleanup "
                       "or by hand); rerun the comparison")
    return rid, column, var[column].astype(float)


def extract_null_distribution(data: Any, run_id: int = -1, result_key: str | None = None) -> np.ndarray:
    """The Mahalanobis distances of run ``run_id`` (genes it did not test left out), for use
    as the null of another run with :func:`recompute_fdr`.

    Parameters
    ----------
    data
        Store path, :class:`~kompot_dask.store.Store` or in-memory AnnData.
    run_id
        The run (negative ids count back from the latest).
    result_key
        Accepted for kompot's signature; runs are found through the run history.
    """
    _, _, d = _distances(RunSource(data), run_id)
    values = d.to_numpy()
    return values[~np.isnan(values)]


def recompute_fdr(data: Any, null_mahalanobis: Any, threshold: float = 0.05, run_id: int = -1,
                  result_key: str | None = None, inplace: bool = True) -> pd.DataFrame:
    """The FDR of run ``run_id`` against the null distances ``null_mahalanobis``.

    Parameters
    ----------
    data
        Store path, :class:`~kompot_dask.store.Store` or in-memory AnnData.
    null_mahalanobis
        Null distances (e.g. :func:`extract_null_distribution` of a control comparison).
    threshold
        ``is_de`` is ``local_fdr < threshold``.
    run_id
        The run whose distances are tested.
    result_key
        Accepted for kompot's signature; runs are found through the run history.
    inplace
        Replace the run's ``local_fdr`` and ``is_de`` var columns (and ``pvalue`` /
        ``tail_fdr`` where it wrote them) by the new values, in one journaled change of the
        store, and note it in the run history (``uns["kompot_de"]["fdr_recomputed"]``).
        kompot 0.8.0 updates only ``is_de`` here (its column-type lookup misses the others);
        kompot_dask updates every FDR column the run wrote. A run without FDR columns gets
        none: the table is returned.

    Returns
    -------
    pandas.DataFrame indexed by var names: ``mahalanobis``, ``pvalue``, ``local_fdr``,
    ``tail_fdr``, ``is_de`` (NaN / False for genes the run did not test).
    """
    null = np.asarray(null_mahalanobis, dtype=float).ravel()
    if null.size < 2 or not np.all(np.isfinite(null)):
        raise ValueError(f"null_mahalanobis has {null.size} value(s)"
                         f"{'' if np.all(np.isfinite(null)) else ', some not finite'}; expected at least 2 "
                         "finite distances (e.g. kompot_dask.extract_null_distribution(data, run_id=<a control run>))")
    if not (isinstance(threshold, int | float) and 0 < threshold < 1):
        raise ValueError(f"threshold={threshold!r} must be a number in (0, 1)")
    source = RunSource(data)
    if source.is_store and inplace:
        with store_lock(source.path, "kompot_dask.recompute_fdr"):
            return _recompute(RunSource(Store(source.path)), null, threshold, run_id, inplace, data)
    return _recompute(source, null, threshold, run_id, inplace, data)


def _recompute(source: RunSource, null: np.ndarray, threshold: float, run_id: int, inplace: bool,
               data: Any) -> pd.DataFrame:
    rid, column, d = _distances(source, run_id)
    tested = ~np.isnan(d.to_numpy())
    result = fdr_mod.compute_fdr(d.to_numpy()[tested], null, threshold)
    n = len(d)
    table = pd.DataFrame({"mahalanobis": d.to_numpy(), "pvalue": np.full(n, np.nan),
                          "local_fdr": np.full(n, np.nan), "tail_fdr": np.full(n, np.nan),
                          "is_de": np.zeros(n, dtype=bool)}, index=d.index)
    for col in ("pvalue", "local_fdr", "tail_fdr", "is_de"):
        table.loc[tested, col] = getattr(result, col)
    logger.info("FDR of run %d recomputed against %d null distances: %d/%d genes DE at local FDR < %s",
                rid, null.size, int(table["is_de"].sum()), int(tested.sum()), threshold)
    if not inplace:
        return table
    record = read_history(source, "de").runs[rid]
    if record.fdr_mode not in (None, "raw"):
        raise ValueError(f"run {rid}'s is_de comes from FDRSettings(mode={record.fdr_mode!r}); recompute_fdr tests "
                         "its raw distances against given null distances (kompot's raw mode), which would leave its "
                         "residual columns disagreeing with is_de. Pass inplace=False for the table, or rerun the "
                         "comparison with FDRSettings(mode='raw', null_mahalanobis=...)")
    names = record.role_names()
    present = set(source.handle.field_names("var")) if source.is_store else set(source.adata.var.columns)
    updates = {names[r]: table[r].to_numpy() for r in _UPDATED_ROLES if r in names and names[r] in present}
    if not updates:
        logger.info("Run %d wrote no FDR columns (it ran without null genes): nothing replaced, the table is "
                    "returned", rid)
        return table
    entry = source.uns_entry(HISTORY_KEY)
    notes = dict(entry.get("fdr_recomputed") or {})
    notes[str(rid)] = {"timestamp": datetime.now().isoformat(timespec="seconds"), "threshold": float(threshold),
                       "n_null": int(null.size), "columns": sorted(updates),
                       "n_significant": int(table["is_de"].sum())}
    history = encode_entry({**entry, "fdr_recomputed": notes})
    if source.is_store:
        store = source.handle
        staging = commit.Staging.create(store.path)
        try:
            store.commit(staging, layers={}, obs_columns={}, var_columns=updates, uns_updates={HISTORY_KEY: history})
        except BaseException:
            if not commit.commit_state(store.path)[0]:
                staging.remove()
            raise
        if isinstance(data, Store):
            data._reopen()
    else:
        for col, values in updates.items():
            source.adata.var[col] = values
        source.adata.uns[HISTORY_KEY] = history
    logger.info("Replaced %s of run %d", ", ".join(sorted(updates)), rid)
    return table
