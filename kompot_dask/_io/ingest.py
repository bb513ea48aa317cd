"""Convert an ``.h5ad`` file or an in-memory AnnData into a zarr store laid out for gene blocks.

Expression matrices (X and layers) are written as dense tiles of ``(cell_chunk, gene_chunk)``
so that a gene-block task reads whole chunks and nothing else; the source is streamed
row block by row block, so no cells × genes array is ever held in memory. Everything
else (obs, var, obsm, varm, obsp, uns) is written with anndata's own element writers.
Each expression element gets a chunk manifest (:mod:`.manifest`), so that tile reads can
tell a lost chunk file from a legitimately empty one.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import zarr

from .._progress import progress as progress_bar
from .manifest import ID_ATTR, new_manifest_id, record_manifest

logger = logging.getLogger("kompot_dask")

DEFAULT_CELL_CHUNK = 4096
DEFAULT_GENE_CHUNK = 256
_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


def _row_blocks(matrix: Any, n_obs: int, step: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for r0 in range(0, n_obs, step):
        r1 = min(r0 + step, n_obs)
        block = matrix[r0:r1]
        if sp.issparse(block):
            block = block.toarray()
        yield r0, r1, np.asarray(block)


def _target_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return dtype
    return np.dtype(np.float32)


def write_dense_element(
    root: zarr.Group, elem_path: str, matrix: Any, shape: tuple[int, int],
    cell_chunk: int, gene_chunk: int, dtype: np.dtype, progress: bool = True,
) -> None:
    """Stream ``matrix`` (dense, sparse, h5py or backed) into a chunked dense array.

    The array carries a fresh ``kompot_manifest_id`` attribute, which the manifest written
    after the ingest (:func:`record_manifest`) takes over.
    """
    parent_path, _, name = elem_path.rpartition("/")
    parent = root[parent_path] if parent_path else root
    chunks = (min(cell_chunk, shape[0]), min(gene_chunk, shape[1]))
    attrs = dict(_ARRAY_ATTRS, **{ID_ATTR: new_manifest_id()})
    arr = parent.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, attributes=attrs)
    blocks = _row_blocks(matrix, shape[0], chunks[0])
    with progress_bar(-(-shape[0] // chunks[0]), f"ingest {elem_path}", "chunk", progress) as bar:
        for r0, r1, block in blocks:
            arr[r0:r1, :] = block.astype(dtype, copy=False)
            bar.update(1)


def ingest(
    src: str | os.PathLike | ad.AnnData,
    dest: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    include_x: bool = True,
    cell_chunk: int = DEFAULT_CELL_CHUNK,
    gene_chunk: int = DEFAULT_GENE_CHUNK,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write ``src`` as a zarr AnnData store at ``dest`` with gene-block-friendly layers.

    Parameters
    ----------
    src
        An ``.h5ad`` path (read element by element, matrices streamed) or an AnnData.
    dest
        Path of the new zarr store.
    layers
        Layers to convert (default: all). Other layers are not copied.
    include_x
        Also convert X.
    cell_chunk, gene_chunk
        Tile shape of the dense expression arrays.
    overwrite
        Replace an existing ``dest``.

    Returns
    -------
    The store path.
    """
    dest = os.path.abspath(os.fspath(dest))
    if os.path.exists(dest):
        if not overwrite:
            raise FileExistsError(f"{dest!r} already exists; pass overwrite=True to replace it")
        shutil.rmtree(dest)
    if cell_chunk < 1 or gene_chunk < 1:
        raise ValueError(f"cell_chunk={cell_chunk} and gene_chunk={gene_chunk} must be positive")
    if isinstance(src, ad.AnnData):
        written = _ingest_anndata(src, dest, layers, include_x, cell_chunk, gene_chunk, progress)
    else:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source {path!r} does not exist")
        written = _ingest_h5ad(path, dest, layers, include_x, cell_chunk, gene_chunk, progress)
    zarr.consolidate_metadata(dest)
    # After consolidating: the manifests' hidden directory is not a zarr node, and every
    # element already carries its manifest id, so no attribute changes after this.
    for elem_path in written:
        record_manifest(dest, elem_path)
    logger.info("Wrote %s", dest)
    return dest


