"""Tile reads of expression elements and region writes into staged arrays (on workers).

Readers are small picklable objects that open the zarr arrays lazily, once per process.
Before a read, the chunk files it touches are checked against the element's chunk
manifest (:mod:`.manifest`), and a chunk that fails to decode is named; both raise
:class:`~kompot_dask._io.manifest.StoreIntegrityError`.
"""

from __future__ import annotations

import os
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
    _embedding_band.cache_clear()
    _group_piece.cache_clear()
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
        if kind == "dense":
            guard = _guard(self.store_path, self.info.elem_path, kind)
            arr = _open_array_cached(self.store_path, self.info.elem_path, "r")
            if isinstance(cols, slice):
                return _checked_read(guard, "", (slice(r0, r1), cols), lambda: arr[r0:r1, cols])
            idx = np.asarray(cols)
            return _checked_read(guard, "", (slice(r0, r1), idx), lambda: arr.oindex[slice(r0, r1), idx])
        return self.piece(r0, r1, cols).toarray()

    @property
    def sparse(self) -> bool:
        return self.info.kind in ("csr", "csc")

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        """Row ranges a caller that gathers columns over every cell reads at a time: the
        whole element for CSC (its column span is read once anyway), row bands for CSR."""
        n = self.info.shape[0]
        step = n if self.info.kind == "csc" else SPARSE_ROW_BAND
        return tuple((r, min(r + step, n)) for r in range(0, n, max(step, 1))) or ((0, 0),)

    def piece(self, r0: int, r1: int, cols: slice | np.ndarray) -> sp.csr_matrix:
        """Rows ``r0:r1`` and columns ``cols`` (a slice or sorted unique indices) of a
        sparse element, as CSR: a CSR element reads the rows' stored values; a CSC element
        reads the columns over every cell once (cached per process, kept sparse) and cuts
        the rows from that."""
        guard = _guard(self.store_path, self.info.elem_path, self.info.kind)
        group = _open_group_cached(self.store_path, self.info.elem_path)
        if self.info.kind == "csr":
            indptr = _checked_read(guard, "indptr", ((r0, r1 + 1),), lambda: group["indptr"][r0 : r1 + 1])
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = _checked_read(guard, "data", ((lo, hi),), lambda: group["data"][lo:hi])
            indices = _checked_read(guard, "indices", ((lo, hi),), lambda: group["indices"][lo:hi])
            mat = sp.csr_matrix((data, indices, np.asarray(indptr, dtype=np.int64) - lo),
                                shape=(r1 - r0, self.info.shape[1]))
            return mat[:, cols]
        col_idx = np.arange(self.info.shape[1])[cols] if isinstance(cols, slice) else np.asarray(cols)
        return _csc_columns(self.store_path, self.info.elem_path, self.info.shape, tuple(col_idx.tolist()))[r0:r1]


SPARSE_ROW_BAND = 8192
"""Rows of a CSR element read at a time by a caller that gathers some columns over every
cell (a null-gene block when the element is read in place)."""


@lru_cache(maxsize=2)
def _csc_columns(store_path: str, elem_path: str, shape: tuple[int, int], cols: tuple[int, ...]) -> sp.csr_matrix:
    """All cells × ``cols`` of a CSC element, as CSR (row slices are then cheap): one read
    per run of nearby columns (:data:`CSC_COLUMN_GAP`), kept sparse (its stored values,
    not cells × genes)."""
    group = _open_group_cached(store_path, elem_path)
    guard = _guard(store_path, elem_path, "csc")
    idx = np.asarray(cols, dtype=np.int64)
    if not len(idx):
        return sp.csr_matrix((shape[0], 0))
    parts = []
    # scattered columns (null-gene sources) are read as runs of nearby columns, not as
    # one span from the first to the last: that span can be the whole element
    for run in np.split(idx, np.flatnonzero(np.diff(idx) > CSC_COLUMN_GAP) + 1):
        c0, c1 = int(run[0]), int(run[-1]) + 1
        indptr = _checked_read(guard, "indptr", ((c0, c1 + 1),), lambda c0=c0, c1=c1: group["indptr"][c0 : c1 + 1])
        indptr = indptr.astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = _checked_read(guard, "data", ((lo, hi),), lambda lo=lo, hi=hi: group["data"][lo:hi])
        indices = _checked_read(guard, "indices", ((lo, hi),), lambda lo=lo, hi=hi: group["indices"][lo:hi])
        span = sp.csc_matrix((data, indices, indptr - lo), shape=(shape[0], c1 - c0))
        parts.append(span[:, run - c0])
    return (parts[0] if len(parts) == 1 else sp.hstack(parts, format="csc")).tocsr()


