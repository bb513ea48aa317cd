"""Tests of kompot_dask.fdr: null genes, antitonic regression and the FDR statistics.

Reference numbers come from kompot 0.8.0's ``kompot.anndata.fdr_utils``. Importing kompot
changes JAX's global configuration, so the reference runs in a subprocess (one for the
whole module) on inputs saved to an .npz file, and writes its outputs to another .npz.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kompot_dask._numerics.fdr import (
    FDRResult,
    choose_null_genes,
    compute_fdr,
    null_permutation,
    pava_nonincreasing,
)

SUMMARY_KEYS = (
    "n_significant",
    "n_total",
    "fraction_significant",
    "fdr_threshold",
    "min_significant_mahalanobis",
)

HAVE_KOMPOT = importlib.util.find_spec("kompot") is not None
needs_kompot = pytest.mark.skipif(not HAVE_KOMPOT, reason="kompot 0.8.0 (reference) not installed")

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _chi(rng: np.random.Generator, df: float, n: int) -> np.ndarray:
    return np.sqrt(rng.chisquare(df, n))


def _fdr_cases() -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    cases: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}

    rng = np.random.default_rng(1)
    real = _chi(rng, 5, 400)
    real[:40] *= rng.uniform(2.0, 6.0, 40)
    null = _chi(rng, 5, 300)
    cases["chi_mixture"] = (real, null, 0.05)
    cases["chi_mixture_thr02"] = (real, null, 0.2)
    # A NaN null distance: the null drops out of the grid end and f0 comes from the histogram.
    cases["nan_null_with_signal"] = (real, np.r_[null[:150], np.nan, null[150:]], 0.05)

    rng = np.random.default_rng(2)
    real = _chi(rng, 10, 2000)
    real[:200] += rng.gamma(2.0, 3.0, 200)
    cases["few_nulls"] = (real, _chi(rng, 10, 50), 0.05)

    rng = np.random.default_rng(3)
    cases["no_signal_many_nulls"] = (_chi(rng, 3, 100), _chi(rng, 3, 2000), 0.05)

    rng = np.random.default_rng(4)
    real = _chi(rng, 4, 500)
    real[:250] = rng.uniform(20.0, 80.0, 250)
    cases["strong_signal"] = (real, _chi(rng, 4, 400), 0.05)

    rng = np.random.default_rng(5)
    cases["null_wider"] = (_chi(rng, 4, 300), 3.0 * _chi(rng, 4, 300), 0.05)

    rng = np.random.default_rng(6)
    null = np.round(_chi(rng, 3, 200), 1)
    real = np.concatenate([null[:50], np.round(_chi(rng, 3, 150) * 1.5, 1), [null.max()] * 3])
    cases["ties"] = (real, null, 0.1)

    rng = np.random.default_rng(7)
    real, null = _chi(rng, 6, 300), _chi(rng, 6, 200)
    cases["real_all_zero"] = (np.zeros(20), null, 0.05)  # KDE fails on f_mix: histogram
    cases["null_all_zero"] = (real, np.zeros(30), 0.05)  # KDE fails on f0: histogram
    cases["all_zero"] = (np.zeros(10), np.zeros(10), 0.05)  # max <= 0
    cases["negative"] = (-real, -null, 0.05)
    cases["one_real"] = (np.array([1.5]), null, 0.05)
    cases["one_null"] = (real, np.array([2.0]), 0.05)
    cases["empty_real"] = (np.zeros(0), null, 0.05)
    cases["empty_null"] = (real, np.zeros(0), 0.05)
    cases["nan_real"] = (np.r_[real, np.nan], null, 0.05)
    cases["nan_real_first"] = (np.r_[np.nan, 50.0 * real], null, 0.05)
    cases["all_nan_real"] = (np.full(5, np.nan), null, 0.05)
    cases["nan_null"] = (real, np.r_[null, np.nan], 0.05)
    cases["nan_null_narrow_real"] = (0.3 * real, np.r_[null, np.nan, np.nan], 0.05)
    cases["nan_both"] = (np.r_[real, np.nan], np.r_[np.nan, null], 0.05)
    cases["inf_real"] = (np.r_[real, np.inf], null, 0.05)
    cases["inf_null"] = (real, np.r_[null, np.inf], 0.05)
    return cases


def _pava_cases() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(11)
    grid = np.linspace(0.0, 10.0, 500)
    bumpy = np.exp(-grid) + 0.05 * np.sin(7 * grid) + 0.01 * rng.standard_normal(500)
    return {
        "normal": (rng.standard_normal(500), None),
        "weighted": (rng.standard_normal(300), rng.uniform(0.1, 5.0, 300)),
        "increasing": (np.arange(50.0), None),
        "decreasing": (np.arange(50.0)[::-1].copy(), None),
        "bumpy_density": (bumpy, None),
        "ratio_like": (np.clip(rng.uniform(0.0, 1.3, 500), 0.0, 1.0), None),
        "single": (np.array([3.0]), None),
        "empty": (np.zeros(0), None),
    }


def _null_cases() -> dict[str, tuple[np.ndarray, np.ndarray, int, int]]:
    rng = np.random.default_rng(21)

    def expr(n: int, g: int) -> np.ndarray:
        x = rng.lognormal(0.0, 1.0, (n, g))
        x[rng.random((n, g)) < 0.4] = 0.0
        return x

    return {
        "basic": (expr(30, 40), expr(25, 40), 15, 42),
        "replacement": (expr(30, 40), expr(25, 40), 60, 7),
        "all_genes": (expr(12, 5), expr(9, 5), 5, 0),
        "float32": (expr(17, 20).astype(np.float32), expr(23, 20).astype(np.float32), 8, 123),
        "zero": (expr(6, 4), expr(5, 4), 0, 42),
    }


FDR_CASES = _fdr_cases()
PAVA_CASES = _pava_cases()
NULL_CASES = _null_cases()

_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import logging
    import sys
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)

    from kompot.anndata import fdr_utils as fu

    SUMMARY_KEYS = {summary_keys!r}


    def cases(data, kind):
        return sorted({{k.split("/")[1] for k in data.files if k.startswith(kind + "/")}})


    def main(inp, out):
        data = np.load(inp)
        res = {{}}
        for c in cases(data, "fdr"):
            real = data[f"fdr/{{c}}/real"]
            null = data[f"fdr/{{c}}/null"]
            thr = float(data[f"fdr/{{c}}/threshold"])
            p, lf, tf, sig = fu.compute_fdr_statistics(real, null, thr)
            _, summ = fu.annotate_differential_genes(
                lf, real, [f"g{{i}}" for i in range(len(real))], thr
            )
            res[f"fdr/{{c}}/pvalue"] = p
            res[f"fdr/{{c}}/local_fdr"] = lf
            res[f"fdr/{{c}}/tail_fdr"] = tf
            res[f"fdr/{{c}}/is_de"] = sig
            res[f"fdr/{{c}}/summary"] = np.array([summ[k] for k in SUMMARY_KEYS], dtype=float)
        for c in cases(data, "pava"):
            w = data[f"pava/{{c}}/w"] if f"pava/{{c}}/w" in data.files else None
            res[f"pava/{{c}}/out"] = fu._pava_decreasing(data[f"pava/{{c}}/y"], w)
        for c in cases(data, "null"):
            e1 = data[f"null/{{c}}/expr1"]
            e2 = data[f"null/{{c}}/expr2"]
            n_null = int(data[f"null/{{c}}/n_null"])
            seed = int(data[f"null/{{c}}/seed"])
            names = [f"g{{i}}" for i in range(e1.shape[1])]
            idx, used = fu.prepare_null_genes(n_null, names, seed)
            s1, s2 = fu.generate_shuffled_expression(e1, e2, idx, seed)
            res[f"null/{{c}}/indices"] = np.asarray(idx, dtype=np.int64)
            res[f"null/{{c}}/replacement"] = np.bool_(used)
            res[f"null/{{c}}/shuffled1"] = s1
            res[f"null/{{c}}/shuffled2"] = s2
        np.savez(out, **res)


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
).format(summary_keys=SUMMARY_KEYS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """All reference outputs, from one kompot subprocess."""
    if not HAVE_KOMPOT:
        pytest.skip("kompot 0.8.0 (reference) not installed")
    work: Path = tmp_path_factory.mktemp("fdr_reference")
    payload: dict[str, np.ndarray] = {}
    for name, (real, null, thr) in FDR_CASES.items():
        payload[f"fdr/{name}/real"] = real
        payload[f"fdr/{name}/null"] = null
        payload[f"fdr/{name}/threshold"] = np.float64(thr)
    for name, (y, w) in PAVA_CASES.items():
        payload[f"pava/{name}/y"] = y
        if w is not None:
            payload[f"pava/{name}/w"] = w
    for name, (e1, e2, n_null, seed) in NULL_CASES.items():
        payload[f"null/{name}/expr1"] = e1
        payload[f"null/{name}/expr2"] = e2
        payload[f"null/{name}/n_null"] = np.int64(n_null)
        payload[f"null/{name}/seed"] = np.int64(seed)
    inp, out, script = work / "in.npz", work / "out.npz", work / "reference_fdr.py"
    np.savez(inp, **payload)
    script.write_text(_REFERENCE_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(inp), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


# ---------------------------------------------------------------------------
# Parity with the reference
# ---------------------------------------------------------------------------


def _assert_summary_equal(summary: dict, ref: np.ndarray) -> None:
    assert tuple(summary) == SUMMARY_KEYS
    assert type(summary["n_significant"]) is int
    assert type(summary["n_total"]) is int
    for key in SUMMARY_KEYS[2:]:
        assert type(summary[key]) is float
    for key, want in zip(SUMMARY_KEYS, ref, strict=True):
        got = summary[key]
        if math.isnan(want):
            assert math.isnan(got), key
        else:
            assert got == want, (key, got, want)


@needs_kompot
@pytest.mark.parametrize("case", sorted(FDR_CASES))
def test_compute_fdr__matches_reference(case: str, reference: dict[str, np.ndarray]) -> None:
    real, null, thr = FDR_CASES[case]
    res = compute_fdr(real, null, threshold=thr)
    assert isinstance(res, FDRResult)
    for name in ("pvalue", "local_fdr", "tail_fdr"):
        got = getattr(res, name)
        want = reference[f"fdr/{case}/{name}"]
        assert got.shape == real.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, equal_nan=True, err_msg=name)
    assert res.is_de.dtype == bool
    np.testing.assert_array_equal(res.is_de, reference[f"fdr/{case}/is_de"])
    _assert_summary_equal(res.summary, reference[f"fdr/{case}/summary"])


@needs_kompot
def test_compute_fdr__reference_cases_are_not_trivial(reference: dict[str, np.ndarray]) -> None:
    # The parity cases must exercise real calls, not only the all-ones degenerate path.
    assert reference["fdr/chi_mixture/is_de"].sum() > 0
    assert reference["fdr/strong_signal/is_de"].sum() > 0
    assert (reference["fdr/few_nulls/local_fdr"] < 1.0).sum() > 100
    assert reference["fdr/null_all_zero/is_de"].all()
    assert reference["fdr/nan_null_with_signal/is_de"].sum() > 0


@needs_kompot
@pytest.mark.parametrize("case", sorted(PAVA_CASES))
def test_pava_nonincreasing__matches_reference(case: str, reference: dict[str, np.ndarray]) -> None:
    y, w = PAVA_CASES[case]
    np.testing.assert_allclose(
        pava_nonincreasing(y, w), reference[f"pava/{case}/out"], rtol=0, atol=1e-12
    )


@needs_kompot
@pytest.mark.parametrize("case", sorted(NULL_CASES))
def test_null_genes__match_reference(
    case: str, reference: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    e1, e2, n_null, seed = NULL_CASES[case]
    n1, n_vars = e1.shape
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        sources, seeds = choose_null_genes(n_vars, n_null, seed=seed)
    assert sources.dtype == np.int64 and seeds.dtype == np.int64
    assert sources.shape == seeds.shape == (n_null,)
    np.testing.assert_array_equal(sources, reference[f"null/{case}/indices"])
    replaced = bool(reference[f"null/{case}/replacement"])
    assert replaced == (n_null > n_vars)
    assert any("replacement" in r.getMessage() for r in caplog.records) == replaced

    stacked = np.vstack([e1, e2])
    columns = np.empty((stacked.shape[0], n_null), dtype=np.float64)
    for i, (gene, s) in enumerate(zip(sources, seeds, strict=True)):
        columns[:, i] = stacked[:, gene][null_permutation(stacked.shape[0], int(s))]
    np.testing.assert_array_equal(columns[:n1], reference[f"null/{case}/shuffled1"])
    np.testing.assert_array_equal(columns[n1:], reference[f"null/{case}/shuffled2"])


# ---------------------------------------------------------------------------
# Null genes without the reference
# ---------------------------------------------------------------------------


def test_choose_null_genes__seed_streams() -> None:
    sources, seeds = choose_null_genes(100, 20, seed=5)
    np.testing.assert_array_equal(sources, np.random.RandomState(5).choice(100, 20, replace=False))
    assert len(set(sources.tolist())) == 20
    stream = np.random.RandomState(5)
    np.testing.assert_array_equal(seeds, [stream.randint(0, 2**31 - 1) for _ in range(20)])
    assert seeds.min() >= 0 and seeds.max() < 2**31 - 1
    # The first null's seed does not depend on how many nulls are drawn.
    assert choose_null_genes(100, 3, seed=5)[1][0] == seeds[0]


def test_choose_null_genes__zero_nulls() -> None:
    sources, seeds = choose_null_genes(10, 0)
    assert sources.shape == seeds.shape == (0,)
    assert sources.dtype == seeds.dtype == np.int64


@pytest.mark.parametrize(
    ("n_vars", "n_null", "match"),
    [(10, -1, "n_null.*-1"), (0, 5, "n_vars.*0"), (-3, 5, "n_vars.*-3"), (10, 2.5, "n_null")],
)
def test_choose_null_genes__rejects_bad_counts(n_vars: int, n_null: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_null_genes(n_vars, n_null)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_cells", [0, 1, 2, 7, 55, 1001])
@pytest.mark.parametrize("seed", [0, 42, 2**31 - 2])
def test_null_permutation__equals_randomstate_permutation(
    dtype: type, n_cells: int, seed: int
) -> None:
    v = np.random.default_rng(n_cells).standard_normal(n_cells).astype(dtype)
    p = null_permutation(n_cells, seed)
    assert p.dtype == np.int64
    np.testing.assert_array_equal(np.sort(p), np.arange(n_cells))
    want = np.random.RandomState(seed).permutation(v)
    assert want.dtype == v.dtype
    np.testing.assert_array_equal(v[p], want)


def test_null_permutation__rejects_negative_length() -> None:
    with pytest.raises(ValueError, match="n_cells.*-3"):
        null_permutation(-3, 0)


# ---------------------------------------------------------------------------
# compute_fdr without the reference
# ---------------------------------------------------------------------------


def test_compute_fdr__fdr_is_monotone_in_distance() -> None:
    real, null, thr = FDR_CASES["chi_mixture"]
    res = compute_fdr(real, null, thr)
    order = np.argsort(real)
    for arr in (res.local_fdr, res.tail_fdr):
        assert np.all((arr >= 0.0) & (arr <= 1.0))
        assert np.all(np.diff(arr[order]) <= 1e-15)
    assert res.summary["n_significant"] == int(res.is_de.sum()) > 0
    assert res.summary["min_significant_mahalanobis"] == real[res.is_de].min()
    assert np.all(real[~res.is_de] <= res.summary["min_significant_mahalanobis"])


def test_compute_fdr__threshold_is_strict() -> None:
    real, null, _ = FDR_CASES["chi_mixture"]
    res = compute_fdr(real, null)
    level = float(np.min(res.local_fdr))
    at_level = compute_fdr(real, null, threshold=level)
    assert not np.any(at_level.is_de[res.local_fdr == level])


def test_compute_fdr__too_few_values_gives_ones(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kompot_dask"):
        res = compute_fdr(np.array([3.0, 4.0, 5.0]), np.array([1.0]))
    np.testing.assert_array_equal(res.local_fdr, 1.0)
    np.testing.assert_array_equal(res.tail_fdr, 1.0)
    assert not res.is_de.any()
    assert res.summary["min_significant_mahalanobis"] == math.inf
    assert any("Too few" in r.getMessage() for r in caplog.records)


def test_compute_fdr__nan_distance_gets_nan_fdr() -> None:
    real, null, _ = FDR_CASES["nan_real"]
    res = compute_fdr(real, null)
    assert np.isnan(res.local_fdr[-1]) and np.isnan(res.tail_fdr[-1])
    np.testing.assert_array_equal(res.local_fdr[:-1], 1.0)
    assert not res.is_de.any()


def test_compute_fdr__empty_real() -> None:
    res = compute_fdr(np.zeros(0), np.arange(5.0))
    assert res.pvalue.shape == res.local_fdr.shape == res.is_de.shape == (0,)
    assert res.summary["n_total"] == 0
    assert math.isnan(res.summary["fraction_significant"])


def test_compute_fdr__rejects_2d_input() -> None:
    with pytest.raises(ValueError, match="real must be 1-D"):
        compute_fdr(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="null must be 1-D"):
        compute_fdr(np.ones(3), np.ones((4, 1)))


# ---------------------------------------------------------------------------
# pava_nonincreasing properties
# ---------------------------------------------------------------------------

_values = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
_weights = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def _y_and_w(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None]:
    n = draw(st.integers(0, 60))
    y = draw(arrays(np.float64, n, elements=_values))
    w = draw(st.none() | arrays(np.float64, n, elements=_weights))
    return y, w


@settings(max_examples=150, deadline=None)
@given(_y_and_w())
def test_pava_nonincreasing__output_is_nonincreasing(yw: tuple) -> None:
    y, w = yw
    g = pava_nonincreasing(y, w)
    assert g.shape == y.shape and g.dtype == np.float64
    assert np.all(np.diff(g) <= 0.0)


@settings(max_examples=150, deadline=None)
@given(_y_and_w())
def test_pava_nonincreasing__preserves_weighted_mean(yw: tuple) -> None:
    y, w = yw
    weights = np.ones_like(y) if w is None else w
    g = pava_nonincreasing(y, w)
    scale = float(np.sum(weights * np.abs(y))) + 1.0
    assert abs(float(np.sum(weights * g)) - float(np.sum(weights * y))) <= 1e-9 * scale


@settings(max_examples=150, deadline=None)
@given(_y_and_w())
def test_pava_nonincreasing__is_idempotent(yw: tuple) -> None:
    y, w = yw
    g = pava_nonincreasing(y, w)
    np.testing.assert_array_equal(pava_nonincreasing(g, w), g)


@settings(max_examples=100, deadline=None)
@given(_y_and_w())
def test_pava_nonincreasing__is_least_squares_fit(yw: tuple) -> None:
    from sklearn.isotonic import isotonic_regression

    y, w = yw
    if y.size == 0:
        return
    g = pava_nonincreasing(y, w)
    want = isotonic_regression(y, sample_weight=w, increasing=False)
    scale = float(np.max(np.abs(y))) + 1.0
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-9 * scale)


def test_pava_nonincreasing__rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        pava_nonincreasing(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        pava_nonincreasing(np.ones((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        pava_nonincreasing(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="positive"):
        pava_nonincreasing(np.ones(3), np.array([1.0, 0.0, 1.0]))
