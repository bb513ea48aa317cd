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
        ``"location/name"`` of each field the run wrote (var and obs columns, layers).
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
    for key in uns_keys:
        if "uns" in store.root and key in store.root["uns"]:
            adata.uns[key] = ad.io.read_elem(store.root["uns"][key])