CSC_COLUMN_GAP = 32
"""Columns of a CSC element closer than this are read in one range (the gap's values are
read and dropped); farther ones start a new read."""


# --------------------------------------------------------------------------------------
# A CSR element, transposed once into row groups of column-major pieces


@dataclass(frozen=True)
class TransposedReader:
    """Reads tiles of a CSR element from its one-pass transposition (:func:`transpose_group`).

    A CSR element holds each cell's genes together, so a gene block read from it in place
    decodes every gene of the rows it needs: the whole matrix once per gene block. The
    transposition reads the element once and keeps, per group of rows, the same values in
    compressed-column order (``data``, ``indices`` as rows within the group, ``indptr`` over
    all genes) as plain ``.npy`` files. A gene block's columns are then one contiguous byte
    range per group, read through a memory map: I/O per gene block is its own values only.

    ``groups`` are ``(r0, r1)`` row ranges, whole cell chunks of the run's layout, so a
    tile never straddles two groups.
    """

    directory: str
    info: LayerInfo
    groups: tuple[tuple[int, int], ...]

    sparse = True

    def group_of(self, r0: int) -> int:
        starts = [g[0] for g in self.groups]
        return int(np.searchsorted(starts, r0, side="right") - 1)

    def piece(self, r0: int, r1: int, cols: slice | np.ndarray) -> sp.csr_matrix:
        """Rows ``r0:r1`` and columns ``cols`` (a slice or sorted unique indices), sparse."""
        g = self.group_of(r0)
        g0, g1 = self.groups[g]
        if r1 > g1:
            raise ValueError(f"rows {r0}:{r1} straddle the transposed groups (group {g} is {g0}:{g1})")
        key = (("s", cols.start, cols.stop) if isinstance(cols, slice)
               else ("i", np.asarray(cols, dtype=np.int64).tobytes()))
        mat = _group_piece(self.directory, g, g1 - g0, key)
        return mat[r0 - g0 : r1 - g0]

    def read(self, r0: int, r1: int, cols: slice | np.ndarray) -> np.ndarray:
        """Dense float tile of rows ``r0:r1`` and columns ``cols``."""
        return self.piece(r0, r1, cols).toarray()


def _group_paths(directory: str, g: int) -> dict[str, str]:
    return {name: os.path.join(directory, f"group-{g}", f"{name}.npy") for name in ("data", "indices", "indptr")}


@lru_cache(maxsize=4)
def _group_piece(directory: str, g: int, n_rows: int, key: tuple) -> sp.csr_matrix:
    """Columns ``key`` of transposed group ``g`` as CSR (row-sliced by each tile of the
    group). Read through memory maps: only the columns' own byte ranges are touched."""
    paths = _group_paths(directory, g)
    indptr = np.load(paths["indptr"], mmap_mode="r")
    data = np.load(paths["data"], mmap_mode="r")
    indices = np.load(paths["indices"], mmap_mode="r")
    if key[0] == "s":
        c0, c1 = key[1], key[2]
        lo, hi = int(indptr[c0]), int(indptr[c1])
        ptr = np.asarray(indptr[c0 : c1 + 1], dtype=np.int64) - lo
        vals, rows = np.asarray(data[lo:hi]), np.asarray(indices[lo:hi])
        n_cols = c1 - c0
    else:
        cols = np.frombuffer(key[1], dtype=np.int64) if len(key[1]) else np.empty(0, np.int64)
        starts = np.asarray(indptr[cols], dtype=np.int64)
        counts = np.asarray(indptr[cols + 1], dtype=np.int64) - starts
        ptr = np.concatenate([[0], np.cumsum(counts)])
        # positions of every selected column's values: one gather from the memory maps
        take = np.repeat(starts - ptr[:-1], counts) + np.arange(int(ptr[-1]))
        vals, rows = np.asarray(data[take]), np.asarray(indices[take])
        n_cols = len(cols)
    return sp.csc_matrix((vals, rows, ptr), shape=(n_rows, n_cols)).tocsr()


