"""Symmetric matrices and triangular factors in half the memory: LAPACK's rectangular full
packed format (RFP).

An m × m Cholesky factor or symmetric matrix has m(m + 1)/2 meaningful numbers; dense
storage keeps m². RFP stores the lower triangle in one (ld × k) Fortran block, so that
LAPACK's RFP routines (``tfsm``, ``sfrk``, ``pftrf``) run as a few level-3 BLAS calls on
its halves — measured here at m = 5,000 on one core: the triangular solve and the rank-k
update as fast as their dense namesakes, the Cholesky 1.45× faster. At m = 5,000 each
factor is then 95 MiB instead of 191 MiB; a worker holds three (Lp, C1, C2) for the whole
run, and the metric's covariance beside them while it is built.

The layout (TRANSR = 'N', UPLO = 'L'), with k = ⌈n/2⌉ and the grid the data viewed as an
(ld × k) Fortran array:

- n even: ld = n + 1; ``grid[1 + i, j] = A[i, j]`` for j < k (i ≥ j), and the trailing
  block A₂₂ = A[k:, k:] transposed into the upper triangle of ``grid[0:k, 0:k]``:
  ``grid[j, i] = A[k + i, k + j]`` (i ≥ j);
- n odd: ld = n; ``grid[i, j] = A[i, j]`` for j < k (i ≥ j), and
  ``grid[j, 1 + i] = A[k + i, k + j]`` for the n − k trailing rows and columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from . import blas

_SLICE = 1 << 20
"""Numbers reduced at a time (a whole-array temporary would be another 95 MiB at m = 5,000)."""


class PackedLower:
    """An n × n symmetric matrix's lower triangle, or a lower-triangular factor L, in RFP.

    Pickles as its numbers; :meth:`solve` is the factor's triangular solve in place.
    """

    __slots__ = ("data", "n")

    def __init__(self, data: np.ndarray, n: int | None = None):
        data = np.ascontiguousarray(data)
        if data.ndim != 1:
            raise ValueError(f"packed data must be one-dimensional, not of shape {data.shape}")
        if n is None:
            n = order_of(data.shape[0])
        blas._packed(data, n)
        self.data = data
        self.n = int(n)

    # construction
    @classmethod
    def zeros(cls, n: int, dtype="float64") -> PackedLower:
        return cls(np.zeros(n * (n + 1) // 2, dtype=np.dtype(dtype)), n)

    @classmethod
    def from_lower(cls, a: np.ndarray) -> PackedLower:
        """The lower triangle of a dense Fortran-ordered matrix."""
        a = np.asfortranarray(a)
        n = a.shape[0]
        return cls(blas.trttf_lower(a, np.empty(n * (n + 1) // 2, dtype=a.dtype)), n)

    def __reduce__(self):
        return (PackedLower, (self.data, self.n))

    # description
    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __sizeof__(self) -> int:
        # Dask sizes objects it has no rule for with sys.getsizeof (see DeviceMatrix)
        return object.__sizeof__(self) + self.nbytes

    @property
    def _k(self) -> int:
        return (self.n + 1) // 2

    @property
    def grid(self) -> np.ndarray:
        """The data as the (ld × k) Fortran array that LAPACK sees (a view)."""
        n, k = self.n, self._k
        ld = n + 1 if n % 2 == 0 else n
        return self.data.reshape((ld, k), order="F")

    def _diagonal_index(self) -> np.ndarray:
        n, k = self.n, self._k
        ld, off, sh = (n + 1, 1, 0) if n % 2 == 0 else (n, 0, 1)
        head = np.arange(k)
        tail = np.arange(n - k)
        return np.concatenate([(off + head) + head * ld, tail + (sh + tail) * ld])

    def lower(self) -> np.ndarray:
        """A dense Fortran-ordered copy (upper triangle zero)."""
        return blas.tfttr_lower(self.data, self.n, np.zeros((self.n, self.n), dtype=self.dtype, order="F"))

    def diagonal(self) -> np.ndarray:
        return self.data[self._diagonal_index()].copy()

    def add_diagonal(self, v) -> None:
        self.data[self._diagonal_index()] += v

    def abs_sum(self) -> float:
        """Σ|aᵢⱼ| over the whole symmetric matrix (each off-diagonal number counted twice)."""
        total = sum(float(np.abs(self.data[i : i + _SLICE]).sum()) for i in range(0, self.data.shape[0], _SLICE))
        return 2.0 * total - float(np.abs(self.diagonal()).sum())

    def is_finite(self) -> bool:
        return all(bool(np.isfinite(self.data[i : i + _SLICE]).all()) for i in range(0, self.data.shape[0], _SLICE))

    # arithmetic
    def add_symmetric(self, block: Callable[[slice, slice], np.ndarray], width: int = 1024) -> None:
        """Add the symmetric matrix whose block of rows ``r`` and columns ``c`` (slices) is
        ``block(r, c)``, a column block of ``width`` at a time (only the lower triangle is
        asked for, so an n × width temporary is the most it holds)."""
        n, k = self.n, self._k
        off, sh = (1, 0) if n % 2 == 0 else (0, 1)
        g = self.grid
        for j0 in range(0, k, width):  # the leading k columns
            j1 = min(k, j0 + width)
            b = np.array(block(slice(j0, n), slice(j0, j1)), dtype=self.dtype)
            b[: j1 - j0][np.triu_indices(j1 - j0, 1)] = 0.0
            g[off + j0 : off + n, j0:j1] += b
        k2 = n - k
        for c0 in range(0, k2, width):  # A₂₂'s rows c0..c1, transposed into grid columns sh + c
            c1 = min(k2, c0 + width)
            b = np.array(block(slice(k, k + c1), slice(k + c0, k + c1)), dtype=self.dtype)  # A₂₂[j, i], j < c1
            b[c0:c1][np.tril_indices(c1 - c0, -1)] = 0.0  # keep j ≤ i
            g[0:c1, sh + c0 : sh + c1] += b

    def rank_update(self, a: np.ndarray, alpha: float = 1.0, beta: float = 1.0, *, trans: bool) -> None:
        """``self ← alpha·A Aᵀ + beta·self`` (``trans=True``: ``alpha·Aᵀ A + beta·self``)."""
        blas.sfrk_lower(self.data, self.n, a, alpha, beta, trans=trans)

    def cholesky(self) -> bool:
        """Factorise in place (the data becomes L); False, with every number NaN, when the
        matrix is not positive definite."""
        if blas.pftrf_lower(self.data, self.n) != 0:
            self.data[...] = np.nan
            return False
        return True

    def invert_factor(self) -> bool:
        """Replace the factor L by the inverse of L Lᵀ, in place (LAPACK ``pftri``): False,
        with every number NaN, when L is singular."""
        if blas.pftri_lower(self.data, self.n) != 0:
            self.data[...] = np.nan
            return False
        return True

    def solve(self, b: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``b ← L⁻¹ b`` (``transpose``: ``L⁻ᵀ b``) in place; ``b`` Fortran-ordered, or
        C-ordered n × k (solved as ``bᵀ ← bᵀL⁻ᵀ``, with no copy)."""
        if b.ndim == 2 and b.shape[1] > 1 and not b.flags.f_contiguous and b.flags.c_contiguous:
            blas.tfsm_right_lower(self.data, self.n, b.T, transpose=not transpose)
            return b
        return blas.tfsm_left_lower(self.data, self.n, b, transpose=transpose)


def order_of(size: int) -> int:
    """n such that n(n + 1)/2 = ``size``."""
    n = (math.isqrt(8 * size + 1) - 1) // 2
    if n * (n + 1) // 2 != size:
        raise ValueError(f"{size} numbers are not the lower triangle of a square matrix")
    return n
