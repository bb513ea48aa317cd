"""Gaussian-process numerics on plain arrays (JAX), independent of Dask and zarr.

Notation (see DESIGN.md §2): ``Z`` (m × d) landmarks, ``X`` (n × d) cells, ``ls`` the
Matern-5/2 length scale, ``sigma`` the noise standard deviation. A condition's fit is
reduced over cell chunks into ``S = Σ K(Z,X_k) K(X_k,Z)`` (m × m, gene-independent) and
``B = Σ K(Z,X_k) Y_k`` (m × genes); the weights are ``W = (σ² K̃uu + S)⁻¹ B`` and the
posterior mean anywhere is ``μ(x) = k(x, Z) W``.

Kernels, projections, predictions and Mahalanobis batches run in JAX under an explicit
precision context, so importing another library that flips JAX's global x64 flag (mellon
does) changes nothing here. The m × m factorisations and the triangular solves against
them run in place in LAPACK/BLAS: that keeps a worker's working set at a few m × m
matrices (JAX would copy a factor into every call). The Cholesky factors (and the
symmetric matrices they come from) are kept packed, :class:`~.packed.PackedLower`: half the
memory of a dense m × m array at the same speed. Dense m × m results that JAX reads (the
Mahalanobis factor ``Rᵀ``) are kept as :class:`DeviceMatrix`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from . import blas
from .packed import PackedLower

logger = logging.getLogger("kompot_dask")

JITTER = 1e-6
"""Diagonal jitter on K(Z, Z), as in mellon."""

_SQRT5 = math.sqrt(5.0)


@contextmanager
def precision(dtype: str | np.dtype = "float64") -> Iterator[np.dtype]:
    """Run JAX code in ``dtype`` (float64 switches x64 on for this block only)."""
    dt = np.dtype(dtype)
    with jax.enable_x64(dt == np.float64):
        yield dt


def _matern52(a: jax.Array, b: jax.Array, ls: jax.Array) -> jax.Array:
    """Matern-5/2 with unit amplitude between the rows of ``a`` and ``b``.

    With c = √5/ℓ and r = c·√(‖a − b‖² + 1e-12): (1 + r + r²/3)·e⁻ʳ. The scale c² is applied
    to the row norms and to ``a`` before the product (n·d and m·d multiplications), so that
    the element-wise part is one square root, one exponential and a Horner polynomial:
    about a quarter less time than scaling each distance, values equal to rounding.
    """
    c2 = (_SQRT5 / ls) ** 2
    sq = (
        (c2 * jnp.sum(a * a, axis=1))[:, None]
        + (a * (-2.0 * c2)) @ b.T
        + (c2 * (jnp.sum(b * b, axis=1) + 1e-12))[None, :]
    )
    r = jnp.sqrt(jnp.maximum(sq, 0.0))
    return (1.0 + r * (1.0 + r * (1.0 / 3.0))) * jnp.exp(-r)


_matern52_jit = jax.jit(_matern52)


def matern52(a: np.ndarray, b: np.ndarray, ls: float, dtype: str = "float64") -> np.ndarray:
    """Kernel matrix k(a_i, b_j), shape (len(a), len(b))."""
    with precision(dtype) as dt:
        return np.asarray(_matern52_jit(jnp.asarray(a, dt), jnp.asarray(b, dt), jnp.asarray(ls, dt)))


# --------------------------------------------------------------------------------------
# Fit pieces (reduced over cell chunks)


@jax.jit
def _masked_kernel(z: jax.Array, x: jax.Array, w: jax.Array, ls: jax.Array) -> jax.Array:
    return _matern52(z, x, ls) * w[None, :]


@jax.jit
def _kernel_column_sum(z: jax.Array, x: jax.Array, w: jax.Array, ls: jax.Array) -> jax.Array:
    return _matern52(z, x, ls) @ w


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] == n:
        return a
    pad = np.zeros((n - a.shape[0],) + a.shape[1:], dtype=a.dtype)
    return np.concatenate([a, pad], axis=0)


def cross_gram(
    Z: np.ndarray, X: np.ndarray, ls: float, *, chunk: int = 2048, dtype: str = "float64",
    out: PackedLower | None = None,
) -> PackedLower:
    """``S = K(Z, X) K(X, Z)`` (m × m, packed), accumulated over row chunks of ``X`` by
    in-place rank-k updates (LAPACK sfrk) into ``out`` when given."""
    m = Z.shape[0]
    s = PackedLower.zeros(m, dtype) if out is None else out
    with precision(dtype) as dt:
        z = jnp.asarray(Z, dt)
        lsj = jnp.asarray(ls, dt)
        for start in range(0, X.shape[0], chunk):
            xs = X[start : start + chunk]
            w = np.zeros(chunk)
            w[: xs.shape[0]] = 1.0
            k = np.asarray(_masked_kernel(z, jnp.asarray(_pad_rows(xs, chunk), dt), jnp.asarray(w, dt), lsj))
            # k is m × chunk in C order, i.e. kᵀ in Fortran order: S += (kᵀ)ᵀ kᵀ = k kᵀ
            s.rank_update(k.T, trans=True)
    return s


def symmetric_from_lower(a) -> np.ndarray:
    """A full symmetric copy of a lower-triangle-only (or packed) matrix (tests and small
    problems)."""
    low = np.tril(a.lower() if isinstance(a, PackedLower) else np.asarray(a))
    return low + np.tril(low, -1).T


def kernel_column_sum(
    Z: np.ndarray, X: np.ndarray, ls: float, *, chunk: int = 2048, dtype: str = "float64",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``Σ_i k(Z, x_i)`` over the rows of ``X`` (length m), added to ``out`` when given."""
    with precision(dtype) as dt:
        z = jnp.asarray(Z, dt)
        lsj = jnp.asarray(ls, dt)
        total = np.zeros(Z.shape[0]) if out is None else out
        for start in range(0, X.shape[0], chunk):
            xs = X[start : start + chunk]
            w = np.zeros(chunk)
            w[: xs.shape[0]] = 1.0
            total += np.asarray(
                _kernel_column_sum(z, jnp.asarray(_pad_rows(xs, chunk), dt), jnp.asarray(w, dt), lsj),
                dtype=np.float64,
            )
        return total


SPARSE_SUB_ROWS = 256
"""Kernel rows per sparse product (:meth:`ProjectionAccumulator.add_sparse`): 256 rows ×
m = 5,000 in float64 is 10 MB, which stays in cache while the product walks it."""