def transpose_group(store_path: str, info: LayerInfo, g: int, r0: int, r1: int, directory: str) -> int:
    """Read rows ``r0:r1`` of a CSR element once and keep them column-major as group ``g``
    of a :class:`TransposedReader` (called on workers). Each file is written atomically,
    indptr last: a group whose indptr exists is whole. Returns the group's stored values."""
    from .commit import write_array_atomic  # commit imports this module

    paths = _group_paths(directory, g)
    if os.path.exists(paths["indptr"]):  # a resumed run: this group is already whole
        return int(np.load(paths["indptr"], mmap_mode="r")[-1])
    guard = _guard(store_path, info.elem_path, "csr")
    group = _open_group_cached(store_path, info.elem_path)
    indptr = _checked_read(guard, "indptr", ((r0, r1 + 1),), lambda: group["indptr"][r0 : r1 + 1])
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = _checked_read(guard, "data", ((lo, hi),), lambda: group["data"][lo:hi])
    indices = _checked_read(guard, "indices", ((lo, hi),), lambda: group["indices"][lo:hi])
    mat = sp.csr_matrix((data, indices, np.asarray(indptr, dtype=np.int64) - lo), shape=(r1 - r0, info.shape[1]))
    del data, indices
    csc = mat.tocsc()
    del mat
    csc.sort_indices()
    write_array_atomic(paths["data"], csc.data)
    write_array_atomic(paths["indices"], csc.indices.astype(np.int32, copy=False))
    write_array_atomic(paths["indptr"], csc.indptr.astype(np.int64, copy=False))
    return int(csc.nnz)


