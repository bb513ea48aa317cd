"""The one place that decides what a ``data`` argument is: a store path, an opened store or
an in-memory AnnData.

Every public entry point takes the same ``data``: ``de``/``plan`` (which run on a store,
so an AnnData is first written to a temporary one), the run-history readers (``RunInfo``,
``get_run_fields``, ``cleanup``) and the plots (which read an AnnData as it is).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anndata as ad
import numpy as np

from .store import Store, StoreHandle

logger = logging.getLogger("kompot_dask")

H = TypeVar("H", bound=StoreHandle)


def open_data(data: Any, handle: type[H] = StoreHandle) -> ad.AnnData | H:
    """``data`` as it will be read: the AnnData itself, or the store opened as ``handle``.

    Parameters
    ----------
    data
        A store path or ``file://`` URL, an opened store (:class:`StoreHandle` or
        :class:`Store`), or an ``anndata.AnnData``.
    handle
        What to open a store as: :class:`StoreHandle` reads metadata on demand (run
        histories), :class:`Store` also reads obs and var (plots, runs).

    Returns
    -------
    anndata.AnnData or ``handle``
        An opened store of a weaker kind than asked for is reopened as ``handle``.

    Raises
    ------
    TypeError
        For anything else, saying what is accepted.
    """
    if isinstance(data, ad.AnnData | handle):
        return data
    if isinstance(data, StoreHandle):
        return handle(data.path)
    if isinstance(data, str | os.PathLike):
        return handle(data)
    raise TypeError(
        f"expected a zarr store path (or file:// URL), a kompot_dask Store or an anndata.AnnData, got "
        f"{type(data).__name__}; pass the store path (e.g. 'data.zarr') or the AnnData."
    )


def lazy_store_path(adata: ad.AnnData) -> str | None:
    """The local zarr store that a lazily read AnnData's matrices (X and layers as dask
    arrays, as ``anndata.experimental.read_lazy`` gives them) are read from; ``None`` when
    they come from nowhere or from more than one store."""
    import dask.array as da
    import zarr

    roots: set[str] = set()
    matrices = [adata.X, *(adata.layers[k] for k in adata.layers.keys())]
    for matrix in matrices:
        if not isinstance(matrix, da.Array):
            continue
        for value in matrix.dask.values():
            array = getattr(value, "value", value)
            if isinstance(array, zarr.Array):
                root = getattr(array.store, "root", None)
                if root is None:  # a remote or in-memory zarr store: no path to run on
                    return None
                roots.add(os.path.abspath(str(root)))
    return roots.pop() if len(roots) == 1 else None


def results_store_for(input_path: str | os.PathLike, results_path: str | os.PathLike) -> str:
    """The results store of a run on a read-only ``input_path``: created on first use,
    checked on the next ones; returns its path.

    A results store is a zarr AnnData store of its own, in the input's zarr format: obs and
    var hold the input's names (and then the results' columns), and
    ``uns["kompot_dask_input"]`` says where the input is, so that every reader of the
    results store (runs, plots, ``kd.results``, the CLI) also finds the expression and the
    embedding. Nothing is ever written into the input. The new store appears whole or not
    at all (written beside, then renamed).

    Raises
    ------
    StoreError
        ``results_path`` is the input itself, or an existing store that is not a results
        store of this input.
    """
    import hashlib
    import uuid
    import warnings
    from datetime import datetime

    import pandas as pd

    from .store import RESULTS_INPUT_KEY, StoreError, StoreHandle, _local_path

    source = StoreHandle(input_path)  # the names are enough here: the run opens the input itself
    results = _local_path(results_path)
    rec_input = source.read_uns_json(RESULTS_INPUT_KEY).get("path")
    if rec_input is not None and results == source.path:  # the results store itself (a rerun)
        return results
    if rec_input is not None:
        raise StoreError(f"{source.path} is itself a results store (of {rec_input}); pass its input "
                         f"{rec_input} as the data, or pass {source.path} alone to read its results.")
    if results == source.path:
        raise StoreError(f"the results store {results} is the input store itself: omit the results store to write "
                         "into the input, or pass another path.")
    digest = hashlib.sha256()
    obs_names, var_names = source.names("obs"), source.names("var")
    for index in (obs_names, var_names):
        digest.update("\0".join(map(str, index)).encode())
        digest.update(b"\1")
    names = digest.hexdigest()
    if os.path.exists(results):
        rec = StoreHandle(results).read_uns_json(RESULTS_INPUT_KEY)
        if not rec:
            raise StoreError(
                f"{results} exists and is not a kompot_dask results store (it has no uns[{RESULTS_INPUT_KEY!r}]); "
                "pass a path that does not exist yet (it is created), or that store as the data to write into it."
            )
        if rec.get("path") != source.path or rec.get("names_sha256") != names:
            what = ("holds the results of another input, " + str(rec.get("path"))) if rec.get("path") != source.path \
                else "was made for other cell or gene names of this input"
            raise StoreError(
                f"the results store {results} {what}; pass that input, or a new results store for {source.path}."
            )
        return results
    skeleton = ad.AnnData(
        obs=pd.DataFrame(index=obs_names), var=pd.DataFrame(index=var_names),
        uns={RESULTS_INPUT_KEY: {"path": source.path, "n_obs": len(obs_names), "n_vars": len(var_names),
                                 "names_sha256": names, "created": datetime.now().isoformat(timespec="seconds")}},
    )
    parent = os.path.dirname(results) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(results)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with ad.settings.override(zarr_write_format=source.zarr_format), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Writing zarr v2 data", category=UserWarning)
            skeleton.write_zarr(tmp)
        os.rename(tmp, results)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Created the results store %s for the input %s (read only: nothing is written into it)",
                results, source.path)
    return results


def discard_unused_results_store(path: str) -> bool:
    """Remove a results store that holds nothing yet (no run, no work kept for a resume):
    what a call that created it and then failed, or only planned, leaves behind. Returns
    whether it was removed."""
    from .commit import staged_bytes
    from .store import RESULTS_INPUT_KEY, StoreHandle

    if not os.path.isdir(path):
        return False
    try:
        handle = StoreHandle(path)
        uns = set(handle.root["uns"].keys()) if "uns" in handle.root else set()
        empty = (uns <= {RESULTS_INPUT_KEY} and not handle.field_names("layers")
                 and not handle.field_names("obs") and not handle.field_names("var"))
    except Exception:  # not readable as a results store: leave it alone
        return False
    if not empty or staged_bytes(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


@contextmanager
def run_store(data: Any, layer: str | None) -> Iterator[Store]:
    """The store a run reads and writes.

    For a store, the store itself. For an in-memory AnnData, a temporary store holding its
    obs, var, obsm, uns and the one expression element the run reads (``layer``, or X),
    removed on exit: runs read tiles from disk, and the AnnData gets the results copied
    back by :func:`copy_results`.
    """
    source = open_data(data, Store)
    if not isinstance(source, ad.AnnData):
        yield source
        return
    from .ingest import ingest

    logger.info("Computing an in-memory AnnData (%s cells × %s genes): its obs, var, obsm and the expression "
                "element go to a temporary store, and the results come back into the AnnData. For an atlas, pass "
                "the store's path to compute out of core and write the results there.",
                f"{source.n_obs:,}", f"{source.n_vars:,}")
    tmp = tempfile.mkdtemp(prefix="kompot_dask_")
    try:
        path = os.path.join(tmp, "data.zarr")
        ingest(source, path, layers=[layer] if layer is not None else [], include_x=layer is None, progress=False)
        yield Store(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_results(store: Store, adata: ad.AnnData, fields: list[str], uns_keys: list[str]) -> None:
    """Copy a run's outputs from its temporary ``store`` into ``adata``, as kompot writes them.

    Parameters
    ----------
    fields
        ``"location/name"`` of each field the run wrote (var and obs columns, layers, varm tables).
    uns_keys
        ``uns`` entries to copy (the run history, the result key), where present.
    """
    for loc_field in fields:
        loc, name = loc_field.split("/", 1)
        if loc == "var":
            adata.var[name] = store.var[name].to_numpy()
        elif loc == "obs":
            adata.obs[name] = store.obs[name].to_numpy()
        elif loc == "layers":
            adata.layers[name] = store.read_layer_dense(name)
        elif loc == "obsp":
            adata.obsp[name] = np.asarray(store.root["obsp"][name][...])
        elif loc == "varm":
            table = ad.io.read_elem(store.root["varm"][name])
            adata.varm[name] = table.set_axis(adata.var_names, axis=0) if hasattr(table, "set_axis") else table
    for key in uns_keys:
        if "uns" in store.root and key in store.root["uns"]:
            adata.uns[key] = ad.io.read_elem(store.root["uns"][key])
