"""Convert an ``.h5ad`` file or an in-memory AnnData into a zarr store laid out for gene blocks.

Dense expression matrices (X and layers) are written as tiles of ``(cell_chunk, gene_chunk)``
so that a gene-block task reads whole chunks and nothing else. Sparse ones stay sparse
(CSR or CSC, in anndata's own encoding, ``data``/``indices`` in chunks of
:data:`SPARSE_CHUNK` values): a DE run transposes a CSR element once in its staging, and
its projections cost m · nnz. Every source is streamed block by block along its major
axis, so no cells × genes array is ever held in memory. Everything
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
SPARSE_CHUNK = 2**20
"""Stored values per chunk of a sparse element's ``data`` and ``indices``."""
_SPARSE_BLOCK_VALUES = 2**23
"""Stored values per block streamed from a sparse source."""
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


def _sparse_format(matrix: Any) -> str | None:
    """"csr" / "csc" for a scipy or anndata-backed sparse matrix, None for dense ones."""
    fmt = getattr(matrix, "format", None)
    return fmt if fmt in ("csr", "csc") and (sp.issparse(matrix) or hasattr(matrix, "group")) else None


def _stored_values(matrix: Any) -> int:
    if sp.issparse(matrix):
        return int(matrix.nnz)
    return int(matrix.group["data"].shape[0])  # an anndata-backed sparse dataset


def write_sparse_element(
    root: zarr.Group, elem_path: str, matrix: Any, shape: tuple[int, int], fmt: str, dtype: np.dtype,
    progress: bool = True,
) -> None:
    """Stream a sparse ``matrix`` (scipy, or anndata's backed dataset) into a sparse element
    of the same format, in anndata's encoding: the first block with anndata's element
    writer, the next ones appended along the major axis (rows of a CSR, columns of a CSC)."""
    parent_path, _, name = elem_path.rpartition("/")
    parent = root[parent_path] if parent_path else root
    major = shape[0] if fmt == "csr" else shape[1]
    per_major = _stored_values(matrix) / max(1, major)
    step = max(1, int(_SPARSE_BLOCK_VALUES // max(per_major, 1.0)))
    convert = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    starts = range(0, major, step) if major else [0]
    with progress_bar(len(starts), f"ingest {elem_path}", "block", progress) as bar:
        for a in starts:
            b = min(a + step, major)
            block = convert(matrix[a:b] if fmt == "csr" else matrix[:, a:b]).astype(dtype, copy=False)
            if a == 0:
                ad.io.write_elem(parent, name, block, dataset_kwargs={"chunks": (SPARSE_CHUNK,)})
            else:
                ad.io.sparse_dataset(parent[name]).append(block)
            bar.update(1)
    parent[name].attrs[ID_ATTR] = new_manifest_id()


def _write_element(root, elem_path, matrix, shape, cell_chunk, gene_chunk, dtype, keep_sparse, progress) -> None:
    fmt = _sparse_format(matrix) if keep_sparse else None
    if fmt is not None:
        write_sparse_element(root, elem_path, matrix, shape, fmt, dtype, progress)
    else:
        write_dense_element(root, elem_path, matrix, shape, cell_chunk, gene_chunk, dtype, progress)


def ingest(
    src: str | os.PathLike | ad.AnnData,
    dest: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    include_x: bool = True,
    cell_chunk: int = DEFAULT_CELL_CHUNK,
    gene_chunk: int = DEFAULT_GENE_CHUNK,
    overwrite: bool = False,
    keep_sparse: bool = True,
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
    keep_sparse
        Write sparse matrices sparse, in their own format (default). ``False`` writes
        them as dense tiles, which is only worth their size for data with more than ~12 %
        stored values (above that, DE runs multiply tiles dense anyway).

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
        written = _ingest_anndata(src, dest, layers, include_x, cell_chunk, gene_chunk, keep_sparse, progress)
    else:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source {path!r} does not exist")
        written = _ingest_h5ad(path, dest, layers, include_x, cell_chunk, gene_chunk, keep_sparse, progress)
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


def _ingest_anndata(adata, dest, layers, include_x, cell_chunk, gene_chunk, keep_sparse, progress) -> list[str]:
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
        _write_element(root, "X", adata.X, adata.shape, cell_chunk, gene_chunk, _target_dtype(adata.X.dtype),
                       keep_sparse, progress)
        written.append("X")
    for k in chosen:
        mat = adata.layers[k]
        _write_element(root, f"layers/{k}", mat, adata.shape, cell_chunk, gene_chunk, _target_dtype(mat.dtype),
                       keep_sparse, progress)
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


def _ingest_h5ad(path, dest, layers, include_x, cell_chunk, gene_chunk, keep_sparse, progress) -> list[str]:
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
            _write_element(root, "X", mat, shape, cell_chunk, gene_chunk, _target_dtype(dt), keep_sparse, progress)
            written.append("X")
        for k in chosen:
            mat, dt = _h5_matrix(f["layers"][k])
            _write_element(root, f"layers/{k}", mat, shape, cell_chunk, gene_chunk, _target_dtype(dt), keep_sparse,
                           progress)
            written.append(f"layers/{k}")
        return written