def read_staged_tile(store_path: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """A region of a staged array (one the run wrote itself: no manifest to check)."""
    return np.asarray(_open_array_cached(store_path, "", "r")[r0:r1, c0:c1])


def write_tile(store_path: str, elem_path: str, r0: int, r1: int, c0: int, c1: int, tile: np.ndarray) -> None:
    """Region write of one tile into a staged array (called on workers)."""
    arr = _open_array_cached(store_path, elem_path, "r+")
    arr[r0:r1, c0:c1] = tile


# --------------------------------------------------------------------------------------
# The embedding, read per row band


EMBEDDING_BAND_ROWS = 65_536
"""Rows per cached band of a stored embedding when its zarr chunks are shorter (bands are
whole chunks: each chunk is decoded once per band, not once per read)."""
MAX_BAND_BYTES = 64 * 2**20
"""The most a decoded band holds (four are cached per process)."""
_BAND_CACHE = 4


@dataclass(frozen=True)
class EmbeddingReader:
    """Rows of a dense ``obsm`` embedding, read from the store one row band at a time.

    Picklable and small: a task that needs the coordinates of some cells reads the bands
    that hold them, so no process holds the whole embedding (n × d) whatever the atlas.
    Bands are whole zarr row chunks (at least :data:`EMBEDDING_BAND_ROWS` rows) kept
    decoded in float64 in a small per-process cache: reads of nearby rows (one kernel chunk
    after another) decode each chunk once. ``token`` is the element's signature when the
    reader was made, so a rewritten element is never served from an old band.

    Supports what the engine does with an array: ``X[r0:r1]``, ``X[rows]`` (integer
    indices, any order), ``len(X)``, ``X.shape``, ``X.ndim``, ``X.dtype`` (float64).
    """

    store_path: str
    elem_path: str
    shape: tuple[int, int]
    band: int
    token: str

    dtype = np.dtype(np.float64)
    ndim = 2

    @classmethod
    def open(cls, store_path: str, elem_path: str, token: str) -> EmbeddingReader:
        arr = _open_array_cached(store_path, elem_path, "r")
        if arr.ndim != 2:
            raise ValueError(f"{elem_path} has shape {arr.shape}; expected (cells, d)")
        chunk_rows = int(arr.chunks[0])
        band = chunk_rows * max(1, -(-EMBEDDING_BAND_ROWS // chunk_rows))
        # A store chunked in very long row chunks: bands stay bounded (each band read then
        # decodes its whole chunk, slower but never more memory than one chunk).
        band = min(band, max(EMBEDDING_BAND_ROWS, MAX_BAND_BYTES // (8 * max(1, int(arr.shape[1])))))
        return cls(store_path, elem_path, (int(arr.shape[0]), int(arr.shape[1])), band, token)

    @property
    def band_nbytes(self) -> int:
        return self.band * self.shape[1] * 8

    @property
    def cache_nbytes(self) -> int:
        """The most a process holds of this embedding: its cached bands."""
        return _BAND_CACHE * self.band_nbytes

    def __len__(self) -> int:
        return self.shape[0]

    def _band(self, b: int) -> np.ndarray:
        return _embedding_band(self.store_path, self.elem_path, self.token, b, self.band)

    def bands(self):
        """``(r0, r1, rows)`` for every band, in order (each decoded once, then dropped from
        the cache's point of view only when newer bands push it out)."""
        for b in range(-(-self.shape[0] // self.band)):
            r0 = b * self.band
            yield r0, min(r0 + self.band, self.shape[0]), self._band(b)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            r0, r1, step = key.indices(self.shape[0])
            if step != 1:
                return self[np.arange(r0, r1, step)]
            if r1 <= r0:
                return np.empty((0, self.shape[1]))
            b0, b1 = r0 // self.band, (r1 - 1) // self.band
            parts = [self._band(b)[max(r0 - b * self.band, 0) : r1 - b * self.band] for b in range(b0, b1 + 1)]
            return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        if idx.ndim != 1:
            raise IndexError("an embedding reader takes a slice or one vector of row indices")
        if len(idx) and (idx.min() < -self.shape[0] or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} cells")
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        out = np.empty((len(idx), self.shape[1]))
        which = idx // self.band
        order = np.argsort(which, kind="stable") if np.any(np.diff(which) < 0) else np.arange(len(idx))
        bounds = np.flatnonzero(np.diff(which[order])) + 1
        for sel in np.split(order, bounds) if len(idx) else []:
            b = int(which[sel[0]])
            out[sel] = self._band(b)[idx[sel] - b * self.band]
        return out


@lru_cache(maxsize=_BAND_CACHE)
def _embedding_band(store_path: str, elem_path: str, token: str, b: int, band: int) -> np.ndarray:
    arr = _open_array_cached(store_path, elem_path, "r")
    rows = np.asarray(arr[b * band : (b + 1) * band], dtype=np.float64)
    rows.flags.writeable = False  # shared by every task of the process
    return rows


class RowSubset:
    """The rows ``rows`` of an embedding (an array or an :class:`EmbeddingReader`), indexed
    by position: ``sub[i:j]`` is ``base[rows[i:j]]``. Lets the model preparation walk one
    condition's cells of a stored embedding without gathering them first."""

    ndim = 2
    dtype = np.dtype(np.float64)

    def __init__(self, base: Any, rows: np.ndarray):
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), int(base.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple) or (not isinstance(key, slice) and np.ndim(key) != 1):
            raise IndexError("a row subset takes a slice or one vector of positions")
        return np.asarray(self.base[self.rows[key]], dtype=np.float64)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)
