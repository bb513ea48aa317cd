"""Tile reads of expression elements and region writes into staged arrays (on workers).

Readers are small picklable objects that open the zarr arrays lazily, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr


@dataclass(frozen=True)
class LayerInfo:
    """What the expression element looks like on disk."""

    elem_path: str  # "X" or "layers/<name>"
    kind: str  # "dense", "csr" or "csc"
    shape: tuple[int, int]
    dtype: np.dtype
    chunks: tuple[int, int] | None  # dense only


def clear_caches() -> None:
    """Forget opened arrays (after the store's tree changed)."""
    _open_array_cached.cache_clear()
    _open_group_cached.cache_clear()
    _csc_columns.cache_clear()


@lru_cache(maxsize=32)
def _open_array_cached(store_path: str, elem_path: str, mode: str) -> Any:
    return zarr.open_array(store=store_path, path=elem_path, mode=mode)


@lru_cache(maxsize=8)
def _open_group_cached(store_path: str, elem_path: str) -> Any:
    return zarr.open_group(store=store_path, path=elem_path, mode="r", use_consolidated=False)


@dataclass(frozen=True)
class TileReader:
    """Reads (row range × column set) tiles of an expression element; picklable, opened
    lazily on whichever worker uses it."""

    store_path: str
    info: LayerInfo

    def read(self, r0: int, r1: int, cols: slice | np.ndarray) -> np.ndarray:
        """Dense float tile of rows ``r0:r1`` and columns ``cols`` (a slice or sorted indices)."""
        kind = self.info.kind
        if kind == "dense":
            arr = _open_array_cached(self.store_path, self.info.elem_path, "r")
            if isinstance(cols, slice):
                return np.asarray(arr[r0:r1, cols])
            return np.asarray(arr.oindex[slice(r0, r1), np.asarray(cols)])
        group = _open_group_cached(self.store_path, self.info.elem_path)
        if kind == "csr":
            indptr = np.asarray(group["indptr"][r0 : r1 + 1])
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = np.asarray(group["data"][lo:hi])
            indices = np.asarray(group["indices"][lo:hi])
            mat = sp.csr_matrix((data, indices, indptr - lo), shape=(r1 - r0, self.info.shape[1]))
            return np.asarray(mat[:, cols].toarray())
        # csc: read the needed columns over all rows, then cut the rows.
        col_idx = np.arange(self.info.shape[1])[cols] if isinstance(cols, slice) else np.asarray(cols)
        return _csc_columns(self.store_path, self.info.elem_path, self.info.shape, tuple(col_idx.tolist()))[r0:r1]


@lru_cache(maxsize=2)
def _csc_columns(store_path: str, elem_path: str, shape: tuple[int, int], cols: tuple[int, ...]) -> np.ndarray:
    """Dense (all cells × cols) from a CSC element: one contiguous read of the column span."""
    group = _open_group_cached(store_path, elem_path)
    idx = np.asarray(cols, dtype=np.int64)
    c0, c1 = int(idx.min()), int(idx.max()) + 1
    indptr = np.asarray(group["indptr"][c0 : c1 + 1]).astype(np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    span = sp.csc_matrix(
        (np.asarray(group["data"][lo:hi]), np.asarray(group["indices"][lo:hi]), indptr - lo),
        shape=(shape[0], c1 - c0),
    )
    return np.asarray(span[:, idx - c0].toarray())


def write_tile(store_path: str, elem_path: str, r0: int, r1: int, c0: int, c1: int, tile: np.ndarray) -> None:
    """Region write of one tile into a staged array (called on workers)."""
    arr = _open_array_cached(store_path, elem_path, "r+")
    arr[r0:r1, c0:c1] = tile
