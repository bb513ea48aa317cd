"""A run's results as one labelled, lazy :class:`xarray.Dataset`.

Per-gene statistics and per-cell standard deviations are small and read at once; the
imputed and fold-change layers stay on disk as dask arrays chunked as stored, so a user
can slice, reduce or plot them with xarray and dask without ever holding a cells × genes
array.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._io.source import open_data
from .._io.store import Store
from .fields import ROLES, spec_of
from .history import get_run_fields

logger = logging.getLogger("kompot_dask")

_DIMS = {"var": ("gene",), "obs": ("cell",), "layers": ("cell", "gene")}
_IN_MEMORY_ROWS = 16_384
"""Rows per dask chunk of an in-memory layer (a store's layers keep their own chunks)."""


def results(data: Any, run_id: int = -1, *, analysis_type: str = "de", layers: bool = True) -> Any:
    """The fields a DE run wrote, as an :class:`xarray.Dataset` with named dimensions.

    Parameters
    ----------
    data
        Store path (or ``file://`` URL), :class:`~kompot_dask.store.Store` or an AnnData
        that went through :func:`kompot_dask.de`.
    run_id
        Run to read (``-1``: the latest); its field names come from the run history.
    analysis_type
        ``"de"``.
    layers
        Include the cells × genes layers (lazy dask arrays); ``False`` gives the per-gene
        and per-cell variables only.

    Returns
    -------
    xarray.Dataset
        Dimensions ``cell`` (obs names) and ``gene`` (var names). One variable per field
        role the run wrote and the data still holds: ``mahalanobis``, ``mean_lfc``,
        ``local_fdr``, ``is_de`` (gene); ``std1``, ``std2`` (cell); ``imputed1``,
        ``imputed2``, ``fold_change`` (cell × gene, dask arrays read from the store
        chunk by chunk). Each variable's attrs give its ``field`` name, ``location``,
        ``description`` and ``written_by_run`` (the run whose values it holds now: a
        later run may have overwritten it, with a warning). The dataset's attrs give the
        run's ``run_id``, conditions, ``groupby``, ``layer``, ``obsm_key`` and ``source``.
    """
    import xarray as xr

    source = open_data(data, Store)
    fields = get_run_fields(source, run_id, analysis_type, roles=None)
    is_store = isinstance(source, Store)
    coords = {"cell": np.asarray(source.obs.index.astype(str)), "gene": np.asarray(source.var.index.astype(str))}
    variables: dict[str, Any] = {}
    for role in ROLES:
        name = fields.get(role)
        if name is None:
            continue
        location = fields.locations[role]
        if (location == "layers" and not layers) or location in ("varm", "obsp"):  # not cell × gene: anndata reads them
            continue
        values = _field_values(source, is_store, location, name)
        if values is None:
            logger.warning("results: field %r (%s) of run %d is no longer in the data; left out.",
                           name, location, fields.run_id)
            continue
        spec = spec_of(role)
        attrs = {"field": name, "location": location,
                 "description": spec.describe(fields.condition1, fields.condition2,
                                              _threshold(fields)),
                 "written_by_run": _writer(fields, role)}
        variables[role] = xr.Variable(_DIMS[location], values, attrs=attrs)
    params = fields.params
    attrs = {"run_id": int(fields.run_id), "analysis_type": analysis_type,
             "condition1": str(fields.condition1), "condition2": str(fields.condition2),
             "groupby": str(params.get("groupby")), "layer": str(params.get("layer")),
             "obsm_key": str(params.get("obsm_key")),
             "source": source.path if is_store else "in-memory AnnData"}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _threshold(fields: Any) -> float:
    fdr = fields.params.get("fdr") or {}
    return float(fdr.get("threshold", 0.05)) if isinstance(fdr, dict) else 0.05


def _writer(fields: Any, role: str) -> int:
    writer = fields.writers.get(role)
    return int(fields.run_id if writer is None else writer)


def _field_values(source: Any, is_store: bool, location: str, name: str) -> Any:
    """The field's values: a numpy array for obs/var columns, a dask array for a layer;
    ``None`` when the data no longer holds it."""
    import dask.array as da

    if location in ("obs", "var"):
        frame = getattr(source, location)
        if name not in frame.columns:
            return None
        column = frame[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            column = column.astype(object)
        return column.to_numpy()
    if is_store:
        if name not in source.layer_keys():
            return None
        return da.from_zarr(source.root["layers"][name])
    if name not in source.layers:
        return None
    layer = source.layers[name]
    rows = min(_IN_MEMORY_ROWS, max(1, layer.shape[0]))
    if sp.issparse(layer):
        return da.from_array(layer, chunks=(rows, -1), asarray=False).map_blocks(
            lambda block: np.asarray(block.toarray()), dtype=layer.dtype)
    if isinstance(layer, da.Array):
        return layer
    return da.from_array(np.asarray(layer), chunks=(rows, -1))
