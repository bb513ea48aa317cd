"""Synthetic single-cell data for tests, benchmarks and the demo, plus result assertions.

The generator gives cells in a d-dimensional state space (a mixture of clusters), a
condition label per cell, and log-scale expression that varies smoothly with cell state;
a fraction of genes shifts in the last condition in a state-dependent way. It can write
a zarr store row block by row block, so atlas-sized stores never sit in memory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "SyntheticSpec",
    "make_synthetic_adata",
    "write_synthetic_store",
    "make_user_obs",
    "assert_de_results_close",
]


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic dataset (deterministic given ``seed``)."""

    n_obs: int = 3000
    n_vars: int = 500
    n_dims: int = 20
    n_clusters: int = 6
    conditions: tuple[str, ...] = ("Young", "Old")
    groupby: str = "Age"
    de_fraction: float = 0.1
    dropout: float = 0.3
    seed: int = 0
    obsm_key: str = "X_pca"
    layer: str = "logged_counts"
    cell_types: tuple[str, ...] | None = None
    """Names for the generator's clusters, written as obs["cell_type"] (cluster k gets
    ``cell_types[k % len(cell_types)]``); ``None`` writes no such column."""
    umap: bool = False
    """Also write obsm["X_umap"]: the first two embedding coordinates (for plots)."""
    samples_per_condition: int = 0
    """Donors per condition, written as obs["sample"] ("<condition>_d<k>", drawn per cell);
    each donor shifts every gene's expression by its own smooth effect (a donor-to-donor
    spread for the sample variance to find). 0: no samples, no donor effect."""
    donor_effect: float = 0.3
    """Scale of the donor effects (samples_per_condition > 0)."""
    effect_size: tuple[float, float] = (0.8, 2.0)
    """Range of the planted DE genes' effect (|shift| of the log-scale mean, drawn uniformly)."""
    density_skew: float = 1.0
    """Cluster 0's cells are this many times as likely to be in the last condition as in the
    first (1: conditions drawn alike everywhere), with no expression change of its own: the
    density difference between conditions that a gene-shuffled null mistakes for DE."""
    variance_spread: float = 0.0
    """Log-normal spread of the genes' scale: each gene's cell-state structure and noise are
    multiplied by ``exp(variance_spread · N(0, 1))`` (0: every gene alike)."""


def _states(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 1])
    centers = rng.normal(scale=4.0, size=(spec.n_clusters, spec.n_dims))
    cluster = rng.integers(0, spec.n_clusters, size=spec.n_obs)
    X = centers[cluster] + rng.normal(scale=1.0, size=(spec.n_obs, spec.n_dims))
    cond = rng.integers(0, len(spec.conditions), size=spec.n_obs)
    if spec.density_skew != 1.0:  # a stream of its own: the other draws stay as they were
        first, last = 0, len(spec.conditions) - 1
        in0 = cluster == 0
        p_last = spec.density_skew / (1.0 + spec.density_skew)
        skewed = np.random.default_rng([spec.seed, 7]).random(int(in0.sum())) < p_last
        cond[in0] = np.where(skewed, last, first)
    return X.astype(np.float32), cond, cluster


def _donors(spec: SyntheticSpec) -> np.ndarray:
    """Each cell's donor within its condition (0 … samples_per_condition − 1)."""
    rng = np.random.default_rng([spec.seed, 4])
    return rng.integers(0, max(spec.samples_per_condition, 1), size=spec.n_obs)


def _donor_shift(spec: SyntheticSpec, X: np.ndarray, cond: np.ndarray, donor: np.ndarray) -> np.ndarray:
    """Per-cell, per-gene donor effect: a constant plus a smooth term along one direction."""
    k = spec.samples_per_condition
    if k == 0:
        return 0.0
    rng = np.random.default_rng([spec.seed, 5])
    n_donors = len(spec.conditions) * k
    offset = rng.normal(scale=spec.donor_effect, size=(n_donors, spec.n_vars))
    slope = rng.normal(scale=spec.donor_effect / np.sqrt(spec.n_dims), size=(n_donors, spec.n_dims))
    idx = cond * k + donor
    return offset[idx] + np.tanh(np.einsum("nd,nd->n", X, slope[idx]))[:, None]


def _obsm(spec: SyntheticSpec, X: np.ndarray) -> dict[str, np.ndarray]:
    out = {spec.obsm_key: X}
    if spec.umap:
        out["X_umap"] = np.ascontiguousarray(X[:, :2])
    return out


def _gene_params(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 2])
    g, d = spec.n_vars, spec.n_dims
    is_de = rng.random(g) < spec.de_fraction
    out = {
        "loadings": rng.normal(scale=0.6 / np.sqrt(d), size=(d, g)),
        "baseline": rng.normal(loc=0.5, scale=0.6, size=g),
        "de_direction": rng.normal(size=(d, g)) / np.sqrt(d),
        "de_effect": np.where(is_de, rng.choice([-1.0, 1.0], size=g) * rng.uniform(*spec.effect_size, size=g), 0.0),
        "is_de": is_de,
        "scale": np.ones(g),
    }
    if spec.variance_spread:
        out["scale"] = np.exp(spec.variance_spread * np.random.default_rng([spec.seed, 6]).normal(size=g))
        out["loadings"] = out["loadings"] * out["scale"]
    return out


_NOISE_GROUP = 128


