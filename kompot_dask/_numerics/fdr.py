"""Null genes and local/tail FDR for the per-gene Mahalanobis distances (DESIGN.md §2).

Everything here is plain numpy/scipy on small 1-D arrays (one value per gene), so the
engine calls it on the driver once the distributed part has produced the distances.

Null genes
    :func:`choose_null_genes` picks the source genes and one permutation seed per null
    gene; :func:`null_permutation` turns a seed into the row permutation that is applied
    to the stacked ``[condition-1 cells; condition-2 cells]`` column of the source gene.
    Both reproduce kompot 0.8.0's random streams draw for draw, which is what makes FDR
    parity with the reference possible.

Statistics
    :func:`compute_fdr` estimates a non-increasing density of the distances for the null
    genes (``f0``) and for the real genes (``f_mix``) on a 500-point grid (a Gaussian
    KDE reflected at zero, made non-increasing by antitonic regression and normalised),
    then reports ``local FDR = f0 / f_mix`` and ``tail FDR = S0 / S_mix`` (``S`` the
    survival functions), both with π0 = 1, made non-increasing in the distance and
    interpolated at each real gene's distance.

Variance-stratified FDR (upstream kompot's opt-in after 0.8.0)
    :func:`variance_stratified_fdr` regresses ``log(1 + D²)`` of the null genes on per-gene
    expression features and applies :func:`compute_fdr` to the positive part of every
    gene's standardised residual (``docs/fdr.md``).

Calibrated FDR (kompot_dask's own)
    :func:`neighbourhood_permutations` permutes the condition labels within neighbourhoods
    of the cell-state space (so each neighbourhood keeps its share of each condition);
    every gene is fitted and scored again under each permutation, and
    :func:`permutation_fdr` tests the log ratio of each gene's distance to its permuted
    ones against the same statistic with a permutation in the real labels' place
    (``docs/fdr.md``).

Non-finite distances (kompot 0.8.0 behaviour, reproduced on purpose)
    * The grid's upper end follows Python's ``max(max(real), max(null))``: a NaN among
      the real distances makes it NaN, while a NaN among the null distances (and no NaN
      among the real ones) makes the null genes drop out of it (the grid then spans the
      real distances only).
    * Whenever that upper end is not finite (NaN or ±inf anywhere it is taken from), the
      reference's arithmetic degenerates to ``1`` for every real gene: local and tail FDR
      are 1, and NaN for the genes whose distance is NaN; no gene is significant.
    * A null set containing NaN/inf makes the KDE fail, so its density comes from the
      histogram fallback, which ignores the non-finite values.
    * Empirical p-values sort NaN above every number: a NaN null distance counts as
      exceeding every real distance, and a NaN real distance gets
      ``#(NaN null) / n_null`` (then the zero replacement).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import gaussian_kde

logger = logging.getLogger("kompot_dask")

N_GRID = 500
"""Number of grid points for the density estimates."""

GRID_MARGIN = 1.05
"""The grid spans ``[0, GRID_MARGIN * max distance]``."""

_SEED_HIGH = 2**31 - 1
"""Exclusive upper bound of the per-null permutation seeds."""

__all__ = [
    "FDRResult",
    "TrendResult",
    "neighbourhood_count",
    "neighbourhood_permutations",
    "permutation_fdr",
    "permuted_distance",
    "variance_stratified_fdr",
    "choose_null_genes",
    "compute_fdr",
    "empirical_pvalues",
    "monotone_density",
    "neg_log10_ptp",
    "null_permutation",
    "pava_nonincreasing",
]


# ---------------------------------------------------------------------------
# Null genes
# ---------------------------------------------------------------------------


def _as_count(value: Any, name: str) -> int:
    """Return ``value`` as a Python int, or raise a ``ValueError`` naming it."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def choose_null_genes(n_vars: int, n_null: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Choose the source genes and the permutation seeds of the null genes.

    Parameters
    ----------
    n_vars : int
        Number of genes to draw from (all of ``adata.var_names`` in kompot 0.8.0, not just
        the analysed genes).
    n_null : int
        Number of null genes. ``0`` gives two empty arrays.
    seed : int, default 42
        The ``null_seed``. Two independent ``numpy.random.RandomState(seed)`` streams are
        used: one draws the source genes, the other the per-null permutation seeds.

    Returns
    -------
    source_gene_indices : numpy.ndarray
        ``int64`` array of length ``n_null``:
        ``RandomState(seed).choice(n_vars, n_null, replace=n_null > n_vars)``.
    permutation_seeds : numpy.ndarray
        ``int64`` array of length ``n_null``; entry ``i`` is the ``i``-th draw of
        ``RandomState(seed).randint(0, 2**31 - 1)``. Pass it to :func:`null_permutation`.

    Raises
    ------
    ValueError
        If ``n_vars < 1`` or ``n_null < 0`` (or either is not an integer).

    Notes
    -----
    When ``n_null > n_vars`` the genes are drawn with replacement and a warning is
    logged, as in the reference.
    """
    n_vars = _as_count(n_vars, "n_vars")
    n_null = _as_count(n_null, "n_null")
    if n_vars < 1:
        raise ValueError(f"n_vars must be at least 1, got {n_vars}")
    if n_null < 0:
        raise ValueError(f"n_null must be non-negative, got {n_null}")

    replace = n_null > n_vars
    if replace:
        logger.warning(
            "Requested %d null genes but only %d genes are available; "
            "drawing the null source genes with replacement.",
            n_null,
            n_vars,
        )
    gene_rng = np.random.RandomState(seed)
    sources = np.asarray(gene_rng.choice(n_vars, size=n_null, replace=replace), dtype=np.int64)

    # One scalar draw per null gene, in order, exactly like the reference's loop.
    seed_rng = np.random.RandomState(seed)
    seeds = np.fromiter(
        (seed_rng.randint(0, _SEED_HIGH) for _ in range(n_null)), dtype=np.int64, count=n_null
    )
    return sources, seeds


def null_permutation(n_cells: int, seed: int) -> np.ndarray:
    """Row permutation of one null gene.

    Parameters
    ----------
    n_cells : int
        Length of the stacked column (condition-1 cells followed by condition-2 cells).
    seed : int
        One of the ``permutation_seeds`` from :func:`choose_null_genes`.

    Returns
    -------
    numpy.ndarray
        ``int64`` index array ``p`` such that ``v[p]`` equals
        ``numpy.random.RandomState(seed).permutation(v)`` for any 1-D numeric array ``v``
        of length ``n_cells`` (numpy's legacy shuffle draws the same swaps whatever the
        dtype).

    Raises
    ------
    ValueError
        If ``n_cells`` is negative or not an integer.
    """
    n_cells = _as_count(n_cells, "n_cells")
    if n_cells < 0:
        raise ValueError(f"n_cells must be non-negative, got {n_cells}")
    return np.random.RandomState(seed).permutation(n_cells).astype(np.int64, copy=False)


# ---------------------------------------------------------------------------
# Antitonic regression
# ---------------------------------------------------------------------------


def pava_nonincreasing(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares non-increasing fit (antitonic regression) by PAVA.

    Parameters
    ----------
    y : numpy.ndarray
        1-D array of finite values.
    w : numpy.ndarray, optional
        1-D array of positive finite weights, same length as ``y``; uniform when omitted.

    Returns
    -------
    numpy.ndarray
        ``float64`` array ``g`` with ``g[0] >= g[1] >= ...`` minimising
        ``sum(w * (y - g) ** 2)``.

    Raises
    ------
    ValueError
        If ``y`` is not 1-D or holds non-finite values, or ``w`` does not match ``y`` or
        is not positive and finite.

    Notes
    -----
    Adjacent blocks are pooled whenever the earlier block's mean is not above the later
    one's, and a pooled mean is updated incrementally,
    ``m <- m_a + (w_b / (w_a + w_b)) * (m_b - m_a)``, rather than as a weighted sum
    divided by the total weight; this is the numerically careful update of fdrtool's
    ``isomean`` and matches kompot's results to the last bits.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y must be finite")
    n = y.shape[0]
    if w is None:
        weights = np.ones(n, dtype=np.float64)
    else:
        weights = np.asarray(w, dtype=np.float64)
        if weights.shape != y.shape:
            raise ValueError(f"w must have the shape of y {y.shape}, got {weights.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise ValueError("w must be positive and finite")
    if n <= 1:
        return y.copy()

    # Stack of blocks: mean, total weight, first index.
    means: list[float] = []
    totals: list[float] = []
    starts: list[int] = []
    for i in range(n):
        m = float(y[i])
        t = float(weights[i])
        s = i
        while means and means[-1] <= m:
            m_prev = means.pop()
            t_prev = totals.pop()
            s = starts.pop()
            t_new = t_prev + t
            m = m_prev + (t / t_new) * (m - m_prev)
            t = t_new
        means.append(m)
        totals.append(t)
        starts.append(s)

    lengths = np.diff(np.append(np.asarray(starts, dtype=np.int64), n))
    return np.repeat(np.asarray(means, dtype=np.float64), lengths)


# ---------------------------------------------------------------------------
# FDR statistics
# ---------------------------------------------------------------------------


@dataclass
class FDRResult:
    """FDR statistics for the real genes.

    Attributes
    ----------
    pvalue : numpy.ndarray
        Empirical p-value ``#{null >= D} / n_null`` with exact zeros replaced by the
        smallest non-zero p-value (or ``1 / n_null`` when all are zero). Informational.
    local_fdr : numpy.ndarray
        Local FDR ``f0(D) / f_mix(D)`` (π0 = 1), in [0, 1], non-increasing in ``D``.
    tail_fdr : numpy.ndarray
        Tail FDR ``S0(D) / S_mix(D)`` (π0 = 1), in [0, 1], non-increasing in ``D``.
    is_de : numpy.ndarray
        Boolean, ``local_fdr < threshold`` (strictly).
    summary : dict
        ``n_significant`` (int), ``n_total`` (int), ``fraction_significant`` (float; NaN
        when there are no genes), ``fdr_threshold`` (float) and
        ``min_significant_mahalanobis`` (float; the smallest ``D`` among significant
        genes, ``inf`` when none is significant).
    """

    pvalue: np.ndarray
    local_fdr: np.ndarray
    tail_fdr: np.ndarray
    is_de: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def _as_distances(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D float64 array, or raise a ``ValueError`` naming it."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def neg_log10_ptp(mahalanobis: np.ndarray, df: int) -> np.ndarray:
    """−log10 P(χ²_df ≥ D²) per gene, from the log survival function so that distances far
    in the tail keep their resolution (kompot's ``neg_log10_ptp``: ``df`` is the embedding's
    dimension count). NaN distances stay NaN."""
    from scipy.stats import chi2

    d = np.asarray(mahalanobis, dtype=np.float64)
    return -chi2.logsf(d * d, int(df)) / np.log(10.0)


def empirical_pvalues(real: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Empirical upper-tail p-values of ``real`` against the ``null`` sample.

    Parameters
    ----------
    real : numpy.ndarray
        1-D float64 distances of the real genes.
    null : numpy.ndarray
        1-D float64 distances of the null genes.

    Returns
    -------
    numpy.ndarray
        ``#{null >= D} / n_null`` per real gene, zeros replaced by the smallest non-zero
        value (``1 / n_null`` if every value is zero). NaN sorts above every number (see
        the module notes); an empty ``null`` gives NaN everywhere.
    """
    ordered = np.sort(null)
    n_null = ordered.shape[0]
    n_at_or_above = n_null - np.searchsorted(ordered, real, side="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        pvalues = n_at_or_above.astype(np.float64) / n_null
    zero = pvalues == 0.0
    if np.any(zero):
        positive = pvalues[~zero]
        floor = float(np.min(positive)) if positive.size else 1.0 / n_null
        pvalues[zero] = floor
        logger.debug("Replaced %d zero p-values by %g", int(np.sum(zero)), floor)
    return pvalues


def _reflected_kde(distances: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Density on ``grid`` from a Gaussian KDE of ``distances`` mirrored at zero.

    Falls back to a histogram over ``len(grid)`` equal bins spanning the grid when the
    KDE cannot be built (all distances equal to zero, or non-finite values).
    """
    try:
        kde = gaussian_kde(np.concatenate([-distances, distances]))
        return 2.0 * kde(grid)
    except (np.linalg.LinAlgError, ValueError):
        logger.debug("Gaussian KDE failed; using a histogram density instead")
        edges = np.linspace(grid[0], grid[-1], grid.shape[0] + 1)
        counts, _ = np.histogram(distances, bins=edges)
        return counts.astype(np.float64) / (distances.shape[0] * (edges[1] - edges[0]))


def monotone_density(distances: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Non-increasing density estimate (Grenander type) of ``distances`` on ``grid``.

    Parameters
    ----------
    distances : numpy.ndarray
        1-D float64 sample (non-negative in practice).
    grid : numpy.ndarray
        Finite, evenly spaced, increasing evaluation points starting at 0.

    Returns
    -------
    numpy.ndarray
        Reflected-KDE density (histogram if the KDE fails), made non-increasing with
        :func:`pava_nonincreasing`, clamped at 0 and divided by its trapezoid integral
        over the grid (left unnormalised if that integral is 0).
    """
    density = pava_nonincreasing(_reflected_kde(distances, grid))
    density = np.maximum(density, 0.0)
    area = np.trapezoid(density, grid)
    if area > 0:
        density = density / area
    return density


def _ratio_fdr(numer: np.ndarray, denom: np.ndarray, eps: float) -> np.ndarray:
    """``numer / denom`` where ``denom > eps`` (else 1), clipped to [0, 1], non-increasing."""
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(denom > eps, numer / denom, 1.0)
    return pava_nonincreasing(np.clip(raw, 0.0, 1.0))


def _interpolate_fdr(grid: np.ndarray, curve: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``curve`` at ``at``: 1 below the grid, 0 above, clipped."""
    return np.clip(np.interp(at, grid, curve, left=1.0, right=0.0), 0.0, 1.0)


def _grid_top(real: np.ndarray, null: np.ndarray) -> float:
    """Largest distance, with the reference's order-dependent NaN semantics.

    Python's ``max(a, b)`` keeps ``a`` unless ``b > a``: a NaN maximum of the real
    distances wins, a NaN maximum of the null distances loses.
    """
    top_real = float(np.max(real))
    top_null = float(np.max(null))
    return top_null if top_null > top_real else top_real


def _local_and_tail_fdr(
    real: np.ndarray, null: np.ndarray, n_grid: int = N_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """Local and tail FDR of the real distances (see :func:`compute_fdr`)."""
    n_real = real.shape[0]
    if n_real < 2 or null.shape[0] < 2:
        logger.warning(
            "Too few distances for FDR estimation (%d real, %d null); every FDR is 1",
            n_real,
            null.shape[0],
        )
        return np.ones(n_real), np.ones(n_real)

    top = _grid_top(real, null)
    upper = top * GRID_MARGIN
    if not np.isfinite(upper):
        logger.warning(
            "Non-finite Mahalanobis distances (grid end %r); every FDR is 1 (NaN for NaN "
            "distances)",
            upper,
        )
        ones = np.where(np.isnan(real), np.nan, 1.0)
        return ones, ones.copy()
    if top <= 0:
        return np.ones(n_real), np.ones(n_real)

    grid = np.linspace(0.0, upper, n_grid)
    step = grid[1] - grid[0]
    f0 = monotone_density(null, grid)
    f_mix = monotone_density(real, grid)

    peak = float(np.max(f_mix))
    eps = peak * 1e-10 if peak > 0 else 1e-20

    lfdr_curve = _ratio_fdr(f0, f_mix, eps)

    s0 = np.cumsum(f0[::-1])[::-1] * step
    s_mix = np.cumsum(f_mix[::-1])[::-1] * step
    tail_curve = _ratio_fdr(s0, s_mix, eps)

    return _interpolate_fdr(grid, lfdr_curve, real), _interpolate_fdr(grid, tail_curve, real)


def compute_fdr(real: np.ndarray, null: np.ndarray, threshold: float = 0.05) -> FDRResult:
    """P-values, local FDR, tail FDR and DE calls from real and null Mahalanobis distances.

    Parameters
    ----------
    real : numpy.ndarray
        1-D Mahalanobis distances ``D`` of the real genes (cast to float64).
    null : numpy.ndarray
        1-D Mahalanobis distances of the null genes (cast to float64).
    threshold : float, default 0.05
        A gene is called DE when its local FDR is strictly below this.

    Returns
    -------
    FDRResult
        Arrays aligned with ``real`` plus the summary dictionary.

    Raises
    ------
    ValueError
        If ``real`` or ``null`` is not 1-D.

    Notes
    -----
    Reproduces kompot 0.8.0's ``compute_fdr_statistics`` (with π0 = 1):

    * grid: ``N_GRID`` = 500 points over ``[0, 1.05 * max(real ∪ null)]``;
    * ``f0`` (null) and ``f_mix`` (real genes alone) from :func:`monotone_density`;
    * ``eps = 1e-10 * max(f_mix)`` (``1e-20`` if that is not positive);
    * local FDR curve ``f0 / f_mix`` where ``f_mix > eps`` else 1, clipped to [0, 1] and
      made non-increasing; tail FDR likewise from the survival sums
      ``S(t) = Σ_{grid >= t} f * Δgrid`` (same ``eps``);
    * both curves interpolated linearly at each ``D`` (1 below the grid, 0 above).

    Degenerate inputs give FDR = 1 for every gene: fewer than 2 real or 2 null values, a
    largest distance ``<= 0``, or a non-finite grid end (see the module notes for NaN).
    """
    real = _as_distances(real, "real")
    null = _as_distances(null, "null")
    threshold = float(threshold)

    pvalue = empirical_pvalues(real, null)
    local_fdr, tail_fdr = _local_and_tail_fdr(real, null)
    is_de = local_fdr < threshold

    n_total = int(real.shape[0])
    n_significant = int(np.count_nonzero(is_de))
    fraction = n_significant / n_total if n_total else float("nan")
    min_sig = float(np.min(real[is_de])) if n_significant else float("inf")
    summary: dict[str, Any] = {
        "n_significant": n_significant,
        "n_total": n_total,
        "fraction_significant": float(fraction),
        "fdr_threshold": threshold,
        "min_significant_mahalanobis": min_sig,
    }
    return FDRResult(
        pvalue=pvalue, local_fdr=local_fdr, tail_fdr=tail_fdr, is_de=is_de, summary=summary
    )


# ---------------------------------------------------------------------------
# Variance-stratified FDR
# ---------------------------------------------------------------------------


@dataclass
class TrendResult:
    """:func:`variance_stratified_fdr`'s output.

    Attributes
    ----------
    residual_z, null_residual_z : numpy.ndarray
        Standardised residuals of ``log(1 + D²)`` against the null trend, real and null genes
        (NaN where a distance or a feature is not finite).
    fdr : FDRResult
        :func:`compute_fdr` of ``max(0, residual_z)`` against ``max(0, null_residual_z)``;
        its summary also holds ``min_significant_residual_z`` and ``mode``, and its
        ``min_significant_mahalanobis`` is in distance units as for the raw mode.
    coefficients : numpy.ndarray
        The trend's coefficients on the standardised design (intercept first).
    scale : float
        The null residuals' standard deviation (``n − p`` degrees of freedom).
    """

    residual_z: np.ndarray
    null_residual_z: np.ndarray
    fdr: FDRResult
    coefficients: np.ndarray
    scale: float


def _trend_features(moments: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
    """genes × features: ``log(1 + mean)`` and/or ``log(1 + variance)`` from 2 × genes moments."""
    moments = np.asarray(moments, dtype=np.float64)
    cols = {"log_mean": np.log1p(np.maximum(moments[0], 0.0)), "log_var": np.log1p(np.maximum(moments[1], 0.0))}
    return np.stack([cols[f] for f in features], axis=1)


def _trend_design(x: np.ndarray, centre: np.ndarray, spread: np.ndarray, degree: int) -> np.ndarray:
    """Intercept, then each standardised feature's powers 1..degree (no cross terms)."""
    u = (x - centre) / spread
    cols = [np.ones(len(x))] + [u[:, j] ** p for j in range(u.shape[1]) for p in range(1, degree + 1)]
    return np.stack(cols, axis=1)


def variance_stratified_fdr(real: np.ndarray, null: np.ndarray, real_moments: np.ndarray, null_moments: np.ndarray,
                            *, features: tuple[str, ...] = ("log_mean", "log_var"), degree: int = 3,
                            threshold: float = 0.05) -> TrendResult:
    """Local FDR of the distances after removing their trend in expression level and spread.

    Parameters
    ----------
    real, null : numpy.ndarray
        Mahalanobis distances of the real and the null genes.
    real_moments, null_moments : numpy.ndarray
        2 × genes: each gene's mean and variance over the analysed cells (a null gene has
        its source gene's: a permutation keeps both).
    features : tuple of str
        ``"log_mean"`` (``log(1 + mean)``) and/or ``"log_var"`` (``log(1 + variance)``).
    degree : int
        Polynomial degree in each feature (3: ``"poly3"``).
    threshold : float
        ``is_de`` is ``local FDR < threshold``.

    Notes
    -----
    * Response ``t = log(1 + D²)``; design: an intercept and ``u_j, …, u_j^degree`` of each
      feature standardised by the null genes' mean and standard deviation (cross terms
      are left out: ``1 + 2 · 3 = 7`` terms for the default).
    * Least squares on the null genes gives the trend; ``σ̂`` is the null residuals'
      standard deviation with ``n − p`` degrees of freedom. Every gene's
      ``z = (t − trend) / σ̂``.
    * Real genes' features are clipped to the null genes' range before the trend is
      evaluated: a polynomial is not extrapolated.
    * The 1-D local FDR of :func:`compute_fdr` is applied to ``max(0, z)`` (genes closer
      than the trend are as null as it gets).
    * Fewer than ``2p + 2`` usable null genes, or a zero residual spread: the trend cannot
      be estimated, every FDR is 1 (a warning says so).
    """
    real = _as_distances(real, "real")
    null = _as_distances(null, "null")
    xr = _trend_features(real_moments, tuple(features))
    xn = _trend_features(null_moments, tuple(features))
    if xr.shape[0] != real.shape[0] or xn.shape[0] != null.shape[0]:
        raise ValueError(f"moments for {xr.shape[0]} real / {xn.shape[0]} null genes, distances for "
                         f"{real.shape[0]} / {null.shape[0]}")
    tr, tn = np.log1p(real * real), np.log1p(null * null)
    ok = np.isfinite(tn) & np.all(np.isfinite(xn), axis=1)
    n_terms = 1 + degree * xr.shape[1]
    zr = np.full(real.shape, np.nan)
    zn = np.full(null.shape, np.nan)
    coef = np.full(n_terms, np.nan)
    scale = float("nan")
    if ok.sum() >= 2 * n_terms + 2:
        lo, hi = xn[ok].min(axis=0), xn[ok].max(axis=0)
        centre = xn[ok].mean(axis=0)
        spread = xn[ok].std(axis=0)
        spread = np.where(spread > 0, spread, 1.0)
        A = _trend_design(xn[ok], centre, spread, degree)
        coef, *_ = np.linalg.lstsq(A, tn[ok], rcond=None)
        resid = tn[ok] - A @ coef
        scale = float(np.sqrt(resid @ resid / (ok.sum() - n_terms)))
    if np.isfinite(scale) and scale > 0:
        zn[ok] = resid / scale
        fine = np.isfinite(tr) & np.all(np.isfinite(xr), axis=1)
        Ar = _trend_design(np.clip(xr[fine], lo, hi), centre, spread, degree)
        zr[fine] = (tr[fine] - Ar @ coef) / scale
        pos_r = np.where(np.isnan(zr), np.nan, np.maximum(zr, 0.0))
        fdr = compute_fdr(pos_r, np.maximum(zn[ok], 0.0), threshold)
    else:
        logger.warning("The null genes' distance trend cannot be estimated (%d usable null genes for %d terms, "
                       "residual spread %r); every FDR is 1", int(ok.sum()), n_terms, scale)
        ones = np.where(np.isnan(real), np.nan, 1.0)
        fdr = FDRResult(pvalue=ones.copy(), local_fdr=ones, tail_fdr=ones.copy(),
                        is_de=np.zeros(real.shape, dtype=bool),
                        summary={"n_significant": 0, "n_total": int(real.shape[0]),
                                 "fraction_significant": 0.0 if real.shape[0] else float("nan"),
                                 "fdr_threshold": float(threshold)})
    sig = fdr.is_de
    fdr.summary["min_significant_mahalanobis"] = float(np.min(real[sig])) if sig.any() else float("inf")
    fdr.summary["min_significant_residual_z"] = float(np.min(zr[sig])) if sig.any() else float("inf")
    fdr.summary["mode"] = "variance_stratified"
    return TrendResult(zr, zn, fdr, coef, scale)


# ---------------------------------------------------------------------------
# Calibrated FDR: condition labels permuted within cell-state neighbourhoods
# ---------------------------------------------------------------------------

_NEIGHBOUR_ROWS = 65_536
"""Cells per step of the nearest-centre search (a cells × centres block of float64)."""


def neighbourhood_count(n_cells: int, cells_per_neighbourhood: int, n_landmarks: int) -> int:
    """Neighbourhoods of :func:`neighbourhood_permutations`: one per ``cells_per_neighbourhood``
    analysed cells, at least 2 and at most one per landmark."""
    return int(min(max(int(n_cells) // max(int(cells_per_neighbourhood), 1), 2), int(n_landmarks)))


def neighbourhood_permutations(codes: np.ndarray, X: Any, Z: np.ndarray, cells_per_neighbourhood: int,
                               seed: int, n_permutations: int = 1) -> tuple[np.ndarray, int]:
    """Condition labels permuted within neighbourhoods of the cell-state space.

    Parameters
    ----------
    codes
        Per store row: 1 and 2 for the two conditions' cells, 0 for the rest (kept 0).
    X
        The embedding: anything that gives rows for a slice (an array or a stored reader);
        read ``_NEIGHBOUR_ROWS`` rows at a time, once.
    Z
        The run's landmarks; the neighbourhood centres are a seeded subset of them.
    cells_per_neighbourhood
        Mean analysed cells per neighbourhood (:func:`neighbourhood_count`).
    seed
        Seeds the choice of centres and each permutation.
    n_permutations
        How many independent permutations.

    Returns
    -------
    ``n_permutations`` × rows of permuted codes (each neighbourhood keeps its count of each
    condition in each), and the number of neighbourhoods.
    """
    codes = np.asarray(codes)
    analysed = np.flatnonzero(codes > 0)
    n, m = len(analysed), Z.shape[0]
    k = neighbourhood_count(n, cells_per_neighbourhood, m)
    pick = np.random.default_rng([int(seed), 16]).choice(m, size=k, replace=False)
    centres = np.asarray(Z, dtype=np.float64)[np.sort(pick)]
    c2 = np.einsum("kd,kd->k", centres, centres)
    nearest = np.empty(n, dtype=np.int64)
    n_obs = len(codes)
    for r0 in range(0, n_obs, _NEIGHBOUR_ROWS):
        r1 = min(r0 + _NEIGHBOUR_ROWS, n_obs)
        lo, hi = np.searchsorted(analysed, [r0, r1])
        if hi == lo:
            continue
        x = np.asarray(X[r0:r1], dtype=np.float64)[analysed[lo:hi] - r0]
        nearest[lo:hi] = np.argmin(c2[None, :] - 2.0 * (x @ centres.T), axis=1)  # ‖x‖² is the same for all
    labels = codes[analysed]
    grouped = np.argsort(nearest, kind="stable")  # the cells of each neighbourhood together
    out = np.repeat(codes[None, :], int(n_permutations), axis=0)
    for p in range(int(n_permutations)):
        keys = np.random.default_rng([int(seed), 17, p]).random(n)
        shuffled = np.lexsort((keys, nearest))  # the same blocks, each in a random order
        permuted = np.empty(n, dtype=codes.dtype)
        permuted[shuffled] = labels[grouped]
        out[p, analysed] = permuted
    return out, k


_SAMPLE_ENUMERATION = 20_000
"""Up to this many balanced relabellings of the samples are listed and drawn from without
repeats; above it they are drawn one at a time, a repeat drawn again."""


def sample_permutations(condition: Any, n_permutations: int, seed: int) -> tuple[np.ndarray, float]:
    """Condition labels permuted between whole samples (``sample_col`` with
    ``FDRSettings(mode="calibrated")``).

    Each relabelling keeps the conditions' sample counts S₁ and S₂. Of the S₁ samples it
    labels condition 1, ``a`` come from condition 1, with ``a`` chosen so that both new
    groups mix the two conditions as evenly as the counts allow: the share of a real
    effect left in a relabelled contrast, ``a/S₁ − (S₁ − a)/S₂``, is the smallest possible
    in absolute value (0 for even counts per condition, ±1/3 for 3 + 3 samples). Under the
    null hypothesis (samples exchangeable between conditions) every split of the samples
    into S₁ + S₂ gives a distance of the same distribution as the real split's. A split
    and its mirror image (the two groups swapped) give the same distance, so they count as
    one; the P relabellings are distinct.

    Parameters
    ----------
    condition
        Each fitted sample's condition (1 or 2).
    n_permutations
        How many relabellings.
    seed
        Seeds the draw.

    Returns
    -------
    P × samples of new conditions, and the share of a real effect they leave
    (``a/S₁ − (S₁ − a)/S₂`` for the smallest ``|·|``).

    Raises
    ------
    ValueError
        When fewer than ``n_permutations`` distinct balanced relabellings exist.
    """
    from math import comb

    condition = np.asarray(condition, dtype=np.int64)
    ones, twos = np.flatnonzero(condition == 1), np.flatnonzero(condition == 2)
    s1, s2 = len(ones), len(twos)
    if s1 < 1 or s2 < 1:
        raise ValueError(f"permuting samples between conditions needs samples of both ({s1} and {s2})")
    choices = {a: a / s1 - (s1 - a) / s2 for a in range(max(0, s1 - s2), s1)}  # a = s1: the real labels
    if not choices:
        raise ValueError(f"{s1} + {s2} samples have no relabelling besides the real one")
    best = min(abs(v) for v in choices.values())
    counts = [a for a, v in choices.items() if abs(v) - best < 1e-12]
    leak = choices[max(counts)]
    n = len(condition)

    def canonical(group1) -> tuple[int, ...]:
        g = tuple(sorted(int(i) for i in group1))
        if s1 == s2:  # the mirror image (groups swapped) gives the same distance
            other = tuple(sorted(set(range(n)) - set(g)))
            g = min(g, other)
        return g

    rng = np.random.default_rng([int(seed), 18])
    total = sum(comb(s1, a) * comb(s2, s1 - a) for a in counts)
    picked: list[tuple[int, ...]] = []
    if total <= _SAMPLE_ENUMERATION:
        from itertools import combinations

        distinct = sorted({canonical((*c1, *c2)) for a in counts for c1 in combinations(ones.tolist(), a)
                           for c2 in combinations(twos.tolist(), s1 - a)})
        if len(distinct) < n_permutations:
            raise ValueError(
                f"{s1} + {s2} samples allow {len(distinct)} distinct balanced relabelling(s), fewer than the "
                f"{n_permutations} permutation(s) asked for")
        picked = [distinct[i] for i in np.sort(rng.choice(len(distinct), size=int(n_permutations), replace=False))]
    else:
        seen: set[tuple[int, ...]] = set()
        while len(picked) < n_permutations:
            a = int(rng.choice(counts))
            g = canonical((*rng.choice(ones, size=a, replace=False), *rng.choice(twos, size=s1 - a, replace=False)))
            if g not in seen:
                seen.add(g)
                picked.append(g)
    out = np.full((int(n_permutations), n), 2, dtype=np.int8)
    for p, g in enumerate(picked):
        out[p, list(g)] = 1
    # a canonical (swapped) group may be the one with S2 samples: label the S1-sized one 1
    for p in range(out.shape[0]):
        if int((out[p] == 1).sum()) != s1:
            out[p] = 3 - out[p]
    return out, float(leak)


def permutation_fdr(real: np.ndarray, permuted: np.ndarray, threshold: float = 0.05) -> tuple[np.ndarray, FDRResult]:
    """Local FDR of each gene's distance against its own distances under permuted labels.

    With ``f(D) = log(1 + D²)`` and P permutations (``permuted``: P × genes, or one row),
    the score is ``W = f(D) − mean_p f(D_p)``. Without an effect the labels are
    exchangeable within neighbourhoods, so ``D`` and every ``D_p`` are alike. The null
    sample is each permutation in the real distance's place: ``f(D_q) − mean_{p≠q} f(D_p)``
    for every q (P × genes values); with one permutation, ``−W`` (the mirror image). With
    P ≥ 2 that null is a little wider than ``W``'s own null (a mean of P − 1 terms instead
    of P), which errs on the side of fewer calls. :func:`compute_fdr` is applied to
    ``max(0, W)`` against the null's positive part. Genes with a non-finite ``W`` get FDR 1.
    Returns ``W`` and the FDR (its summary's ``min_significant_mahalanobis`` in distance
    units, plus ``mode`` and ``n_permutations``).
    """
    real = _as_distances(real, "real")
    perm = np.atleast_2d(np.asarray(permuted, dtype=np.float64))
    if perm.shape[1] != real.shape[0]:
        raise ValueError(f"permuted distances for {perm.shape[1]} genes, real ones for {real.shape[0]}")
    fp = np.log1p(perm * perm)
    w = np.log1p(real * real) - fp.mean(axis=0)
    ok = np.isfinite(w) & np.all(np.isfinite(fp), axis=0)
    P = fp.shape[0]
    if P == 1:
        null = -w[ok]
    else:
        total = fp[:, ok].sum(axis=0)
        null = np.concatenate([fp[q, ok] - (total - fp[q, ok]) / (P - 1) for q in range(P)])
    inner = compute_fdr(np.maximum(w[ok], 0.0), np.maximum(null, 0.0), threshold)
    n = len(w)

    def full(values, fill):
        out = np.full(n, fill, dtype=np.asarray(values).dtype)
        out[ok] = values
        return out

    fdr = FDRResult(pvalue=full(inner.pvalue, 1.0), local_fdr=full(inner.local_fdr, 1.0),
                    tail_fdr=full(inner.tail_fdr, 1.0), is_de=full(inner.is_de, False), summary=inner.summary)
    sig = fdr.is_de
    fdr.summary["n_total"] = n
    fdr.summary["fraction_significant"] = float(sig.sum() / n) if n else float("nan")
    fdr.summary["min_significant_mahalanobis"] = float(np.min(real[sig])) if sig.any() else float("inf")
    fdr.summary["mode"] = "calibrated"
    fdr.summary["n_permutations"] = P
    return np.where(ok, w, np.nan), fdr


def permuted_distance(permuted: np.ndarray) -> np.ndarray:
    """One distance per gene from P permutations' (P × genes): the one whose ``log(1 + D²)``
    is their mean, so that the calibrated score is ``log(1 + D²) − log(1 + this²)``."""
    fp = np.log1p(np.square(np.atleast_2d(np.asarray(permuted, dtype=np.float64))))
    return np.sqrt(np.expm1(fp.mean(axis=0)))