class ProjectionAccumulator:
    """Accumulates ``B = Σ_k K(Z, X_k) Y_k`` for one gene block over cell chunks.

    The kernel block is evaluated by JAX (cell chunks padded to ``chunk`` rows, so that one
    compiled kernel serves every tile); the product with the expression runs in BLAS
    through numpy, single-threaded per Dask thread. XLA's own product measured 33 % of the
    one-core GEMM rate per thread with two Dask threads (its thread pool oversubscribes the
    cores), BLAS runs at the GEMM rate.
    """

    def __init__(self, Z: np.ndarray, ls: float, width: int, chunk: int, dtype: str = "float64"):
        self.dtype = np.dtype(dtype)
        self.width = width
        self.chunk = chunk
        self._ls = ls
        with precision(dtype) as dt:
            self._z = jnp.asarray(Z, dt)
        self._b = np.zeros((Z.shape[0], width), dtype=self.dtype)
        self._bt: np.ndarray | None = None  # sparse contributions, genes × landmarks

    def add(self, X: np.ndarray, Y: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Add the contribution of cells ``X`` (n × d) with expression ``Y`` (n × genes);
        with ``rows``, of the cells ``X[rows]`` (``Y`` then has one row per entry of
        ``rows``), gathered one chunk at a time."""
        n = X.shape[0] if rows is None else len(rows)
        for start in range(0, n, self.chunk):
            xs = X[start : start + self.chunk] if rows is None else X[rows[start : start + self.chunk]]
            ys = np.asarray(Y[start : start + self.chunk], dtype=self.dtype)
            if xs.shape[0] == 0:
                continue
            with precision(self.dtype) as dt:
                k = np.asarray(_matern52_jit(self._z, jnp.asarray(_pad_rows(np.asarray(xs, dt), self.chunk), dt),
                                             jnp.asarray(self._ls, dt)))
            # in place, no m × genes temporary (BLAS gemm with beta = 1)
            blas.gemm_accumulate(self._b[:, : ys.shape[1]], k[:, : ys.shape[0]], np.ascontiguousarray(ys))
            del k  # before the next block is evaluated: one kernel block alive, not two

    def add_sparse(self, X: np.ndarray, Y: sp.csr_matrix, rows: np.ndarray | None = None) -> None:
        """:meth:`add` for a sparse ``Y`` (CSR, one row per row of ``X``, or per entry of
        ``rows``): costs m · nnz multiply-adds instead of m · rows · genes.

        The kernel block is evaluated cells × landmarks, and each :data:`SPARSE_SUB_ROWS`
        rows of it are multiplied by the matching rows of ``Y`` (genes × cells in CSR): a
        slice of the kernel block that stays in cache while every stored value of its rows
        adds its row of the kernel. Measured on one core (m = 5,000, 800-cell chunks, 256
        genes): 0.35× the dense product's time at 5 % stored values, 0.69× at 10 %, equal at
        ~14 % (:data:`kompot_dask._layout.SPARSE_MAX_DENSITY` is where callers switch to dense
        tiles).
        """
        if self._bt is None:
            self._bt = np.zeros((self.width, self._b.shape[0]), dtype=self.dtype)
        n = X.shape[0] if rows is None else len(rows)
        for start in range(0, n, self.chunk):
            ys = Y[start : start + self.chunk]
            if ys.shape[0] == 0 or ys.nnz == 0:
                continue
            xs = X[start : start + self.chunk] if rows is None else X[rows[start : start + self.chunk]]
            with precision(self.dtype) as dt:
                kt = np.asarray(_matern52_jit(jnp.asarray(_pad_rows(np.asarray(xs, dt), self.chunk), dt), self._z,
                                              jnp.asarray(self._ls, dt)))
            for s in range(0, ys.shape[0], SPARSE_SUB_ROWS):
                part = ys[s : s + SPARSE_SUB_ROWS]
                if part.nnz == 0:
                    continue
                yt = part.T.tocsr().astype(self.dtype, copy=False)  # genes × cells
                self._bt[: yt.shape[0]] += yt @ kt[s : s + yt.shape[1]]
            del kt

    def result(self) -> np.ndarray:
        if self._bt is not None:
            self._b += self._bt.T
            self._bt = None
        return self._b


# --------------------------------------------------------------------------------------
# Factorisation (once per run, m × m)


class DeviceMatrix:
    """An m × m factor kept as a JAX array on the worker that holds it.

    Handing numpy factors to JAX copies them on every call (200 MB each at m = 5000); this
    holder converts once. It pickles as numpy and is rebuilt in its own dtype, whatever
    JAX's global x64 flag is on the receiving worker.
    """

    __slots__ = ("array", "dtype")

    def __init__(self, array, dtype: str = "float64"):
        self.dtype = str(np.dtype(dtype))
        with precision(self.dtype) as dt:
            self.array = _to_jax(array, dt)

    def __reduce__(self):
        return (DeviceMatrix, (np.asarray(self.array), self.dtype))

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self.array)
        return out if dtype is None else out.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.size * self.array.dtype.itemsize)

    def __sizeof__(self) -> int:
        # Dask measures objects it has no rule for with sys.getsizeof, which calls this:
        # so a worker's memory accounting sees the factor's buffer without this module
        # registering anything with Dask (and whatever was imported first on the worker).
        return object.__sizeof__(self) + self.nbytes


def _to_jax(a, dt) -> jax.Array:
    """A JAX view of ``a`` without a copy where possible (DeviceMatrix, or a writable,
    C-contiguous numpy array of the right dtype shared through DLPack)."""
    if isinstance(a, DeviceMatrix):
        a = a.array
    if isinstance(a, jax.Array):
        return a if a.dtype == dt else a.astype(dt)
    a = np.asarray(a)
    if a.dtype == dt and a.flags.c_contiguous and a.flags.writeable and a.ndim == 2:
        try:
            return jnp.from_dlpack(a)
        except Exception:  # pragma: no cover - fall back to a copy
            pass
    return jnp.asarray(a, dt)


def _kernel_into(target: np.ndarray, Z: np.ndarray, ls: float, dtype: str, block: int = 1024,
                 cols: np.ndarray | None = None) -> np.ndarray:
    """k(Z, cols) (``cols`` defaults to ``Z``) into ``target``, a block of columns at a time."""
    cols = Z if cols is None else cols
    for j in range(0, cols.shape[0], block):
        target[:, j : j + block] = matern52(Z, cols[j : j + block], ls, dtype)
    return target


class _DenseLower:
    """A lower-triangular factor held dense (Fortran order): a factor kept by an older
    version in a resumed run's staging (upper triangle U = Lᵀ in C order)."""

    __slots__ = ("lower",)

    def __init__(self, lower: np.ndarray):
        self.lower = lower

    def solve(self, b: np.ndarray, transpose: bool = False) -> np.ndarray:
        return blas.trsm_left_lower(self.lower, b, transpose=transpose)


def as_factor(factor) -> PackedLower | _DenseLower:
    """A Cholesky factor as passed around — :class:`PackedLower`, its numbers as stored
    (one-dimensional), or a dense upper factor U = Lᵀ in C order (an older staging's) —
    as something with ``solve(b, transpose=False)``."""
    if isinstance(factor, PackedLower | _DenseLower):
        return factor
    a = np.asarray(factor)
    if a.ndim == 1:
        return PackedLower(a)
    return _DenseLower(a.T)


def stored_form(value) -> np.ndarray:
    """What a fit output is kept as on disk: a packed factor's numbers, a kernel metric's
    (:meth:`KernelMetric.stored`), else the array."""
    if isinstance(value, KernelMetric):
        return value.stored()
    return value.data if isinstance(value, PackedLower) else np.asarray(value)


def dense_lower(factor) -> np.ndarray:
    """A factor as a dense lower-triangular Fortran-ordered array (a copy when packed)."""
    f = as_factor(factor)
    return f.lower() if isinstance(f, PackedLower) else f.lower


class KernelMetric:
    """The metric R = S·Kzz (m × m, Kzz = k(Z, Z)) of :func:`landmark_metric`, applied
    without being formed: S = L⁻¹ with L the packed Cholesky factor of Σ + eps·I, or
    S = diag(``scale``) on the diagonal path.

    A worker then holds the metric in m(m + 1)/2 numbers (95 MiB at m = 5,000) instead of
    m² (191 MiB), and the fit skips the m³ solve that forms R. Each use recomputes Kzz a
    slab of rows at a time (:data:`SLAB` × m) and costs one triangular solve more than a
    product with a dense R (m² flops per column on top of 2m²). ``R x`` is then computed as
    L⁻¹(Kzz x): the Mahalanobis vector L⁻¹δ of δ = Kzz (W₂ − W₁), in that order.
    """

    __slots__ = ("Z", "ls", "factor", "scale", "dtype")

    SLAB = 256
    """Rows of Kzz evaluated at a time (2 × 10 MiB of kernel at m = 5,000)."""

    def __init__(self, Z: np.ndarray, ls: float, *, factor: PackedLower | None = None,
                 scale: np.ndarray | None = None, dtype: str = "float64"):
        if (factor is None) == (scale is None):
            raise ValueError("a kernel metric needs either a factor or a scale")
        self.Z = np.ascontiguousarray(Z, dtype=np.float64)
        self.ls = float(ls)
        self.factor = factor
        self.scale = None if scale is None else np.ascontiguousarray(scale, dtype=np.dtype(dtype))
        self.dtype = str(np.dtype(dtype))

    @classmethod
    def from_stored(cls, data: np.ndarray, Z: np.ndarray, ls: float, dtype: str = "float64") -> KernelMetric:
        """The metric from :meth:`stored` (one-dimensional: m numbers are the diagonal
        path's scale, m(m + 1)/2 a packed factor; the two differ for every m > 1, and the
        diagonal path needs m > 10)."""
        data = np.asarray(data, dtype=np.dtype(dtype))
        m = Z.shape[0]
        if m > 1 and data.shape[0] == m:
            return cls(Z, ls, scale=data, dtype=dtype)
        return cls(Z, ls, factor=PackedLower(data, m), dtype=dtype)

    def stored(self) -> np.ndarray:
        """What is kept on disk: the factor's packed numbers or the scale."""
        return self.factor.data if self.factor is not None else self.scale

    @property
    def nbytes(self) -> int:
        return int(self.stored().nbytes + self.Z.nbytes)

    def __sizeof__(self) -> int:
        # Dask sizes objects it has no rule for with sys.getsizeof (see DeviceMatrix)
        return object.__sizeof__(self) + self.nbytes

    def __reduce__(self):
        return (_kernel_metric, (self.Z, self.ls, self.factor, self.scale, self.dtype))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``R x`` (m × k, C order, a new array)."""
        dt = np.dtype(self.dtype)
        x = np.ascontiguousarray(x, dtype=dt)
        m = self.Z.shape[0]
        out = np.zeros((m, x.shape[1]), dtype=dt)
        for r0 in range(0, m, self.SLAB):
            r1 = min(r0 + self.SLAB, m)
            rows = _pad_rows(self.Z[r0:r1], min(self.SLAB, m))  # one kernel shape, one compile
            k = np.ascontiguousarray(matern52(rows, self.Z, self.ls, self.dtype)[: r1 - r0])
            blas.gemm_accumulate(out[r0:r1], k, x)
            del k
        if self.factor is not None:
            self.factor.solve(out)
        else:
            out *= self.scale[:, None]
        return out

    def dense_t(self) -> np.ndarray:
        """``Rᵀ`` dense, C-contiguous (tests and small problems)."""
        return self.apply(np.eye(self.Z.shape[0], dtype=np.dtype(self.dtype))).T


def _kernel_metric(Z, ls, factor, scale, dtype) -> KernelMetric:
    return KernelMetric(Z, ls, factor=factor, scale=scale, dtype=dtype)


def metric_product(R, x: np.ndarray) -> np.ndarray:
    """``R x`` for the metric as a fit hands it over: a :class:`KernelMetric`, or ``Rᵀ``
    stored dense and C-contiguous (a :class:`DeviceMatrix` or an array; R is then read in
    Fortran order, no copy)."""
    if isinstance(R, KernelMetric):
        return R.apply(x)
    return np.asarray(R).T @ x


def _kernel_blocks(rows: np.ndarray, ls: float, dtype: str):
    """``block(r, c)`` = k(rows[r], rows[c]), for :meth:`PackedLower.add_symmetric`."""
    return lambda r, c: matern52(rows[r], rows[c], ls, dtype)


def landmark_cholesky(Z: np.ndarray, ls: float, dtype: str = "float64") -> PackedLower:
    """``Lp = chol(K(Z,Z) + jitter·I)``, packed; built and factorised in place in its
    m(m + 1)/2 numbers."""
    a = PackedLower.zeros(Z.shape[0], dtype)
    a.add_symmetric(_kernel_blocks(Z, ls, dtype))
    a.add_diagonal(JITTER)
    a.cholesky()
    return a


def condition_factor(Z: np.ndarray, ls: float, S: PackedLower, sigma: float, dtype: str = "float64") -> PackedLower:
    """``C = chol(K̃uu + S/σ²)`` for one condition (W = C⁻ᵀ C⁻¹ B / σ²), packed.

    ``S`` (as :func:`cross_gram` returns it) is overwritten by the factor: the whole
    factorisation needs no m × m memory beyond S itself.
    """
    if sigma != 1.0:
        S.data *= 1.0 / sigma**2
    S.add_symmetric(_kernel_blocks(Z, ls, dtype))
    S.add_diagonal(JITTER)
    S.cholesky()
    return S


def prior_covariance(Z: np.ndarray, ls: float, Lp, dtype: str = "float64", points: np.ndarray | None = None,
                     work: np.ndarray | None = None) -> PackedLower:
    """2(K_PP − PᵀP) with P = Lp⁻¹K_ZP (packed; ``points`` default to the landmarks): the
    part of Σ₁ + Σ₂ (:func:`landmark_metric`) that needs only the landmark factor, so that
    it can be computed while the conditions' grams are still being summed. ``work``: an
    m × p Fortran array to solve in.

    At the landmarks (no ``points``) with a packed ``Lp`` it comes from the identity
    K − K(K + jI)⁻¹K = j·I − j²(K + jI)⁻¹ (j = :data:`JITTER`, Lp Lpᵀ = K + jI): LAPACK's
    ``pftri`` inverts Lp Lpᵀ in a packed copy of Lp, 2m³/3 flops and no m × m work array,
    where the solve and the rank-m update take 2m³. Both forms carry a rounding error of
    ~1e-16·‖K‖ per entry (values are of order j) and agree to it.
    """
    factor = as_factor(Lp) if points is None else None
    if isinstance(factor, PackedLower):
        cov = PackedLower(factor.data.copy(), factor.n)
        if cov.invert_factor():
            cov.data *= -2.0 * JITTER**2
            cov.add_diagonal(2.0 * JITTER)
        return cov
    P = Z if points is None else np.asarray(points, dtype=np.float64)
    if work is None:
        work = np.empty((Z.shape[0], P.shape[0]), dtype=np.dtype(dtype), order="F")
    cov = PackedLower.zeros(P.shape[0], dtype)
    cov.add_symmetric(_kernel_blocks(P, ls, dtype))
    _covariance_updates(cov, Z, ls, ((Lp, -2.0, 2.0),), P, work, dtype)
    return cov


def landmark_metric(
    Z: np.ndarray, ls: float, Lp, C1, C2, eps: float, dtype: str = "float64", allow_diagonal: bool = True,
    with_inverse_squares: bool = False, points: np.ndarray | None = None, prior: PackedLower | None = None,
    implicit: bool = False,
) -> tuple:
    """``Rᵀ`` (stored C-contiguous) such that a gene's Mahalanobis distance is ‖R (W₂ − W₁)‖,
    and whether the reference's diagonal shortcut applies.

    Σ = Σ₁ + Σ₂ at the landmarks with Σ_c = Kzz − Kzz K̃uu⁻¹ Kzz + Kzz (C_c C_cᵀ)⁻¹ Kzz, i.e.
    Σ = 2 (Kzz − PᵀP) + Q₁ᵀQ₁ + Q₂ᵀQ₂ with P = Lp⁻¹Kzz, Q_c = C_c⁻¹Kzz; δ = Kzz (W₂ − W₁).
    With L = chol(Σ + eps·I), R = L⁻¹ Kzz; on the diagonal path (trace(Σ)/Σ|Σᵢⱼ| > 0.95 and
    m > 10), R = diag(1/√max(Σᵢᵢ, eps)) Kzz.

    ``points`` (p × d): the same at other points than the landmarks — a group's own
    landmarks or cells (``FilterSettings(groups=...)``): Σ at those points (Kzz becomes
    k(Z, points) in P and Q_c, and k(points, points) in the first term), δ = k(points, Z)
    (W₂ − W₁), and ``Rᵀ`` is m × p.

    Runs in place with LAPACK/BLAS — triangular solves into one work matrix, rank-k updates
    into the packed covariance, which is then factorised in place — so its working set is
    one m × p matrix and one packed p × p matrix besides the factors. ``prior``: the
    covariance's first part, :func:`prior_covariance` at the same points, computed
    beforehand (it is overwritten; ``Lp`` is then not needed).

    ``implicit``: R as a :class:`KernelMetric` (the packed factor L, or the diagonal path's
    scale) instead of a dense ``Rᵀ`` — half the memory, no m³ solve to form it, one more
    triangular solve per use. At the landmarks and without the empirical variance only
    (its factor trick needs L⁻¹ itself).
    """
    if implicit and (points is not None or with_inverse_squares):
        raise ValueError("an implicit metric is at the landmarks and without the empirical variance only")
    dt = np.dtype(dtype)
    m = Z.shape[0]
    P = Z if points is None else np.asarray(points, dtype=np.float64)
    p = P.shape[0]
    work = np.empty((m, p), dtype=dt, order="F")
    cov = prior_covariance(Z, ls, Lp, dtype, points, work) if prior is None else prior
    if cov.n != p:
        raise ValueError(f"the prior covariance is of order {cov.n}, not {p}")
    _covariance_updates(cov, Z, ls, ((C1, 1.0, 1.0), (C2, 1.0, 1.0)), P, work, dtype)
    diag = cov.diagonal()
    ratio = float(diag.sum() / cov.abs_sum()) if p > 10 else 0.0
    diagonal = bool(allow_diagonal and p > 10 and ratio > 0.95)
    if implicit:
        del work
        if diagonal:
            logger.info("Using the diagonal Mahalanobis shortcut (diagonal ratio %.3f)", ratio)
            del cov
            return KernelMetric(Z, ls, scale=1.0 / np.sqrt(np.maximum(diag, eps)), dtype=dtype), diagonal
        cov.add_diagonal(eps)
        if not cov.cholesky():  # its numbers are then NaN, and so are the distances
            logger.warning("Cholesky of the Mahalanobis covariance failed; all Mahalanobis distances will be NaN")
        return KernelMetric(Z, ls, factor=cov, dtype=dtype), diagonal
    if p != m:
        del work
        work = np.empty((p, m), dtype=dt, order="F")
    _kernel_into(work, P, ls, dtype, cols=Z)
    if diagonal:
        logger.info("Using the diagonal Mahalanobis shortcut (diagonal ratio %.3f)", ratio)
        del cov
        work /= np.sqrt(np.maximum(diag, eps))[:, None]
        wsq = np.zeros((1, 1), dtype=dt)  # the shortcut ignores the empirical variance, as kompot's
    else:
        cov.add_diagonal(eps)
        factored = cov.cholesky()
        if factored:
            cov.solve(work)
        else:
            work[...] = np.nan
        if with_inverse_squares:  # L⁻¹ squared elementwise, for the empirical variance's factor trick
            wsq = np.asfortranarray(np.eye(p, dtype=dt))
            if factored:
                cov.solve(wsq)
                np.square(wsq, out=wsq)
            else:
                wsq[...] = np.nan
        del cov
    if not np.all(np.isfinite(work)):
        logger.warning("Cholesky of the Mahalanobis covariance failed; all Mahalanobis distances will be NaN")
    if with_inverse_squares:
        return DeviceMatrix(work.T, dtype), diagonal, wsq
    return DeviceMatrix(work.T, dtype), diagonal


def _covariance_updates(cov, Z: np.ndarray, ls: float, terms, P: np.ndarray, work: np.ndarray,
                        dtype: str) -> None:
    """``cov ← beta·cov + alpha·QᵀQ`` with Q = F⁻¹K_ZP for each ``(F, alpha, beta)`` of
    ``terms``, by triangular solves into ``work`` (m × p) and rank-k updates; ``cov``
    packed, or a dense Fortran lower triangle. From ``cov`` = K_PP, the terms
    ((Lp, −2, 2), (C1, 1, 1), (C2, 1, 1)) give Σ₁ + Σ₂ between the points ``P``:
    2(K_PP − PᵀP) + Q₁ᵀQ₁ + Q₂ᵀQ₂ with P = Lp⁻¹K_ZP, Q_c = C_c⁻¹K_ZP."""
    for factor, alpha, beta in terms:
        _kernel_into(work, Z, ls, dtype, cols=P)
        as_factor(factor).solve(work)
        if isinstance(cov, PackedLower):
            cov.rank_update(work, alpha, beta, trans=True)
        else:
            blas.syrk_lower(cov, work, alpha, beta, trans=True)


def _covariance_lower(Z: np.ndarray, ls: float, Lp, C1, C2, P: np.ndarray, work: np.ndarray,
                      dtype: str) -> np.ndarray:
    """Σ₁ + Σ₂ between the points ``P`` (p × p, dense, Fortran order, lower triangle
    filled): :func:`_covariance_updates` on K_PP."""
    p = P.shape[0]
    cov = _kernel_into(np.empty((p, p), dtype=np.dtype(dtype), order="F"), P, ls, dtype)
    _covariance_updates(cov, Z, ls, ((Lp, -2.0, 2.0), (C1, 1.0, 1.0), (C2, 1.0, 1.0)), P, work, dtype)
    return cov


def landmark_covariance(Z: np.ndarray, ls: float, Lp, C1, C2, eps: float, dtype: str = "float64",
                        points: np.ndarray | None = None) -> np.ndarray:
    """Σ₁ + Σ₂ + eps·I at the landmarks (or at ``points``, p × d: a subset's), lower
    triangle, Fortran order: the shared part of each gene's covariance when the empirical
    variance's diagonal and the sample variance's low-rank term both enter it
    (:func:`direct_mahalanobis`)."""
    P = Z if points is None else np.asarray(points, dtype=np.float64)
    p = P.shape[0]
    cov = _covariance_lower(Z, ls, Lp, C1, C2, P, np.empty((Z.shape[0], p), dtype=np.dtype(dtype), order="F"),
                            dtype)
    cov[np.diag_indices(p)] += eps
    return cov


def direct_mahalanobis(cov: np.ndarray, kzz: np.ndarray, dw: np.ndarray, U: np.ndarray, v: np.ndarray,
                       work: np.ndarray | None = None) -> np.ndarray:
    """Mahalanobis distances with a per-gene covariance of full rank: kompot's per-gene
    Cholesky when the sample variance and the empirical variance are both on.

    Per gene g, D² = δᵀ (Σ + eps·I + diag(v_g) + V_g)⁻¹ δ with δ = Kzz dw_g and
    V_g = (Kzz U_g)(Kzz U_g)ᵀ (U: m × g × r, the samples' Helmert contrasts). ``cov`` is
    Σ + eps·I (lower triangle, :func:`landmark_covariance`), ``v`` (m × g) the summed
    observation variances at the landmarks. At other points (a subset's, p of them) ``kzz``
    is their kernel against the landmarks (p × m), and ``cov`` and ``v`` are at the points. The diagonal term changes every eigenvector, so
    no shared factor helps: each gene costs one m × m Cholesky (m³/3 flops), done in place
    in one m × m work matrix (``work``) with LAPACK. A gene whose matrix is not positive
    definite gets NaN, as in kompot.
    """
    g = dw.shape[1]
    m = cov.shape[0]  # the points
    r = U.shape[2]
    dt = cov.dtype
    delta = np.asfortranarray(kzz @ dw, dtype=dt)  # points × g
    work = np.empty((m, m), dtype=dt, order="F") if work is None else work
    out = np.empty(g)
    diag = np.diag_indices(m)
    for j in range(g):
        np.copyto(work, cov)
        work[diag] += v[:, j]
        if r:
            ku = np.asfortranarray(kzz @ U[:, j, :], dtype=dt)  # m × r
            blas.syrk_lower(work, ku, 1.0, 1.0, trans=False)
        if blas.potrf_lower(work) != 0:
            out[j] = np.nan
            continue
        z = np.array(delta[:, j : j + 1], order="F")
        blas.trsm_left_lower(work, z)
        out[j] = float(np.sqrt(np.sum(z * z)))
    return out


def posterior_covariance(X: np.ndarray, Z: np.ndarray, ls: float, Lp, C1, C2,
                         dtype: str = "float64") -> np.ndarray:
    """Σ₁ + Σ₂ between the cells ``X`` (n × n, symmetric): kompot's
    ``store_posterior_covariance`` matrix, the two posterior covariances of the expression
    models summed (the covariance of the fold change between cells)."""
    X = np.asarray(X, dtype=np.float64)
    cov = _covariance_lower(Z, ls, Lp, C1, C2, X, np.empty((Z.shape[0], X.shape[0]), dtype=np.dtype(dtype),
                                                          order="F"), dtype)
    n, b = cov.shape[0], 1024
    for r0 in range(0, n, b):  # the upper triangle from the lower, in place, a block at a time
        r1 = min(r0 + b, n)
        d = cov[r0:r1, r0:r1]
        d[...] = np.tril(d) + np.tril(d, -1).T
        cov[r0:r1, r1:] = cov[r1:, r0:r1].T
    return cov


def check_factor(name: str, factor):
    finite = factor.is_finite() if isinstance(factor, PackedLower) else bool(np.all(np.isfinite(np.asarray(factor))))
    if not finite:
        raise FloatingPointError(
            f"Cholesky factor {name} is not finite: the landmark kernel is singular. "
            "Check for duplicated landmarks or pass a larger GPSettings(ls=...)."
        )
    return factor


# --------------------------------------------------------------------------------------
# Per gene block: weights, scores; per cell chunk: predictions and variances


def block_scores(
    factors: dict, kbar_mean: np.ndarray, B1: np.ndarray, B2: np.ndarray, sigma: float,
    dtype: str = "float64", overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weights W1, W2 (m × g), Mahalanobis distances and mean log fold changes (g,).

    W_c = C_c⁻ᵀ C_c⁻¹ B_c / σ² by two triangular solves (LAPACK, in place: on B_c itself
    with ``overwrite``, else on a copy); the distances D = ‖R (W₂ − W₁)‖ and k̄ᵀ(W₂ − W₁)
    in BLAS, reading ``Rᵀ`` where the factor keeps it.
    """
    w1 = condition_weights(factors["C1"], B1, sigma, dtype, overwrite)
    w2 = condition_weights(factors["C2"], B2, sigma, dtype, overwrite)
    dw = w2 - w1
    z = metric_product(factors["R"], dw)
    return w1, w2, np.sqrt(np.einsum("ij,ij->j", z, z)), np.asarray(kbar_mean, dtype=dw.dtype) @ dw


def leverage_factor(C, sigma: float, dtype: str = "float64") -> PackedLower:
    """Factor of mellon's leverage matrix M = σ² K̃uu + S + jitter·I for one condition,
    packed, from its factor C (C Cᵀ = K̃uu + S/σ², so M = σ² C Cᵀ + jitter·I)."""
    lower = np.asfortranarray(dense_lower(C), dtype=np.dtype(dtype))
    M = PackedLower.zeros(lower.shape[0], dtype)
    M.rank_update(lower, sigma**2, 0.0, trans=False)
    del lower
    M.add_diagonal(JITTER)
    M.cholesky()
    return M


def leverages(X: np.ndarray, Z: np.ndarray, M, ls: float, dtype: str = "float64") -> np.ndarray:
    """h(x) = k_xᵀ M⁻¹ k_x at cells ``X`` (mellon's leverage of a training cell, for the
    leave-one-out correction of its squared residuals)."""
    work = np.asfortranarray(matern52(Z, X, ls, dtype))
    as_factor(M).solve(work)
    return np.einsum("ij,ij->j", work, work)


class ResidualAccumulator:
    """Accumulates ``Σ_k K(Z, X_k) R2_k`` for one block of genes, where R2 are the
    leave-one-out corrected squared residuals (y − k_xᵀW)² / (1 − h)² of the training cells
    (mellon's empirical variance): the right-hand side of the variance GP, whose weights
    come from the same condition factor as the mean's."""

    def __init__(self, Z: np.ndarray, ls: float, W: np.ndarray, chunk: int, dtype: str = "float64"):
        self.dtype = np.dtype(dtype)
        self.chunk = chunk
        self._ls = ls
        with precision(dtype) as dt:
            self._z = jnp.asarray(Z, dt)
        self._w = np.asarray(W, dtype=self.dtype)
        self._b = np.zeros_like(self._w)

    def add(self, X: np.ndarray, Y, h: np.ndarray, rows: np.ndarray | None = None,
            W: np.ndarray | None = None) -> None:
        """Cells ``X`` (n × d), their expression ``Y`` (n × genes, dense or CSR) and
        leverages ``h`` (n); with ``rows``, of the cells ``X[rows]`` (``Y`` and ``h`` then
        have one entry per entry of ``rows``). ``W``: the weights these cells' residuals are
        taken from, when not the accumulator's own (with ``sample_col``, each sample's
        model gives its own cells' residuals)."""
        g = Y.shape[1]
        w = self._w if W is None else W
        n_all = X.shape[0] if rows is None else len(rows)
        for start in range(0, n_all, self.chunk):
            xs = X[start : start + self.chunk] if rows is None else X[rows[start : start + self.chunk]]
            n = xs.shape[0]
            if n == 0:
                continue
            with precision(self.dtype) as dt:
                k = np.asarray(_matern52_jit(jnp.asarray(_pad_rows(np.asarray(xs, dt), self.chunk), dt), self._z,
                                             jnp.asarray(self._ls, dt)))[:n]
            ys = Y[start : start + n]
            ys = ys.toarray() if sp.issparse(ys) else ys
            r = np.asarray(ys, dtype=self.dtype) - k @ w[:, :g]
            r *= 1.0 / (1.0 - h[start : start + n])[:, None]
            self._b[:, :g] += k.T @ (r * r)
            del k, r

    def result(self) -> np.ndarray:
        return self._b


def empirical_mahalanobis(R: np.ndarray, Wsq: np.ndarray, dw: np.ndarray, v: np.ndarray) -> np.ndarray:
    """kompot's "factor trick" for a per-gene diagonal term (empirical variance): with
    z = R dw = L⁻¹ δ and v_g the summed observation variances at the landmarks (m × g),
    D_g = sqrt(Σᵢ zᵢ² / (1 + Σⱼ (L⁻¹)ᵢⱼ² v_gⱼ)) — an approximation of δᵀ(Σ + diag v_g)⁻¹δ that
    kompot 0.8.0 uses, kept for parity. ``Wsq`` = (L⁻¹)∘(L⁻¹) (m × m)."""
    z = R @ dw
    return np.sqrt(np.einsum("mg,mg->g", z * z, 1.0 / (1.0 + Wsq @ v)))


def condition_weights(factor, B: np.ndarray, sigma: float, dtype: str = "float64",
                      overwrite: bool = False) -> np.ndarray:
    """W = C⁻ᵀ C⁻¹ B / σ² (m × g) for one model's factor (see :func:`as_factor`): in place on
    ``B`` with ``overwrite`` (when it is a packed factor and ``B`` a C-ordered array of
    ``dtype``, else on a copy)."""
    factor = as_factor(factor)
    in_place = (overwrite and isinstance(factor, PackedLower) and isinstance(B, np.ndarray)
                and B.dtype == np.dtype(dtype) and B.flags.c_contiguous and B.flags.writeable)
    w = factor.solve(B if in_place else np.array(B, dtype=np.dtype(dtype), order="F"))
    factor.solve(w, transpose=True)
    if sigma != 1.0:
        w /= sigma**2
    return w


class SampleContrasts:
    """One condition's per-sample weights as deviations from their mean, in Helmert
    contrasts: S samples give S − 1 arrays u_j (m × genes each) with ``Σ_j u_j u_jᵀ`` the
    sample covariance (ddof = 1) of the weights, one array fewer than the samples and no
    information lost. Filled one sample at a time, each sample's weights overwritten by its
    contrast, u_j = (Σ_{i<j} w_i − j·w_j) / √(j(j + 1)) / √(S − 1), so besides the contrasts only
    the running sum and one temporary are held."""

    def __init__(self, n_samples: int):
        self.n_samples = int(n_samples)
        self._sum: np.ndarray | None = None
        self.contrasts: list[np.ndarray] = []

    def add(self, w: np.ndarray) -> None:
        """Take one sample's weights (the array is reused for its contrast)."""
        j = len(self.contrasts) + (self._sum is not None)
        if self._sum is None:
            self._sum = w
            return
        total = self._sum + w
        w *= -float(j)
        w += self._sum
        w /= math.sqrt(j * (j + 1)) * math.sqrt(self.n_samples - 1)
        self.contrasts.append(w)
        self._sum = total
        if j == self.n_samples - 1:
            self._sum = None

    def __len__(self) -> int:
        return len(self.contrasts)


def lowrank_mahalanobis(R: np.ndarray, dw: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Mahalanobis distances with a gene-specific low-rank covariance term.

    Per gene g, D² = δᵀ (Σ + eps·I + V_g)⁻¹ δ with δ = Kzz dw_g, V_g = (Kzz U_g)(Kzz U_g)ᵀ of
    rank ≤ r (U: m × g × r) and R = L⁻¹ Kzz, L = chol(Σ + eps·I) (``landmark_metric``
    without its diagonal shortcut). With z = R dw_g and Q = R U_g (m × r), the covariance in
    whitened coordinates is I + QQᵀ. Writing Q = Qₒ Rᵣ (thin QR),

        (I + QQᵀ)⁻¹ = (I − QₒQₒᵀ) + Qₒ (I + RᵣRᵣᵀ)⁻¹ Qₒᵀ,

    so D² = ‖z − Qₒw‖² + wᵀ(I + RᵣRᵣᵀ)⁻¹w with w = Qₒᵀz: a sum of two non-negative terms,
    the second through an r × r matrix whose eigenvalues are ≥ 1. No m × m matrix per gene
    is formed or factorised: O(m²·r) per gene (the product R·U) instead of the direct
    Cholesky's m³/3, and no cancellation between large terms (unlike the plain Woodbury
    form ‖z‖² − …, which loses digits when V_g dominates).
    """
    m, g, r = U.shape
    z = R @ dw  # m × g
    Q = (R @ U.reshape(m, g * r)).reshape(m, g, r).transpose(1, 0, 2)  # g × m × r
    Qo, Rr = np.linalg.qr(Q)  # g × m × r, g × r × r
    w = np.einsum("gmr,mg->gr", Qo, z)
    perp = z.T - np.einsum("gmr,gr->gm", Qo, w)
    inner = np.eye(r) + Rr @ Rr.transpose(0, 2, 1)
    sol = np.linalg.solve(inner, w[..., None])[..., 0]
    d2 = np.einsum("gm,gm->g", perp, perp) + np.einsum("gr,gr->g", w, sol)
    return np.sqrt(d2)


def predict_pair(
    X: np.ndarray, Z: np.ndarray, W1: np.ndarray, W2: np.ndarray, ls: float, dtype: str = "float64"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior means of both conditions at cells ``X`` and their difference (n × g each).

    The kernel block comes from JAX, the two products run in BLAS (see
    :class:`ProjectionAccumulator`). ``Z`` may be a JAX array already (:func:`as_device`):
    a block task predicts many cell chunks with the same landmarks.
    """
    with precision(dtype) as dt:
        k = np.asarray(_matern52_jit(jnp.asarray(X, dt), as_device(Z, dt), jnp.asarray(ls, dt)))
    mu1 = k @ np.asarray(W1, dtype=dt)
    mu2 = k @ np.asarray(W2, dtype=dt)
    return mu1, mu2, mu2 - mu1


def kernel_rows(X: np.ndarray, Z, ls: float, dtype: str = "float64") -> np.ndarray:
    """k(X, Z) (cells × landmarks) as numpy; ``Z`` may already be on the device."""
    with precision(dtype) as dt:
        return np.asarray(_matern52_jit(jnp.asarray(X, dt), as_device(Z, dt), jnp.asarray(ls, dt)))


def as_device(a, dtype: str | np.dtype = "float64") -> jax.Array:
    """``a`` as a JAX array of ``dtype`` (no copy if it is one already)."""
    with precision(dtype) as dt:
        if isinstance(a, jax.Array) and a.dtype == dt:
            return a
        return jnp.asarray(a, dt)


def solved_sq_norms(X: np.ndarray, Z: np.ndarray, factor, ls: float, dtype: str = "float64",
                    piece: int = 256) -> np.ndarray:
    """‖F⁻¹ k_x‖² at each cell x of ``X`` for the lower-triangular factor F (k_x = k(Z, x)).

    The triangular solve runs in place in BLAS on the kernel block (JAX's solver would copy
    the m × m factor on every call). The block is evaluated ``piece`` cells at a time (JAX's
    temporaries stay small beside the fit's m × m arrays) and solved for all cells at once
    (fewer passes over the factor).
    """
    n = X.shape[0]
    k = np.empty((Z.shape[0], n), dtype=np.dtype(dtype), order="F")
    for p0 in range(0, n, piece):
        p1 = min(p0 + piece, n)
        k[:, p0:p1] = matern52(_pad_rows(X[p0:p1], min(piece, n)), Z, ls, dtype)[: p1 - p0].T
    as_factor(factor).solve(k)
    return np.einsum("ij,ij->j", k, k)


def posterior_variances(
    X: np.ndarray, Z: np.ndarray, factors: dict, ls: float, dtype: str = "float64", piece: int = 256,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Latent posterior variance of both conditions at cells ``X`` (gene-independent).

    v_c(x) = 1 − ‖Lp⁻¹ k_x‖² + ‖C_c⁻¹ k_x‖², which equals the DTC latent variance
    k(x,x) − k K̃uu⁻¹ k + σ² k (σ²K̃uu + S)⁻¹ k since C_c C_cᵀ = K̃uu + S/σ².

    Each term is :func:`solved_sq_norms`; the kernel block is evaluated again for each factor
    (~(d + 10)·m flops per cell against the solve's m²), so that a task holds one m × cells
    array. ``prior``: ‖Lp⁻¹ k_x‖², computed beforehand (``factors`` then need no ``Lp``).
    """
    if prior is None:
        prior = solved_sq_norms(X, Z, factors["Lp"], ls, dtype, piece)
    return (1.0 - prior + solved_sq_norms(X, Z, factors["C1"], ls, dtype, piece),
            1.0 - prior + solved_sq_norms(X, Z, factors["C2"], ls, dtype, piece))


# --------------------------------------------------------------------------------------
# Landmarks and length scale (client side, on the embedding only)


def sample_rows(n: int, size: int | None, random_state: int | None) -> np.ndarray | None:
    """Sorted row indices of a seeded sample of ``size`` of ``n`` rows, or ``None`` when the
    sample would hold every row (``size`` is ``None`` or at least ``n``)."""
    if size is None or size >= n:
        return None
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=int(size), replace=False))


def compute_landmarks(X: np.ndarray, n_landmarks: int, random_state: int | None,
                      sample: int | None = None) -> np.ndarray:
    """Landmarks of the pooled cells ``X``: all of them if there are at most ``n_landmarks``,
    otherwise k-means centroids (one seeded initialisation, as in the reference).

    With ``sample``, k-means clusters a seeded sample of that many cells when there are more:
    its cost is then bounded (k-means++ and each Lloyd step are O(cells · landmarks · d)),
    while the landmarks still cover the embedding (their only job is to carry the GP).
    ``sample=None`` clusters every cell, as kompot 0.8.0 does.
    """
    if n_landmarks >= X.shape[0]:
        logger.warning(
            "n_landmarks=%s are requested while only %s cells are available. "
            "Using all cells as %s landmarks instead.",
            f"{n_landmarks:,}", f"{X.shape[0]:,}", f"{X.shape[0]:,}",
        )
        return np.asarray(X, dtype=np.float64).copy()
    from sklearn.cluster import k_means

    rows = sample_rows(X.shape[0], None if sample is None else max(int(sample), n_landmarks), random_state)
    pool = np.asarray(X if rows is None else X[rows], dtype=np.float64)
    if rows is not None:
        logger.info("k-means landmarks from a seeded sample of %s of %s cells", f"{len(rows):,}", f"{X.shape[0]:,}")
    centers, _, _ = k_means(pool, n_landmarks, n_init=1, random_state=random_state)
    return np.asarray(centers, dtype=np.float64)


def exact_nearest_distances(X, queries: np.ndarray | None = None, *, query_block: int = 512,
                            ref_block: int = 32768) -> np.ndarray:
    """Euclidean distance from each query row of ``X`` (``queries``: row indices, default
    all) to its nearest *other* row of ``X``, found exactly by blocked matrix products.

    ``X`` is an array or anything that returns float rows for ``X[i:j]`` and ``X[indices]``
    (a stored embedding's rows): each block of ``ref_block`` reference rows is read once.
    Needs no compiled code and no index: O(queries · rows · d) flops, and memory of one
    ``query_block × ref_block`` distance block (128 MiB by default) whatever the sizes.
    The chosen neighbour's distance is recomputed from the coordinate differences, so it
    carries no cancellation error from the ‖x‖² − 2x·y + ‖y‖² expansion.
    """
    if isinstance(X, np.ndarray):
        X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    q_rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    if n < 2:
        raise ValueError("the length scale needs at least 2 condition-1 cells")
    xq_all = np.asarray(X[q_rows], dtype=np.float64)
    sq_q = np.einsum("ij,ij->i", xq_all, xq_all)
    best_d = np.full(len(q_rows), np.inf)
    best = np.zeros(len(q_rows), dtype=np.int64)
    for r0 in range(0, n, ref_block):
        ref = np.asarray(X[r0 : r0 + ref_block], dtype=np.float64)
        sq_r = np.einsum("ij,ij->i", ref, ref)
        for q0 in range(0, len(q_rows), query_block):
            qs = slice(q0, q0 + query_block)
            qi = q_rows[qs]
            d2 = xq_all[qs] @ ref.T
            d2 *= -2.0
            d2 += sq_q[qs, None]
            d2 += sq_r[None, :]
            own = (qi >= r0) & (qi < r0 + d2.shape[1])
            d2[np.flatnonzero(own), qi[own] - r0] = np.inf  # not itself
            j = np.argmin(d2, axis=1)
            dj = d2[np.arange(len(qi)), j]
            better = dj < best_d[qs]
            best_d[qs] = np.where(better, dj, best_d[qs])
            best[qs] = np.where(better, j + r0, best[qs])
    diff = xq_all - np.asarray(X[best], dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def sampled_nearest_distances(X: np.ndarray, sample: int | None, random_state: int | None) -> np.ndarray:
    """Exact nearest-neighbour distances of a seeded sample of ``sample`` rows of ``X`` (all
    rows when ``None`` or fewer), each against every other row of ``X``.

    The length scale is a geometric mean of these distances; a sample estimates it without
    bias, at a cost linear in the cells (sample · cells · d) instead of quadratic.
    """
    rows = sample_rows(X.shape[0], sample, random_state)
    return exact_nearest_distances(X, rows)


def numba_cache_dir() -> str:
    """Where compiled numba code (pynndescent) is cached between processes: ``NUMBA_CACHE_DIR``,
    else a directory under the user's cache (worker processes get it in their environment)."""
    return os.environ.get(
        "NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "kompot_dask", "numba")
    )


def _import_nndescent():
    """Import pynndescent with numba's on-disk cache switched on for its kernels.

    pynndescent compiles ~40 s of numba code in every fresh process and caches only part
    of it. Importing it while ``numba.njit``/``numba.jit`` default to ``cache=True`` stores
    the compiled kernels under ``NUMBA_CACHE_DIR`` (see :func:`numba_cache_dir`),
    so later processes load them instead of compiling again.
    """
    import sys

    if "pynndescent" in sys.modules:
        from pynndescent import NNDescent

        return NNDescent
    import warnings

    os.environ.setdefault("NUMBA_CACHE_DIR", numba_cache_dir())
    import numba
    from numba.core import config as numba_config

    numba_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
    original_njit, original_jit = numba.njit, numba.jit

    def _cached(decorator):
        def wrapper(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)

        return wrapper

    numba.njit, numba.jit = _cached(original_njit), _cached(original_jit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pynndescent import NNDescent
    finally:
        numba.njit, numba.jit = original_njit, original_jit
    return NNDescent


def nearest_neighbour_distances(X: np.ndarray) -> np.ndarray:
    """Distance of each row of ``X`` to its nearest other row, found with pynndescent exactly
    as the reference does (2 neighbours, Euclidean, ``random_state=42``): an approximate
    search, which on 2 neighbours returns a farther cell for some rows (1–20 % of them on
    our test data), and ~20 s of numba compiling in every fresh process."""
    NNDescent = _import_nndescent()
    index = NNDescent(np.asarray(X), n_neighbors=2, metric="euclidean", random_state=42)
    _, dist = index.neighbor_graph
    return np.asarray(dist[:, 1])


def length_scale_from_distances(nn: np.ndarray, ls_factor: float) -> float:
    """ℓ = ls_factor · exp(mean log nn + 3).

    Zero distances (duplicate cells) would drive ℓ to 0; they are replaced by the smallest
    positive distance. The arithmetic runs in the distances' own precision (pynndescent
    returns float32) with JAX's reduction, which is how the reference evaluates it, so the
    estimate agrees with kompot 0.8.0 to the last bit.
    """
    nn = np.asarray(nn)
    if not np.issubdtype(nn.dtype, np.floating):
        nn = nn.astype(np.float64)
    positive = nn[nn > 0]
    if positive.size == 0:
        raise ValueError(
            "Every condition-1 cell has a duplicate (all nearest-neighbour distances are 0); "
            "the length scale cannot be estimated. Pass GPSettings(ls=...) explicitly."
        )
    if positive.size < nn.size:
        logger.warning(
            "%d condition-1 cells have an exact duplicate; their zero nearest-neighbour "
            "distances are replaced by the smallest positive one (%.3g).",
            nn.size - positive.size, positive.min(),
        )
        nn = np.where(nn > 0, nn, positive.min())
    with precision("float64"):
        geo = jnp.exp(jnp.log(jnp.asarray(nn)).mean() + 3.0).item()
    return float(geo * ls_factor)
