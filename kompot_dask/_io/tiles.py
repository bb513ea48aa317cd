"""Tile reads of expression elements and region writes into staged arrays (on workers).

Readers are small picklable objects that open the zarr arrays lazily, once per process.
Before a read, the chunk files it touches are checked against the element's chunk
manifest (:mod:`.manifest`), and a chunk that fails to decode is named; both raise
:class:`~kompot_dask._io.manifest.StoreIntegrityError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import zarr

if TYPE_CHECKING:
    from .manifest import ChunkGuard


@dataclass(frozen=True)
class LayerInfo:
    """What the expression element looks like on disk."""

    elem_path: str  # "X" or "layers/<name>"
    kind: str  # "dense", "csr" or "csc"
    shape: tuple[int, int]
    dtype: np.dtype
    chunks: tuple[int, int] | None  # dense only
    nnz: int | None = None  # sparse only: stored values


def clear_caches() -> None:
    """Forget opened arrays (after the store's tree changed)."""
    _open_array_cached.cache_clear()
    _open_group_cached.cache_clear()
    _csc_columns.cache_clear()
    from .manifest import clear_guards

    clear_guards()


@lru_cache(maxsize=32)
def _open_array_cached(store_path: str, elem_path: str, mode: str) -> Any:
    return zarr.open_array(store=store_path, path=elem_path, mode=mode)


@lru_cache(maxsize=8)
def _open_group_cached(store_path: str, elem_path: str) -> Any:
    return zarr.open_group(store=store_path, path=elem_path, mode="r", use_consolidated=False)


def _guard(store_path: str, elem_path: str, kind: str) -> ChunkGuard:
    # Imported here: manifest imports store, which imports this module first.
    from .manifest import ID_ATTR, guard_for

    if kind == "dense":
        arr = _open_array_cached(store_path, elem_path, "r")
        return guard_for(store_path, elem_path, arr.attrs.get(ID_ATTR), lambda: {"": arr})
    group = _open_group_cached(store_path, elem_path)
    # group[name] reads the array's metadata from disk: only when the guard is (re)built
    return guard_for(store_path, elem_path, group.attrs.get(ID_ATTR),
                     lambda: {name: group[name] for name in ("data", "indices", "indptr")})


def _checked_read(guard: ChunkGuard, array: str, region: tuple, read: Any) -> np.ndarray:
    """``read()`` of ``region`` of one array of the element, after checking the chunk
    files it touches; a decoding failure is re-raised naming the chunk."""
    touched = guard.touched(array, region)
    guard.check(array, touched)
    try:
        return np.asarray(read())
    except MemoryError:
        raise
    except Exception as exc:  # codecs raise many types (blosc/zstd RuntimeError, ValueError, ...)
        damaged = guard.diagnose(array, touched)
        if damaged is None:
            raise  # no touched chunk fails alone for its content: not a damaged chunk
        raise damaged from exc


@dataclass(frozen=True)
class TileReader:
    """Reads (row range × column set) tiles of an expression element; picklable, opened
    lazily on whichever worker uses it."""

    store_path: str
    info: LayerInfo

    def __post_init__(self) -> None:
        # Runs where the reader is built (the client), not where it is unpickled: says
        # there, once, whether the element's chunks can be checked.
        _guard(self.store_path, self.info.elem_path, self.info.kind)

    def read(self, r0: int, r1: int, cols: slice | np.ndarray) -> np.ndarray:
        """Dense float tile of rows ``r0:r1`` and columns ``cols`` (a slice or sorted indices).

        Raises
        ------
        StoreIntegrityError
            A chunk file the tile needs is missing, has another size than its manifest
            records, or cannot be decoded.
        """
        kind = self.info.kind
        guard = _guard(self.store_path, self.info.elem_path, kind)
        if kind == "dense":
            arr = _open_array_cached(self.store_path, self.info.elem_path, "r")
            if isinstance(cols, slice):
                return _checked_read(guard, "", (slice(r0, r1), cols), lambda: arr[r0:r1, cols])
            idx = np.asarray(cols)
            return _checked_read(guard, "", (slice(r0, r1), idx), lambda: arr.oindex[slice(r0, r1), idx])
        group = _open_group_cached(self.store_path, self.info.elem_path)
        if kind == "csr":
            indptr = _checked_read(guard, "indptr", ((r0, r1 + 1),), lambda: group["indptr"][r0 : r1 + 1])
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = _checked_read(guard, "data", ((lo, hi),), lambda: group["data"][lo:hi])
            indices = _checked_read(guard, "indices", ((lo, hi),), lambda: group["indices"][lo:hi])
            mat = sp.csr_matrix((data, indices, indptr - lo), shape=(r1 - r0, self.info.shape[1]))
            return np.asarray(mat[:, cols].toarray())
        # csc: read the needed columns over all rows, then cut the rows.
        col_idx = np.arange(self.info.shape[1])[cols] if isinstance(cols, slice) else np.asarray(cols)
        return _csc_columns(self.store_path, self.info.elem_path, self.info.shape, tuple(col_idx.tolist()))[r0:r1]


@lru_cache(maxsize=2)
def _csc_columns(store_path: str, elem_path: str, shape: tuple[int, int], cols: tuple[int, ...]) -> np.ndarray:
    """Dense (all cells × cols) from a CSC element: one contiguous read of the column span."""
    group = _open_group_cached(store_path, elem_path)
    guard = _guard(store_path, elem_path, "csc")
    idx = np.asarray(cols, dtype=np.int64)
    c0, c1 = int(idx.min()), int(idx.max()) + 1
    indptr = _checked_read(guard, "indptr", ((c0, c1 + 1),), lambda: group["indptr"][c0 : c1 + 1]).astype(np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = _checked_read(guard, "data", ((lo, hi),), lambda: group["data"][lo:hi])
    indices = _checked_read(guard, "indices", ((lo, hi),), lambda: group["indices"][lo:hi])
    span = sp.csc_matrix((data, indices, indptr - lo), shape=(shape[0], c1 - c0))
    return np.asarray(span[:, idx - c0].toarray())


def write_tile(store_path: str, elem_path: str, r0: int, r1: int, c0: int, c1: int, tile: np.ndarray) -> None:
    """Region write of one tile into a staged array (called on workers)."""
    arr = _open_array_cached(store_path, elem_path, "r+")
    arr[r0:r1, c0:c1] = tile