def _noise(spec: SyntheticSpec, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise and dropout draws for rows r0:r1, identical however the rows are blocked."""
    g0, g1 = r0 // _NOISE_GROUP, -(-r1 // _NOISE_GROUP)
    gauss, drop = [], []
    for g in range(g0, g1):
        rng = np.random.default_rng([spec.seed, 3, g])
        gauss.append(rng.normal(scale=0.3, size=(_NOISE_GROUP, spec.n_vars)))
        drop.append(rng.random((_NOISE_GROUP, spec.n_vars)) < spec.dropout)
    off = r0 - g0 * _NOISE_GROUP
    return np.concatenate(gauss)[off : off + r1 - r0], np.concatenate(drop)[off : off + r1 - r0]


def _expression_rows(spec: SyntheticSpec, X: np.ndarray, cond: np.ndarray, params: dict, r0: int,
                     donor: np.ndarray | None = None) -> np.ndarray:
    eta = params["baseline"] + X @ params["loadings"]
    if donor is not None:
        eta = eta + _donor_shift(spec, X, cond, donor)
    shifted = cond == len(spec.conditions) - 1
    gate = 1.0 / (1.0 + np.exp(-(X @ params["de_direction"])))
    eta = eta + shifted[:, None] * params["de_effect"] * gate
    mean = np.log1p(np.exp(eta))  # softplus, positive
    gauss, drop = _noise(spec, r0, r0 + X.shape[0])
    values = np.maximum(mean + gauss * params["scale"], 0.0)
    values[drop] = 0.0
    return values.astype(np.float32)


def _frames(spec: SyntheticSpec, cond: np.ndarray, cluster: np.ndarray,
            params: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    obs = pd.DataFrame(
        {spec.groupby: pd.Categorical(np.asarray(spec.conditions)[cond], categories=list(spec.conditions))},
        index=[f"cell_{i}" for i in range(spec.n_obs)],
    )
    if spec.samples_per_condition:
        donor = _donors(spec)
        obs["sample"] = pd.Categorical([f"{spec.conditions[c]}_d{d}" for c, d in zip(cond, donor, strict=True)])
    if spec.cell_types:
        names = list(dict.fromkeys(spec.cell_types))
        labels = np.asarray(spec.cell_types)[cluster % len(spec.cell_types)]
        obs["cell_type"] = pd.Categorical(labels, categories=names)
    var = pd.DataFrame({"true_de": params["is_de"]}, index=[f"gene_{j}" for j in range(spec.n_vars)])
    return obs, var


def make_synthetic_adata(spec: SyntheticSpec | None = None, *, sparse: bool = False, **kwargs) -> ad.AnnData:
    """An in-memory AnnData (small data only): obs[groupby], obsm[obsm_key], layers[layer]."""
    spec = spec or SyntheticSpec(**kwargs)
    X, cond, cluster = _states(spec)
    params = _gene_params(spec)
    donor = _donors(spec) if spec.samples_per_condition else None
    Y = _expression_rows(spec, X, cond, params, 0, donor)
    obs, var = _frames(spec, cond, cluster, params)
    layer = sp.csr_matrix(Y) if sparse else Y
    return ad.AnnData(obs=obs, var=var, obsm=_obsm(spec, X), layers={spec.layer: layer})


def write_synthetic_store(
    path: str | os.PathLike,
    spec: SyntheticSpec | None = None,
    *,
    cell_chunk: int = 4096,
    gene_chunk: int = 256,
    overwrite: bool = True,
    **kwargs,
) -> str:
    """Write a synthetic zarr AnnData store, generating the layer one row block at a time."""
    spec = spec or SyntheticSpec(**kwargs)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(path)
        shutil.rmtree(path)
    X, cond, cluster = _states(spec)
    params = _gene_params(spec)
    obs, var = _frames(spec, cond, cluster, params)
    from ._io.ingest import write_generated_store

    chunks = (min(cell_chunk, spec.n_obs), min(gene_chunk, spec.n_vars))
    donor = _donors(spec) if spec.samples_per_condition else None
    return write_generated_store(
        path, ad.AnnData(obs=obs, var=var, obsm=_obsm(spec, X)), spec.layer, (spec.n_obs, spec.n_vars), chunks,
        lambda r0, r1: _expression_rows(spec, X[r0:r1], cond[r0:r1], params, r0,
                                        None if donor is None else donor[r0:r1]),
    )


def make_user_obs(n_obs: int, n_columns: int = 110, seed: int = 0) -> pd.DataFrame:
    """Obs columns of every kind users keep beside their conditions (floats, integers,
    booleans, categoricals), for tests that a run never touches a user's own data."""
    rng = np.random.default_rng(seed)
    makers = (
        ("qc", lambda: rng.normal(size=n_obs)),
        ("count", lambda: rng.integers(0, 1000, size=n_obs)),
        ("flag", lambda: rng.random(n_obs) < 0.5),
        ("cat", lambda: pd.Categorical(rng.choice([f"type{k}" for k in range(7)], size=n_obs))),
        ("donor", lambda: pd.Categorical(rng.choice(["d1", "d2", "d3"], size=n_obs))),
    )
    cols = {}
    for i in range(n_columns):
        prefix, make = makers[i % len(makers)]
        cols[f"{prefix}_{i}"] = make()
    return pd.DataFrame(cols)


def assert_de_results_close(
    actual: pd.DataFrame | dict, expected: pd.DataFrame | dict, *, columns: Sequence[str], rtol: float = 0.0,
    atol: float = 1e-10,
) -> None:
    """Assert that per-gene result columns agree (NaN positions included)."""
    for col in columns:
        a = np.asarray(actual[col], dtype=float)
        e = np.asarray(expected[col], dtype=float)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=f"column {col!r}")