def write_generated_store(
    dest: str, skeleton: ad.AnnData, layer: str, shape: tuple[int, int], chunks: tuple[int, int],
    row_block: Any,
) -> str:
    """A store whose expression layer is generated one row block at a time (synthetic data
    for tests, benchmarks and the demo): ``row_block(r0, r1)`` returns rows ``r0:r1``.
    Nothing cells × genes is held in memory."""
    _write_skeleton(skeleton, dest)
    root = zarr.open_group(dest, mode="r+", use_consolidated=False)
    layers = root.require_group("layers")
    layers.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    arr = layers.create_array(layer, shape=shape, chunks=chunks, dtype="float32", fill_value=0,
                              attributes=dict(_ARRAY_ATTRS))
    for r0 in range(0, shape[0], chunks[0]):
        r1 = min(r0 + chunks[0], shape[0])
        arr[r0:r1, :] = row_block(r0, r1)
    zarr.consolidate_metadata(dest)
    return dest


def _write_skeleton(skel: ad.AnnData, dest: str) -> None:
    # zarr format 2 on purpose (readable by every anndata ≥ 0.8 and R tools); silence the
    # notice that anndata's default will change.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Writing zarr v2 data", category=UserWarning)
        skel.write_zarr(dest)


def _skeleton(obs, var, obsm, varm, obsp, uns) -> ad.AnnData:
    return ad.AnnData(obs=obs, var=var, obsm=obsm, varm=varm, obsp=obsp, uns=uns)


def _ingest_anndata(adata, dest, layers, include_x, cell_chunk, gene_chunk, progress) -> list[str]:
    chosen = list(adata.layers.keys()) if layers is None else list(layers)
    missing = [k for k in chosen if k not in adata.layers]
    if missing:
        raise KeyError(f"layers {missing} not in the AnnData; available: {list(adata.layers.keys())}")
    skel = _skeleton(adata.obs, adata.var, dict(adata.obsm), dict(adata.varm), dict(adata.obsp), dict(adata.uns))
    _write_skeleton(skel, dest)
    root = zarr.open_group(dest, mode="r+", use_consolidated=False)
    root.require_group("layers")
    written = []
    if include_x and adata.X is not None:
        write_dense_element(root, "X", adata.X, adata.shape, cell_chunk, gene_chunk, _target_dtype(adata.X.dtype), progress)
        written.append("X")
    for k in chosen:
        mat = adata.layers[k]
        write_dense_element(root, f"layers/{k}", mat, adata.shape, cell_chunk, gene_chunk, _target_dtype(mat.dtype), progress)
        written.append(f"layers/{k}")
    return written


def _h5_matrix(elem: Any) -> tuple[Any, np.dtype]:
    enc = elem.attrs.get("encoding-type", "array")
    if isinstance(enc, bytes):
        enc = enc.decode()
    if enc in ("csr_matrix", "csc_matrix"):
        ds = ad.io.sparse_dataset(elem)
        return ds, np.dtype(elem["data"].dtype)
    return elem, np.dtype(elem.dtype)


def _ingest_h5ad(path, dest, layers, include_x, cell_chunk, gene_chunk, progress) -> list[str]:
    with h5py.File(path, "r") as f:
        if f.attrs.get("encoding-type") not in ("anndata", b"anndata"):
            raise ValueError(f"{path!r} is not an AnnData .h5ad file (no encoding-type='anndata')")
        parts = {}
        for key in ("obs", "var", "obsm", "varm", "obsp", "uns"):
            parts[key] = ad.io.read_elem(f[key]) if key in f else {}
        skel = _skeleton(parts["obs"], parts["var"], parts["obsm"] or None, parts["varm"] or None,
                         parts["obsp"] or None, parts["uns"] or None)
        _write_skeleton(skel, dest)
        root = zarr.open_group(dest, mode="r+", use_consolidated=False)
        root.require_group("layers")
        shape = skel.shape
        available = list(f["layers"].keys()) if "layers" in f else []
        chosen = available if layers is None else list(layers)
        missing = [k for k in chosen if k not in available]
        if missing:
            raise KeyError(f"layers {missing} not in {path!r}; available: {available}")
        written = []
        if include_x and "X" in f:
            mat, dt = _h5_matrix(f["X"])
            write_dense_element(root, "X", mat, shape, cell_chunk, gene_chunk, _target_dtype(dt), progress)
            written.append("X")
        for k in chosen:
            mat, dt = _h5_matrix(f["layers"][k])
            write_dense_element(root, f"layers/{k}", mat, shape, cell_chunk, gene_chunk, _target_dtype(dt), progress)
            written.append(f"layers/{k}")
        return written
